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
//! How windows flow (one request per process per window):
//!
//! - [`Pusher::push_window`] hands a closed window (every process's profile)
//!   to the encoder task and returns; it never blocks.
//! - The encoder builds the requests (pprof, gzip, multipart) on a blocking
//!   thread, then appends the whole window to the queue at once. The queue
//!   is bounded in bytes ([`PyroscopeConfig::max_queue_bytes`], counting
//!   what is in flight too): beyond it the oldest profiles are dropped.
//! - The dispatcher uploads queued profiles oldest first, at most
//!   `max_concurrent_uploads` at a time over one keep-alive client. A failed
//!   upload goes back to the queue with its own exponential back-off (and
//!   is given up after `max_retry`). After [`CIRCUIT_THRESHOLD`] consecutive
//!   failures the server is taken as down: uploads pause as a whole (growing
//!   pauses with jitter) and then a single upload probes it, so an outage
//!   costs one request per pause rather than one per slot; the first success
//!   restores full concurrency.
use crate::store::unix_secs;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::header::CONTENT_TYPE;
use reqwest::{StatusCode, Url};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

use super::pprof_dir::encode_window;
pub use super::pprof_dir::ExportError;
pub use crate::daemon::metrics::DropReason;
use crate::daemon::metrics::PushMetrics;
use crate::daemon::WindowProfile;

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
/// Consecutive failed attempts (across all uploads) after which the server
/// is taken as down and uploads pause as a whole.
pub const CIRCUIT_THRESHOLD: u32 = 3;
/// Windows waiting for the encoder; beyond it the oldest waiting window is
/// dropped. Encoding takes far less than a window lasts, so only a starved
/// host gets here, and then queuing more raw windows would not help.
const MAX_PENDING_WINDOWS: usize = 8;
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

/// Counters of the pusher, in profiles unless named `bytes`. Every profile
/// pushed ends up in exactly one of `sent` and `dropped`, unless it is still
/// held: `pushed == sent + Σ dropped + queued + in_flight`.
#[derive(Debug, Default)]
pub struct PushStats {
    /// Profiles handed to [`Pusher::push_window`].
    pub pushed: AtomicU64,
    /// Profiles accepted by the server (2xx).
    pub sent: AtomicU64,
    pub sent_bytes: AtomicU64,
    /// Attempts that failed transiently (connection, timeout, 408, 429, 5xx)
    /// and were retried or led to giving up.
    pub failed_attempts: AtomicU64,
    /// By [`DropReason`], in [`DropReason::ALL`] order.
    pub dropped: [AtomicU64; 4],
    pub dropped_bytes: [AtomicU64; 4],
    /// Held now: waiting for the encoder, queued or waiting to retry.
    pub queued: AtomicU64,
    /// Held now: uploads in progress.
    pub in_flight: AtomicU64,
    /// Bytes held now (queued and in flight), at most `max_queue_bytes`.
    pub queued_bytes: AtomicU64,
    /// Highest `queued_bytes` so far.
    pub peak_queued_bytes: AtomicU64,
}

/// [`PushStats`] at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PushStatsSnapshot {
    pub pushed: u64,
    pub sent: u64,
    pub sent_bytes: u64,
    pub failed_attempts: u64,
    pub dropped: [u64; 4],
    pub dropped_bytes: [u64; 4],
    pub queued: u64,
    pub in_flight: u64,
    pub queued_bytes: u64,
    pub peak_queued_bytes: u64,
}

impl PushStatsSnapshot {
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.dropped[r as usize]
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

impl PushStats {
    pub fn snapshot(&self) -> PushStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PushStatsSnapshot {
            pushed: g(&self.pushed),
            sent: g(&self.sent),
            sent_bytes: g(&self.sent_bytes),
            failed_attempts: g(&self.failed_attempts),
            dropped: self.dropped.each_ref().map(g),
            dropped_bytes: self.dropped_bytes.each_ref().map(g),
            queued: g(&self.queued),
            in_flight: g(&self.in_flight),
            queued_bytes: g(&self.queued_bytes),
            peak_queued_bytes: g(&self.peak_queued_bytes),
        }
    }

