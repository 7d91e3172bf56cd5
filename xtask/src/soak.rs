//! `cargo xtask soak [--quick] [--secs N] [--out DIR]`: proves that
//! profiling cannot hurt a production service. A gunicorn app (gthread
//! workers whose handlers create and drop frames fast) and a thread-churn
//! process run under a bounded wrk load through three phases: baseline (no
//! profiler), `pyebpf daemon` and `pyebpf record`, both at 999 Hz. Each
//! phase is judged on worker deaths, profiler exits, RSS, sample errors,
//! the handlers' lines in the profile and latency against the baseline's
//! noise (see [`report`]); SOAK.md and soak.json are written to `--out`.

mod busy;
mod folded;
mod gunlog;
mod profiler;
mod report;
mod wrk;

use crate::bench::gunicorn::{Gunicorn, GunicornConfig};
use crate::bench::report::{first_line, loadavg};
use crate::bench::sys::{tied, Output, Proc};
use crate::util::{cmd, root};
use anyhow::{bail, Context, Result};
use folded::Marker;
use gunlog::Death;
use profiler::{Profiled, Target};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use wrk::{Load, LoadShape};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// 60 s per phase instead of 600.
    #[arg(long)]
    pub quick: bool,
    /// Seconds of load per phase (overrides the default and --quick; at least 6).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(6..))]
    pub secs: Option<u64>,
    /// Directory for SOAK.md and soak.json (default: the repository root).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Use this pyebpf binary instead of building target/release/pyebpf.
    #[arg(long, value_name = "FILE")]
    pub pyebpf: Option<PathBuf>,
}

/// Returned (as the error) when the soak ran but a criterion failed:
/// `main` exits 2 for it, 1 for a soak that could not run.
#[derive(Debug)]
pub struct CriteriaFailed;

impl std::fmt::Display for CriteriaFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the soak FAILED some pass criteria (see SOAK.md)")
    }
}

impl std::error::Error for CriteriaFailed {}

/// Sizes of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Setup {
    pub phase_secs: u64,
    pub segment_secs: u64,
    pub warmup_secs: u64,
    pub workers: usize,
    pub threads: usize,
    pub churn_threads: usize,
    pub rate_hz: u64,
    /// `aggregation.retention_secs` of the daemon phase.
    pub daemon_retention_secs: u64,
    pub load: LoadShape,
}

