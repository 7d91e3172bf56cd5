//! The daemon's main loop: discovery, sampling, windows, exports, signals.
//!
//! One task owns the sampler, the discovery tracker and the exporters; the
//! HTTP API reads the shared store. Inspections of new processes (ELF parsing,
//! memory reads) run on the blocking pool so they never delay the ring buffer.
use crate::store::unix_secs;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use aya::maps::{MapData, RingBuf};
use profiler_common::{ProcEvent, PROC_EVENT_EXEC, PROC_EVENT_EXIT};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use super::config::{Config, Discovery};
use super::discovery::{
    failed_process, inspect_candidate, list_pids, unsupported_process, Candidate, Inspection,
    Lifecycle, Seen, Tracker,
};
use super::export::Exporters;
use super::metrics::{top_functions, DiscoveryResult, Metrics, ProcessEvent};
use super::shared::Shared;
use super::store_metrics::StoreMetrics;
use crate::bpf::events;
use crate::bpf::sampler::{drain_timer, poll_ring, Sampler, SamplerConfig};
use crate::model::labels::ProcessLabels;
use crate::process::exe_filter::ExeFilter;
use crate::process::python::{self, InspectError};
use crate::profile::CompactProfile;
use crate::store::{NewProcess, Store, StoreLimits};

/// How the daemon was started.
pub struct DaemonOptions {
    pub config: Config,
    /// Re-read on SIGHUP.
    pub config_path: Option<PathBuf>,
    /// Serve the HTTP API on `config.listen` (`pyebpf top` samples without it).
    pub serve_http: bool,
}

/// Requests to the running loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Control {
    Reload,
    Stop,
}

/// A running daemon loop.
pub struct Handle {
    pub shared: Arc<Shared>,
    /// Where the HTTP API listens, when served.
    pub http_addr: Option<SocketAddr>,
    control: tokio::sync::mpsc::Sender<Control>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Handle {
    /// Re-reads the configuration file (SIGHUP).
    pub async fn reload(&self) {
        let _ = self.control.send(Control::Reload).await;
    }

    /// Stops sampling, flushes the last window to its outputs, and waits.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.control.send(Control::Stop).await;
        self.task.await.context("the daemon loop panicked")?
    }

    /// Whether the loop ended by itself (an error).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Runs a prepared daemon until SIGTERM or SIGINT; SIGHUP reloads the
/// configuration.
pub async fn run(prepared: Prepared) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut h = start(prepared).await?;
    loop {
        tokio::select! {
            _ = sighup.recv() => h.reload().await,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            r = &mut h.task => {
                // The loop only ends by itself on an error.
                return r.context("the daemon loop panicked")?;
            }
        }
    }
    h.stop().await
}

/// Result of inspecting one candidate on the blocking pool.
struct Inspected {
    candidate: Candidate,
    /// Triggered by an exec event (the new program may not be mapped yet).
    after_exec: bool,
    /// After an exec: whether the executable can be or load an interpreter
    /// (only then is a "not Python" answer retried).
    plausible: bool,
    /// The pid's exec/exit generation when the inspection started (see
    /// [`Lifecycle`]).
    exec_gen: u64,
    /// The rules the inspection applied (a reload may replace them before
    /// it ends).
    rules: Discovery,
    result: Result<Inspection, InspectError>,
}

fn inspect(
    candidate: Candidate,
    delay: Duration,
    after_exec: bool,
    exec_gen: u64,
    rules: Discovery,
    filter: &ExeFilter,
) -> Inspected {
    // A program that can neither be nor load an interpreter is not waited
    // for, nor inspected.
    let plausible = !after_exec || filter.plausible(candidate.pid);
    if !plausible {
        return Inspected {
            candidate,
            after_exec,
            plausible,
            exec_gen,
            rules,
            result: Err(InspectError::NotPython(
                candidate.pid,
                python::command(candidate.pid).unwrap_or_default(),
            )),
        };
    }
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    // Rules first: an excluded process never has its ELF files parsed.
    let result = inspect_candidate(candidate, &rules, python::shared_cache());
    Inspected {
        candidate,
        after_exec,
        plausible,
        exec_gen,
        rules,
        result,
    }
}

