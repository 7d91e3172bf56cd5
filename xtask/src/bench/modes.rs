//! `cargo xtask bench --modes`: pyebpf's profile modes side by side with
//! py-spy's on one service-like workload (tests/workloads/bench_modes.py:
//! a worker in pure Python and zlib, threads waking every millisecond, idle
//! threads). For each condition: the profiler's CPU per sample (its own
//! CPU time plus, for pyebpf, the kernel's BPF run time of its programs)
//! and the target's slowdown (work units done in a fixed time, against an
//! unprofiled run in the same round). Written to BENCHMARKS-modes.md.
//!
//! A "sample" is one thread's stack as the profiler writes it: pyebpf's
//! summary count (CPU samples, plus off-CPU intervals in wall and off-cpu
//! mode); py-spy's sum of its raw output's counts (with `--idle`, idle
//! threads' stacks too). CPU is counted over the work only; samples are
//! scaled by the work's share of the time the profiler sampled.
use super::sys::{self, Output, Proc};
use super::{private_pyebpf, pyspy, python, Mode};
use crate::util::root;
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Sampling rate of every profiler (py-spy's default is 100).
const RATE: &str = "99";

/// Who profiles, and how.
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Condition {
    label: &'static str,
    /// `None`: unprofiled.
    tool: Option<Tool>,
    args: &'static [&'static str],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
enum Tool {
    Pyebpf,
    PySpy,
}

const CONDITIONS: [Condition; 11] = [
    Condition {
        label: "unprofiled (baseline)",
        tool: None,
        args: &[],
    },
    Condition {
        label: "unprofiled again (noise control)",
        tool: None,
        args: &[],
    },
    Condition {
        label: "pyebpf --mode cpu",
        tool: Some(Tool::Pyebpf),
        args: &["--mode", "cpu"],
    },
    Condition {
        label: "pyebpf --mode cpu --native",
        tool: Some(Tool::Pyebpf),
        args: &["--mode", "cpu", "--native"],
    },
    Condition {
        label: "pyebpf --mode cpu --native-stacks",
        tool: Some(Tool::Pyebpf),
        args: &["--mode", "cpu", "--native-stacks"],
    },
    Condition {
        label: "pyebpf --mode wall",
        tool: Some(Tool::Pyebpf),
        args: &["--mode", "wall"],
    },
    Condition {
        label: "pyebpf --mode off-cpu",
        tool: Some(Tool::Pyebpf),
        args: &["--mode", "off-cpu"],
    },
    Condition {
        label: "py-spy",
        tool: Some(Tool::PySpy),
        args: &[],
    },
    Condition {
        label: "py-spy --idle",
        tool: Some(Tool::PySpy),
        args: &["--idle"],
    },
    Condition {
        label: "py-spy --native",
        tool: Some(Tool::PySpy),
        args: &["--native"],
    },
    Condition {
        label: "py-spy --idle --native",
        tool: Some(Tool::PySpy),
        args: &["--idle", "--native"],
    },
];

/// One run of one condition.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct Run {
    /// Work units the target's worker did.
    units: u64,
    samples: u64,
    /// The profiler's CPU seconds and its BPF programs' run time over the
    /// work.
    profiler_cpu_s: f64,
    bpf_s: f64,
}

impl Run {
    fn ns_per_sample(&self) -> f64 {
        (self.profiler_cpu_s + self.bpf_s) * 1e9 / self.samples.max(1) as f64
    }
}

struct Tools {
    python: PathBuf,
    pyebpf: PathBuf,
    pyspy: PathBuf,
    dir: PathBuf,
}

/// Sum of the run time of `pid`'s BPF programs, in seconds.
fn bpf_secs(pid: u32) -> f64 {
    sys::bpf_progs(pid)
        .values()
        .map(|s| s.run_time_ns)
        .sum::<u64>() as f64
        / 1e9
}

/// Starts the profiler of `c` on `pid` and waits until it samples.
fn start_profiler(t: &Tools, c: &Condition, tool: Tool, pid: u32, out: &Path) -> Result<Proc> {
    let mut cmd = match tool {
        Tool::Pyebpf => {
            let mut cmd = Command::new(&t.pyebpf);
            cmd.args(["record", "--quiet", "--format", "folded"]);
            cmd
        }
        Tool::PySpy => {
            let mut cmd = Command::new(&t.pyspy);
            cmd.args(["record", "--format", "raw"]);
            cmd
        }
    };
    cmd.args(c.args)
        .args(["--rate", RATE, "--pid", &pid.to_string(), "--output"])
        .arg(out);
    let mut p = Proc::spawn(sys::tied(cmd), c.label, Output::Both, false)?;
    match tool {
        Tool::Pyebpf => {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !sys::bpf_progs(p.pid).values().any(|s| s.run_cnt > 0) {
                if p.exited() || Instant::now() > deadline {
                    let tail = p.tail();
                    bail!("{} never sampled:\n{tail}", c.label);
                }
                sys::sleep_secs(0.02);
            }
        }
        Tool::PySpy => {
            p.wait_line("Sampling process", Duration::from_secs(30))?;
        }
    }
    Ok(p)
}

