//! `pyebpf daemon`: continuous, system-wide profiling of every supported
//! CPython process on the host.
//!
//! - [`config`]: the YAML configuration and its validation.
//! - [`discovery`], [`filter`], [`labels`]: which processes to profile and how
//!   they are labelled.
//! - [`store`]: per-process stacks in one-second buckets, bounded in memory.
//! - [`http`], [`metrics`]: the localhost API and Prometheus metrics.
//! - [`export`]: pprof files on disk and pushes to Pyroscope.
use std::time::{SystemTime, UNIX_EPOCH};

// `python_label` is used by `run` through this module (`super::python_label`).
use crate::model::labels::{python_label, ProcessLabels};
use crate::profile::Profile;

pub mod config;
pub mod discovery;
pub mod export;
pub mod filter;
pub mod http;
pub mod labels;
pub mod local;
pub mod metrics;
pub mod run;
pub mod shared;
pub mod store;
pub mod store_metrics;

/// Whole seconds since the Unix epoch (0 for a time before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One process's stacks over a closed window, ready for export.
#[derive(Clone, Debug)]
pub struct WindowProfile {
    pub labels: ProcessLabels,
    pub profile: Profile,
    pub start: SystemTime,
    pub end: SystemTime,
}
