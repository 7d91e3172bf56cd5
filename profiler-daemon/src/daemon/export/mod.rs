//! Where closed windows go: pprof files on disk and Pyroscope's ingest API.
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::config::Outputs;
use super::metrics::Metrics;
use super::{ProcessLabels, WindowProfile};
use crate::profile::CompactProfile;

pub mod pprof_dir;
pub mod pprof_writer;
pub mod pyroscope;

pub use pprof_dir::ExportError;

/// The configured outputs of closed windows.
pub struct Exporters {
    pprof_dir: Option<pprof_writer::Writer>,
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

    /// Whether any output is configured.
    pub fn any(&self) -> bool {
        self.pprof_dir.is_some() || self.pyroscope.is_some()
    }

    pub fn new(cfg: &Outputs, metrics: &Metrics) -> Result<Self, ExportError> {
        let pprof_dir = match &cfg.pprof_dir {
            Some(d) => {
                let dir = pprof_dir::PprofDir::new(pprof_dir::PprofDirConfig {
                    path: d.path.clone(),
                    max_age: Duration::from_secs(d.max_age_secs),
                    max_total_bytes: d.max_total_bytes,
                })?;
                let writer = pprof_writer::Writer::spawn(dir, metrics.pprof_write_counters())
                    .map_err(|e| {
                        ExportError::io("pprof directory {}: no writer thread", &d.path, e)
                    })?;
                Some(writer)
            }
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

    /// Hands the window's profiles to the outputs. Never blocks on the disk
    /// or the network: files are written by their own thread, and the
    /// pusher encodes on a blocking thread and sends from its own tasks.
    pub fn export(
        &self,
        windows: Vec<(ProcessLabels, CompactProfile)>,
        from: u64,
        until: u64,
        metrics: &Metrics,
    ) {
        let start = UNIX_EPOCH + Duration::from_secs(from);
        let end = UNIX_EPOCH + Duration::from_secs(until);
        // Before the push, so the pusher's counters reach the metrics.
        self.report(metrics);
        let window: Vec<WindowProfile> = windows
            .into_iter()
            .map(|(labels, profile)| WindowProfile {
                labels,
                profile,
                start,
                end,
            })
            .collect();
        match (&self.pprof_dir, &self.pyroscope) {
            (Some(dir), Some(p)) => {
                dir.write_window(window.clone());
                p.push_window(window);
            }
            (Some(dir), None) => dir.write_window(window),
            (None, Some(p)) => p.push_window(window),
            (None, None) => {}
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

    /// Writes and sends what is queued, for at most `deadline` each, and
    /// says what was left.
    pub async fn shutdown(self, deadline: Duration) {
        if let Some(w) = self.pprof_dir {
            if !w.shutdown(deadline).await {
                tracing::warn!("pprof_dir: files still being written at shutdown");
            }
        }
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
