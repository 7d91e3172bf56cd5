//! Where closed windows go: pprof files on disk, Pyroscope's ingest API and
//! OTLP (an OpenTelemetry Collector).
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::config::Outputs;
use super::metrics::Metrics;
use super::{ProcessLabels, WindowProfile};
use crate::profile::CompactProfile;

pub mod otlp;
pub mod pprof_dir;
pub mod pprof_writer;
pub mod push;
pub mod pyroscope;

pub use pprof_dir::ExportError;

/// The configured outputs of closed windows.
pub struct Exporters {
    pprof_dir: Option<pprof_writer::Writer>,
    pyroscope: Option<pyroscope::Pusher>,
    otlp: Option<otlp::Exporter>,
}

impl Exporters {
    /// No outputs.
    pub fn none() -> Self {
        Exporters {
            pprof_dir: None,
            pyroscope: None,
            otlp: None,
        }
    }

    /// Whether any output is configured.
    pub fn any(&self) -> bool {
        self.pprof_dir.is_some() || self.pyroscope.is_some() || self.otlp.is_some()
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
        let otlp = match &cfg.otlp {
            Some(o) => Some(otlp::Exporter::spawn(
                otlp_config(o),
                Arc::new(otlp::PushStats::default()),
            )?),
            None => None,
        };
        Ok(Exporters {
            pprof_dir,
            pyroscope,
            otlp,
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
        primary: crate::profile::ProfileKind,
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
        // Each output but the last gets a copy.
        let mut outputs: Vec<Box<dyn FnOnce(Vec<WindowProfile>) + '_>> = Vec::new();
        if let Some(dir) = &self.pprof_dir {
            // One file per process and window: the default type's only.
            outputs.push(Box::new(move |w: Vec<WindowProfile>| {
                dir.write_window(
                    w.into_iter()
                        .filter(|w| w.profile.kind == primary)
                        .collect(),
                )
            }));
        }
        if let Some(p) = &self.pyroscope {
            outputs.push(Box::new(|w| p.push_window(w)));
        }
        if let Some(o) = &self.otlp {
            outputs.push(Box::new(|w| o.push_window(w)));
        }
        let last = outputs.pop();
        for out in outputs {
            out(window.clone());
        }
        if let Some(out) = last {
            out(window);
        }
    }

    /// Connects the pushers to `metrics`: from the first call on, what they
    /// do (and what they did before) shows in the metrics as it happens
    /// (`pyebpf_export_total{target}`, `pyebpf_pyroscope_*`,
    /// `pyebpf_otlp_*`).
    pub fn report(&self, metrics: &Metrics) {
        if let Some(p) = &self.pyroscope {
            p.attach_metrics(metrics.pyroscope());
        }
        if let Some(o) = &self.otlp {
            o.attach_metrics(metrics.otlp());
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
        // Both pushers drain at once, within the one deadline.
        let pyroscope = async {
            match self.pyroscope {
                Some(p) => p.shutdown(deadline).await.unsent,
                None => 0,
            }
        };
        let otlp = async {
            match self.otlp {
                Some(o) => o.shutdown(deadline).await.unsent,
                None => 0,
            }
        };
        let (p, o) = tokio::join!(pyroscope, otlp);
        for (name, unsent) in [("pyroscope", p), ("otlp", o)] {
            if unsent > 0 {
                tracing::warn!("{name}: {unsent} profile(s) could not be sent before shutdown");
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

fn otlp_config(o: &super::config::Otlp) -> otlp::OtlpConfig {
    use super::config::{OtlpCompression, OtlpProtocol};
    let protocol = match o.protocol {
        OtlpProtocol::Grpc => otlp::Protocol::Grpc,
        OtlpProtocol::HttpProtobuf => otlp::Protocol::HttpProtobuf,
    };
    let mut c = otlp::OtlpConfig::new(o.endpoint(), protocol);
    c.headers = o.headers.clone();
    c.ca_file = o.tls.as_ref().and_then(|t| t.ca_file.clone());
    c.gzip = o.compression == OtlpCompression::Gzip;
    c.timeout = Duration::from_secs(o.timeout_secs);
    c.max_queue_bytes = o.max_queue_bytes;
    c.max_concurrent = o.max_concurrent_exports as usize;
    c.max_retry = Duration::from_secs(o.max_retry_secs);
    c.max_request_bytes = usize::try_from(o.max_request_bytes).unwrap_or(usize::MAX);
    if let Some(h) = &o.host_name {
        c.host_name.clone_from(h);
    }
    c
}
