//! The two tasks of a pusher: the encoder (windows to requests) and the
//! dispatcher (requests to the server, and their outcomes back).
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::backoff::{Backoff, Rng};
use super::queue::{Item, Shared, State};
use super::{Attempt, DropReason, Encode, PushSettings, Transport, MAX_SERVER_DELAY};

/// At most one "rejected" warning per this long (the rest are counted).
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Encodes pushed windows, one at a time, on a blocking thread, and queues
/// each as a whole.
pub async fn encode_loop<P: Send + Sync + 'static>(shared: Arc<Shared<P>>, encode: Encode<P>) {
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
        let f = encode.clone();
        let seed = rng.next_u64();
        let encoded = tokio::task::spawn_blocking(move || f(window, seed)).await;
        let mut st = shared.lock();
        st.encoding = 0;
        match encoded {
            Ok(reqs) => {
                let carried: u64 = reqs.iter().map(|r| r.profiles).sum();
                // A profile the encoder left out (none should be) is a loss.
                shared.count_drop(DropReason::Rejected, n.saturating_sub(carried), 0);
                for r in reqs {
                    st.push_back(Item::from(r));
                }
                shared.trim(&mut st);
            }
            Err(e) => {
                tracing::error!("{}: encoding a window failed: {e}", shared.name);
                shared.count_drop(DropReason::Rejected, n, 0);
            }
        }
        shared.publish(&mut st);
        drop(st);
        shared.dispatch.notify_one();
    }
}

type Outcome<P> = (Item<P>, Attempt, Duration);

/// Starts requests and settles their outcomes: the only place items leave
/// the queue for the network and come back.
pub struct Dispatcher<T: Transport> {
    shared: Arc<Shared<T::Payload>>,
    transport: Arc<T>,
    max_concurrent: u64,
    max_retry: Duration,
    backoff: Backoff,
    /// Whether the last attempt succeeded (to log outages once).
    healthy: bool,
    failures_since_healthy: u64,
    last_reject_log: Option<Instant>,
    rejects_not_logged: u64,
}

/// Cost and profiles of each running request, to account for one whose
/// task panics.
type Running = HashMap<tokio::task::Id, (u64, u64)>;

impl<T: Transport> Dispatcher<T> {
    pub fn new(shared: Arc<Shared<T::Payload>>, transport: Arc<T>, s: &PushSettings) -> Self {
        Dispatcher {
            shared,
            transport,
            max_concurrent: s.max_concurrent as u64,
            max_retry: s.max_retry,
            backoff: Backoff::new(s.backoff_base, s.backoff_cap),
            healthy: true,
            failures_since_healthy: 0,
            last_reject_log: None,
            rejects_not_logged: 0,
        }
    }

    pub async fn run(mut self) {
        let mut sends: JoinSet<Outcome<T::Payload>> = JoinSet::new();
        let mut running = Running::new();
        loop {
            let shared = self.shared.clone();
            let wake_at = {
                let mut st = shared.lock();
                let wake_at = self.start_sends(&mut st, &mut sends, &mut running);
                if st.closing && st.idle() {
                    return;
                }
                wake_at
            };
            tokio::select! {
                // A push or shutdown between the lock and here leaves a permit.
                () = self.shared.dispatch.notified() => {}
                Some(done) = sends.join_next_with_id(), if !sends.is_empty() => match done {
                    Ok((id, (item, outcome, took))) => {
                        running.remove(&id);
                        self.settle(item, outcome, took);
                    }
                    Err(e) => {
                        // A send task panicked: its profiles are lost.
                        tracing::error!("{} send task failed: {e}", self.shared.name);
                        let (cost, profiles) = running.remove(&e.id()).unwrap_or((0, 0));
                        let mut st = self.shared.lock();
                        st.returned(profiles);
                        st.held_bytes = st.held_bytes.saturating_sub(cost);
                        self.shared.count_drop(DropReason::Rejected, profiles, cost);
                        self.shared.publish(&mut st);
                    }
                },
                () = sleep_until(wake_at), if wake_at.is_some() => {}
            }
        }
    }

    /// Starts every request that may start now; returns when to look again
    /// if something is waiting only for time to pass.
    fn start_sends(
        &mut self,
        st: &mut State<T::Payload>,
        sends: &mut JoinSet<Outcome<T::Payload>>,
        running: &mut Running,
    ) -> Option<Instant> {
        let now = Instant::now();
        let mut wake_at = None;
        loop {
            if let Some(t) = st.paused_until.filter(|&t| t > now) {
                wake_at = Some(t);
                break;
            }
            // While the server looks down a single request probes it.
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
            let Some(mut item) = pick.and_then(|i| st.start(i)) else {
                break;
            };
            item.first_attempt.get_or_insert(now);
            let t = self.transport.clone();
            let held = (item.req.cost, item.req.profiles);
            let task = sends.spawn(async move {
                let started = Instant::now();
                let outcome = t.send(&item.req.payload).await;
                (item, outcome, started.elapsed())
            });
            running.insert(task.id(), held);
        }
        self.shared.publish(st);
        wake_at
    }