/// pyebpf's summary count: `pyebpf record: 3.0 s, 1 process(es), N samples`.
fn summary_samples(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("pyebpf record: "))
        .and_then(|l| l.split(", ").nth(2))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The sum of a folded file's counts.
fn folded_total(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<u64>().ok())
        .sum()
}

fn run_once(t: &Tools, c: &Condition, secs: f64) -> Result<Run> {
    let script = root().join("tests/workloads/bench_modes.py");
    let mut cmd = Command::new(&t.python);
    cmd.arg(&script).arg("bench-modes").arg(secs.to_string());
    let mut w = Proc::spawn(sys::tied(cmd), "bench_modes.py", Output::Stdout, true)?;
    w.wait_line("ready", Duration::from_secs(30))?;
    let out = t.dir.join("modes.folded");
    let _ = std::fs::remove_file(&out);
    let profiler = match c.tool {
        Some(tool) => Some((tool, start_profiler(t, c, tool, w.pid, &out)?)),
        None => None,
    };
    let sampling_from = Instant::now();
    // The profiler's CPU and BPF time over the work only, without its
    // start-up (loading programs, reading symbols) and its exit.
    let before = match &profiler {
        Some((_, p)) => (sys::thread_cpu(p.pid), bpf_secs(p.pid)),
        None => (Default::default(), 0.0),
    };
    let work_from = Instant::now();
    w.write_line("go")?;
    let line = w.wait_line("units", Duration::from_secs(60 + secs as u64 * 4))?;
    let units: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("bad line {line:?}"))?;
    let mut run = Run {
        units,
        ..Run::default()
    };
    let work = work_from.elapsed();
    if let Some((tool, mut p)) = profiler {
        run.profiler_cpu_s = sys::cpu_between(&before.0, &sys::thread_cpu(p.pid)).as_secs_f64();
        run.bpf_s = bpf_secs(p.pid) - before.1;
        let sampled = sampling_from.elapsed();
        // py-spy ends by itself when its target exits; pyebpf on Ctrl-C.
        let until = Instant::now() + Duration::from_secs(5);
        while tool == Tool::PySpy && !p.exited() && Instant::now() < until {
            sys::sleep_secs(0.02);
        }
        if !p.exited() {
            p.signal(libc::SIGINT);
        }
        let (code, _) = p.wait_rusage(Duration::from_secs(60))?;
        let tail = p.tail();
        if code != 0 {
            bail!("{} exited with {code}:\n{tail}", c.label);
        }
        let samples = match tool {
            Tool::Pyebpf => summary_samples(&tail)
                .with_context(|| format!("no sample count in the summary:\n{tail}"))?,
            Tool::PySpy => folded_total(&std::fs::read_to_string(&out)?),
        };
        // Its share of the work's time (the profiler samples a little
        // before and after).
        let share = (work.as_secs_f64() / sampled.as_secs_f64()).min(1.0);
        run.samples = (samples as f64 * share).round() as u64;
    }
    let _ = w.wait_rusage(Duration::from_secs(30));
    Ok(run)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

#[derive(serde::Serialize)]
struct Row {
    condition: Condition,
    runs: Vec<Run>,
    /// units of the baseline in the same round / this run's units.
    slowdown: Vec<f64>,
}

