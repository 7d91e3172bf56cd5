//! The delivery machinery every network exporter shares (Pyroscope, OTLP):
//! windows in, requests out, with bounded memory, retries and counted losses.
//!
//! - [`Pusher::push_window`] hands a closed window (every process's profile)
//!   to the encoder task and returns; it never blocks.
//! - The encoder turns the window into requests (the exporter's
//!   [`Encode`] function) on a blocking thread, then appends them to the
//!   queue at once. The queue is bounded in bytes
//!   ([`PushSettings::max_queue_bytes`], counting what is in flight too):
//!   beyond it the oldest requests are dropped.
//! - The dispatcher sends queued requests oldest first, at most
//!   `max_concurrent` at a time, through the exporter's [`Transport`]. A
//!   transient failure goes back to the queue with its own exponential
//!   back-off (or the server's `Retry-After`), and is given up after
//!   `max_retry`. After [`CIRCUIT_THRESHOLD`] consecutive failures the
//!   server is taken as down: sending pauses as a whole (growing pauses with
//!   jitter) and then a single request probes it, so an outage costs one
//!   request per pause rather than one per slot; the first success restores
//!   full concurrency.
//!
//! Losses are counted in profiles (one per process and window) by
//! [`DropReason`]: a request carrying several profiles counts each.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub use super::pprof_dir::ExportError;
pub use crate::daemon::metrics::DropReason;
use crate::daemon::metrics::PushMetrics;
use crate::daemon::WindowProfile;

pub mod backoff;
mod dispatch;
pub mod http;
mod queue;

use dispatch::Dispatcher;
use queue::{gauge, Shared, State};

/// Consecutive failed attempts (across all requests) after which the server
/// is taken as down and sending pauses as a whole.
pub const CIRCUIT_THRESHOLD: u32 = 3;
/// Windows waiting for the encoder; beyond it the oldest waiting window is
/// dropped. Encoding takes far less than a window lasts, so only a starved
/// host gets here, and then queuing more raw windows would not help.
pub const MAX_PENDING_WINDOWS: usize = 8;
/// The longest `Retry-After` honoured: a server asking for more is retried
/// sooner rather than holding the queue for longer.
pub const MAX_SERVER_DELAY: Duration = Duration::from_secs(300);
const REASONS: usize = DropReason::ALL.len();

/// Result of one attempt to send a request.
#[derive(Debug)]
pub enum Attempt {
    Sent,
    /// Accepted, but the server says it dropped `rejected` of the request's
    /// profiles (OTLP partial success); `message` is its explanation.
    Partial {
        rejected: u64,
        message: String,
    },
    /// Transient: try again, not before `after` if the server said so.
    Retry {
        why: String,
        after: Option<Duration>,
    },
    /// The server refused it: do not retry.
    Rejected(String),
}

/// How requests reach the server.
pub trait Transport: Send + Sync + 'static {
    /// One encoded request, resent as is on retries.
    type Payload: Send + Sync + 'static;
    fn send<'a>(
        &'a self,
        payload: &'a Self::Payload,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>>;
}

/// One request as the encoder made it.
pub struct Encoded<P> {
    pub payload: P,
    /// What it counts against `max_queue_bytes`: its bytes and a fixed
    /// overhead, so that many tiny requests are bounded too.
    pub cost: u64,
    /// Profiles (process windows) it carries, at least 1.
    pub profiles: u64,
    /// Who it is about, for logs (`pid 42 (web)`, `12 processes`).
    pub about: String,
}

/// Turns a window into requests (CPU work, run on a blocking thread); the
/// `u64` is a fresh random number for whatever needs one.
pub type Encode<P> = Arc<dyn Fn(Vec<WindowProfile>, u64) -> Vec<Encoded<P>> + Send + Sync>;