/// `PROCS` entries for a process limit: a few more than the limit, so a
/// pid being replaced (exec, reuse) never makes an insert fail.
/// How often freed heap memory is handed back (also after every window).
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Hands the heap memory freed since the last call back to the kernel:
/// glibc keeps freed pages mapped, so a window's transient copies would
/// otherwise stay in RSS as a high-water mark. Nothing to do elsewhere
/// (musl returns large blocks itself).
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only gives free memory of glibc's heaps back.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn procs_capacity(max_processes: u32) -> u32 {
    max_processes
        .saturating_add(64)
        .min(profiler_common::MAX_PROCS_ENTRIES)
}

/// The store's limits from `c`; processes are capped at `procs_capacity`,
/// what the BPF map sized at start holds.
fn store_limits(c: &Config, procs_capacity: u32) -> StoreLimits {
    StoreLimits {
        retention_secs: u32::try_from(c.aggregation.retention_secs).unwrap_or(u32::MAX),
        max_processes: c.aggregation.max_processes.min(procs_capacity) as usize,
        max_stacks_per_process: c.aggregation.max_stacks_per_process as usize,
        max_bytes: (c.aggregation.memory_budget_mib as usize) << 20,
        max_bytes_per_process: (c.aggregation.process_memory_budget_mib as usize) << 20,
    }
}

/// Everything the main loop owns.
struct Daemon {
    config: Config,
    config_path: Option<PathBuf>,
    sampler: Sampler,
    shared: Arc<Shared>,
    tracker: Tracker,
    inspections: JoinSet<Inspected>,
    exporters: Exporters,
    /// Start (unix seconds) of the window being filled.
    window_start: u64,
    /// When freed heap memory was last handed back to the kernel.
    last_trim: Instant,
    /// Totals already reported to counters, to add deltas.
    reported_samples: u64,
    reported_evicted_stacks: u64,
    store_metrics: StoreMetrics,
    /// Exec and exit generations per pid: an inspection started before the
    /// pid's latest exec or exit looked at a program that is gone, so its
    /// answer is dropped (an exec starts a new inspection).
    lifecycle: Lifecycle,
    /// Verdicts on executables, for execs (shared with inspections).
    exe_filter: Arc<ExeFilter>,
    /// Pids not sampled whose exit BPF reports (being inspected, waiting
    /// for a retry, listed as unsupported).
    watched: HashSet<u32>,
    /// `PROCS` entries, fixed at load.
    procs_capacity: u32,
    /// The runtime of the HTTP API and the exporters' tasks (the loop runs
    /// on its own).
    api: tokio::runtime::Handle,
}

impl Daemon {
    fn spawn_inspection(&mut self, c: Candidate, delay: Duration, after_exec: bool) {
        let exec_gen = self.lifecycle.generation(c.pid);
        let rules = self.config.discovery.clone();
        let filter = self.exe_filter.clone();
        // Its exit, should it come before the answer, must be heard of.
        self.watch(c.pid);
        self.inspections
            .spawn_blocking(move || inspect(c, delay, after_exec, exec_gen, rules, &filter));
    }

    /// Asks BPF to report `pid`'s exit though it is not sampled.
    fn watch(&mut self, pid: u32) {
        if self.watched.contains(&pid) || self.sampler.watch(pid) {
            self.watched.insert(pid);
        }
    }

    fn unwatch(&mut self, pid: u32) {
        if self.watched.remove(&pid) {
            self.sampler.unwatch(pid);
        }
    }

    /// Keeps watching `pid` only while an answer about it is pending or it
    /// is listed (unsupported); a profiled one is in `PROCS`, which BPF
    /// reports the exit of anyway.
    fn settle_watch(&mut self, pid: u32, state: Option<Seen>) {
        match state {
            Some(Seen::Failed { .. } | Seen::Unsupported) => {}
            _ => self.unwatch(pid),
        }
    }

    /// Between full scans: pids never seen before. A process forked without
    /// an exec (prefork servers' workers, multiprocessing's fork start
    /// method) sends no event; it is found here within a second. Costs one
    /// listing of /proc, and a stat of each new pid only.
    fn scan_new(&mut self) {
        let fresh: Vec<u32> = list_pids()
            .into_iter()
            .filter(|pid| self.tracker.get(*pid).is_none())
            .collect();
        for c in self.tracker.new_candidates(&fresh) {
            self.spawn_inspection(c, Duration::ZERO, false);
        }
    }

