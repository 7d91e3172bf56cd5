//! Where closed windows go: pprof files on disk and Pyroscope's ingest API.
use std::sync::{Arc, Mutex};
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
    push_stats: Arc<pyroscope::PushStats>,
    /// Push totals already added to the export metrics.
    reported: Mutex<pyroscope::PushStatsSnapshot>,
}

impl Exporters {
    /// No outputs.
    pub fn none() -> Self {
        Exporters {
            pprof_dir: None,
            pyroscope: None,
            push_stats: Arc::default(),
            reported: Mutex::default(),
        }
    }

    pub fn new(cfg: &Outputs) -> Result<Self, ExportError> {
        let push_stats = Arc::new(pyroscope::PushStats::default());
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
                push_stats.clone(),
            )?),
            None => None,
        };
        Ok(Exporters {
            pprof_dir,
            pyroscope,
            push_stats,
            reported: Mutex::default(),
        })
    }

    /// Writes and queues the window's profiles. Never blocks on the network:
    /// pushes are queued and sent by their own task.
    pub fn export(
        &self,
        windows: Vec<(ProcessLabels, Profile)>,
        from: u64,
        until: u64,
        metrics: &Metrics,
    ) {
        let start = UNIX_EPOCH + Duration::from_secs(from);
        let end = UNIX_EPOCH + Duration::from_secs(until);
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
            if let Some(p) = &self.pyroscope {
                p.push(w);
            }
        }
        if let Some(dir) = &self.pprof_dir {
            if let Err(e) = dir.enforce_retention() {
                tracing::warn!("pprof_dir retention: {e}");
            }
        }
        self.report(metrics);
    }

    /// Adds what the push task did since the last call to the metrics.
    pub fn report(&self, metrics: &Metrics) {
        let now = self.push_stats.snapshot();
        let mut last = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        let add = |n: u64, r: ExportResult| {
            for _ in 0..n {
                metrics.inc_export(ExportTarget::Pyroscope, r);
            }
        };
        add(now.sent.saturating_sub(last.sent), ExportResult::Ok);
        add(
            now.failed_attempts.saturating_sub(last.failed_attempts),
            ExportResult::Error,
        );
        let dropped = |s: &pyroscope::PushStatsSnapshot| {
            s.dropped_queue_full + s.dropped_gave_up + s.dropped_rejected
        };
        add(
            dropped(&now).saturating_sub(dropped(&last)),
            ExportResult::Dropped,
        );
        *last = now;
    }

    /// Sends what is queued, for at most `deadline`, and says what was left.
    pub async fn shutdown(self, deadline: Duration) {
        if let Some(p) = self.pyroscope {
            let r = p.shutdown(deadline).await;
            if r.unsent > 0 {
                tracing::warn!(
                    "pyroscope: {} window(s) could not be sent before shutdown",
                    r.unsent
                );
            }
        }
    }
}

fn pusher_config(p: &super::config::Pyroscope) -> pyroscope::PyroscopeConfig {
    let mut c = pyroscope::PyroscopeConfig::new(p.url.clone(), p.application_name.clone());
    c.timeout = Duration::from_secs(p.timeout_secs);
    c.max_queue_windows = p.max_queue_windows as usize;
    c.max_retry = Duration::from_secs(p.max_retry_secs);
    c.basic_auth = p
        .basic_auth
        .as_ref()
        .map(|b| (b.username.clone(), b.password.clone()));
    c.tenant_id = p.tenant_id.clone();
    c
}
