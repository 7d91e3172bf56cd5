//! The seven measurements. Each returns raw per-repetition values; the
//! summaries (medians, ratios) are computed here too, and rendered by
//! `report`.

use super::daemon::{delta, Daemon, DaemonConfig, Delta};
use super::report::{self, Meta, Results};
use super::stats::{self, Summary};
use super::sys::{self, Output, Proc};
use super::{micro, versions, Ctx};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs everything, in the order of the issue.
pub fn all(ctx: &Ctx, meta: Meta) -> Result<Results> {
    let mut clock = Instant::now();
    let mut sections: Vec<(String, f64)> = Vec::new();
    // Closes the previous section's clock; `what` empty: the end.
    let mut step = |n: usize, what: &str| {
        if let Some(last) = sections.last_mut() {
            last.1 = clock.elapsed().as_secs_f64();
        }
        clock = Instant::now();
        if !what.is_empty() {
            sections.push((what.to_string(), 0.0));
            crate::util::banner(&format!("[{n}/8] {what}"));
        }
    };
    step(1, "target slowdown");
    let slowdown = slowdown(ctx).context("target slowdown")?;
    step(2, "profiler cost per sample");
    let cost = cost(ctx).context("cost per sample")?;
    step(3, "BPF walk cost by stack depth");
    let walk = walk(ctx).context("BPF walk cost")?;
    step(4, "daemon throughput");
    let throughput = throughput(ctx).context("throughput")?;
    step(5, "daemon memory");
    let memory = ctx.soft("memory", memory(ctx));
    step(6, "accuracy");
    let accuracy = accuracy(ctx).context("accuracy")?;
    step(7, "CPython versions");
    let early_exit = walk.early_exit_ns.as_ref().map_or(0.0, |s| s.median);
    let versions = ctx.soft("CPython versions", versions::run(ctx, early_exit));
    step(8, "criterion microbenchmarks");
    let micro = match ctx.plan.criterion {
        Some((warm, measure)) => micro::run(ctx, warm, measure).context("criterion")?,
        None => {
            println!("skipped");
            Vec::new()
        }
    };
    step(9, "");
    let mut meta = meta;
    meta.section_seconds = sections;
    let mut r = Results {
        meta,
        plan: ctx.plan.clone(),
        slowdown,
        cost,
        walk,
        throughput,
        memory,
        accuracy,
        versions,
        micro,
        targets: Vec::new(),
        failures: ctx.failures.borrow().clone(),
    };
    r.targets = report::targets(&r);
    Ok(r)
}

/// Who profiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Profiler {
    #[serde(rename = "pyebpf")]
    Pyebpf,
    #[serde(rename = "py-spy")]
    PySpy,
    #[serde(rename = "py-spy --nonblocking")]
    PySpyNonblocking,
}

impl Profiler {
    pub fn label(self) -> &'static str {
        match self {
            Profiler::Pyebpf => "pyebpf",
            Profiler::PySpy => "py-spy",
            Profiler::PySpyNonblocking => "py-spy --nonblocking",
        }
    }
}

const ALL_PROFILERS: [Profiler; 3] = [
    Profiler::Pyebpf,
    Profiler::PySpy,
    Profiler::PySpyNonblocking,
];

/// `items` rotated left by `k`: each round starts with another condition.
pub(super) fn rotated<T: Clone>(items: &[T], k: usize) -> Vec<T> {
    let mut v = items.to_vec();
    if !v.is_empty() {
        let n = k % v.len();
        v.rotate_left(n);
    }
    v
}

/// A `pyebpf record` or `py-spy record` of one process, to a folded file.
pub(super) struct Recording {
    pub(super) proc: Proc,
    profiler: Profiler,
    out: PathBuf,
    /// When sampling started (attached).
    pub(super) started: Instant,
}

pub(super) fn start_recording(
    ctx: &Ctx,
    profiler: Profiler,
    pid: u32,
    rate: u64,
    duration: Option<u64>,
    out: &Path,
) -> Result<Recording> {
    start_recording_pids(ctx, profiler, &[pid], rate, duration, out)
}

/// [`start_recording`] of several processes (`pyebpf record` only: py-spy takes one).
pub(super) fn start_recording_pids(
    ctx: &Ctx,
    profiler: Profiler,
    pids: &[u32],
    rate: u64,
    duration: Option<u64>,
    out: &Path,
) -> Result<Recording> {
    if pids.len() != 1 && profiler != Profiler::Pyebpf {
        bail!("{} records one process", profiler.label());
    }
    let rate_s = rate.to_string();
    let mut cmd;
    match profiler {
        Profiler::Pyebpf => {
            cmd = Command::new(&ctx.pyebpf);
            cmd.args(["record", "--quiet", "--format", "folded"]);
        }
        Profiler::PySpy | Profiler::PySpyNonblocking => {
            cmd = Command::new(&ctx.pyspy);
            cmd.args(["record", "--format", "raw"]);
            if profiler == Profiler::PySpyNonblocking {
                cmd.arg("--nonblocking");
            }
        }
    }
    for pid in pids {
        cmd.args(["--pid", &pid.to_string()]);
    }
    cmd.args(["--rate", &rate_s]).arg("--output").arg(out);
    if let Some(d) = duration {
        cmd.args(["--duration", &d.to_string()]);
    }
    let mut proc = Proc::spawn(cmd, profiler.label(), Output::Both, false)?;
    match profiler {
        Profiler::Pyebpf => {
            sys::wait_sampler_running(&mut proc, Duration::from_secs(30))?;
        }
        _ => {
            proc.wait_line("Sampling process", Duration::from_secs(30))?;
        }
    }
    let started = Instant::now();
    // The target is registered right after the programs attach.
    sys::sleep_secs(0.2);
    Ok(Recording {
        proc,
        profiler,
        out: out.to_path_buf(),
        started,
    })
}

