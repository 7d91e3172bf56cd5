//! `outputs.pyroscope`: push each closed window to a Pyroscope server's
//! ingest API (also Grafana Cloud Profiles and Alloy's
//! `pyroscope.receive_http`).
//!
//! Request, as Pyroscope's `pkg/ingester/pyroscope/ingest_handler.go` and
//! `pkg/og/convert/pprof/profile.go` parse it:
//!
//! ```text
//! POST {url}/ingest?name=<app>{k=v,...}&from=<unix s>&until=<unix s>
//!      &sampleRate=<Hz>&spyName=pyebpf&units=samples&aggregationType=sum
//! Content-Type: multipart/form-data; boundary=...
//! [Authorization: Basic ...] [X-Scope-OrgID: <tenant>]
//!
//! one part: name="profile", filename="profile.pprof", the gzipped pprof
//! ```
//!
//! There is deliberately no `format=pprof`: the server checks `format` before
//! the content type, and with `format=pprof` it takes the whole body as the
//! pprof, so a multipart body would be rejected. A multipart body without
//! `format` is what the Go client (`pyroscope-go`) sends. The pprof may be
//! gzipped (the server sniffs the gzip header). The pprof's sample types
//! (`samples`/`cpu`) make it a `process_cpu` profile; `units`,
//! `aggregationType` and `sampleRate` are ignored for pprof but harmless.
//!
//! The process labels go into `name`'s braces. The server keeps the app
//! name only as the fallback `service_name`: the process's own
//! `service_name` label wins.
//!
//! [`Pusher::push`] only queues (bounded, dropping the oldest); one task
//! sends windows in order, retrying transient failures with exponential
//! back-off and jitter.
use crate::daemon::unix_secs;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::header::CONTENT_TYPE;
use reqwest::{StatusCode, Url};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::pprof_dir::encode_window;
pub use super::pprof_dir::ExportError;
use crate::daemon::WindowProfile;

/// `spyName` sent with every profile.
pub const SPY_NAME: &str = "pyebpf";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_QUEUE_WINDOWS: usize = 120;
pub const DEFAULT_MAX_RETRY: Duration = Duration::from_secs(300);
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Pyroscope's default `validation.max-length-label-value` is 2048.
const MAX_LABEL_VALUE_LEN: usize = 1024;
/// Longest response body excerpt logged for a rejected upload.
const BODY_EXCERPT: usize = 512;
/// At most one "rejected" warning per this long (the rest are counted).
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Where and how to push.
#[derive(Clone, PartialEq, Eq)]
pub struct PyroscopeConfig {
    /// Server base URL (`http://` or `https://`); `/ingest` is appended to
    /// its path.
    pub url: String,
    /// The `name` profiles are pushed under, `[A-Za-z0-9_.\-/]+` as
    /// Pyroscope requires.
    pub application_name: String,
    /// Timeout of one upload attempt (connect, send, response).
    pub timeout: Duration,
    /// Windows waiting to be sent, at least 1; beyond it the oldest queued
    /// window is dropped.
    pub max_queue_windows: usize,
    /// A window still failing this long after its first attempt is given up.
    pub max_retry: Duration,
    /// (user, password).
    pub basic_auth: Option<(String, String)>,
    /// Sent as `X-Scope-OrgID`.
    pub tenant_id: Option<String>,
    /// First retry delay; doubles per attempt up to `backoff_cap`. Each delay
    /// is drawn uniformly from [d/2, d].
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl PyroscopeConfig {
    /// `url` and `application_name` with every other field at its default.
    pub fn new(url: impl Into<String>, application_name: impl Into<String>) -> Self {
        PyroscopeConfig {
            url: url.into(),
            application_name: application_name.into(),
            timeout: DEFAULT_TIMEOUT,
            max_queue_windows: DEFAULT_MAX_QUEUE_WINDOWS,
            max_retry: DEFAULT_MAX_RETRY,
            basic_auth: None,
            tenant_id: None,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_cap: DEFAULT_BACKOFF_CAP,
        }
    }
}

impl fmt::Debug for PyroscopeConfig {
    /// The password is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PyroscopeConfig")
            .field("url", &self.url)
            .field("application_name", &self.application_name)
            .field("timeout", &self.timeout)
            .field("max_queue_windows", &self.max_queue_windows)
            .field("max_retry", &self.max_retry)
            .field(
                "basic_auth",
                &self.basic_auth.as_ref().map(|(u, _)| (u, "<redacted>")),
            )
            .field("tenant_id", &self.tenant_id)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_cap", &self.backoff_cap)
            .finish()
    }
}