    pub fn dropped(&self, r: DropReason) -> u64 {
        self.dropped[r as usize].load(Ordering::Relaxed)
    }
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// What [`Pusher::shutdown`] could not do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Profiles neither sent nor dropped when the deadline hit (waiting for
    /// the encoder, queued, or being sent); counted as dropped for
    /// [`DropReason::Shutdown`].
    pub unsent: usize,
    /// Whether everything was sent or dropped before the deadline.
    pub drained: bool,
}

/// One profile's request, ready to send (and resend).
struct Item {
    query: Vec<(&'static str, String)>,
    content_type: String,
    body: Bytes,
    /// What it counts against `max_queue_bytes`.
    cost: u64,
    pid: u32,
    service: String,
    /// Failed attempts so far.
    attempts: u32,
    first_attempt: Option<Instant>,
    /// Not to be retried before then (its own back-off).
    not_before: Option<Instant>,
}

/// Everything the encoder, the dispatcher and the pusher share; changed
/// under [`Shared::lock`] only, so the counters and gauges stay consistent.
#[derive(Default)]
struct State {
    /// Windows waiting for the encoder, oldest first.
    raw: VecDeque<Vec<WindowProfile>>,
    /// Profiles in `raw`.
    raw_profiles: u64,
    /// Profiles the encoder is working on.
    encoding: u64,
    /// Encoded profiles to send, oldest window first.
    items: VecDeque<Item>,
    in_flight: u64,
    /// Bytes of `items` and of the uploads in flight.
    held_bytes: u64,
    /// Failed attempts since the last success or rejection.
    consecutive_failures: u32,
    /// Global pauses since the server was last seen up.
    pauses: u32,
    /// No upload starts before then (the server looks down).
    paused_until: Option<Instant>,
    /// Shutting down: the tasks exit once everything is sent.
    closing: bool,
    /// Gauge values last added to the attached metrics (this pusher's share
    /// of them, as an old pusher may still be draining after a reload).
    published: (u64, u64, u64),
    /// Dropped without a shutdown: the gauges no longer count this pusher.
    detached: bool,
}

impl State {
    fn waiting(&self) -> u64 {
        self.raw_profiles + self.encoding + self.items.len() as u64
    }

    fn idle(&self) -> bool {
        self.waiting() == 0 && self.in_flight == 0
    }