impl Recording {
    /// Ends the recording with Ctrl-C (both recorders then write their
    /// profile; py-spy also ends by itself when its target exits) and
    /// returns the folded profile, the profiler's CPU time and how long it
    /// sampled.
    fn finish(self, target_exited: bool) -> Result<(String, Duration, Duration)> {
        self.end(target_exited, false)
            .map(|(text, cpu, sampled_for, _)| (text, cpu, sampled_for))
    }

    /// [`Self::finish`], with how `pyebpf record` described each target in its summary
    /// (`process PID (COMM): CPython X.Y.Z, static build`); none for py-spy.
    pub(super) fn finish_described(
        self,
        target_exited: bool,
    ) -> Result<(String, Duration, Duration, Vec<String>)> {
        self.end(target_exited, true)
    }

    fn end(
        mut self,
        target_exited: bool,
        describe: bool,
    ) -> Result<(String, Duration, Duration, Vec<String>)> {
        let sampled_for = self.started.elapsed();
        if target_exited {
            // py-spy stops by itself then; give it the time to.
            let until = Instant::now() + Duration::from_secs(5);
            while !self.proc.exited() && Instant::now() < until {
                sys::sleep_secs(0.02);
            }
        }
        if !self.proc.exited() {
            self.proc.signal(libc::SIGINT);
        }
        let (code, cpu) = self.proc.wait_rusage(Duration::from_secs(60))?;
        if code != 0 {
            bail!(
                "{} exited with {code}:\n{}",
                self.profiler.label(),
                self.proc.tail()
            );
        }
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))?;
        let mut described = Vec::new();
        if describe && self.profiler == Profiler::Pyebpf {
            // The summary names each process, then says what was truncated.
            let _ = self.proc.wait_line("truncated at", Duration::from_secs(2));
            described = self
                .proc
                .tail()
                .lines()
                .filter(|l| l.contains("): CPython "))
                .map(|l| l.trim().to_string())
                .collect();
        }
        Ok((text, cpu, sampled_for, described))
    }
}

// ---------------------------------------------------------------- 1. slowdown

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Condition {
    /// `None`: unprofiled.
    pub profiler: Option<Profiler>,
    pub rate_hz: u64,
    /// 0: the baseline; 1: a second unprofiled run (the noise control).
    pub copy: u8,
}

