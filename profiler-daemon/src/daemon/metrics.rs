//! The daemon's Prometheus metrics, every name prefixed `pyebpf_`.
//!
//! Counters fed from absolute totals kept elsewhere (the BPF per-CPU
//! counters, the kernel's program run statistics, symbol cache totals) are
//! advanced by the difference from the last value seen; a value lower than
//! the last one is taken as a restart of its source and counted whole.
//!
//! Label sets known in advance (outcomes, read steps, results, export
//! targets) are created at start, so every series exists from the first
//! scrape, at zero. `pyebpf_function_samples` only has the series of the
//! last [`Metrics::set_top_functions`] (none before).
//!
//! The `python` label (major.minor, `t` for free-threaded builds) comes from
//! the processes seen, so a host could make it take any value: at most
//! [`MAX_PYTHON_LABELS`] distinct versions get their own value, later ones
//! are counted under [`OTHER_PYTHON`]. A `pyebpf_processes_profiled` series,
//! once it exists, stays (at 0 when no process of that version is profiled).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use profiler_common::{Counter, OffCpuCounter, ProcCounter, ReadStep};
use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use super::export::pprof_writer::WriteCounters;

mod push;
use crate::bpf::counters::Counters;
use crate::bpf::sampler::RunStats;
use crate::model::labels::ProcessLabels;
use crate::model::query::ProcessView;
use crate::profile::{CompactProfile, Frame};
use crate::python::symbolizer::SymbolStats;
pub use push::{DropReason, PushMetrics};

/// Most distinct values the `python` label takes (besides `""` and
/// [`OTHER_PYTHON`]).
pub const MAX_PYTHON_LABELS: usize = 32;
/// The `python` label of versions seen after [`MAX_PYTHON_LABELS`] others.
pub const OTHER_PYTHON: &str = "other";

/// What discovery decided about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscoveryResult {
    Profiled,
    NotPython,
    /// A CPython process refused for its version or build (too old, too
    /// new, free-threaded).
    Unsupported,
    Excluded,
    Failed,
}

impl DiscoveryResult {
    pub const ALL: [DiscoveryResult; 5] = [
        DiscoveryResult::Profiled,
        DiscoveryResult::NotPython,
        DiscoveryResult::Unsupported,
        DiscoveryResult::Excluded,
        DiscoveryResult::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DiscoveryResult::Profiled => "profiled",
            DiscoveryResult::NotPython => "not_python",
            DiscoveryResult::Unsupported => "unsupported",
            DiscoveryResult::Excluded => "excluded",
            DiscoveryResult::Failed => "failed",
        }
    }

    /// Whether the result always comes with a known version (so no series
    /// with an empty `python` is created for it in advance).
    fn has_version(self) -> bool {
        matches!(
            self,
            DiscoveryResult::Profiled | DiscoveryResult::Unsupported
        )
    }
}

/// Where a window's profiles are exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportTarget {
    PprofDir,
    Pyroscope,
    Otlp,
}

impl ExportTarget {
    pub const ALL: [ExportTarget; 3] = [
        ExportTarget::PprofDir,
        ExportTarget::Pyroscope,
        ExportTarget::Otlp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExportTarget::PprofDir => "pprof_dir",
            ExportTarget::Pyroscope => "pyroscope",
            ExportTarget::Otlp => "otlp",
        }
    }
}

/// How an export went: written/sent, failed, or dropped (queue full, given up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportResult {
    Ok,
    Error,
    Dropped,
}

impl ExportResult {
    pub const ALL: [ExportResult; 3] =
        [ExportResult::Ok, ExportResult::Error, ExportResult::Dropped];

    pub fn as_str(self) -> &'static str {
        match self {
            ExportResult::Ok => "ok",
            ExportResult::Error => "error",
            ExportResult::Dropped => "dropped",
        }
    }
}

/// `(function, file, samples)` of one function in one process.
pub type FunctionSamples = (String, String, u64);

const SYMBOL_RESULTS: [&str; 5] = ["hit", "miss", "stale", "unreadable", "invalid"];

/// The values the `python` label has taken.
#[derive(Default)]
struct PythonLabels {
    /// Versions given their own value (at most [`MAX_PYTHON_LABELS`]).
    seen: HashSet<String>,
    /// `python` values of `pyebpf_processes_profiled` series set so far.
    profiled_series: HashSet<String>,
}

impl PythonLabels {
    /// The label value for `python`: itself if seen before or while there is
    /// room, else [`OTHER_PYTHON`]; `""` (version not known) is kept.
    fn value(&mut self, python: &str) -> String {
        if python.is_empty() || self.seen.contains(python) {
            return python.to_string();
        }
        if self.seen.len() < MAX_PYTHON_LABELS {
            self.seen.insert(python.to_string());
            return python.to_string();
        }
        OTHER_PYTHON.to_string()
    }
}

/// The events of `pyebpf_bpf_off_cpu_total`: the off-CPU programs'
/// counters, then the outcomes of off-CPU samples (those the off-CPU lane
/// can count).
const OFF_CPU_OUTCOMES: [Counter; 7] = [
    Counter::NoThreadState,
    Counter::Sampled,
    Counter::Truncated,
    Counter::RingBufFull,
    Counter::TailCallFailed,
    Counter::ReadFailed,
    Counter::Wakeups,
];
const OFF_CPU_EVENTS: [&str; OffCpuCounter::ALL.len() + OFF_CPU_OUTCOMES.len()] = {
    let mut names = [""; OffCpuCounter::ALL.len() + OFF_CPU_OUTCOMES.len()];
    let mut i = 0;
    while i < OffCpuCounter::ALL.len() {
        names[i] = OffCpuCounter::ALL[i].name();
        i += 1;
    }
    let mut j = 0;
    while j < OFF_CPU_OUTCOMES.len() {
        names[i + j] = OFF_CPU_OUTCOMES[j].name();
        j += 1;
    }
    names
};

/// Last absolute values seen by the delta setters.
#[derive(Default)]
struct Last {
    off_cpu: [u64; OFF_CPU_EVENTS.len()],
    outcomes: [u64; Counter::ALL.len()],
    read_errors: [u64; ReadStep::ALL.len()],
    symbols: [u64; SYMBOL_RESULTS.len()],
    symbol_evictions: u64,
    run_time_ns: u64,
    run_count: u64,
    process: [u64; ProcCounter::ALL.len()],
}

/// Advances `c` from `last` to the absolute total `now` (a decrease is a
/// restart of the source: `now` counts whole).
fn advance(c: &IntCounter, last: &mut u64, now: u64) {
    let delta = if now >= *last { now - *last } else { now };
    if delta > 0 {
        c.inc_by(delta);
    }
    *last = now;
}

