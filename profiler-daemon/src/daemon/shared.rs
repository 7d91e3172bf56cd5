//! State the sampling loop shares with the HTTP API.
use crate::store::unix_secs;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use super::metrics::Metrics;
use crate::bpf::events::RawSample;
use crate::model::api::ApiSource;
use crate::model::query::{checked_top_seconds, top_span, ProcessView, QueryError, Selector};
use crate::model::top::{self as model, Header, TopQuery, TopSnapshot};
use crate::native::service::NativeService;
use crate::profile::{Profile, ProfileKind};
use crate::store::Store;

/// The store, the metrics and readiness, behind one `Arc`.
pub struct Shared {
    store: Mutex<Store>,
    pub metrics: Metrics,
    ready: Mutex<Result<(), String>>,
    /// When sampling started: the start of `top`'s whole-run window.
    started: SystemTime,
    /// `epoch`: when this was made; `last_drain_ms`: milliseconds after it
    /// that ingest last drained the ring buffer.
    epoch: Instant,
    last_drain_ms: AtomicU64,
    /// Bytes one `/profile` request may spell its stacks out into.
    max_query_bytes: AtomicUsize,
    /// `api.show_cmdline`: `/processes` shows command lines.
    show_cmdline: AtomicBool,
    /// `api.allowed_hosts`, lowercased.
    allowed_hosts: Mutex<Vec<String>>,
    /// Unwinds the user stacks samples carry, before the store is locked.
    native: Option<Arc<NativeService>>,
}

/// What `/processes` shows for a command line unless `api.show_cmdline`.
pub const REDACTED: &str = "[redacted]";

/// [`Shared::max_query_bytes`] until set: `api.max_query_mib`'s default.
const DEFAULT_MAX_QUERY_BYTES: usize = 64 << 20;

/// Longest time without a drain before `/healthz` says ingest is stalled:
/// the loop drains at least every 200 ms, and a window flush or a burst of
/// inspections takes well under a second.
pub const MAX_DRAIN_GAP: Duration = Duration::from_secs(10);

impl Shared {
    pub fn new(store: Store, metrics: Metrics) -> Self {
        Shared {
            native: store.native_service(),
            store: Mutex::new(store),
            metrics,
            ready: Mutex::new(Err("starting: first process scan not done".into())),
            started: SystemTime::now(),
            epoch: Instant::now(),
            last_drain_ms: AtomicU64::new(0),
            max_query_bytes: AtomicUsize::new(DEFAULT_MAX_QUERY_BYTES),
            show_cmdline: AtomicBool::new(false),
            allowed_hosts: Mutex::new(Vec::new()),
        }
    }

    /// Applies the `api:` settings.
    pub fn set_api(&self, api: &crate::daemon::config::Api) {
        self.set_max_query_bytes(api.max_query_bytes());
        self.show_cmdline.store(api.show_cmdline, Ordering::Relaxed);
        *self.allowed_hosts.lock().unwrap_or_else(|p| p.into_inner()) = api.allowed_hosts.clone();
    }