    /// The server is taken as down.
    fn circuit_open(&self) -> bool {
        self.consecutive_failures >= CIRCUIT_THRESHOLD
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the encoder (a window was pushed, or shutdown).
    encode: Notify,
    /// Wakes the dispatcher (items were queued, or shutdown).
    dispatch: Notify,
    stats: Arc<PushStats>,
    metrics: OnceLock<PushMetrics>,
    max_bytes: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn metrics(&self) -> Option<&PushMetrics> {
        self.metrics.get()
    }

    /// Updates the gauges (stats and attached metrics) from `st`.
    fn publish(&self, st: &mut State) {
        let s = &self.stats;
        let now = (st.waiting(), st.in_flight, st.held_bytes);
        s.queued.store(now.0, Ordering::Relaxed);
        s.in_flight.store(now.1, Ordering::Relaxed);
        s.queued_bytes.store(now.2, Ordering::Relaxed);
        s.peak_queued_bytes.fetch_max(now.2, Ordering::Relaxed);
        if let Some(m) = self.metrics().filter(|_| !st.detached) {
            let was = st.published;
            let d = |a: u64, b: u64| gauge(a).saturating_sub(gauge(b));
            m.queue_profiles.add(d(now.0, was.0));
            m.in_flight.add(d(now.1, was.1));
            m.queue_bytes.add(d(now.2, was.2));
        }
        st.published = now;
    }

    fn count_drop(&self, reason: DropReason, profiles: u64, bytes: u64) {
        if profiles == 0 {
            return;
        }
        let i = reason as usize;
        add(&self.stats.dropped[i], profiles);
        add(&self.stats.dropped_bytes[i], bytes);
        if let Some(m) = self.metrics() {
            m.dropped.inc_by(profiles);
            m.dropped_profiles[i].inc_by(profiles);
            m.dropped_bytes[i].inc_by(bytes);
        }
    }

    fn count_sent(&self, bytes: u64) {
        add(&self.stats.sent, 1);
        add(&self.stats.sent_bytes, bytes);
        if let Some(m) = self.metrics() {
            m.sent.inc();
            m.sent_bytes.inc_by(bytes);
        }
    }

    fn count_attempt(&self, took: Duration, failed: bool) {
        if failed {
            add(&self.stats.failed_attempts, 1);
        }
        if let Some(m) = self.metrics() {
            m.upload_seconds.observe(took.as_secs_f64());
            if failed {
                m.failed_attempts.inc();
            }
        }
    }

    /// Drops the oldest queued profiles until what is held fits the bound.
    /// Uploads in flight are not interrupted; they were within the bound
    /// when queued, so the bound holds once the queue is trimmed.
    fn trim(&self, st: &mut State) {
        let (mut n, mut bytes) = (0, 0);
        while st.held_bytes > self.max_bytes {
            let Some(old) = st.items.pop_front() else {
                break;
            };
            st.held_bytes -= old.cost;
            n += 1;
            bytes += old.cost;
        }
        if n > 0 {
            tracing::debug!(
                profiles = n,
                bytes,
                "pyroscope queue full: dropped the oldest profiles"
            );
            self.count_drop(DropReason::QueueFull, n, bytes);
        }
    }
}

/// Pushes windows to Pyroscope from background tasks.
pub struct Pusher {
    shared: Arc<Shared>,
    encoder: Option<JoinHandle<()>>,
    dispatcher: Option<JoinHandle<()>>,
}

impl Pusher {
    /// Checks the configuration, builds the HTTP client and starts the
    /// encoding and sending tasks on the current tokio runtime.
    pub fn spawn(cfg: PyroscopeConfig, stats: Arc<PushStats>) -> Result<Pusher, ExportError> {
        let uploader = Arc::new(Uploader::new(&cfg)?);
        if cfg.max_queue_bytes == 0 {
            return Err(ExportError::Config(
                "pyroscope max_queue_bytes must be at least 1".into(),
            ));
        }
        if cfg.max_concurrent_uploads == 0 {
            return Err(ExportError::Config(
                "pyroscope max_concurrent_uploads must be at least 1".into(),
            ));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ExportError::Config("the Pyroscope pusher needs a tokio runtime".into())
        })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            encode: Notify::new(),
            dispatch: Notify::new(),
            stats,
            metrics: OnceLock::new(),
            max_bytes: cfg.max_queue_bytes,
        });
        let encoder = runtime.spawn(encode_loop(shared.clone(), cfg.application_name.clone()));
        let dispatcher = Dispatcher {
            shared: shared.clone(),
            uploader,
            max_concurrent: cfg.max_concurrent_uploads as u64,
            max_retry: cfg.max_retry,
            backoff: Backoff::new(cfg.backoff_base, cfg.backoff_cap),
            healthy: true,
            failures_since_healthy: 0,
            last_reject_log: None,
            rejects_not_logged: 0,
        };
        let dispatcher = runtime.spawn(dispatcher.run());
        Ok(Pusher {
            shared,
            encoder: Some(encoder),
            dispatcher: Some(dispatcher),
        })
    }

    /// Sends the pusher's counters and gauges to `m` from now on (what
    /// happened before is added at once). Later calls do nothing.
    pub fn attach_metrics(&self, m: PushMetrics) {
        let mut st = self.shared.lock();
        if self.shared.metrics.set(m).is_err() {
            return;
        }
        let Some(m) = self.shared.metrics() else {
            return;
        };
        let s = self.shared.stats.snapshot();
        m.sent.inc_by(s.sent);
        m.sent_bytes.inc_by(s.sent_bytes);
        m.failed_attempts.inc_by(s.failed_attempts);
        m.dropped.inc_by(s.dropped_total());
        for i in 0..DropReason::ALL.len() {
            m.dropped_profiles[i].inc_by(s.dropped[i]);
            m.dropped_bytes[i].inc_by(s.dropped_bytes[i]);
        }
        st.published = (0, 0, 0);
        self.shared.publish(&mut st);
    }

    /// Queues one closed window (every process's profile of it) for
    /// sending; never blocks. Encoding happens on a blocking thread.
    pub fn push_window(&self, profiles: Vec<WindowProfile>) {
        if profiles.is_empty() {
            return;
        }
        let old = {
            let mut st = self.shared.lock();
            add(&self.shared.stats.pushed, profiles.len() as u64);
            st.raw_profiles += profiles.len() as u64;
            st.raw.push_back(profiles);
            let old = if st.raw.len() > MAX_PENDING_WINDOWS {
                st.raw.pop_front()
            } else {
                None
            };
            if let Some(old) = &old {
                st.raw_profiles -= old.len() as u64;
                // Not encoded: its size is unknown, only the profiles count.
                self.shared
                    .count_drop(DropReason::QueueFull, old.len() as u64, 0);
                tracing::warn!(
                    profiles = old.len(),
                    "pyroscope: encoder behind by {MAX_PENDING_WINDOWS} windows, \
                     dropped the oldest"
                );
            }
            self.shared.publish(&mut st);
            old
        };
        // A dropped window (possibly large) is freed outside the lock.
        drop(old);
        self.shared.encode.notify_one();
    }

    /// Queues a single profile, as a window of its own.
    pub fn push(&self, w: WindowProfile) {
        self.push_window(vec![w]);
    }

    /// Profiles waiting to be sent (not counting those being sent).
    pub fn queued(&self) -> usize {
        usize::try_from(self.shared.lock().waiting()).unwrap_or(usize::MAX)
    }

    pub fn stats(&self) -> &Arc<PushStats> {
        &self.shared.stats
    }

    /// Keeps sending what is queued (retrying as usual) until everything
    /// is sent or dropped or `deadline` has passed, then stops the tasks
    /// and reports (and counts as dropped) what was left.
    pub async fn shutdown(mut self, deadline: Duration) -> ShutdownReport {
        self.shared.lock().closing = true;
        self.shared.encode.notify_one();
        self.shared.dispatch.notify_one();
        let finished = match self.dispatcher.take() {
            Some(mut d) => {
                let finished = tokio::time::timeout(deadline, &mut d).await.is_ok();
                if !finished {
                    d.abort();
                    // Wait for the task to stop so the count below is final;
                    // dropping its JoinSet aborts the uploads.
                    let _ = d.await;
                }
                finished
            }
            None => false,
        };
        if let Some(e) = self.encoder.take() {
            e.abort();
            let _ = e.await;
        }
        let unsent = self.abandon();
        if unsent > 0 {
            tracing::warn!(
                unsent,
                "pyroscope: shutdown deadline reached, {unsent} profile(s) not sent"
            );
        }
        ShutdownReport {
            unsent: usize::try_from(unsent).unwrap_or(usize::MAX),
            drained: finished && unsent == 0,
        }
    }

    /// Empties the state once the tasks are stopped; returns (and counts
    /// as dropped) the profiles left in it.
    fn abandon(&self) -> u64 {
        let (left, raw, items) = {
            let mut st = self.shared.lock();
            let left = st.waiting() + st.in_flight;
            let bytes = st.held_bytes;
            self.shared.count_drop(DropReason::Shutdown, left, bytes);
            let raw = std::mem::take(&mut st.raw);
            let items = std::mem::take(&mut st.items);
            st.raw_profiles = 0;
            st.encoding = 0;
            st.in_flight = 0;
            st.held_bytes = 0;
            self.shared.publish(&mut st);
            (left, raw, items)
        };
        drop((raw, items));
        left
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        let running = self.encoder.is_some() || self.dispatcher.is_some();
        for h in [self.encoder.take(), self.dispatcher.take()]
            .into_iter()
            .flatten()
        {
            h.abort();
        }
        if running {
            // Without a shutdown the aborted tasks may still run for a
            // moment; the gauges stop counting this pusher now.
            let mut st = self.shared.lock();
            st.closing = true;
            st.detached = true;
            if let Some(m) = self.shared.metrics() {
                m.queue_profiles.sub(gauge(st.published.0));
                m.in_flight.sub(gauge(st.published.1));
                m.queue_bytes.sub(gauge(st.published.2));
            }
            st.published = (0, 0, 0);
        }
    }
}

