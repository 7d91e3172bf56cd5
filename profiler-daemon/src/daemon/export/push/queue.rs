//! The state the encoder, the dispatcher and the pusher share, and the
//! counting that keeps it consistent with the stats and metrics.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{DropReason, Encoded, PushStats, CIRCUIT_THRESHOLD};
use crate::daemon::metrics::PushMetrics;
use crate::daemon::WindowProfile;

pub fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

pub fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One request, ready to send (and resend).
pub struct Item<P> {
    pub req: Encoded<P>,
    /// Failed attempts so far.
    pub attempts: u32,
    pub first_attempt: Option<Instant>,
    /// Not to be retried before then (its own back-off).
    pub not_before: Option<Instant>,
}

impl<P> From<Encoded<P>> for Item<P> {
    fn from(req: Encoded<P>) -> Self {
        Item {
            req,
            attempts: 0,
            first_attempt: None,
            not_before: None,
        }
    }
}

/// Changed under [`Shared::lock`] only, so the counters and gauges stay
/// consistent.
pub struct State<P> {
    /// Windows waiting for the encoder, oldest first.
    pub raw: VecDeque<Vec<WindowProfile>>,
    /// Profiles in `raw`.
    pub raw_profiles: u64,
    /// Profiles the encoder is working on.
    pub encoding: u64,
    /// Encoded requests to send, oldest window first.
    pub items: VecDeque<Item<P>>,
    /// Profiles in `items`.
    pub queued_profiles: u64,
    /// Requests being sent, and the profiles they carry.
    pub in_flight: u64,
    pub in_flight_profiles: u64,
    /// Bytes of `items` and of the requests in flight.
    pub held_bytes: u64,
    /// Failed attempts since the last success or rejection.
    pub consecutive_failures: u32,
    /// Global pauses since the server was last seen up.
    pub pauses: u32,
    /// No request starts before then (the server looks down).
    pub paused_until: Option<Instant>,
    /// Shutting down: the tasks exit once everything is sent.
    pub closing: bool,
    /// Gauge values last added to the attached metrics (this pusher's share
    /// of them, as an old pusher may still be draining after a reload).
    pub published: (u64, u64, u64),
    /// Dropped without a shutdown: the gauges no longer count this pusher.
    pub detached: bool,
}

impl<P> Default for State<P> {
    fn default() -> Self {
        State {
            raw: VecDeque::new(),
            raw_profiles: 0,
            encoding: 0,
            items: VecDeque::new(),
            queued_profiles: 0,
            in_flight: 0,
            in_flight_profiles: 0,
            held_bytes: 0,
            consecutive_failures: 0,
            pauses: 0,
            paused_until: None,
            closing: false,
            published: (0, 0, 0),
            detached: false,
        }
    }
}

impl<P> State<P> {
    /// Profiles waiting: for the encoder, being encoded, or queued.
    pub fn waiting(&self) -> u64 {
        self.raw_profiles + self.encoding + self.queued_profiles
    }

    pub fn idle(&self) -> bool {
        self.waiting() == 0 && self.in_flight == 0
    }

    /// The server is taken as down.
    pub fn circuit_open(&self) -> bool {
        self.consecutive_failures >= CIRCUIT_THRESHOLD
    }

    pub fn push_back(&mut self, it: Item<P>) {
        self.held_bytes += it.req.cost;
        self.queued_profiles += it.req.profiles;
        self.items.push_back(it);
    }

    /// Puts a request that failed back at the front: it is from the oldest
    /// window still queued (or older). Its bytes are still held.
    pub fn requeue(&mut self, it: Item<P>) {
        self.queued_profiles += it.req.profiles;
        self.items.push_front(it);
    }

    /// Takes item `i` out of the queue to send it.
    pub fn start(&mut self, i: usize) -> Option<Item<P>> {
        let it = self.items.remove(i)?;
        self.queued_profiles -= it.req.profiles;
        self.in_flight += 1;
        self.in_flight_profiles += it.req.profiles;
        Some(it)
    }

    /// A request came back (whatever happened to it).
    pub fn returned(&mut self, profiles: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.in_flight_profiles = self.in_flight_profiles.saturating_sub(profiles);
    }

    /// The server answered: full concurrency again.
    pub fn server_up(&mut self) {
        self.consecutive_failures = 0;
        self.pauses = 0;
        self.paused_until = None;
    }
}

pub struct Shared<P> {
    pub name: &'static str,
    pub state: Mutex<State<P>>,
    /// Wakes the encoder (a window was pushed, or shutdown).
    pub encode: Notify,
    /// Wakes the dispatcher (items were queued, or shutdown).
    pub dispatch: Notify,
    pub stats: Arc<PushStats>,
    pub metrics: OnceLock<PushMetrics>,
    pub max_bytes: u64,
}

impl<P> Shared<P> {
    pub fn lock(&self) -> MutexGuard<'_, State<P>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn metrics(&self) -> Option<&PushMetrics> {
        self.metrics.get()
    }

    /// Updates the gauges (stats and attached metrics) from `st`.
    pub fn publish(&self, st: &mut State<P>) {
        let s = &self.stats;
        let now = (st.waiting(), st.in_flight, st.held_bytes);
        s.queued.store(now.0, Ordering::Relaxed);
        s.in_flight.store(st.in_flight_profiles, Ordering::Relaxed);
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

    pub fn count_drop(&self, reason: DropReason, profiles: u64, bytes: u64) {
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

    pub fn count_sent(&self, profiles: u64, bytes: u64) {
        add(&self.stats.sent, profiles);
        add(&self.stats.sent_bytes, bytes);
        if let Some(m) = self.metrics() {
            m.sent.inc_by(profiles);
            m.sent_bytes.inc_by(bytes);
        }
    }

    pub fn count_partial(&self) {
        add(&self.stats.partial, 1);
        if let Some(p) = self.metrics().and_then(|m| m.partial.as_ref()) {
            p.inc();
        }
    }

    pub fn count_attempt(&self, took: Duration, failed: bool) {
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

    /// Drops the oldest queued requests until what is held fits the bound.
    /// Requests in flight are not interrupted; they were within the bound
    /// when queued, so the bound holds once the queue is trimmed.
    pub fn trim(&self, st: &mut State<P>) {
        let (mut n, mut bytes) = (0, 0);
        while st.held_bytes > self.max_bytes {
            let Some(old) = st.items.pop_front() else {
                break;
            };
            st.held_bytes -= old.req.cost;
            st.queued_profiles -= old.req.profiles;
            n += old.req.profiles;
            bytes += old.req.cost;
        }
        if n > 0 {
            tracing::debug!(
                profiles = n,
                bytes,
                "{} queue full: dropped the oldest profiles",
                self.name
            );
            self.count_drop(DropReason::QueueFull, n, bytes);
        }
    }
}
