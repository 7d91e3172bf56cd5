//! benchmarks.json (everything, raw values included) and BENCHMARKS.md
//! (method, machine, tables, targets).

use super::measure::{Accuracy, CostRow, Profiler, Slowdown, Throughput, Tool, Walk};
use super::micro::Micro;
use super::stats::{self, Summary};
use super::versions::{self, VersionRow, Versions};
use super::{git_revision, Ctx, Plan};
use crate::util::cmd;
use anyhow::Result;
use serde::Serialize;
use std::fmt::Write;
use std::path::Path;

#[derive(Clone, Debug, Serialize)]
pub struct Meta {
    pub date_utc: String,
    pub mode: super::Mode,
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
    pub pyebpf_version: String,
    pub pyebpf_git: String,
    pub pyspy_version: String,
    pub python_version: String,
    pub python: String,
    /// `/proc/loadavg` at start and end: other work on the machine.
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub seconds: f64,
    /// Seconds spent in each measurement.
    pub section_seconds: Vec<(String, f64)>,
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The first line of a probe's output, or "unknown".
pub fn first_line(s: Option<String>) -> String {
    s.and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

impl Meta {
    pub fn collect(ctx: &Ctx, built: &Path) -> Result<Meta> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let mem_kb = super::sys::mem_total_kb();
        let p = |prog: &Path, args: &[&str]| first_line(cmd(&prog.to_string_lossy(), args).probe());
        Ok(Meta {
            date_utc: first_line(cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).probe()),
            mode: ctx.plan.mode,
            nproc: ctx.ncpus,
            cpu_model,
            kernel: first_line(cmd("uname", &["-r"]).probe()),
            memory_gib: mem_kb / 1048576.0,
            pyebpf_version: p(built, &["--version"]),
            pyebpf_git: git_revision(),
            pyspy_version: p(&ctx.pyspy, &["--version"]),
            python_version: p(&ctx.python, &["--version"]),
            python: ctx.python.display().to_string(),
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            seconds: 0.0,
            section_seconds: Vec::new(),
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    pub verdict: Verdict,
}

/// Whether a target was met, as far as the measurement can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Met,
    Missed,
    /// The median misses, but by less than the noise of the measurement:
    /// this run cannot tell.
    WithinNoise,
    /// Nothing to judge: the measurement could not be made here.
    NotMeasured,
}

impl Verdict {
    fn of(met: bool) -> Verdict {
        if met {
            Verdict::Met
        } else {
            Verdict::Missed
        }
    }

    fn console(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::WithinNoise => "NOT RESOLVED (within noise)",
            Verdict::NotMeasured => "NOT MEASURED",
        }
    }

    fn markdown(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::WithinNoise => "**not resolved**: the miss is within the noise",
            Verdict::NotMeasured => "**not measured**",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub meta: Meta,
    pub plan: Plan,
    pub slowdown: Slowdown,
    pub cost: Vec<CostRow>,
    pub walk: Walk,
    pub throughput: Throughput,
    pub memory: Option<super::measure::Memory>,
    pub accuracy: Accuracy,
    /// 7. CPython versions (`None`: the section failed).
    pub versions: Option<super::versions::Versions>,
    pub micro: Vec<Micro>,
    pub targets: Vec<Target>,
    /// Runs that failed; their conditions have fewer repetitions.
    pub failures: Vec<String>,
}

fn pct(x: f64) -> String {
    format!("{:+.1}%", 100.0 * (x - 1.0))
}

fn ns(x: f64) -> String {
    if x >= 100_000.0 {
        format!("{:.0} µs", x / 1000.0)
    } else if x >= 10_000.0 {
        format!("{:.1} µs", x / 1000.0)
    } else {
        format!("{x:.0} ns")
    }
}

/// The issue's targets, checked against the medians.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let rows = &r.slowdown.rows;
    let threads: std::collections::BTreeSet<usize> = rows.iter().map(|x| x.threads).collect();
    for t in threads {
        let find = |p: Option<Profiler>, rate: u64, copy: u8| {
            rows.iter().find(|x| {
                x.threads == t
                    && x.condition.profiler == p
                    && (p.is_none() || x.condition.rate_hz == rate)
                    && x.condition.copy == copy
            })
        };
        for (what, pick) in [
            (
                "wall time",
                (|x| &x.ratio) as fn(&super::measure::SlowdownRow) -> &Option<Summary>,
            ),
            ("CPU time", |x| &x.cpu_ratio),
        ] {
            // Noise: how far a second unprofiled run strays from the baseline.
            let noise = find(None, 0, 1)
                .and_then(|c| pick(c).as_ref())
                .map(|s| (s.max - 1.0).abs().max((s.min - 1.0).abs()));
            if let Some(s) = find(Some(Profiler::Pyebpf), 99, 0).and_then(|x| pick(x).as_ref()) {
                let n = noise.unwrap_or(0.0);
                out.push(Target {
                    target: format!(
                        "pyebpf @ 99 Hz within noise of unprofiled, {what} ({t} thread(s))"
                    ),
                    measured: format!(
                        "{} (noise: a second unprofiled run differs by up to {:.1}%)",
                        pct(s.median),
                        100.0 * n
                    ),
                    // Faster than the baseline is within noise too.
                    verdict: Verdict::of(s.median - 1.0 <= n),
                });
            }
            if let Some(s) = find(Some(Profiler::Pyebpf), 999, 0).and_then(|x| pick(x).as_ref()) {
                let n = noise.unwrap_or(0.0);
                let excess = s.median - 1.0;
                out.push(Target {
                    target: format!("pyebpf @ 999 Hz under 2% slowdown, {what} ({t} thread(s))"),
                    measured: format!(
                        "{} (noise: a second unprofiled run differs by up to {:.1}%)",
                        pct(s.median),
                        100.0 * n
                    ),
                    verdict: if excess < 0.02 {
                        Verdict::Met
                    } else if excess - n > 0.02 {
                        Verdict::Missed
                    } else {
                        Verdict::WithinNoise
                    },
                });
            }
        }
    }
    // The part of the slowdown that timing on a noisy machine cannot
    // resolve, measured exactly: the walk runs in the sampled thread's
    // interrupt, so its kernel-measured run time is CPU taken from it.
    for c in r
        .cost
        .iter()
        .filter(|c| c.tool == Tool::PyebpfRecord && c.rate_hz == 999)
    {
        let per_s: Vec<f64> = c
            .bpf_ns_per_sample
            .iter()
            .zip(&c.samples_per_s)
            .map(|(ns, n)| ns * n / 1e9)
            .collect();
        if let Some(share) = Summary::of(&per_s) {
            out.push(Target {
                target: format!(
                    "pyebpf @ 999 Hz under 2% slowdown: BPF run time charged to the sampled \
                     thread (kernel stats, depth {})",
                    c.depth
                ),
                measured: format!(
                    "{:.2}% of its CPU [{:.2}%–{:.2}%]",
                    100.0 * share.median,
                    100.0 * share.min,
                    100.0 * share.max
                ),
                verdict: Verdict::of(share.median < 0.02),
            });
        }
    }
    if let Some(v) = &r.versions {
        out.extend(version_targets(v));
    }
    for c in r.cost.iter().filter(|c| !c.tool.is_pyebpf()) {
        if let Some(x) = c.vs_pyebpf {
            out.push(Target {
                target: format!(
                    "pyebpf record ≥10x cheaper per sample than {} ({} Hz, depth {})",
                    c.tool.label(),
                    c.rate_hz,
                    c.depth
                ),
                measured: format!("{x:.1}x"),
                verdict: Verdict::of(x >= 10.0),
            });
        }
    }
    out
}

/// Section 7's target: no version costs more per frame than 3.11 by more than 20%.
/// The ratios to 3.11 (one per cycle, each to the baseline of the same cycle) give the
/// noise: the median's distribution-free 95% confidence interval. A median above the
/// target whose interval reaches down to it is not resolved.
pub fn version_targets(v: &Versions) -> Vec<Target> {
    let Some(base) = v.rows.iter().find(|x| x.interpreter.baseline) else {
        return Vec::new();
    };
    let max = versions::MAX_FRAME_RATIO;
    let mut out = Vec::new();
    for row in v.rows.iter().filter(|x| !x.interpreter.baseline) {
        let target = format!(
            "pyebpf BPF cost per frame on CPython {} at most {max}x CPython {}'s \
             (kernel stats, depth {} → {})",
            row.interpreter.label(),
            base.interpreter.version,
            v.walk_depths[0],
            v.walk_depths[1]
        );
        let (Some(ratio), Some(mine), Some(theirs)) = (
            &row.frame_ratio_summary,
            &row.ns_per_frame,
            &base.ns_per_frame,
        ) else {
            out.push(Target {
                target,
                measured: row
                    .skipped
                    .clone()
                    .unwrap_or_else(|| "no complete round (see Failures)".into()),
                verdict: Verdict::NotMeasured,
            });
            continue;
        };
        let (lo, hi) = stats::median_ci95(&row.frame_ratio).unwrap_or((ratio.min, ratio.max));
        out.push(Target {
            target,
            measured: format!(
                "{:.2}x ({:.1} ns against {:.1} ns per frame; noise: {:.2}x–{:.2}x, {}{})",
                ratio.median,
                mine.median,
                theirs.median,
                lo,
                hi,
                if ratio.n >= 6 {
                    format!(
                        "95% confidence interval of the median of {} cycles",
                        ratio.n
                    )
                } else {
                    format!("the range of {} cycle(s)", ratio.n)
                },
                if row.walked_in_full && base.walked_in_full {
                    ""
                } else {
                    "; **not every stack was walked in full**"
                }
            ),
            verdict: if ratio.median <= max {
                Verdict::Met
            } else if lo > max {
                Verdict::Missed
            } else {
                Verdict::WithinNoise
            },
        });
    }
    out
}

/// One line per target, for the console.
pub fn target_lines(r: &Results) -> Vec<String> {
    r.targets
        .iter()
        .map(|t| format!("[{}] {}: {}", t.verdict.console(), t.target, t.measured))
        .collect()
}

fn summary_or_dash(s: &Option<Summary>, f: impl Fn(f64) -> String) -> String {
    s.as_ref().map(|s| s.show(f)).unwrap_or_else(|| "–".into())
}

pub fn markdown(r: &Results) -> String {
    let m = &r.meta;
    let p = &r.plan;
    let mut s = String::new();
    let mode_cmd = match m.mode {
        super::Mode::Full => "cargo xtask bench",
        super::Mode::Quick => "cargo xtask bench --quick",
        super::Mode::Smoke => "cargo xtask bench --smoke",
    };
    let _ = writeln!(
        s,
        "# pyebpf benchmarks\n\n\
         pyebpf against py-spy, measured side by side in one run of `{mode_cmd}` on {}, \
         in {:.0} s. Regenerate with `cargo xtask bench` (full) or `cargo xtask bench --quick` \
         (under 5 minutes); it writes this file and `benchmarks.json` (every raw value). \
         As root: the harness loads BPF programs and py-spy reads other processes.\n\n\
         Every figure is the **median** over repetitions, shown as `median [min–max]`. \
         Repetitions are interleaved: each round runs every condition once, in an order rotated \
         from round to round, so slow drift of the machine spreads over all conditions alike. \
         Ratios are to a baseline measured in the same invocation.\n\n\
         The daemon under production-sized loads (hundreds of processes, an exec storm, query \
         load, Pyroscope push, a gunicorn soak) is measured separately by \
         `cargo xtask bench --scale`: see [BENCHMARKS-scale.md](BENCHMARKS-scale.md).\n",
        m.date_utc, m.seconds
    );

    let _ = writeln!(s, "## Machine and versions\n");
    let _ = writeln!(s, "| | |\n|---|---|");
    for (k, v) in [
        ("CPUs (`nproc`)", m.nproc.to_string()),
        ("CPU model", m.cpu_model.clone()),
        ("memory", format!("{:.1} GiB", m.memory_gib)),
        ("kernel", m.kernel.clone()),
        (
            "pyebpf",
            format!("{} (git {})", m.pyebpf_version, m.pyebpf_git),
        ),
        ("py-spy", m.pyspy_version.clone()),
        ("Python", format!("{} (`{}`)", m.python_version, m.python)),
        (
            "load average (1, 5, 15 min) at start / end",
            format!("{} / {}", m.loadavg_start, m.loadavg_end),
        ),
    ] {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let times: Vec<String> = m
        .section_seconds
        .iter()
        .map(|(k, v)| format!("{k} {v:.0} s"))
        .collect();
    let _ = writeln!(s, "\nTime per measurement: {}.", times.join(", "));
    let _ = writeln!(
        s,
        "\nThe load average counts other work running on the machine at the same time; on a \
         shared machine it widens every spread below, and CPU contention with it is part of \
         what the wall-time ratios see.\n"
    );

    let _ = writeln!(s, "## Targets\n\n| target | measured | |\n|---|---|---|");
    for t in &r.targets {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            t.target,
            t.measured,
            t.verdict.markdown()
        );
    }
    let missed: Vec<_> = r
        .targets
        .iter()
        .filter(|t| t.verdict != Verdict::Met)
        .collect();
    let _ = writeln!(s, "\n### Where pyebpf does not yet meet a target\n");
    if missed.is_empty() {
        let _ = writeln!(s, "Every target above was met in this run.");
    } else {
        for t in &missed {
            if t.verdict == Verdict::NotMeasured {
                let _ = writeln!(s, "- **{}**: not measured: {}.", t.target, t.measured);
                continue;
            }
            let _ = writeln!(
                s,
                "- **{}**: measured {}{}.",
                t.target,
                t.measured,
                if t.verdict == Verdict::WithinNoise {
                    "; the median is above the target by less than the noise, so this run \
                     can neither confirm nor refute it"
                } else {
                    ""
                }
            );
        }
    }
    let _ = writeln!(s);
    for l in findings(r) {
        let _ = writeln!(s, "- {l}");
    }

    // 1.
    let _ = writeln!(
        s,
        "\n## 1. Target slowdown\n\n\
         `tests/workloads/bench_work.py` runs a fixed amount of pure-Python work ({} units, \
         calibrated to about {:.1} s unprofiled on this machine), in one thread, and split \
         over 4 threads (which take turns on the GIL). The workload starts, the profiler \
         attaches (`pyebpf record` once its BPF program runs; `py-spy record` once it prints \
         that it samples), and only then is the work started and timed inside the process. \
         Slowdown = wall time / wall time of the unprofiled baseline of the same round. The \
         second unprofiled run (\"noise control\") shows how much two unprofiled runs differ: \
         that is the noise. pyebpf's `--rate` is per CPU, py-spy's per process; both sample a \
         busy single process at that rate. *CPU time* is the workload's own CPU time \
         (`time.process_time()`, all threads) over the same work: unlike wall time it does not \
         change when other work on the machine takes the CPU, and on this kernel (no \
         `CONFIG_IRQ_TIME_ACCOUNTING`) it includes the BPF program, which runs in the perf \
         interrupt of the sampled task. Profiler CPU is the recorder's whole life (start-up \
         and writing the profile included).\n",
        r.slowdown.units, p.work_secs
    );
    let _ = writeln!(
        s,
        "| threads | condition | wall time (s) | wall-time slowdown | CPU time (s) | CPU-time slowdown | samples | profiler CPU (s) |\n|---|---|---|---|---|---|---|---|"
    );
    for row in &r.slowdown.rows {
        let wall = Summary::of(&row.wall_s);
        let cpu_t = Summary::of(&row.cpu_s);
        let samples = Summary::of(&row.samples.iter().map(|&x| x as f64).collect::<Vec<_>>());
        let cpu = Summary::of(&row.profiler_cpu_s);
        let ratio = |x: &Option<Summary>| {
            x.as_ref()
                .map(|x| x.show(pct))
                .unwrap_or_else(|| "(baseline)".into())
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.threads,
            row.label,
            summary_or_dash(&wall, |x| format!("{x:.3}")),
            ratio(&row.ratio),
            summary_or_dash(&cpu_t, |x| format!("{x:.3}")),
            ratio(&row.cpu_ratio),
            if row.condition.profiler.is_some() {
                summary_or_dash(&samples, |x| format!("{x:.0}"))
            } else {
                "–".into()
            },
            if row.condition.profiler.is_some() {
                summary_or_dash(&cpu, |x| format!("{x:.3}"))
            } else {
                "–".into()
            },
        );
    }

    // 2.
    let _ = writeln!(
        s,
        "\n## 2. Profiler cost per sample\n\n\
         Cost per sample = (user + system CPU of the profiler + kernel BPF run time) / stacks \
         sampled, on `scenarios.py recurse:N` (one busy thread whose stack is N + 6 frames \
         deep), at equal rate and depth. After {:.1} s of warm-up, a window of about {:.0} s \
         is measured. CPU comes from `/proc/PID/task/*/schedstat` (nanoseconds, every thread).\n\
         - **`pyebpf record`** and **`py-spy record`** (`--format raw`, default and \
           `--nonblocking`), measured the same way: CPU over the window; samples = achieved \
           rate (samples written / time sampling) × window; for pyebpf, BPF run time over the \
           window from `/proc/PID/fdinfo` of its program (the kernel's `run_time_ns`, which \
           covers every perf event on every CPU, also those that exit early). py-spy has no \
           BPF part; in its default mode it stops the target for each sample, a cost the \
           target pays (section 1), not counted here. *vs pyebpf* divides by `pyebpf \
           record` at the same point.\n\
         - **`pyebpf daemon`** (default configuration, profiling only the workload through an \
           include rule): BPF run time (`pyebpf_bpf_run_time_seconds_total`) and stacks \
           (`pyebpf_bpf_events_total{{outcome=\"sampled\"}}`) from `/metrics`, both \
           snapshots just after the daemon refreshes those counters, so they cover whole \
           seconds. Its userspace part also holds the daemon's own work that does not depend \
           on samples: the once-a-second refresh, and discovery of every process started on \
           the host (each exec is inspected); with its one profiled process asleep the daemon \
           used {} ms of CPU per second in this run.\n",
        p.warm_secs,
        p.window_secs,
        summary_or_dash(&r.walk.idle_daemon_cpu_ms_per_s, |x| format!("{x:.2}"))
    );
    let _ = writeln!(
        s,
        "| rate | depth | profiler | cost per sample | userspace | BPF | samples/s | vs pyebpf record |\n|---|---|---|---|---|---|---|---|"
    );
    for c in &r.cost {
        let _ = writeln!(
            s,
            "| {} Hz | {} | {} | {} | {} | {} | {} | {} |",
            c.rate_hz,
            c.depth,
            c.tool.label(),
            summary_or_dash(&c.summary, ns),
            summary_or_dash(&Summary::of(&c.user_ns_per_sample), ns),
            if c.tool.is_pyebpf() {
                summary_or_dash(&Summary::of(&c.bpf_ns_per_sample), ns)
            } else {
                "–".into()
            },
            summary_or_dash(&Summary::of(&c.samples_per_s), |x| format!("{x:.0}")),
            c.vs_pyebpf
                .map(|x| format!("{x:.1}x"))
                .unwrap_or_else(|| "–".into()),
        );
    }

    // 3.
    let w = &r.walk;
    let _ = writeln!(
        s,
        "\n## 3. BPF walk cost by stack depth\n\n\
         `pyebpf daemon` at 999 Hz on `scenarios.py recurse:N`, kernel BPF statistics over a \
         window as in section 2. *Per run* is run time / program runs (every perf event on \
         every CPU). *Per stack* takes out the runs that exit early (not the profiled \
         process), at the cost of an early exit measured with the profiled process asleep \
         ({}), and divides by the stacks sent. *Deepest stack* is the longest stack ending in \
         `recurse` in the daemon's `/folded` profile of the window; a depth counts as walked \
         in full when that stack has all N + 5 frames (`recurse` N + 1 times, the step, \
         `loop_forever`, `main`, `<module>`) and no stack was truncated.\n",
        summary_or_dash(&w.early_exit_ns, ns)
    );
    let _ = writeln!(
        s,
        "| recursion depth | --max-depth | deepest stack (frames) | BPF per run | BPF per stack | truncated | read failures | walked in full |\n|---|---|---|---|---|---|---|---|"
    );
    for row in &w.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.depth,
            row.max_depth,
            row.deepest_stack,
            summary_or_dash(&row.ns_per_run, ns),
            summary_or_dash(&row.ns_per_walk, ns),
            row.truncated,
            row.read_failed,
            if row.walked_in_full { "yes" } else { "**no**" }
        );
    }
    let _ = writeln!(
        s,
        "\nDeepest recursion depth walked in full: **{}**.{}",
        w.deepest_in_full
            .map(|d| d.to_string())
            .unwrap_or_else(|| "none".into()),
        w.ns_per_frame
            .map(|x| format!(" Marginal cost between the two deepest: {x:.0} ns per frame."))
            .unwrap_or_default()
    );

    // 4.
    let t = &r.throughput;
    let _ = writeln!(
        s,
        "\n## 4. Throughput\n\n\
         {} busy processes (`scenarios.py recurse:{}`) on {} CPUs; `pyebpf daemon` restarted \
         at each `sampling.rate_hz`, ring buffer {} MiB (the default), measured over a window \
         after 1 s of warm-up. Drops are `pyebpf_bpf_events_total{{outcome=\"ringbuf_full\"}}`. \
         CPU is percent of one CPU.\n",
        t.processes,
        t.depth,
        m.nproc,
        t.ring_bytes >> 20
    );
    let _ = writeln!(
        s,
        "| rate per CPU | seconds | stacks/s (total) | dropped | read failures | daemon CPU | BPF CPU | daemon CPU per stack |\n|---|---|---|---|---|---|---|---|"
    );
    let level_row = |s: &mut String, l: &super::measure::Level, note: &str| {
        let _ = writeln!(
            s,
            "| {} Hz{note} | {:.0} | {:.0} | {} | {} | {:.1}% | {:.1}% | {} |",
            l.rate_hz,
            l.seconds,
            l.samples_per_s,
            l.ringbuf_full,
            l.read_failed,
            l.daemon_cpu_pct,
            l.bpf_cpu_pct,
            ns(l.daemon_ns_per_sample)
        );
    };
    for l in &t.levels {
        level_row(&mut s, l, "");
    }
    if let Some(c) = &t.confirmed {
        level_row(&mut s, c, " (held)");
        let _ = writeln!(
            s,
            "\nHighest rate held for {:.0} s: **{:.0} stacks/s** in total with {} dropped, \
             daemon at {:.1}% of a CPU.",
            c.seconds, c.samples_per_s, c.ringbuf_full, c.daemon_cpu_pct
        );
    }

    // 5.
    if let Some(mem) = &r.memory {
        let mib = |b: u64| b as f64 / 1048576.0;
        let _ = writeln!(
            s,
            "\n## 5. Memory\n\n\
         {} processes of `tests/workloads/bench_codeobjs.py`, each with {} distinct code \
         objects made with `exec(compile(...))` and called in chains (so every sample holds a \
         whole chain and every code object is sampled within seconds); `pyebpf daemon` at {} \
         Hz. RSS from `/proc/PID/status` once {} code objects had been symbolised \
         (`pyebpf_symbol_cache_total{{result=\"miss\"}}`, {:.0} s after the processes \
         started).\n",
            mem.processes,
            mem.functions_per_process,
            mem.rate_hz,
            if mem.complete {
                format!("{:.0} (all but at most 1%)", mem.code_objects)
            } else {
                format!("{:.0} (**not all**: time limit)", mem.code_objects)
            },
            mem.seconds
        );
        let _ = writeln!(
        s,
        "| daemon RSS idle | RSS with {} × {} code objects | peak RSS | per process | per code object |\n|---|---|---|---|---|\n| {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} MiB | {:.0} bytes |",
        mem.processes,
        mem.functions_per_process,
        mib(mem.rss_idle),
        mib(mem.rss),
        mib(mem.rss_peak),
        mib(mem.rss.saturating_sub(mem.rss_idle)) / mem.processes.max(1) as f64,
        mem.rss.saturating_sub(mem.rss_idle) as f64 / mem.code_objects.max(1.0),
    );
    } else {
        let _ = writeln!(s, "\n## 5. Memory\n\nFailed in this run (see Failures).");
    }

    // 6.
    let a = &r.accuracy;
    let truth: Vec<String> = a
        .truth
        .iter()
        .map(|(k, v)| format!("{k} {:.1}%", 100.0 * v))
        .collect();
    let hot: Vec<String> = a
        .hot_lines
        .iter()
        .map(|(k, v)| format!("{k}: {v:?}"))
        .collect();
    let _ = writeln!(
        s,
        "\n## 6. Accuracy\n\n\
         Workload: {}. True distribution of leaf functions: {}. Each profiler records {:.0} s \
         (`pyebpf record --format folded`, `py-spy record --format raw`: the same folded \
         shape). **TV distance** = ½ Σ |measured share − true share| over leaf functions \
         (anything else the profiler reports counts as error). **Hot-line agreement** = \
         share of samples whose leaf frame is at a `# HOT:` line of those functions \
         (scenarios.py lines {}).\n",
        a.workload,
        truth.join(", "),
        p.acc_secs,
        hot.join("; ")
    );
    let _ = writeln!(
        s,
        "| profiler | rate | samples | TV distance | hot-line agreement | measured shares (last round) |\n|---|---|---|---|---|---|"
    );
    for row in &a.rows {
        let shares: Vec<String> = row
            .shares
            .iter()
            .filter(|(_, v)| **v >= 0.001)
            .map(|(k, v)| format!("{k} {:.1}%", 100.0 * v))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} Hz | {} | {} | {} | {} |",
            row.profiler.label(),
            row.rate_hz,
            summary_or_dash(
                &Summary::of(&row.samples.iter().map(|&x| x as f64).collect::<Vec<_>>()),
                |x| format!("{x:.0}")
            ),
            summary_or_dash(&row.tv, |x| format!("{x:.4}")),
            summary_or_dash(&row.lines, |x| format!("{:.2}%", 100.0 * x)),
            shares.join(", ")
        );
    }

    // 7.
    match &r.versions {
        Some(v) => versions_markdown(&mut s, &r.plan, &r.meta.pyspy_version, v),
        None => {
            let _ = writeln!(
                s,
                "\n## 7. CPython versions\n\nFailed in this run (see Failures)."
            );
        }
    }

    // Micro.
    let _ = writeln!(
        s,
        "\n## Microbenchmarks (criterion)\n\n\
         `profiler-daemon/benches/{{userspace,discovery}}.rs`, run by `cargo xtask bench` with a \
         short measurement time{}; median time per iteration with criterion's 95% confidence \
         interval. Run alone with `cargo bench -p profiler-daemon --bench userspace` (or \
         `--bench discovery`).\n",
        p.criterion
            .map(|(w, m)| format!(" ({w} s warm-up, {m} s measurement)"))
            .unwrap_or_default()
    );
    if r.micro.is_empty() {
        let _ = writeln!(s, "Not run.");
    } else {
        let _ = writeln!(
            s,
            "| benchmark | what | median | 95% CI |\n|---|---|---|---|"
        );
        for b in &r.micro {
            let _ = writeln!(
                s,
                "| `{}` | {} | {:.1} ns | {:.1}–{:.1} ns |",
                b.name,
                micro_what(&b.name),
                b.median_ns,
                b.ci_low_ns,
                b.ci_high_ns
            );
        }
    }
    let _ = writeln!(s, "\n## Failures\n");
    if r.failures.is_empty() {
        let _ = writeln!(s, "No run failed.");
    } else {
        let _ = writeln!(
            s,
            "These runs failed; their conditions have fewer repetitions above.\n"
        );
        for f in &r.failures {
            let _ = writeln!(s, "- {}", f.replace('\n', " "));
        }
    }
    s
}