impl Setup {
    fn new(secs: u64) -> Setup {
        let load = LoadShape {
            threads: 2,
            connections: 16,
            pause_ms: 40,
            segments: 6,
        };
        Setup {
            phase_secs: secs,
            segment_secs: secs.div_ceil(load.segments as u64),
            warmup_secs: (secs / 6).clamp(3, 20),
            workers: 4,
            threads: 16,
            churn_threads: 40,
            rate_hz: profiler::RATE_HZ,
            daemon_retention_secs: profiler::retention_secs(secs),
            load,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Meta {
    pub date_utc: String,
    pub kernel: String,
    pub nproc: usize,
    pub memory_gib: f64,
    pub git: String,
    pub pyebpf_version: String,
    pub python_version: String,
    pub gunicorn_version: String,
    pub wrk_version: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub seconds: f64,
}

/// One phase of the soak.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub name: String,
    pub load: Load,
    pub workers_before: Vec<u32>,
    pub workers_after: Vec<u32>,
    /// Deaths gunicorn logged during the phase.
    pub deaths: Vec<Death>,
    /// Workers booted during the phase (replacements).
    pub boots: usize,
    /// Workers of the start that are gone at the end.
    pub vanished: Vec<u32>,
    pub master_alive: bool,
    pub churn_alive: bool,
    pub profiler: Option<Profiled>,
}

impl Phase {
    /// Workers that died: logged deaths and vanished pids, each counted once.
    pub fn worker_deaths(&self) -> usize {
        let mut pids: Vec<u32> = self.deaths.iter().map(|d| d.pid).collect();
        pids.extend(&self.vanished);
        pids.sort_unstable();
        pids.dedup();
        pids.len()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub meta: Meta,
    pub setup: Setup,
    pub phases: Vec<Phase>,
    pub criteria: Vec<report::Criterion>,
    pub failures: Vec<String>,
}

/// How a phase is profiled: it runs the load under a profiler of the
/// target, or `None` for the baseline.
type Profile<'a> = Option<&'a dyn Fn(&Target) -> Result<(Load, Profiled)>>;

/// What every phase shares: the service, the churn, the load and the log.
struct Bench {
    setup: Setup,
    gunicorn: Gunicorn,
    churn: Proc,
    error_log: PathBuf,
    script: PathBuf,
    pyebpf: PathBuf,
    dir: PathBuf,
    tag: String,
    markers: Vec<Marker>,
}

impl Bench {
    /// Master, workers and churn: what the profilers profile.
    fn pids(&self) -> Vec<u32> {
        let mut p = vec![self.gunicorn.pid()];
        p.extend(self.gunicorn.workers());
        p.push(self.churn.pid);
        p
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.error_log).map_or(0, |m| m.len())
    }

    /// The error log from byte `from` on.
    fn log_since(&self, from: u64) -> Result<String> {
        let text = std::fs::read(&self.error_log)
            .with_context(|| format!("reading {}", self.error_log.display()))?;
        let from = (from as usize).min(text.len());
        Ok(String::from_utf8_lossy(&text[from..]).into_owned())
    }

    fn load(&self) -> Result<Load> {
        let s = &self.setup;
        wrk::run(self.gunicorn.addr, &self.script, &s.load, s.segment_secs)
    }

    /// Runs one phase: the load, under `profile` when given.
    fn phase(&self, name: &str, profile: Profile) -> Result<Phase> {
        println!("\n== {name}: {} s of load", self.setup.phase_secs);
        let before = self.gunicorn.workers();
        let log_from = self.log_len();
        let pids = self.pids();
        let target = Target {
            pyebpf: &self.pyebpf,
            dir: &self.dir,
            tag: &self.tag,
            pids: &pids,
            markers: &self.markers,
        };
        let (load, profiler) = match profile {
            Some(f) => {
                let (l, p) = f(&target)?;
                (l, Some(p))
            }
            None => (self.load()?, None),
        };
        let after = self.gunicorn.workers();
        let log = self.log_since(log_from)?;
        let phase = Phase {
            name: name.to_string(),
            load,
            vanished: before
                .iter()
                .filter(|p| !after.contains(p))
                .copied()
                .collect(),
            workers_before: before,
            workers_after: after,
            deaths: gunlog::deaths(&log),
            boots: gunlog::boots(&log),
            master_alive: !self.gunicorn.exited(),
            churn_alive: !self.churn.exited(),
            profiler,
        };
        report::print_phase(&phase);
        Ok(phase)
    }
}

/// `gunicorn --version` and `wrk --version` (wrk prints it with its usage
/// and exits 1).
fn versions(python: &Path) -> (String, String) {
    let g = first_line(cmd(&python.to_string_lossy(), &["-m", "gunicorn", "--version"]).probe());
    let w = Command::new("wrk")
        .arg("--version")
        .output()
        .map(|o| first_line(Some(String::from_utf8_lossy(&o.stdout).into_owned())))
        .unwrap_or_else(|_| "unknown".into());
    (g, w)
}

/// Starts gunicorn (with its error log in `dir`) and the churn.
fn start_bench(
    setup: Setup,
    python: &Path,
    pyebpf: PathBuf,
    dir: &Path,
    tag: String,
) -> Result<Bench> {
    let workloads = root().join("tests/workloads");
    let error_log = dir.join("gunicorn-error.log");
    let gunicorn = Gunicorn::start(&GunicornConfig {
        python,
        dir: &workloads,
        app: "soak_app:app",
        ready_path: "/json",
        workers: setup.workers,
        threads: setup.threads,
        tag: &tag,
        error_log: Some(&error_log),
    })?;
    let mut c = Command::new(python);
    c.arg(workloads.join("soak_churn.py"))
        .arg(&tag)
        .arg(setup.churn_threads.to_string());
    let mut churn = Proc::spawn(tied(c), "soak_churn.py", Output::Both, false)?;
    churn.wait_line("ready", Duration::from_secs(20))?;
    // Every worker must be up before the baseline: gunicorn answers as soon
    // as the first one serves.
    let deadline = Instant::now() + Duration::from_secs(30);
    while gunicorn.workers().len() < setup.workers {
        if Instant::now() > deadline {
            bail!(
                "gunicorn started {:?} of {} workers",
                gunicorn.workers(),
                setup.workers
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut markers = folded::markers_of(&workloads, "soak_app.py")?;
    markers.extend(folded::markers_of(&workloads, "soak_churn.py")?);
    Ok(Bench {
        setup,
        gunicorn,
        churn,
        error_log,
        script: workloads.join("soak_wrk.lua"),
        pyebpf,
        dir: dir.to_path_buf(),
        tag,
        markers,
    })
}

pub fn run(args: &SoakArgs) -> Result<()> {
    if !crate::util::is_root() {
        bail!("`cargo xtask soak` needs root: the profilers load BPF programs");
    }
    wrk::check_installed()?;
    let started = Instant::now();
    let secs = args.secs.unwrap_or(if args.quick { 60 } else { 600 });
    let setup = Setup::new(secs);
    let python = crate::bench::python()?;
    let dir = std::env::temp_dir().join(format!("pyebpf-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (_, pyebpf, version) = crate::bench::private_pyebpf(&dir, args.pyebpf.clone())?;
    let (gunicorn_version, wrk_version) = versions(&python);
    let mut meta = Meta {
        date_utc: first_line(cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).probe()),
        kernel: first_line(cmd("uname", &["-r"]).probe()),
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: crate::bench::sys::mem_total_kb() / 1048576.0,
        git: crate::bench::git_revision(),
        pyebpf_version: version,
        python_version: first_line(cmd(&python.to_string_lossy(), &["--version"]).probe()),
        gunicorn_version,
        wrk_version,
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        seconds: 0.0,
    };
    println!(
        "pyebpf soak: {} s per phase, {} CPUs, load average {}, {}",
        secs, meta.nproc, meta.loadavg_start, meta.pyebpf_version
    );
    let tag = format!("pyebpf-soak-{}", std::process::id());
    let bench = start_bench(setup.clone(), &python, pyebpf, &dir, tag)?;
    println!(
        "\n== warm-up: {} s of load (not reported)",
        setup.warmup_secs
    );
    wrk::segment(
        bench.gunicorn.addr,
        &bench.script,
        &setup.load,
        setup.warmup_secs,
    )?;

    let mut failures = Vec::new();
    let mut phases = Vec::new();
    let daemon = |t: &Target| profiler::daemon(t, secs, || bench.load());
    let record = |t: &Target| profiler::record(t, secs, || bench.load());
    let plan: [(&str, Profile); 3] = [
        ("baseline", None),
        ("daemon", Some(&daemon)),
        ("record", Some(&record)),
    ];
    for (name, profile) in plan {
        match bench.phase(name, profile) {
            Ok(p) => phases.push(p),
            Err(e) => {
                println!("FAILED: {name}: {e:#}");
                failures.push(format!("{name}: {e:#}"));
            }
        }
    }
    drop(bench);
    let _ = std::fs::remove_dir_all(&dir);
    meta.loadavg_end = loadavg();
    meta.seconds = started.elapsed().as_secs_f64();
    let mut results = Results {
        meta,
        setup,
        phases,
        criteria: Vec::new(),
        failures,
    };
    results.criteria = report::criteria(&results);
    let out = args.out.clone().unwrap_or_else(root);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(&results)? + "\n";
    std::fs::write(out.join("soak.json"), json).context("writing soak.json")?;
    std::fs::write(out.join("SOAK.md"), report::markdown(&results)).context("writing SOAK.md")?;
    println!(
        "\nwrote {} and {} in {:.0} s",
        out.join("SOAK.md").display(),
        out.join("soak.json").display(),
        results.meta.seconds
    );
    for c in &results.criteria {
        println!("  {}", c.line());
    }
    if !results.failures.is_empty() || results.criteria.iter().any(|c| !c.pass) {
        return Err(CriteriaFailed.into());
    }
    Ok(())
}
