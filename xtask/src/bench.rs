//! `cargo xtask bench [--quick|--smoke]`: pyebpf against py-spy, side by
//! side on this machine, written to BENCHMARKS.md and benchmarks.json.
//! `--scale`: the daemon under production-sized loads instead ([`scale`]).
//!
//! Every figure is a median over repetitions that are interleaved (each
//! round runs every condition once, in a rotated order), with its spread,
//! and related to a baseline measured in the same invocation. See
//! [`report`] for how each number is defined; the method is also written
//! into BENCHMARKS.md.

pub mod daemon;
pub mod gunicorn;
mod measure;
mod micro;
mod modes;
mod offcpu;
pub mod report;
mod scale;
mod self_profile;
pub mod stats;
pub mod sys;
mod versions;
pub mod watch;

use crate::util::{cargo, cmd, root, target_dir};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// `Some` of a run's result, or `None` after printing its failure and
/// adding it to `failures` (the report's "Failures" section).
pub fn soft<T>(failures: &std::cell::RefCell<Vec<String>>, what: &str, r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            let msg = format!("{what}: {e:#}");
            println!("FAILED: {msg}");
            failures.borrow_mut().push(msg);
            None
        }
    }
}

/// How much to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Everything, well under 30 minutes on 2 CPUs.
    Full,
    /// The same measurements, fewer and shorter: under 5 minutes.
    Quick,
    /// Each measurement once, tiny, to keep the harness working (tests).
    Smoke,
}

/// The sizes of every measurement for one [`Mode`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub mode: Mode,
    /// 1. Target slowdown: seconds of work unprofiled, rounds, rates, thread counts.
    pub work_secs: f64,
    pub slowdown_reps: usize,
    pub slowdown_rates: Vec<u64>,
    pub slowdown_threads: Vec<usize>,
    pub slowdown_pyspy_nonblocking: bool,
    /// 2. Cost per sample: (rate, depth) points; warm-up and window seconds.
    pub cost_points: Vec<(u64, u32)>,
    pub cost_reps: usize,
    pub warm_secs: f64,
    pub window_secs: f64,
    /// 3. BPF walk: (recursion depth, max_depth) at 999 Hz.
    pub walk_depths: Vec<(u32, u32)>,
    pub walk_reps: usize,
    /// 4. Throughput: busy processes, their recursion depth, rates tried,
    ///    seconds per rate, seconds of the confirmation run (0: none).
    pub tp_procs: usize,
    pub tp_depth: u32,
    pub tp_rates: Vec<u64>,
    pub tp_step_secs: f64,
    pub tp_confirm_secs: f64,
    /// 5. Memory: processes, code objects each, chain length, time limit.
    pub mem_procs: usize,
    pub mem_functions: usize,
    pub mem_chain: usize,
    pub mem_timeout_secs: f64,
    /// 6. Accuracy: rates, seconds per recording, rounds.
    pub acc_rates: Vec<u64>,
    pub acc_secs: f64,
    pub acc_reps: usize,
    /// 7. CPython versions: the roots' interpreters measured besides the 3.11
    ///    baseline, rounds, cycles of the BPF walk session per round, seconds at
    ///    each walk depth, warm-up and window of the cost per sample, seconds of
    ///    the split (accuracy).
    pub ver_interpreters: Vec<versions::Wanted>,
    pub ver_reps: usize,
    pub ver_cycles: usize,
    pub ver_warm_secs: f64,
    pub ver_window_secs: f64,
    pub ver_phase_secs: f64,
    pub ver_acc_secs: f64,
    /// Criterion warm-up and measurement seconds; `None` skips them.
    pub criterion: Option<(f64, f64)>,
}

/// The static builds of 3.13, 3.14 and 3.15 (Debian's `/usr/bin/python3.X`).
fn static_builds(minors: &[u8]) -> Vec<versions::Wanted> {
    minors
        .iter()
        .map(|&minor| versions::Wanted {
            minor,
            shared: false,
        })
        .collect()
}