/// Encodes pushed windows, one at a time, on a blocking thread, and queues
/// each as a whole.
async fn encode_loop(shared: Arc<Shared>, application_name: String) {
    let mut rng = Rng::new();
    loop {
        let next = {
            let mut st = shared.lock();
            match st.raw.pop_front() {
                Some(w) => {
                    let n = w.len() as u64;
                    st.raw_profiles -= n;
                    st.encoding = n;
                    Some(w)
                }
                None if st.closing => return,
                None => None,
            }
        };
        let Some(window) = next else {
            // A push between the check and here leaves a permit.
            shared.encode.notified().await;
            continue;
        };
        let n = window.len() as u64;
        let app = application_name.clone();
        let seed = rng.next();
        let encoded = tokio::task::spawn_blocking(move || encode_items(&app, window, seed)).await;
        let mut st = shared.lock();
        st.encoding = 0;
        match encoded {
            Ok(items) => {
                for it in &items {
                    st.held_bytes += it.cost;
                }
                st.items.extend(items);
                shared.trim(&mut st);
            }
            Err(e) => {
                tracing::error!("pyroscope: encoding a window failed: {e}");
                shared.count_drop(DropReason::Rejected, n, 0);
            }
        }
        shared.publish(&mut st);
        drop(st);
        shared.dispatch.notify_one();
    }
}