/// Every metric of the daemon, in its own registry.
pub struct Metrics {
    registry: Registry,
    last: Mutex<Last>,
    python_labels: Mutex<PythonLabels>,
    bpf_events: IntCounterVec,
    bpf_off_cpu: IntCounterVec,
    bpf_read_errors: IntCounterVec,
    ringbuf_dropped: IntCounter,
    processes_profiled: IntGaugeVec,
    processes_discovered: IntCounterVec,
    symbol_cache: IntCounterVec,
    symbol_cache_evictions: IntCounter,
    stacks_evicted: IntCounter,
    bpf_run_time: prometheus::Counter,
    bpf_run_count: IntCounter,
    bpf_ns_per_sample: prometheus::Gauge,
    window_flush: Histogram,
    export: IntCounterVec,
    push: PushMetrics,
    otlp: PushMetrics,
    samples_received: IntCounter,
    function_samples: IntGaugeVec,
    /// Per process (pid, service), with off-CPU sampling on.
    gil_wait_seconds: prometheus::CounterVec,
    wall_seconds: prometheus::CounterVec,
    /// The (pid, service) series of the two above, to remove those of
    /// processes no longer held.
    gil_series: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
    function_series_dropped: IntGauge,
    process_events: IntCounterVec,
    process_events_lost: IntCounter,
    exit_liveness_unreadable: IntCounter,
    exec_inspections_skipped: IntCounter,
    watched_processes: IntGauge,
}

/// A process lifecycle event userspace received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessEvent {
    Exec,
    Exit,
}

