//! `pyebpf record`: profile chosen CPython processes to a file.
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use aya::maps::{MapData, RingBuf};
use profiler_common::{Counter, OffCpuCounter, ReadStep};

use crate::bpf::counters::Counters;
use crate::bpf::events;
use crate::bpf::sampler::{drain_timer, poll_ring, Sampler, SamplerConfig};
use crate::model::labels::ProcessLabels;
use crate::native::kernel::KernelSymbols;
use crate::native::service::NativeService;
use crate::process::exe_filter::ExeFilter;
use crate::process::python::{self, InspectError, PythonProcess};
use crate::profile::{CompactProfile, Format, Frame, Profile, ProfileKind, ValueUnit};
use crate::store::{NewProcess, Store, StoreLimits};
use profiler_common::{PROC_EVENT_EXEC, PROC_EVENT_EXIT};

/// What `pyebpf record` was asked to do.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub pids: Vec<u32>,
    pub duration: Option<Duration>,
    /// Which time to profile (`--mode`); the sampler's on-CPU and off-CPU
    /// settings must match it ([`RecordOptions::sampler_for`]).
    pub kind: ProfileKind,
    pub sampler: SamplerConfig,
    pub format: Format,
    pub output: PathBuf,
    /// Show a live status line on stderr (when it is a terminal).
    pub status: bool,
    /// Bytes the recorded stacks may hold (`--memory-budget-mib`); beyond
    /// it the oldest seconds are evicted, and the summary says so.
    pub memory_budget: usize,
    /// End each sample's Python frames with its native leaf (`--native`).
    pub native: bool,
    /// Each thread's stacks apart, under a thread root frame (`--threads`).
    pub per_thread: bool,
}

/// `--memory-budget-mib` when not given.
pub const DEFAULT_MEMORY_BUDGET_MIB: usize = 1024;

impl RecordOptions {
    /// `sampler` set up for profiles of `kind`: on-CPU samples for cpu and
    /// wall, off-CPU intervals for wall and off-cpu, sampled with period
    /// `off_cpu_period_ns` (default: the CPU sampling period, so each
    /// off-CPU sample weighs at least one CPU sample), and kernel stacks
    /// with `kernel` or whenever off-CPU intervals are (they say where a
    /// thread waits).
    pub fn sampler_for(
        kind: ProfileKind,
        mut sampler: SamplerConfig,
        off_cpu_period_ns: Option<u64>,
        kernel: bool,
    ) -> SamplerConfig {
        sampler.on_cpu = kind.on_cpu();
        sampler.off_cpu_period_ns = kind
            .off_cpu()
            .then(|| off_cpu_period_ns.unwrap_or_else(|| sampler.cpu_period_ns()));
        sampler.kernel_stacks = kernel || kind.off_cpu();
        sampler
    }
}

/// A recorded process, as the summary describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedProcess {
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub command: String,
    /// e.g. "3.14.10".
    pub version: String,
    /// `_PyRuntime` is in libpython (a shared build), not in the executable.
    pub libpython: bool,
}

impl RecordedProcess {
    pub fn of(p: &PythonProcess) -> Self {
        RecordedProcess {
            pid: p.pid,
            command: p.command.clone(),
            version: p.version.to_string(),
            libpython: p.interp_binary != p.exe,
        }
    }

    /// `process 4242 (python3.14): CPython 3.14.10, static build` (or
    /// `libpython`).
    pub fn describe(&self) -> String {
        format!(
            "process {} ({}): CPython {}, {}",
            self.pid,
            self.command,
            self.version,
            if self.libpython {
                "libpython"
            } else {
                "static build"
            }
        )
    }
}

