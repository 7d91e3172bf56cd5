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
//! One request per process per window, queued, sent and retried by the
//! shared [`push`](super::push) machinery (bounded in bytes, exponential
//! back-off, a circuit breaker while the server is down, losses counted).
use crate::store::unix_secs;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::CONTENT_TYPE;
use reqwest::Url;

use super::pprof_dir::encode_window;
pub use super::pprof_dir::ExportError;
use super::push::backoff::Rng;
use super::push::http::{chain, excerpt, retry_after, retryable};
use super::push::{Attempt, Encoded, PushSettings, Transport};
pub use super::push::{PushStats, PushStatsSnapshot, ShutdownReport, CIRCUIT_THRESHOLD};
pub use crate::daemon::metrics::DropReason;
use crate::daemon::metrics::PushMetrics;
use crate::daemon::WindowProfile;
use crate::profile::ValueUnit;

/// `spyName` sent with every profile.
pub const SPY_NAME: &str = "pyebpf";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_QUEUE_BYTES: u64 = 64 << 20;
pub const DEFAULT_MAX_CONCURRENT_UPLOADS: usize = 8;
pub const DEFAULT_MAX_RETRY: Duration = Duration::from_secs(300);
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Bytes charged per queued profile besides its body and query string: the
/// item's own bookkeeping, so that many tiny profiles are bounded too.
pub const ITEM_OVERHEAD: u64 = 256;
/// Pyroscope's default `validation.max-length-label-value` is 2048.
const MAX_LABEL_VALUE_LEN: usize = 1024;
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
    /// Bytes held for sending (queued or in flight), at least 1: encoded
    /// requests plus [`ITEM_OVERHEAD`] per profile. Beyond it the oldest
    /// queued profiles are dropped.
    pub max_queue_bytes: u64,
    /// Uploads in progress at once, at least 1.
    pub max_concurrent_uploads: usize,
    /// A profile still failing this long after its first attempt is given up.
    pub max_retry: Duration,
    /// (user, password).
    pub basic_auth: Option<(String, String)>,
    /// Sent as `X-Scope-OrgID`.
    pub tenant_id: Option<String>,
    /// First retry delay; doubles per attempt up to `backoff_cap`. Each delay
    /// is drawn uniformly from [d/2, d]. The same schedule spaces the global
    /// pauses while the server is down.
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
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
            max_concurrent_uploads: DEFAULT_MAX_CONCURRENT_UPLOADS,
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
            .field("max_queue_bytes", &self.max_queue_bytes)
            .field("max_concurrent_uploads", &self.max_concurrent_uploads)
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

/// Pushes windows to Pyroscope from background tasks.
pub struct Pusher(super::push::Pusher<Uploader>);

impl Pusher {
    /// Checks the configuration, builds the HTTP client and starts the
    /// encoding and sending tasks on the current tokio runtime.
    pub fn spawn(cfg: PyroscopeConfig, stats: Arc<PushStats>) -> Result<Pusher, ExportError> {
        let uploader = Uploader::new(&cfg)?;
        if cfg.max_concurrent_uploads == 0 {
            return Err(ExportError::Config(
                "pyroscope max_concurrent_uploads must be at least 1".into(),
            ));
        }
        let settings = PushSettings {
            name: "pyroscope",
            max_queue_bytes: cfg.max_queue_bytes,
            max_concurrent: cfg.max_concurrent_uploads,
            max_retry: cfg.max_retry,
            backoff_base: cfg.backoff_base,
            backoff_cap: cfg.backoff_cap,
        };
        let app = cfg.application_name.clone();
        let encode = Arc::new(move |w: Vec<WindowProfile>, seed: u64| encode_items(&app, w, seed));
        super::push::Pusher::spawn(settings, uploader, encode, stats).map(Pusher)
    }

    /// See [`super::push::Pusher::attach_metrics`].
    pub fn attach_metrics(&self, m: PushMetrics) {
        self.0.attach_metrics(m);
    }

    /// Queues one closed window for sending; never blocks.
    pub fn push_window(&self, profiles: Vec<WindowProfile>) {
        self.0.push_window(profiles);
    }

    /// Queues a single profile, as a window of its own.
    pub fn push(&self, w: WindowProfile) {
        self.0.push(w);
    }