impl ProcessEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessEvent::Exec => "exec",
            ProcessEvent::Exit => "exit",
        }
    }
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are static and distinct");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    register(registry, c)
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid metric"))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All metrics, registered, with `pyebpf_build_info{version}` set to
    /// this crate's version.
    pub fn new() -> Self {
        let r = Registry::new();
        let bpf_events = counter_vec(
            &r,
            "pyebpf_bpf_events_total",
            "Outcomes of the BPF sampler's perf events, by outcome (events counts every run; \
             the others say what became of it).",
            &["outcome"],
        );
        let bpf_off_cpu = counter_vec(
            &r,
            "pyebpf_bpf_off_cpu_total",
            "Off-CPU tracing, by event: switch-outs timed or not (map_full), intervals and their \
             nanoseconds, those walked (chosen) and their weights in nanoseconds, and what \
             became of their stacks (sampled, truncated, read_failed, ...).",
            &["event"],
        );
        let bpf_read_errors = counter_vec(
            &r,
            "pyebpf_bpf_read_errors_total",
            "Stack walks the BPF sampler ended on a failed read of target memory, by the step \
             that failed.",
            &["step"],
        );
        let ringbuf_dropped = counter(
            &r,
            "pyebpf_ringbuf_dropped_samples_total",
            "Samples lost because the BPF ring buffer was full (userspace not keeping up).",
        );
        let processes_profiled = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "pyebpf_processes_profiled",
                    "Python processes being profiled now, by Python version (major.minor; a \
                     version's series stays, at 0, once none is left).",
                ),
                &["python"],
            )
            .expect("valid metric"),
        );
        let processes_discovered = counter_vec(
            &r,
            "pyebpf_processes_discovered_total",
            "Processes examined by discovery, by result: profiled, not_python, unsupported \
             (CPython of a version or build pyebpf does not support), excluded (by the \
             configured filters) or failed; python is the version (major.minor, t for \
             free-threaded) when known, else empty.",
            &["result", "python"],
        );
        let symbol_cache = counter_vec(
            &r,
            "pyebpf_symbol_cache_total",
            "Code object lookups when symbolising frames, by result: hit or miss; stale, \
             unreadable and invalid are the misses that gave an unknown frame.",
            &["result"],
        );
        let symbol_cache_evictions = counter(
            &r,
            "pyebpf_symbol_cache_evictions_total",
            "Code objects evicted from the per-process symbol caches (least recently used first) to stay within their byte bounds.",
        );
        let stacks_evicted = counter(
            &r,
            "pyebpf_stacks_evicted_total",
            "Distinct stacks freed before the end of the retention, with the oldest seconds that held them, to fit the memory budgets.",
        );
        let bpf_run_time = register(
            &r,
            prometheus::Counter::new(
                "pyebpf_bpf_run_time_seconds_total",
                "CPU time spent in the BPF sampler programs, per the kernel's program statistics \
                 (zero unless kernel.bpf_stats_enabled is 1).",
            )
            .expect("valid metric"),
        );
        let bpf_run_count = counter(
            &r,
            "pyebpf_bpf_run_count_total",
            "Runs of the BPF sampler's entry program (one per perf event), per the kernel's \
             program statistics.",
        );
        let bpf_ns_per_sample = register(
            &r,
            prometheus::Gauge::new(
                "pyebpf_bpf_ns_per_sample",
                "Mean BPF CPU time per sample, in nanoseconds, between the last two updates \
                 (entry and walker programs together).",
            )
            .expect("valid metric"),
        );
        let window_flush = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "pyebpf_window_flush_seconds",
                    "Time to close a profiling window: symbolise, aggregate and hand its \
                     profiles to the exporters.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )
            .expect("valid metric"),
        );
        let export = counter_vec(
            &r,
            "pyebpf_export_total",
            "Profile exports (one per process and window), by target (pprof_dir, pyroscope, \
             otlp) and result: ok (written, or accepted by the server), error (a failed write; \
             for pyroscope and otlp a failed request attempt, retried) or dropped (for \
             pyroscope and otlp, profiles lost for any reason; see \
             pyebpf_<target>_dropped_profiles_total).",
            &["target", "result"],
        );
        let push = push::push_metrics(&r, &export, ExportTarget::Pyroscope);
        let otlp = push::push_metrics(&r, &export, ExportTarget::Otlp);
        let samples_received = counter(
            &r,
            "pyebpf_samples_received_total",
            "Stack samples read from the BPF ring buffer by userspace.",
        );
        let function_samples = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "pyebpf_function_samples",
                    "Own (leaf) samples of a Python function in the last closed window, for \
                     each process's top functions (capped series count).",
                ),
                &["pid", "service", "function", "file"],
            )
            .expect("valid metric"),
        );
        let gil_wait_seconds = register(
            &r,
            prometheus::CounterVec::new(
                Opts::new(
                    "pyebpf_gil_wait_seconds_total",
                    "Off-CPU time the process's threads spent waiting for the GIL since it was \
                     first profiled (only with off-CPU sampling: sampling.types wall or \
                     off-cpu); over pyebpf_wall_seconds_total, its GIL contention.",
                ),
                &["pid", "service"],
            )
            .expect("valid metric"),
        );
        let wall_seconds = register(
            &r,
            prometheus::CounterVec::new(
                Opts::new(
                    "pyebpf_wall_seconds_total",
                    "Wall time of the process's threads (CPU samples at 1/rate_hz s each plus \
                     off-CPU time) since it was first profiled (with both on- and off-CPU \
                     sampling).",
                ),
                &["pid", "service"],
            )
            .expect("valid metric"),
        );
        let function_series_dropped = register(
            &r,
            IntGauge::new(
                "pyebpf_function_series_dropped",
                "pyebpf_function_samples series left out of the last update by the series cap.",
            )
            .expect("valid metric"),
        );
        let process_events = counter_vec(
            &r,
            "pyebpf_process_events_total",
            "Process lifecycle events received from BPF, by event: exec (every exec on the \
             host) or exit (only processes pyebpf tracks, once their last thread exits).",
            &["event"],
        );
        let process_events_lost = counter(
            &r,
            "pyebpf_process_events_lost_total",
            "Exec and exit events lost to a full BPF ring (the periodic /proc scan catches \
             up with them).",
        );
        let exit_liveness_unreadable = counter(
            &r,
            "pyebpf_exit_liveness_unreadable_total",
            "Thread exits of tracked processes where BPF could not read whether threads were \
             left (signal->live); the main thread's exit was taken for the process's.",
        );
        let exec_inspections_skipped = counter(
            &r,
            "pyebpf_exec_inspections_skipped_total",
            "Execs not inspected because the new executable (by device, inode, size and \
             times) is already known not to be a Python interpreter.",
        );
        let watched_processes = register(
            &r,
            IntGauge::new(
                "pyebpf_watched_processes",
                "Processes not sampled whose exit BPF reports (being inspected, waiting for a \
                 retry, or listed as unsupported).",
            )
            .expect("valid metric"),
        );
        let build_info = register(
            &r,
            IntGaugeVec::new(
                Opts::new("pyebpf_build_info", "pyebpf build information; always 1."),
                &["version"],
            )
            .expect("valid metric"),
        );

        for k in Counter::ALL {
            bpf_events.with_label_values(&[k.name()]);
        }
        for name in OFF_CPU_EVENTS {
            bpf_off_cpu.with_label_values(&[name]);
        }
        for s in ReadStep::ALL {
            bpf_read_errors.with_label_values(&[s.name()]);
        }
        for d in DiscoveryResult::ALL
            .into_iter()
            .filter(|d| !d.has_version())
        {
            processes_discovered.with_label_values(&[d.as_str(), ""]);
        }
        for s in SYMBOL_RESULTS {
            symbol_cache.with_label_values(&[s]);
        }
        for e in [ProcessEvent::Exec, ProcessEvent::Exit] {
            process_events.with_label_values(&[e.as_str()]);
        }
        for t in ExportTarget::ALL {
            for res in ExportResult::ALL {
                export.with_label_values(&[t.as_str(), res.as_str()]);
            }
        }
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        Metrics {
            registry: r,
            last: Mutex::new(Last::default()),
            python_labels: Mutex::new(PythonLabels::default()),
            bpf_events,
            bpf_off_cpu,
            bpf_read_errors,
            ringbuf_dropped,
            processes_profiled,
            processes_discovered,
            symbol_cache,
            symbol_cache_evictions,
            stacks_evicted,
            bpf_run_time,
            bpf_run_count,
            bpf_ns_per_sample,
            window_flush,
            export,
            push,
            otlp,
            samples_received,
            function_samples,
            gil_wait_seconds,
            wall_seconds,
            gil_series: Default::default(),
            function_series_dropped,
            process_events,
            process_events_lost,
            exit_liveness_unreadable,
            exec_inspections_skipped,
            watched_processes,
        }
    }

    /// Counts one process event received.
    pub fn inc_process_event(&self, e: ProcessEvent) {
        self.process_events.with_label_values(&[e.as_str()]).inc();
    }

    /// Counts one exec decided "not Python" from its executable's cached
    /// verdict, without an inspection.
    pub fn inc_exec_inspection_skipped(&self) {
        self.exec_inspections_skipped.inc();
    }

    /// Sets `pyebpf_watched_processes`.
    pub fn set_watched_processes(&self, n: usize) {
        self.watched_processes
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The registry, to add collectors of other parts.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Last> {
        // A panic elsewhere cannot leave `Last` inconsistent enough to matter.
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates `pyebpf_bpf_events_total`, `pyebpf_bpf_read_errors_total`,
    /// `pyebpf_ringbuf_dropped_samples_total` (the `ringbuf_full` outcome),
    /// `pyebpf_process_events_lost_total` and
    /// `pyebpf_exit_liveness_unreadable_total` from a snapshot of the
    /// sampler's absolute counters.
    pub fn set_bpf_counters(&self, c: &Counters) {
        let mut last = self.last();
        for k in Counter::ALL {
            let i = k as usize;
            let before = last.outcomes[i];
            advance(
                &self.bpf_events.with_label_values(&[k.name()]),
                &mut last.outcomes[i],
                c.outcomes[i],
            );
            if k == Counter::RingBufFull {
                let mut b = before;
                advance(&self.ringbuf_dropped, &mut b, c.outcomes[i]);
            }
        }
        for s in ReadStep::ALL {
            let i = s as usize;
            advance(
                &self.bpf_read_errors.with_label_values(&[s.name()]),
                &mut last.read_errors[i],
                c.read_errors[i],
            );
        }
        let off = &c.off_cpu;
        let values = OffCpuCounter::ALL
            .iter()
            .map(|k| off.off_cpu(*k))
            .chain(OFF_CPU_OUTCOMES.iter().map(|k| off.get(*k)));
        for (i, (name, v)) in OFF_CPU_EVENTS.iter().zip(values).enumerate() {
            advance(
                &self.bpf_off_cpu.with_label_values(&[name]),
                &mut last.off_cpu[i],
                v,
            );
        }
        for (i, k) in ProcCounter::ALL.into_iter().enumerate() {
            let target = match k {
                ProcCounter::EventsLost => &self.process_events_lost,
                ProcCounter::LiveUnreadable => &self.exit_liveness_unreadable,
            };
            advance(target, &mut last.process[i], c.process[i]);
        }
    }

    /// Updates `pyebpf_symbol_cache_total` and
    /// `pyebpf_symbol_cache_evictions_total` from absolute totals. They must be
    /// monotonic (e.g. summed over every symbolizer ever, exited processes
    /// included): a decrease is taken as a restart. For per-process stats
    /// that come and go, use [`Metrics::add_symbol_stats`] with differences.
    pub fn set_symbol_stats(&self, s: &SymbolStats) {
        let mut last = self.last();
        for (i, (name, now)) in SYMBOL_RESULTS.iter().zip(symbol_values(s)).enumerate() {
            advance(
                &self.symbol_cache.with_label_values(&[name]),
                &mut last.symbols[i],
                now,
            );
        }
        advance(
            &self.symbol_cache_evictions,
            &mut last.symbol_evictions,
            s.evictions,
        );
    }

    /// Adds `s`, counts since the previous call (not totals), to the symbol
    /// cache counters.
    pub fn add_symbol_stats(&self, s: &SymbolStats) {
        for (name, n) in SYMBOL_RESULTS.iter().zip(symbol_values(s)) {
            self.symbol_cache.with_label_values(&[name]).inc_by(n);
        }
        self.symbol_cache_evictions.inc_by(s.evictions);
    }

    /// Updates `pyebpf_bpf_run_time_seconds_total`, `pyebpf_bpf_run_count_total`
    /// and `pyebpf_bpf_ns_per_sample` from the kernel's absolute program
    /// statistics. The gauge keeps its value when no sample ran since the
    /// previous update.
    pub fn set_run_stats(&self, s: &RunStats) {
        let mut last = self.last();
        let now_ns = u64::try_from(s.run_time.as_nanos()).unwrap_or(u64::MAX);
        let dt = if now_ns >= last.run_time_ns {
            now_ns - last.run_time_ns
        } else {
            now_ns
        };
        let dn = if s.samples >= last.run_count {
            s.samples - last.run_count
        } else {
            s.samples
        };
        if dt > 0 {
            self.bpf_run_time.inc_by(dt as f64 / 1e9);
        }
        if dn > 0 {
            self.bpf_run_count.inc_by(dn);
            self.bpf_ns_per_sample.set(dt as f64 / dn as f64);
        }
        last.run_time_ns = now_ns;
        last.run_count = s.samples;
    }

    fn python_labels(&self) -> std::sync::MutexGuard<'_, PythonLabels> {
        // A panic elsewhere cannot leave the sets inconsistent enough to matter.
        self.python_labels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets `pyebpf_processes_profiled` from the number of processes
    /// profiled now per `python` label (`"3.11"`, `"3.14t"`). Versions past
    /// the label cap are summed under [`OTHER_PYTHON`]; a series set before
    /// and absent from `by_python` is set to 0.
    pub fn set_processes_profiled<'a>(
        &self,
        by_python: impl IntoIterator<Item = (&'a str, usize)>,
    ) {
        let mut labels = self.python_labels();
        let mut now: BTreeMap<String, usize> = BTreeMap::new();
        for (python, n) in by_python {
            let v = labels.value(python);
            *now.entry(v).or_insert(0) += n;
        }
        for old in &labels.profiled_series {
            now.entry(old.clone()).or_insert(0);
        }
        for (python, n) in now {
            self.processes_profiled
                .with_label_values(&[&python])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
            labels.profiled_series.insert(python);
        }
    }

    /// Counts one process examined by discovery; `python` is its version's
    /// label (`"3.14"`, `"3.16"`, `"3.14t"`), `""` when not known.
    pub fn inc_discovered(&self, result: DiscoveryResult, python: &str) {
        let python = self.python_labels().value(python);
        self.processes_discovered
            .with_label_values(&[result.as_str(), &python])
            .inc();
    }

    /// Adds to `pyebpf_stacks_evicted_total`.
    pub fn add_stacks_evicted(&self, n: u64) {
        self.stacks_evicted.inc_by(n);
    }

    /// Adds to `pyebpf_samples_received_total`.
    pub fn add_samples_received(&self, n: u64) {
        self.samples_received.inc_by(n);
    }

    /// Records how long closing a window took.
    pub fn observe_window_flush(&self, took: Duration) {
        self.window_flush.observe(took.as_secs_f64());
    }

    /// Counts one export.
    /// Handles on `pyebpf_export_total{target="pprof_dir"}`, for the thread
    /// that writes the files.
    pub fn pprof_write_counters(&self) -> WriteCounters {
        let c = |r: ExportResult| {
            self.export
                .with_label_values(&[ExportTarget::PprofDir.as_str(), r.as_str()])
        };
        WriteCounters {
            ok: c(ExportResult::Ok),
            error: c(ExportResult::Error),
            dropped: c(ExportResult::Dropped),
        }
    }

    pub fn inc_export(&self, target: ExportTarget, result: ExportResult) {
        self.export
            .with_label_values(&[target.as_str(), result.as_str()])
            .inc();
    }

    /// Handles on the Pyroscope pusher's metrics.
    pub fn pyroscope(&self) -> PushMetrics {
        self.push.clone()
    }

    /// Handles on the OTLP exporter's metrics.
    pub fn otlp(&self) -> PushMetrics {
        self.otlp.clone()
    }

    /// Replaces every `pyebpf_function_samples` series with `top` (per
    /// process, its functions as from [`top_functions`]). At most
    /// `max_series` series are kept, the largest across all processes (ties
    /// by pid, function, file); `pyebpf_function_series_dropped` says how many
    /// were left out. Repeated (pid, function, file) entries are summed.
    pub fn set_top_functions(
        &self,
        top: &[(ProcessLabels, Vec<FunctionSamples>)],
        max_series: usize,
    ) {
        let mut merged: BTreeMap<(u32, &str, &str), (&str, u64)> = BTreeMap::new();
        for (labels, functions) in top {
            for (function, file, samples) in functions {
                let e = merged
                    .entry((labels.pid, function.as_str(), file.as_str()))
                    .or_insert((labels.service.as_str(), 0));
                e.1 = e.1.saturating_add(*samples);
            }
        }
        let mut series: Vec<_> = merged.into_iter().collect();
        // Stable sort: equal counts stay in (pid, function, file) order.
        series.sort_by_key(|s| std::cmp::Reverse(s.1 .1));
        let dropped = series.len().saturating_sub(max_series);
        series.truncate(max_series);

        self.function_samples.reset();
        for ((pid, function, file), (service, samples)) in series {
            self.function_samples
                .with_label_values(&[&pid.to_string(), service, function, file])
                .set(i64::try_from(samples).unwrap_or(i64::MAX));
        }
        self.function_series_dropped
            .set(i64::try_from(dropped).unwrap_or(i64::MAX));
    }

    /// Brings `pyebpf_gil_wait_seconds_total` and `pyebpf_wall_seconds_total`
    /// to each held process's totals (the store's, which only grow while a
    /// process is held); series of processes no longer held are removed.
    /// One series each per process held: bounded by
    /// `aggregation.max_processes`.
    pub fn set_gil_waits(&self, views: &[ProcessView]) {
        let mut series = self.gil_series.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = std::collections::HashSet::new();
        for v in views {
            let Some(gil) = v.gil_wait_seconds else {
                continue;
            };
            let key = (v.labels.pid.to_string(), v.labels.service.clone());
            let labels = [key.0.as_str(), key.1.as_str()];
            let raise = |c: &prometheus::CounterVec, to: f64| {
                let c = c.with_label_values(&labels);
                let delta = to - c.get();
                if delta > 0.0 {
                    c.inc_by(delta);
                }
            };
            raise(&self.gil_wait_seconds, gil);
            if let Some(wall) = v.wall_seconds {
                raise(&self.wall_seconds, wall);
            }
            now.insert(key);
        }
        for (pid, service) in series.difference(&now) {
            let _ = self.gil_wait_seconds.remove_label_values(&[pid, service]);
            let _ = self.wall_seconds.remove_label_values(&[pid, service]);
        }
        *series = now;
    }

    /// Every metric in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# error encoding metrics: {e}\n"))
    }
}