    fn scan(&mut self) {
        let pids = list_pids();
        let live: HashSet<u32> = pids.iter().copied().collect();
        self.tracker.prune(&live);
        self.lifecycle.retain(&live);
        let gone: Vec<u32> = self
            .watched
            .iter()
            .filter(|p| !live.contains(p))
            .copied()
            .collect();
        for pid in gone {
            self.unwatch(pid);
        }
        for ended in self.tracker.take_ended() {
            self.stop_profiling(ended.pid);
        }
        // Safety net for missed exit events.
        let stale: Vec<u32> = self
            .shared
            .store()
            .live()
            .into_iter()
            .filter(|(pid, start)| !python::is_alive(*pid, *start))
            .map(|(pid, _)| pid)
            .collect();
        for pid in stale {
            self.stop_profiling(pid);
            self.tracker.forget(pid);
        }
        for c in self.tracker.new_candidates(&pids) {
            self.spawn_inspection(c, Duration::ZERO, false);
        }
    }

    fn stop_profiling(&mut self, pid: u32) {
        self.sampler.remove_process(pid);
        self.shared.store().mark_exited(pid, SystemTime::now());
    }

    /// [`Self::stop_profiling`] for an exec: the pid lives on running
    /// another program, named in /processes. Unreadable (the process has
    /// exited since), it is an exit.
    fn stop_profiling_exec(&mut self, pid: u32) {
        match crate::process::python::command(pid) {
            Ok(comm) => {
                self.sampler.remove_process(pid);
                let now = SystemTime::now();
                self.shared.store().mark_replaced(pid, comm, now);
            }
            Err(_) => self.stop_profiling(pid),
        }
    }

    fn on_proc_event(&mut self, ev: ProcEvent) {
        let shared = self.shared.clone();
        let metrics = &shared.metrics;
        match ev.kind {
            PROC_EVENT_EXEC => {
                metrics.inc_process_event(ProcessEvent::Exec);
                // The pid now runs a new program: whatever it was is over.
                self.lifecycle.bump(ev.pid);
                if matches!(self.tracker.get(ev.pid), Some((_, Some(Seen::Profiled))))
                    || self.watched.contains(&ev.pid)
                {
                    self.stop_profiling_exec(ev.pid);
                }
                self.tracker.forget(ev.pid);
                for c in self.tracker.new_candidates(&[ev.pid]) {
                    // A known non-interpreter executable: final at once,
                    // for one stat (most execs on a busy host).
                    if self.exe_filter.cached(c.pid) == Some(false) {
                        self.tracker.mark(c, Seen::NotPython);
                        self.unwatch(c.pid);
                        metrics.inc_exec_inspection_skipped();
                        metrics.inc_discovered(DiscoveryResult::NotPython, "");
                        continue;
                    }
                    // Give the dynamic loader a moment to map libpython.
                    self.spawn_inspection(c, Duration::from_millis(20), true);
                }
            }
            PROC_EVENT_EXIT => {
                // Only tracked pids, once their last thread is gone.
                tracing::debug!(pid = ev.pid, "exit event");
                metrics.inc_process_event(ProcessEvent::Exit);
                self.stop_profiling(ev.pid);
                self.tracker.forget(ev.pid);
                self.lifecycle.bump(ev.pid);
                // BPF dropped it from its watch list already.
                self.watched.remove(&ev.pid);
            }
            _ => {}
        }
    }

    fn on_proc_events(&mut self, events: Vec<ProcEvent>, ring: &mut RingBuf<MapData>) {
        if events.is_empty() {
            return;
        }
        // Samples queued before an exec or exit belong to the old
        // program: take them while its symbols are still known.
        self.drain_samples(ring);
        for ev in events {
            self.on_proc_event(ev);
        }
    }

    fn on_inspected(&mut self, r: Inspected) {
        let c = r.candidate;
        let current = self.lifecycle.is_current(c.pid, r.exec_gen);
        self.decide(r);
        if current {
            let state = self.tracker.state(c);
            self.settle_watch(c.pid, state);
        }
    }

