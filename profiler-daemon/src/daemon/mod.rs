//! `pyebpf daemon`: continuous, system-wide profiling of every supported
//! CPython process on the host.
//!
//! - [`config`]: the YAML configuration and its validation.
//! - [`discovery`], [`filter`], [`labels`]: which processes to profile and how
//!   they are labelled.
//! - [`store`]: per-process stacks in one-second buckets, bounded in memory.
//! - [`http`], [`metrics`]: the localhost API and Prometheus metrics.
//! - [`export`]: pprof files on disk and pushes to Pyroscope.
use std::collections::HashMap;
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
pub mod store_metrics;

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

/// [`ProcessView::status`] of a process being profiled.
pub const STATUS_PROFILED: &str = "profiled";
/// [`ProcessView::status`] of a profiled process that exited (listed until
/// its data expires).
pub const STATUS_EXITED: &str = "exited";
/// [`ProcessView::status`] of a CPython process refused for its version or
/// build (listed by `/processes?all=1` only).
pub const STATUS_UNSUPPORTED: &str = "unsupported";

/// The `python` label of a CPython version: major.minor (`"3.14"` for
/// `"3.14.10"` or `"3.16.0a1"`), with `t` for a free-threaded build
/// (`"3.14t"`). A version string that does not start with `X.Y` (digits,
/// at most three each) gives `"other"`, so the label never carries
/// arbitrary text.
pub fn python_label(version: &str, free_threaded: bool) -> String {
    let number = |s: &str| !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = version.splitn(3, '.');
    let major = parts.next().unwrap_or("");
    let minor_part = parts.next().unwrap_or("");
    // "3.16a1" (no micro) still gives 3.16.
    let minor_end = minor_part
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(minor_part.len());
    let minor = &minor_part[..minor_end];
    if !number(major) || !number(minor) {
        return "other".to_string();
    }
    let t = if free_threaded { "t" } else { "" };
    format!("{major}.{minor}{t}")
}

/// A process as listed by `/processes`: profiled, exited (while its data is
/// retained), or, with `?all=1`, a CPython process refused for its version
/// or build.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessView {
    pub labels: ProcessLabels,
    /// e.g. "3.11.7" (a free-threaded build has no `t` here; see `python`).
    pub python_version: String,
    /// Major.minor, with `t` for a free-threaded build: "3.11", "3.14t"
    /// (the `python` label of the metrics).
    pub python: String,
    /// [`STATUS_PROFILED`], [`STATUS_EXITED`] or [`STATUS_UNSUPPORTED`].
    pub status: &'static str,
    /// Unix seconds when profiling started (when it was refused, for an
    /// unsupported process).
    pub since: u64,
    /// Samples held for this process (within retention).
    pub samples: u64,
    /// Memory its profile holds now (stacks, counts, caches).
    pub memory_bytes: u64,
    /// Samples dropped before the end of the retention (its oldest
    /// seconds evicted) to fit the memory budgets.
    pub evicted_samples: u64,
    /// Why an unsupported process is not profiled (absent for the others).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
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
    /// Profiled and exited processes, then the unsupported ones
    /// ([`STATUS_UNSUPPORTED`]), which only `/processes?all=1` shows.
    fn processes(&self) -> Vec<ProcessView>;
    /// The last `seconds` seconds of the selected process(es), at one-second
    /// granularity; `seconds` is at most the configured retention.
    fn profile(&self, selector: &Selector, seconds: u32) -> Result<Profile, QueryError>;
    /// Prometheus text exposition of every metric.
    fn metrics_text(&self) -> String;
    /// Sampler loaded and first discovery done.
    fn ready(&self) -> Result<(), String>;
    /// Whether ingest is alive: the ring buffer was drained lately. The
    /// default (a source without ingest) is always alive.
    fn live(&self) -> Result<(), String> {
        Ok(())
    }
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
            if v.status == STATUS_UNSUPPORTED {
                continue;
            }
            if v.status == STATUS_PROFILED {
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

    /// [`ApiSource::top`] with the `python` of every row filled in from
    /// [`ApiSource::processes`]: what `GET /api/top` serves and local
    /// `pyebpf top` shows.
    fn top_with_python(&self, q: &TopQuery) -> Result<TopSnapshot, QueryError> {
        let mut snap = self.top(q)?;
        let python: HashMap<u32, String> = self
            .processes()
            .into_iter()
            .filter(|v| v.status != STATUS_UNSUPPORTED)
            .map(|v| (v.labels.pid, v.python))
            .collect();
        snap.set_python(|pid| python.get(&pid).map(String::as_str));
        Ok(snap)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_labels() {
        assert_eq!(python_label("3.11.7", false), "3.11");
        assert_eq!(python_label("3.14.10", false), "3.14");
        assert_eq!(python_label("3.14.10", true), "3.14t");
        assert_eq!(python_label("3.16.0a1", false), "3.16");
        assert_eq!(python_label("3.10.12", false), "3.10");
        assert_eq!(python_label("3.16", false), "3.16");
        assert_eq!(python_label("3.16a1", false), "3.16");
        assert_eq!(python_label("2.7.18", false), "2.7");
        for bad in [
            "", "3", "3.", "x.y", ".1", "3.x", "1234.1", "3.1234", "3 .1", "{}.1",
        ] {
            assert_eq!(python_label(bad, false), "other", "{bad:?}");
            assert_eq!(python_label(bad, true), "other", "{bad:?}");
        }
    }

    /// An API source with one profiled and one unsupported process.
    struct Two;

    impl ApiSource for Two {
        fn processes(&self) -> Vec<ProcessView> {
            let view = |pid: u32, python: &str, status| ProcessView {
                labels: ProcessLabels::python3(pid, "svc"),
                python_version: format!("{python}.0"),
                python: python.into(),
                status,
                since: 0,
                samples: 0,
                memory_bytes: 0,
                evicted_samples: 0,
                reason: (status == STATUS_UNSUPPORTED).then(|| "too new".to_string()),
            };
            vec![
                view(1, "3.14", STATUS_PROFILED),
                view(2, "3.16", STATUS_UNSUPPORTED),
            ]
        }
        fn profile(&self, selector: &Selector, _: u32) -> Result<Profile, QueryError> {
            match selector {
                Selector::Pid(1) => {
                    let mut p = Profile::new(99);
                    p.add(
                        vec![crate::profile::Frame::Python {
                            qualname: "f".into(),
                            filename: "/a.py".into(),
                            line: 2,
                            first_line: 1,
                        }],
                        4,
                    );
                    Ok(p)
                }
                _ => Err(QueryError::NotFound("not profiled".into())),
            }
        }
        fn metrics_text(&self) -> String {
            String::new()
        }
        fn ready(&self) -> Result<(), String> {
            Ok(())
        }
        fn retention_secs(&self) -> u32 {
            60
        }
    }

    #[test]
    fn top_leaves_unsupported_processes_out_and_tells_the_python() {
        let q = TopQuery::default();
        let s = Two.top(&q).unwrap();
        assert_eq!(s.processes_profiled, 1);
        assert_eq!(s.processes.len(), 1);
        assert_eq!(s.processes[0].python, "", "top() alone does not fill it");
        let s = Two.top_with_python(&q).unwrap();
        assert_eq!(s.processes.len(), 1);
        assert_eq!(
            (s.processes[0].pid, s.processes[0].python.as_str()),
            (1, "3.14")
        );
        assert_eq!(s.functions.len(), 1);
        assert_eq!(s.functions[0].python, "3.14");
        assert_eq!(s.total_samples, 4);
    }
}