fn symbol_values(s: &SymbolStats) -> [u64; SYMBOL_RESULTS.len()] {
    [s.hits, s.misses, s.stale, s.unreadable, s.invalid]
}

/// The `k` Python functions with the most own (leaf) samples in `profile`,
/// as `(qualname, file, samples)`, largest first, ties by name then file.
/// Stacks whose leaf is not a Python frame are not counted.
pub fn top_functions(profile: &CompactProfile, k: usize) -> Vec<FunctionSamples> {
    let mut own: HashMap<(&str, &str), u64> = HashMap::new();
    for (stack, count) in profile.stacks() {
        if let Some(Frame::Python {
            qualname, filename, ..
        }) = stack.last()
        {
            if count > 0 {
                let e = own.entry((qualname, filename)).or_insert(0);
                *e = e.saturating_add(count);
            }
        }
    }
    let mut v: Vec<_> = own.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(k);
    v.into_iter()
        .map(|((f, file), n)| (f.to_string(), file.to_string(), n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Profile, UnknownReason};

    /// `name{labels} value` lines of `text` as (name, labels, value), label
    /// values unescaped; panics on a line that does not parse.
    type Sample = (String, Vec<(String, String)>, f64);

    fn parse(text: &str) -> Vec<Sample> {
        let mut out = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                    continue;
                }
                assert!(line.is_empty(), "bad comment line {line:?}");
                continue;
            }
            let name_end = line
                .find(['{', ' '])
                .unwrap_or_else(|| panic!("no value: {line:?}"));
            let name = &line[..name_end];
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad name in {line:?}"
            );
            let mut rest = &line[name_end..];
            let mut labels = Vec::new();
            if let Some(r) = rest.strip_prefix('{') {
                let mut chars = r.char_indices();
                loop {
                    // label name
                    let mut key = String::new();
                    let mut c = chars.next().expect("unterminated labels");
                    if c.1 == '}' {
                        rest = &r[c.0 + 1..];
                        break;
                    }
                    while c.1 != '=' {
                        key.push(c.1);
                        c = chars.next().expect("label without =");
                    }
                    assert_eq!(chars.next().map(|c| c.1), Some('"'), "{line:?}");
                    let mut val = String::new();
                    loop {
                        let (_, ch) = chars.next().expect("unterminated value");
                        match ch {
                            '"' => break,
                            '\\' => match chars.next().expect("dangling escape").1 {
                                'n' => val.push('\n'),
                                '\\' => val.push('\\'),
                                '"' => val.push('"'),
                                e => panic!("bad escape \\{e} in {line:?}"),
                            },
                            '\n' => panic!("raw newline"),
                            ch => val.push(ch),
                        }
                    }
                    labels.push((key, val));
                    let (i, sep) = chars.next().expect("unterminated labels");
                    if sep == '}' {
                        rest = &r[i + 1..];
                        break;
                    }
                    assert_eq!(sep, ',', "{line:?}");
                }
            }
            let value = rest
                .strip_prefix(' ')
                .unwrap_or_else(|| panic!("no space before value: {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            out.push((name.to_string(), labels, value));
        }
        out
    }

    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        parse(text).into_iter().find_map(|(n, l, v)| {
            let matches = n == name
                && labels
                    .iter()
                    .all(|(k, val)| l.iter().any(|(k2, v2)| k2 == k && v2 == val));
            matches.then_some(v)
        })
    }

    fn labels(pid: u32, service: &str) -> ProcessLabels {
        ProcessLabels {
            pid,
            service: service.into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_metric_has_help() {
        let m = Metrics::new();
        m.set_top_functions(
            &[(labels(1, "web"), vec![("f".into(), "/a.py".into(), 3)])],
            10,
        );
        m.set_processes_profiled([("3.11", 1)]);
        let text = m.render();
        parse(&text);
        for name in [
            "pyebpf_bpf_events_total",
            "pyebpf_bpf_read_errors_total",
            "pyebpf_ringbuf_dropped_samples_total",
            "pyebpf_processes_profiled",
            "pyebpf_processes_discovered_total",
            "pyebpf_symbol_cache_total",
            "pyebpf_symbol_cache_evictions_total",
            "pyebpf_stacks_evicted_total",
            "pyebpf_bpf_run_time_seconds_total",
            "pyebpf_bpf_run_count_total",
            "pyebpf_bpf_ns_per_sample",
            "pyebpf_window_flush_seconds",
            "pyebpf_export_total",
            "pyebpf_pyroscope_dropped_profiles_total",
            "pyebpf_pyroscope_dropped_bytes_total",
            "pyebpf_pyroscope_sent_bytes_total",
            "pyebpf_pyroscope_queue_bytes",
            "pyebpf_pyroscope_queue_profiles",
            "pyebpf_pyroscope_uploads_in_flight",
            "pyebpf_pyroscope_upload_duration_seconds",
            "pyebpf_otlp_dropped_profiles_total",
            "pyebpf_otlp_dropped_bytes_total",
            "pyebpf_otlp_sent_bytes_total",
            "pyebpf_otlp_queue_bytes",
            "pyebpf_otlp_queue_profiles",
            "pyebpf_otlp_exports_in_flight",
            "pyebpf_otlp_export_duration_seconds",
            "pyebpf_otlp_partial_success_total",
            "pyebpf_samples_received_total",
            "pyebpf_function_samples",
            "pyebpf_function_series_dropped",
            "pyebpf_build_info",
        ] {
            let help = format!("# HELP {name} ");
            let line = text
                .lines()
                .find(|l| l.starts_with(&help))
                .unwrap_or_else(|| panic!("no HELP for {name}"));
            assert!(line.len() > help.len() + 10, "{line}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
        for family in parse(&text) {
            assert!(family.0.starts_with("pyebpf_"), "{}", family.0);
        }
        assert_eq!(
            value(
                &text,
                "pyebpf_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Some(1.0)
        );
        // Known label sets exist at zero from the start.
        for k in Counter::ALL {
            assert_eq!(
                value(&text, "pyebpf_bpf_events_total", &[("outcome", k.name())]),
                Some(0.0)
            );
        }
        for s in ReadStep::ALL {
            assert_eq!(
                value(&text, "pyebpf_bpf_read_errors_total", &[("step", s.name())]),
                Some(0.0)
            );
        }
        // Results without a version exist at zero, with an empty python;
        // profiled and unsupported only get series with their versions.
        for r in ["not_python", "excluded", "failed"] {
            assert_eq!(
                value(
                    &text,
                    "pyebpf_processes_discovered_total",
                    &[("result", r), ("python", "")]
                ),
                Some(0.0),
                "{r}"
            );
        }
        for r in ["profiled", "unsupported"] {
            assert_eq!(
                value(&text, "pyebpf_processes_discovered_total", &[("result", r)]),
                None,
                "{r}"
            );
        }
        for t in ["pprof_dir", "pyroscope", "otlp"] {
            for r in ["ok", "error", "dropped"] {
                assert_eq!(
                    value(
                        &text,
                        "pyebpf_export_total",
                        &[("target", t), ("result", r)]
                    ),
                    Some(0.0)
                );
            }
        }
        for r in DropReason::ALL {
            for name in [
                "pyebpf_pyroscope_dropped_profiles_total",
                "pyebpf_pyroscope_dropped_bytes_total",
                "pyebpf_otlp_dropped_profiles_total",
                "pyebpf_otlp_dropped_bytes_total",
            ] {
                assert_eq!(value(&text, name, &[("reason", r.as_str())]), Some(0.0));
            }
        }
        assert!(text.contains("# TYPE pyebpf_pyroscope_queue_bytes gauge"));
        assert!(text.contains("# TYPE pyebpf_pyroscope_upload_duration_seconds histogram"));
        assert!(text.contains("# TYPE pyebpf_otlp_export_duration_seconds histogram"));
        assert!(!text.contains("pyebpf_pyroscope_partial_success_total"));
        assert!(text.contains("# TYPE pyebpf_bpf_events_total counter"));
        assert!(text.contains("# TYPE pyebpf_window_flush_seconds histogram"));
        assert!(text.contains("# TYPE pyebpf_function_samples gauge"));
        assert!(text.contains("# TYPE pyebpf_processes_profiled gauge"));
    }

    #[test]
    fn process_lifecycle_metrics() {
        let m = Metrics::new();
        let r = m.render();
        for e in ["exec", "exit"] {
            assert_eq!(
                value(&r, "pyebpf_process_events_total", &[("event", e)]),
                Some(0.0)
            );
        }
        m.inc_process_event(ProcessEvent::Exec);
        m.inc_process_event(ProcessEvent::Exec);
        m.inc_process_event(ProcessEvent::Exit);
        m.inc_exec_inspection_skipped();
        m.set_watched_processes(3);
        let mut c = Counters::default();
        c.process[0] = 5;
        c.process[1] = 2;
        m.set_bpf_counters(&c);
        m.set_bpf_counters(&c);
        let r = m.render();
        let v = |name, l: &[(&str, &str)]| value(&r, name, l);
        assert_eq!(
            v("pyebpf_process_events_total", &[("event", "exec")]),
            Some(2.0)
        );
        assert_eq!(
            v("pyebpf_process_events_total", &[("event", "exit")]),
            Some(1.0)
        );
        assert_eq!(v("pyebpf_exec_inspections_skipped_total", &[]), Some(1.0));
        assert_eq!(v("pyebpf_watched_processes", &[]), Some(3.0));
        assert_eq!(v("pyebpf_process_events_lost_total", &[]), Some(5.0));
        assert_eq!(v("pyebpf_exit_liveness_unreadable_total", &[]), Some(2.0));
    }

    #[test]
    fn counters_from_absolute_values() {
        let m = Metrics::new();
        let mut c = Counters::default();
        c.outcomes[Counter::Events as usize] = 100;
        c.outcomes[Counter::Sampled as usize] = 90;
        c.outcomes[Counter::RingBufFull as usize] = 4;
        c.read_errors[ReadStep::Code as usize] = 2;
        m.set_bpf_counters(&c);
        m.set_bpf_counters(&c); // unchanged: no double counting
        let ev =
            |m: &Metrics, o: &str| value(&m.render(), "pyebpf_bpf_events_total", &[("outcome", o)]);
        assert_eq!(ev(&m, "events"), Some(100.0));
        assert_eq!(ev(&m, "sampled"), Some(90.0));
        assert_eq!(ev(&m, "ringbuf_full"), Some(4.0));
        assert_eq!(ev(&m, "truncated"), Some(0.0));
        // Off-CPU tracing has its own counter, every event listed.
        let off =
            |m: &Metrics, e: &str| value(&m.render(), "pyebpf_bpf_off_cpu_total", &[("event", e)]);
        assert_eq!(off(&m, "intervals"), Some(0.0));
        assert_eq!(off(&m, "sampled"), Some(0.0));
        let mut c2 = c.clone();
        c2.off_cpu.off_cpu[OffCpuCounter::IntervalNs as usize] = 7_000;
        c2.off_cpu.outcomes[Counter::Sampled as usize] = 3;
        m.set_bpf_counters(&c2);
        m.set_bpf_counters(&c2);
        assert_eq!(off(&m, "interval_ns"), Some(7_000.0));
        assert_eq!(off(&m, "sampled"), Some(3.0));
        assert_eq!(ev(&m, "sampled"), Some(90.0), "lanes stay apart");
        assert_eq!(
            value(
                &m.render(),
                "pyebpf_bpf_read_errors_total",
                &[("step", "code_object")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(&m.render(), "pyebpf_ringbuf_dropped_samples_total", &[]),
            Some(4.0)
        );

        c.outcomes[Counter::Events as usize] = 150;
        c.outcomes[Counter::RingBufFull as usize] = 10;
        m.set_bpf_counters(&c);
        assert_eq!(ev(&m, "events"), Some(150.0));
        assert_eq!(ev(&m, "sampled"), Some(90.0));
        assert_eq!(
            value(&m.render(), "pyebpf_ringbuf_dropped_samples_total", &[]),
            Some(10.0)
        );

        // The source restarted (sampler reloaded): new values count whole.
        c.outcomes[Counter::Events as usize] = 30;
        c.outcomes[Counter::RingBufFull as usize] = 1;
        c.read_errors[ReadStep::Code as usize] = 0;
        m.set_bpf_counters(&c);
        assert_eq!(ev(&m, "events"), Some(180.0));
        assert_eq!(
            value(&m.render(), "pyebpf_ringbuf_dropped_samples_total", &[]),
            Some(11.0)
        );
        assert_eq!(
            value(
                &m.render(),
                "pyebpf_bpf_read_errors_total",
                &[("step", "code_object")]
            ),
            Some(2.0)
        );
        // And go on from there.
        c.outcomes[Counter::Events as usize] = 35;
        m.set_bpf_counters(&c);
        assert_eq!(ev(&m, "events"), Some(185.0));

        // Symbol stats, absolute then differences.
        let mut s = SymbolStats {
            hits: 10,
            misses: 5,
            stale: 1,
            unreadable: 2,
            invalid: 0,
            evictions: 1,
        };
        m.set_symbol_stats(&s);
        s.hits = 25;
        m.set_symbol_stats(&s);
        let sym = |m: &Metrics, r: &str| {
            value(&m.render(), "pyebpf_symbol_cache_total", &[("result", r)])
        };
        assert_eq!(sym(&m, "hit"), Some(25.0));
        assert_eq!(sym(&m, "miss"), Some(5.0));
        assert_eq!(sym(&m, "stale"), Some(1.0));
        assert_eq!(sym(&m, "unreadable"), Some(2.0));
        assert_eq!(sym(&m, "invalid"), Some(0.0));
        s.hits = 3; // restart
        m.set_symbol_stats(&s);
        assert_eq!(sym(&m, "hit"), Some(28.0));
        m.add_symbol_stats(&SymbolStats {
            invalid: 7,
            ..Default::default()
        });
        assert_eq!(sym(&m, "invalid"), Some(7.0));
        assert_eq!(sym(&m, "hit"), Some(28.0));
        assert_eq!(
            value(&m.render(), "pyebpf_symbol_cache_evictions_total", &[]),
            Some(1.0)
        );

        // Run stats.
        m.set_run_stats(&RunStats {
            run_time: Duration::from_micros(500),
            samples: 100,
            walks: 300,
            ..RunStats::default()
        });
        let t = m.render();
        assert_eq!(value(&t, "pyebpf_bpf_run_count_total", &[]), Some(100.0));
        assert_eq!(value(&t, "pyebpf_bpf_ns_per_sample", &[]), Some(5000.0));
        let secs = value(&t, "pyebpf_bpf_run_time_seconds_total", &[]).unwrap();
        assert!((secs - 0.0005).abs() < 1e-12, "{secs}");
        m.set_run_stats(&RunStats {
            run_time: Duration::from_micros(700),
            samples: 200,
            walks: 600,
            ..RunStats::default()
        });
        let t = m.render();
        assert_eq!(value(&t, "pyebpf_bpf_run_count_total", &[]), Some(200.0));
        assert_eq!(value(&t, "pyebpf_bpf_ns_per_sample", &[]), Some(2000.0));
        // Nothing ran: the gauge keeps its value.
        m.set_run_stats(&RunStats {
            run_time: Duration::from_micros(700),
            samples: 200,
            walks: 600,
            ..RunStats::default()
        });
        assert_eq!(
            value(&m.render(), "pyebpf_bpf_ns_per_sample", &[]),
            Some(2000.0)
        );

        // Plain counters, gauges and the histogram.
        m.set_processes_profiled([("3.11", 2), ("3.14", 1)]);
        m.inc_discovered(DiscoveryResult::NotPython, "");
        m.inc_discovered(DiscoveryResult::NotPython, "");
        m.add_stacks_evicted(4);
        m.add_samples_received(1000);
        m.inc_export(ExportTarget::Pyroscope, ExportResult::Dropped);
        m.observe_window_flush(Duration::from_millis(30));
        let t = m.render();
        assert_eq!(
            value(&t, "pyebpf_processes_profiled", &[("python", "3.11")]),
            Some(2.0)
        );
        assert_eq!(
            value(&t, "pyebpf_processes_profiled", &[("python", "3.14")]),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "pyebpf_processes_discovered_total",
                &[("result", "not_python"), ("python", "")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &t,
                "pyebpf_processes_discovered_total",
                &[("result", "excluded"), ("python", "")]
            ),
            Some(0.0)
        );
        assert_eq!(value(&t, "pyebpf_stacks_evicted_total", &[]), Some(4.0));
        assert_eq!(
            value(&t, "pyebpf_samples_received_total", &[]),
            Some(1000.0)
        );
        assert_eq!(
            value(
                &t,
                "pyebpf_export_total",
                &[("target", "pyroscope"), ("result", "dropped")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "pyebpf_window_flush_seconds_count", &[]),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "pyebpf_window_flush_seconds_bucket", &[("le", "0.05")]),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "pyebpf_window_flush_seconds_bucket", &[("le", "0.025")]),
            Some(0.0)
        );
    }

    /// Every `name` series as (python label, value), sorted.
    fn by_python(text: &str, name: &str, more: &[(&str, &str)]) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = parse(text)
            .into_iter()
            .filter(|(n, l, _)| {
                n == name
                    && more
                        .iter()
                        .all(|(k, val)| l.iter().any(|(k2, v2)| k2 == k && v2 == val))
            })
            .map(|(_, l, v)| {
                let python = l.into_iter().find(|(k, _)| k == "python").unwrap().1;
                (python, v)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn series(v: &[(&str, f64)]) -> Vec<(String, f64)> {
        v.iter().map(|(p, n)| (p.to_string(), *n)).collect()
    }

    #[test]
    fn processes_by_python_version() {
        let m = Metrics::new();
        // Nothing profiled yet: no series.
        m.set_processes_profiled([]);
        assert!(by_python(&m.render(), "pyebpf_processes_profiled", &[]).is_empty());
        m.set_processes_profiled([("3.11", 2), ("3.14", 1), ("3.14t", 1)]);
        assert_eq!(
            by_python(&m.render(), "pyebpf_processes_profiled", &[]),
            series(&[("3.11", 2.0), ("3.14", 1.0), ("3.14t", 1.0)])
        );
        // The last 3.14 exits: its series stays, at 0.
        m.set_processes_profiled([("3.11", 3)]);
        assert_eq!(
            by_python(&m.render(), "pyebpf_processes_profiled", &[]),
            series(&[("3.11", 3.0), ("3.14", 0.0), ("3.14t", 0.0)])
        );

        m.inc_discovered(DiscoveryResult::Profiled, "3.14");
        m.inc_discovered(DiscoveryResult::Profiled, "3.14");
        m.inc_discovered(DiscoveryResult::Profiled, "3.11");
        m.inc_discovered(DiscoveryResult::Unsupported, "3.16");
        m.inc_discovered(DiscoveryResult::Unsupported, "3.10");
        m.inc_discovered(DiscoveryResult::Unsupported, "3.14t");
        m.inc_discovered(DiscoveryResult::Excluded, "");
        let t = m.render();
        let d = "pyebpf_processes_discovered_total";
        assert_eq!(
            by_python(&t, d, &[("result", "profiled")]),
            series(&[("3.11", 1.0), ("3.14", 2.0)])
        );
        assert_eq!(
            by_python(&t, d, &[("result", "unsupported")]),
            series(&[("3.10", 1.0), ("3.14t", 1.0), ("3.16", 1.0)])
        );
        assert_eq!(
            by_python(&t, d, &[("result", "excluded")]),
            series(&[("", 1.0)])
        );
        assert_eq!(
            by_python(&t, d, &[("result", "not_python")]),
            series(&[("", 0.0)])
        );
    }

    #[test]
    fn python_label_values_are_capped() {
        let m = Metrics::new();
        // 3.11 and 3.14 are seen first; then a hostile host shows many more.
        m.inc_discovered(DiscoveryResult::Profiled, "3.11");
        m.set_processes_profiled([("3.14", 1)]);
        let fake: Vec<String> = (0..100).map(|i| format!("9.{i}")).collect();
        for v in &fake {
            m.inc_discovered(DiscoveryResult::Unsupported, v);
        }
        m.set_processes_profiled(
            [("3.14", 1), ("3.11", 1)]
                .into_iter()
                .chain(fake.iter().map(|v| (v.as_str(), 1))),
        );
        let t = m.render();
        let d = "pyebpf_processes_discovered_total";
        let unsupported = by_python(&t, d, &[("result", "unsupported")]);
        // 32 values in all: 3.11, 3.14 and the first 30 others; the other 70
        // are counted under "other".
        assert_eq!(
            unsupported.len(),
            MAX_PYTHON_LABELS - 2 + 1,
            "{unsupported:?}"
        );
        assert_eq!(
            unsupported.iter().find(|(p, _)| p == OTHER_PYTHON),
            Some(&(OTHER_PYTHON.to_string(), 70.0))
        );
        assert!(unsupported.iter().any(|(p, _)| p == "9.29"));
        assert!(!unsupported.iter().any(|(p, _)| p == "9.30"));
        // Values already seen keep their own series.
        m.inc_discovered(DiscoveryResult::Profiled, "3.11");
        m.inc_discovered(DiscoveryResult::Unsupported, "9.0");
        m.inc_discovered(DiscoveryResult::Unsupported, "9.99");
        m.inc_discovered(DiscoveryResult::NotPython, "");
        let t = m.render();
        assert_eq!(
            value(&t, d, &[("result", "profiled"), ("python", "3.11")]),
            Some(2.0)
        );
        assert_eq!(
            value(&t, d, &[("result", "unsupported"), ("python", "9.0")]),
            Some(2.0)
        );
        assert_eq!(
            value(
                &t,
                d,
                &[("result", "unsupported"), ("python", OTHER_PYTHON)]
            ),
            Some(71.0)
        );
        assert_eq!(
            value(&t, d, &[("result", "not_python"), ("python", "")]),
            Some(1.0)
        );
        // The gauge shares the cap: the 70 versions past it are summed.
        let profiled = by_python(&t, "pyebpf_processes_profiled", &[]);
        assert_eq!(profiled.len(), MAX_PYTHON_LABELS + 1, "{profiled:?}");
        assert!(profiled.contains(&(OTHER_PYTHON.to_string(), 70.0)));
        assert!(profiled.contains(&("3.14".to_string(), 1.0)));
        // Every python value in the whole output is one of 32 + other + "".
        let values: HashSet<String> = parse(&t)
            .into_iter()
            .flat_map(|(_, l, _)| l)
            .filter(|(k, _)| k == "python")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(values.len(), MAX_PYTHON_LABELS + 2, "{values:?}");
    }

    fn py(name: &str, file: &str) -> Frame {
        Frame::Python {
            qualname: name.into(),
            filename: file.into(),
            line: 1,
            first_line: 1,
        }
    }

    #[test]
    fn top_functions_by_own_samples() {
        let mut p = Profile::new(100);
        let root = py("<module>", "/a.py");
        p.add(vec![root.clone(), py("f", "/a.py")], 5);
        p.add(vec![root.clone(), py("g", "/a.py"), py("f", "/a.py")], 4);
        p.add(vec![root.clone(), py("g", "/a.py")], 3);
        p.add(vec![root.clone(), py("f", "/b.py")], 3);
        p.add(vec![root.clone()], 1);
        p.add(vec![root.clone(), py("h", "/a.py")], 0);
        // Non-Python leaves are not functions.
        p.add(
            vec![
                root.clone(),
                Frame::Unknown {
                    reason: UnknownReason::Stale,
                },
            ],
            50,
        );
        p.add(vec![Frame::Truncated, py("f", "/a.py")], 1);
        p.add(vec![], 7);
        let p = CompactProfile::from(&p);

        let all = top_functions(&p, 10);
        assert_eq!(
            all,
            vec![
                ("f".to_string(), "/a.py".to_string(), 10),
                ("f".to_string(), "/b.py".to_string(), 3),
                ("g".to_string(), "/a.py".to_string(), 3),
                ("<module>".to_string(), "/a.py".to_string(), 1),
            ]
        );
        assert_eq!(top_functions(&p, 2), all[..2].to_vec());
        assert!(top_functions(&p, 0).is_empty());
        assert!(top_functions(&CompactProfile::new(100), 5).is_empty());
    }

    #[test]
    fn top_function_series_are_capped() {
        let m = Metrics::new();
        let f = |name: &str, n: u64| (name.to_string(), "/app.py".to_string(), n);
        let top = vec![
            (labels(1, "web"), vec![f("a", 50), f("b", 5), f("c", 1)]),
            (labels(2, "worker"), vec![f("x", 20), f("y", 5)]),
        ];
        m.set_top_functions(&top, 3);
        let t = m.render();
        let series: Vec<_> = parse(&t)
            .into_iter()
            .filter(|(n, _, _)| n == "pyebpf_function_samples")
            .collect();
        assert_eq!(series.len(), 3, "{t}");
        assert_eq!(
            value(
                &t,
                "pyebpf_function_samples",
                &[
                    ("pid", "1"),
                    ("service", "web"),
                    ("function", "a"),
                    ("file", "/app.py")
                ]
            ),
            Some(50.0)
        );
        assert_eq!(
            value(
                &t,
                "pyebpf_function_samples",
                &[("pid", "2"), ("service", "worker"), ("function", "x")]
            ),
            Some(20.0)
        );
        // Tie at 5: pid 1 first.
        assert_eq!(
            value(
                &t,
                "pyebpf_function_samples",
                &[("pid", "1"), ("function", "b")]
            ),
            Some(5.0)
        );
        assert_eq!(
            value(
                &t,
                "pyebpf_function_samples",
                &[("pid", "2"), ("function", "y")]
            ),
            None
        );
        assert_eq!(value(&t, "pyebpf_function_series_dropped", &[]), Some(2.0));

        // The next update replaces every series.
        m.set_top_functions(&[(labels(3, "batch"), vec![f("z", 9)])], 3);
        let t = m.render();
        let series: Vec<_> = parse(&t)
            .into_iter()
            .filter(|(n, _, _)| n == "pyebpf_function_samples")
            .collect();
        assert_eq!(series.len(), 1);
        assert_eq!(
            value(
                &t,
                "pyebpf_function_samples",
                &[("pid", "3"), ("function", "z")]
            ),
            Some(9.0)
        );
        assert_eq!(value(&t, "pyebpf_function_series_dropped", &[]), Some(0.0));

        m.set_top_functions(&top, 0);
        let t = m.render();
        assert!(!t.lines().any(|l| l.starts_with("pyebpf_function_samples{")));
        assert_eq!(value(&t, "pyebpf_function_series_dropped", &[]), Some(5.0));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        let nasty = [
            ("quote\"d", "/srv/a\\b.py"),
            ("new\nline", "/srv/ü/модуль.py"),
            ("<lambda>", "{weird}, \"file\"\n"),
        ];
        let funcs: Vec<FunctionSamples> = nasty
            .iter()
            .enumerate()
            .map(|(i, (f, file))| (f.to_string(), file.to_string(), i as u64 + 1))
            .collect();
        m.set_top_functions(&[(labels(9, "svc \"x\"\nÿ"), funcs)], 100);
        let t = m.render();
        let parsed = parse(&t);
        for (i, (f, file)) in nasty.iter().enumerate() {
            let (_, l, v) = parsed
                .iter()
                .find(|(n, l, _)| {
                    n == "pyebpf_function_samples"
                        && l.iter().any(|(k, val)| k == "function" && val == f)
                })
                .unwrap_or_else(|| panic!("{f:?} not found in {t}"));
            assert_eq!(*v, i as f64 + 1.0);
            assert!(l.contains(&("file".to_string(), file.to_string())));
            assert!(l.contains(&("service".to_string(), "svc \"x\"\nÿ".to_string())));
        }
    }
}