/// The requests of one window's profiles (CPU work: pprof, gzip, multipart).
fn encode_items(app: &str, window: Vec<WindowProfile>, seed: u64) -> Vec<Item> {
    let mut rng = Rng(seed | 1);
    window
        .into_iter()
        .map(|w| {
            let query = query_params(app, &w);
            let pprof = encode_window(&w);
            let (content_type, body) = multipart_body(&pprof, rng.next());
            let query_len: usize = query.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
            let cost = (body.len() + query_len + content_type.len()) as u64 + ITEM_OVERHEAD;
            Item {
                query,
                content_type,
                body: Bytes::from(body),
                cost,
                pid: w.labels.pid,
                service: w.labels.service,
                attempts: 0,
                first_attempt: None,
                not_before: None,
            }
        })
        .collect()
}

/// Result of one upload attempt.
enum Attempt {
    Sent,
    /// Transient: try again later.
    Retry(String),
    /// The server refused it: do not retry.
    Rejected(String),
}

type Uploads = JoinSet<(Item, Attempt, Duration)>;

/// Starts uploads and settles their outcomes: the only place items leave
/// the queue for the network and come back.
struct Dispatcher {
    shared: Arc<Shared>,
    uploader: Arc<Uploader>,
    max_concurrent: u64,
    max_retry: Duration,
    backoff: Backoff,
    /// Whether the last attempt succeeded (to log outages once).
    healthy: bool,
    failures_since_healthy: u64,
    last_reject_log: Option<Instant>,
    rejects_not_logged: u64,
}

