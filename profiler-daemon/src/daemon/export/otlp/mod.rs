//! `outputs.otlp`: each closed window to an OpenTelemetry Collector (or any
//! OTLP profiles receiver) as `ExportProfilesServiceRequest`s of the
//! `v1development` profiles signal, over gRPC
//! (`ProfilesService/Export`) or HTTP/protobuf (`POST
//! /v1development/profiles`).
//!
//! Requests are batched per window (several processes per request, up to
//! `max_request_bytes`), then queued, sent and retried by the shared
//! [`push`](super::push) machinery: bounded in bytes, exponential back-off
//! (or the server's `Retry-After` / `RetryInfo`), a circuit breaker while
//! the server is down, every loss counted. Retryable answers are those of
//! the OTLP specification: gRPC UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED,
//! ABORTED, OUT_OF_RANGE, DATA_LOSS (and RESOURCE_EXHAUSTED with RetryInfo);
//! HTTP 429, 502, 503, 504; and connection failures.
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::push::backoff::Rng;
use super::push::{Attempt, Encoded, PushSettings, Transport};
pub use super::push::{PushStats, PushStatsSnapshot, ShutdownReport};
use super::ExportError;
use crate::daemon::metrics::PushMetrics;
use crate::daemon::WindowProfile;

pub mod encode;
mod grpc;
mod http;

pub use encode::Context;

/// The gRPC method, as `opentelemetry-proto` defines the service.
pub const GRPC_PATH: &str =
    "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export";
/// Appended to the endpoint's path for HTTP/protobuf.
pub const HTTP_PATH: &str = "v1development/profiles";
/// Bytes charged per queued request besides its body.
pub const ITEM_OVERHEAD: u64 = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Where and how to export.
#[derive(Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// `http://` (plaintext, h2c for gRPC) or `https://` (TLS) with a host
    /// and port; for HTTP/protobuf, [`HTTP_PATH`] is appended to its path.
    pub endpoint: String,
    pub protocol: Protocol,
    /// Sent with every request (e.g. `authorization`); values are secrets.
    pub headers: Vec<(String, String)>,
    /// PEM certificates trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    pub gzip: bool,
    /// Timeout of one export attempt (connect, send, response).
    pub timeout: Duration,
    pub max_queue_bytes: u64,
    pub max_concurrent: usize,
    pub max_retry: Duration,
    /// A request is closed once its encoded size reaches this.
    pub max_request_bytes: usize,
    /// `host.name` of every resource.
    pub host_name: String,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl OtlpConfig {
    pub fn new(endpoint: impl Into<String>, protocol: Protocol) -> Self {
        OtlpConfig {
            endpoint: endpoint.into(),
            protocol,
            headers: Vec::new(),
            ca_file: None,
            gzip: true,
            timeout: Duration::from_secs(10),
            max_queue_bytes: 64 << 20,
            max_concurrent: 4,
            max_retry: Duration::from_secs(300),
            max_request_bytes: 2 << 20,
            host_name: host_name(),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
        }
    }
}

impl fmt::Debug for OtlpConfig {
    /// Header values (tokens) are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, _)| (k.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("OtlpConfig")
            .field("endpoint", &self.endpoint)
            .field("protocol", &self.protocol)
            .field("headers", &headers)
            .field("ca_file", &self.ca_file)
            .field("gzip", &self.gzip)
            .field("timeout", &self.timeout)
            .field("max_queue_bytes", &self.max_queue_bytes)
            .field("max_concurrent", &self.max_concurrent)
            .field("max_retry", &self.max_retry)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("host_name", &self.host_name)
            .finish()
    }
}

/// This host's name (the daemon's UTS namespace: the node's, as the
/// DaemonSet runs with the host network); `unknown` if unreadable.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The two transports behind one type, so one pusher serves either.
pub enum Client {
    Grpc(grpc::GrpcClient),
    Http(http::HttpClient),
}