    fn decide(&mut self, r: Inspected) {
        let c = r.candidate;
        if !self.lifecycle.is_current(c.pid, r.exec_gen) {
            // Started before an exec (or exit) of the pid: it may describe
            // the old program. The exec event started a fresh inspection.
            tracing::debug!(
                pid = c.pid,
                "dropped an inspection older than the last exec"
            );
            return;
        }
        if r.rules != self.config.discovery {
            // Decided under rules a reload replaced; the reload re-decides
            // every live process under the new ones (and started their
            // inspections), so this answer is dropped.
            tracing::debug!(pid = c.pid, "dropped an inspection older than the rules");
            return;
        }
        let now = Instant::now();
        let metrics = &self.shared.metrics;
        match r.result {
            Ok(Inspection::Reused) => {
                // The pid was reused meanwhile: look again from scratch.
                self.tracker.forget(c.pid);
            }
            Ok(Inspection::Excluded { labels, disabled }) => {
                // Not known to be Python (its files were not read): debug,
                // not info, as this is most processes under include rules.
                tracing::debug!(pid = c.pid, command = %labels.command, disabled, "not profiled: excluded");
                self.tracker.mark(c, Seen::Excluded);
                metrics.inc_discovered(DiscoveryResult::Excluded, "");
            }
            Ok(Inspection::Python {
                process: p,
                labels,
                disabled,
            }) => {
                if p.start_time != c.start_time {
                    // The pid was reused meanwhile: look again from scratch.
                    self.tracker.forget(c.pid);
                    return;
                }
                let python = crate::model::labels::python_label(&p.version.to_string(), false);
                if disabled || !self.config.discovery.selects(&labels) {
                    tracing::info!(pid = c.pid, command = %labels.command, disabled, "not profiled: excluded");
                    self.tracker.mark(c, Seen::Excluded);
                    metrics.inc_discovered(DiscoveryResult::Excluded, &python);
                    return;
                }
                let added = self.shared.store().add_process(
                    NewProcess {
                        labels: labels.clone(),
                        start_time: p.start_time,
                        python_version: p.version.to_string(),
                        code_format: p.code_format(),
                        gil: p.gil.clone(),
                    },
                    SystemTime::now(),
                );
                if !added {
                    tracing::warn!(
                        pid = c.pid,
                        "not profiled: aggregation.max_processes reached"
                    );
                    self.tracker.mark(c, Seen::Excluded);
                    metrics.inc_discovered(DiscoveryResult::Failed, &python);
                    return;
                }
                if let Err(e) = self.sampler.add_process(c.pid, p.proc_info()) {
                    tracing::warn!(pid = c.pid, "cannot start sampling: {e}");
                    self.shared.store().mark_exited(c.pid, SystemTime::now());
                    self.tracker.retry_later(c, now);
                    metrics.inc_discovered(DiscoveryResult::Failed, &python);
                    return;
                }
                tracing::info!(pid = c.pid, command = %labels.command, service = %labels.service,
                    version = %p.version, "profiling");
                self.tracker.mark(c, Seen::Profiled);
                metrics.inc_discovered(DiscoveryResult::Profiled, &python);
            }
            Err(e) => {
                let state = if r.after_exec && matches!(e, InspectError::NotPython(..)) {
                    // Right after exec the interpreter may not be mapped yet;
                    // only a program that can load one is waited for.
                    match self.tracker.state(c) {
                        _ if !r.plausible => {
                            self.tracker.mark(c, Seen::NotPython);
                            Some(Seen::NotPython)
                        }
                        Some(Seen::Failed { attempts, .. }) if attempts >= 4 => {
                            self.tracker.mark(c, Seen::NotPython);
                            Some(Seen::NotPython)
                        }
                        _ => Some(self.tracker.retry_later(c, now)),
                    }
                } else {
                    self.tracker.record_error(c, &e, now)
                };
                match state {
                    Some(Seen::NotPython) => metrics.inc_discovered(DiscoveryResult::NotPython, ""),
                    Some(Seen::Unsupported) => {
                        // Counted and logged once per process (a reload
                        // inspects it again; the store remembers it).
                        if let Some(u) = unsupported_process(c, &e) {
                            let python = u.python();
                            if self.shared.store().add_unsupported(u, SystemTime::now()) {
                                tracing::info!(pid = c.pid, python = %python, "not profiled: {e}");
                                metrics.inc_discovered(DiscoveryResult::Unsupported, &python);
                            }
                        }
                    }
                    Some(Seen::GaveUp) => {
                        metrics.inc_discovered(DiscoveryResult::Failed, "");
                        // A Python process is listed in /processes with the
                        // reason and warned about once; any other is not
                        // worth a warning (a policy denying the daemon
                        // access may cover most of the host).
                        match failed_process(c, &e) {
                            Some(f) => {
                                if self.shared.store().add_unsupported(f, SystemTime::now()) {
                                    tracing::warn!(pid = c.pid, "not profiled, gave up: {e}");
                                }
                            }
                            None => tracing::debug!(pid = c.pid, "not profiled, gave up: {e}"),
                        }
                    }
                    _ => tracing::debug!(pid = c.pid, "will retry: {e}"),
                }
            }
        }
    }