impl Plan {
    pub fn new(mode: Mode) -> Plan {
        match mode {
            Mode::Full => Plan {
                mode,
                work_secs: 3.0,
                slowdown_reps: 4,
                slowdown_rates: vec![99, 999],
                slowdown_threads: vec![1, 4],
                slowdown_pyspy_nonblocking: true,
                cost_points: vec![(999, 10), (999, 100), (99, 10)],
                cost_reps: 3,
                warm_secs: 1.5,
                window_secs: 4.0,
                walk_depths: vec![
                    (10, 2048),
                    (100, 2048),
                    (1000, 2048),
                    (2000, 2048),
                    (4000, 4096),
                ],
                walk_reps: 3,
                tp_procs: 4,
                tp_depth: 50,
                tp_rates: vec![999, 2999, 4999, 9999],
                tp_step_secs: 8.0,
                tp_confirm_secs: 60.0,
                mem_procs: 50,
                mem_functions: 10_000,
                mem_chain: 500,
                mem_timeout_secs: 240.0,
                acc_rates: vec![99, 999],
                acc_secs: 8.0,
                acc_reps: 3,
                ver_interpreters: static_builds(&[13, 14, 15]),
                ver_reps: 3,
                ver_cycles: 5,
                ver_warm_secs: 1.0,
                ver_window_secs: 3.0,
                ver_phase_secs: 0.5,
                ver_acc_secs: 4.0,
                criterion: Some((0.5, 2.0)),
            },
            Mode::Quick => Plan {
                mode,
                work_secs: 0.6,
                slowdown_reps: 2,
                slowdown_rates: vec![99, 999],
                slowdown_threads: vec![1, 4],
                slowdown_pyspy_nonblocking: true,
                cost_points: vec![(999, 10), (999, 100)],
                cost_reps: 2,
                warm_secs: 0.7,
                window_secs: 2.0,
                walk_depths: vec![(10, 2048), (100, 2048), (1000, 2048), (2000, 2048)],
                walk_reps: 1,
                tp_procs: 4,
                tp_depth: 50,
                tp_rates: vec![999, 9999],
                tp_step_secs: 4.0,
                tp_confirm_secs: 10.0,
                mem_procs: 10,
                mem_functions: 2_000,
                mem_chain: 250,
                mem_timeout_secs: 40.0,
                acc_rates: vec![999],
                acc_secs: 2.0,
                acc_reps: 2,
                ver_interpreters: static_builds(&[13, 14, 15]),
                ver_reps: 1,
                ver_cycles: 6,
                ver_warm_secs: 0.5,
                ver_window_secs: 1.5,
                ver_phase_secs: 0.4,
                ver_acc_secs: 2.0,
                criterion: Some((0.3, 1.0)),
            },
            Mode::Smoke => Plan {
                mode,
                work_secs: 0.3,
                slowdown_reps: 1,
                slowdown_rates: vec![999],
                slowdown_threads: vec![1],
                slowdown_pyspy_nonblocking: false,
                cost_points: vec![(999, 10)],
                cost_reps: 1,
                warm_secs: 0.5,
                window_secs: 1.0,
                walk_depths: vec![(10, 2048)],
                walk_reps: 1,
                tp_procs: 2,
                tp_depth: 10,
                tp_rates: vec![999],
                tp_step_secs: 2.0,
                tp_confirm_secs: 0.0,
                mem_procs: 2,
                mem_functions: 200,
                mem_chain: 100,
                mem_timeout_secs: 15.0,
                acc_rates: vec![999],
                acc_secs: 1.0,
                acc_reps: 1,
                ver_interpreters: static_builds(&[15]),
                ver_reps: 1,
                ver_cycles: 1,
                ver_warm_secs: 0.3,
                ver_window_secs: 0.7,
                ver_phase_secs: 0.3,
                ver_acc_secs: 0.7,
                criterion: None,
            },
        }
    }
}