/// Counters of the pusher, shared with the metrics. Every window pushed ends
/// up in exactly one of `sent` and `dropped_*` (unless still queued or left
/// at shutdown).
#[derive(Debug, Default)]
pub struct PushStats {
    /// Windows accepted by the server (2xx).
    pub sent: AtomicU64,
    /// Attempts that failed transiently (connection, timeout, 408, 429, 5xx)
    /// and were retried or led to giving up.
    pub failed_attempts: AtomicU64,
    /// Windows dropped from a full queue (the oldest queued).
    pub dropped_queue_full: AtomicU64,
    /// Windows given up after `max_retry` of failures.
    pub dropped_gave_up: AtomicU64,
    /// Windows the server refused (4xx other than 408/429, or a redirect).
    pub dropped_rejected: AtomicU64,
}

/// [`PushStats`] at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PushStatsSnapshot {
    pub sent: u64,
    pub failed_attempts: u64,
    pub dropped_queue_full: u64,
    pub dropped_gave_up: u64,
    pub dropped_rejected: u64,
}

impl PushStats {
    pub fn snapshot(&self) -> PushStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PushStatsSnapshot {
            sent: g(&self.sent),
            failed_attempts: g(&self.failed_attempts),
            dropped_queue_full: g(&self.dropped_queue_full),
            dropped_gave_up: g(&self.dropped_gave_up),
            dropped_rejected: g(&self.dropped_rejected),
        }
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// What [`Pusher::shutdown`] could not do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Windows neither sent nor dropped when the deadline hit (queued, or
    /// the one being sent).
    pub unsent: usize,
    /// Whether the queue was drained before the deadline.
    pub drained: bool,
}