    /// Counts a request's outcome; a transient failure goes back to the
    /// queue unless it has been failing for `max_retry`.
    fn settle(&mut self, mut item: Item<T::Payload>, outcome: Attempt, took: Duration) {
        let shared = self.shared.clone();
        let name = shared.name;
        let mut st = shared.lock();
        let (cost, profiles) = (item.req.cost, item.req.profiles);
        st.returned(profiles);
        shared.count_attempt(took, matches!(outcome, Attempt::Retry { .. }));
        match outcome {
            Attempt::Sent | Attempt::Partial { .. } => {
                st.held_bytes -= cost;
                let rejected = match &outcome {
                    Attempt::Partial { rejected, message } => {
                        shared.count_partial();
                        let rejected = (*rejected).min(profiles);
                        self.log_partial(&item.req.about, rejected, message);
                        rejected
                    }
                    _ => 0,
                };
                shared.count_sent(profiles - rejected, cost);
                shared.count_drop(DropReason::PartiallyRejected, rejected, 0);
                st.server_up();
                if !self.healthy {
                    tracing::info!(
                        failed_attempts = self.failures_since_healthy,
                        "{name} export recovered"
                    );
                }
                self.healthy = true;
                self.failures_since_healthy = 0;
            }
            Attempt::Rejected(why) => {
                st.held_bytes -= cost;
                shared.count_drop(DropReason::Rejected, profiles, cost);
                // The server answered: it is up, whatever it thought of this.
                st.server_up();
                self.log_rejection(&item.req.about, &why);
            }
            Attempt::Retry { why, after } => {
                self.failures_since_healthy += 1;
                st.consecutive_failures = st.consecutive_failures.saturating_add(1);
                let now = Instant::now();
                let asked = after.map(|a| a.min(MAX_SERVER_DELAY));
                if st.circuit_open() && st.paused_until.is_none_or(|t| t <= now) {
                    // Failures of requests started before the pause do not
                    // lengthen it: one doubling per probe.
                    let pause = self.backoff.delay(st.pauses).max(asked.unwrap_or_default());
                    st.pauses = st.pauses.saturating_add(1);
                    st.paused_until = Some(now + pause);
                }
                let own = self
                    .backoff
                    .delay(item.attempts)
                    .max(asked.unwrap_or_default());
                item.attempts = item.attempts.saturating_add(1);
                let next = st.paused_until.map_or(now + own, |p| p.max(now + own));
                let first = item.first_attempt.unwrap_or(now);
                if next.duration_since(first) > self.max_retry {
                    st.held_bytes -= cost;
                    shared.count_drop(DropReason::GaveUp, profiles, cost);
                    tracing::warn!(
                        about = %item.req.about,
                        attempts = item.attempts,
                        "{name} export: gave up after {:?}: {why}",
                        now.duration_since(first)
                    );
                } else {
                    if self.healthy {
                        tracing::warn!("{name} export failing, will retry: {why}");
                        self.healthy = false;
                    } else {
                        tracing::debug!(delay = ?(next - now), "{name} export failed again: {why}");
                    }
                    item.not_before = Some(next);
                    st.requeue(item);
                }
            }
        }
        shared.publish(&mut st);
    }

    /// Whether a warning may be logged now (at most one per
    /// [`REJECT_LOG_INTERVAL`]); counts the ones held back.
    fn may_log(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last_reject_log
            .is_some_and(|t| now.duration_since(t) < REJECT_LOG_INTERVAL)
        {
            self.rejects_not_logged += 1;
            return None;
        }
        self.last_reject_log = Some(now);
        Some(std::mem::take(&mut self.rejects_not_logged))
    }

    fn log_rejection(&mut self, about: &str, why: &str) {
        if let Some(also) = self.may_log() {
            tracing::warn!(
                about,
                also_refused_since_last_log = also,
                "{} refused a request, dropped without retry: {why}",
                self.shared.name
            );
        }
    }

    fn log_partial(&mut self, about: &str, rejected: u64, message: &str) {
        if let Some(also) = self.may_log() {
            tracing::warn!(
                about,
                rejected,
                also_refused_since_last_log = also,
                "{} accepted a request partially: {message}",
                self.shared.name
            );
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    if let Some(t) = t {
        tokio::time::sleep_until(t.into()).await;
    }
}