    /// Decodes records without the store lock, then adds them in batches
    /// that take it only briefly (`Shared::add_samples`); batches bound the
    /// memory of decoded stacks while the ring keeps filling.
    fn drain_samples(&mut self, ring: &mut RingBuf<MapData>) {
        self.shared.note_drain();
        const BATCH: usize = 1024;
        let now = SystemTime::now();
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(item) = ring.next() {
            match events::decode(&item) {
                Ok(s) => batch.push(s),
                Err(e) => {
                    self.store_metrics.inc_decode_errors();
                    tracing::debug!("bad ring-buffer record: {e}");
                }
            }
            if batch.len() >= BATCH {
                self.shared.add_samples(batch.drain(..), now);
            }
        }
        if !batch.is_empty() {
            self.shared.add_samples(batch, now);
        }
    }

    /// Once a second: expire old data and refresh the health metrics.
    fn tick(&mut self) {
        if self.last_trim.elapsed() >= TRIM_EVERY {
            release_freed_memory();
            self.last_trim = Instant::now();
        }
        let metrics = &self.shared.metrics;
        let (stats, symbols, by_python) = {
            let mut store = self.shared.store();
            store.expire(SystemTime::now());
            self.store_metrics.set(
                &store.stats,
                &store.bytes(),
                &store.limits(),
                store.stacks_held(),
            );
            (
                store.stats,
                store.symbol_stats(),
                store.processes_profiled_by_python(),
            )
        };
        metrics.add_samples_received(stats.samples.saturating_sub(self.reported_samples));
        metrics.add_stacks_evicted(
            stats
                .stacks_evicted
                .saturating_sub(self.reported_evicted_stacks),
        );
        self.reported_samples = stats.samples;
        self.reported_evicted_stacks = stats.stacks_evicted;
        metrics.set_symbol_stats(&symbols);
        metrics.set_processes_profiled(by_python.iter().map(|(p, n)| (p.as_str(), *n)));
        match self.sampler.counters() {
            Ok(c) => metrics.set_bpf_counters(&c),
            Err(e) => tracing::warn!("cannot read BPF counters: {e}"),
        }
        metrics.set_run_stats(&self.sampler.run_stats());
        metrics.set_watched_processes(self.watched.len());
    }

    /// Closes the window `[window_start, until)`: exports it and refreshes
    /// the per-function metrics.
    fn flush_window(&mut self, until: u64) {
        let started = Instant::now();
        let from = self.window_start;
        if until <= from {
            return;
        }
        let k = self.config.metrics.top_functions as usize;
        let top_of = |windows: &[(ProcessLabels, CompactProfile)]| -> Vec<_> {
            windows
                .iter()
                .map(|(l, p)| (l.clone(), top_functions(p, k)))
                .collect()
        };
        let primary = self.shared.store().kind();
        let (top, windows) = if self.exporters.any() {
            // One window per profile type held, each exported as its own
            // profile; the top functions are the default type's.
            let store = self.shared.store();
            let mut windows = store.window(from, until);
            let top = top_of(&windows);
            for kind in store.types().iter().filter(|k| **k != primary) {
                windows.extend(store.window_kind(from, until, *kind));
            }
            drop(store);
            (top, windows)
        } else {
            (
                top_of(&self.shared.store().window_leaves(from, until)),
                Vec::new(),
            )
        };
        self.shared
            .metrics
            .set_top_functions(&top, self.config.metrics.max_function_series as usize);
        let views = self.shared.store().views();
        self.shared.metrics.set_gil_waits(&views);
        self.exporters
            .export(windows, from, until, primary, &self.shared.metrics);
        self.window_start = until;
        release_freed_memory();
        self.last_trim = Instant::now();
        self.shared.metrics.observe_window_flush(started.elapsed());
    }