impl Transport for Client {
    type Payload = Bytes;
    fn send<'a>(&'a self, body: &'a Bytes) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
        match self {
            Client::Grpc(c) => Box::pin(c.export(body.clone())),
            Client::Http(c) => Box::pin(c.export(body)),
        }
    }
}

/// Exports windows over OTLP from background tasks.
pub struct Exporter(super::push::Pusher<Client>);

impl Exporter {
    /// Checks the configuration, builds the client (connections are made
    /// on first use) and starts the tasks on the current tokio runtime.
    pub fn spawn(cfg: OtlpConfig, stats: Arc<PushStats>) -> Result<Exporter, ExportError> {
        if cfg.timeout.is_zero() || cfg.max_request_bytes == 0 {
            return Err(ExportError::Config(
                "otlp timeout and max_request_bytes must be positive".into(),
            ));
        }
        let ca = match &cfg.ca_file {
            Some(p) => Some(std::fs::read(p).map_err(|e| {
                ExportError::Config(format!("otlp tls.ca_file {}: {e}", p.display()))
            })?),
            None => None,
        };
        let client = match cfg.protocol {
            Protocol::Grpc => Client::Grpc(grpc::GrpcClient::new(&cfg, ca.as_deref())?),
            Protocol::HttpProtobuf => Client::Http(http::HttpClient::new(&cfg, ca.as_deref())?),
        };
        let settings = PushSettings {
            name: "otlp",
            max_queue_bytes: cfg.max_queue_bytes,
            max_concurrent: cfg.max_concurrent,
            max_retry: cfg.max_retry,
            backoff_base: cfg.backoff_base,
            backoff_cap: cfg.backoff_cap,
        };
        let ctx = Context {
            host_name: cfg.host_name.clone(),
        };
        let max = cfg.max_request_bytes;
        // HTTP bodies are gzipped here, off the runtime's threads; tonic
        // compresses gRPC messages itself.
        let gzip_here = cfg.gzip && cfg.protocol == Protocol::HttpProtobuf;
        let encode = Arc::new(move |w: Vec<WindowProfile>, seed: u64| {
            let mut rng = Rng::seeded(seed);
            encode::encode_requests(&ctx, w, max, || rng.next_u64())
                .into_iter()
                .map(|(body, profiles)| (if gzip_here { gzip(&body) } else { body }, profiles))
                .map(|(body, profiles)| Encoded {
                    cost: body.len() as u64 + ITEM_OVERHEAD,
                    payload: Bytes::from(body),
                    profiles,
                    about: format!("{profiles} process profile(s)"),
                })
                .collect()
        });
        super::push::Pusher::spawn(settings, client, encode, stats).map(Exporter)
    }

    /// See [`super::push::Pusher::attach_metrics`].
    pub fn attach_metrics(&self, m: PushMetrics) {
        self.0.attach_metrics(m);
    }

    /// Queues one closed window for sending; never blocks.
    pub fn push_window(&self, profiles: Vec<WindowProfile>) {
        self.0.push_window(profiles);
    }

    pub fn stats(&self) -> &Arc<PushStats> {
        self.0.stats()
    }

    /// The counters at one instant.
    pub fn consistent_stats(&self) -> PushStatsSnapshot {
        self.0.consistent_stats()
    }

    /// Sends what is queued for at most `deadline`; see
    /// [`super::push::Pusher::shutdown`].
    pub async fn shutdown(self, deadline: Duration) -> ShutdownReport {
        self.0.shutdown(deadline).await
    }
}

fn gzip(raw: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 4 + 64),
        flate2::Compression::default(),
    );
    // Writing to a Vec cannot fail.
    gz.write_all(raw).expect("gzip to memory");
    gz.finish().expect("gzip to memory")
}

/// A partial-success answer as an [`Attempt`]: `None` when it is empty (a
/// full success).
fn partial(rejected: i64, message: String) -> Option<Attempt> {
    if rejected <= 0 && message.is_empty() {
        return None;
    }
    Some(Attempt::Partial {
        rejected: u64::try_from(rejected).unwrap_or(0),
        message,
    })
}