/// What to show in a py-spy column of section 7 when py-spy gave no number.
fn pyspy_missing(row: &VersionRow, pyspy_version: &str) -> Option<String> {
    let e = row.pyspy_error.as_ref()?;
    let version = pyspy_version.trim_start_matches("py-spy ").trim();
    Some(if row.pyspy_unsupported {
        format!(
            "unsupported by py-spy {version} ({})",
            e.replace('|', "\\|")
        )
    } else {
        format!("py-spy {version} failed: {}", e.replace('|', "\\|"))
    })
}

/// `CPython 3.13.18 (static)`, or why the row has no numbers.
fn version_cells(row: &VersionRow) -> (String, Option<String>) {
    let i = &row.interpreter;
    let name = format!(
        "{}{} ({})",
        i.version,
        if i.baseline { ", baseline" } else { "" },
        i.build
    );
    (
        name,
        row.skipped.as_ref().map(|w| format!("not measured: {w}")),
    )
}

/// Section 7. `pyspy_version`: `py-spy --version`.
pub fn versions_markdown(s: &mut String, p: &Plan, pyspy_version: &str, v: &Versions) {
    let base = v
        .rows
        .iter()
        .find(|x| x.interpreter.baseline)
        .map(|x| x.interpreter.version.clone())
        .unwrap_or_else(|| "3.11".into());
    let (d0, d1) = (v.walk_depths[0], v.walk_depths[1]);
    let _ = writeln!(
        s,
        "\n## 7. CPython versions\n\n\
         Every real CPython version on this machine, one interpreter per minor version (the \
         baseline, {base}, is the interpreter of sections 1–6), with the definitions of \
         sections 2, 3 and 6, at {rate} Hz. The interpreters of the Debian roots run chrooted in \
         their root, in their own mount and pid namespaces, as the end-to-end tests run them \
         (`tests/` mounted read-only at `/pyebpf`); the baseline runs on the host. Each of the \
         {rounds} round(s) starts one process of every interpreter on \
         `tests/workloads/bench_versions.py`, which runs `scenarios.py`'s `recurse:N` or `split`, \
         or waits off CPU, and switches on a line of stdin, so that one recorder can measure \
         several modes and processes in turn. A stack belongs to a mode by its number of \
         `recurse` frames (and to a process by the root frame `pyebpf record` adds when it \
         records several).\n\
         - **BPF cost per frame** (pyebpf only: py-spy has no BPF part). One `pyebpf record` of \
           every process, all waiting off CPU. The kernel's BPF run time and run count of its \
           programs (`/proc/PID/fdinfo`) are read at each switch while the processes are made \
           busy one at a time, {phase:.1} s at depth {d0} and {phase:.1} s at depth {d1} each, \
           in {cycles} cycle(s) per round; each cycle runs the interpreters in an order rotated \
           from cycle to cycle, so the phases compared are seconds apart and every interpreter \
           sees the same state of the machine. The processes are pinned to the last CPU for \
           the session (on this VM the run time per stack differs from one CPU to the other). \
           (Cycle c runs depths {d0} + c and {d1} + c, so \
           that each phase's stacks are told apart by their depth.) Per stack = (run time − \
           early exits × the cost of an early exit) / stacks of that phase, where early exits \
           are the runs that sent no stack, and their cost is measured with every process \
           waiting ({early}); per frame = (per stack at depth {d1} − per stack at depth {d0}) / \
           {diff}, per cycle; *vs {base}* divides by the baseline's of the same cycle. Target: \
           at most {max}x; the noise is the distribution-free 95% confidence interval of the \
           median ratio (order statistics; the whole range with fewer than 6 cycles): a \
           median above the target is a miss only when the whole interval is. The cycles of \
           one round share their processes. *Walked in full*: the deepest stacks had all \
           their `recurse` frames ({d1} + c + 1) and no stack was truncated or partial.\n\
         - **Cost per sample** (then each interpreter alone, the others waiting): section 2's \
           definition at depth {cd}: (profiler CPU over a {window:.1} s window after \
           {warm:.1} s of warm-up, from schedstat, + BPF run time over the window) / samples \
           in the window (the recorder's depth-{cd} samples over the time it sampled depth \
           {cd}, times the window). `pyebpf record` and `py-spy record` (`--format raw`, \
           default mode) one after the other, the first alternating from round to round.\n\
         - **Accuracy**: the same recorder goes on over {acc:.1} s of the split: section 6's TV \
           distance from the true 1 : 2 : 3 split and hot-line agreement. Every stack without \
           `recurse` counts, so a stray stack of any mode counts as an error.\n\n\
         CPython 3.12 has no row: no real 3.12 interpreter exists on this machine, so pyebpf's \
         3.12 support is tested only against 3.12's headers (its struct layouts), never on a \
         running 3.12.\n",
        rate = v.rate_hz,
        rounds = v.rounds,
        phase = p.ver_phase_secs,
        cycles = v.cycles_per_round,
        early = summary_or_dash(&v.early_exit_ns, ns),
        diff = d1 - d0,
        max = versions::MAX_FRAME_RATIO,
        cd = v.cost_depth,
        window = p.ver_window_secs,
        warm = p.ver_warm_secs,
        acc = p.ver_acc_secs,
    );
    if let Some(why) = &v.skipped {
        let _ = writeln!(s, "Only the baseline was measured: {why}.\n");
    }
    let _ = writeln!(
        s,
        "| CPython | interpreter | where it comes from | `pyebpf record` saw |\n|---|---|---|---|"
    );
    for row in &v.rows {
        let i = &row.interpreter;
        let (name, skipped) = version_cells(row);
        // `process PID (COMM): CPython …`: the pid is of no interest here.
        let saw = row
            .pyebpf_saw
            .as_deref()
            .map(
                |l| match l.split_once(" (").and_then(|(_, r)| r.split_once("): ")) {
                    Some((comm, what)) => format!("`{comm}`: {what}"),
                    None => l.to_string(),
                },
            )
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {saw} |",
            if i.path.is_empty() {
                "–".into()
            } else {
                format!("`{}`", i.path)
            },
            skipped.unwrap_or_else(|| i.origin.clone()),
        );
    }

    let _ = writeln!(
        s,
        "\n### BPF cost per frame\n\n\
         | CPython | BPF per stack, depth {} | BPF per stack, depth {} | BPF per frame | vs {} | \
         most `recurse` frames in a stack | walked in full |\n|---|---|---|---|---|---|---|",
        v.walk_depths[0], v.walk_depths[1], base
    );
    for row in &v.rows {
        let (name, skipped) = version_cells(row);
        if let Some(w) = skipped {
            let _ = writeln!(s, "| {name} | {w} | | | | | |");
            continue;
        }
        let per_stack = |d: u32| {
            summary_or_dash(
                &row.bpf_ns_per_stack.get(&d).and_then(|x| Summary::of(x)),
                ns,
            )
        };
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} | {} |",
            per_stack(v.walk_depths[0]),
            per_stack(v.walk_depths[1]),
            summary_or_dash(&row.ns_per_frame, |x| format!("{x:.1} ns")),
            if row.interpreter.baseline {
                "(baseline)".into()
            } else {
                summary_or_dash(&row.frame_ratio_summary, |x| format!("{x:.2}x"))
            },
            row.deepest_recurse,
            if row.walked_in_full { "yes" } else { "**no**" }
        );
    }

    let _ = writeln!(
        s,
        "\n### Cost per sample ({} Hz, depth {})\n\n\
         | CPython | pyebpf record | userspace | BPF | samples/s | py-spy record | samples/s | \
         py-spy / pyebpf |\n|---|---|---|---|---|---|---|---|",
        v.rate_hz, v.cost_depth
    );
    for row in &v.rows {
        let (name, skipped) = version_cells(row);
        if let Some(w) = skipped {
            let _ = writeln!(s, "| {name} | {w} | | | | | | |");
            continue;
        }
        let (a, b) = (&row.pyebpf_cost, &row.pyspy_cost);
        let spy = match pyspy_missing(row, pyspy_version) {
            Some(why) => format!("{why} | – | –"),
            None => format!(
                "{} | {} | {}",
                summary_or_dash(&b.summary, ns),
                summary_or_dash(&Summary::of(&b.samples_per_s), |x| format!("{x:.0}")),
                match (&a.summary, &b.summary) {
                    (Some(x), Some(y)) => format!("{:.1}x", y.median / x.median),
                    _ => "–".into(),
                }
            ),
        };
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {spy} |",
            summary_or_dash(&a.summary, ns),
            summary_or_dash(&Summary::of(&a.user_ns_per_sample), ns),
            summary_or_dash(&Summary::of(&a.bpf_ns_per_sample), ns),
            summary_or_dash(&Summary::of(&a.samples_per_s), |x| format!("{x:.0}")),
        );
    }

    let _ = writeln!(
        s,
        "\n### Accuracy ({} Hz, 1 : 2 : 3 split)\n\n\
         | CPython | pyebpf samples | pyebpf TV distance | pyebpf hot-line agreement | \
         py-spy samples | py-spy TV distance | py-spy hot-line agreement |\n\
         |---|---|---|---|---|---|---|",
        v.rate_hz
    );
    let acc = |a: &versions::AccSeries| {
        format!(
            "{} | {} | {}",
            summary_or_dash(&Summary::of(&a.samples), |x| format!("{x:.0}")),
            summary_or_dash(&a.tv, |x| format!("{x:.4}")),
            summary_or_dash(&Summary::of(&a.line_agreement), |x| format!(
                "{:.2}%",
                100.0 * x
            )),
        )
    };
    for row in &v.rows {
        let (name, skipped) = version_cells(row);
        if let Some(w) = skipped {
            let _ = writeln!(s, "| {name} | {w} | | | | | |");
            continue;
        }
        let spy = match pyspy_missing(row, pyspy_version) {
            Some(why) => format!("{why} | – | –"),
            None => acc(&row.pyspy_accuracy),
        };
        let _ = writeln!(s, "| {name} | {} | {spy} |", acc(&row.pyebpf_accuracy));
    }
}