    /// Profiles waiting to be sent (not counting those being sent).
    pub fn queued(&self) -> usize {
        self.0.queued()
    }

    pub fn stats(&self) -> &Arc<PushStats> {
        self.0.stats()
    }

    /// Sends what is queued for at most `deadline`; see
    /// [`super::push::Pusher::shutdown`].
    pub async fn shutdown(self, deadline: Duration) -> ShutdownReport {
        self.0.shutdown(deadline).await
    }
}

/// One profile's request, ready to send (and resend).
pub struct Request {
    query: Vec<(&'static str, String)>,
    content_type: String,
    body: Bytes,
}

/// The requests of one window's profiles (CPU work: pprof, gzip, multipart).
fn encode_items(app: &str, window: Vec<WindowProfile>, seed: u64) -> Vec<Encoded<Request>> {
    let mut rng = Rng::seeded(seed);
    window
        .into_iter()
        .map(|w| {
            let query = query_params(app, &w);
            let pprof = encode_window(&w);
            let (content_type, body) = multipart_body(&pprof, rng.next_u64());
            let query_len: usize = query.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
            let cost = (body.len() + query_len + content_type.len()) as u64 + ITEM_OVERHEAD;
            Encoded {
                payload: Request {
                    query,
                    content_type,
                    body: Bytes::from(body),
                },
                cost,
                profiles: 1,
                about: format!("pid {} ({})", w.labels.pid, w.labels.service),
            }
        })
        .collect()
}

/// The HTTP side: one client (keep-alive connections shared by all
/// uploads) and the request shape.
pub struct Uploader {
    client: reqwest::Client,
    ingest_url: Url,
    basic_auth: Option<(String, String)>,
    tenant_id: Option<String>,
}

impl Uploader {
    fn new(cfg: &PyroscopeConfig) -> Result<Self, ExportError> {
        validate_application_name(&cfg.application_name)?;
        let ingest_url = ingest_url(&cfg.url)?;
        if cfg.timeout.is_zero() {
            return Err(ExportError::Config(
                "pyroscope timeout must be positive".into(),
            ));
        }
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            // Enough idle connections for every upload slot to reuse one.
            .pool_max_idle_per_host(cfg.max_concurrent_uploads.max(1))
            // Credentials must not follow a redirect; a redirect is a
            // misconfigured URL, reported as a rejection.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pyebpf/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ExportError::Config(format!("pyroscope HTTP client: {}", chain(&e))))?;
        Ok(Uploader {
            client,
            ingest_url,
            basic_auth: cfg.basic_auth.clone(),
            tenant_id: cfg.tenant_id.clone(),
        })
    }

    async fn attempt(&self, item: &Request) -> Attempt {
        let mut req = self
            .client
            .post(self.ingest_url.clone())
            .query(&item.query)
            .header(CONTENT_TYPE, &item.content_type)
            // A cheap reference-counted clone, not a copy.
            .body(item.body.clone());
        if let Some((user, password)) = &self.basic_auth {
            req = req.basic_auth(user, Some(password));
        }
        if let Some(tenant) = &self.tenant_id {
            req = req.header("X-Scope-OrgID", tenant);
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            // Connection refused/reset, DNS, TLS, timeout: all transient.
            Err(e) => {
                return Attempt::Retry {
                    why: chain(&e.without_url()),
                    after: None,
                }
            }
        };
        let status = resp.status();
        if status.is_success() {
            return Attempt::Sent;
        }
        let after = retry_after(resp.headers());
        let why = format!("HTTP {status}: {}", excerpt(&mut resp).await);
        if retryable(status) {
            Attempt::Retry { why, after }
        } else {
            Attempt::Rejected(why)
        }
    }
}

impl Transport for Uploader {
    type Payload = Request;
    fn send<'a>(&'a self, r: &'a Request) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
        Box::pin(self.attempt(r))
    }
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

/// `sampleRate`: values per second of the profile's unit.
fn sample_rate(p: &crate::profile::CompactProfile) -> u64 {
    match p.kind.unit() {
        ValueUnit::Samples => u64::from(p.rate_hz),
        ValueUnit::Nanoseconds => 1_000_000_000,
    }
}

/// `units` of the profile's values.
fn units(p: &crate::profile::CompactProfile) -> &'static str {
    match p.kind.unit() {
        ValueUnit::Samples => "samples",
        ValueUnit::Nanoseconds => "nanoseconds",
    }
}

