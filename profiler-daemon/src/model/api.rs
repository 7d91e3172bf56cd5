//! What the HTTP API and `pyebpf top` read from a running sampling loop
//! (the daemon's, or the one `top` runs itself in local mode).
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Runtime;

use super::query::{
    checked_top_seconds, top_span, ProcessView, QueryError, Selector, STATUS_PROFILED,
    STATUS_UNSUPPORTED,
};
use super::top::{snapshot, Header, TopQuery, TopSnapshot};
use crate::profile::{CompactProfile, Profile, ProfileKind};

/// What the HTTP API reads from the running daemon.
pub trait ApiSource: Send + Sync + 'static {
    /// Profiled and exited processes, then the unsupported ones
    /// ([`STATUS_UNSUPPORTED`]), which only `/processes?all=1` shows.
    fn processes(&self) -> Vec<ProcessView>;
    /// The last `seconds` seconds of the selected process(es), at one-second
    /// granularity; `seconds` is at most the configured retention.
    fn profile(&self, selector: &Selector, seconds: u32) -> Result<Profile, QueryError>;
    /// [`ApiSource::profile`] of profile type `kind`; the default holds
    /// only CPU profiles.
    fn profile_of(
        &self,
        selector: &Selector,
        seconds: u32,
        kind: ProfileKind,
    ) -> Result<Profile, QueryError> {
        match kind {
            ProfileKind::Cpu => self.profile(selector, seconds),
            k => Err(QueryError::BadRequest(format!(
                "profile type {} is not enabled; enabled: cpu",
                k.name()
            ))),
        }
    }
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
    /// Whether requests may name the API by `host` (beyond IP addresses and
    /// `localhost`, always allowed): `api.allowed_hosts`.
    fn host_allowed(&self, _host: &str) -> bool {
        false
    }
    /// What `pyebpf top` shows (`GET /api/top`): functions and processes of
    /// the last `q.seconds` seconds (everything held when `None`).
    ///
    /// The default builds it from [`ApiSource::processes`] and
    /// [`ApiSource::profile`], with zero header counters; the daemon's
    /// `daemon::shared::Shared` answers it directly from its store and metrics.
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
                Ok(p) => per_process.push((v.labels, CompactProfile::from(&p))),
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
        Ok(snapshot(&per_process, q, &header))
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

/// A sampling loop started in this process (`pyebpf top --local`): it
/// answers like the daemon's API and is stopped by its owner. The daemon
/// provides it; `top` is handed a way to load one, so neither imports the
/// other.
pub trait LocalSampling: Send {
    /// What the loop holds, as the HTTP API would serve it.
    fn api(&self) -> &dyn ApiSource;
    /// Whether the loop ended by itself (an error).
    fn is_finished(&self) -> bool;
    /// Stops the loop on `rt`, waiting at most `timeout`.
    fn stop(self: Box<Self>, rt: &Runtime, timeout: Duration) -> anyhow::Result<()>;
}

/// A [`LocalSampling`] loop whose sampler is loaded and attached, and
/// nothing else yet: no thread was started, so its owner can give up the
/// capabilities loading needed (they are per thread) before
/// [`PreparedLocal::start`].
pub trait PreparedLocal {
    /// Starts discovery and ingest on `rt`.
    fn start(self: Box<Self>, rt: &Arc<Runtime>) -> anyhow::Result<Box<dyn LocalSampling>>;
}

/// Loads a [`PreparedLocal`] loop at `rate_hz`, keeping `retention_secs`;
/// starts no thread.
pub type PrepareLocal =
    fn(rate_hz: u64, retention_secs: u64, off_cpu: bool) -> anyhow::Result<Box<dyn PreparedLocal>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::labels::ProcessLabels;

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
                replaced_by: None,
                types: Vec::new(),
                gil_wait_seconds: None,
                wall_seconds: None,
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