/// What happened during a recording, printed at the end.
#[derive(Clone, Debug, Default)]
pub struct RecordSummary {
    pub elapsed: Duration,
    /// The processes recorded, in `--pid` order.
    pub processes: Vec<RecordedProcess>,
    pub counters: Counters,
    /// Samples received and aggregated.
    pub samples: u64,
    pub distinct_stacks: usize,
    pub unknown_frames: u64,
    pub stale_code: u64,
    pub decode_errors: u64,
    pub exited: Vec<u32>,
    /// Targets that exec'd into a program that is not a CPython pyebpf can
    /// profile: pid and why (their samples before the exec are kept).
    pub exec_not_python: Vec<(u32, String)>,
    /// Kernel-measured run time of the BPF programs.
    pub bpf: crate::bpf::sampler::RunStats,
    /// What the profile measures.
    pub kind: ProfileKind,
    /// The profile's total, in its unit (samples or nanoseconds).
    pub total_value: u64,
    /// Samples of the oldest seconds evicted to fit the memory budget.
    pub evicted_samples: u64,
    /// Seconds (of one process each) evicted to fit the memory budget.
    pub evicted_seconds: u64,
    /// Samples counted under `[stack table full]`: their stack did not fit
    /// the memory budget even after evicting.
    pub overflowed_samples: u64,
}

impl RecordSummary {
    /// Multi-line, human-readable summary.
    pub fn render(&self, opts: &RecordOptions) -> String {
        let c = &self.counters;
        let mut s = format!(
            "pyebpf record: {:.1} s, {} process(es), {} samples ({} distinct stacks) written to {} ({})\n",
            self.elapsed.as_secs_f64(),
            opts.pids.len(),
            self.samples,
            self.distinct_stacks,
            opts.output.display(),
            format_name(opts.format),
        );
        if self.kind.unit() == ValueUnit::Nanoseconds {
            s += &format!(
                "  {}: {:.3} s in the profile (values in nanoseconds)\n",
                self.kind.describe(),
                self.total_value as f64 / 1e9
            );
        }
        for p in &self.processes {
            s += &format!("  {}\n", p.describe());
        }
        s += &format!(
            "  truncated at --max-depth {}: {}   partial (read failed): {}   ring buffer full (dropped): {}\n",
            opts.sampler.max_depth,
            c.get(Counter::Truncated),
            c.get(Counter::ReadFailed),
            c.get(Counter::RingBufFull),
        );
        let steps: Vec<String> = ReadStep::ALL
            .iter()
            .filter(|st| c.read_error(**st) > 0)
            .map(|st| format!("{} {}", st.name(), c.read_error(*st)))
            .collect();
        if !steps.is_empty() {
            s += &format!("  read failures by step: {}\n", steps.join(", "));
        }
        s += &format!(
            "  threads without Python state: {}   unknown frames: {} (code object replaced: {})   tail-call failures: {}   bad records: {}\n",
            c.get(Counter::NoThreadState),
            self.unknown_frames,
            self.stale_code,
            c.get(Counter::TailCallFailed),
            self.decode_errors,
        );
        let sampled = c.get(Counter::Sampled);
        let wakeups = c.get(Counter::Wakeups);
        s += &format!(
            "  reader wakeups: {wakeups} ({:.1} stacks per wakeup; new code objects wake it at once)\n",
            sampled as f64 / wakeups.max(1) as f64,
        );
        if self.kind.off_cpu() {
            s += &self.render_off_cpu();
        }
        if self.bpf.samples > 0 && sampled > 0 {
            // The perf-event programs only: the scheduler hooks have their line.
            let b = &self.bpf;
            let cpu = b
                .run_time
                .saturating_sub(b.switch_out.run_time + b.switch_in.run_time + b.off_walk.run_time);
            s += &format!(
                "  BPF cost (kernel stats): {:.1} us per stack sent, {:.0} ns per perf event, {:.1} ms in total\n",
                cpu.as_secs_f64() * 1e6 / sampled as f64,
                cpu.as_secs_f64() * 1e9 / b.samples as f64,
                cpu.as_secs_f64() * 1e3,
            );
        }
        if !self.exited.is_empty() {
            let p: Vec<String> = self.exited.iter().map(u32::to_string).collect();
            s += &format!(
                "  exited during recording (samples kept): {}\n",
                p.join(", ")
            );
        }
        if self.evicted_samples > 0 || self.overflowed_samples > 0 {
            // Evictions count the store's values: samples, or nanoseconds.
            let evicted = match self.kind.unit() {
                ValueUnit::Samples => format!("{} samples", self.evicted_samples),
                ValueUnit::Nanoseconds => {
                    format!("{:.3} s", self.evicted_samples as f64 / 1e9)
                }
            };
            s += &format!(
                "  memory budget ({} MiB, --memory-budget-mib) reached: {evicted} of the oldest \
                 seconds evicted ({} process-seconds), {} samples under [stack table full]\n",
                opts.memory_budget / (1 << 20),
                self.evicted_seconds,
                self.overflowed_samples,
            );
        }
        for (pid, why) in &self.exec_not_python {
            s += &format!(
                "  process {pid} exec'd into a program that is not profiled ({why}); its samples \
                 before the exec are kept\n"
            );
        }
        s
    }
}