    /// Sets the memory one `/profile` request may use (`api.max_query_mib`).
    pub fn set_max_query_bytes(&self, bytes: usize) {
        self.max_query_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Ingest drained the ring buffer now.
    pub fn note_drain(&self) {
        let ms = self.epoch.elapsed().as_millis();
        self.last_drain_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// `Ok` if ingest drained the ring buffer within `max_gap`.
    pub fn check_drained_within(&self, max_gap: Duration) -> Result<(), String> {
        let gap = self.since_drain();
        if gap > max_gap {
            return Err(format!(
                "ingest stalled: the sample ring buffer was last drained {:.1} s ago",
                gap.as_secs_f64()
            ));
        }
        Ok(())
    }

    /// Time since ingest last drained the ring buffer (since start if never).
    pub fn since_drain(&self) -> Duration {
        let last = Duration::from_millis(self.last_drain_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// When sampling started.
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// `(drops, errors)` for `top`'s header, from the BPF counters the main
    /// loop copies into the metrics every second: samples lost to a full
    /// ring buffer, and stack walks ended by a failed read or tail call.
    pub fn bpf_drops_and_errors(&self) -> (u64, u64) {
        bpf_drops_and_errors(&self.metrics.registry().gather())
    }

    /// The store; a panic while it was held cannot leave it half-updated in a
    /// way that matters more than stopping the daemon would, so poisoning is
    /// ignored.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a batch of samples (all counted at `now`). New stacks are
    /// symbolised between two short holds of the store lock, not under it:
    /// that reads code objects from the targets, which under load (many new
    /// stacks) would stall the HTTP API. A batch of known stacks takes the
    /// lock once.
    pub fn add_samples(&self, samples: impl IntoIterator<Item = RawSample>, now: SystemTime) {
        // Unwinding reads the targets' files: not under the lock either.
        let samples = NativeService::unwound(self.native.as_deref(), samples);
        let pending = self.store().begin_batch(samples, now);
        if pending.is_empty() {
            return;
        }
        let resolved = pending.resolve();
        self.store().insert(resolved);
    }

    pub fn set_ready(&self, r: Result<(), String>) {
        *self.ready.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }
}

impl ApiSource for Shared {
    /// Command lines redacted unless `api.show_cmdline`.
    fn processes(&self) -> Vec<ProcessView> {
        let mut views = self.store().views();
        if !self.show_cmdline.load(Ordering::Relaxed) {
            for v in &mut views {
                if !v.labels.cmdline.is_empty() {
                    v.labels.cmdline = REDACTED.to_string();
                }
            }
        }
        views
    }

    /// A service's processes are queried one at a time, each under its
    /// own hold of the store lock (see `top`), and spelled out with the lock
    /// released. The stacks spelled out are held to `api.max_query_mib`,
    /// checked before each process is.
    fn profile(&self, selector: &Selector, seconds: u32) -> Result<Profile, QueryError> {
        let kind = self.store().kind();
        self.profile_of(selector, seconds, kind)
    }

    fn profile_of(
        &self,
        selector: &Selector,
        seconds: u32,
        kind: ProfileKind,
    ) -> Result<Profile, QueryError> {
        let now = SystemTime::now();
        let budget = self.max_query_bytes.load(Ordering::Relaxed);
        let pids = match selector {
            Selector::Pid(pid) => vec![*pid],
            Selector::Service(_) => self.store().selected(selector),
        };
        let mut merged: Option<Profile> = None;
        let mut spent = 0usize;
        for pid in pids {
            let one = match self
                .store()
                .query_kind(&Selector::Pid(pid), seconds, now, kind)
            {
                Ok(c) => c,
                // The pid asked for: say why (not found, bad seconds).
                Err(e) if matches!(selector, Selector::Pid(_)) => return Err(e),
                // Gone meanwhile (expired): it has nothing left to add.
                Err(_) => continue,
            };
            spent = spent.saturating_add(one.expanded_bytes());
            if spent > budget {
                return Err(QueryError::TooLarge(format!(
                    "this profile would take more than {} MiB to build (api.max_query_mib is \
                     {}): ask for fewer seconds or a single pid",
                    spent.div_ceil(1 << 20),
                    budget >> 20
                )));
            }
            let p = one.to_profile();
            match merged.as_mut() {
                None => merged = Some(p),
                Some(m) => {
                    for (stack, n) in p.stacks {
                        m.add(stack, n);
                    }
                }
            }
        }
        match merged {
            Some(m) => Ok(m),
            // Nothing selected: the store says why (not found, bad seconds).
            None => self
                .store()
                .query_kind(selector, seconds, now, kind)
                .map(|c| c.to_profile()),
        }
    }

    fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    fn ready(&self) -> Result<(), String> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn live(&self) -> Result<(), String> {
        self.check_drained_within(MAX_DRAIN_GAP)
    }

    fn retention_secs(&self) -> u32 {
        self.store().retention_secs()
    }

    fn host_allowed(&self, host: &str) -> bool {
        self.allowed_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
    }

    /// Takes the store lock once per process, not for the whole snapshot,
    /// so that a query of every process over the whole retention never
    /// holds up ingest for longer than one process's share.
    fn top(&self, q: &TopQuery) -> Result<TopSnapshot, QueryError> {
        let now = SystemTime::now();
        let (drops, errors) = self.bpf_drops_and_errors();
        let (retention, rate_hz, views, profiled, types) = {
            let store = self.store();
            (
                store.retention_secs(),
                store.rate_hz(),
                store.views(),
                store.processes_profiled() as u64,
                store.types().to_vec(),
            )
        };
        if !types.contains(&q.kind) {
            let names: Vec<&str> = types.iter().map(|k| k.name()).collect();
            return Err(QueryError::BadRequest(format!(
                "profile type {} is not enabled; enabled: {}",
                q.kind.name(),
                names.join(", ")
            )));
        }
        let seconds = checked_top_seconds(q.seconds, retention)?;
        let span = top_span(seconds, retention);
        let now_s = unix_secs(now);
        let elapsed = now
            .duration_since(self.started)
            .map_or(0, |d| d.as_secs_f64().ceil() as u64);
        let mut per_process = Vec::new();
        for v in views.iter().filter(|v| q.selects(&v.labels)) {
            // Gone since `views` (expired): nothing to show for it.
            if let Ok(p) = self
                .store()
                .query_kind(&Selector::Pid(v.labels.pid), span, now, q.kind)
            {
                per_process.push((v.labels.clone(), p));
            }
        }
        // Samples per second over the last complete seconds (up to 3).
        let k = elapsed.clamp(1, 3);
        let recent = self.store().samples_between(now_s.saturating_sub(k), now_s);
        let header = Header {
            rate_hz: if views.is_empty() { 0 } else { rate_hz },
            samples_per_sec: recent as f64 / k as f64,
            processes_profiled: profiled,
            drops,
            errors,
            window_secs: match q.seconds {
                Some(s) => s,
                None => u32::try_from(elapsed.max(1))
                    .unwrap_or(u32::MAX)
                    .min(seconds),
            },
        };
        let mut snap = model::snapshot(&per_process, q, &header);
        snap.kind = q.kind.name().to_string();
        snap.types = types.iter().map(|k| k.name().to_string()).collect();
        // GIL contention since each process was first profiled.
        for row in &mut snap.processes {
            let Some(v) = views.iter().find(|v| v.labels.pid == row.pid) else {
                continue;
            };
            if let (Some(gil), Some(wall)) = (v.gil_wait_seconds, v.wall_seconds) {
                if wall > 0.0 {
                    row.gil_wait_permille = Some((1000.0 * gil / wall).round().min(1000.0) as u32);
                }
            }
        }
        Ok(snap)
    }
}

/// `(drops, errors)` from gathered metrics: `pyebpf_bpf_events_total` with
/// outcome `ringbuf_full`, and with outcomes `read_failed` and
/// `tail_call_failed`.
fn bpf_drops_and_errors(families: &[prometheus::proto::MetricFamily]) -> (u64, u64) {
    let (mut drops, mut errors) = (0, 0);
    for mf in families
        .iter()
        .filter(|mf| mf.name() == "pyebpf_bpf_events_total")
    {
        for m in &mf.metric {
            let value = m.counter.value() as u64;
            let outcome = m
                .label
                .iter()
                .find(|l| l.name() == "outcome")
                .map(|l| l.value());
            match outcome {
                Some("ringbuf_full") => drops += value,
                Some("read_failed") | Some("tail_call_failed") => errors += value,
                _ => {}
            }
        }
    }
    (drops, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::counters::Counters;
    use crate::model::labels::ProcessLabels;
    use crate::process::memory::{MemoryError, RemoteMemory, SliceMemory};
    use crate::profile::Frame;
    use crate::python::code::{read_code, test_code};
    use crate::store::{NewProcess, StoreLimits, TargetMemory};
    use profiler_common::Counter;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, OnceLock, Weak};

    /// Target memory that records, at every read, whether the store lock of
    /// `shared` is held (by anyone, this thread included: `try_lock` fails
    /// rather than deadlocks).
    struct Probe {
        mem: SliceMemory,
        shared: OnceLock<Weak<Shared>>,
        reads: AtomicUsize,
        reads_under_lock: AtomicUsize,
    }

    struct ProbeMemory(Arc<Probe>);

    impl RemoteMemory for ProbeMemory {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            let p = &self.0;
            if let Some(shared) = p.shared.get().and_then(Weak::upgrade) {
                p.reads.fetch_add(1, Ordering::SeqCst);
                if shared.store.try_lock().is_err() {
                    p.reads_under_lock.fetch_add(1, Ordering::SeqCst);
                }
            }
            p.mem.read(addr, buf)
        }
    }

    fn small_store() -> Store {
        Store::new(
            StoreLimits {
                retention_secs: 60,
                max_processes: 10,
                max_stacks_per_process: 100,
                max_bytes: 64 << 20,
                max_bytes_per_process: 8 << 20,
            },
            99,
        )
    }

    #[test]
    fn liveness_follows_the_last_drain() {
        let shared = Shared::new(small_store(), Metrics::new());
        assert!(shared.live().is_ok(), "just started");
        std::thread::sleep(Duration::from_millis(30));
        let e = shared
            .check_drained_within(Duration::from_millis(20))
            .unwrap_err();
        assert!(e.starts_with("ingest stalled"), "{e}");
        shared.note_drain();
        assert!(shared
            .check_drained_within(Duration::from_millis(20))
            .is_ok());
    }

    #[test]
    fn symbolisation_runs_without_the_store_lock() {
        let store = small_store();
        let shared = Arc::new(Shared::new(store, Metrics::new()));
        let mem = test_code::fake(1, 7, 2);
        let checksum = read_code(&mem, test_code::CODE, &test_code::format())
            .expect("fake code object")
            .checksum;
        let probe = Arc::new(Probe {
            mem,
            shared: OnceLock::new(),
            reads: AtomicUsize::new(0),
            reads_under_lock: AtomicUsize::new(0),
        });
        assert!(probe.shared.set(Arc::downgrade(&shared)).is_ok());
        let now = SystemTime::now();
        let process = NewProcess {
            labels: ProcessLabels {
                pid: 77,
                ..Default::default()
            },
            start_time: 1,
            python_version: "3.11.7".into(),
            code_format: test_code::format(),
            gil: None,
        };
        let mem = TargetMemory::new(ProbeMemory(probe.clone()));
        assert!(shared.store().add_process_reading(process, now, mem));
        let sample = |code| RawSample::one_frame(77, code, checksum);
        // A readable code object, an unreadable one, and repeats.
        let batch = [test_code::CODE, 0x99_000, test_code::CODE, 0x99_000];
        shared.add_samples(batch.map(sample), now);
        let reads = probe.reads.load(Ordering::SeqCst);
        assert!(reads >= 3, "header, names and line table read: {reads}");
        assert_eq!(probe.reads_under_lock.load(Ordering::SeqCst), 0);

        let p = shared.profile(&Selector::Pid(77), 1).expect("profiled");
        assert_eq!(p.total_samples(), 4);
        let lines: Vec<_> = p
            .stacks
            .iter()
            .map(|(stack, n)| (stack[0].to_string(), *n))
            .collect();
        assert!(lines.contains(&("f (f:8)".to_string(), 2)), "{lines:?}");
        let s = shared.store().symbol_stats();
        assert_eq!((s.misses, s.unreadable), (2, 1), "{s:?}");
        assert!(p
            .stacks
            .iter()
            .any(|(k, n)| matches!(k[0], Frame::Unknown { .. }) && *n == 2));

        // Known stacks need no read at all.
        shared.add_samples(batch.map(sample), now);
        assert_eq!(probe.reads.load(Ordering::SeqCst), reads);

        // The probe does see the lock: symbolising a new code object with
        // the guard held, as the daemon did before, is caught.
        shared.store().add_sample(sample(0x98_000), now);
        assert!(probe.reads_under_lock.load(Ordering::SeqCst) > 0);
    }

    #[test]
    fn a_profile_over_the_query_budget_is_refused_with_its_size() {
        let shared = Shared::new(small_store(), Metrics::new());
        let now = SystemTime::now();
        for pid in [5, 6] {
            let (mem, codes) = test_code::fakes(40);
            let process = NewProcess {
                labels: ProcessLabels::python3(pid, "web"),
                start_time: 1,
                python_version: "3.11.7".into(),
                code_format: test_code::format(),
                gil: None,
            };
            let mem = TargetMemory::new(mem);
            assert!(shared.store().add_process_reading(process, now, mem));
            // One deep stack per process: 40 frames.
            let mut s = RawSample::one_frame(pid, codes[0].0, codes[0].1);
            s.frames = codes
                .iter()
                .map(|&(code, checksum)| RawSample::one_frame(pid, code, checksum).frames[0])
                .collect();
            shared.add_samples([s], now);
        }
        let one = shared.profile(&Selector::Pid(5), 1).unwrap();
        assert_eq!(one.stacks.keys().next().map(Vec::len), Some(40));
        let need = shared
            .store()
            .query(&Selector::Pid(5), 1, now)
            .unwrap()
            .expanded_bytes();
        // One process fits; the service's two do not.
        shared.set_max_query_bytes(need + need / 2);
        assert!(shared.profile(&Selector::Pid(6), 1).is_ok());
        match shared.profile(&Selector::Service("web".into()), 1) {
            Err(QueryError::TooLarge(m)) => assert!(m.contains("api.max_query_mib"), "{m}"),
            other => panic!("{other:?}"),
        }
        shared.set_max_query_bytes(2 * need);
        let both = shared.profile(&Selector::Service("web".into()), 1).unwrap();
        assert_eq!(both.total_samples(), 2);
        // `top` spells nothing out: it is not held to the budget.
        shared.set_max_query_bytes(1);
        assert_eq!(shared.top(&TopQuery::default()).unwrap().total_samples, 2);
    }

    #[test]
    fn command_lines_are_redacted_unless_shown() {
        let shared = Shared::new(small_store(), Metrics::new());
        let mut labels = ProcessLabels::python3(9, "web");
        labels.cmdline = "python3 app.py --token s3cret".into();
        let process = NewProcess {
            labels,
            start_time: 1,
            python_version: "3.11.7".into(),
            code_format: test_code::format(),
            gil: None,
        };
        assert!(shared.store().add_process(process, SystemTime::now()));
        let cmdline = |s: &Shared| s.processes()[0].labels.cmdline.clone();
        assert_eq!(cmdline(&shared), REDACTED);
        shared.set_api(&crate::daemon::config::Api {
            show_cmdline: true,
            ..Default::default()
        });
        assert_eq!(cmdline(&shared), "python3 app.py --token s3cret");
        // The store keeps it for include rules either way.
        assert!(shared.store().views()[0].labels.cmdline.contains("s3cret"));
    }

    #[test]
    fn top_header_reads_bpf_counters_and_checks_seconds() {
        let store = small_store();
        let shared = Shared::new(store, Metrics::new());
        let mut slots = vec![0u64; profiler_common::COUNTERS_LEN as usize];
        slots[Counter::RingBufFull as usize] = 7;
        slots[Counter::ReadFailed as usize] = 2;
        slots[Counter::TailCallFailed as usize] = 1;
        slots[Counter::Sampled as usize] = 1000;
        shared
            .metrics
            .set_bpf_counters(&Counters::from_slots(&slots));
        assert_eq!(shared.bpf_drops_and_errors(), (7, 3));
        let s = shared.top(&TopQuery::default()).unwrap();
        assert_eq!((s.drops, s.errors), (7, 3));
        assert_eq!(s.total_samples, 0);
        assert!(s.functions.is_empty() && s.processes.is_empty());
        assert!(s.window_secs >= 1 && s.window_secs <= 60);
        let q = TopQuery {
            seconds: Some(61),
            ..Default::default()
        };
        assert!(matches!(shared.top(&q), Err(QueryError::BadRequest(_))));
        let q = TopQuery {
            seconds: Some(5),
            ..Default::default()
        };
        assert_eq!(shared.top(&q).unwrap().window_secs, 5);
        // Complete seconds plus the current one, within the retention.
        assert_eq!(top_span(5, 60), 6);
        assert_eq!(top_span(60, 60), 60);
        assert_eq!(top_span(1, 1), 1);
    }
}