/// How a [`Pusher`] queues and retries.
#[derive(Clone, Debug)]
pub struct PushSettings {
    /// In logs: `pyroscope`, `otlp`.
    pub name: &'static str,
    /// Bytes held for sending (queued or in flight), at least 1.
    pub max_queue_bytes: u64,
    /// Requests in progress at once, at least 1.
    pub max_concurrent: usize,
    /// A request still failing this long after its first attempt is given up.
    pub max_retry: Duration,
    /// First retry delay; doubles per attempt up to `backoff_cap`. Each delay
    /// is drawn uniformly from [d/2, d]. The same schedule spaces the global
    /// pauses while the server is down.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

/// Counters of a pusher, in profiles unless named `bytes` or `attempts`.
/// Every profile pushed ends up in exactly one of `sent` and `dropped`,
/// unless it is still held: `pushed == sent + Σ dropped + queued + in_flight`.
#[derive(Debug, Default)]
pub struct PushStats {
    /// Profiles handed to [`Pusher::push_window`].
    pub pushed: AtomicU64,
    /// Profiles accepted by the server.
    pub sent: AtomicU64,
    /// Queue bytes of the requests accepted.
    pub sent_bytes: AtomicU64,
    /// Attempts that failed transiently and were retried or given up.
    pub failed_attempts: AtomicU64,
    /// Answers that were partial successes (some profiles rejected, or a
    /// warning from the server).
    pub partial: AtomicU64,
    /// By [`DropReason`], in [`DropReason::ALL`] order.
    pub dropped: [AtomicU64; REASONS],
    pub dropped_bytes: [AtomicU64; REASONS],
    /// Held now: waiting for the encoder, queued or waiting to retry.
    pub queued: AtomicU64,
    /// Held now: profiles in requests being sent.
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
    pub partial: u64,
    pub dropped: [u64; REASONS],
    pub dropped_bytes: [u64; REASONS],
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
            partial: g(&self.partial),
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

/// Pushes windows from background tasks.
pub struct Pusher<T: Transport> {
    shared: Arc<Shared<T::Payload>>,
    encoder: Option<JoinHandle<()>>,
    dispatcher: Option<JoinHandle<()>>,
}

impl<T: Transport> Pusher<T> {
    /// Checks the settings and starts the encoding and sending tasks on the
    /// current tokio runtime.
    pub fn spawn(
        settings: PushSettings,
        transport: T,
        encode: Encode<T::Payload>,
        stats: Arc<PushStats>,
    ) -> Result<Self, ExportError> {
        let name = settings.name;
        if settings.max_queue_bytes == 0 {
            return Err(ExportError::Config(format!(
                "{name} max_queue_bytes must be at least 1"
            )));
        }
        if settings.max_concurrent == 0 {
            return Err(ExportError::Config(format!(
                "{name}: at least one request at a time must be allowed"
            )));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ExportError::Config(format!("the {name} exporter needs a tokio runtime"))
        })?;
        let shared = Arc::new(Shared {
            name,
            state: Mutex::new(State::default()),
            encode: Notify::new(),
            dispatch: Notify::new(),
            stats,
            metrics: OnceLock::new(),
            max_bytes: settings.max_queue_bytes,
        });
        let encoder = runtime.spawn(dispatch::encode_loop(shared.clone(), encode));
        let dispatcher = Dispatcher::new(shared.clone(), Arc::new(transport), &settings);
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
        if let Some(p) = &m.partial {
            p.inc_by(s.partial);
        }
        m.dropped.inc_by(s.dropped_total());
        for i in 0..REASONS {
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
            queue::add(&self.shared.stats.pushed, profiles.len() as u64);
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
                    "{}: encoder behind by {MAX_PENDING_WINDOWS} windows, dropped the oldest",
                    self.shared.name
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

    /// Whether every window pushed so far has been encoded (or dropped):
    /// tests whose counts assume encoded windows wait for it, as the
    /// encoder may lag on a starved host.
    #[cfg(test)]
    pub fn encoder_idle(&self) -> bool {
        let st = self.shared.lock();
        st.raw.is_empty() && st.encoding == 0
    }

    /// The counters at one instant (they change under the lock only).
    pub fn consistent_stats(&self) -> PushStatsSnapshot {
        let _st = self.shared.lock();
        self.shared.stats.snapshot()
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
                    // dropping its JoinSet aborts the requests.
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
                "{}: shutdown deadline reached, {unsent} profile(s) not sent",
                self.shared.name
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
            let left = st.waiting() + st.in_flight_profiles;
            let bytes = st.held_bytes;
            self.shared.count_drop(DropReason::Shutdown, left, bytes);
            let raw = std::mem::take(&mut st.raw);
            let items = std::mem::take(&mut st.items);
            st.raw_profiles = 0;
            st.encoding = 0;
            st.queued_profiles = 0;
            st.in_flight = 0;
            st.in_flight_profiles = 0;
            st.held_bytes = 0;
            self.shared.publish(&mut st);
            (left, raw, items)
        };
        drop((raw, items));
        left
    }
}

impl<T: Transport> Drop for Pusher<T> {
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