impl RecordSummary {
    /// The off-CPU lines: intervals seen and walked, their time, what was
    /// lost, and the cost per context switch.
    fn render_off_cpu(&self) -> String {
        let o = &self.counters.off_cpu;
        let k = |c: OffCpuCounter| o.off_cpu(c);
        let mut s = format!(
            "  off-CPU: {} intervals ({:.3} s), {} walked (weights {:.3} s), {} stacks sent, \
             {} truncated, {} partial, {} without Python state, {} dropped (ring buffer full)\n",
            k(OffCpuCounter::Intervals),
            k(OffCpuCounter::IntervalNs) as f64 / 1e9,
            k(OffCpuCounter::Chosen),
            k(OffCpuCounter::WeightNs) as f64 / 1e9,
            o.get(Counter::Sampled),
            o.get(Counter::Truncated),
            o.get(Counter::ReadFailed),
            o.get(Counter::NoThreadState),
            o.get(Counter::RingBufFull),
        );
        let lost = [
            (
                k(OffCpuCounter::MapFull),
                "switch-outs not timed (thread storage not created)",
            ),
            (
                k(OffCpuCounter::Gone),
                "intervals of processes no longer profiled",
            ),
            (
                k(OffCpuCounter::KstackFailed)
                    + self.counters.cpu_extras[OffCpuCounter::KstackFailed as usize],
                "kernel stacks unreadable",
            ),
            (
                k(OffCpuCounter::RegsFailed)
                    + self.counters.cpu_extras[OffCpuCounter::RegsFailed as usize],
                "user registers unreadable",
            ),
            (o.get(Counter::TailCallFailed), "off-CPU tail-call failures"),
        ];
        let lost: Vec<String> = lost
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
        if !lost.is_empty() {
            s += &format!("  off-CPU losses: {}\n", lost.join(", "));
        }
        let (out, inn) = (self.bpf.switch_out, self.bpf.switch_in);
        if out.runs > 0 && inn.runs > 0 {
            s += &format!(
                "  scheduler hooks (kernel stats): {:.0} ns per switch-out, {:.0} ns per switch-in \
                 (walks included), {:.1} ms in total\n",
                out.ns_per_run(),
                inn.ns_per_run(),
                (out.run_time + inn.run_time).as_secs_f64() * 1e3,
            );
        }
        s
    }
}

pub fn format_name(f: Format) -> &'static str {
    match f {
        Format::Folded => "folded",
        Format::Svg => "svg",
        Format::Pprof => "pprof",
        Format::Speedscope => "speedscope",
    }
}

/// Inspects every target; the first one that cannot be profiled is an error
/// naming the reason.
pub fn inspect_targets(pids: &[u32]) -> anyhow::Result<Vec<PythonProcess>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for &pid in pids {
        if !seen.insert(pid) {
            continue;
        }
        out.push(python::inspect(pid).with_context(|| format!("cannot profile process {pid}"))?);
    }
    Ok(out)
}

/// Delays of the re-inspections after a target's exec, while its new
/// program is not recognisable yet (the loader maps libpython after exec;
/// the interpreter initialises after that).
const EXEC_RETRIES_MS: [u64; 8] = [20, 50, 100, 200, 500, 1000, 2000, 4000];

/// Every target's stacks, per program, in one [`Store`]: an exec starts a
/// new entry, so the old program's code objects are never looked up in the
/// new one. A program that ends is taken out of the store at once, since the
/// next program under its pid would replace it; samples of its pid until
/// then are counted as foreign (none expected: BPF stops sampling a pid at
/// its exec).
struct Programs {
    store: Store,
    /// Programs that ended (exec'd away, exited), oldest first.
    done: Vec<(ProcessLabels, CompactProfile)>,
}