#[derive(Default)]
struct Queue {
    windows: VecDeque<WindowProfile>,
    /// The task holds a window it has not finished with.
    in_flight: bool,
    /// Shutting down: the task exits once the queue is empty.
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    notify: Notify,
    max: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Pushes windows to Pyroscope from a background task.
pub struct Pusher {
    shared: Arc<Shared>,
    stats: Arc<PushStats>,
    handle: Option<JoinHandle<()>>,
}

impl Pusher {
    /// Checks the configuration, builds the HTTP client and starts the
    /// sending task on the current tokio runtime.
    pub fn spawn(cfg: PyroscopeConfig, stats: Arc<PushStats>) -> Result<Pusher, ExportError> {
        let sender = Sender::new(&cfg)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ExportError::Config("the Pyroscope pusher needs a tokio runtime".into())
        })?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            max: cfg.max_queue_windows,
        });
        let handle = runtime.spawn(run(shared.clone(), sender, stats.clone()));
        Ok(Pusher {
            shared,
            stats,
            handle: Some(handle),
        })
    }

    /// Queues `w` for sending; never blocks. When the queue is full the
    /// oldest queued window is dropped (and counted).
    pub fn push(&self, w: WindowProfile) {
        let dropped = {
            let mut q = self.shared.lock();
            let dropped = if q.windows.len() >= self.shared.max {
                q.windows.pop_front()
            } else {
                None
            };
            q.windows.push_back(w);
            dropped
        };
        self.shared.notify.notify_one();
        if let Some(old) = dropped {
            inc(&self.stats.dropped_queue_full);
            tracing::debug!(
                pid = old.labels.pid,
                service = %old.labels.service,
                "pyroscope queue full: dropped the oldest window"
            );
            // `old` (possibly large) is freed here, outside the lock.
        }
    }

    /// Windows waiting to be sent (not counting one being sent).
    pub fn queued(&self) -> usize {
        self.shared.lock().windows.len()
    }

    pub fn stats(&self) -> &Arc<PushStats> {
        &self.stats
    }

    /// Keeps sending what is queued (retrying as usual) until the queue is
    /// empty or `deadline` has passed, then stops the task and reports what
    /// was left.
    pub async fn shutdown(mut self, deadline: Duration) -> ShutdownReport {
        self.shared.lock().closing = true;
        self.shared.notify.notify_one();
        let Some(mut handle) = self.handle.take() else {
            return ShutdownReport {
                unsent: self.queued(),
                drained: false,
            };
        };
        let finished = tokio::time::timeout(deadline, &mut handle).await.is_ok();
        if !finished {
            handle.abort();
            // Wait for the task to stop so the count below is final.
            let _ = handle.await;
        }
        let unsent = {
            let q = self.shared.lock();
            q.windows.len() + usize::from(q.in_flight)
        };
        if unsent > 0 {
            tracing::warn!(
                unsent,
                "pyroscope: shutdown deadline reached, {unsent} window(s) not sent"
            );
        }
        ShutdownReport {
            unsent,
            drained: finished && unsent == 0,
        }
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// The sending task: windows in order, one at a time.
async fn run(shared: Arc<Shared>, mut sender: Sender, stats: Arc<PushStats>) {
    loop {
        let next = {
            let mut q = shared.lock();
            match q.windows.pop_front() {
                Some(w) => {
                    q.in_flight = true;
                    Some(w)
                }
                None if q.closing => return,
                None => None,
            }
        };
        match next {
            Some(w) => {
                sender.deliver(w, &stats).await;
                shared.lock().in_flight = false;
            }
            // A push or shutdown between the check and here leaves a permit,
            // so this cannot miss it.
            None => shared.notify.notified().await,
        }
    }
}

/// Result of one upload attempt.
enum Attempt {
    Sent,
    /// Transient: try again later.
    Retry(String),
    /// The server refused it: do not retry.
    Rejected(String),
}

/// The HTTP side: client, request shape, retry policy.
struct Sender {
    client: reqwest::Client,
    ingest_url: Url,
    application_name: String,
    basic_auth: Option<(String, String)>,
    tenant_id: Option<String>,
    max_retry: Duration,
    backoff_base: Duration,
    backoff_cap: Duration,
    rng: u64,
    /// Whether the last attempt succeeded (to log outages once).
    healthy: bool,
    failures_since_healthy: u64,
    last_reject_log: Option<Instant>,
    rejects_not_logged: u64,
}

impl Sender {
    fn new(cfg: &PyroscopeConfig) -> Result<Self, ExportError> {
        validate_application_name(&cfg.application_name)?;
        let ingest_url = ingest_url(&cfg.url)?;
        if cfg.max_queue_windows == 0 {
            return Err(ExportError::Config(
                "pyroscope max_queue_windows must be at least 1".into(),
            ));
        }
        if cfg.timeout.is_zero() {
            return Err(ExportError::Config(
                "pyroscope timeout must be positive".into(),
            ));
        }
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            // Credentials must not follow a redirect; a redirect is a
            // misconfigured URL, reported as a rejection.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pyebpf/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ExportError::Config(format!("pyroscope HTTP client: {}", chain(&e))))?;
        Ok(Sender {
            client,
            ingest_url,
            application_name: cfg.application_name.clone(),
            basic_auth: cfg.basic_auth.clone(),
            tenant_id: cfg.tenant_id.clone(),
            max_retry: cfg.max_retry,
            backoff_base: cfg.backoff_base.max(Duration::from_millis(1)),
            backoff_cap: cfg.backoff_cap.max(cfg.backoff_base),
            rng: seed(),
            healthy: true,
            failures_since_healthy: 0,
            last_reject_log: None,
            rejects_not_logged: 0,
        })
    }

    /// Sends `w` until it is accepted, refused, or `max_retry` has passed.
    async fn deliver(&mut self, w: WindowProfile, stats: &PushStats) {
        let query = query_params(&self.application_name, &w);
        let (pid, service) = (w.labels.pid, w.labels.service.clone());
        // Encoding and gzip are CPU work: keep them off the async workers.
        let pprof = match tokio::task::spawn_blocking(move || encode_window(&w)).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(pid, "pyroscope: encoding the profile failed: {e}");
                inc(&stats.dropped_rejected);
                return;
            }
        };
        let (content_type, body) = multipart_body(&pprof, self.next_random());
        drop(pprof);
        let first = Instant::now();
        let mut attempt: u32 = 0;
        loop {
            match self.attempt(&query, &content_type, &body).await {
                Attempt::Sent => {
                    inc(&stats.sent);
                    if !self.healthy {
                        tracing::info!(
                            failed_attempts = self.failures_since_healthy,
                            "pyroscope push recovered"
                        );
                    }
                    self.healthy = true;
                    self.failures_since_healthy = 0;
                    return;
                }
                Attempt::Rejected(why) => {
                    inc(&stats.dropped_rejected);
                    self.log_rejection(pid, &service, &why);
                    return;
                }
                Attempt::Retry(why) => {
                    inc(&stats.failed_attempts);
                    self.failures_since_healthy += 1;
                    let delay = self.backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    if first.elapsed() + delay > self.max_retry {
                        inc(&stats.dropped_gave_up);
                        tracing::warn!(
                            pid,
                            service = %service,
                            attempts = attempt,
                            "pyroscope push: gave up on a window after {:?}: {why}",
                            first.elapsed()
                        );
                        return;
                    }
                    if self.healthy {
                        tracing::warn!("pyroscope push failing, will retry: {why}");
                        self.healthy = false;
                    } else {
                        tracing::debug!(?delay, "pyroscope push failed again: {why}");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn attempt(&self, query: &[(&str, String)], content_type: &str, body: &[u8]) -> Attempt {
        let mut req = self
            .client
            .post(self.ingest_url.clone())
            .query(query)
            .header(CONTENT_TYPE, content_type)
            .body(body.to_vec());
        if let Some((user, password)) = &self.basic_auth {
            req = req.basic_auth(user, Some(password));
        }
        if let Some(tenant) = &self.tenant_id {
            req = req.header("X-Scope-OrgID", tenant);
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            // Connection refused/reset, DNS, TLS, timeout: all transient.
            Err(e) => return Attempt::Retry(chain(&e.without_url())),
        };
        let status = resp.status();
        if status.is_success() {
            return Attempt::Sent;
        }
        let why = format!("HTTP {status}: {}", excerpt(&mut resp).await);
        if retryable(status) {
            Attempt::Retry(why)
        } else {
            Attempt::Rejected(why)
        }
    }

    fn log_rejection(&mut self, pid: u32, service: &str, why: &str) {
        let now = Instant::now();
        if self
            .last_reject_log
            .is_some_and(|t| now.duration_since(t) < REJECT_LOG_INTERVAL)
        {
            self.rejects_not_logged += 1;
            return;
        }
        let also = std::mem::take(&mut self.rejects_not_logged);
        self.last_reject_log = Some(now);
        tracing::warn!(
            pid,
            service,
            also_rejected_since_last_log = also,
            "pyroscope refused a window, dropped without retry: {why}"
        );
    }

    /// `min(cap, base * 2^attempt)`, drawn uniformly from its upper half.
    fn backoff(&mut self, attempt: u32) -> Duration {
        let max = self
            .backoff_base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.backoff_cap);
        let half = max / 2;
        let span = (max - half).as_nanos() as u64;
        let r = if span == 0 {
            0
        } else {
            self.next_random() % (span + 1)
        };
        half + Duration::from_nanos(r)
    }

    /// xorshift64*: jitter and multipart boundaries need no more.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn seed() -> u64 {
    use std::hash::BuildHasher as _;
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    std::collections::hash_map::RandomState::new().hash_one(t) | 1
}

/// 408 and 429 are worth retrying, as are server errors; other statuses
/// (4xx, redirects) will not change by resending.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// The first [`BODY_EXCERPT`] bytes of the response body, lossily decoded.
async fn excerpt(resp: &mut reqwest::Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < BODY_EXCERPT {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            _ => break,
        }
    }
    let cut = buf.len() > BODY_EXCERPT;
    buf.truncate(BODY_EXCERPT);
    let mut s = String::from_utf8_lossy(&buf)
        .trim()
        .replace(['\n', '\r'], " ");
    if cut {
        s.push_str("...");
    }
    if s.is_empty() {
        s.push_str("(empty body)");
    }
    s
}

/// An error and its causes, `: `-separated (reqwest's Display alone says
/// little, e.g. "error sending request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}

/// `{url}/ingest`, keeping any path prefix (reverse proxies).
fn ingest_url(base: &str) -> Result<Url, ExportError> {
    let bad = |why: &str| ExportError::Config(format!("pyroscope url `{base}`: {why}"));
    let mut url = Url::parse(base).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad("must be an http:// or https:// URL with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("must not have a query or fragment"));
    }
    url.path_segments_mut()
        .map_err(|()| bad("cannot be a base URL"))?
        .pop_if_empty()
        .push("ingest");
    Ok(url)
}

/// Pyroscope's rule for the application (service) name.
fn validate_application_name(name: &str) -> Result<(), ExportError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'));
    if ok {
        Ok(())
    } else {
        Err(ExportError::Config(format!(
            "pyroscope application name `{name}` must be non-empty and only contain \
             A-Z a-z 0-9 _ . - /"
        )))
    }
}

/// A label name as Pyroscope stores it, `[a-zA-Z_][a-zA-Z0-9_]*`; `None`
/// for names it reserves (`__*`) or that are empty.
fn label_name(k: &str) -> Option<String> {
    let mut s: String = k
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    (!s.is_empty() && !s.starts_with("__")).then_some(s)
}

/// A label value the `name` parser keeps intact: it splits on `,` and `}`
/// and trims spaces; `{`, `=`, `"` and control characters are replaced too
/// for older parsers. `None` if nothing is left.
fn label_value(v: &str) -> Option<String> {
    let mut s: String = v
        .trim()
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, ',' | '{' | '}' | '=' | '"') {
                '_'
            } else {
                c
            }
        })
        .collect();
    if s.len() > MAX_LABEL_VALUE_LEN {
        let mut cut = MAX_LABEL_VALUE_LEN;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    (!s.is_empty()).then_some(s)
}

