//! `cargo xtask bench --offcpu`: what off-CPU profiling costs per context
//! switch, from the kernel's own BPF statistics, for a thread of a profiled
//! process and for one that is not profiled. The load is a two-thread
//! ping-pong (tests/workloads/pingpong.py) paced to about 20,000 context
//! switches a second. Written to BENCHMARKS-offcpu.md.
//!
//! Three conditions, the same ping-pong each time:
//! - not profiled: `pyebpf record --mode off-cpu` on an idle Python
//!   process: every context switch on the host runs the two scheduler
//!   hooks, which find nothing to do;
//! - profiled at the default off-CPU period T (the CPU sampling period,
//!   10.1 ms at 99 Hz), and at T = 1 ms: the ping-pong's own switches are
//!   timed, and a share `d / T` of them walked.
//!
//! The hooks' run time covers every switch on the host; the not-profiled
//! cost per switch, times the switches that are not the ping-pong's, is
//! taken out of the profiled run time to get the cost per profiled switch.
//! The tracepoints' own dispatch (a few tens of ns per hook) is not in the
//! kernel's BPF statistics; the statistics' own clock reads (two per run)
//! are.
use super::sys;
use super::{private_pyebpf, python, Mode};
use crate::util::root;
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// `BPF_PROG_TYPE_TRACING`: the tp_btf scheduler hooks.
const PROG_TYPE_TRACING: u32 = 26;
/// Round trips a second asked of the ping-pong: about two context switches
/// each, plus the host's own.
const ROUNDS_PER_SEC: &str = "10000";
/// The rate the target is stated at.
const TARGET_CS: f64 = 20_000.0;

/// One condition's figures over its measurement window.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct Window {
    secs: f64,
    /// Context switches of the whole host (`/proc/stat` ctxt).
    host_switches: u64,
    /// Context switches of the ping-pong's threads.
    workload_switches: u64,
    /// Runs and run time of the switch-out and switch-in hooks.
    out_runs: u64,
    out_ns: u64,
    in_runs: u64,
    in_ns: u64,
}

impl Window {
    fn hooks_ns(&self) -> u64 {
        self.out_ns + self.in_ns
    }

    /// Hook time per context switch of the host.
    fn ns_per_switch(&self) -> f64 {
        self.hooks_ns() as f64 / self.out_runs.max(1) as f64
    }
}

#[derive(Clone, Debug, serde::Serialize)]
struct Condition {
    name: String,
    /// The off-CPU period T, in microseconds.
    period_us: u64,
    windows: Vec<Window>,
}

fn host_switches() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    stat.lines()
        .find_map(|l| l.strip_prefix("ctxt "))
        .and_then(|v| v.trim().parse().ok())
        .context("no ctxt line in /proc/stat")
}

/// Voluntary and involuntary context switches of every thread of `pid`.
fn process_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// The tracing programs of the pyebpf process `pid`: (switch-out, switch-in)
/// as (runs, ns). The switch-out hook runs once per context switch, the
/// switch-in hook once per return from `__schedule` (and holds the walks
/// it tail-calls), so the one with fewer runs is the switch-out hook.
fn hooks(pid: u32) -> Option<((u64, u64), (u64, u64))> {
    let mut t: Vec<_> = sys::bpf_progs(pid)
        .into_values()
        .filter(|s| s.prog_type == PROG_TYPE_TRACING && s.run_cnt > 0)
        .map(|s| (s.run_cnt, s.run_time_ns))
        .collect();
    if t.len() != 2 {
        return None;
    }
    t.sort();
    Some((t[0], t[1]))
}

struct Snapshot {
    at: Instant,
    host: u64,
    workload: u64,
    hooks: ((u64, u64), (u64, u64)),
}

fn snapshot(pyebpf: u32, workload: u32) -> Result<Snapshot> {
    Ok(Snapshot {
        at: Instant::now(),
        host: host_switches()?,
        workload: process_switches(workload),
        hooks: hooks(pyebpf).context("pyebpf's two scheduler hooks are not running")?,
    })
}