impl Programs {
    /// The whole recording is kept: no retention limit, only `budget_bytes`
    /// evicts (the oldest seconds, counted in the store's stats).
    fn new(
        kind: ProfileKind,
        rate_hz: u32,
        budget_bytes: usize,
        kernel: Option<Arc<KernelSymbols>>,
        native: Option<Arc<NativeService>>,
    ) -> Self {
        let limits = StoreLimits {
            retention_secs: u32::MAX,
            max_processes: usize::MAX,
            max_stacks_per_process: usize::MAX,
            max_bytes: budget_bytes,
            max_bytes_per_process: budget_bytes,
        };
        let mut store = Store::of_kind(limits, rate_hz, kind);
        if let Some(k) = kernel {
            store.set_kernel_symbols(k);
        }
        if let Some(n) = native {
            store.set_native(n);
        }
        Programs {
            store,
            done: Vec::new(),
        }
    }

    fn start(&mut self, t: &PythonProcess) {
        self.end(t.pid);
        let labels = ProcessLabels {
            pid: t.pid,
            command: t.command.clone(),
            service: t.command.clone(),
            ..ProcessLabels::default()
        };
        // Never refused: there is no process limit.
        self.store.add_process(
            NewProcess {
                labels,
                start_time: t.start_time,
                python_version: t.version.to_string(),
                code_format: t.code_format(),
                gil: t.gil.clone(),
            },
            SystemTime::now(),
        );
    }

    fn end(&mut self, pid: u32) {
        if let Some(p) = self.store.take(pid) {
            self.done.push(p);
        }
    }

    fn add(&mut self, samples: Vec<events::RawSample>) {
        if !samples.is_empty() {
            self.store.add_samples(samples, SystemTime::now());
        }
    }

    /// Samples counted, evicted ones included.
    fn samples(&self) -> u64 {
        self.store.stats.samples
    }

    /// Distinct (line-level) stacks held, for the status line.
    fn distinct_stacks(&self) -> usize {
        let done: usize = self.done.iter().map(|(_, p)| p.stack_count()).sum();
        done + self.store.stacks_held()
    }

    /// One profile of every program, and the samples of its unknown frames
    /// (once per such frame). With `process_roots`, each stack starts with a
    /// `process PID (command)` frame.
    fn profile(&self, rate_hz: u32, process_roots: bool) -> (Profile, u64) {
        let mut profile = Profile::of_kind(self.store.kind(), rate_hz);
        let mut unknown = 0;
        let held = self.store.window(0, u64::MAX);
        for (labels, part) in self.done.iter().chain(held.iter()) {
            let command: Arc<str> = labels.command.as_str().into();
            for (stack, count) in part.stacks() {
                unknown += count
                    * stack
                        .iter()
                        .filter(|f| matches!(f, Frame::Unknown { .. }))
                        .count() as u64;
                let mut full = Vec::with_capacity(stack.len() + 1);
                if process_roots {
                    full.push(Frame::Process {
                        pid: labels.pid,
                        command: command.clone(),
                    });
                }
                full.extend(stack.iter().cloned());
                profile.add(full, count);
            }
        }
        (profile, unknown)
    }
}

/// A target between an exec and its new program's inspection.
#[derive(Clone, Copy, Debug)]
struct Reinspect {
    start_time: u64,
    /// Inspections failed so far.
    attempts: usize,
    due: Instant,
}

/// What to do after an inspection of an exec'd target failed with `e`:
/// `None` to give up (the reason given), `Some(delay)` to look again.
fn exec_retry(e: &InspectError, attempts: usize, plausible: bool) -> Option<Duration> {
    let retriable = match e {
        // Not mapped yet, if the executable can load an interpreter.
        InspectError::NotPython(..) => plausible,
        InspectError::NotInitialized { .. }
        | InspectError::Memory(_)
        | InspectError::Tls { .. }
        | InspectError::Elf(_)
        | InspectError::Proc { .. } => true,
        _ => false,
    };
    if !retriable {
        return None;
    }
    EXEC_RETRIES_MS
        .get(attempts)
        .map(|ms| Duration::from_millis(*ms))
}

