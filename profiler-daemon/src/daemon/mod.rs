//! `pyebpf daemon`: continuous, system-wide profiling of every supported
//! CPython process on the host.
//!
//! - [`config`]: the YAML configuration and its validation.
//! - [`discovery`], [`filter`], [`labels`]: which processes to profile and how
//!   they are labelled.
//! - [`crate::store`]: per-process stacks in one-second buckets, bounded in
//!   memory (shared with `top` and `record`).
//! - [`http`], [`metrics`]: the localhost API and Prometheus metrics.
//! - [`export`]: pprof files on disk and pushes to Pyroscope.
use std::time::SystemTime;

use crate::model::labels::ProcessLabels;
use crate::profile::CompactProfile;

pub mod access;
pub mod config;
pub mod discovery;
pub mod export;
pub mod filter;
pub mod health;
pub mod http;
pub mod http_conn;
pub mod labels;
pub mod local;
pub mod metrics;
pub mod run;
pub mod shared;
pub mod store_metrics;

/// One process's stacks over a closed window, ready for export.
#[derive(Clone, Debug)]
pub struct WindowProfile {
    pub labels: ProcessLabels,
    pub profile: CompactProfile,
    pub start: SystemTime,
    pub end: SystemTime,
}
