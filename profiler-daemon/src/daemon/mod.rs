//! `pyebpf daemon`: continuous, system-wide profiling of every Python 3.11
//! process on the host.
//!
//! - [`config`]: the YAML configuration and its validation.
//! - [`discovery`], [`filter`], [`labels`]: which processes to profile and how
//!   they are labelled.
//! - [`store`]: per-process stacks in one-second buckets, bounded in memory.
//! - [`http`], [`metrics`]: the localhost API and Prometheus metrics.
//! - [`export`]: pprof files on disk and pushes to Pyroscope.
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::profile::Profile;
use crate::top::model::{Header, TopQuery, TopSnapshot};

pub mod config;
pub mod discovery;
pub mod export;
pub mod filter;
pub mod http;
pub mod labels;
pub mod metrics;
pub mod run;
pub mod shared;
pub mod store;

/// Whole seconds since the Unix epoch (0 for a time before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Labels of a profiled process, attached to everything exported for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ProcessLabels {
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub command: String,
    /// `OTEL_SERVICE_NAME`, else `DD_SERVICE`, else the command.
    pub service: String,
    /// Executable as the process sees it (`/proc/PID/exe` link target).
    pub exe: String,
    /// Command line, arguments joined by spaces (may be empty).
    pub cmdline: String,
    /// Container id from the cgroup path (docker, containerd, cri-o, ECS).
    pub container_id: Option<String>,
    /// Kubernetes pod UID from the cgroup path.
    pub pod_uid: Option<String>,
    /// Kubernetes QoS class from the cgroup path: guaranteed, burstable, besteffort.
    pub qos_class: Option<String>,
    /// ECS task id from the cgroup path.
    pub ecs_task_id: Option<String>,
}

#[cfg(test)]
impl ProcessLabels {
    /// A `python3` process of `service`, for tests.
    pub fn python3(pid: u32, service: &str) -> ProcessLabels {
        ProcessLabels {
            pid,
            command: "python3".into(),
            service: service.into(),
            ..Default::default()
        }
    }
}

impl ProcessLabels {
    /// Label pairs for exports (Pyroscope, pprof comments), absent ones left out.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("pid", self.pid.to_string()),
            ("command", self.command.clone()),
            ("service_name", self.service.clone()),
        ];
        for (k, val) in [
            ("container_id", &self.container_id),
            ("pod_uid", &self.pod_uid),
            ("qos_class", &self.qos_class),
            ("ecs_task_id", &self.ecs_task_id),
        ] {
            if let Some(x) = val {
                v.push((k, x.clone()));
            }
        }
        v
    }
}

/// Which process(es) a query is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Pid(u32),
    /// Every process with this service label, merged.
    Service(String),
}

/// One process's stacks over a closed window, ready for export.
#[derive(Clone, Debug)]
pub struct WindowProfile {
    pub labels: ProcessLabels,
    pub profile: Profile,
    pub start: SystemTime,
    pub end: SystemTime,
}

/// A profiled process as listed by `/processes`.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessView {
    pub labels: ProcessLabels,
    /// e.g. "3.11.7".
    pub python_version: String,
    /// "profiled" or "exited" (kept until its data expires).
    pub status: &'static str,
    /// Unix seconds when profiling started.
    pub since: u64,
    /// Samples held for this process (within retention).
    pub samples: u64,
}

/// Why a query could not be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("not ready: {0}")]
    NotReady(String),
}

/// What the HTTP API reads from the running daemon.
pub trait ApiSource: Send + Sync + 'static {
    fn processes(&self) -> Vec<ProcessView>;
    /// The last `seconds` seconds of the selected process(es), at one-second
    /// granularity; `seconds` is at most the configured retention.
    fn profile(&self, selector: &Selector, seconds: u32) -> Result<Profile, QueryError>;
    /// Prometheus text exposition of every metric.
    fn metrics_text(&self) -> String;
    /// Sampler loaded and first discovery done.
    fn ready(&self) -> Result<(), String>;
    /// Retention in seconds (the largest `seconds` a query may ask for).
    fn retention_secs(&self) -> u32;
    /// What `pyebpf top` shows (`GET /api/top`): functions and processes of
    /// the last `q.seconds` seconds (everything held when `None`).
    ///
    /// The default builds it from [`ApiSource::processes`] and
    /// [`ApiSource::profile`], with zero header counters; the daemon's
    /// [`shared::Shared`] answers it directly from its store and metrics.
    fn top(&self, q: &TopQuery) -> Result<TopSnapshot, QueryError> {
        let retention = self.retention_secs();
        let seconds = checked_top_seconds(q.seconds, retention)?;
        let span = top_span(seconds, retention);
        let mut per_process = Vec::new();
        let mut processes_profiled = 0;
        for v in self.processes() {
            if v.status == "profiled" {
                processes_profiled += 1;
            }
            if !q.selects(&v.labels) {
                continue;
            }
            match self.profile(&Selector::Pid(v.labels.pid), span) {
                Ok(p) => per_process.push((v.labels, p)),
                // Gone since the listing.
                Err(QueryError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let rate_hz = per_process.first().map_or(0, |(_, p)| p.rate_hz);
        let header = Header {
            rate_hz,
            processes_profiled,
            window_secs: seconds,
            ..Header::default()
        };
        Ok(crate::top::model::snapshot(&per_process, q, &header))
    }
}

/// What a `top` query for the last `seconds` asks of the store: those many
/// complete seconds and the current, partial one (so that the last second
/// is never empty), within the retention.
pub fn top_span(seconds: u32, retention: u32) -> u32 {
    seconds.saturating_add(1).min(retention.max(1))
}

/// The window of a `top` query: `seconds` checked against the retention,
/// `None` meaning the whole retention.
pub fn checked_top_seconds(seconds: Option<u32>, retention: u32) -> Result<u32, QueryError> {
    match seconds {
        None => Ok(retention.max(1)),
        Some(s) if (1..=retention).contains(&s) => Ok(s),
        Some(s) => Err(QueryError::BadRequest(format!(
            "bad seconds {s}: expected a whole number from 1 to {retention} (the retention)"
        ))),
    }
}