/// Options of `cargo xtask bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Fewer, shorter repetitions: under 5 minutes.
    #[arg(long, conflicts_with = "smoke")]
    pub quick: bool,
    /// Each measurement once, tiny (for the test suite); no criterion.
    #[arg(long)]
    pub smoke: bool,
    /// Directory for BENCHMARKS.md and benchmarks.json (default: the repository root).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Use this pyebpf binary instead of building target/release/pyebpf.
    #[arg(long, value_name = "FILE")]
    pub pyebpf: Option<PathBuf>,
    /// Skip the criterion microbenchmarks.
    #[arg(long)]
    pub no_criterion: bool,
    /// Instead of the benchmarks: the daemon at production scale (many
    /// processes, exec storm, query load, Pyroscope push, gunicorn soak),
    /// written to BENCHMARKS-scale.md and benchmarks-scale.json. With
    /// `--quick` under 6 minutes, full under 35.
    #[arg(long, conflicts_with = "self_profile")]
    pub scale: bool,
    /// Instead of the benchmarks: the cost of off-CPU profiling per context
    /// switch (profiled and not) under a ping-pong at about 20,000 context
    /// switches a second, written to BENCHMARKS-offcpu.md and
    /// benchmarks-offcpu.json. Full 2.5 minutes, `--quick` 40 s.
    #[arg(long, conflicts_with_all = ["scale", "self_profile"])]
    pub offcpu: bool,
    /// Instead of the benchmarks: pyebpf's profile modes (cpu, cpu with
    /// native leaves or stacks, wall, off-cpu) side by side with py-spy's (default,
    /// `--idle`, `--native`): profiler CPU per sample and target slowdown,
    /// written to BENCHMARKS-modes.md and benchmarks-modes.json. Full about
    /// 10 minutes, `--quick` 2.
    #[arg(long, conflicts_with_all = ["scale", "self_profile", "offcpu"])]
    pub modes: bool,
    /// Instead of the benchmarks: profile the daemon itself with perf under
    /// a high sample rate and write a flamegraph to target/self-profile/.
    #[arg(long, conflicts_with_all = ["quick", "smoke"])]
    pub self_profile: bool,
}

/// Paths and names every measurement uses.
pub struct Ctx {
    pub plan: Plan,
    pub root: PathBuf,
    pub python: PathBuf,
    pub pyspy: PathBuf,
    pub pyebpf: PathBuf,
    /// Scratch directory, removed at the end.
    pub dir: PathBuf,
    /// Marks the command line of every workload of this run; the daemon's
    /// include rule selects it, so other Python processes are left alone.
    pub tag: String,
    pub ncpus: usize,
    /// Runs that failed (recorded in the report; the others go on).
    pub failures: std::cell::RefCell<Vec<String>>,
}

impl Ctx {
    /// `python tests/workloads/SCRIPT TAG ARGS...`
    pub fn workload(&self, script: &str, args: &[String]) -> Command {
        let mut c = Command::new(&self.python);
        c.arg(self.root.join("tests/workloads").join(script))
            .arg(&self.tag)
            .args(args)
            .current_dir(&self.root);
        c
    }

    /// Starts scenarios.py's `scenarios` (through bench_scenarios.py) and
    /// waits until it is ready.
    pub fn scenario(&self, scenarios: &[String]) -> Result<sys::Proc> {
        let what = format!("workload {}", scenarios.join(" "));
        let mut p = sys::Proc::spawn(
            self.workload("bench_scenarios.py", scenarios),
            &what,
            sys::Output::Stdout,
            false,
        )?;
        p.wait_line("ready", std::time::Duration::from_secs(60))?;
        Ok(p)
    }

    /// `Some` of a run's result, or `None` after recording its failure.
    pub fn soft<T>(&self, what: &str, r: Result<T>) -> Option<T> {
        soft(&self.failures, what, r)
    }

    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The real interpreter behind `python3` (a pyenv shim would fork).
pub fn python() -> Result<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys; print(sys.executable); print('%d.%d' % sys.version_info[:2])",
        ])
        .output()
        .context("cannot run python3")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let exe = lines.next().unwrap_or_default().trim().to_string();
    if !out.status.success() || exe.is_empty() {
        bail!("python3 did not report its executable");
    }
    if lines.next() != Some("3.11") {
        bail!("python3 ({exe}) is not Python 3.11: pyebpf profiles 3.11 only");
    }
    Ok(PathBuf::from(exe))
}

/// py-spy next to the interpreter (where pip puts it), else on PATH.
pub fn pyspy(python: &Path) -> Result<PathBuf> {
    let beside = python.with_file_name("py-spy");
    if beside.exists() {
        return Ok(beside);
    }
    let scripts = Command::new(python)
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("py-spy"));
    if let Some(p) = scripts.filter(|p| p.exists()) {
        return Ok(p);
    }
    crate::util::which("py-spy").context(
        "py-spy is not installed: `python3 -m pip install -r tests/requirements.txt` \
         (or `cargo xtask bootstrap`)",
    )
}