pub fn run(mode: Mode, out: Option<PathBuf>, pyebpf: Option<PathBuf>) -> Result<()> {
    if !crate::util::is_root() {
        bail!("`cargo xtask bench --modes` needs root: it loads BPF programs");
    }
    let (reps, secs) = match mode {
        Mode::Full => (5, 8.0),
        Mode::Quick => (2, 4.0),
        Mode::Smoke => (1, 1.0),
    };
    let dir = std::env::temp_dir().join(format!("pyebpf-modes-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (_, pyebpf, version) = private_pyebpf(&dir, pyebpf)?;
    let python = python()?;
    let tools = Tools {
        pyspy: pyspy(&python)?,
        python,
        pyebpf,
        dir: dir.clone(),
    };
    let started = Instant::now();
    let mut rows: Vec<Row> = CONDITIONS
        .iter()
        .map(|c| Row {
            condition: *c,
            runs: Vec::new(),
            slowdown: Vec::new(),
        })
        .collect();
    for round in 0..reps {
        let mut units = vec![0u64; CONDITIONS.len()];
        // Rotated order: slow drifts of a shared host hit every condition.
        for k in 0..CONDITIONS.len() {
            let i = (k + round) % CONDITIONS.len();
            let c = &CONDITIONS[i];
            let r =
                run_once(&tools, c, secs).with_context(|| format!("round {round}, {}", c.label))?;
            println!(
                "round {}/{reps} {:<34} {:>7} units {:>7} samples  {:>8.0} ns/sample",
                round + 1,
                c.label,
                r.units,
                r.samples,
                r.ns_per_sample()
            );
            units[i] = r.units;
            rows[i].runs.push(r);
        }
        for (i, row) in rows.iter_mut().enumerate() {
            row.slowdown
                .push(units[0] as f64 / units[i].max(1) as f64 - 1.0);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let md = markdown(&rows, &version, mode, secs, started.elapsed());
    let out = out.unwrap_or_else(root);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("BENCHMARKS-modes.md"), &md)?;
    let json = serde_json::to_string_pretty(&rows)? + "\n";
    std::fs::write(out.join("benchmarks-modes.json"), json)?;
    print!("\n{md}");
    Ok(())
}

fn markdown(rows: &[Row], version: &str, mode: Mode, secs: f64, took: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Profile modes: pyebpf and py-spy side by side\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench --modes` ({mode:?}) on {}, in {:.0} s: {version}, {} CPUs, load \
         average at the end {}. The target (tests/workloads/bench_modes.py) has a worker \
         alternating a pure-Python loop with `zlib.crc32` of 1 MiB (C code, the GIL \
         released), two threads waking every millisecond and two idle threads; it works \
         {secs} s per run. Every profiler samples at {RATE} Hz. Medians over {} interleaved \
         rounds, `[min–max]` after them.\n",
        chrono_now(),
        took.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        super::report::loadavg(),
        rows.first().map_or(0, |r| r.runs.len()),
    );
    let _ = writeln!(
        s,
        "- **samples/s**: thread stacks written per second (pyebpf: its summary's count, CPU \
         samples plus off-CPU intervals; py-spy: the counts of its raw output, idle threads \
         included with `--idle`).\n\
         - **profiler CPU per sample**: the profiler process's CPU time (its threads' \
         time on CPU) plus, for pyebpf, its BPF programs' run time (kernel statistics), \
         over the work (start-up and exit left out), per sample (the samples scaled by the \
         work's share of the time the profiler sampled). py-spy stops the target for each \
         sample (it runs without `--nonblocking` here); pyebpf never stops it.\n\
         - **target slowdown**: work the unprofiled baseline did in the same round divided \
         by the work done, minus one; the noise control is a second unprofiled run.\n"
    );
    let _ = writeln!(
        s,
        "| condition | samples/s | profiler CPU per sample (µs) | profiler CPU (% of a core) | target slowdown |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for r in rows {
        let per_sample: Vec<f64> = r.runs.iter().map(|x| x.ns_per_sample() / 1e3).collect();
        let rate: Vec<f64> = r.runs.iter().map(|x| x.samples as f64 / secs).collect();
        let core: Vec<f64> = r
            .runs
            .iter()
            .map(|x| 100.0 * (x.profiler_cpu_s + x.bpf_s) / secs)
            .collect();
        let slow: Vec<f64> = r.slowdown.iter().map(|x| 100.0 * x).collect();
        let cell = |v: &[f64], digits: usize, unit: &str| {
            let (lo, hi) = range(v);
            format!(
                "{:.d$}{unit} [{lo:.d$}–{hi:.d$}]",
                median(v.to_vec()),
                d = digits
            )
        };
        if r.condition.tool.is_none() {
            let slowdown = if r.condition.label.contains("baseline") {
                "—".to_string()
            } else {
                cell(&slow, 1, "%")
            };
            let _ = writeln!(s, "| {} | — | — | — | {slowdown} |", r.condition.label);
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r.condition.label,
            cell(&rate, 0, ""),
            cell(&per_sample, 1, ""),
            cell(&core, 2, "%"),
            cell(&slow, 1, "%")
        );
    }
    let _ = writeln!(
        s,
        "\nThe cost per context switch of off-CPU profiling (profiled threads and others) is \
         measured by `cargo xtask bench --offcpu`: see [BENCHMARKS-offcpu.md](BENCHMARKS-offcpu.md)."
    );
    s
}

/// Now, as `YYYY-MM-DD HH:MM UTC`.
fn chrono_now() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counts() {
        assert_eq!(
            summary_samples(
                "x\npyebpf record: 3.0 s, 1 process(es), 567 samples (21 distinct stacks) written to f (folded)\n"
            ),
            Some(567)
        );
        assert_eq!(summary_samples("nothing"), None);
        assert_eq!(folded_total("a;b 3\nc 4\n\nbad line\n"), 7);
    }
}
