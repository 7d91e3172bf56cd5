//! Where closed windows go: pprof files on disk and Pyroscope's ingest API.
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::config::Outputs;
use super::metrics::{ExportResult, ExportTarget, Metrics};
use super::{ProcessLabels, WindowProfile};
use crate::profile::Profile;

pub mod pprof_dir;
pub mod pyroscope;

pub use pprof_dir::ExportError;

/// The configured outputs of closed windows.
pub struct Exporters {
    pprof_dir: Option<pprof_dir::PprofDir>,
    pyroscope: Option<pyroscope::Pusher>,
}

impl Exporters {
    /// No outputs.
    pub fn none() -> Self {
        Exporters {
            pprof_dir: None,
            pyroscope: None,
        }
    }

    pub fn new(cfg: &Outputs) -> Result<Self, ExportError> {
        let pprof_dir = match &cfg.pprof_dir {
            Some(d) => Some(pprof_dir::PprofDir::new(pprof_dir::PprofDirConfig {
                path: d.path.clone(),
                max_age: Duration::from_secs(d.max_age_secs),
                max_total_bytes: d.max_total_bytes,
            })?),
            None => None,
        };
        let pyroscope = match &cfg.pyroscope {
            Some(p) => Some(pyroscope::Pusher::spawn(
                pusher_config(p),
                Arc::new(pyroscope::PushStats::default()),
            )?),
            None => None,
        };
        Ok(Exporters {
            pprof_dir,
            pyroscope,
        })
    }

    /// Writes and queues the window's profiles. Never blocks on the network:
    /// the window is handed to the pusher as a whole, encoded on a blocking
    /// thread and sent by its own tasks.
    pub fn export(
        &self,
        windows: Vec<(ProcessLabels, Profile)>,
        from: u64,
        until: u64,
        metrics: &Metrics,
    ) {
        let start = UNIX_EPOCH + Duration::from_secs(from);
        let end = UNIX_EPOCH + Duration::from_secs(until);
        // Before the push, so the pusher's counters reach the metrics.
        self.report(metrics);
        let mut push = Vec::with_capacity(if self.pyroscope.is_some() {
            windows.len()
        } else {
            0
        });
        for (labels, profile) in windows {
            let w = WindowProfile {
                labels,
                profile,
                start,
                end,
            };
            if let Some(dir) = &self.pprof_dir {
                match dir.write(&w) {
                    Ok(_) => metrics.inc_export(ExportTarget::PprofDir, ExportResult::Ok),
                    Err(e) => {
                        tracing::warn!("pprof_dir: {e}");
                        metrics.inc_export(ExportTarget::PprofDir, ExportResult::Error);
                    }
                }
            }
            if self.pyroscope.is_some() {
                push.push(w);
            }
        }
        if let Some(p) = &self.pyroscope {
            p.push_window(push);
        }
        if let Some(dir) = &self.pprof_dir {
            if let Err(e) = dir.enforce_retention() {
                tracing::warn!("pprof_dir retention: {e}");
            }
        }
    }

    /// Connects the pusher to `metrics`: from the first call on, what it
    /// does (and what it did before) shows in the metrics as it happens
    /// (`pyebpf_export_total{target="pyroscope"}`, `pyebpf_pyroscope_*`).
    pub fn report(&self, metrics: &Metrics) {
        if let Some(p) = &self.pyroscope {
            p.attach_metrics(metrics.pyroscope());
        }
    }

    /// Sends what is queued, for at most `deadline`, and says what was left.
    pub async fn shutdown(self, deadline: Duration) {
        if let Some(p) = self.pyroscope {
            let r = p.shutdown(deadline).await;
            if r.unsent > 0 {
                tracing::warn!(
                    "pyroscope: {} profile(s) could not be sent before shutdown",
                    r.unsent
                );
            }
        }
    }
}

fn pusher_config(p: &super::config::Pyroscope) -> pyroscope::PyroscopeConfig {
    let mut c = pyroscope::PyroscopeConfig::new(p.url.clone(), p.application_name.clone());
    c.timeout = Duration::from_secs(p.timeout_secs);
    c.max_queue_bytes = p.max_queue_bytes;
    c.max_concurrent_uploads = p.max_concurrent_uploads as usize;
    c.max_retry = Duration::from_secs(p.max_retry_secs);
    c.basic_auth = p
        .basic_auth
        .as_ref()
        .map(|b| (b.username.clone(), b.password.clone()));
    c.tenant_id = p.tenant_id.clone();
    c
}