fn micro_what(name: &str) -> &'static str {
    let group = name.split('/').next().unwrap_or("");
    match group {
        "decode" => "ring-buffer record → `RawSample` (`bpf::events::decode`)",
        "symbols" => "symbol cache hit (`Symbolizer::code` / `frame`, line included)",
        "linetable" if name.ends_with("_decoded") => {
            "line of an instruction from the decoded table the symbol cache keeps (binary search)"
        }
        "linetable" if name.ends_with("_decode_once") => {
            "decoding a line table once, when a code object is first read"
        }
        "linetable" => "`line_for_instr` scanning a raw CPython 3.11 line table (before caching)",
        "store" => "aggregation: `Store::add_sample(s)` of known stacks / `Store::query`",
        "inspect" => {
            "inspecting a running non-Python process (`sleep`), ELF verdicts cached or not"
        }
        "candidate" => "discovery of a non-Python process: rules, labels, cached ELF verdicts",
        _ => "",
    }
}

/// Plain statements about the results that are not pass/fail targets.
fn findings(r: &Results) -> Vec<String> {
    let mut out = Vec::new();
    let w = &r.walk;
    for row in w.rows.iter().filter(|x| !x.walked_in_full) {
        out.push(format!(
            "Stacks of recursion depth {} (`--max-depth {}`) were not walked in full: deepest \
             stack {} frames, {} truncated, {} read failures.",
            row.depth, row.max_depth, row.deepest_stack, row.truncated, row.read_failed
        ));
    }
    let t = &r.throughput;
    if t.levels.iter().all(|l| l.ringbuf_full > 0.0) {
        out.push("The daemon dropped samples (ring buffer full) at every rate tried.".into());
    }
    if let Some(c) = &t.confirmed {
        if c.ringbuf_full > 0.0 {
            out.push(format!(
                "The daemon dropped {} samples when holding {} Hz for {:.0} s.",
                c.ringbuf_full, c.rate_hz, c.seconds
            ));
        }
    }
    if let Some(m) = r.memory.as_ref().filter(|m| !m.complete) {
        out.push(format!(
            "Memory: only {:.0} of {} code objects were symbolised within the time limit.",
            m.code_objects,
            m.processes * m.functions_per_process
        ));
    }
    if let Some(v) = &r.versions {
        let pyspy = r.meta.pyspy_version.trim_start_matches("py-spy ").trim();
        for row in v.rows.iter().filter(|x| x.skipped.is_none()) {
            let label = row.interpreter.label();
            if !row.walked_in_full && row.ns_per_frame.is_some() {
                out.push(format!(
                    "CPython {label}: stacks of recursion depth {} were not walked in full (most \
                     `recurse` frames in a stack: {}{}).",
                    v.walk_depths[1],
                    row.deepest_recurse,
                    if row.cut_stacks {
                        "; truncated or partial stacks"
                    } else {
                        ""
                    }
                ));
            }
            if let Some(e) = &row.pyspy_error {
                out.push(format!(
                    "py-spy {pyspy} {} CPython {label}: {e}",
                    if row.pyspy_unsupported {
                        "does not support"
                    } else {
                        "failed on"
                    }
                ));
            }
        }
    }
    let tv = |p: Profiler| {
        r.accuracy
            .rows
            .iter()
            .filter(|x| x.profiler == p)
            .filter_map(|x| x.tv.as_ref().map(|s| s.median))
            .fold(f64::NAN, f64::max)
    };
    let (mine, theirs) = (tv(Profiler::Pyebpf), tv(Profiler::PySpy));
    if mine.is_finite() && theirs.is_finite() && mine > theirs {
        out.push(format!(
            "Accuracy: pyebpf's TV distance from the true split ({mine:.4}) is larger than \
             py-spy's ({theirs:.4})."
        ));
    }
    out
}