impl Condition {
    pub fn label(&self) -> String {
        match self.profiler {
            None if self.copy == 0 => "unprofiled (baseline)".into(),
            None => "unprofiled again (noise control)".into(),
            Some(p) => format!("{} @ {} Hz", p.label(), self.rate_hz),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SlowdownRow {
    pub threads: usize,
    pub condition: Condition,
    pub label: String,
    /// Wall seconds of the fixed work, per round.
    pub wall_s: Vec<f64>,
    /// CPU seconds of the workload process during the work, per round.
    pub cpu_s: Vec<f64>,
    /// Samples the profiler wrote, per round.
    pub samples: Vec<u64>,
    /// Profiler CPU seconds (whole life), per round.
    pub profiler_cpu_s: Vec<f64>,
    /// wall / wall of the baseline in the same round.
    pub ratio: Option<Summary>,
    /// The same for the workload's CPU time.
    pub cpu_ratio: Option<Summary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Slowdown {
    pub units: u64,
    pub rows: Vec<SlowdownRow>,
}

fn calibrate(ctx: &Ctx) -> Result<u64> {
    let secs = (ctx.plan.work_secs / 3.0).clamp(0.2, 1.0);
    let mut p = Proc::spawn(
        ctx.workload("bench_work.py", &["calibrate".into(), secs.to_string()]),
        "bench_work.py calibrate",
        Output::Stdout,
        false,
    )?;
    let line = p.wait_line("units_per_sec", Duration::from_secs(60))?;
    let per_sec: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("bad calibration line")?;
    p.wait_rusage(Duration::from_secs(10))?;
    Ok(((per_sec * ctx.plan.work_secs) as u64).max(1))
}

/// One timed run of the fixed work.
struct WorkRun {
    wall: f64,
    cpu: f64,
    samples: u64,
    profiler_cpu: f64,
}

fn work_once(ctx: &Ctx, c: &Condition, units: u64, threads: usize) -> Result<WorkRun> {
    let mut w = Proc::spawn(
        ctx.workload(
            "bench_work.py",
            &["run".into(), units.to_string(), threads.to_string()],
        ),
        "bench_work.py run",
        Output::Stdout,
        true,
    )?;
    w.wait_line("ready", Duration::from_secs(60))?;
    let out = ctx.scratch("slowdown.folded");
    let _ = std::fs::remove_file(&out);
    let rec = match c.profiler {
        None => {
            sys::sleep_secs(0.2);
            None
        }
        Some(p) => Some(start_recording(ctx, p, w.pid, c.rate_hz, None, &out)?),
    };
    w.write_line("go")?;
    let line = w.wait_line("elapsed", Duration::from_secs(900))?;
    let field = |i: usize| -> Result<f64> {
        line.split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad elapsed line {line:?}"))
    };
    let (wall, cpu) = (field(1)?, field(3)?);
    w.wait_rusage(Duration::from_secs(30))?;
    let (samples, profiler_cpu) = match rec {
        None => (0, 0.0),
        Some(r) => {
            let (text, cpu, _) = r.finish(true)?;
            (stats::total_samples(&text), cpu.as_secs_f64())
        }
    };
    Ok(WorkRun {
        wall,
        cpu,
        samples,
        profiler_cpu,
    })
}

fn slowdown(ctx: &Ctx) -> Result<Slowdown> {
    let plan = &ctx.plan;
    let units = calibrate(ctx)?;
    println!("{units} work units ≈ {:.1} s unprofiled", plan.work_secs);
    let mut conds = vec![
        Condition {
            profiler: None,
            rate_hz: 0,
            copy: 0,
        },
        Condition {
            profiler: None,
            rate_hz: 0,
            copy: 1,
        },
    ];
    for &rate in &plan.slowdown_rates {
        let mut ps = vec![Profiler::Pyebpf, Profiler::PySpy];
        if plan.slowdown_pyspy_nonblocking {
            ps.push(Profiler::PySpyNonblocking);
        }
        for p in ps {
            conds.push(Condition {
                profiler: Some(p),
                rate_hz: rate,
                copy: 0,
            });
        }
    }
    let mut data: BTreeMap<(usize, Condition), Vec<WorkRun>> = BTreeMap::new();
    for rep in 0..plan.slowdown_reps {
        for &threads in &plan.slowdown_threads {
            for c in rotated(&conds, rep) {
                let label = format!("slowdown, {} ({threads} threads)", c.label());
                let r = ctx
                    .soft(&label, work_once(ctx, &c, units, threads))
                    .unwrap_or(WorkRun {
                        wall: f64::NAN,
                        cpu: f64::NAN,
                        samples: 0,
                        profiler_cpu: f64::NAN,
                    });
                println!(
                    "round {}/{}  {threads} thread(s)  {:<34} wall {:>7.3} s  CPU {:>7.3} s  {:>6} samples",
                    rep + 1,
                    plan.slowdown_reps,
                    c.label(),
                    r.wall,
                    r.cpu,
                    r.samples
                );
                data.entry((threads, c)).or_default().push(r);
            }
        }
    }
    let mut rows = Vec::new();
    for &threads in &plan.slowdown_threads {
        let base = &data[&(threads, conds[0].clone())];
        for c in &conds {
            let runs = &data[&(threads, c.clone())];
            let is_base = c.profiler.is_none() && c.copy == 0;
            let ratio = |f: fn(&WorkRun) -> f64| {
                let r: Vec<f64> = runs.iter().zip(base).map(|(x, b)| f(x) / f(b)).collect();
                if is_base {
                    None
                } else {
                    Summary::of(&r)
                }
            };
            rows.push(SlowdownRow {
                threads,
                condition: c.clone(),
                label: c.label(),
                ratio: ratio(|r| r.wall),
                cpu_ratio: ratio(|r| r.cpu),
                wall_s: runs.iter().map(|r| r.wall).collect(),
                cpu_s: runs.iter().map(|r| r.cpu).collect(),
                samples: runs.iter().map(|r| r.samples).collect(),
                profiler_cpu_s: runs.iter().map(|r| r.profiler_cpu).collect(),
            });
        }
    }
    Ok(Slowdown { units, rows })
}

// ------------------------------------------------------ 2./3. daemon windows

/// A window length in whole seconds (the daemon refreshes its counters once a second).
fn whole_secs(secs: f64) -> u32 {
    secs.round().max(1.0) as u32
}

/// One daemon measurement window over one workload.
#[derive(Clone, Debug, Serialize)]
pub struct DaemonWindow {
    pub delta: Delta,
    /// Frames of the deepest stack ending in `recurse` in the window's
    /// folded profile.
    pub deepest_stack: usize,
    /// Whether that profile has a `[truncated]` or partial-stack root.
    pub cut_stacks: bool,
}

/// Starts a daemon at `rate`, profiles `scenario`, and measures a window
/// between two snapshots aligned on the daemon's metric refreshes.
fn daemon_window(ctx: &Ctx, rate: u64, max_depth: u32, scenario: &str) -> Result<DaemonWindow> {
    let d = Daemon::start(
        &ctx.pyebpf,
        &ctx.dir,
        &DaemonConfig {
            rate_hz: rate,
            max_depth,
            ring_bytes: 8 << 20,
            tag: &ctx.tag,
        },
    )?;
    let w = ctx.scenario(&[scenario.to_string()])?;
    d.wait_profiled(&[w.pid], Duration::from_secs(20))?;
    sys::sleep_secs(ctx.plan.warm_secs);
    let a = d.aligned_snapshot()?;
    let b = d.snapshot_after(&a, whole_secs(ctx.plan.window_secs))?;
    let seconds = (b.at - a.at).as_secs_f64().ceil() as u32 + 1;
    let folded = d.folded(w.pid, seconds)?;
    drop(w);
    d.stop()?;
    Ok(DaemonWindow {
        delta: delta(&a, &b),
        deepest_stack: stats::max_depth_with_leaf(&folded, "recurse"),
        cut_stacks: folded.contains("[truncated]") || folded.contains("[partial stack"),
    })
}

/// A recorder (`pyebpf record` or py-spy) on `scenario` for warm-up +
/// window: its CPU and BPF run time in the window, and the samples it took
/// there (its achieved sampling rate times the window).
fn record_window(ctx: &Ctx, p: Profiler, rate: u64, scenario: &str) -> Result<(f64, f64, f64)> {
    let w = ctx.scenario(&[scenario.to_string()])?;
    let plan = &ctx.plan;
    let out = ctx.scratch("cost.folded");
    let _ = std::fs::remove_file(&out);
    // Stopped with Ctrl-C after the window: py-spy's --duration counts
    // samples, which take longer than planned when it lags.
    let rec = start_recording(ctx, p, w.pid, rate, None, &out)?;
    sys::sleep_secs(plan.warm_secs);
    let (bpf_a, _) = sys::sampler_stats(rec.proc.pid);
    let a = sys::thread_cpu(rec.proc.pid);
    let ta = Instant::now();
    sys::sleep_secs(plan.window_secs);
    let b = sys::thread_cpu(rec.proc.pid);
    let (bpf_b, _) = sys::sampler_stats(rec.proc.pid);
    let window = ta.elapsed().as_secs_f64();
    let (text, _, sampled_for) = rec.finish(false)?;
    let sampled_for = sampled_for.as_secs_f64();
    drop(w);
    let samples = stats::total_samples(&text) as f64;
    Ok((
        sys::cpu_between(&a, &b).as_secs_f64(),
        bpf_b.saturating_sub(bpf_a) as f64 / 1e9,
        samples / sampled_for * window,
    ))
}

/// What is measured in section 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Tool {
    #[serde(rename = "pyebpf record")]
    PyebpfRecord,
    #[serde(rename = "pyebpf daemon")]
    PyebpfDaemon,
    #[serde(rename = "py-spy record")]
    PySpy,
    #[serde(rename = "py-spy record --nonblocking")]
    PySpyNonblocking,
}

impl Tool {
    pub fn label(self) -> &'static str {
        match self {
            Tool::PyebpfRecord => "pyebpf record",
            Tool::PyebpfDaemon => "pyebpf daemon",
            Tool::PySpy => "py-spy record",
            Tool::PySpyNonblocking => "py-spy record --nonblocking",
        }
    }

    pub fn is_pyebpf(self) -> bool {
        matches!(self, Tool::PyebpfRecord | Tool::PyebpfDaemon)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CostRow {
    pub tool: Tool,
    pub rate_hz: u64,
    pub depth: u32,
    /// Per round: (profiler CPU + BPF run time) / samples, in nanoseconds.
    pub ns_per_sample: Vec<f64>,
    /// Per round: the userspace part and the BPF part (pyebpf only).
    pub user_ns_per_sample: Vec<f64>,
    pub bpf_ns_per_sample: Vec<f64>,
    pub samples_per_s: Vec<f64>,
    pub summary: Option<Summary>,
    /// summary median / the median of `pyebpf record` at the same point.
    pub vs_pyebpf: Option<f64>,
}

fn cost(ctx: &Ctx) -> Result<Vec<CostRow>> {
    let plan = &ctx.plan;
    let mut tools = vec![Tool::PyebpfRecord, Tool::PyebpfDaemon, Tool::PySpy];
    if plan.mode != super::Mode::Smoke {
        tools.push(Tool::PySpyNonblocking);
    }
    let mut conds = Vec::new();
    for &(rate, depth) in &plan.cost_points {
        for &t in &tools {
            conds.push((t, rate, depth));
        }
    }
    let mut rows: Vec<CostRow> = conds
        .iter()
        .map(|&(tool, rate_hz, depth)| CostRow {
            tool,
            rate_hz,
            depth,
            ns_per_sample: Vec::new(),
            user_ns_per_sample: Vec::new(),
            bpf_ns_per_sample: Vec::new(),
            samples_per_s: Vec::new(),
            summary: None,
            vs_pyebpf: None,
        })
        .collect();
    for rep in 0..plan.cost_reps {
        let indexed: Vec<usize> = (0..conds.len()).collect();
        for i in rotated(&indexed, rep) {
            let (tool, rate, depth) = conds[i];
            let scenario = format!("recurse:{depth}");
            let row = &mut rows[i];
            let run = || -> Result<(f64, f64, f64, f64)> {
                let r = match tool {
                    Tool::PyebpfDaemon => {
                        let w = daemon_window(ctx, rate, 2048, &scenario)?;
                        let d = w.delta;
                        (d.cpu_s, d.bpf_s, d.sampled, d.seconds)
                    }
                    _ => {
                        let p = match tool {
                            Tool::PyebpfRecord => Profiler::Pyebpf,
                            Tool::PySpy => Profiler::PySpy,
                            _ => Profiler::PySpyNonblocking,
                        };
                        let (cpu, bpf, samples) = record_window(ctx, p, rate, &scenario)?;
                        (cpu, bpf, samples, plan.window_secs)
                    }
                };
                if r.2 <= 0.0 {
                    bail!(
                        "{} took no samples of {scenario} at {rate} Hz",
                        tool.label()
                    );
                }
                Ok(r)
            };
            let label = format!("cost, {} @ {rate} Hz, depth {depth}", tool.label());
            let Some((user, bpf, samples, secs)) = ctx.soft(&label, run()) else {
                continue;
            };
            let ns = |s: f64| s * 1e9 / samples;
            row.ns_per_sample.push(ns(user + bpf));
            row.user_ns_per_sample.push(ns(user));
            row.bpf_ns_per_sample.push(ns(bpf));
            row.samples_per_s.push(samples / secs);
            println!(
                "round {}/{}  {:<28} {rate:>4} Hz  depth {depth:>4}: {:>9.0} ns/sample (user {:.0}, BPF {:.0}), {:.0} samples/s",
                rep + 1,
                plan.cost_reps,
                tool.label(),
                ns(user + bpf),
                ns(user),
                ns(bpf),
                samples / secs
            );
        }
    }
    for r in &mut rows {
        r.summary = Summary::of(&r.ns_per_sample);
    }
    let medians: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.tool,
                r.rate_hz,
                r.depth,
                r.summary.as_ref().map(|s| s.median),
            )
        })
        .collect();
    for r in &mut rows {
        let own = medians
            .iter()
            .find(|m| m.0 == Tool::PyebpfRecord && m.1 == r.rate_hz && m.2 == r.depth)
            .and_then(|m| m.3);
        if let (Some(own), Some(s)) = (own, &r.summary) {
            r.vs_pyebpf = Some(s.median / own);
        }
    }
    Ok(rows)
}

#[derive(Clone, Debug, Serialize)]
pub struct WalkRow {
    /// Recursion depth of the workload (stacks are a few frames deeper).
    pub depth: u32,
    pub max_depth: u32,
    pub windows: Vec<DaemonWindow>,
    /// Kernel run time per program run (every perf event, all CPUs), ns.
    pub ns_per_run: Option<Summary>,
    /// Run time per stack sent, early exits on other tasks taken out, ns.
    pub ns_per_walk: Option<Summary>,
    pub deepest_stack: usize,
    pub truncated: f64,
    pub read_failed: f64,
    pub walked_in_full: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Walk {
    /// Cost of a run that exits early (profiled process idle), ns.
    pub early_exit_ns: Option<Summary>,
    /// Daemon CPU while its one profiled process sleeps: its fixed cost,
    /// milliseconds per second.
    pub idle_daemon_cpu_ms_per_s: Option<Summary>,
    pub rows: Vec<WalkRow>,
    /// Deepest recursion depth whose stacks were walked whole.
    pub deepest_in_full: Option<u32>,
    /// Marginal cost per frame between the two deepest full walks, ns.
    pub ns_per_frame: Option<f64>,
}

fn walk(ctx: &Ctx) -> Result<Walk> {
    let plan = &ctx.plan;
    let mut conds: Vec<Option<(u32, u32)>> = vec![None];
    conds.extend(plan.walk_depths.iter().copied().map(Some));
    let mut idle: Vec<f64> = Vec::new();
    let mut idle_cpu: Vec<f64> = Vec::new();
    let mut windows: BTreeMap<(u32, u32), Vec<DaemonWindow>> = BTreeMap::new();
    for rep in 0..plan.walk_reps {
        for c in rotated(&conds, rep) {
            match c {
                None => {
                    let run = daemon_window(ctx, 999, 2048, "idle");
                    let Some(w) = ctx.soft("walk, idle", run) else {
                        continue;
                    };
                    let ns = w.delta.bpf_s * 1e9 / w.delta.bpf_runs.max(1.0);
                    println!(
                        "round {}/{}  idle target: {ns:.0} ns per early exit ({} runs)",
                        rep + 1,
                        plan.walk_reps,
                        w.delta.bpf_runs
                    );
                    idle.push(ns);
                    idle_cpu.push(1000.0 * w.delta.cpu_s / w.delta.seconds);
                }
                Some((depth, max)) => {
                    let label = format!("walk, depth {depth}");
                    let run = daemon_window(ctx, 999, max, &format!("recurse:{depth}"));
                    let Some(w) = ctx.soft(&label, run) else {
                        continue;
                    };
                    println!(
                        "round {}/{}  depth {depth:>4}: {:.0} ns per run, {} stacks, deepest {} frames, truncated {}, read failures {}",
                        rep + 1,
                        plan.walk_reps,
                        w.delta.bpf_s * 1e9 / w.delta.bpf_runs.max(1.0),
                        w.delta.sampled,
                        w.deepest_stack,
                        w.delta.truncated,
                        w.delta.read_failed
                    );
                    windows.entry((depth, max)).or_default().push(w);
                }
            }
        }
    }
    let early = Summary::of(&idle);
    let e0 = early.as_ref().map(|s| s.median).unwrap_or(0.0);
    let mut rows = Vec::new();
    for ((depth, max_depth), ws) in windows {
        let per_run: Vec<f64> = ws
            .iter()
            .map(|w| w.delta.bpf_s * 1e9 / w.delta.bpf_runs.max(1.0))
            .collect();
        let per_walk: Vec<f64> = ws
            .iter()
            .filter(|w| w.delta.sampled > 0.0)
            .map(|w| {
                let d = &w.delta;
                (d.bpf_s * 1e9 - e0 * (d.bpf_runs - d.sampled).max(0.0)) / d.sampled
            })
            .collect();
        let deepest = ws.iter().map(|w| w.deepest_stack).max().unwrap_or(0);
        let truncated: f64 = ws.iter().map(|w| w.delta.truncated).sum();
        let read_failed: f64 = ws.iter().map(|w| w.delta.read_failed).sum();
        // recurse(N)..recurse(0), the step lambda, loop_forever, main, <module>.
        let full = truncated == 0.0
            && deepest == depth as usize + 5
            && !ws.iter().any(|w| w.cut_stacks)
            && ws.iter().all(|w| w.delta.sampled > 0.0);
        rows.push(WalkRow {
            depth,
            max_depth,
            ns_per_run: Summary::of(&per_run),
            ns_per_walk: Summary::of(&per_walk),
            deepest_stack: deepest,
            truncated,
            read_failed,
            walked_in_full: full,
            windows: ws,
        });
    }
    let full: Vec<&WalkRow> = rows.iter().filter(|r| r.walked_in_full).collect();
    let ns_per_frame = match full.as_slice() {
        [.., a, b] => match (&a.ns_per_walk, &b.ns_per_walk) {
            (Some(x), Some(y)) if b.deepest_stack > a.deepest_stack => {
                Some((y.median - x.median) / (b.deepest_stack - a.deepest_stack) as f64)
            }
            _ => None,
        },
        _ => None,
    };
    Ok(Walk {
        early_exit_ns: early,
        idle_daemon_cpu_ms_per_s: Summary::of(&idle_cpu),
        deepest_in_full: full.iter().map(|r| r.depth).max(),
        ns_per_frame,
        rows,
    })
}

// --------------------------------------------------------------- 4. throughput

#[derive(Clone, Debug, Serialize)]
pub struct Level {
    pub rate_hz: u64,
    pub seconds: f64,
    /// Stacks sent per second, all processes and CPUs together.
    pub samples_per_s: f64,
    pub ringbuf_full: f64,
    pub read_failed: f64,
    /// Daemon CPU, percent of one CPU.
    pub daemon_cpu_pct: f64,
    /// BPF run time, percent of one CPU.
    pub bpf_cpu_pct: f64,
    /// Daemon CPU per sample, ns.
    pub daemon_ns_per_sample: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub processes: usize,
    pub depth: u32,
    pub ring_bytes: u32,
    pub levels: Vec<Level>,
    /// The highest rate without drops, held for the confirmation time.
    pub confirmed: Option<Level>,
}

fn level(ctx: &Ctx, rate: u64, pids: &[u32], secs: f64) -> Result<Level> {
    let ring = 8 << 20;
    let d = Daemon::start(
        &ctx.pyebpf,
        &ctx.dir,
        &DaemonConfig {
            rate_hz: rate,
            max_depth: 2048,
            ring_bytes: ring,
            tag: &ctx.tag,
        },
    )?;
    d.wait_profiled(pids, Duration::from_secs(30))?;
    sys::sleep_secs(1.0);
    let a = d.aligned_snapshot()?;
    let b = d.snapshot_after(&a, whole_secs(secs))?;
    d.stop()?;
    let x = delta(&a, &b);
    let l = Level {
        rate_hz: rate,
        seconds: x.seconds,
        samples_per_s: x.sampled / x.seconds,
        ringbuf_full: x.ringbuf_full,
        read_failed: x.read_failed,
        daemon_cpu_pct: 100.0 * x.cpu_s / x.seconds,
        bpf_cpu_pct: 100.0 * x.bpf_s / x.seconds,
        daemon_ns_per_sample: x.cpu_s * 1e9 / x.sampled.max(1.0),
    };
    println!(
        "{rate:>5} Hz for {:.0} s: {:.0} samples/s, {} dropped (ring buffer full), daemon {:.1}% CPU, BPF {:.1}% CPU",
        l.seconds, l.samples_per_s, l.ringbuf_full, l.daemon_cpu_pct, l.bpf_cpu_pct
    );
    Ok(l)
}

fn throughput(ctx: &Ctx) -> Result<Throughput> {
    let plan = &ctx.plan;
    let workers: Vec<Proc> = (0..plan.tp_procs)
        .map(|_| ctx.scenario(&[format!("recurse:{}", plan.tp_depth)]))
        .collect::<Result<_>>()?;
    let pids: Vec<u32> = workers.iter().map(|w| w.pid).collect();
    let mut levels = Vec::new();
    for &rate in &plan.tp_rates {
        let run = level(ctx, rate, &pids, plan.tp_step_secs);
        if let Some(l) = ctx.soft(&format!("throughput, {rate} Hz"), run) {
            levels.push(l);
        }
    }
    let best = levels
        .iter()
        .filter(|l| l.ringbuf_full == 0.0)
        .max_by(|a, b| a.samples_per_s.total_cmp(&b.samples_per_s))
        .map(|l| l.rate_hz);
    let confirmed = match best {
        Some(rate) if plan.tp_confirm_secs > 0.0 => {
            println!("confirming {rate} Hz for {:.0} s", plan.tp_confirm_secs);
            let run = level(ctx, rate, &pids, plan.tp_confirm_secs);
            ctx.soft(&format!("throughput, {rate} Hz held"), run)
        }
        _ => None,
    };
    drop(workers);
    Ok(Throughput {
        processes: plan.tp_procs,
        depth: plan.tp_depth,
        ring_bytes: 8 << 20,
        levels,
        confirmed,
    })
}

// ------------------------------------------------------------------ 5. memory

#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub processes: usize,
    pub functions_per_process: usize,
    pub rate_hz: u64,
    /// Daemon RSS before the processes started, bytes.
    pub rss_idle: u64,
    /// Daemon RSS and peak RSS with every process profiled, bytes.
    pub rss: u64,
    pub rss_peak: u64,
    /// Code objects symbolised (symbol cache misses) by then.
    pub code_objects: f64,
    pub samples: f64,
    /// Seconds until (nearly) every code object was symbolised.
    pub seconds: f64,
    pub complete: bool,
}

fn memory(ctx: &Ctx) -> Result<Memory> {
    let plan = &ctx.plan;
    let rate = 999;
    let d = Daemon::start(
        &ctx.pyebpf,
        &ctx.dir,
        &DaemonConfig {
            rate_hz: rate,
            max_depth: 2048,
            ring_bytes: 8 << 20,
            tag: &ctx.tag,
        },
    )?;
    sys::sleep_secs(1.0);
    let (rss_idle, _) = sys::rss(d.proc.pid)?;
    let started = Instant::now();
    // Together the processes keep about a quarter of the CPUs busy (each
    // chain burns 4 ms, then sleeps): the daemon is measured, not starved.
    let duty = (0.25 * ctx.ncpus as f64 / plan.mem_procs as f64).min(1.0);
    let pause = 0.004 / duty - 0.004;
    let mut procs = Vec::new();
    for _ in 0..plan.mem_procs {
        procs.push(Proc::spawn(
            ctx.workload(
                "bench_codeobjs.py",
                &[
                    plan.mem_functions.to_string(),
                    plan.mem_chain.to_string(),
                    format!("{pause:.4}"),
                ],
            ),
            "bench_codeobjs.py",
            Output::Stdout,
            false,
        )?);
    }
    for p in &mut procs {
        p.wait_line("ready", Duration::from_secs(300))?;
    }
    let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
    // The API can be slow to answer while the daemon symbolises a burst of
    // new stacks: failures here are retried until the deadline.
    if let Err(e) = d.wait_profiled(&pids, Duration::from_secs(120)) {
        println!("(not every process profiled yet: {e:#})");
    }
    let want = 0.99 * (plan.mem_procs * plan.mem_functions) as f64;
    let deadline = started + Duration::from_secs_f64(plan.mem_timeout_secs);
    let (mut code_objects, mut samples) = (0.0, 0.0);
    loop {
        sys::sleep_secs(1.0);
        match d.metrics() {
            Ok(m) => {
                code_objects =
                    super::daemon::metric(&m, "pyebpf_symbol_cache_total", &[("result", "miss")]);
                samples = super::daemon::metric(&m, "pyebpf_samples_received_total", &[]);
            }
            Err(e) => println!("(scrape failed, retrying: {e:#})"),
        }
        if code_objects >= want || Instant::now() > deadline {
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let (rss, rss_peak) = sys::rss(d.proc.pid)?;
    println!(
        "{} processes × {} code objects: {:.0} symbolised after {seconds:.0} s; daemon RSS {:.1} MiB (idle {:.1} MiB, peak {:.1} MiB)",
        plan.mem_procs,
        plan.mem_functions,
        code_objects,
        rss as f64 / 1048576.0,
        rss_idle as f64 / 1048576.0,
        rss_peak as f64 / 1048576.0
    );
    drop(procs);
    if let Err(e) = d.stop() {
        println!("(the daemon did not stop cleanly: {e:#})");
    }
    Ok(Memory {
        processes: plan.mem_procs,
        functions_per_process: plan.mem_functions,
        rate_hz: rate,
        rss_idle,
        rss,
        rss_peak,
        code_objects,
        samples,
        seconds,
        complete: code_objects >= want,
    })
}

// ---------------------------------------------------------------- 6. accuracy

#[derive(Clone, Debug, Serialize)]
pub struct AccuracyRow {
    pub profiler: Profiler,
    pub rate_hz: u64,
    pub samples: Vec<u64>,
    pub tv_distance: Vec<f64>,
    pub line_agreement: Vec<f64>,
    /// Measured share per leaf function, last round.
    pub shares: BTreeMap<String, f64>,
    pub tv: Option<Summary>,
    pub lines: Option<Summary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Accuracy {
    pub workload: String,
    pub truth: BTreeMap<String, f64>,
    pub hot_lines: BTreeMap<String, Vec<u32>>,
    pub rows: Vec<AccuracyRow>,
}

fn accuracy(ctx: &Ctx) -> Result<Accuracy> {
    let plan = &ctx.plan;
    let src = std::fs::read_to_string(ctx.root.join("tests/workloads/scenarios.py"))?;
    let markers = stats::hot_lines(&src);
    // scenarios.py's cpu_split: 1 : 2 : 3 of thread CPU time.
    let truth: BTreeMap<String, f64> = [("split_a", 1.0), ("split_b", 2.0), ("split_c", 3.0)]
        .into_iter()
        .map(|(k, w)| (k.to_string(), w / 6.0))
        .collect();
    let mut hot = BTreeMap::new();
    let mut all_lines = Vec::new();
    for k in truth.keys() {
        let l = markers
            .get(k)
            .with_context(|| format!("no `# HOT:{k}` marker in scenarios.py"))?;
        all_lines.extend(l.iter().copied());
        hot.insert(k.clone(), l.clone());
    }
    let mut conds = Vec::new();
    for &rate in &plan.acc_rates {
        for p in ALL_PROFILERS {
            if ctx.plan.mode == super::Mode::Smoke && p == Profiler::PySpyNonblocking {
                continue;
            }
            conds.push((p, rate));
        }
    }
    let mut rows: Vec<AccuracyRow> = conds
        .iter()
        .map(|&(profiler, rate_hz)| AccuracyRow {
            profiler,
            rate_hz,
            samples: Vec::new(),
            tv_distance: Vec::new(),
            line_agreement: Vec::new(),
            shares: BTreeMap::new(),
            tv: None,
            lines: None,
        })
        .collect();
    let secs = plan.acc_secs;
    for rep in 0..plan.acc_reps {
        let order: Vec<usize> = rotated(&(0..conds.len()).collect::<Vec<_>>(), rep);
        for i in order {
            let (p, rate) = conds[i];
            let w = ctx.scenario(&["split".to_string()])?;
            sys::sleep_secs(0.3);
            let out = ctx.scratch("accuracy.folded");
            let _ = std::fs::remove_file(&out);
            let run = || -> Result<String> {
                let rec = start_recording(ctx, p, w.pid, rate, None, &out)?;
                sys::sleep_secs(secs);
                Ok(rec.finish(false)?.0)
            };
            let label = format!("accuracy, {} @ {rate} Hz", p.label());
            let Some(text) = ctx.soft(&label, run()) else {
                continue;
            };
            drop(w);
            let shares = stats::leaf_shares(&text);
            let tv = stats::tv_distance(&shares, &truth);
            let agree = stats::leaf_line_agreement(&text, "scenarios.py", &all_lines);
            let n = stats::total_samples(&text);
            println!(
                "round {}/{}  {:<22} {rate:>4} Hz: {n:>6} samples, TV distance {tv:.4}, hot-line agreement {:.2}%",
                rep + 1,
                plan.acc_reps,
                p.label(),
                100.0 * agree
            );
            let r = &mut rows[i];
            r.samples.push(n);
            r.tv_distance.push(tv);
            r.line_agreement.push(agree);
            r.shares = shares;
        }
    }
    for r in &mut rows {
        r.tv = Summary::of(&r.tv_distance);
        r.lines = Summary::of(&r.line_agreement);
    }
    Ok(Accuracy {
        workload: "tests/workloads/scenarios.py split (split_a : split_b : split_c = 1 : 2 : 3 of thread CPU time)".into(),
        truth,
        hot_lines: hot,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation() {
        assert_eq!(rotated(&[1, 2, 3], 0), [1, 2, 3]);
        assert_eq!(rotated(&[1, 2, 3], 1), [2, 3, 1]);
        assert_eq!(rotated(&[1, 2, 3], 4), [2, 3, 1]);
        assert!(rotated::<u8>(&[], 3).is_empty());
    }
}