/// The query parameters of the ingest request for `w`.
fn query_params(app: &str, w: &WindowProfile) -> Vec<(&'static str, String)> {
    let from = unix_secs(w.start);
    let until = unix_secs(w.end).max(from);
    vec![
        ("name", name_param(app, w)),
        ("from", from.to_string()),
        ("until", until.to_string()),
        // A CPU profile counts samples at the sampling rate; wall and
        // off-CPU profiles hold nanoseconds (a rate of 1e9 per second).
        ("sampleRate", sample_rate(&w.profile).to_string()),
        ("spyName", SPY_NAME.to_string()),
        ("units", units(&w.profile).to_string()),
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
    use super::super::push::MAX_PENDING_WINDOWS;
    use super::*;
    use crate::model::labels::ProcessLabels;
    use crate::profile::folded::tests::sample_profile;
    use crate::profile::pprof::{self, proto};
    use axum::body::Bytes;
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, Method, Uri};
    use prost::Message as _;
    use std::collections::{BTreeMap, HashMap, VecDeque};
    use std::io::Read as _;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::{Instant, UNIX_EPOCH};

    const T0: u64 = 1_700_000_000;

    fn window(i: u64) -> WindowProfile {
        profile_of(42, i)
    }

    /// Process `pid`'s profile of window `i`.
    fn profile_of(pid: u32, i: u64) -> WindowProfile {
        let start = UNIX_EPOCH + Duration::from_secs(T0 + 60 * i);
        WindowProfile {
            labels: ProcessLabels {
                pid,
                command: "python3".into(),
                service: "web".into(),
                exe: "/usr/bin/python3.11".into(),
                cmdline: "python3 app.py".into(),
                container_id: Some("abc123".into()),
                ..Default::default()
            },
            profile: (&sample_profile()).into(),
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

    /// Window `i` of processes `pids`.
    fn window_of(pids: std::ops::Range<u32>, i: u64) -> Vec<WindowProfile> {
        pids.map(|pid| profile_of(pid, i)).collect()
    }

    /// What one profile counts against `max_queue_bytes` (the gzipped size
    /// varies a little with the labels).
    fn cost_of(w: WindowProfile) -> u64 {
        encode_items("myapp", vec![w], 1)[0].cost
    }

    fn cost_of_all(ws: Vec<WindowProfile>) -> u64 {
        ws.into_iter().map(cost_of).sum()
    }

    impl Pusher {
        /// The counters at one instant (they change under the lock only).
        fn consistent_stats(&self) -> PushStatsSnapshot {
            self.0.consistent_stats()
        }

        /// Waits until every window pushed has been encoded: encoding
        /// (unoptimised in tests) may lag far behind on a loaded host.
        async fn wait_encoded(&self) {
            wait_until("the encoder", Duration::from_secs(60), || {
                self.0.encoder_idle()
            })
            .await;
        }
    }

    #[derive(Clone, Debug)]
    struct Received {
        status: u16,
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
        fn accepted(&self) -> bool {
            (200..300).contains(&self.status)
        }
        /// The pid in the pprof's label comments.
        fn pid(&self) -> u32 {
            let ct = self.headers["content-type"].to_str().unwrap();
            let m = decode_pprof(&multipart_profile(ct, &self.body));
            m.comment
                .iter()
                .find_map(|&i| m.string_table[i as usize].strip_prefix("pid="))
                .expect("a pid comment")
                .parse()
                .unwrap()
        }
    }

    #[derive(Clone, Default)]
    struct Recorder {
        reqs: Arc<Mutex<Vec<Received>>>,
        /// Responses to give, in order; 200 once exhausted.
        script: Arc<Mutex<VecDeque<(u16, &'static str)>>>,
        /// Answer 503 to everything.
        down: Arc<AtomicBool>,
        /// Each answer comes this long after the request (milliseconds).
        delay_ms: Arc<AtomicU64>,
        active: Arc<AtomicUsize>,
        peak_active: Arc<AtomicUsize>,
    }

    impl Recorder {
        fn received(&self) -> Vec<Received> {
            self.reqs.lock().unwrap().clone()
        }
        fn count(&self) -> usize {
            self.reqs.lock().unwrap().len()
        }
        fn accepted(&self) -> usize {
            self.reqs
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.accepted())
                .count()
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
        let active = rec.active.fetch_add(1, Ordering::SeqCst) + 1;
        rec.peak_active.fetch_max(active, Ordering::SeqCst);
        let delay = rec.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let (code, text) = if rec.down.load(Ordering::SeqCst) {
            (503, "down")
        } else {
            rec.script.lock().unwrap().pop_front().unwrap_or((200, ""))
        };
        rec.active.fetch_sub(1, Ordering::SeqCst);
        rec.reqs.lock().unwrap().push(Received {
            status: code,
            method,
            path: uri.path().to_string(),
            query,
            headers,
            body: body.to_vec(),
        });
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
        let want = pprof::build_compact(&w.profile);
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
        let s = stats.snapshot();
        assert_eq!((s.pushed, s.sent, s.failed_attempts), (1, 1, 0));
        assert_eq!(s.dropped_total(), 0);
        assert_eq!(s.sent_bytes, cost_of(w));
    }

    #[tokio::test]
    async fn receiver_down_then_up_loses_nothing() {
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
        let mut froms: Vec<u64> = rec.received().iter().map(Received::from).collect();
        froms.sort();
        assert_eq!(froms, (0..5).map(|i| T0 + 60 * i).collect::<Vec<_>>());
        let report = pusher.shutdown(Duration::from_secs(1)).await;
        assert_eq!(report.unsent, 0);
        let snap = stats.snapshot();
        assert_eq!(snap.sent, 5);
        assert!(snap.failed_attempts >= 3);
        assert_eq!(snap.dropped_total(), 0);
    }

    #[tokio::test]
    async fn full_queue_drops_oldest() {
        let addr = dead_addr().await;
        let stats = Arc::new(PushStats::default());
        let cost = cost_of(window(0));
        let cfg = PyroscopeConfig {
            // Room for three profiles.
            max_queue_bytes: 3 * cost + cost / 2,
            backoff_base: Duration::from_millis(400),
            backoff_cap: Duration::from_millis(400),
            ..test_cfg(addr)
        };
        let pusher = Pusher::spawn(cfg, stats.clone()).unwrap();
        pusher.push(window(0));
        // Window 0 failed once and waits in the queue to be retried.
        let s = stats.clone();
        wait_until("a failed attempt", Duration::from_secs(3), move || {
            s.failed_attempts.load(Ordering::Relaxed) >= 1
        })
        .await;
        // One window of five processes, queued at once: the oldest three
        // profiles (window 0's, then two of the new window's) make room.
        pusher.push_window(window_of(1..6, 1));
        let s = stats.clone();
        wait_until("the drops", Duration::from_secs(3), move || {
            s.dropped[DropReason::QueueFull as usize].load(Ordering::Relaxed) == 3
        })
        .await;
        let snap = pusher.consistent_stats();
        let dropped = cost + cost_of(profile_of(1, 1)) + cost_of(profile_of(2, 1));
        assert_eq!(snap.dropped_bytes[DropReason::QueueFull as usize], dropped);
        assert!(snap.peak_queued_bytes <= 3 * cost + cost / 2, "{snap:?}");

        let rec = serve(tokio::net::TcpListener::bind(addr).await.unwrap()).await;
        wait_until("the rest", Duration::from_secs(5), || rec.accepted() == 3).await;
        pusher.shutdown(Duration::from_secs(1)).await;
        let mut pids: Vec<(u64, u32)> = rec
            .received()
            .iter()
            .filter(|r| r.accepted())
            .map(|r| (r.from(), r.pid()))
            .collect();
        pids.sort();
        assert_eq!(pids, [(T0 + 60, 3), (T0 + 60, 4), (T0 + 60, 5)]);
        let snap = stats.snapshot();
        assert_eq!((snap.pushed, snap.sent, snap.dropped_total()), (6, 3, 3));
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
            s.dropped(DropReason::Rejected) == 1
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
        let s = stats.snapshot();
        assert_eq!((s.sent, s.failed_attempts, s.dropped_total()), (1, 0, 1));
        assert_eq!(s.dropped(DropReason::Rejected), 1);
        assert_eq!(
            s.dropped_bytes[DropReason::Rejected as usize],
            cost_of(window(0))
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
        // Each window accepted once; every retry carries the same body.
        let mut by_from: BTreeMap<u64, Vec<Received>> = BTreeMap::new();
        for r in rec.received() {
            by_from.entry(r.from()).or_default().push(r);
        }
        assert_eq!(by_from.keys().copied().collect::<Vec<_>>(), [T0, T0 + 60]);
        for reqs in by_from.values() {
            assert_eq!(reqs.iter().filter(|r| r.accepted()).count(), 1);
            assert!(reqs.last().unwrap().accepted());
            assert!(reqs.iter().all(|r| r.body == reqs[0].body));
        }
        let s = stats.snapshot();
        assert_eq!((s.sent, s.failed_attempts, s.dropped_total()), (2, 3, 0));
    }

    #[tokio::test]
    async fn server_error_then_ok_is_retried_and_arrives_once() {
        let (addr, rec) = receiver().await;
        rec.script(&[(500, "boom")]);
        let stats = Arc::new(PushStats::default());
        let pusher = Pusher::spawn(test_cfg(addr), stats.clone()).unwrap();
        pusher.push(window(0));
        wait_until("the retry", Duration::from_secs(3), || rec.accepted() == 1).await;
        // Later back-off periods bring nothing more.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = rec.received();
        assert_eq!(got.iter().map(|r| r.status).collect::<Vec<_>>(), [500, 200]);
        assert_eq!(got[0].body, got[1].body);
        assert_eq!(got[0].query, got[1].query);
        assert_eq!(pusher.shutdown(Duration::from_secs(1)).await.unsent, 0);
        let s = stats.snapshot();
        assert_eq!((s.sent, s.failed_attempts, s.dropped_total()), (1, 1, 0));
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
            s.dropped(DropReason::GaveUp) == 2
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
            ..test_cfg(addr)
        };
        let pusher = Arc::new(Pusher::spawn(cfg, stats.clone()).unwrap());
        // The receiver never answers: pushes that waited for it would
        // never return (a liveness bound, not a speed test).
        let windows: Vec<_> = (0..4).map(|i| window_of(0..50, i)).collect();
        let p = pusher.clone();
        let pushed = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || {
                for w in windows {
                    p.push_window(w);
                }
            }),
        )
        .await;
        assert!(
            matches!(pushed, Ok(Ok(()))),
            "push_window waited for the server"
        );
        assert_eq!(stats.snapshot().sent, 0);
        let Ok(pusher) = Arc::try_unwrap(pusher) else {
            panic!("the pushing task still holds the pusher");
        };

        // Each attempt times out and is retried on a new connection.
        let s = stats.clone();
        wait_until("timeouts", Duration::from_secs(3), move || {
            s.failed_attempts.load(Ordering::Relaxed) >= 2
        })
        .await;
        assert!(accepted.load(Ordering::Relaxed) >= 2);
        assert_eq!(stats.snapshot().sent, 0);
        // The bytes dropped below are those of encoded requests (a window
        // still waiting for the encoder has no size yet).
        pusher.wait_encoded().await;

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
        let s = stats.snapshot();
        assert_eq!(s.dropped(DropReason::Shutdown), 200);
        assert_eq!((s.queued, s.in_flight, s.queued_bytes), (0, 0, 0));
        assert_eq!(
            s.dropped_bytes[DropReason::Shutdown as usize],
            4 * cost_of_all(window_of(0..50, 0))
        );
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_queued() {
        let (addr, rec) = receiver().await;
        let stats = Arc::new(PushStats::default());
        let pusher = Pusher::spawn(test_cfg(addr), stats.clone()).unwrap();
        // Not yet encoded when the shutdown starts (nothing ran in between).
        for i in 0..5 {
            pusher.push_window(window_of(0..20, i));
        }
        let report = pusher.shutdown(Duration::from_secs(3)).await;
        assert_eq!(
            report,
            ShutdownReport {
                unsent: 0,
                drained: true
            }
        );
        assert_eq!(rec.count(), 100);
        assert_eq!(accepted_by_window_and_pid(&rec).len(), 100);
        assert_eq!(stats.snapshot().sent, 100);
    }

    #[tokio::test]
    async fn encoder_backlog_drops_the_oldest_windows() {
        let (addr, rec) = receiver().await;
        let stats = Arc::new(PushStats::default());
        let pusher = Pusher::spawn(test_cfg(addr), stats.clone()).unwrap();
        // On this single-threaded runtime the encoder cannot run before the
        // test yields: every window waits for it.
        for i in 0..MAX_PENDING_WINDOWS as u64 + 2 {
            pusher.push_window(window_of(0..3, i));
        }
        let s = stats.snapshot();
        assert_eq!(s.dropped(DropReason::QueueFull), 6);
        // Not encoded: no size to count.
        assert_eq!(s.dropped_bytes[DropReason::QueueFull as usize], 0);
        assert_eq!(s.queued, 3 * MAX_PENDING_WINDOWS as u64);
        assert_eq!(pusher.shutdown(Duration::from_secs(3)).await.unsent, 0);
        let got = accepted_by_window_and_pid(&rec);
        assert_eq!(got.len(), 3 * MAX_PENDING_WINDOWS);
        assert!(got.keys().all(|&(from, _)| from >= T0 + 120));
    }

    /// (window start, pid) of every accepted request, with how many times.
    fn accepted_by_window_and_pid(rec: &Recorder) -> HashMap<(u64, u32), usize> {
        let mut got = HashMap::new();
        for r in rec.received().iter().filter(|r| r.accepted()) {
            *got.entry((r.from(), r.pid())).or_insert(0) += 1;
        }
        got
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_processes_every_profile_arrives_once() {
        const PROCS: u32 = 500;
        const WINDOWS: u64 = 5;
        let (addr, rec) = receiver().await;
        rec.delay_ms.store(20, Ordering::Relaxed);
        let stats = Arc::new(PushStats::default());
        let pusher = Pusher::spawn(test_cfg(addr), stats.clone()).unwrap();
        // That a push never waits for the server is
        // `push_never_blocks_on_a_hanging_receiver`'s business.
        for i in 0..WINDOWS {
            pusher.push_window(window_of(1000..1000 + PROCS, i));
        }
        let total = (PROCS as u64 * WINDOWS) as usize;
        wait_until("every profile", Duration::from_secs(60), || {
            rec.accepted() == total
        })
        .await;
        assert_eq!(pusher.shutdown(Duration::from_secs(1)).await.unsent, 0);

        let got = accepted_by_window_and_pid(&rec);
        assert_eq!(got.len(), total);
        for i in 0..WINDOWS {
            for pid in 1000..1000 + PROCS {
                assert_eq!(
                    got.get(&(T0 + 60 * i, pid)),
                    Some(&1),
                    "window {i} pid {pid}"
                );
            }
        }
        assert_eq!(rec.count(), total, "no request failed or was repeated");
        let peak = rec.peak_active.load(Ordering::SeqCst);
        assert!(
            (2..=DEFAULT_MAX_CONCURRENT_UPLOADS).contains(&peak),
            "concurrent uploads: {peak}"
        );
        let s = stats.snapshot();
        assert_eq!((s.pushed, s.sent), (total as u64, total as u64));
        assert_eq!((s.failed_attempts, s.dropped_total()), (0, 0));
        assert_eq!((s.queued, s.in_flight, s.queued_bytes), (0, 0, 0));
    }

    /// How long one window takes to upload to a server answering each
    /// request after 20 ms (printed; `--nocapture` shows it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_window_upload_time() {
        let (addr, rec) = receiver().await;
        rec.delay_ms.store(20, Ordering::Relaxed);
        let mut done = 0;
        for (procs, concurrency) in [
            (500, DEFAULT_MAX_CONCURRENT_UPLOADS),
            (1000, DEFAULT_MAX_CONCURRENT_UPLOADS),
            (1000, 16),
            (1000, 32),
        ] {
            let stats = Arc::new(PushStats::default());
            let cfg = PyroscopeConfig {
                max_concurrent_uploads: concurrency,
                ..test_cfg(addr)
            };
            let pusher = Pusher::spawn(cfg, stats.clone()).unwrap();
            let t = Instant::now();
            pusher.push_window(window_of(0..procs, 0));
            done += procs as usize;
            // The window is queued for sending once all of it is encoded:
            // CPU work, unoptimised here, that no concurrency shortens.
            pusher.wait_encoded().await;
            let encoded = t.elapsed();
            wait_until("the window", Duration::from_secs(60), || {
                rec.accepted() == done
            })
            .await;
            let took = t.elapsed();
            let upload = took - encoded;
            println!(
                "one window of {procs} profiles, {concurrency} concurrent uploads, \
                 20 ms per request: {took:?} (encoding {encoded:?}, uploads {upload:?})"
            );
            // Serial uploads would take procs * 20 ms.
            let serial = Duration::from_millis(20) * procs;
            assert!(upload < serial / 3, "{took:?}: uploads {upload:?}");
            assert_eq!(pusher.shutdown(Duration::from_secs(1)).await.unsent, 0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_down_memory_bounded_loss_counted_then_recovers() {
        const PROCS: u32 = 50;
        let (addr, rec) = receiver().await;
        rec.down.store(true, Ordering::SeqCst);
        let cost = cost_of(profile_of(1, 0));
        // Room for about three windows.
        let max = 3 * PROCS as u64 * cost + cost / 2;
        let stats = Arc::new(PushStats::default());
        let cfg = PyroscopeConfig {
            max_queue_bytes: max,
            ..test_cfg(addr)
        };
        let pusher = Pusher::spawn(cfg, stats.clone()).unwrap();
        let down_since = Instant::now();
        for i in 0..10 {
            pusher.push_window(window_of(0..PROCS, i));
            // Windows a minute apart: each is encoded (and the queue
            // trimmed) before the next, however slow the host.
            pusher.wait_encoded().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let s = pusher.consistent_stats();
            assert!(s.queued_bytes <= max, "{s:?}");
            // While the server looks down a single upload probes it.
            assert!(s.in_flight <= DEFAULT_MAX_CONCURRENT_UPLOADS as u64);
            assert_eq!(
                s.sent + s.dropped_total() + s.queued + s.in_flight,
                s.pushed
            );
        }
        let outage = down_since.elapsed();
        let s = pusher.consistent_stats();
        assert_eq!(s.sent, 0);
        assert!(s.peak_queued_bytes <= max, "{s:?}");
        assert!(s.peak_queued_bytes > max - 2 * cost, "{s:?}");
        // Ten windows pushed, about three kept: the oldest seven dropped.
        let full = s.dropped(DropReason::QueueFull);
        assert!(
            (6 * PROCS as u64..=7 * PROCS as u64 + 1).contains(&full),
            "{s:?}"
        );
        // Every byte pushed is either dropped or still held.
        assert_eq!(
            s.dropped_bytes[DropReason::QueueFull as usize] + s.queued_bytes,
            10 * cost_of_all(window_of(0..PROCS, 0))
        );
        assert_eq!(s.dropped_total(), full);
        assert_eq!(
            s.sent + s.dropped_total() + s.queued + s.in_flight,
            10 * PROCS as u64
        );
        // Not every slot retrying on its own: the first failures, then one
        // probe per global pause (10..100 ms apart here).
        let requests = rec.count();
        println!("server down for {outage:?}: {requests} requests, {s:?}");
        let bound = DEFAULT_MAX_CONCURRENT_UPLOADS + (outage.as_millis() / 10) as usize;
        assert!(requests < bound / 2, "{requests} requests in {outage:?}");
        // A request the server saw may not have been counted as failed yet
        // (its answer still in flight): wait for the two to agree.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (failed, seen) = (pusher.consistent_stats().failed_attempts, rec.count());
            if failed == seen as u64 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{failed} failed, {seen} requests"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // Back up: what is queued and new windows arrive, each profile once.
        rec.down.store(false, Ordering::SeqCst);
        pusher.push_window(window_of(0..PROCS, 10));
        pusher.push_window(window_of(0..PROCS, 11));
        let st = stats.clone();
        wait_until("the queue to empty", Duration::from_secs(10), move || {
            let s = st.snapshot();
            s.pushed == 12 * PROCS as u64 && s.queued + s.in_flight == 0
        })
        .await;
        assert_eq!(pusher.shutdown(Duration::from_secs(1)).await.unsent, 0);
        let got = accepted_by_window_and_pid(&rec);
        assert!(got.values().all(|&n| n == 1));
        for i in [10, 11] {
            for pid in 0..PROCS {
                assert_eq!(got.get(&(T0 + 60 * i, pid)), Some(&1));
            }
        }
        // The newest windows of the outage were the ones kept.
        assert!(got.keys().all(|&(from, _)| from >= T0 + 60 * 6), "{got:?}");
        let s = stats.snapshot();
        assert_eq!(s.pushed, 12 * PROCS as u64);
        assert_eq!(s.sent as usize, rec.accepted());
        assert_eq!(s.sent as usize, got.len());
        // New windows pushed the oldest of the outage out; about three
        // windows' worth was kept in all.
        assert!(s.sent >= 2 * PROCS as u64 + PROCS as u64, "{s:?}");
        assert_eq!(s.sent + s.dropped_total(), s.pushed);
        assert_eq!(s.dropped_total(), s.dropped(DropReason::QueueFull));
        assert_eq!((s.queued, s.in_flight, s.queued_bytes), (0, 0, 0));
    }

    #[tokio::test]
    async fn metrics_follow_the_pusher() {
        let (addr, rec) = receiver().await;
        rec.script(&[(400, "bad")]);
        let metrics = crate::daemon::metrics::Metrics::new();
        let m = metrics.pyroscope();
        let stats = Arc::new(PushStats::default());
        let cfg = PyroscopeConfig {
            max_concurrent_uploads: 1,
            ..test_cfg(addr)
        };
        let pusher = Pusher::spawn(cfg, stats.clone()).unwrap();
        pusher.push(window(0));
        // Settled (counted), not only received: attaching before the pusher
        // counts the attempt would add its duration.
        wait_until("the rejection", Duration::from_secs(3), || {
            stats.snapshot().dropped(DropReason::Rejected) == 1
        })
        .await;
        // Attached late: what happened before is added at once.
        pusher.attach_metrics(metrics.pyroscope());
        pusher.attach_metrics(metrics.pyroscope());
        rec.script(&[(503, "")]);
        pusher.push_window(window_of(1..4, 1));
        wait_until("the uploads", Duration::from_secs(3), || {
            rec.accepted() == 3
        })
        .await;
        let cost = cost_of(window(0));
        let i = |r: DropReason| r as usize;
        assert_eq!(m.sent.get(), 3);
        assert_eq!(m.sent_bytes.get(), cost_of_all(window_of(1..4, 1)));
        assert_eq!(m.failed_attempts.get(), 1);
        assert_eq!(m.dropped.get(), 1);
        assert_eq!(m.dropped_profiles[i(DropReason::Rejected)].get(), 1);
        assert_eq!(m.dropped_bytes[i(DropReason::Rejected)].get(), cost);
        // The attempt before attaching has no duration to add.
        assert_eq!(m.upload_seconds.get_sample_count(), 4);
        assert_eq!((m.queue_bytes.get(), m.queue_profiles.get()), (0, 0));
        assert_eq!(m.in_flight.get(), 0);
        let text = metrics.render();
        assert!(text.contains("pyebpf_pyroscope_queue_bytes 0"), "{text}");

        // Gauges while held.
        rec.down.store(true, Ordering::SeqCst);
        pusher.push_window(window_of(1..4, 2));
        let held = cost_of_all(window_of(1..4, 2)) as i64;
        wait_until("held", Duration::from_secs(3), || {
            m.queue_bytes.get() == held
        })
        .await;
        assert_eq!(m.queue_profiles.get() + m.in_flight.get(), 3);
        let r = pusher.shutdown(Duration::from_millis(50)).await;
        assert_eq!(r.unsent, 3);
        assert_eq!(m.dropped_profiles[i(DropReason::Shutdown)].get(), 3);
        assert_eq!(m.dropped.get(), 4);
        assert_eq!((m.queue_bytes.get(), m.queue_profiles.get()), (0, 0));
        assert_eq!(m.in_flight.get(), 0);
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
                max_queue_bytes: 0,
                ..ok.clone()
            },
            PyroscopeConfig {
                max_concurrent_uploads: 0,
                ..ok.clone()
            },
            PyroscopeConfig {
                timeout: Duration::ZERO,
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
