//! The metrics of the network exporters (`pyebpf_pyroscope_*`,
//! `pyebpf_otlp_*`): one family set per exporter, same shape.
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Registry};

use super::{counter, counter_vec, register, ExportTarget};

/// Why profiles meant for a server were lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The push queue reached its byte bound; the oldest profiles went.
    QueueFull,
    /// The server refused them (4xx other than 408/429, a redirect, a
    /// non-retryable gRPC status), or they could not be encoded.
    Rejected,
    /// Still failing `max_retry` after the first attempt.
    GaveUp,
    /// Still queued or in flight when the shutdown deadline passed.
    Shutdown,
    /// Accepted in a request the server reported as a partial success,
    /// naming this many profiles rejected (OTLP only).
    PartiallyRejected,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::QueueFull,
        DropReason::Rejected,
        DropReason::GaveUp,
        DropReason::Shutdown,
        DropReason::PartiallyRejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Rejected => "rejected",
            DropReason::GaveUp => "gave_up",
            DropReason::Shutdown => "shutdown",
            DropReason::PartiallyRejected => "partially_rejected",
        }
    }
}

/// Handles on one exporter's metrics, updated by its pusher as things
/// happen (so a scrape never waits for the next window).
#[derive(Clone)]
pub struct PushMetrics {
    /// `pyebpf_export_total{target=...,result="ok"}`: profiles accepted.
    pub sent: IntCounter,
    /// `pyebpf_export_total{target=...,result="error"}`: failed attempts.
    pub failed_attempts: IntCounter,
    /// `pyebpf_export_total{target=...,result="dropped"}`: profiles lost.
    pub dropped: IntCounter,
    /// By [`DropReason`], in [`DropReason::ALL`] order.
    pub dropped_profiles: [IntCounter; DropReason::ALL.len()],
    pub dropped_bytes: [IntCounter; DropReason::ALL.len()],
    pub sent_bytes: IntCounter,
    pub queue_bytes: IntGauge,
    pub queue_profiles: IntGauge,
    pub in_flight: IntGauge,
    pub upload_seconds: Histogram,
    /// Partial-success answers (OTLP only).
    pub partial: Option<IntCounter>,
}

/// How one exporter's metrics are named and described.
struct Names {
    prefix: &'static str,
    server: &'static str,
    /// `uploads` (Pyroscope) or `exports` (OTLP).
    request: &'static str,
    concurrency_key: &'static str,
    bytes_are: &'static str,
}

fn names(t: ExportTarget) -> Names {
    match t {
        ExportTarget::Otlp => Names {
            prefix: "pyebpf_otlp",
            server: "the OTLP endpoint",
            request: "export",
            concurrency_key: "max_concurrent_exports",
            bytes_are: "encoded (uncompressed) export requests and a fixed per-request overhead",
        },
        _ => Names {
            prefix: "pyebpf_pyroscope",
            server: "Pyroscope",
            request: "upload",
            concurrency_key: "max_concurrent_uploads",
            bytes_are: "gzipped pprof, request and a fixed per-profile overhead",
        },
    }
}

/// Registers the `pyebpf_<target>_*` families and takes the
/// `pyebpf_export_total{target}` series.
pub fn push_metrics(r: &Registry, export: &IntCounterVec, t: ExportTarget) -> PushMetrics {
    let n = names(t);
    let (p, server, req) = (n.prefix, n.server, n.request);
    let dropped_profiles = counter_vec(
        r,
        &format!("{p}_dropped_profiles_total"),
        &format!(
            "Profiles not delivered to {server}, by reason: queue_full (the oldest dropped to \
             stay within max_queue_bytes), rejected (refused by the server), gave_up (still \
             failing after max_retry_secs), shutdown (left at the shutdown deadline) or \
             partially_rejected (named rejected in a partial-success answer)."
        ),
        &["reason"],
    );
    let dropped_bytes = counter_vec(
        r,
        &format!("{p}_dropped_bytes_total"),
        &format!(
            "Queue bytes ({}) of the profiles counted by {p}_dropped_profiles_total, by reason \
             (0 for partially_rejected: the request as a whole was sent).",
            n.bytes_are
        ),
        &["reason"],
    );
    let by_reason = |v: &IntCounterVec| DropReason::ALL.map(|x| v.with_label_values(&[x.as_str()]));
    let target = t.as_str();
    PushMetrics {
        sent: export.with_label_values(&[target, "ok"]),
        failed_attempts: export.with_label_values(&[target, "error"]),
        dropped: export.with_label_values(&[target, "dropped"]),
        dropped_profiles: by_reason(&dropped_profiles),
        dropped_bytes: by_reason(&dropped_bytes),
        sent_bytes: counter(
            r,
            &format!("{p}_sent_bytes_total"),
            &format!("Queue bytes of the requests {server} accepted."),
        ),
        queue_bytes: register(
            r,
            IntGauge::new(
                format!("{p}_queue_bytes"),
                format!(
                    "Bytes held for {server} now, queued or being sent (bounded by \
                     max_queue_bytes)."
                ),
            )
            .expect("valid metric"),
        ),
        queue_profiles: register(
            r,
            IntGauge::new(
                format!("{p}_queue_profiles"),
                format!(
                    "Profiles waiting to be sent to {server} now (being encoded, queued or \
                     waiting to retry; not those in flight)."
                ),
            )
            .expect("valid metric"),
        ),
        in_flight: register(
            r,
            IntGauge::new(
                format!("{p}_{req}s_in_flight"),
                format!(
                    "Requests to {server} in progress now (at most {}).",
                    n.concurrency_key
                ),
            )
            .expect("valid metric"),
        ),
        upload_seconds: register(
            r,
            Histogram::with_opts(
                HistogramOpts::new(
                    format!("{p}_{req}_duration_seconds"),
                    format!("Duration of each {req} attempt to {server}, successful or not."),
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
            )
            .expect("valid metric"),
        ),
        partial: (t == ExportTarget::Otlp).then(|| {
            counter(
                r,
                &format!("{p}_partial_success_total"),
                "Export answers that were partial successes (some profiles rejected, counted in \
                 pyebpf_otlp_dropped_profiles_total{reason=\"partially_rejected\"}, or a warning \
                 from the server).",
            )
        }),
    }
}
