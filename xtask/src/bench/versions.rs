//! Section 7, CPython versions: pyebpf's BPF cost per frame, its cost per sample and its
//! accuracy on every real CPython version of this machine, side by side with py-spy.
//!
//! The baseline is the interpreter the other sections use (`python3`, CPython 3.11); the
//! others are the Debian interpreters of the roots that `cargo xtask bootstrap` builds
//! (`interpreters.json` in `/var/cache/pyebpf/roots` or `$PYEBPF_ROOTS_DIR`), each run in its
//! root in its own mount and pid namespaces, as the end-to-end tests do.
//!
//! Each round starts one process of every interpreter on `tests/workloads/bench_versions.py`,
//! which runs `scenarios.py`'s `recurse:N` or `split`, or waits off CPU, and switches on a
//! line of stdin, so that one recorder measures several modes and processes in turn:
//! - the BPF walk session: one `pyebpf record` of every process, each made busy in turn at
//!   depth 100 and depth 1000 (BPF run time per stack of each, hence per frame), in cycles;
//! - then, one interpreter at a time, `pyebpf record` and `py-spy record`: depth 10 (warm-up,
//!   then the cost window), then `split` (accuracy).
//!
//! Stacks are told apart afterwards by their process root frame and by how many `recurse`
//! frames they hold, so one profile gives every phase's sample count.

use super::measure::{rotated, start_recording, start_recording_pids, Profiler};
use super::stats::{self, Summary};
use super::sys::{self, Output, Proc};
use super::{Ctx, Mode};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Sampling rate of every measurement here (per CPU for pyebpf, per process for py-spy).
pub const RATE_HZ: u64 = 999;
/// Recursion depth of the cost-per-sample workload (as section 2's depth 10).
pub const COST_DEPTH: u32 = 10;
/// The two recursion depths whose BPF run time per stack gives the cost per frame.
pub const SHALLOW: u32 = 100;
pub const DEEP: u32 = 1000;
/// No version may cost more per frame than 3.11 by more than this factor.
pub const MAX_FRAME_RATIO: f64 = 1.2;
/// The workload, relative to the repository's `tests/`.
const SCRIPT: &str = "workloads/bench_versions.py";
/// Where each root sees the repository's `tests/` (made by `cargo xtask bootstrap`).
const TESTS_IN_ROOT: &str = "/pyebpf";
const DEFAULT_ROOTS_DIR: &str = "/var/cache/pyebpf/roots";
/// PATH for the commands that enter a root, and for the interpreter.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One entry of `interpreters.json` (see xtask/src/roots.rs).
#[derive(Clone, Debug, Deserialize)]
struct RootEntry {
    root: PathBuf,
    path: PathBuf,
    version: String,
    hex: u32,
    build: String,
    suite: String,
}

/// Which interpreter of the roots to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Wanted {
    pub minor: u8,
    pub shared: bool,
}

/// An interpreter measured (or not) in this section.
#[derive(Clone, Debug, Serialize)]
pub struct Interpreter {
    /// e.g. "3.13.18".
    pub version: String,
    /// e.g. "3.13".
    pub minor: String,
    /// "static" (libpython linked into the executable) or "shared" (libpython3.X.so).
    pub build: String,
    /// The executable as the process sees it.
    pub path: String,
    /// The Debian root it runs in; `None`: the host.
    pub root: Option<String>,
    /// Where it came from, for the report.
    pub origin: String,
    /// The interpreter the others are compared with (3.11).
    pub baseline: bool,
}

impl Interpreter {
    /// e.g. "3.13.18 (static)".
    pub fn label(&self) -> String {
        format!("{} ({})", self.version, self.build)
    }
}

/// Profiler CPU and BPF run time per sample over one window, as in section 2.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CostSeries {
    /// Per round: (profiler CPU + BPF run time) / samples, ns.
    pub ns_per_sample: Vec<f64>,
    pub user_ns_per_sample: Vec<f64>,
    /// pyebpf only (py-spy has no BPF part).
    pub bpf_ns_per_sample: Vec<f64>,
    pub samples_per_s: Vec<f64>,
    pub summary: Option<Summary>,
}