/// Records until the duration elapses, Ctrl-C, or every target has exited.
/// A target that execs is followed into its new program (a CPython one is
/// profiled with its own layout; another is reported and left).
pub async fn run(opts: &RecordOptions) -> anyhow::Result<RecordSummary> {
    if opts.pids.is_empty() {
        bail!("no process to record: give at least one --pid");
    }
    // Before the pids are looked up: in another namespace they name other
    // processes than BPF will see.
    crate::bpf::pidns::check()?;
    let targets = inspect_targets(&opts.pids)?;
    let mut config = opts.sampler;
    config.process_events = true;
    config.max_processes = (targets.len() as u32)
        .saturating_add(16)
        .min(profiler_common::MAX_PROCS_ENTRIES);
    let mut sampler = Sampler::start(config)?;
    // Read while CAP_SYSLOG still shows the kernel's addresses.
    let kernel = if config.kernel_stacks {
        Some(Arc::new(
            KernelSymbols::new(crate::native::kernel::DEFAULT_CACHE_BYTES)
                .context("kernel stacks need the kernel's symbols")?,
        ))
    } else {
        None
    };
    // Loaded and attached: only reading the targets needs privileges now.
    let kept = crate::caps::drop_after_start()?;
    tracing::debug!("capabilities dropped; kept: {}", crate::caps::names(&kept));
    let mut programs = Programs::new(
        opts.kind,
        opts.sampler.rate_hz as u32,
        opts.memory_budget,
        kernel,
        opts.native
            .then(|| NativeService::new(crate::native::stacks::NativeLimits::default())),
    );
    programs.store.set_per_thread(opts.per_thread);
    for t in &targets {
        programs.start(t);
        sampler
            .add_process(t.pid, t.proc_info())
            .with_context(|| format!("cannot register process {}", t.pid))?;
    }
    let mut processes: Vec<RecordedProcess> = targets.iter().map(RecordedProcess::of).collect();
    let ring = sampler.take_ring().context("ring buffer already taken")?;
    let mut ring = poll_ring(ring)?;
    let proc_ring = sampler
        .take_proc_events()
        .context("process event ring buffer already taken")?;
    let mut proc_ring = poll_ring(proc_ring)?;
    let exe_filter = ExeFilter::new();

    let started = Instant::now();
    let wall_start = SystemTime::now();
    let deadline = opts.duration.map(|d| started + d);
    let mut alive: HashMap<u32, u64> = targets.iter().map(|t| (t.pid, t.start_time)).collect();
    let mut pending: HashMap<u32, Reinspect> = HashMap::new();
    let mut exited = Vec::new();
    let mut exec_not_python = Vec::new();
    let mut decode_errors = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut batch = drain_timer();
    let show_status = opts.status && std::io::stderr().is_terminal();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    loop {
        let sleep_until = deadline.map(tokio::time::Instant::from_std);
        let retry_at = pending
            .values()
            .map(|p| p.due)
            .min()
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("polling the ring buffer")?;
                drain(guard.get_inner_mut(), &mut programs, &mut decode_errors);
                guard.clear_ready();
            }
            guard = proc_ring.readable_mut() => {
                let mut guard = guard.context("polling the process event ring buffer")?;
                let events = events::drain_proc_events(guard.get_inner_mut());
                guard.clear_ready();
                if events.iter().any(|e| alive.contains_key(&e.pid)) {
                    // Samples queued before an exec or exit belong to the
                    // program that ran until then.
                    drain(ring.get_mut(), &mut programs, &mut decode_errors);
                }
                for ev in events {
                    let Some(&start_time) = alive.get(&ev.pid) else {
                        continue;
                    };
                    match ev.kind {
                        PROC_EVENT_EXEC => {
                            tracing::info!(pid = ev.pid, "target exec'd; inspecting its new program");
                            programs.end(ev.pid);
                            // Not in PROCS any more: its exit must still be heard of.
                            sampler.watch(ev.pid);
                            pending.insert(ev.pid, Reinspect {
                                start_time,
                                attempts: 0,
                                due: Instant::now() + Duration::from_millis(EXEC_RETRIES_MS[0]),
                            });
                        }
                        PROC_EVENT_EXIT => {
                            programs.end(ev.pid);
                            pending.remove(&ev.pid);
                            sampler.remove_process(ev.pid);
                            sampler.unwatch(ev.pid);
                            alive.remove(&ev.pid);
                            exited.push(ev.pid);
                        }
                        _ => {}
                    }
                }
                if alive.is_empty() {
                    tracing::info!("every target has exited; stopping");
                    break;
                }
            }
            _ = async { tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)).await }, if retry_at.is_some() => {
                let now = Instant::now();
                let due: Vec<(u32, Reinspect)> = pending
                    .iter()
                    .filter(|(_, r)| r.due <= now)
                    .map(|(p, r)| (*p, *r))
                    .collect();
                for (pid, r) in due {
                    let plausible = exe_filter.plausible(pid);
                    let result = if plausible {
                        python::inspect(pid)
                    } else {
                        Err(InspectError::NotPython(pid, python::command(pid).unwrap_or_default()))
                    };
                    match result {
                        Ok(p) if p.start_time == r.start_time => {
                            pending.remove(&pid);
                            if let Err(e) = sampler.add_process(pid, p.proc_info()) {
                                sampler.unwatch(pid);
                                alive.remove(&pid);
                                exec_not_python.push((pid, format!("cannot register it: {e}")));
                                continue;
                            }
                            sampler.unwatch(pid);
                            tracing::info!(pid, version = %p.version, "following the target into its new program");
                            programs.start(&p);
                            processes.push(RecordedProcess::of(&p));
                        }
                        // Another process under the pid: the target is gone.
                        Ok(_) | Err(InspectError::NoSuchProcess(_)) => {
                            pending.remove(&pid);
                            sampler.unwatch(pid);
                            alive.remove(&pid);
                            exited.push(pid);
                        }
                        Err(e) => match exec_retry(&e, r.attempts, plausible) {
                            Some(delay) => {
                                pending.insert(pid, Reinspect { attempts: r.attempts + 1, due: now + delay, ..r });
                            }
                            None => {
                                // Nothing more to record of it: not waited for.
                                pending.remove(&pid);
                                sampler.unwatch(pid);
                                alive.remove(&pid);
                                exec_not_python.push((pid, e.to_string()));
                            }
                        },
                    }
                }
                if alive.is_empty() {
                    tracing::info!("no target left to record; stopping");
                    break;
                }
            }
            _ = batch.tick() => drain(ring.get_mut(), &mut programs, &mut decode_errors),
            _ = tick.tick() => {
                // Samples queued before an exit are symbolised first.
                drain(ring.get_mut(), &mut programs, &mut decode_errors);
                // Safety net for a lost exit event.
                alive.retain(|pid, start| {
                    let same = python::is_alive(*pid, *start);
                    if !same {
                        sampler.remove_process(*pid);
                        sampler.unwatch(*pid);
                        pending.remove(pid);
                        programs.end(*pid);
                        exited.push(*pid);
                    }
                    same
                });
                if show_status {
                    status_line(&sampler, &programs, started.elapsed());
                }
                if alive.is_empty() {
                    tracing::info!("every target has exited; stopping");
                    break;
                }
            }
            _ = async { tokio::time::sleep_until(sleep_until.unwrap_or_else(tokio::time::Instant::now)).await }, if sleep_until.is_some() => break,
            r = &mut ctrl_c => {
                r.context("waiting for Ctrl-C")?;
                break;
            }
        }
    }
    if show_status {
        eprintln!();
    }
    // Stop new samples, then take what is already in the ring.
    for pid in alive.keys() {
        sampler.remove_process(*pid);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    drain(ring.get_mut(), &mut programs, &mut decode_errors);
    let counters = sampler.counters()?;
    let bpf = sampler.run_stats();
    drop(sampler);

    let distinct_pids = processes
        .iter()
        .map(|p| p.pid)
        .collect::<std::collections::HashSet<_>>()
        .len();
    let (mut profile, unknown_frames) =
        programs.profile(opts.sampler.rate_hz as u32, distinct_pids > 1);
    profile.start = Some(wall_start);
    profile.duration = started.elapsed();
    write_profile(&profile, opts)?;
    let sym = programs.store.symbol_stats();
    let stats = programs.store.stats;
    if stats.foreign_samples > 0 {
        tracing::debug!(
            samples = stats.foreign_samples,
            "samples between programs dropped"
        );
    }
    Ok(RecordSummary {
        elapsed: started.elapsed(),
        processes,
        counters,
        samples: programs.samples(),
        // What the output holds: line-level stacks.
        distinct_stacks: profile.stacks.len(),
        unknown_frames,
        stale_code: sym.stale,
        decode_errors,
        exited,
        exec_not_python,
        bpf,
        evicted_samples: stats.samples_evicted,
        evicted_seconds: stats.seconds_evicted,
        overflowed_samples: stats.stacks_overflowed,
        kind: opts.kind,
        total_value: profile.total_samples(),
    })
}