    /// SIGHUP: re-read the configuration and apply what can change live.
    fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            tracing::info!("SIGHUP: no --config file to reload");
            return;
        };
        let new = match super::config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("SIGHUP: keeping the current configuration: {e}");
                return;
            }
        };
        if new.sampling != self.config.sampling || new.listen != self.config.listen {
            tracing::warn!("SIGHUP: sampling and listen settings take effect after a restart");
        }
        if new.logging != self.config.logging {
            tracing::warn!("SIGHUP: logging settings take effect after a restart");
        }
        if new.aggregation.max_processes > self.procs_capacity {
            tracing::warn!(
                "SIGHUP: aggregation.max_processes above {} takes effect after a restart (the \
                 BPF map of processes is sized at start)",
                self.procs_capacity
            );
        }
        {
            let mut store = self.shared.store();
            store.set_limits(store_limits(&new, self.procs_capacity));
            // New stacks follow it; those held keep their shape.
            store.set_per_thread(new.aggregation.per_thread);
        }
        self.shared.set_api(&new.api);
        if new.outputs != self.config.outputs {
            // Export tasks run on the API runtime, not the ingest thread.
            let _api = self.api.enter();
            match Exporters::new(&new.outputs, &self.shared.metrics) {
                Ok(e) => {
                    let old = std::mem::replace(&mut self.exporters, e);
                    self.api.spawn(old.shutdown(Duration::from_secs(10)));
                }
                Err(e) => tracing::error!("SIGHUP: outputs unchanged: {e}"),
            }
        }
        let rules_changed = new.discovery != self.config.discovery;
        self.config = new;
        tracing::info!("SIGHUP: configuration reloaded from {}", path.display());
        if rules_changed {
            // Decide every process again under the new rules, keeping the
            // ones that still qualify (and their data) as they are.
            let keep: Vec<_> = {
                let store = self.shared.store();
                store
                    .views()
                    .into_iter()
                    .filter(|v| v.status == "profiled")
                    .map(|v| v.labels)
                    .collect()
            };
            self.tracker = Tracker::new();
            for l in keep {
                let Ok(start_time) = python::start_time(l.pid) else {
                    continue;
                };
                let c = Candidate {
                    pid: l.pid,
                    start_time,
                };
                if self.config.discovery.selects(&l) {
                    self.tracker.new_candidates(&[l.pid]);
                    self.tracker.mark(c, Seen::Profiled);
                } else {
                    tracing::info!(pid = l.pid, "no longer selected by the rules");
                    self.stop_profiling(l.pid);
                }
            }
            self.scan();
        }
        tracing::info!("configuration reloaded from {}", path.display());
    }
}

/// What needs privileges, done before any thread starts: the sampler
/// loaded and attached, and the API's sockets bound. The caller may then
/// drop the capabilities it no longer needs for the whole process
/// ([`crate::caps::drop_after_start`]) and [`start`] the rest.
pub struct Prepared {
    opts: DaemonOptions,
    sampler: Sampler,
    procs_capacity: u32,
    /// The API's listener (then `metrics_listen`'s), when served.
    listeners: Vec<(std::net::TcpListener, super::http::Access)>,
    /// Kernel symbols for off-CPU stacks, read while the capabilities
    /// that show `/proc/kallsyms`' addresses are held.
    kernel: Option<Arc<crate::native::kernel::KernelSymbols>>,
}