impl Dispatcher {
    async fn run(mut self) {
        let mut uploads: Uploads = JoinSet::new();
        // Cost of each running upload, to account for one whose task panics.
        let mut costs: HashMap<tokio::task::Id, u64> = HashMap::new();
        loop {
            let shared = self.shared.clone();
            let wake_at = {
                let mut st = shared.lock();
                let wake_at = self.start_uploads(&mut st, &mut uploads, &mut costs);
                if st.closing && st.idle() {
                    return;
                }
                wake_at
            };
            tokio::select! {
                // A push or shutdown between the lock and here leaves a permit.
                () = self.shared.dispatch.notified() => {}
                Some(done) = uploads.join_next_with_id(), if !uploads.is_empty() => match done {
                    Ok((id, (item, outcome, took))) => {
                        costs.remove(&id);
                        self.settle(item, outcome, took);
                    }
                    Err(e) => {
                        // An upload task panicked: its profile is lost.
                        tracing::error!("pyroscope upload task failed: {e}");
                        let cost = costs.remove(&e.id()).unwrap_or(0);
                        let mut st = self.shared.lock();
                        st.in_flight = st.in_flight.saturating_sub(1);
                        st.held_bytes = st.held_bytes.saturating_sub(cost);
                        self.shared.count_drop(DropReason::Rejected, 1, cost);
                        self.shared.publish(&mut st);
                    }
                },
                () = sleep_until(wake_at), if wake_at.is_some() => {}
            }
        }
    }

    /// Starts every upload that may start now; returns when to look again
    /// if something is waiting only for time to pass.
    fn start_uploads(
        &mut self,
        st: &mut State,
        uploads: &mut Uploads,
        costs: &mut HashMap<tokio::task::Id, u64>,
    ) -> Option<Instant> {
        let now = Instant::now();
        let mut wake_at = None;
        loop {
            if let Some(t) = st.paused_until.filter(|&t| t > now) {
                wake_at = Some(t);
                break;
            }
            // While the server looks down a single upload probes it.
            let limit = if st.circuit_open() {
                1
            } else {
                self.max_concurrent
            };
            if st.in_flight >= limit {
                break;
            }
            // Closed: the oldest item whose own back-off has passed. Open:
            // the oldest item; the global pause has spaced the attempts.
            let pick = if st.circuit_open() {
                (!st.items.is_empty()).then_some(0)
            } else {
                let mut first_wait: Option<Instant> = None;
                let i = st.items.iter().position(|it| match it.not_before {
                    Some(t) if t > now => {
                        first_wait = Some(first_wait.map_or(t, |w| w.min(t)));
                        false
                    }
                    _ => true,
                });
                if i.is_none() {
                    wake_at = first_wait;
                }
                i
            };
            let Some(mut item) = pick.and_then(|i| st.items.remove(i)) else {
                break;
            };
            item.first_attempt.get_or_insert(now);
            st.in_flight += 1;
            let up = self.uploader.clone();
            let cost = item.cost;
            let task = uploads.spawn(async move {
                let t = Instant::now();
                let outcome = up.attempt(&item).await;
                (item, outcome, t.elapsed())
            });
            costs.insert(task.id(), cost);
        }
        self.shared.publish(st);
        wake_at
    }

    /// Counts an upload's outcome; a transient failure goes back to the
    /// queue unless it has been failing for `max_retry`.
    fn settle(&mut self, mut item: Item, outcome: Attempt, took: Duration) {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        st.in_flight -= 1;
        shared.count_attempt(took, matches!(outcome, Attempt::Retry(_)));
        match outcome {
            Attempt::Sent => {
                st.held_bytes -= item.cost;
                shared.count_sent(item.cost);
                server_up(&mut st);
                if !self.healthy {
                    tracing::info!(
                        failed_attempts = self.failures_since_healthy,
                        "pyroscope push recovered"
                    );
                }
                self.healthy = true;
                self.failures_since_healthy = 0;
            }
            Attempt::Rejected(why) => {
                st.held_bytes -= item.cost;
                shared.count_drop(DropReason::Rejected, 1, item.cost);
                // The server answered: it is up, whatever it thought of this.
                server_up(&mut st);
                self.log_rejection(item.pid, &item.service, &why);
            }
            Attempt::Retry(why) => {
                self.failures_since_healthy += 1;
                st.consecutive_failures = st.consecutive_failures.saturating_add(1);
                let now = Instant::now();
                if st.circuit_open() && st.paused_until.is_none_or(|t| t <= now) {
                    // Failures of uploads started before the pause do not
                    // lengthen it: one doubling per probe.
                    let pause = self.backoff.delay(st.pauses);
                    st.pauses = st.pauses.saturating_add(1);
                    st.paused_until = Some(now + pause);
                }
                let own = self.backoff.delay(item.attempts);
                item.attempts = item.attempts.saturating_add(1);
                let next = st.paused_until.map_or(now + own, |p| p.max(now + own));
                let first = item.first_attempt.unwrap_or(now);
                if next.duration_since(first) > self.max_retry {
                    st.held_bytes -= item.cost;
                    shared.count_drop(DropReason::GaveUp, 1, item.cost);
                    tracing::warn!(
                        pid = item.pid,
                        service = %item.service,
                        attempts = item.attempts,
                        "pyroscope push: gave up on a profile after {:?}: {why}",
                        now.duration_since(first)
                    );
                } else {
                    if self.healthy {
                        tracing::warn!("pyroscope push failing, will retry: {why}");
                        self.healthy = false;
                    } else {
                        tracing::debug!(delay = ?(next - now), "pyroscope push failed again: {why}");
                    }
                    item.not_before = Some(next);
                    // Back at the front: it is from the oldest window still
                    // queued (or older).
                    st.items.push_front(item);
                }
            }
        }
        shared.publish(&mut st);
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
            "pyroscope refused a profile, dropped without retry: {why}"
        );
    }
}