fn drain(ring: &mut RingBuf<MapData>, programs: &mut Programs, decode_errors: &mut u64) {
    let mut batch = Vec::new();
    while let Some(item) = ring.next() {
        match events::decode(&item) {
            Ok(s) => batch.push(s),
            Err(e) => {
                *decode_errors += 1;
                tracing::debug!("dropped a ring-buffer record: {e}");
            }
        }
    }
    programs.add(batch);
}

fn status_line(sampler: &Sampler, programs: &Programs, elapsed: Duration) {
    let c = sampler.counters().unwrap_or_default();
    let errors = c.get(Counter::ReadFailed) + c.get(Counter::TailCallFailed);
    eprint!(
        "\r\x1b[2K[pyebpf] {:>6.1}s  samples {}  stacks {}  errors {}  dropped {}  truncated {}",
        elapsed.as_secs_f64(),
        programs.samples(),
        programs.distinct_stacks(),
        errors,
        c.get(Counter::RingBufFull),
        c.get(Counter::Truncated),
    );
    let _ = std::io::stderr().flush();
}

/// Writes atomically: a partial file never replaces a good one.
fn write_profile(profile: &crate::profile::Profile, opts: &RecordOptions) -> anyhow::Result<()> {
    let tmp = opts.output.with_extension("pyebpf-tmp");
    let pids = opts
        .pids
        .iter()
        .map(|p| format!("pid {p}"))
        .collect::<Vec<_>>()
        .join(", ");
    let title = match profile.kind.unit() {
        ValueUnit::Samples => format!(
            "pyebpf: {pids} ({} samples at {} Hz)",
            profile.total_samples(),
            opts.sampler.rate_hz
        ),
        ValueUnit::Nanoseconds => format!(
            "pyebpf: {pids} ({}, {:.2} s)",
            profile.kind.describe(),
            profile.total_samples() as f64 / 1e9
        ),
    };
    {
        let f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(f);
        opts.format.write(profile, &title, &mut w)?;
        w.flush()
            .with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &opts.output)
        .with_context(|| format!("cannot move the profile to {}", opts.output.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RecordOptions {
        RecordOptions {
            pids: vec![4242, 4343],
            duration: Some(Duration::from_secs(10)),
            kind: ProfileKind::Cpu,
            sampler: SamplerConfig::default(),
            format: Format::Svg,
            output: PathBuf::from("app.svg"),
            status: false,
            memory_budget: DEFAULT_MEMORY_BUDGET_MIB << 20,
            native: false,
            per_thread: false,
        }
    }

    #[test]
    fn summary_names_each_process_and_its_python() {
        let summary = RecordSummary {
            elapsed: Duration::from_secs(10),
            processes: vec![
                RecordedProcess {
                    pid: 4242,
                    command: "python3.14".into(),
                    version: "3.14.10".into(),
                    libpython: false,
                },
                RecordedProcess {
                    pid: 4343,
                    command: "gunicorn".into(),
                    version: "3.11.7".into(),
                    libpython: true,
                },
            ],
            samples: 1126,
            distinct_stacks: 42,
            ..RecordSummary::default()
        };
        let text = summary.render(&opts());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "pyebpf record: 10.0 s, 2 process(es), 1126 samples (42 distinct stacks) written to \
             app.svg (svg)"
        );
        assert_eq!(
            lines[1],
            "  process 4242 (python3.14): CPython 3.14.10, static build"
        );
        assert_eq!(
            lines[2],
            "  process 4343 (gunicorn): CPython 3.11.7, libpython"
        );
        assert!(
            lines[3].starts_with("  truncated at --max-depth 2048: 0   "),
            "{text}"
        );
    }

    #[test]
    fn summary_reports_memory_budget_evictions() {
        let quiet = RecordSummary::default().render(&opts());
        assert!(!quiet.contains("memory budget"), "{quiet}");
        let summary = RecordSummary {
            evicted_samples: 120,
            evicted_seconds: 3,
            overflowed_samples: 7,
            ..RecordSummary::default()
        };
        let text = summary.render(&opts());
        assert!(
            text.contains(
                "  memory budget (1024 MiB, --memory-budget-mib) reached: 120 samples of the \
                 oldest seconds evicted (3 process-seconds), 7 samples under [stack table full]\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn summary_reports_off_cpu_intervals_and_time() {
        use crate::bpf::sampler::{ProgramStats, RunStats};
        let mut counters = Counters::default();
        let off = &mut counters.off_cpu;
        off.off_cpu[OffCpuCounter::Intervals as usize] = 1200;
        off.off_cpu[OffCpuCounter::IntervalNs as usize] = 3_500_000_000;
        off.off_cpu[OffCpuCounter::Chosen as usize] = 300;
        off.off_cpu[OffCpuCounter::WeightNs as usize] = 3_400_000_000;
        off.off_cpu[OffCpuCounter::MapFull as usize] = 2;
        off.outcomes[Counter::Sampled as usize] = 299;
        off.outcomes[Counter::NoThreadState as usize] = 1;
        let summary = RecordSummary {
            kind: ProfileKind::Wall,
            total_value: 12_345_000_000,
            counters,
            bpf: RunStats {
                switch_out: ProgramStats {
                    run_time: Duration::from_millis(2),
                    runs: 10_000,
                },
                switch_in: ProgramStats {
                    run_time: Duration::from_millis(3),
                    runs: 10_000,
                },
                ..RunStats::default()
            },
            ..RecordSummary::default()
        };
        let text = summary.render(&opts());
        for line in [
            "  wall time: 12.345 s in the profile (values in nanoseconds)\n",
            "  off-CPU: 1200 intervals (3.500 s), 300 walked (weights 3.400 s), 299 stacks sent, \
             0 truncated, 0 partial, 1 without Python state, 0 dropped (ring buffer full)\n",
            "  off-CPU losses: 2 switch-outs not timed (thread storage not created)\n",
            "  scheduler hooks (kernel stats): 200 ns per switch-out, 300 ns per switch-in \
             (walks included), 5.0 ms in total\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // A CPU recording has none of it.
        let cpu = RecordSummary::default().render(&opts());
        assert!(
            !cpu.contains("off-CPU") && !cpu.contains("in the profile"),
            "{cpu}"
        );
    }

    #[test]
    fn modes_set_up_the_sampler() {
        let base = SamplerConfig::default();
        let cpu = RecordOptions::sampler_for(ProfileKind::Cpu, base, None, false);
        assert!(cpu.on_cpu && cpu.off_cpu_period_ns.is_none() && !cpu.kernel_stacks);
        let k = RecordOptions::sampler_for(ProfileKind::Cpu, base, None, true);
        assert!(k.kernel_stacks);
        // T defaults to the CPU sampling period.
        let wall = RecordOptions::sampler_for(ProfileKind::Wall, base, None, false);
        assert!(wall.on_cpu && wall.kernel_stacks);
        assert_eq!(wall.off_cpu_period_ns, Some(1_000_000_000 / 99));
        let off = RecordOptions::sampler_for(ProfileKind::OffCpu, base, Some(1_000_000), false);
        assert!(!off.on_cpu && off.kernel_stacks);
        assert_eq!(off.off_cpu_period_ns, Some(1_000_000));
    }

    /// The build kind comes from where `_PyRuntime` is: libpython for the
    /// shared interpreter found on PATH, if it is one.
    #[test]
    fn recorded_process_of_a_live_interpreter() {
        use crate::process::python::test_support::{path_python, spawn_ready};
        let (child, _) = spawn_ready(std::process::Command::new(path_python()).args([
            "-c",
            "print('ready', flush=True); import time; time.sleep(30)",
        ]));
        let p = python::inspect(child.pid()).expect("inspect the interpreter");
        let r = RecordedProcess::of(&p);
        assert_eq!(r.pid, child.pid());
        assert_eq!(r.version, p.version.to_string());
        let shared = p
            .interp_binary
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("libpython"));
        assert_eq!(r.libpython, shared, "{p:?}");
        assert!(
            r.describe().starts_with(&format!(
                "process {} ({}): CPython {}, ",
                r.pid, p.command, p.version
            )),
            "{}",
            r.describe()
        );
    }
}