/// `<app>{k=v,...}` for the `name` parameter.
fn name_param(app: &str, w: &WindowProfile) -> String {
    let labels: Vec<String> = w
        .labels
        .pairs()
        .into_iter()
        // A pid would start a new series for every process: Pyroscope
        // groups by service, container and pod instead.
        .filter(|(k, _)| *k != "pid")
        .filter_map(|(k, v)| Some(format!("{}={}", label_name(k)?, label_value(&v)?)))
        .collect();
    format!("{app}{{{}}}", labels.join(","))
}

/// The query parameters of the ingest request for `w`.
fn query_params(app: &str, w: &WindowProfile) -> Vec<(&'static str, String)> {
    let from = unix_secs(w.start);
    let until = unix_secs(w.end).max(from);
    vec![
        ("name", name_param(app, w)),
        ("from", from.to_string()),
        ("until", until.to_string()),
        ("sampleRate", w.profile.rate_hz.to_string()),
        ("spyName", SPY_NAME.to_string()),
        ("units", "samples".to_string()),
        ("aggregationType", "sum".to_string()),
    ]
}

/// A `multipart/form-data` body with the gzipped pprof in the `profile`
/// field (as Go's `mime/multipart` writes it). Returns (Content-Type, body).
fn multipart_body(pprof: &[u8], mut random: u64) -> (String, Vec<u8>) {
    let boundary = loop {
        let b = format!(
            "pyebpf{random:016x}{:016x}",
            random.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15
        );
        // Never inside the payload (practically impossible, but cheap).
        if !pprof.windows(b.len()).any(|w| w == b.as_bytes()) {
            break b;
        }
        random = random
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
    };
    let mut body = Vec::with_capacity(pprof.len() + 256);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\n\
             Content-Disposition: form-data; name=\"profile\"; filename=\"profile.pprof\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(pprof);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::ProcessLabels;
    use crate::profile::folded::tests::sample_profile;
    use crate::profile::pprof::{self, proto};
    use axum::body::Bytes;
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, Method, Uri};
    use prost::Message as _;
    use std::io::Read as _;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    const T0: u64 = 1_700_000_000;

    fn window(i: u64) -> WindowProfile {
        let start = UNIX_EPOCH + Duration::from_secs(T0 + 60 * i);
        WindowProfile {
            labels: ProcessLabels {
                pid: 42,
                command: "python3".into(),
                service: "web".into(),
                exe: "/usr/bin/python3.11".into(),
                cmdline: "python3 app.py".into(),
                container_id: Some("abc123".into()),
                ..Default::default()
            },
            profile: sample_profile(),
            start,
            end: start + Duration::from_secs(60),
        }
    }

    fn test_cfg(addr: SocketAddr) -> PyroscopeConfig {
        PyroscopeConfig {
            timeout: Duration::from_secs(2),
            max_retry: Duration::from_secs(20),
            backoff_base: Duration::from_millis(20),
            backoff_cap: Duration::from_millis(100),
            ..PyroscopeConfig::new(format!("http://{addr}"), "myapp")
        }
    }

    #[derive(Clone, Debug)]
    struct Received {
        method: Method,
        path: String,
        query: Vec<(String, String)>,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    impl Received {
        fn param(&self, k: &str) -> Option<&str> {
            let mut it = self.query.iter().filter(|(n, _)| n == k);
            let v = it.next().map(|(_, v)| v.as_str());
            assert!(it.next().is_none(), "{k} given twice");
            v
        }
        fn from(&self) -> u64 {
            self.param("from").unwrap().parse().unwrap()
        }
    }

    #[derive(Clone, Default)]
    struct Recorder {
        reqs: Arc<Mutex<Vec<Received>>>,
        /// Responses to give, in order; 200 once exhausted.
        script: Arc<Mutex<VecDeque<(u16, &'static str)>>>,
    }

    impl Recorder {
        fn received(&self) -> Vec<Received> {
            self.reqs.lock().unwrap().clone()
        }
        fn count(&self) -> usize {
            self.reqs.lock().unwrap().len()
        }
        fn script(&self, responses: &[(u16, &'static str)]) {
            self.script
                .lock()
                .unwrap()
                .extend(responses.iter().copied());
        }
    }

    async fn record(
        State(rec): State<Recorder>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> (axum::http::StatusCode, &'static str) {
        let query = Query::<Vec<(String, String)>>::try_from_uri(&uri)
            .map(|q| q.0)
            .unwrap_or_default();
        rec.reqs.lock().unwrap().push(Received {
            method,
            path: uri.path().to_string(),
            query,
            headers,
            body: body.to_vec(),
        });
        let (code, text) = rec.script.lock().unwrap().pop_front().unwrap_or((200, ""));
        (axum::http::StatusCode::from_u16(code).unwrap(), text)
    }

    async fn serve(listener: tokio::net::TcpListener) -> Recorder {
        let rec = Recorder::default();
        let app = axum::Router::new().fallback(record).with_state(rec.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        rec
    }

    async fn receiver() -> (SocketAddr, Recorder) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (addr, serve(l).await)
    }

    /// An address with nothing listening (connections are refused).
    async fn dead_addr() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    async fn wait_until(what: &str, timeout: Duration, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < timeout, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The `profile` part of a multipart/form-data body, parsed strictly.
    fn multipart_profile(content_type: &str, body: &[u8]) -> Vec<u8> {
        let boundary = content_type
            .strip_prefix("multipart/form-data; boundary=")
            .expect(content_type);
        let head = format!("--{boundary}\r\n");
        let tail = format!("\r\n--{boundary}--\r\n");
        assert!(body.starts_with(head.as_bytes()));
        assert!(body.ends_with(tail.as_bytes()));
        let inner = &body[head.len()..body.len() - tail.len()];
        let sep = format!("\r\n--{boundary}");
        assert!(
            !inner.windows(sep.len()).any(|w| w == sep.as_bytes()),
            "exactly one part"
        );
        let split = inner.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let headers = std::str::from_utf8(&inner[..split]).unwrap();
        let mut lines: Vec<&str> = headers.split("\r\n").collect();
        lines.sort();
        assert_eq!(
            lines,
            [
                "Content-Disposition: form-data; name=\"profile\"; filename=\"profile.pprof\"",
                "Content-Type: application/octet-stream",
            ]
        );
        inner[split + 4..].to_vec()
    }

    fn decode_pprof(bytes: &[u8]) -> proto::Profile {
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzipped");
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .unwrap();
        proto::Profile::decode(&raw[..]).unwrap()
    }

    #[tokio::test]
    async fn request_format() {
        let (addr, rec) = receiver().await;
        let stats = Arc::new(PushStats::default());
        let cfg = PyroscopeConfig {
            basic_auth: Some(("user".into(), "pass".into())),
            tenant_id: Some("team-a".into()),
            // A path prefix (reverse proxy) is kept; a trailing slash is not doubled.
            url: format!("http://{addr}/pyro/"),
            ..test_cfg(addr)
        };
        let pusher = Pusher::spawn(cfg, stats.clone()).unwrap();
        let mut w = window(0);
        w.labels.command = " py,th}o=n {x}\n".into();
        w.labels.pod_uid = Some(String::new()); // empty: left out
        w.labels.qos_class = Some("burstable".into());
        w.end = w.start + Duration::from_millis(59_900);
        pusher.push(w.clone());
        wait_until("the request", Duration::from_secs(3), || rec.count() == 1).await;
        let r = &rec.received()[0];

        assert_eq!(r.method, Method::POST);
        assert_eq!(r.path, "/pyro/ingest");
        assert_eq!(
            r.param("name"),
            Some(
                "myapp{command=py_th_o_n _x_,service_name=web,\
                 container_id=abc123,qos_class=burstable}"
            )
        );
        assert_eq!(r.from(), T0);
        assert_eq!(r.param("until"), Some("1700000059"));
        assert_eq!(r.param("sampleRate"), Some("100"));
        assert_eq!(r.param("spyName"), Some("pyebpf"));
        assert_eq!(r.param("units"), Some("samples"));
        assert_eq!(r.param("aggregationType"), Some("sum"));
        // `format=pprof` would make Pyroscope read the multipart body as a pprof.
        assert_eq!(r.param("format"), None);
        assert_eq!(r.query.len(), 7, "{:?}", r.query);

        let h = |k: &str| r.headers.get(k).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(h("authorization").as_deref(), Some("Basic dXNlcjpwYXNz"));
        assert_eq!(h("x-scope-orgid").as_deref(), Some("team-a"));
        assert!(h("user-agent").unwrap().starts_with("pyebpf/"));
        let ct = h("content-type").unwrap();

        let m = decode_pprof(&multipart_profile(&ct, &r.body));
        let want = pprof::build(&w.profile);
        assert_eq!(m.sample, want.sample);
        assert_eq!(m.location, want.location);
        assert_eq!(m.function, want.function);
        assert_eq!(m.sample_type, want.sample_type);
        assert_eq!(m.period, 10_000_000);
        assert_eq!(
            m.string_table[..want.string_table.len()],
            want.string_table[..]
        );
        let total: i64 = m.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 15);
        assert!(m
            .comment
            .iter()
            .any(|&i| m.string_table[i as usize] == "service_name=web"));

        let report = pusher.shutdown(Duration::from_secs(1)).await;
        assert_eq!(
            report,
            ShutdownReport {
                unsent: 0,
                drained: true
            }
        );
        assert_eq!(
            stats.snapshot(),
            PushStatsSnapshot {
                sent: 1,
                ..Default::default()
            }
        );
    }

    #[tokio::test]
    async fn receiver_down_then_up_loses_nothing_and_keeps_order() {
        let addr = dead_addr().await;
        let stats = Arc::new(PushStats::default());
        let pusher = Pusher::spawn(test_cfg(addr), stats.clone()).unwrap();
        for i in 0..5 {
            pusher.push(window(i));
        }
        let s = stats.clone();
        wait_until("failed attempts", Duration::from_secs(3), move || {
            s.failed_attempts.load(Ordering::Relaxed) >= 3
        })
        .await;
        assert_eq!(stats.snapshot().sent, 0);

        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let rec = serve(listener).await;
        wait_until("all windows", Duration::from_secs(3), || rec.count() == 5).await;
        let froms: Vec<u64> = rec.received().iter().map(Received::from).collect();
        assert_eq!(froms, (0..5).map(|i| T0 + 60 * i).collect::<Vec<_>>());
        let report = pusher.shutdown(Duration::from_secs(1)).await;
        assert_eq!(report.unsent, 0);
        let snap = stats.snapshot();
        assert_eq!(snap.sent, 5);
        assert!(snap.failed_attempts >= 3);
        assert_eq!(
            (
                snap.dropped_queue_full,
                snap.dropped_gave_up,
                snap.dropped_rejected
            ),
            (0, 0, 0)
        );
    }

    #[tokio::test]
    async fn full_queue_drops_oldest() {
        let addr = dead_addr().await;
        let stats = Arc::new(PushStats::default());
        let cfg = PyroscopeConfig {
            max_queue_windows: 3,
            backoff_base: Duration::from_millis(300),
            backoff_cap: Duration::from_millis(300),
            ..test_cfg(addr)
        };
        let pusher = Pusher::spawn(cfg, stats.clone()).unwrap();
        pusher.push(window(0));
        // Window 0 is now being retried, out of the queue.
        let s = stats.clone();
        wait_until("a failed attempt", Duration::from_secs(3), move || {
            s.failed_attempts.load(Ordering::Relaxed) >= 1
        })
        .await;
        for i in 1..=5 {
            pusher.push(window(i));
        }
        assert_eq!(pusher.queued(), 3);
        assert_eq!(stats.snapshot().dropped_queue_full, 2);

        let rec = serve(tokio::net::TcpListener::bind(addr).await.unwrap()).await;
        wait_until("the windows", Duration::from_secs(3), || rec.count() == 4).await;
        let froms: Vec<u64> = rec.received().iter().map(Received::from).collect();
        assert_eq!(froms, [T0, T0 + 180, T0 + 240, T0 + 300]);
        pusher.shutdown(Duration::from_secs(1)).await;
        let snap = stats.snapshot();
        assert_eq!((snap.sent, snap.dropped_queue_full), (4, 2));
    }

    #[tokio::test]
    async fn bad_request_is_dropped_without_retry() {
        let (addr, rec) = receiver().await;
        rec.script(&[(400, "invalid label name")]);
        let stats = Arc::new(PushStats::default());
        let pusher = Pusher::spawn(test_cfg(addr), stats.clone()).unwrap();
        pusher.push(window(0));
        let s = stats.clone();
        wait_until("the rejection", Duration::from_secs(3), move || {
            s.dropped_rejected.load(Ordering::Relaxed) == 1
        })
        .await;
        // Several back-off periods later, still a single request.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rec.count(), 1);
        // The next window goes through.
        pusher.push(window(1));
        wait_until("the next window", Duration::from_secs(3), || {
            rec.count() == 2
        })
        .await;
        assert_eq!(pusher.shutdown(Duration::from_secs(1)).await.unsent, 0);
        assert_eq!(
            stats.snapshot(),
            PushStatsSnapshot {
                sent: 1,
                dropped_rejected: 1,
                ..Default::default()
            }
        );
        assert_eq!(rec.received()[1].from(), T0 + 60);
    }

    #[tokio::test]
    async fn server_errors_and_429_are_retried() {
        let (addr, rec) = receiver().await;
        rec.script(&[(503, "ingester unavailable"), (429, "slow down"), (500, "")]);
        let stats = Arc::new(PushStats::default());
        let pusher = Pusher::spawn(test_cfg(addr), stats.clone()).unwrap();
        pusher.push(window(0));
        pusher.push(window(1));
        wait_until("the retries", Duration::from_secs(3), || rec.count() == 5).await;
        assert_eq!(pusher.shutdown(Duration::from_secs(1)).await.unsent, 0);
        let froms: Vec<u64> = rec.received().iter().map(Received::from).collect();
        assert_eq!(froms, [T0, T0, T0, T0, T0 + 60]);
        // Every retry carries the same body.
        let got = rec.received();
        assert!(got[1..4].iter().all(|r| r.body == got[0].body));
        assert_eq!(
            stats.snapshot(),
            PushStatsSnapshot {
                sent: 2,
                failed_attempts: 3,
                ..Default::default()
            }
        );
    }

    #[tokio::test]
    async fn gives_up_after_max_retry() {
        let addr = dead_addr().await;
        let stats = Arc::new(PushStats::default());
        let cfg = PyroscopeConfig {
            max_retry: Duration::from_millis(250),
            ..test_cfg(addr)
        };
        let pusher = Pusher::spawn(cfg, stats.clone()).unwrap();
        pusher.push(window(0));
        pusher.push(window(1));
        let s = stats.clone();
        wait_until("giving up", Duration::from_secs(3), move || {
            s.dropped_gave_up.load(Ordering::Relaxed) == 2
        })
        .await;
        let snap = stats.snapshot();
        assert!(snap.failed_attempts >= 4, "{snap:?}");
        assert_eq!(snap.sent, 0);
        assert_eq!(pusher.shutdown(Duration::from_secs(1)).await.unsent, 0);
    }

    #[tokio::test]
    async fn push_never_blocks_on_a_hanging_receiver() {
        // Accepts connections, reads nothing, never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = l.accept().await {
                acc.fetch_add(1, Ordering::Relaxed);
                held.push(sock);
            }
        });
        let stats = Arc::new(PushStats::default());
        let cfg = PyroscopeConfig {
            timeout: Duration::from_millis(150),
            max_queue_windows: 1000,
            ..test_cfg(addr)
        };
        let pusher = Pusher::spawn(cfg, stats.clone()).unwrap();
        let t = Instant::now();
        for i in 0..200 {
            pusher.push(window(i));
        }
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );

        // Each attempt times out and is retried on a new connection.
        let s = stats.clone();
        wait_until("timeouts", Duration::from_secs(3), move || {
            s.failed_attempts.load(Ordering::Relaxed) >= 2
        })
        .await;
        assert!(accepted.load(Ordering::Relaxed) >= 2);
        assert_eq!(stats.snapshot().sent, 0);

        let t = Instant::now();
        let report = pusher.shutdown(Duration::from_millis(100)).await;
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(
            report,
            ShutdownReport {
                unsent: 200,
                drained: false
            }
        );
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_queued() {
        let (addr, rec) = receiver().await;
        let stats = Arc::new(PushStats::default());
        let pusher = Pusher::spawn(test_cfg(addr), stats.clone()).unwrap();
        for i in 0..10 {
            pusher.push(window(i));
        }
        let report = pusher.shutdown(Duration::from_secs(3)).await;
        assert_eq!(
            report,
            ShutdownReport {
                unsent: 0,
                drained: true
            }
        );
        assert_eq!(rec.count(), 10);
        assert_eq!(stats.snapshot().sent, 10);
    }

    #[test]
    fn labels_and_names() {
        assert_eq!(label_name("pid").as_deref(), Some("pid"));
        assert_eq!(label_name("k8s.pod-uid").as_deref(), Some("k8s_pod_uid"));
        assert_eq!(label_name("9lives").as_deref(), Some("_9lives"));
        assert_eq!(label_name("__name__"), None);
        assert_eq!(label_name(""), None);
        assert_eq!(
            label_value("  a,b}c{d=e\"f\tg ").as_deref(),
            Some("a_b_c_d_e_f_g")
        );
        assert_eq!(label_value("функция").as_deref(), Some("функция"));
        assert_eq!(label_value(" \n "), None);
        let long = "é".repeat(1000);
        let v = label_value(&long).unwrap();
        assert!(v.len() <= MAX_LABEL_VALUE_LEN && v.chars().all(|c| c == 'é'));

        assert!(validate_application_name("my-app/prod.v2_x").is_ok());
        for bad in ["", "my app", "app{x=y}", "app:1", "приложение"] {
            let e = validate_application_name(bad).unwrap_err().to_string();
            assert!(e.contains("application name"), "{e}");
        }
    }

    #[test]
    fn urls() {
        let u = |s: &str| ingest_url(s).map(|u| u.to_string());
        assert_eq!(u("http://pyro:4040").unwrap(), "http://pyro:4040/ingest");
        assert_eq!(u("https://h/").unwrap(), "https://h/ingest");
        assert_eq!(u("https://h/a/b/").unwrap(), "https://h/a/b/ingest");
        for bad in [
            "pyro:4040",
            "ftp://h",
            "http://h/?x=1",
            "not a url",
            "http://h/#f",
        ] {
            assert!(u(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn spawn_rejects_bad_config() {
        let stats = Arc::new(PushStats::default());
        let ok = PyroscopeConfig::new("http://127.0.0.1:4040", "python");
        for cfg in [
            PyroscopeConfig {
                url: "localhost:4040".into(),
                ..ok.clone()
            },
            PyroscopeConfig {
                application_name: "my app".into(),
                ..ok.clone()
            },
            PyroscopeConfig {
                max_queue_windows: 0,
                ..ok.clone()
            },
        ] {
            assert!(matches!(
                Pusher::spawn(cfg, stats.clone()),
                Err(ExportError::Config(_))
            ));
        }
        let with_pw = PyroscopeConfig {
            basic_auth: Some(("u".into(), "hunter2".into())),
            ..ok
        };
        assert!(!format!("{with_pw:?}").contains("hunter2"));
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_cap() {
        let mut s = Sender::new(&PyroscopeConfig::new("http://127.0.0.1:1", "a")).unwrap();
        for _ in 0..50 {
            let d: Vec<Duration> = (0..8).map(|a| s.backoff(a)).collect();
            for (a, d) in d.iter().enumerate() {
                let max = Duration::from_secs(1 << a).min(Duration::from_secs(30));
                assert!(*d >= max / 2 && *d <= max, "attempt {a}: {d:?}");
            }
        }
        assert!(s.backoff(u32::MAX) <= Duration::from_secs(30));
        // Jitter actually varies.
        let xs: std::collections::HashSet<Duration> = (0..20).map(|_| s.backoff(3)).collect();
        assert!(xs.len() > 1);
    }

    #[test]
    fn multipart_boundary_not_in_payload() {
        let (ct, body) = multipart_body(b"\x1f\x8bpayload", 7);
        assert_eq!(multipart_profile(&ct, &body), b"\x1f\x8bpayload");
        // A payload containing the first candidate boundary gets another.
        let first = ct.strip_prefix("multipart/form-data; boundary=").unwrap();
        let evil = format!("xx{first}yy");
        let (ct2, body2) = multipart_body(evil.as_bytes(), 7);
        assert_ne!(ct, ct2);
        assert_eq!(multipart_profile(&ct2, &body2), evil.as_bytes());
    }
}