/// The server answered: full concurrency again.
fn server_up(st: &mut State) {
    st.consecutive_failures = 0;
    st.pauses = 0;
    st.paused_until = None;
}

async fn sleep_until(t: Option<Instant>) {
    if let Some(t) = t {
        tokio::time::sleep_until(t.into()).await;
    }
}

/// The HTTP side: one client (keep-alive connections shared by all
/// uploads) and the request shape.
struct Uploader {
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

    async fn attempt(&self, item: &Item) -> Attempt {
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
}

/// Exponential back-off with jitter.
struct Backoff {
    base: Duration,
    cap: Duration,
    rng: Rng,
}

impl Backoff {
    fn new(base: Duration, cap: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        Backoff {
            base,
            cap: cap.max(base),
            rng: Rng::new(),
        }
    }

    /// `min(cap, base * 2^attempt)`, drawn uniformly from its upper half.
    fn delay(&mut self, attempt: u32) -> Duration {
        let max = self
            .base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.cap);
        let half = max / 2;
        let span = (max - half).as_nanos() as u64;
        let r = if span == 0 {
            0
        } else {
            self.rng.next() % (span + 1)
        };
        half + Duration::from_nanos(r)
    }
}

/// xorshift64*: jitter and multipart boundaries need no more.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Rng(seed())
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
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
    use crate::model::labels::ProcessLabels;
    use crate::profile::folded::tests::sample_profile;
    use crate::profile::pprof::{self, proto};
    use axum::body::Bytes;
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, Method, Uri};
    use prost::Message as _;
    use std::collections::{BTreeMap, HashMap};
    use std::io::Read as _;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

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
            let _st = self.shared.lock();
            self.shared.stats.snapshot()
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
            wait_until("the window", Duration::from_secs(60), || {
                rec.accepted() == done
            })
            .await;
            let took = t.elapsed();
            println!(
                "one window of {procs} profiles, {concurrency} concurrent uploads, \
                 20 ms per request: {took:?}"
            );
            // Serial uploads would take procs * 20 ms.
            let serial = Duration::from_millis(20) * procs;
            assert!(took < serial / 3, "{took:?}");
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
    fn backoff_doubles_with_jitter_up_to_cap() {
        let mut s = Backoff::new(DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP);
        for _ in 0..50 {
            let d: Vec<Duration> = (0..8).map(|a| s.delay(a)).collect();
            for (a, d) in d.iter().enumerate() {
                let max = Duration::from_secs(1 << a).min(Duration::from_secs(30));
                assert!(*d >= max / 2 && *d <= max, "attempt {a}: {d:?}");
            }
        }
        assert!(s.delay(u32::MAX) <= Duration::from_secs(30));
        // Jitter actually varies.
        let xs: std::collections::HashSet<Duration> = (0..20).map(|_| s.delay(3)).collect();
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