/// Accuracy on the 1 : 2 : 3 split, as in section 6.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AccSeries {
    pub samples: Vec<f64>,
    pub tv_distance: Vec<f64>,
    pub line_agreement: Vec<f64>,
    /// Measured share per leaf function, last round.
    pub shares: BTreeMap<String, f64>,
    pub tv: Option<Summary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VersionRow {
    pub interpreter: Interpreter,
    /// Why it was not measured at all.
    pub skipped: Option<String>,
    /// How `pyebpf record` described the process (its summary line).
    pub pyebpf_saw: Option<String>,
    /// Per depth ([`SHALLOW`], [`DEEP`]), per cycle of the walk sessions: BPF run time per
    /// stack sent, early exits taken out, ns (NaN: not measured).
    pub bpf_ns_per_stack: BTreeMap<u32, Vec<f64>>,
    /// Per cycle: (per stack at DEEP − per stack at SHALLOW) / (DEEP − SHALLOW), ns.
    pub bpf_ns_per_frame: Vec<f64>,
    /// Per cycle: the above / the baseline's in the same cycle.
    pub frame_ratio: Vec<f64>,
    pub ns_per_frame: Option<Summary>,
    pub frame_ratio_summary: Option<Summary>,
    /// Most `recurse` frames in one stack (DEEP + 1 when the deepest stacks were whole).
    pub deepest_recurse: usize,
    /// A profile had a `[truncated]` or partial stack.
    pub cut_stacks: bool,
    pub walked_in_full: bool,
    pub pyebpf_cost: CostSeries,
    pub pyspy_cost: CostSeries,
    pub pyebpf_accuracy: AccSeries,
    pub pyspy_accuracy: AccSeries,
    /// py-spy's error on this interpreter (then py-spy is not run on it again).
    pub pyspy_error: Option<String>,
    /// That error says py-spy does not support this version.
    pub pyspy_unsupported: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Versions {
    pub rate_hz: u64,
    pub cost_depth: u32,
    pub walk_depths: [u32; 2],
    pub rounds: usize,
    /// Cycles of the BPF walk session in each round (each gives one per-frame cost).
    pub cycles_per_round: usize,
    /// Cost of a BPF run that exits early (every target idle), per round, ns: taken out of
    /// the runs of each depth.
    pub early_exit_ns: Option<Summary>,
    /// Why the roots' interpreters were not measured (no roots on this machine).
    pub skipped: Option<String>,
    pub rows: Vec<VersionRow>,
}

/// What [`Target::spawn`] runs.
#[derive(Clone, Debug)]
struct Launch {
    interp: Interpreter,
    /// `(root, path in root)`; `None`: the host's interpreter at `interp.path`.
    root: Option<(PathBuf, PathBuf)>,
}

/// The cache of roots: `$PYEBPF_ROOTS_DIR`, else the default.
fn roots_dir() -> PathBuf {
    std::env::var_os("PYEBPF_ROOTS_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOTS_DIR))
}

/// `Version:` of a package in a root's dpkg database.
fn dpkg_version(root: &Path, package: &str) -> Option<String> {
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).ok()?;
    status.split("\n\n").find_map(|para| {
        let mut lines = para.lines();
        if lines.next()?.strip_prefix("Package: ")? != package {
            return None;
        }
        para.lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .map(str::to_string)
    })
}

/// The baseline: the interpreter of the other sections.
fn host_interpreter(python: &Path) -> Result<Launch> {
    let out = Command::new(python)
        .args([
            "-c",
            "import platform, sysconfig; print(platform.python_version()); \
             print(sysconfig.get_config_var('Py_ENABLE_SHARED') or 0)",
        ])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let version = lines.next().unwrap_or("").trim().to_string();
    if !out.status.success() || version.is_empty() {
        bail!("{} did not report its version", python.display());
    }
    let shared = lines.next().is_some_and(|l| l.trim() == "1");
    let minor = version.split('.').take(2).collect::<Vec<_>>().join(".");
    let p = python.display().to_string();
    let from = if p.contains("/.pyenv/versions/") {
        "built by pyenv on this host"
    } else {
        "this host's `python3`"
    };
    let origin = format!(
        "{from}{}; the interpreter of sections 1–6",
        if shared {
            format!(" (`Py_ENABLE_SHARED`: it runs libpython{minor}.so)")
        } else {
            String::new()
        }
    );
    Ok(Launch {
        interp: Interpreter {
            version,
            minor,
            build: if shared { "shared" } else { "static" }.into(),
            path: p,
            root: None,
            origin,
            baseline: true,
        },
        root: None,
    })
}

/// The interpreters of the roots asked for; `Err` with the reason for each that is missing,
/// and `Err` as a whole when there are no roots at all.
fn root_interpreters(wanted: &[Wanted]) -> Result<Vec<Result<Launch, (Wanted, String)>>> {
    let json = roots_dir().join("interpreters.json");
    let text = std::fs::read_to_string(&json).map_err(|e| {
        anyhow::anyhow!(
            "no Debian-root interpreters ({}: {e}); `cargo xtask bootstrap` as root builds them",
            json.display()
        )
    })?;
    let entries: Vec<RootEntry> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    let mut out = Vec::new();
    for &w in wanted {
        let build = if w.shared { "shared" } else { "static" };
        let of_minor = |e: &&RootEntry| (e.hex >> 16) as u8 == w.minor && e.build == build;
        // sid has the newest of each; trixie's 3.13 otherwise.
        let found = entries
            .iter()
            .filter(of_minor)
            .find(|e| e.suite == "sid")
            .or_else(|| entries.iter().find(of_minor));
        let Some(e) = found else {
            out.push(Err((
                w,
                format!("no {build} CPython 3.{} in {}", w.minor, json.display()),
            )));
            continue;
        };
        let host = e.root.join(e.path.strip_prefix("/").unwrap_or(&e.path));
        if !host.exists() || !e.root.join(&TESTS_IN_ROOT[1..]).is_dir() {
            out.push(Err((
                w,
                format!(
                    "{} or {}{TESTS_IN_ROOT} is missing (rebuild the roots: `cargo xtask bootstrap`)",
                    host.display(),
                    e.root.display()
                ),
            )));
            continue;
        }
        let minor = format!("3.{}", w.minor);
        let package = if w.shared {
            format!("libpython{minor}")
        } else {
            format!("python{minor}-minimal")
        };
        let pkg = dpkg_version(&e.root, &package)
            .map(|v| format!("{package} {v}"))
            .unwrap_or(package);
        let origin = if w.shared {
            format!(
                "Debian {} package {pkg} (`libpython{minor}.so.1.0`), run by the launcher \
                 tests/tools/pylaunch.c, in the root `{}`",
                e.suite,
                e.root.display()
            )
        } else {
            format!(
                "Debian {} package {pkg} (libpython linked in), in the root `{}`",
                e.suite,
                e.root.display()
            )
        };
        out.push(Ok(Launch {
            interp: Interpreter {
                version: e.version.clone(),
                minor,
                build: build.into(),
                path: e.path.display().to_string(),
                root: Some(e.root.display().to_string()),
                origin,
                baseline: false,
            },
            root: Some((e.root.clone(), e.path.clone())),
        }));
    }
    Ok(out)
}

/// A running `bench_versions.py`.
struct Target {
    proc: Proc,
    /// The interpreter's pid on the host (in a root: the child of `unshare`).
    pid: u32,
    in_root: bool,
}

impl Target {
    fn spawn(ctx: &Ctx, l: &Launch, mode: &str) -> Result<Target> {
        let what = format!("CPython {} on bench_versions.py", l.interp.label());
        let Some((root, path)) = &l.root else {
            let mut c = Command::new(&l.interp.path);
            c.arg(ctx.root.join("tests").join(SCRIPT))
                .arg(&ctx.tag)
                .arg(mode)
                .current_dir(&ctx.root);
            let mut proc = Proc::spawn(c, &what, Output::Stdout, true)?;
            proc.wait_line("ready", Duration::from_secs(60))?;
            let pid = proc.pid;
            return Ok(Target {
                proc,
                pid,
                in_root: false,
            });
        };
        // As profiler-daemon/tests/common/roots.rs: the interpreter is pid 1 of new mount
        // and pid namespaces, chrooted, with tests/ mounted read-only at /pyebpf.
        const SHELL: &str = r#"mount --bind -o ro "$1" "$2/pyebpf" && mount -t proc proc "$2/proc" && root=$2 && shift 2 && exec chroot "$root" "$@""#;
        let mut c = Command::new("unshare");
        c.args([
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--propagation",
            "private",
            "sh",
            "-c",
            SHELL,
            "sh",
        ])
        .arg(ctx.root.join("tests"))
        .arg(root)
        .arg(path)
        .arg(format!("{TESTS_IN_ROOT}/{SCRIPT}"))
        .arg(&ctx.tag)
        .arg(mode)
        .env_clear()
        .env("PATH", PATH);
        let mut proc = Proc::spawn(c, &what, Output::Stdout, true)?;
        let u = proc.pid;
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{u}/task/{u}/children")).unwrap_or_default();
            if let Some(p) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
            {
                break p;
            }
            if proc.exited() || Instant::now() > deadline {
                let tail = proc.tail();
                bail!("{what}: unshare started no interpreter:\n{tail}");
            }
            sys::sleep_secs(0.005);
        };
        let mut t = Target {
            proc,
            pid,
            in_root: true,
        };
        t.proc.wait_line("ready", Duration::from_secs(60))?;
        Ok(t)
    }

    /// Switches the workload to `mode` and waits until it runs it.
    fn switch(&mut self, mode: &str) -> Result<Instant> {
        self.proc.write_line(mode)?;
        let want = format!("mode {mode}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.proc.wait_line("mode ", left)?.trim() == want {
                return Ok(Instant::now());
            }
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // SIGKILL to the namespace's init ends everything in it; unshare then exits and is
        // reaped by Proc's drop. While unshare runs its child's pid cannot be reused.
        if self.in_root && !self.proc.exited() {
            // SAFETY: kill(2) on a pid that cannot have been reused (see above).
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
    }
}

/// A folded profile taken apart: the samples of each process (`None`: the only one) by the
/// number of `recurse` frames in the stack, and the lines of the stacks without `recurse`
/// (the split, and anything unattributable: for accuracy every such stack counts, so a
/// wrong stack of any mode counts against the profiler).
struct Parsed {
    recurse: BTreeMap<(Option<u32>, usize), u64>,
    other: String,
    deepest_recurse: BTreeMap<Option<u32>, usize>,
    cut: bool,
}

/// `process PID (COMM)`, the root frame `pyebpf record` adds with several processes.
fn process_frame(frame: &str) -> Option<u32> {
    frame
        .strip_prefix("process ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

fn parse_profile(text: &str) -> Parsed {
    let mut p = Parsed {
        recurse: BTreeMap::new(),
        other: String::new(),
        deepest_recurse: BTreeMap::new(),
        cut: text.contains("[truncated]") || text.contains("[partial stack"),
    };
    for line in text.lines() {
        let Some((stack, count)) = line.trim_end().rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = count.parse::<u64>() else {
            continue;
        };
        let pid = stack.split(';').next().and_then(process_frame);
        let k = stack
            .split(';')
            .filter(|f| stats::parse_frame(f).name == "recurse")
            .count();
        if k == 0 {
            p.other.push_str(line);
            p.other.push('\n');
            continue;
        }
        let deepest = p.deepest_recurse.entry(pid).or_default();
        *deepest = (*deepest).max(k);
        *p.recurse.entry((pid, k)).or_default() += n;
    }
    p
}

impl Parsed {
    /// Samples of `recurse:n` (n + 1 `recurse` frames) of `pid`.
    fn at(&self, pid: Option<u32>, n: u32) -> u64 {
        self.recurse
            .get(&(pid, n as usize + 1))
            .copied()
            .unwrap_or(0)
    }

    /// Samples of `pid` with any `recurse` frame.
    fn any_depth(&self, pid: Option<u32>) -> u64 {
        self.recurse
            .iter()
            .filter(|((p, _), _)| *p == pid)
            .map(|(_, n)| n)
            .sum()
    }
}

/// BPF statistics of a recorder at one moment.
#[derive(Clone, Copy, Debug)]
struct Mark {
    at: Instant,
    run_ns: u64,
    runs: u64,
}

fn mark(pid: u32) -> Mark {
    let (run_ns, runs) = sys::sampler_stats(pid);
    Mark {
        at: Instant::now(),
        run_ns,
        runs,
    }
}

/// One cost window: profiler CPU, BPF run time, samples in the window, window seconds.
#[derive(Clone, Copy, Debug)]
struct CostPoint {
    cpu_s: f64,
    bpf_s: f64,
    samples: f64,
    secs: f64,
}

#[derive(Clone, Debug)]
struct AccPoint {
    samples: u64,
    tv: f64,
    lines: f64,
    shares: BTreeMap<String, f64>,
}

/// Truth and hot lines of the split (section 6's).
struct Truth {
    shares: BTreeMap<String, f64>,
    lines: Vec<u32>,
}

fn accuracy_of(text: &str, truth: &Truth) -> AccPoint {
    let shares = stats::leaf_shares(text);
    AccPoint {
        samples: stats::total_samples(text),
        tv: stats::tv_distance(&shares, &truth.shares),
        lines: stats::leaf_line_agreement(text, "scenarios.py", &truth.lines),
        shares,
    }
}

/// One depth of one interpreter in a walk session: BPF statistics between two switches.
struct Phase {
    target: usize,
    cycle: usize,
    /// [`SHALLOW`] or [`DEEP`].
    class: u32,
    /// The recursion depth run (the class plus the cycle, so that each phase's stacks
    /// have their own number of `recurse` frames).
    depth: u32,
    a: Mark,
    b: Mark,
}

/// What a walk session gives for each interpreter (by index of the targets).
struct Session {
    /// Cost of a run that exits early, measured with every target idle, ns.
    early_exit_ns: f64,
    /// Per target, per cycle: BPF per stack at SHALLOW and at DEEP, ns (NaN: no stacks).
    per_stack: Vec<Vec<(f64, f64)>>,
    deepest_recurse: Vec<usize>,
    cut: bool,
    /// `pyebpf record`'s line for each target.
    saw: Vec<Option<String>>,
}

/// The BPF cost per stack of every interpreter at both depths, in `cycles` cycles: one
/// `pyebpf record` of all the targets (all idle), which are made busy one at a time, one
/// depth at a time, in an order rotated from cycle to cycle. Consecutive phases are a
/// fraction of a second apart, so every interpreter sees the same state of the machine.
fn walk_session(
    ctx: &Ctx,
    targets: &mut [Target],
    cycles: usize,
    first_cycle: usize,
    fallback_early_exit_ns: f64,
) -> Result<Session> {
    let pids: Vec<u32> = targets.iter().map(|t| t.pid).collect();
    // Every phase on the same CPU: BPF run time per stack differs from CPU to CPU here.
    let cpu = ctx.ncpus.saturating_sub(1);
    let before: Vec<_> = pids.iter().map(|&p| sys::affinity(p)).collect();
    for &p in &pids {
        sys::set_affinity(p, &sys::cpu_set(cpu))?;
    }
    let r = walk_pinned(
        ctx,
        targets,
        &pids,
        cycles,
        first_cycle,
        fallback_early_exit_ns,
    );
    for (&p, b) in pids.iter().zip(before) {
        if let Some(b) = b {
            let _ = sys::set_affinity(p, &b);
        }
    }
    r
}

fn walk_pinned(
    ctx: &Ctx,
    targets: &mut [Target],
    pids: &[u32],
    cycles: usize,
    first_cycle: usize,
    fallback_early_exit_ns: f64,
) -> Result<Session> {
    let p = &ctx.plan;
    let out = ctx.scratch("versions-walk.folded");
    let _ = std::fs::remove_file(&out);
    let rec = start_recording_pids(ctx, Profiler::Pyebpf, pids, RATE_HZ, None, &out)?;
    let rec_pid = rec.proc.pid;
    // Every target idle: only early exits.
    let a = mark(rec_pid);
    sys::sleep_secs(p.ver_phase_secs.max(0.5));
    let b = mark(rec_pid);
    let runs = b.runs.saturating_sub(a.runs);
    let early_exit_ns = if runs > 0 {
        b.run_ns.saturating_sub(a.run_ns) as f64 / runs as f64
    } else {
        fallback_early_exit_ns
    };
    let mut phases: Vec<Phase> = Vec::new();
    let all: Vec<usize> = (0..targets.len()).collect();
    for c in 0..cycles {
        let k = first_cycle + c;
        for t in rotated(&all, k) {
            let classes = if k.is_multiple_of(2) {
                [SHALLOW, DEEP]
            } else {
                [DEEP, SHALLOW]
            };
            for class in classes {
                let depth = class + c as u32;
                targets[t].switch(&format!("recurse:{depth}"))?;
                let m = mark(rec_pid);
                if let Some(last) = phases.last_mut().filter(|x| x.target == t) {
                    last.b = m;
                }
                phases.push(Phase {
                    target: t,
                    cycle: c,
                    class,
                    depth,
                    a: m,
                    b: m,
                });
                sys::sleep_secs(p.ver_phase_secs);
            }
            targets[t].switch("idle")?;
            if let Some(last) = phases.last_mut() {
                last.b = mark(rec_pid);
            }
        }
    }
    let (text, _, _, saw) = rec.finish_described(false)?;
    let parsed = parse_profile(&text);
    let key = |t: usize| (targets.len() > 1).then_some(pids[t]);
    let mut per_stack = vec![vec![(f64::NAN, f64::NAN); cycles]; targets.len()];
    for ph in &phases {
        let stacks = parsed.at(key(ph.target), ph.depth) as f64;
        let ns = if stacks > 0.0 {
            let run_ns = ph.b.run_ns.saturating_sub(ph.a.run_ns) as f64;
            let early = ph.b.runs.saturating_sub(ph.a.runs) as f64 - stacks;
            (run_ns - early_exit_ns * early.max(0.0)) / stacks
        } else {
            f64::NAN
        };
        let slot = &mut per_stack[ph.target][ph.cycle];
        if ph.class == SHALLOW {
            slot.0 = ns;
        } else {
            slot.1 = ns;
        }
    }
    Ok(Session {
        early_exit_ns,
        per_stack,
        deepest_recurse: (0..targets.len())
            .map(|t| parsed.deepest_recurse.get(&key(t)).copied().unwrap_or(0))
            .collect(),
        cut: parsed.cut,
        saw: pids
            .iter()
            .map(|pid| {
                saw.iter()
                    .find(|l| l.starts_with(&format!("process {pid} ")))
                    .cloned()
            })
            .collect(),
    })
}

/// Warm-up, then a cost window over `rec_pid` (the recorder): its CPU and BPF run time
/// in the window, and the window's length.
fn cost_window(ctx: &Ctx, rec_pid: u32) -> (f64, f64, f64) {
    let p = &ctx.plan;
    sys::sleep_secs(p.ver_warm_secs);
    let a = sys::thread_cpu(rec_pid);
    let ba = mark(rec_pid);
    sys::sleep_secs(p.ver_window_secs);
    let b = sys::thread_cpu(rec_pid);
    let bb = mark(rec_pid);
    (
        sys::cpu_between(&a, &b).as_secs_f64(),
        bb.run_ns.saturating_sub(ba.run_ns) as f64 / 1e9,
        (bb.at - ba.at).as_secs_f64(),
    )
}

/// A recorder on a workload in mode `recurse:COST_DEPTH`: the cost window, then the split.
/// Leaves the workload at `recurse:COST_DEPTH`.
fn cost_and_accuracy(
    ctx: &Ctx,
    profiler: Profiler,
    t: &mut Target,
    truth: &Truth,
) -> Result<(CostPoint, AccPoint, Vec<String>)> {
    let out = ctx.scratch("versions.folded");
    let _ = std::fs::remove_file(&out);
    let rec = start_recording(ctx, profiler, t.pid, RATE_HZ, None, &out)?;
    let started = rec.started;
    let (cpu_s, bpf_s, secs) = cost_window(ctx, rec.proc.pid);
    let split_at = t.switch("split")?;
    sys::sleep_secs(ctx.plan.ver_acc_secs);
    let (text, _, _, saw) = rec.finish_described(false)?;
    t.switch(&format!("recurse:{COST_DEPTH}"))?;
    let parsed = parse_profile(&text);
    // The samples of the cost window: the rate achieved at depth COST_DEPTH times the window.
    let stacks = parsed.any_depth(None) as f64;
    let sampled = (split_at - started).as_secs_f64();
    if stacks <= 0.0 || sampled <= 0.0 {
        bail!("{} took no samples at depth {COST_DEPTH}", profiler.label());
    }
    Ok((
        CostPoint {
            cpu_s,
            bpf_s,
            samples: stacks / sampled * secs,
            secs,
        },
        accuracy_of(&parsed.other, truth),
        saw,
    ))
}

/// The first line that says what went wrong, of a recorder's error.
fn short_error(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("Error:") || l.contains("nsupported"))
        .or_else(|| text.lines().next())
        .unwrap_or("")
        .to_string();
    line.chars().take(200).collect()
}

fn new_row(interp: Interpreter, skipped: Option<String>) -> VersionRow {
    VersionRow {
        interpreter: interp,
        skipped,
        pyebpf_saw: None,
        bpf_ns_per_stack: BTreeMap::new(),
        bpf_ns_per_frame: Vec::new(),
        frame_ratio: Vec::new(),
        ns_per_frame: None,
        frame_ratio_summary: None,
        deepest_recurse: 0,
        cut_stacks: false,
        walked_in_full: false,
        pyebpf_cost: CostSeries::default(),
        pyspy_cost: CostSeries::default(),
        pyebpf_accuracy: AccSeries::default(),
        pyspy_accuracy: AccSeries::default(),
        pyspy_error: None,
        pyspy_unsupported: false,
    }
}

fn push_cost(c: &mut CostSeries, p: Option<CostPoint>) {
    let Some(p) = p else {
        for v in [
            &mut c.ns_per_sample,
            &mut c.user_ns_per_sample,
            &mut c.bpf_ns_per_sample,
            &mut c.samples_per_s,
        ] {
            v.push(f64::NAN);
        }
        return;
    };
    let ns = |s: f64| s * 1e9 / p.samples;
    c.ns_per_sample.push(ns(p.cpu_s + p.bpf_s));
    c.user_ns_per_sample.push(ns(p.cpu_s));
    c.bpf_ns_per_sample.push(ns(p.bpf_s));
    c.samples_per_s.push(p.samples / p.secs);
}

fn push_acc(a: &mut AccSeries, p: Option<AccPoint>) {
    match p {
        Some(p) => {
            a.samples.push(p.samples as f64);
            a.tv_distance.push(p.tv);
            a.line_agreement.push(p.lines);
            a.shares = p.shares;
        }
        None => {
            a.samples.push(f64::NAN);
            a.tv_distance.push(f64::NAN);
            a.line_agreement.push(f64::NAN);
        }
    }
}

/// Records py-spy's failure on `row`'s interpreter: an unsupported version is a result,
/// anything else a failure of the run too.
fn pyspy_failed(ctx: &Ctx, row: &mut VersionRow, e: anyhow::Error) {
    let label = row.interpreter.label();
    let msg = short_error(&e);
    let lower = msg.to_lowercase();
    let unsupported = lower.contains("unsupported") || lower.contains("not supported");
    println!("py-spy on CPython {label}: {msg}");
    if !unsupported {
        ctx.soft::<()>(&format!("versions, py-spy on CPython {label}"), Err(e));
    }
    row.pyspy_error = Some(msg);
    row.pyspy_unsupported = unsupported;
}

/// One round's cost and accuracy of one interpreter, pyebpf and py-spy in the order given;
/// its workload is left idle.
fn cost_round(
    ctx: &Ctx,
    t: &mut Target,
    row: &mut VersionRow,
    truth: &Truth,
    pyspy_first: bool,
) -> Result<()> {
    let label = row.interpreter.label();
    let (mut pe, mut ps) = (None, None);
    let order = if pyspy_first {
        [Profiler::PySpy, Profiler::Pyebpf]
    } else {
        [Profiler::Pyebpf, Profiler::PySpy]
    };
    t.switch(&format!("recurse:{COST_DEPTH}"))?;
    for profiler in order {
        if profiler == Profiler::PySpy && row.pyspy_error.is_some() {
            continue;
        }
        match cost_and_accuracy(ctx, profiler, t, truth) {
            Ok((cost, acc, saw)) => {
                println!(
                    "  CPython {label}: {:<6} {:>9.0} ns per sample at depth {COST_DEPTH} (BPF {:.0}), {:.0} samples/s; split: TV distance {:.4}, {} samples",
                    profiler.label(),
                    (cost.cpu_s + cost.bpf_s) * 1e9 / cost.samples,
                    cost.bpf_s * 1e9 / cost.samples,
                    cost.samples / cost.secs,
                    acc.tv,
                    acc.samples
                );
                if profiler == Profiler::Pyebpf {
                    if row.pyebpf_saw.is_none() {
                        row.pyebpf_saw = saw.into_iter().next();
                    }
                    pe = Some((cost, acc));
                } else {
                    ps = Some((cost, acc));
                }
            }
            Err(e) => {
                if profiler == Profiler::Pyebpf {
                    ctx.soft::<()>(&format!("versions, pyebpf on CPython {label}"), Err(e));
                } else {
                    pyspy_failed(ctx, row, e);
                }
                // The workload may be in any mode now.
                t.switch(&format!("recurse:{COST_DEPTH}"))?;
            }
        }
    }
    let (pe_cost, pe_acc) = pe.unzip();
    let (ps_cost, ps_acc) = ps.unzip();
    push_cost(&mut row.pyebpf_cost, pe_cost);
    push_acc(&mut row.pyebpf_accuracy, pe_acc);
    push_cost(&mut row.pyspy_cost, ps_cost);
    push_acc(&mut row.pyspy_accuracy, ps_acc);
    t.switch("idle")?;
    Ok(())
}

/// Section 7. `early_exit_ns`: section 3's cost of a BPF run that exits early (used when a
/// session cannot measure its own).
pub fn run(ctx: &Ctx, early_exit_ns: f64) -> Result<Versions> {
    let plan = &ctx.plan;
    let src = std::fs::read_to_string(ctx.root.join("tests/workloads/scenarios.py"))?;
    let markers = stats::hot_lines(&src);
    let mut truth = Truth {
        shares: BTreeMap::new(),
        lines: Vec::new(),
    };
    for (k, w) in [("split_a", 1.0), ("split_b", 2.0), ("split_c", 3.0)] {
        truth.shares.insert(k.to_string(), w / 6.0);
        truth.lines.extend(
            markers
                .get(k)
                .with_context(|| format!("no `# HOT:{k}` marker in scenarios.py"))?,
        );
    }

    let mut launches = vec![host_interpreter(&ctx.python)?];
    let mut placeholders = Vec::new();
    let mut skipped = None;
    match root_interpreters(&plan.ver_interpreters) {
        Ok(found) => {
            for f in found {
                match f {
                    Ok(l) => launches.push(l),
                    Err((w, why)) => {
                        println!("CPython 3.{}: not measured: {why}", w.minor);
                        ctx.soft::<()>("CPython versions", Err(anyhow::anyhow!("{why}")));
                        placeholders.push(placeholder(w, why));
                    }
                }
            }
        }
        Err(e) => {
            let why = format!("{e:#}");
            if plan.mode == Mode::Smoke {
                println!("SKIPPED: the roots' interpreters: {why}");
            } else {
                ctx.soft::<()>("CPython versions", Err(anyhow::anyhow!("{why}")));
            }
            for &w in &plan.ver_interpreters {
                placeholders.push(placeholder(w, why.clone()));
            }
            skipped = Some(why);
        }
    }
    let mut rows: Vec<VersionRow> = launches
        .iter()
        .map(|l| new_row(l.interp.clone(), None))
        .collect();
    let n = launches.len();
    let cycles = plan.ver_cycles;
    let mut early_exits = Vec::new();
    for rep in 0..plan.ver_reps {
        println!(
            "round {}/{}: starting {}",
            rep + 1,
            plan.ver_reps,
            launches
                .iter()
                .map(|l| format!("CPython {}", l.interp.label()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut targets: Vec<Option<Target>> = launches
            .iter()
            .map(|l| {
                let label = format!("versions, starting CPython {}", l.interp.label());
                ctx.soft(&label, Target::spawn(ctx, l, "idle"))
            })
            .collect();
        // BPF cost per frame: all of them in one session (needs every one, the baseline
        // above all).
        let session = if targets.iter().all(Option::is_some) {
            let mut ts: Vec<Target> = targets.iter_mut().map(|t| t.take().unwrap()).collect();
            let s = walk_session(ctx, &mut ts, cycles, rep * cycles, early_exit_ns);
            for (slot, t) in targets.iter_mut().zip(ts) {
                *slot = Some(t);
            }
            ctx.soft("versions, BPF walk session", s)
        } else {
            None
        };
        if let Some(s) = &session {
            early_exits.push(s.early_exit_ns);
        }
        for (i, row) in rows.iter_mut().enumerate() {
            let per_cycle: Vec<(f64, f64)> = match &session {
                Some(s) => {
                    row.deepest_recurse = row.deepest_recurse.max(s.deepest_recurse[i]);
                    row.cut_stacks |= s.cut;
                    if row.pyebpf_saw.is_none() {
                        row.pyebpf_saw = s.saw[i].clone();
                    }
                    s.per_stack[i].clone()
                }
                None => vec![(f64::NAN, f64::NAN); cycles],
            };
            for (c, &(shallow, deep)) in per_cycle.iter().enumerate() {
                row.bpf_ns_per_stack
                    .entry(SHALLOW)
                    .or_default()
                    .push(shallow);
                row.bpf_ns_per_stack.entry(DEEP).or_default().push(deep);
                let per_frame = (deep - shallow) / f64::from(DEEP - SHALLOW);
                row.bpf_ns_per_frame.push(per_frame);
                if session.is_some() {
                    println!(
                        "round {}/{}  cycle {}/{cycles}  CPython {:<16} BPF per stack {:>7.0} ns (depth {SHALLOW}), {:>7.0} ns (depth {DEEP}): {:.1} ns per frame",
                        rep + 1,
                        plan.ver_reps,
                        c + 1,
                        row.interpreter.label(),
                        shallow,
                        deep,
                        per_frame
                    );
                }
            }
        }
        // Cost per sample and accuracy: one interpreter at a time, the others idle.
        for i in rotated(&(0..n).collect::<Vec<_>>(), rep) {
            let row = &mut rows[i];
            match targets[i].as_mut() {
                Some(t) => {
                    let r = cost_round(ctx, t, row, &truth, rep % 2 == 1);
                    let label = format!("versions, CPython {}", row.interpreter.label());
                    if ctx.soft(&label, r).is_none() {
                        targets[i] = None;
                    }
                }
                None => {
                    push_cost(&mut row.pyebpf_cost, None);
                    push_acc(&mut row.pyebpf_accuracy, None);
                    push_cost(&mut row.pyspy_cost, None);
                    push_acc(&mut row.pyspy_accuracy, None);
                }
            }
        }
        // A failed cost round may have left out its pushes: keep every series per round.
        for row in rows.iter_mut() {
            let want = rep + 1;
            for s in [&mut row.pyebpf_cost, &mut row.pyspy_cost] {
                while s.ns_per_sample.len() < want {
                    push_cost(s, None);
                }
            }
            for a in [&mut row.pyebpf_accuracy, &mut row.pyspy_accuracy] {
                while a.samples.len() < want {
                    push_acc(a, None);
                }
            }
        }
        drop(targets);
    }

    let base: Vec<f64> = rows
        .iter()
        .find(|r| r.interpreter.baseline)
        .map(|r| r.bpf_ns_per_frame.clone())
        .unwrap_or_default();
    rows.extend(placeholders);
    for r in &mut rows {
        r.frame_ratio = r
            .bpf_ns_per_frame
            .iter()
            .zip(&base)
            .map(|(x, b)| x / b)
            .collect();
        r.ns_per_frame = Summary::of(&r.bpf_ns_per_frame);
        r.frame_ratio_summary = Summary::of(&r.frame_ratio);
        r.walked_in_full = r.skipped.is_none()
            && r.deepest_recurse >= (DEEP + 1) as usize
            && !r.cut_stacks
            && r.ns_per_frame.is_some();
        r.pyebpf_cost.summary = Summary::of(&r.pyebpf_cost.ns_per_sample);
        r.pyspy_cost.summary = Summary::of(&r.pyspy_cost.ns_per_sample);
        r.pyebpf_accuracy.tv = Summary::of(&r.pyebpf_accuracy.tv_distance);
        r.pyspy_accuracy.tv = Summary::of(&r.pyspy_accuracy.tv_distance);
    }
    // The baseline first, then by build and version.
    rows.sort_by_key(|r| {
        let minor: u32 = r
            .interpreter
            .minor
            .split('.')
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        (
            !r.interpreter.baseline,
            r.interpreter.build == "shared",
            minor,
        )
    });
    Ok(Versions {
        rate_hz: RATE_HZ,
        cost_depth: COST_DEPTH,
        walk_depths: [SHALLOW, DEEP],
        rounds: plan.ver_reps,
        cycles_per_round: cycles,
        early_exit_ns: Summary::of(&early_exits),
        skipped,
        rows,
    })
}

/// A row for an interpreter that could not be measured.
fn placeholder(w: Wanted, why: String) -> VersionRow {
    let build = if w.shared { "shared" } else { "static" };
    new_row(
        Interpreter {
            version: format!("3.{}", w.minor),
            minor: format!("3.{}", w.minor),
            build: build.into(),
            path: String::new(),
            root: None,
            origin: String::new(),
            baseline: false,
        },
        Some(why),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_by_process_and_recursion_depth() {
        let r = |n: usize| vec!["recurse (/w/scenarios.py:105)"; n].join(";");
        let base = "<module> (b.py:1);main (b.py:2);run (b.py:3)";
        let text = format!(
            "process 7 (python3);{base};{} 7\n\
             process 7 (python3);{base};{} 5\n\
             process 8 (python3.15);{base};{} 3\n\
             process 8 (python3.15);{base};{} 2\n\
             process 8 (python3.15);{base};cpu_split (s.py:1);split_a (s.py:110) 4\n",
            r(102),
            r(1002),
            r(102),
            r(60),
        );
        let p = parse_profile(&text);
        assert_eq!(p.at(Some(7), 101), 7);
        assert_eq!(p.at(Some(7), 1001), 5);
        assert_eq!(p.at(Some(8), 101), 3);
        assert_eq!(p.at(Some(8), 1001), 0);
        assert_eq!(p.any_depth(Some(8)), 5);
        assert_eq!(p.deepest_recurse[&Some(7)], 1002);
        assert!(!p.cut);
        assert_eq!(stats::total_samples(&p.other), 4);
        assert!(stats::parse_folded(&p.other)[0].0[0].starts_with("process 8"));

        let one = format!("{base};{} 9\n{base};cpu_split (s.py:1) 1\n", r(11));
        let p = parse_profile(&one);
        assert_eq!(p.at(None, 10), 9);
        assert_eq!(p.any_depth(None), 9);
        assert_eq!(stats::total_samples(&p.other), 1);
        assert!(parse_profile("[truncated];recurse (a:1) 1\n").cut);
        assert_eq!(process_frame("process 4242 (python3.14)"), Some(4242));
        assert_eq!(process_frame("<module> (a.py:1)"), None);
    }

    #[test]
    fn dpkg_status() {
        let dir = std::env::temp_dir().join(format!("pyebpf-dpkg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("var/lib/dpkg")).unwrap();
        std::fs::write(
            dir.join("var/lib/dpkg/status"),
            "Package: libpython3.15\nStatus: install ok installed\nVersion: 3.15.2-1\n\n\
             Package: python3.15-minimal\nVersion: 3.15.2-2\n",
        )
        .unwrap();
        assert_eq!(
            dpkg_version(&dir, "python3.15-minimal").as_deref(),
            Some("3.15.2-2")
        );
        assert_eq!(
            dpkg_version(&dir, "libpython3.15").as_deref(),
            Some("3.15.2-1")
        );
        assert_eq!(dpkg_version(&dir, "python3.15"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn error_line() {
        let e = anyhow::anyhow!(
            "py-spy closed its output before printing \"Sampling process\"; output:\n\
             Error: Unsupported version of Python: 3.99.0\nStack backtrace:"
        );
        assert_eq!(
            short_error(&e),
            "Error: Unsupported version of Python: 3.99.0"
        );
    }
}