fn ncpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let mode = if args.smoke {
        Mode::Smoke
    } else if args.quick {
        Mode::Quick
    } else {
        Mode::Full
    };
    if args.scale {
        return scale::run(mode, args.out.clone(), args.pyebpf.clone());
    }
    if args.offcpu {
        return offcpu::run(mode, args.out.clone(), args.pyebpf.clone());
    }
    if args.modes {
        return modes::run(mode, args.out.clone(), args.pyebpf.clone());
    }
    if !crate::util::is_root() {
        bail!("`cargo xtask bench` needs root: it loads BPF programs and py-spy reads other processes");
    }
    let started = Instant::now();
    let root = root();
    let mut plan = Plan::new(mode);
    if args.no_criterion {
        plan.criterion = None;
    }
    let python = python()?;
    let pyspy = pyspy(&python)?;

    let dir = std::env::temp_dir().join(format!("pyebpf-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (built, pyebpf, _) = private_pyebpf(&dir, args.pyebpf.clone())?;

    let ctx = Ctx {
        plan,
        root: root.clone(),
        python,
        pyspy,
        pyebpf,
        dir: dir.clone(),
        tag: format!("pyebpf-bench-{}", std::process::id()),
        ncpus: ncpus(),
        failures: Default::default(),
    };
    if args.self_profile {
        let r = self_profile::run(&ctx, &target_dir().join("self-profile"));
        let _ = std::fs::remove_dir_all(&dir);
        return r;
    }
    let meta = report::Meta::collect(&ctx, &built)?;
    println!(
        "pyebpf bench ({mode:?}): {} CPUs, load average {}, pyebpf {}, py-spy {}, Python {}",
        meta.nproc,
        meta.loadavg_start,
        meta.pyebpf_version,
        meta.pyspy_version,
        meta.python_version
    );
    let result = measure::all(&ctx, meta);
    let _ = std::fs::remove_dir_all(&dir);
    let mut results = result?;
    results.meta.loadavg_end = report::loadavg();
    results.meta.seconds = started.elapsed().as_secs_f64();

    let out = args.out.clone().unwrap_or(root);
    std::fs::create_dir_all(&out)?;
    let json = serde_json::to_string_pretty(&results)? + "\n";
    std::fs::write(out.join("benchmarks.json"), json)?;
    std::fs::write(out.join("BENCHMARKS.md"), report::markdown(&results))?;
    println!(
        "\nwrote {} and {} in {:.0} s",
        out.join("BENCHMARKS.md").display(),
        out.join("benchmarks.json").display(),
        results.meta.seconds
    );
    for line in report::target_lines(&results) {
        println!("  {line}");
    }
    Ok(())
}

/// The pyebpf under test, built unless `given`, copied into `dir`: a
/// rebuild of target/release during a run must not change the binary under
/// test. Returns the original, the copy and its `--version` line.
pub fn private_pyebpf(dir: &Path, given: Option<PathBuf>) -> Result<(PathBuf, PathBuf, String)> {
    let built = match given {
        Some(p) => p,
        None => {
            cargo(&["build", "--release", "-p", "profiler-daemon"]).run()?;
            target_dir().join("release/pyebpf")
        }
    };
    let copy = dir.join("pyebpf");
    std::fs::copy(&built, &copy).with_context(|| format!("copying {}", built.display()))?;
    let version = report::first_line(cmd(&copy.to_string_lossy(), &["--version"]).probe());
    if !version.starts_with("pyebpf ") {
        bail!("{} is not a working pyebpf binary", built.display());
    }
    Ok((built, copy, version))
}

/// `git rev-parse --short HEAD`, with `+dirty` when the tree has changes.
pub fn git_revision() -> String {
    let rev = cmd("git", &["rev-parse", "--short", "HEAD"])
        .probe()
        .unwrap_or_else(|| "unknown".into());
    let dirty = cmd("git", &["status", "--porcelain", "--untracked-files=no"])
        .probe()
        .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{rev}+dirty")
    } else {
        rev
    }
}