/// One window: the ping-pong running, `pyebpf record --mode off-cpu` on
/// `target` (the ping-pong itself, or an idle process).
fn measure(
    pyebpf: &std::path::Path,
    python: &std::path::Path,
    dir: &std::path::Path,
    profiled: bool,
    period_us: u64,
    warm: f64,
    secs: f64,
) -> Result<Window> {
    let script = root().join("tests/workloads/pingpong.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script).arg(ROUNDS_PER_SEC);
    let mut pong = sys::Proc::spawn(sys::tied(cmd), "ping-pong", sys::Output::Stdout, false)?;
    pong.wait_line("ready", Duration::from_secs(10))?;
    let mut cmd = Command::new(python);
    cmd.arg(&script).arg("idle");
    let mut idle = sys::Proc::spawn(sys::tied(cmd), "idle python", sys::Output::Stdout, false)?;
    idle.wait_line("ready", Duration::from_secs(10))?;
    let target = if profiled { pong.pid } else { idle.pid };
    let mut cmd = Command::new(pyebpf);
    cmd.args(["record", "--quiet", "--mode", "off-cpu", "--pid"])
        .arg(target.to_string())
        .arg("--off-cpu-period-us")
        .arg(period_us.to_string())
        .arg("--duration")
        .arg(format!("{}", warm + secs + 2.0))
        .arg("--output")
        .arg(dir.join("offcpu.folded"));
    let mut rec = sys::Proc::spawn(sys::tied(cmd), "pyebpf record", sys::Output::Stderr, false)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while hooks(rec.pid).is_none() {
        if rec.exited() || Instant::now() > deadline {
            let tail = rec.tail();
            bail!("pyebpf's scheduler hooks never ran:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    sys::sleep_secs(warm);
    let a = snapshot(rec.pid, pong.pid)?;
    sys::sleep_secs(secs);
    let b = snapshot(rec.pid, pong.pid)?;
    let (code, _) = rec.wait_rusage(Duration::from_secs(60))?;
    if code != 0 {
        let tail = rec.tail();
        bail!("pyebpf record failed ({code}):\n{tail}");
    }
    Ok(Window {
        secs: (b.at - a.at).as_secs_f64(),
        host_switches: b.host - a.host,
        workload_switches: b.workload - a.workload,
        out_runs: b.hooks.0 .0 - a.hooks.0 .0,
        out_ns: b.hooks.0 .1 - a.hooks.0 .1,
        in_runs: b.hooks.1 .0 - a.hooks.1 .0,
        in_ns: b.hooks.1 .1 - a.hooks.1 .1,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn run(mode: Mode, out: Option<PathBuf>, pyebpf: Option<PathBuf>) -> Result<()> {
    if !crate::util::is_root() {
        bail!("`cargo xtask bench --offcpu` needs root: it loads BPF programs");
    }
    let (reps, warm, secs) = match mode {
        Mode::Full => (5, 1.0, 10.0),
        Mode::Quick => (2, 1.0, 5.0),
        Mode::Smoke => (1, 0.5, 1.0),
    };
    let dir = std::env::temp_dir().join(format!("pyebpf-offcpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (_, pyebpf, version) = private_pyebpf(&dir, pyebpf)?;
    let python = python()?;
    // T = 1e6 / 99 us is the default (the CPU sampling period at 99 Hz).
    let conditions = [
        ("not profiled", false, 10_101),
        ("profiled, T = 10.1 ms (default)", true, 10_101),
        ("profiled, T = 1 ms", true, 1_000),
    ];
    let mut results: Vec<Condition> = conditions
        .iter()
        .map(|(name, _, t)| Condition {
            name: name.to_string(),
            period_us: *t,
            windows: Vec::new(),
        })
        .collect();
    // Interleaved rounds: slow drifts of a shared host hit every condition.
    for round in 0..reps {
        for (i, (name, profiled, t)) in conditions.iter().enumerate() {
            let w = measure(&pyebpf, &python, &dir, *profiled, *t, warm, secs)
                .with_context(|| format!("round {round}, {name}"))?;
            println!(
                "round {round} {name}: {:.0} host cs/s ({:.0} ping-pong), {:.0} ns per switch-out, {:.0} ns per switch-in",
                w.host_switches as f64 / w.secs,
                w.workload_switches as f64 / w.secs,
                w.out_ns as f64 / w.out_runs.max(1) as f64,
                w.in_ns as f64 / w.in_runs.max(1) as f64,
            );
            results[i].windows.push(w);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let md = markdown(&results, &version, mode);
    let out = out.unwrap_or_else(root);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("BENCHMARKS-offcpu.md"), &md)?;
    let json = serde_json::to_string_pretty(&results)? + "\n";
    std::fs::write(out.join("benchmarks-offcpu.json"), json)?;
    print!("\n{md}");
    Ok(())
}

fn markdown(results: &[Condition], version: &str, mode: Mode) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Off-CPU profiling: cost per context switch\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench --offcpu` ({mode:?}), {version}, {} CPUs, load average at the end {}. \
         A two-thread ping-pong through pipes (tests/workloads/pingpong.py) paced to about \
         20,000 context switches a second; `pyebpf record --mode off-cpu` on an idle Python \
         process (not profiled) or on the ping-pong (profiled). Times are the kernel's BPF \
         statistics of the two scheduler hooks (run time / runs; the switch-in hook's time \
         includes the walks it tail-calls), medians over {} interleaved rounds. The \
         tracepoints' own dispatch is not included; the statistics' own two clock reads per \
         run are (about 25 ns each on the benchmark VM, where rdtsc costs 22 ns).\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        super::report::loadavg(),
        results.first().map_or(0, |c| c.windows.len()),
    );
    let not_profiled = results
        .first()
        .map(|c| median(c.windows.iter().map(Window::ns_per_switch).collect()))
        .unwrap_or(0.0);
    let _ = writeln!(
        s,
        "| condition | host cs/s | ping-pong cs/s | ns per switch-out | ns per switch-in | ns per context switch | host CPU at the measured rate | at 20,000 cs/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for c in results {
        let m = |f: &dyn Fn(&Window) -> f64| median(c.windows.iter().map(f).collect());
        let host = m(&|w| w.host_switches as f64 / w.secs);
        let pong = m(&|w| w.workload_switches as f64 / w.secs);
        let out = m(&|w| w.out_ns as f64 / w.out_runs.max(1) as f64);
        let inn = m(&|w| w.in_ns as f64 / w.in_runs.max(1) as f64);
        let cpu = m(&|w| w.hooks_ns() as f64 / (w.secs * 1e9));
        // Per switch of the condition's kind: every switch when nothing is
        // profiled; the ping-pong's own, with the other switches' share
        // (at the not-profiled cost) taken out, when it is.
        let per_switch = if c.name == "not profiled" {
            not_profiled
        } else {
            m(&|w| {
                let others = w.out_runs.saturating_sub(w.workload_switches) as f64;
                (w.hooks_ns() as f64 - not_profiled * others) / w.workload_switches.max(1) as f64
            })
        };
        let at_target = per_switch * TARGET_CS / 1e9;
        let _ = writeln!(
            s,
            "| {} | {host:.0} | {pong:.0} | {out:.0} | {inn:.0} | {per_switch:.0} | {:.2}% | {:.2}% |",
            c.name,
            100.0 * cpu,
            100.0 * at_target
        );
    }
    let _ = writeln!(
        s,
        "\nThe issue's target: off-CPU profiling of a server doing 20,000 context switches a \
         second costs the host under 2% of a core (the last column, for its threads all \
         profiled)."
    );
    s
}