/// Checks the API's access rules, loads the sampler and binds the API.
/// Spawns no thread.
pub fn prepare(opts: DaemonOptions) -> anyhow::Result<Prepared> {
    let config = &opts.config;
    // Before anything is loaded: an API that would leak is not started.
    let token = match &config.api.token_file {
        Some(path) => Some(super::access::load_token(path)?),
        None => None,
    };
    if opts.serve_http {
        super::access::check_listen(config.listen, token.is_some())?;
    }
    let procs_capacity = procs_capacity(config.aggregation.max_processes);
    let sampler = Sampler::start(SamplerConfig {
        rate_hz: config.sampling.rate_hz,
        max_depth: config.sampling.max_depth,
        ring_bytes: config.sampling.ring_buffer_bytes,
        process_events: true,
        max_processes: procs_capacity,
        on_cpu: config.sampling.on_cpu(),
        // Each off-CPU sample weighs at least one CPU sample's period.
        off_cpu_period_ns: config
            .sampling
            .off_cpu()
            .then(|| 1_000_000_000 / config.sampling.rate_hz.max(1)),
        kernel_stacks: config.sampling.off_cpu(),
        user_stack_bytes: if config.sampling.native_stacks {
            profiler_common::USER_STACK_MAX as u32
        } else {
            0
        },
    })?;
    // Off-CPU stacks end in the kernel frames of where threads wait: their
    // names are read now, before the capabilities are dropped.
    let kernel = if config.sampling.off_cpu() {
        match crate::native::kernel::KernelSymbols::new(crate::native::kernel::DEFAULT_CACHE_BYTES)
        {
            Ok(k) => Some(Arc::new(k)),
            Err(e) => {
                tracing::warn!("kernel frames will show addresses: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let mut listeners = Vec::new();
    if opts.serve_http {
        let access = super::http::Access {
            token,
            metrics_only: false,
        };
        listeners.push((bind(config.listen)?, access));
        if let Some(listen) = config.metrics_listen {
            let access = super::http::Access {
                token: None,
                metrics_only: true,
            };
            listeners.push((bind(listen)?, access));
        }
    }
    Ok(Prepared {
        opts,
        sampler,
        procs_capacity,
        listeners,
        kernel,
    })
}

/// A non-blocking listener on `addr`, for the runtime to take over.
fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let l =
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    l.set_nonblocking(true)
        .with_context(|| format!("cannot listen on {addr}"))?;
    Ok(l)
}

/// Starts the HTTP API (if asked) and the main loop of a prepared daemon.
pub async fn start(prepared: Prepared) -> anyhow::Result<Handle> {
    let Prepared {
        opts,
        mut sampler,
        procs_capacity,
        listeners,
        kernel,
    } = prepared;
    let config = opts.config;
    // Polled by the ingest thread's runtime (an `AsyncFd` belongs to the
    // runtime it is made in).
    let ring = sampler.take_ring().context("sample ring buffer")?;
    let proc_ring = sampler
        .take_proc_events()
        .context("process event ring buffer")?;

    let mut store = Store::with_types(
        store_limits(&config, procs_capacity),
        config.sampling.rate_hz as u32,
        &config.sampling.types,
    );
    if let Some(k) = kernel {
        store.set_kernel_symbols(k);
    }
    store.set_per_thread(config.aggregation.per_thread);
    if config.sampling.native || config.sampling.native_stacks {
        // Its thread starts with the first stack to name, after the
        // capabilities were dropped.
        store.set_native(crate::native::service::NativeService::new(
            crate::native::stacks::NativeLimits::default(),
        ));
    }
    let metrics = Metrics::new();
    let store_metrics = StoreMetrics::register(metrics.registry());
    let shared = Arc::new(Shared::new(store, metrics));
    shared.set_api(&config.api);
    let mut http = Vec::new();
    let mut http_addr = None;
    for (listener, access) in listeners {
        let metrics_only = access.metrics_only;
        let (task, addr) = spawn_server(listener, &shared, access)?;
        if metrics_only {
            tracing::info!("metrics and health on http://{addr}");
        } else {
            tracing::info!("HTTP API on http://{addr}");
            http_addr = Some(addr);
        }
        http.push(task);
    }

    let exporters = Exporters::new(&config.outputs, &shared.metrics)?;
    let rescan_every = Duration::from_secs(config.discovery.rescan_interval_secs);
    let window_every = Duration::from_secs(config.aggregation.window_secs);
    let d = Daemon {
        config,
        config_path: opts.config_path,
        sampler,
        shared: shared.clone(),
        tracker: Tracker::new(),
        inspections: JoinSet::new(),
        exporters,
        window_start: unix_secs(SystemTime::now()),
        last_trim: Instant::now(),
        reported_samples: 0,
        reported_evicted_stacks: 0,
        store_metrics,
        lifecycle: Lifecycle::default(),
        exe_filter: Arc::new(ExeFilter::new()),
        watched: HashSet::new(),
        procs_capacity,
        api: tokio::runtime::Handle::current(),
    };

    let (control, control_rx) = tokio::sync::mpsc::channel(4);
    // Ingest (draining, symbolising, inserting, discovery, window flushes)
    // runs on its own thread and runtime: the HTTP API's workers never wait
    // for it, and it never waits for them. Export tasks stay on this
    // runtime (see `Daemon::api`).
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pyebpf-ingest".into())
        .spawn(move || {
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot build the ingest runtime")
                .and_then(|rt| {
                    rt.block_on(async move {
                        let ring = poll_ring(ring)?;
                        let proc_ring = poll_ring(proc_ring)?;
                        main_loop(
                            d,
                            ring,
                            proc_ring,
                            control_rx,
                            rescan_every,
                            window_every,
                            http,
                        )
                        .await
                    })
                });
            let _ = done.send(r);
        })
        .context("cannot start the ingest thread")?;
    let task = tokio::spawn(async move {
        result
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the ingest thread panicked")))
    });
    Ok(Handle {
        shared,
        http_addr,
        control,
        task,
    })
}

type HttpTask = (
    tokio::task::JoinHandle<std::io::Result<()>>,
    tokio::sync::oneshot::Sender<()>,
);

/// Serves the API on `listener` with `access`, until the task's sender fires.
fn spawn_server(
    listener: std::net::TcpListener,
    shared: &Arc<Shared>,
    access: super::http::Access,
) -> anyhow::Result<(HttpTask, SocketAddr)> {
    let listener =
        tokio::net::TcpListener::from_std(listener).context("cannot serve the HTTP API")?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(super::http::serve(
        listener,
        shared.clone(),
        access,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(((task, stop), addr))
}

async fn main_loop(
    mut d: Daemon,
    mut ring: AsyncFd<RingBuf<MapData>>,
    mut proc_ring: AsyncFd<RingBuf<MapData>>,
    mut control: tokio::sync::mpsc::Receiver<Control>,
    rescan_every: Duration,
    window_every: Duration,
    http: Vec<HttpTask>,
) -> anyhow::Result<()> {
    let shared = d.shared.clone();
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut batch = drain_timer();
    let mut rescan = tokio::time::interval(rescan_every);
    let mut window =
        tokio::time::interval_at(tokio::time::Instant::now() + window_every, window_every);
    let mut ready = false;
    d.scan();
    rescan.reset();

    loop {
        if !ready && d.inspections.is_empty() {
            ready = true;
            shared.set_ready(Ok(()));
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            tracing::info!(
                "ready: {} processes profiled",
                shared.store().processes_profiled()
            );
        }
        let retry_at = d.tracker.next_retry().map(tokio::time::Instant::from_std);
        tokio::select! {
            g = ring.readable_mut() => {
                let mut g = g.context("polling the sample ring buffer")?;
                d.drain_samples(g.get_inner_mut());
                g.clear_ready();
            }
            g = proc_ring.readable_mut() => {
                let mut g = g.context("polling the process event ring buffer")?;
                let events = events::drain_proc_events(g.get_inner_mut());
                g.clear_ready();
                d.on_proc_events(events, ring.get_mut());
            }
            Some(r) = d.inspections.join_next() => {
                // Events already queued come first: an exec or exit of the
                // pid makes this answer stale (see `Lifecycle`).
                let events = events::drain_proc_events(proc_ring.get_mut());
                d.on_proc_events(events, ring.get_mut());
                match r {
                    Ok(i) => d.on_inspected(i),
                    Err(e) => tracing::error!("an inspection task failed: {e}"),
                }
            }
            _ = async { tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)).await }, if retry_at.is_some() => {
                let now = Instant::now();
                for c in d.tracker.due_retries(now) {
                    // Parked until the inspection answers, so it is not
                    // handed out twice; the answer reschedules it.
                    if let Some(Seen::Failed { attempts, .. }) = d.tracker.state(c) {
                        d.tracker.mark(c, Seen::Failed { attempts, next_retry: now + Duration::from_secs(3600) });
                    }
                    d.spawn_inspection(c, Duration::ZERO, false);
                }
            }
            _ = batch.tick() => d.drain_samples(ring.get_mut()),
            _ = second.tick() => {
                d.tick();
                d.scan_new();
            }
            _ = rescan.tick() => d.scan(),
            _ = window.tick() => {
                // Queued samples belong to the window being closed.
                d.drain_samples(ring.get_mut());
                d.flush_window(unix_secs(SystemTime::now()));
            }
            c = control.recv() => match c {
                Some(Control::Reload) => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                    let (window_secs, rescan_secs) = (
                        d.config.aggregation.window_secs,
                        d.config.discovery.rescan_interval_secs,
                    );
                    d.reload();
                    // The intervals were made from the old configuration.
                    if d.config.aggregation.window_secs != window_secs {
                        // The window being filled closes at the new length.
                        let every = Duration::from_secs(d.config.aggregation.window_secs);
                        window = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                    }
                    if d.config.discovery.rescan_interval_secs != rescan_secs {
                        rescan = tokio::time::interval(Duration::from_secs(
                            d.config.discovery.rescan_interval_secs,
                        ));
                        rescan.reset();
                    }
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                }
                Some(Control::Stop) | None => break,
            },
        }
    }

    tracing::info!("stopping: flushing the last window");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    shared.set_ready(Err("shutting down".into()));
    for (pid, _) in shared.store().live() {
        d.sampler.remove_process(pid);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    d.drain_samples(ring.get_mut());
    d.tick();
    // The current, partial second is part of the last window.
    d.flush_window(unix_secs(SystemTime::now()) + 1);
    let exporters = std::mem::replace(&mut d.exporters, Exporters::none());
    exporters.shutdown(Duration::from_secs(10)).await;
    for (task, stop) in http {
        let _ = stop.send(());
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("HTTP server: {e}"),
            Err(e) => tracing::warn!("HTTP server task: {e}"),
        }
    }
    Ok(())
}
