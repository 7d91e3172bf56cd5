//! `cargo xtask bench --scale [--quick|--smoke]`: the daemon at production
//! scale on this machine, each load beside a baseline measured in the same
//! run. Writes BENCHMARKS-scale.md and benchmarks-scale.json (BENCHMARKS.md
//! links to them; the default bench rewrites BENCHMARKS.md whole, so the
//! scale results live in their own files).
//!
//! 1. Many processes and a hostile one: RSS against the byte budgets.
//! 2. Exec storm: daemon CPU per exec of a short non-Python process.
//! 3. Query load: `/healthz` latency and ring-buffer drops while clients
//!    pull whole-retention profiles.
//! 4. Pyroscope push at hundreds of processes: pushes expected vs received.
//! 5. Gunicorn soak: samples that lose their stack, RSS over time.

use super::daemon::{http_get, metric, Daemon, Samples};
use super::gunicorn::{Gunicorn, GunicornConfig};
use super::report::first_line;
use super::stats::Summary;
use super::sys::{self, tied, Output, Proc};
use super::watch::{flat, watched, RssSeries, FLAT_MIB_PER_MIN, STEP_MIB};
use super::Mode;
use crate::util::{cmd, root};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Sizes of every scale measurement for one [`Mode`].
#[derive(Clone, Debug, Serialize)]
pub struct ScalePlan {
    pub mode: Mode,
    /// Seconds the idle daemon (no Python process) is watched.
    pub idle_secs: f64,
    /// 1. Idle and busy processes, functions each, and (rate, seconds) runs.
    pub many_idle: usize,
    pub many_busy: usize,
    pub many_funcs: usize,
    pub many_runs: Vec<(u64, f64)>,
    pub budget_mib: u64,
    pub process_budget_mib: u64,
    /// 2. Execs per second tried, seconds per window, rounds (storm and
    ///    baseline each once per round).
    pub storm_rate: f64,
    pub storm_secs: f64,
    pub storm_rounds: usize,
    /// 3. Busy processes, concurrent query clients, seconds per window, rounds.
    pub query_procs: usize,
    pub query_clients: usize,
    pub query_secs: f64,
    pub query_rounds: usize,
    /// 4. Processes, window length, windows run.
    pub push_procs: usize,
    pub push_window_secs: u64,
    pub push_windows: u64,
    /// 5. Seconds, gunicorn workers x threads, load threads and requests/s.
    pub soak_secs: f64,
    pub soak_workers: usize,
    pub soak_threads: usize,
    pub soak_load_threads: usize,
    pub soak_rate: f64,
}

impl ScalePlan {
    pub fn new(mode: Mode) -> ScalePlan {
        let base = ScalePlan {
            mode,
            idle_secs: 15.0,
            many_idle: 197,
            many_busy: 3,
            many_funcs: 60,
            many_runs: vec![(99, 180.0), (999, 180.0)],
            budget_mib: 64,
            process_budget_mib: 8,
            storm_rate: 300.0,
            storm_secs: 25.0,
            storm_rounds: 2,
            query_procs: 20,
            query_clients: 3,
            query_secs: 60.0,
            query_rounds: 2,
            push_procs: 500,
            push_window_secs: 10,
            push_windows: 6,
            soak_secs: 600.0,
            soak_workers: 4,
            soak_threads: 8,
            soak_load_threads: 16,
            soak_rate: 150.0,
        };
        match mode {
            Mode::Full => base,
            Mode::Quick => ScalePlan {
                idle_secs: 5.0,
                many_runs: vec![(99, 30.0), (999, 20.0)],
                storm_secs: 10.0,
                storm_rounds: 1,
                query_secs: 20.0,
                query_rounds: 1,
                push_window_secs: 5,
                push_windows: 4,
                soak_secs: 60.0,
                ..base
            },
            Mode::Smoke => ScalePlan {
                idle_secs: 2.0,
                many_idle: 8,
                many_busy: 1,
                many_funcs: 20,
                many_runs: vec![(99, 5.0)],
                storm_rate: 100.0,
                storm_secs: 3.0,
                storm_rounds: 1,
                query_procs: 3,
                query_clients: 2,
                query_secs: 4.0,
                query_rounds: 1,
                push_procs: 10,
                push_window_secs: 2,
                push_windows: 2,
                soak_secs: 8.0,
                soak_workers: 2,
                soak_threads: 2,
                soak_load_threads: 2,
                soak_rate: 20.0,
                ..base
            },
        }
    }
}

/// Paths and names every measurement uses.
struct Cx {
    plan: ScalePlan,
    root: PathBuf,
    python: PathBuf,
    pyebpf: PathBuf,
    dir: PathBuf,
    /// In the command line of every profiled workload; the daemon's include
    /// rule selects it, so other Python processes on the host are left alone.
    tag: String,
    failures: std::cell::RefCell<Vec<String>>,
}

impl Cx {
    fn script(&self, name: &str) -> PathBuf {
        self.root.join("tests/workloads").join(name)
    }

    /// `pyebpf daemon` with `yaml` after the listen/include/logging settings.
    fn daemon(&self, name: &str, rate: u64, yaml: &str) -> Result<Daemon> {
        let config = self.dir.join(format!("{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:0\n\
                 sampling:\n  rate_hz: {rate}\n\
                 discovery:\n  include:\n    - cmdline: '{}'\n\
                 logging:\n  format: json\n  level: info\n{yaml}",
                self.tag
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let mut c = Command::new(&self.pyebpf);
        c.arg("daemon").arg("--config").arg(&config);
        Daemon::launch(tied(c)).with_context(|| format!("starting the daemon ({name})"))
    }

    fn soft<T>(&self, what: &str, r: Result<T>) -> Option<T> {
        super::soft(&self.failures, what, r)
    }
}

/// Workload processes killed (SIGKILL) and reaped on drop.
struct Fleet {
    children: Vec<Child>,
    log: PathBuf,
}

impl Fleet {
    fn new(cx: &Cx, name: &str) -> Fleet {
        Fleet {
            children: Vec::new(),
            log: cx.dir.join(format!("{name}.stderr")),
        }
    }

    /// `python scale_procs.py TAG ARGS...`, stderr appended to the fleet's log.
    fn spawn(&mut self, cx: &Cx, args: &[String], env: &[(&str, String)]) -> Result<u32> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut c = Command::new(&cx.python);
        c.arg(cx.script("scale_procs.py"))
            .arg(&cx.tag)
            .args(args)
            .current_dir(&cx.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = tied(c)
            .spawn()
            .with_context(|| format!("starting scale_procs.py {}", args.join(" ")))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }

    /// Fails if any process has ended (with the log's tail).
    fn check(&mut self) -> Result<()> {
        for c in &mut self.children {
            if let Some(st) = c.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                bail!(
                    "workload {} ended ({st}); stderr:\n{}",
                    c.id(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(())
    }

    fn kill(&mut self) {
        for c in &self.children {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
        }
        for mut c in self.children.drain(..) {
            let _ = c.wait();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `n` processes at `per_sec`, `args(i)` and `env(i)` for the i-th.
fn spawn_gradually(
    cx: &Cx,
    fleet: &mut Fleet,
    n: usize,
    per_sec: f64,
    args: impl Fn(usize) -> Vec<String>,
    env: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> Result<()> {
    let start = Instant::now();
    for i in 0..n {
        fleet.spawn(cx, &args(i), &env(i))?;
        let due = start + Duration::from_secs_f64((i + 1) as f64 / per_sec);
        thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    Ok(())
}

/// Free memory, to refuse a fleet that would not fit.
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

// ------------------------------------------------------------ RSS steps

/// `aggregation.window_secs` of the daemons that leave it at its default.
const DEFAULT_WINDOW_SECS: u64 = 60;

/// `+49.1 MiB at 65 s, +10.2 MiB at 127 s`, or empty.
fn steps_text(r: &RssSeries) -> String {
    r.steps
        .iter()
        .map(|(t, d)| format!("+{d:.1} MiB at {t:.0} s"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `; RSS rose in steps: ...` when it did.
fn steps_note(r: &RssSeries) -> String {
    if r.steps.is_empty() {
        return String::new();
    }
    // The series starts with the daemon, so window closes fall near
    // multiples of the window length.
    let window = DEFAULT_WINDOW_SECS as f64;
    let at_closes = r.steps.iter().all(|&(t, _)| {
        let off = t % window;
        t >= window - 3.0 && (off <= 3.0 || off >= window - 3.0)
    });
    let when = if at_closes {
        format!(
            ", each within 3 s of the close of one of the daemon's {DEFAULT_WINDOW_SECS} s windows"
        )
    } else {
        String::new()
    };
    format!("; RSS rose in steps ({}){when}", steps_text(r))
}

// ------------------------------------------------- 1. many processes + hostile

#[derive(Clone, Debug, Serialize)]
pub struct ManyRun {
    pub rate_hz: u64,
    pub seconds: f64,
    pub profiled: usize,
    pub rss: RssSeries,
    /// RSS minus the store's bytes at the end: what the budget does not cover.
    pub overhead_end_mib: f64,
    pub evicted_samples: f64,
    pub overflowed: f64,
    pub ringbuf_dropped: f64,
    pub received: f64,
    pub stacks_held: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Many {
    pub processes: usize,
    pub code_objects: usize,
    pub idle_rss_mib: f64,
    pub runs: Vec<ManyRun>,
}

fn idle_daemon(cx: &Cx) -> Result<f64> {
    let p = &cx.plan;
    let d = cx.daemon("idle", 99, &budget_yaml(p))?;
    let ((), points) = watched(&d, || {
        sys::sleep_secs(p.idle_secs);
        Ok(())
    })?;
    d.stop()?;
    let rss: Vec<f64> = points.iter().map(|p| p.rss_mib).collect();
    Summary::of(&rss)
        .map(|s| s.median)
        .context("no RSS readings of the idle daemon")
}

fn budget_yaml(p: &ScalePlan) -> String {
    format!(
        "aggregation:\n  memory_budget_mib: {}\n  process_memory_budget_mib: {}\n",
        p.budget_mib, p.process_budget_mib
    )
}

fn many(cx: &Cx, idle_rss_mib: f64) -> Result<Many> {
    let p = &cx.plan;
    let mut fleet = Fleet::new(cx, "many");
    let n = p.many_idle + p.many_busy;
    println!("  starting {n} processes and a hostile one");
    spawn_gradually(
        cx,
        &mut fleet,
        n,
        100.0,
        |i| {
            if i < p.many_busy {
                vec![
                    "busy".into(),
                    i.to_string(),
                    p.many_funcs.to_string(),
                    "0.5".into(),
                ]
            } else {
                let funcs = p.many_funcs.to_string();
                vec![
                    "idle".into(),
                    i.to_string(),
                    funcs,
                    "2.0".into(),
                    "0.002".into(),
                ]
            }
        },
        |_| Vec::new(),
    )?;
    fleet.spawn(cx, &["hostile".into(), n.to_string()], &[])?;
    sys::sleep_secs(2.0);
    fleet.check()?;
    let pids = fleet.pids();
    let mut runs = Vec::new();
    for &(rate, secs) in &p.many_runs {
        println!("  {rate} Hz for {secs} s");
        let d = cx.daemon(&format!("many-{rate}"), rate, &budget_yaml(p))?;
        let (profiled, points) = watched(&d, || {
            d.wait_profiled(&pids, Duration::from_secs(60))?;
            let profiled = d.profiled()?.len();
            sys::sleep_secs(secs);
            Ok(profiled)
        })?;
        fleet.check()?;
        let m = d.metrics()?;
        d.stop()?;
        let rss = RssSeries::of(points)?;
        runs.push(ManyRun {
            rate_hz: rate,
            seconds: secs,
            profiled,
            overhead_end_mib: rss.end_mib - rss.store_end_mib,
            rss,
            evicted_samples: metric(&m, "pyebpf_store_evicted_samples_total", &[]),
            overflowed: metric(&m, "pyebpf_stacks_overflowed_total", &[]),
            ringbuf_dropped: metric(&m, "pyebpf_ringbuf_dropped_samples_total", &[]),
            received: metric(&m, "pyebpf_samples_received_total", &[]),
            stacks_held: metric(&m, "pyebpf_store_stacks", &[]),
        });
    }
    Ok(Many {
        processes: n + 1,
        code_objects: n * p.many_funcs,
        idle_rss_mib,
        runs,
    })
}

// ------------------------------------------------------------ 2. exec storm

#[derive(Clone, Debug, Serialize)]
pub struct Storm {
    pub rate_tried: f64,
    pub seconds: f64,
    /// Per round: (execs, execs/s achieved, daemon CPU s) of the storm window.
    pub storm: Vec<(u64, f64, f64)>,
    /// Per round: daemon CPU s of the same window without the storm.
    pub baseline_cpu_s: Vec<f64>,
    pub execs_per_sec: f64,
    /// (median storm CPU − median baseline CPU) / median execs.
    pub cpu_per_exec_ms: f64,
    /// Processes the daemon's discovery counted (any result), over every storm.
    pub discovered: f64,
}

/// Spawns `/bin/true` at `rate` per second for `secs`; returns execs done.
fn exec_storm(rate: f64, secs: f64) -> Result<u64> {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut n: u64 = 0;
    while Instant::now() < end {
        Command::new("/bin/true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running /bin/true")?;
        n += 1;
        // Paced on the schedule; a late exec does not make the next ones hurry.
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
    }
    Ok(n)
}

fn storm(cx: &Cx) -> Result<Storm> {
    let p = &cx.plan;
    let d = cx.daemon("storm", 99, "")?;
    // Every result: with the include rule an exec may be settled before it
    // is known not to be Python.
    let not_python = |m: &Samples| metric(m, "pyebpf_processes_discovered_total", &[]);
    let m0 = d.metrics()?;
    let whole = p.storm_secs.round().max(1.0) as u32;
    let mut storm = Vec::new();
    let mut base = Vec::new();
    for round in 0..p.storm_rounds {
        // Alternate the order so that drift does not favour one condition.
        for storming in [round % 2 == 0, round % 2 != 0] {
            let a = d.aligned_snapshot()?;
            if storming {
                let n = exec_storm(p.storm_rate, f64::from(whole))?;
                let b = d.snapshot_after(&a, whole)?;
                let dl = super::daemon::delta(&a, &b);
                println!(
                    "  storm: {n} execs ({:.0}/s), daemon CPU {:.3} s",
                    n as f64 / dl.seconds,
                    dl.cpu_s
                );
                storm.push((n, n as f64 / dl.seconds, dl.cpu_s));
            } else {
                let b = d.snapshot_after(&a, whole)?;
                let dl = super::daemon::delta(&a, &b);
                println!("  no storm: daemon CPU {:.3} s", dl.cpu_s);
                base.push(dl.cpu_s);
            }
        }
    }
    let m1 = d.metrics()?;
    d.stop()?;
    let med = |v: Vec<f64>| Summary::of(&v).map_or(f64::NAN, |s| s.median);
    let execs = med(storm.iter().map(|s| s.0 as f64).collect());
    let extra = med(storm.iter().map(|s| s.2).collect()) - med(base.clone());
    Ok(Storm {
        rate_tried: p.storm_rate,
        seconds: f64::from(whole),
        execs_per_sec: med(storm.iter().map(|s| s.1).collect()),
        cpu_per_exec_ms: extra / execs.max(1.0) * 1000.0,
        storm,
        baseline_cpu_s: base,
        discovered: not_python(&m1) - not_python(&m0),
    })
}

// ------------------------------------------------------------ 3. query load

#[derive(Clone, Debug, Serialize)]
pub struct QueryWindow {
    pub clients: usize,
    pub seconds: f64,
    pub healthz_p50_ms: f64,
    pub healthz_p99_ms: f64,
    pub healthz_max_ms: f64,
    pub healthz_polls: usize,
    pub healthz_not_ok: usize,
    pub queries: u64,
    pub query_errors: u64,
    pub query_p50_ms: f64,
    pub received: f64,
    pub ringbuf_full: f64,
    pub ringbuf_dropped: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Query {
    pub procs: usize,
    pub rate_hz: u64,
    pub windows: Vec<QueryWindow>,
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = v.to_vec();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

fn query_window(d: &Daemon, pids: &[u32], clients: usize, secs: f64) -> Result<QueryWindow> {
    let addr = d.addr;
    let stop = AtomicBool::new(false);
    let whole = secs.round().max(1.0) as u32;
    let a = d.aligned_snapshot()?;
    let ra = metric(&a.metrics, "pyebpf_ringbuf_dropped_samples_total", &[]);
    let (health, (queries, errors, qlat), b) = thread::scope(|s| -> Result<_> {
        let poller = s.spawn(|| {
            let mut lat = Vec::new();
            let mut not_ok = 0usize;
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match http_get(addr, "/healthz") {
                    Ok((200, _)) => {}
                    _ => not_ok += 1,
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                next += Duration::from_millis(50);
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            (lat, not_ok)
        });
        let workers: Vec<_> = (0..clients)
            .map(|k| {
                let stop = &stop;
                s.spawn(move || {
                    let (mut n, mut err, mut lat) = (0u64, 0u64, Vec::new());
                    let mut i = k;
                    while !stop.load(Ordering::Relaxed) {
                        // The whole retention: the most a query can ask for.
                        let path = if i % 2 == 0 {
                            "/api/top?seconds=600".to_string()
                        } else {
                            format!("/profile?pid={}&seconds=600", pids[i / 2 % pids.len()])
                        };
                        let t = Instant::now();
                        match http_get(addr, &path) {
                            Ok((200, _)) => n += 1,
                            _ => err += 1,
                        }
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        i += 1;
                    }
                    (n, err, lat)
                })
            })
            .collect();
        let b = d.snapshot_after(&a, whole);
        stop.store(true, Ordering::Relaxed);
        let health = poller.join().unwrap_or_default();
        let mut total = (0, 0, Vec::new());
        for w in workers {
            let (n, e, l) = w.join().unwrap_or_default();
            total.0 += n;
            total.1 += e;
            total.2.extend(l);
        }
        Ok((health, total, b?))
    })?;
    let dl = super::daemon::delta(&a, &b);
    let (lat, not_ok) = health;
    Ok(QueryWindow {
        clients,
        seconds: dl.seconds,
        healthz_p50_ms: quantile(&lat, 0.5),
        healthz_p99_ms: quantile(&lat, 0.99),
        healthz_max_ms: quantile(&lat, 1.0),
        healthz_polls: lat.len(),
        healthz_not_ok: not_ok,
        queries,
        query_errors: errors,
        query_p50_ms: quantile(&qlat, 0.5),
        received: dl.received,
        ringbuf_full: dl.ringbuf_full,
        ringbuf_dropped: metric(&b.metrics, "pyebpf_ringbuf_dropped_samples_total", &[]) - ra,
    })
}

fn query(cx: &Cx) -> Result<Query> {
    let p = &cx.plan;
    let mut fleet = Fleet::new(cx, "query");
    spawn_gradually(
        cx,
        &mut fleet,
        p.query_procs,
        50.0,
        |i| vec!["busy".into(), i.to_string(), "30".into(), "1.0".into()],
        |_| Vec::new(),
    )?;
    sys::sleep_secs(1.0);
    fleet.check()?;
    let pids = fleet.pids();
    let d = cx.daemon("query", 999, "")?;
    d.wait_profiled(&pids, Duration::from_secs(60))?;
    // Some data to query before the first window.
    sys::sleep_secs(3.0);
    let mut windows = Vec::new();
    for round in 0..p.query_rounds {
        for loaded in [round % 2 == 0, round % 2 != 0] {
            let clients = if loaded { p.query_clients } else { 0 };
            let w = query_window(&d, &pids, clients, p.query_secs)?;
            println!(
                "  {clients} clients: /healthz p50 {:.1} ms p99 {:.1} ms, {} queries, {:.0} samples received, {} ring-buffer drops",
                w.healthz_p50_ms, w.healthz_p99_ms, w.queries, w.received, w.ringbuf_full
            );
            windows.push(w);
        }
    }
    fleet.check()?;
    d.stop()?;
    Ok(Query {
        procs: p.query_procs,
        rate_hz: 999,
        windows,
    })
}

// --------------------------------------------------- 4. Pyroscope push

/// What the local Pyroscope stand-in received.
#[derive(Default)]
struct Received {
    /// (service_name label, `from`) of each POST /ingest.
    pushes: Vec<(String, u64)>,
    bad: u64,
}

/// `%XX` and `+` decoding of a query-string value.
fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `(service_name, from)` of an ingest request target.
fn parse_ingest(target: &str) -> Option<(String, u64)> {
    let (path, query) = target.split_once('?')?;
    if !path.ends_with("/ingest") {
        return None;
    }
    let mut name = None;
    let mut from = None;
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=')?;
        match k {
            "name" => name = Some(url_decode(v)),
            "from" => from = url_decode(v).parse().ok(),
            _ => {}
        }
    }
    let name = name?;
    let labels = name.split_once('{')?.1.trim_end_matches('}');
    let service = labels
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.trim() == "service_name")
        .map(|(_, v)| v.trim().to_string())?;
    Some((service, from?))
}

/// Serves one keep-alive connection: each request is read whole and answered 200.
fn serve_conn(s: TcpStream, rec: &Mutex<Received>) -> Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let (mut len, mut chunked) = (0usize, false);
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    len = v.parse().context("bad Content-Length")?;
                } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        if chunked {
            loop {
                let mut size = String::new();
                r.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                    .context("bad chunk size")?;
                let mut skip = vec![0u8; n + 2];
                r.read_exact(&mut skip)?;
                if n == 0 {
                    break;
                }
            }
        } else {
            std::io::copy(&mut (&mut r).take(len as u64), &mut std::io::sink())?;
        }
        {
            let mut g = rec.lock().unwrap_or_else(|e| e.into_inner());
            match parse_ingest(&target) {
                Some(p) => g.pushes.push(p),
                None => g.bad += 1,
            }
        }
        w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")?;
    }
}

/// A Pyroscope-compatible receiver on 127.0.0.1 in background threads.
struct Receiver {
    addr: SocketAddr,
    rec: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start() -> Result<Receiver> {
        let l = TcpListener::bind("127.0.0.1:0").context("binding the receiver")?;
        let addr = l.local_addr()?;
        let rec = Arc::new(Mutex::new(Received::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (rec2, stop2) = (rec.clone(), stop.clone());
        thread::spawn(move || {
            for s in l.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(s) = s else { continue };
                let rec = rec2.clone();
                thread::spawn(move || {
                    let _ = serve_conn(s, &rec);
                });
            }
        });
        Ok(Receiver { addr, rec, stop })
    }

    fn snapshot(&self) -> (Vec<(String, u64)>, u64) {
        let g = self.rec.lock().unwrap_or_else(|e| e.into_inner());
        (g.pushes.clone(), g.bad)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Push {
    pub procs: usize,
    pub profiled: usize,
    pub window_secs: u64,
    pub windows_run: u64,
    /// Per closed window (by its start): profiles written to pprof_dir (the
    /// processes with samples) and pushes received.
    pub per_window: Vec<(u64, usize, usize)>,
    pub expected: usize,
    pub received: usize,
    /// Expected (pid, window) pairs that never arrived.
    pub missing: usize,
    pub duplicates: usize,
    pub unparsed_requests: u64,
    pub export_ok: f64,
    pub export_error: f64,
    pub export_dropped: f64,
    pub pprof_ok: f64,
    /// After SIGTERM (which flushes the partial window): expected vs received.
    pub after_stop_expected: usize,
    pub after_stop_received: usize,
}

/// (pid, window start) of each `<service>-<pid>-<start>.pb.gz` in `dir`.
fn pprof_files(dir: &Path) -> BTreeSet<(u32, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".pb.gz")?;
            let mut parts = stem.rsplitn(3, '-');
            let start = parts.next()?.parse().ok()?;
            let pid = parts.next()?.parse().ok()?;
            Some((pid, start))
        })
        .collect()
}

fn push(cx: &Cx) -> Result<Push> {
    let p = &cx.plan;
    let need = p.push_procs as u64 * 16 * 1024 * 1024;
    if mem_available() < need {
        bail!(
            "{} MiB available, {} processes need about {} MiB",
            mem_available() >> 20,
            p.push_procs,
            need >> 20
        );
    }
    let recv = Receiver::start()?;
    let pprof = cx.dir.join("pprof");
    let mut fleet = Fleet::new(cx, "push");
    println!("  starting {} processes", p.push_procs);
    // Each: about 5 ms of CPU every 3 s, so a few samples per window at
    // 999 Hz while 500 of them take about half a CPU.
    spawn_gradually(
        cx,
        &mut fleet,
        p.push_procs,
        40.0,
        |i| {
            vec![
                "idle".into(),
                (1000 + i).to_string(),
                "10".into(),
                "3.0".into(),
                "0.005".into(),
            ]
        },
        |i| vec![("OTEL_SERVICE_NAME", format!("scale-push-{i}"))],
    )?;
    sys::sleep_secs(2.0);
    fleet.check()?;
    let pids = fleet.pids();
    let service_pid: HashMap<String, u32> = pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| (format!("scale-push-{i}"), pid))
        .collect();
    let yaml = format!(
        "aggregation:\n  window_secs: {}\n\
         outputs:\n  pprof_dir:\n    path: {}\n  pyroscope:\n    url: http://{}\n",
        p.push_window_secs,
        pprof.display(),
        recv.addr
    );
    let d = cx.daemon("push", 999, &yaml)?;
    d.wait_profiled(&pids, Duration::from_secs(180))?;
    let profiled = d.profiled()?.len();
    println!(
        "  {profiled} profiled; {} windows of {} s",
        p.push_windows, p.push_window_secs
    );
    sys::sleep_secs((p.push_windows * p.push_window_secs) as f64);
    // No new samples from here: the windows still open close with what they
    // hold, and then nothing more is written or pushed.
    fleet.kill();
    let received_set = |recv: &Receiver| {
        let (pushes, bad) = recv.snapshot();
        let pairs: Vec<(u32, u64)> = pushes
            .iter()
            .filter_map(|(s, from)| service_pid.get(s).map(|&pid| (pid, *from)))
            .collect();
        (pairs, bad)
    };
    let quiet = Duration::from_secs(p.push_window_secs + 3);
    let deadline = Instant::now() + Duration::from_secs(3 * p.push_window_secs + 60);
    let mut last = (0usize, 0usize);
    let mut since = Instant::now();
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(500));
        let now = (pprof_files(&pprof).len(), recv.snapshot().0.len());
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    let expected = pprof_files(&pprof);
    let (pairs, unparsed) = received_set(&recv);
    let got: BTreeSet<(u32, u64)> = pairs.iter().copied().collect();
    let m = d.metrics()?;
    d.stop()?;
    let after_expected = pprof_files(&pprof).len();
    let after_received = received_set(&recv).0.len();
    let mut per: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for (_, start) in &expected {
        per.entry(*start).or_default().0 += 1;
    }
    for (_, from) in &pairs {
        per.entry(*from).or_default().1 += 1;
    }
    let export = |target: &str, result: &str| {
        metric(
            &m,
            "pyebpf_export_total",
            &[("target", target), ("result", result)],
        )
    };
    Ok(Push {
        procs: p.push_procs,
        profiled,
        window_secs: p.push_window_secs,
        windows_run: p.push_windows,
        per_window: per.into_iter().map(|(k, (e, r))| (k, e, r)).collect(),
        expected: expected.len(),
        received: pairs.len(),
        missing: expected.difference(&got).count(),
        duplicates: pairs.len() - got.len(),
        unparsed_requests: unparsed,
        export_ok: export("pyroscope", "ok"),
        export_error: export("pyroscope", "error"),
        export_dropped: export("pyroscope", "dropped"),
        pprof_ok: export("pprof_dir", "ok"),
        after_stop_expected: after_expected,
        after_stop_received: after_received,
    })
}

// ------------------------------------------------------- 5. gunicorn soak

#[derive(Clone, Debug, Serialize)]
pub struct Soak {
    pub seconds: f64,
    pub workers: usize,
    pub threads: usize,
    pub requests: u64,
    pub request_errors: u64,
    pub received: f64,
    pub overflowed: f64,
    pub overflowed_share: f64,
    pub evicted_samples: f64,
    pub ringbuf_dropped: f64,
    pub rss: RssSeries,
}

fn soak(cx: &Cx) -> Result<Soak> {
    let p = &cx.plan;
    let g = Gunicorn::start(&GunicornConfig {
        python: &cx.python,
        dir: &cx.root.join("tests/workloads"),
        app: "scale_app:app",
        ready_path: "/json",
        workers: p.soak_workers,
        threads: p.soak_threads,
        tag: &cx.tag,
        error_log: None,
    })?;
    let port = g.addr.port();
    let mut pids = g.workers();
    pids.push(g.pid());
    let d = cx.daemon("soak", 999, "")?;
    // Workers are forked without an exec: the daemon finds them by its /proc rescan.
    d.wait_profiled(&pids, Duration::from_secs(40))?;
    let mut load = Command::new(&cx.python);
    load.arg(cx.script("scale_load.py"))
        .arg("not-profiled")
        .arg(port.to_string())
        .arg(p.soak_load_threads.to_string())
        .arg(p.soak_rate.to_string())
        .arg(p.soak_secs.to_string());
    let m0 = d.metrics()?;
    let mut lp = Proc::spawn(tied(load), "load generator", Output::Stdout, false)?;
    let (done, points) = watched(&d, || {
        lp.wait_line("done", Duration::from_secs_f64(p.soak_secs + 60.0))
    })?;
    let m1 = d.metrics()?;
    d.stop()?;
    drop(g);
    let mut it = done.split_whitespace().skip(1);
    let requests = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let request_errors = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let dm = |name: &str| metric(&m1, name, &[]) - metric(&m0, name, &[]);
    let received = dm("pyebpf_samples_received_total");
    let overflowed = dm("pyebpf_stacks_overflowed_total");
    Ok(Soak {
        seconds: p.soak_secs,
        workers: p.soak_workers,
        threads: p.soak_threads,
        requests,
        request_errors,
        received,
        overflowed,
        overflowed_share: overflowed / received.max(1.0),
        evicted_samples: dm("pyebpf_store_evicted_samples_total"),
        ringbuf_dropped: dm("pyebpf_ringbuf_dropped_samples_total"),
        rss: RssSeries::of(points)?,
    })
}

// ------------------------------------------------------------------ report

#[derive(Clone, Debug, Serialize)]
pub struct ScaleMeta {
    pub date_utc: String,
    pub mode: Mode,
    pub nproc: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub pyebpf_version: String,
    pub pyebpf_git: String,
    pub python_version: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub seconds: f64,
    pub section_seconds: Vec<(String, f64)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScaleTarget {
    pub target: String,
    pub measured: String,
    /// `None`: not measured (the run failed).
    pub met: Option<bool>,
    /// Why it was missed, when it was.
    pub cause: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScaleResults {
    pub meta: ScaleMeta,
    pub plan: ScalePlan,
    pub many: Option<Many>,
    pub storm: Option<Storm>,
    pub query: Option<Query>,
    pub push: Option<Push>,
    pub soak: Option<Soak>,
    pub targets: Vec<ScaleTarget>,
    pub failures: Vec<String>,
}

fn target(t: &str, measured: String, met: Option<bool>, cause: String) -> ScaleTarget {
    ScaleTarget {
        target: t.into(),
        measured,
        met,
        cause: if met == Some(false) {
            cause
        } else {
            String::new()
        },
    }
}

fn targets(r: &ScaleResults) -> Vec<ScaleTarget> {
    let p = &r.plan;
    let mut out = Vec::new();
    let budget = p.budget_mib as f64;
    match &r.many {
        Some(m) => {
            for run in &m.runs {
                let limit = budget + m.idle_rss_mib;
                out.push(target(
                    &format!(
                        "{} processes + hostile @ {} Hz: RSS within budget ({} MiB) + fixed overhead (idle daemon {:.1} MiB)",
                        m.processes - 1, run.rate_hz, p.budget_mib, m.idle_rss_mib
                    ),
                    format!("max {:.1} MiB (limit {:.1})", run.rss.max_mib, limit),
                    Some(run.rss.max_mib <= limit),
                    format!(
                        "store held at most {:.1} MiB; RSS minus store at the end {:.1} MiB, {:.1} MiB above the idle daemon: memory outside the budgeted store{}",
                        run.rss.store_max_mib,
                        run.overhead_end_mib,
                        run.overhead_end_mib - m.idle_rss_mib,
                        steps_note(&run.rss)
                    ),
                ));
                out.push(target(
                    &format!(
                        "{} processes + hostile @ {} Hz: RSS flat (under {FLAT_MIB_PER_MIN} MiB/min over the second half)",
                        m.processes - 1,
                        run.rate_hz
                    ),
                    format!("{:+.2} MiB/min", run.rss.slope_mib_per_min),
                    Some(flat(&run.rss)),
                    growth_cause(&run.rss),
                ));
            }
        }
        None => out.push(target(
            "many processes: RSS within budget, flat",
            "—".into(),
            None,
            String::new(),
        )),
    }
    match &r.storm {
        Some(s) => out.push(target(
            "exec storm: daemon CPU under 0.5 ms per exec",
            format!(
                "{:.3} ms per exec at {:.0} execs/s",
                s.cpu_per_exec_ms, s.execs_per_sec
            ),
            Some(s.cpu_per_exec_ms < 0.5),
            "discovery work per exec".into(),
        )),
        None => out.push(target(
            "exec storm: under 0.5 ms per exec",
            "—".into(),
            None,
            String::new(),
        )),
    }
    match &r.query {
        Some(q) => {
            let loaded: Vec<&QueryWindow> = q.windows.iter().filter(|w| w.clients > 0).collect();
            let quiet: Vec<&QueryWindow> = q.windows.iter().filter(|w| w.clients == 0).collect();
            let p99 = loaded.iter().map(|w| w.healthz_p99_ms).fold(0.0, f64::max);
            let p99_quiet = quiet.iter().map(|w| w.healthz_p99_ms).fold(0.0, f64::max);
            out.push(target(
                "query load: /healthz p99 under 50 ms",
                format!("{p99:.1} ms with clients (worst window), {p99_quiet:.1} ms without"),
                Some(p99 < 50.0),
                if p99_quiet >= 50.0 {
                    format!(
                        "already {p99_quiet:.1} ms without clients: {} busy processes and the \
                         daemon share {} CPUs, so /healthz waits for a CPU",
                        q.procs, r.meta.nproc
                    )
                } else {
                    "health checks wait behind the whole-retention queries for the API's \
                     threads or a CPU"
                        .into()
                },
            ));
            let drops = |v: &[&QueryWindow]| v.iter().map(|w| w.ringbuf_full).sum::<f64>();
            let (dl, dq) = (drops(&loaded), drops(&quiet));
            out.push(target(
                "query load: no ring-buffer drops added by queries",
                format!("{dl:.0} drops with clients, {dq:.0} without"),
                Some(dl <= dq),
                "queries delay the ring-buffer reader".into(),
            ));
        }
        None => out.push(target(
            "query load: /healthz p99 under 50 ms, no added drops",
            "—".into(),
            None,
            String::new(),
        )),
    }
    match &r.push {
        Some(x) => out.push(target(
            &format!("Pyroscope push at {} processes: zero pushes lost", x.procs),
            format!(
                "{} of {} expected profiles received ({} missing), exporter dropped {:.0}, errors {:.0}",
                x.expected - x.missing,
                x.expected,
                x.missing,
                x.export_dropped,
                x.export_error
            ),
            Some(x.missing == 0 && x.export_dropped == 0.0 && x.expected > 0),
            if x.expected == 0 {
                "no window was written: nothing to compare".into()
            } else {
                let most = x.per_window.iter().map(|w| w.2).max().unwrap_or(0);
                format!(
                    "at most {most} pushes arrived per window while up to {} processes had \
                     samples; the exporter dropped the rest (`result=\"dropped\"`): its queue \
                     (`max_queue_windows`, 120 by default) overflows when every process's \
                     window closes at once",
                    x.per_window.iter().map(|w| w.1).max().unwrap_or(0)
                )
            },
        )),
        None => out.push(target("Pyroscope push: zero pushes lost", "—".into(), None, String::new())),
    }
    match &r.soak {
        Some(s) => {
            out.push(target(
                "gunicorn soak (default settings): zero samples under [stack table full]",
                format!(
                    "{:.0} of {:.0} samples ({:.4}%), {:.0} evicted",
                    s.overflowed,
                    s.received,
                    s.overflowed_share * 100.0,
                    s.evicted_samples
                ),
                Some(s.overflowed == 0.0),
                "stack table full for a process".into(),
            ));
            out.push(target(
                &format!("gunicorn soak: RSS flat (under {FLAT_MIB_PER_MIN} MiB/min over the second half)"),
                format!(
                    "{:+.2} MiB/min (start {:.1}, max {:.1}, end {:.1} MiB)",
                    s.rss.slope_mib_per_min, s.rss.start_mib, s.rss.max_mib, s.rss.end_mib
                ),
                Some(flat(&s.rss)),
                growth_cause(&s.rss),
            ));
        }
        None => out.push(target(
            "gunicorn soak: zero samples under [stack table full]",
            "—".into(),
            None,
            String::new(),
        )),
    }
    out
}

/// Why RSS grew: the store filling (its budget or retention), or memory outside it.
fn growth_cause(r: &RssSeries) -> String {
    if r.nonstore_slope_mib_per_min < FLAT_MIB_PER_MIN {
        format!(
            "the store was still filling (to {:.1} MiB; its budget or retention not reached in \
             this run); RSS minus the store was flat ({:+.2} MiB/min)",
            r.store_end_mib, r.nonstore_slope_mib_per_min
        )
    } else {
        format!(
            "RSS minus the store grew {:+.2} MiB/min: memory outside the budgeted store{}",
            r.nonstore_slope_mib_per_min,
            steps_note(r)
        )
    }
}

fn verdict(t: &ScaleTarget) -> String {
    match t.met {
        Some(true) => "met".into(),
        Some(false) => format!("**missed**: {}", t.cause),
        None => "**not measured**".into(),
    }
}

fn markdown(r: &ScaleResults) -> String {
    let m = &r.meta;
    let p = &r.plan;
    let mut s = String::new();
    let mode = match m.mode {
        Mode::Full => "cargo xtask bench --scale",
        Mode::Quick => "cargo xtask bench --scale --quick",
        Mode::Smoke => "cargo xtask bench --scale --smoke",
    };
    let _ = writeln!(
        s,
        "# pyebpf at scale\n\n\
         The `pyebpf daemon` under production-sized loads, measured by `{mode}` on {} in {:.0} s \
         (`--quick`: under 6 minutes; full: under 35). Each load is compared with a baseline \
         measured in the same run. Raw values, including RSS once a second, are in \
         `benchmarks-scale.json`. The daemon profiles only the run's own processes \
         (an include rule on a command-line tag). See [BENCHMARKS.md](BENCHMARKS.md) for cost \
         and accuracy against py-spy.\n",
        m.date_utc, m.seconds
    );
    let _ = writeln!(
        s,
        "Machine: {} CPUs, {:.1} GiB, kernel {}, {} (git {}), {}; load average at start / end \
         {} / {}.\n",
        m.nproc,
        m.memory_gib,
        m.kernel,
        m.pyebpf_version,
        m.pyebpf_git,
        m.python_version,
        m.loadavg_start,
        m.loadavg_end
    );
    let secs: Vec<String> = m
        .section_seconds
        .iter()
        .map(|(k, v)| format!("{k} {v:.0} s"))
        .collect();
    let _ = writeln!(s, "Time per measurement: {}.\n", secs.join(", "));
    let _ = writeln!(s, "## Targets\n\n| target | measured | |\n|---|---|---|");
    for t in &r.targets {
        let _ = writeln!(s, "| {} | {} | {} |", t.target, t.measured, verdict(t));
    }

    let _ = writeln!(s, "\n## 1. Many processes and a hostile one\n");
    let _ = writeln!(
        s,
        "{} idle Python processes (each sleeps 2 s between 2 ms bursts through its own {} \
         generated functions) and {} busy ones (half of each 20 ms on CPU), {} distinct code \
         objects between them, plus one hostile process that `exec`s three fresh mutually \
         recursive functions per round and recurses into them to a random depth of 50–1500, \
         as fast as it can: nearly every one of its samples is a new deep stack of new code \
         objects. Daemon with `aggregation.memory_budget_mib: {}` and \
         `process_memory_budget_mib: {}`; RSS (`VmRSS`) and `pyebpf_store_bytes` (all kinds) \
         read once a second. The fixed overhead is the idle daemon's median RSS with the same \
         configuration and no Python process, over {} s.\n",
        p.many_idle,
        p.many_funcs,
        p.many_busy,
        (p.many_idle + p.many_busy) * p.many_funcs,
        p.budget_mib,
        p.process_budget_mib,
        p.idle_secs
    );
    match &r.many {
        Some(x) => {
            let _ = writeln!(
                s,
                "Idle daemon RSS: {:.1} MiB. `aggregation.window_secs` is at its default, \
                 {DEFAULT_WINDOW_SECS} s.\n",
                x.idle_rss_mib
            );
            let _ = writeln!(
                s,
                "| rate | seconds | profiled | RSS start | p50 | max | end | slope (2nd half) | RSS − store slope | store max | RSS − store (end) | samples received | evicted | `[stack table full]` | ring-buffer drops |\n\
                 |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for run in &x.runs {
                let _ = writeln!(
                    s,
                    "| {} Hz | {:.0} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:+.2} MiB/min | {:+.2} MiB/min | {:.1} MiB | {:.1} MiB | {:.0} | {:.0} | {:.0} | {:.0} |",
                    run.rate_hz, run.seconds, run.profiled, run.rss.start_mib, run.rss.p50_mib,
                    run.rss.max_mib, run.rss.end_mib, run.rss.slope_mib_per_min,
                    run.rss.nonstore_slope_mib_per_min,
                    run.rss.store_max_mib, run.overhead_end_mib, run.received,
                    run.evicted_samples, run.overflowed, run.ringbuf_dropped
                );
            }
            for run in &x.runs {
                if !run.rss.steps.is_empty() {
                    let _ = writeln!(
                        s,
                        "\nAt {} Hz RSS rose by {STEP_MIB} MiB or more within one second: {}.",
                        run.rate_hz,
                        steps_text(&run.rss)
                    );
                }
            }
        }
        None => s.push_str("Not measured (see Failures).\n"),
    }

    let _ = writeln!(s, "\n## 2. Exec storm\n");
    let _ = writeln!(
        s,
        "`/bin/true` spawned and reaped one after another, paced at {:.0}/s, for {:.0} s \
         windows while the daemon runs at 99 Hz with no Python process to profile; the \
         daemon's CPU (all threads, from `schedstat`) compared with windows of the same length \
         without the storm, alternating, {} round(s). CPU per exec = (median storm CPU − median \
         baseline CPU) / median execs.\n",
        p.storm_rate, p.storm_secs, p.storm_rounds
    );
    match &r.storm {
        Some(x) => {
            let _ = writeln!(s, "| | execs | execs/s | daemon CPU |\n|---|---|---|---|");
            for (n, rate, cpu) in &x.storm {
                let _ = writeln!(s, "| storm | {n} | {rate:.0} | {cpu:.3} s |");
            }
            for cpu in &x.baseline_cpu_s {
                let _ = writeln!(s, "| baseline | — | — | {cpu:.3} s |");
            }
            let _ = writeln!(
                s,
                "\nCPU per exec: **{:.3} ms** at {:.0} execs/s (target under 0.5 ms). The daemon's \
                 discovery counted {:.0} processes (`pyebpf_processes_discovered_total`).",
                x.cpu_per_exec_ms, x.execs_per_sec, x.discovered
            );
        }
        None => s.push_str("Not measured (see Failures).\n"),
    }

    let _ = writeln!(s, "\n## 3. Query load\n");
    let _ = writeln!(
        s,
        "{} busy processes profiled at 999 Hz. With clients: {} threads each loop over \
         `/api/top?seconds=600` and `/profile?pid=…&seconds=600` (the whole retention) without \
         pause. `/healthz` is polled every 50 ms in both conditions; windows of {:.0} s \
         alternate, {} round(s).\n",
        p.query_procs, p.query_clients, p.query_secs, p.query_rounds
    );
    match &r.query {
        Some(x) => {
            let _ = writeln!(
                s,
                "| clients | /healthz p50 | p99 | max | polls (not 200) | queries (errors) | query p50 | samples received | ringbuf_full | dropped |\n\
                 |---|---|---|---|---|---|---|---|---|---|"
            );
            for w in &x.windows {
                let _ = writeln!(
                    s,
                    "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {} ({}) | {} ({}) | {} | {:.0} | {:.0} | {:.0} |",
                    w.clients, w.healthz_p50_ms, w.healthz_p99_ms, w.healthz_max_ms,
                    w.healthz_polls, w.healthz_not_ok, w.queries, w.query_errors,
                    if w.query_p50_ms.is_finite() { format!("{:.0} ms", w.query_p50_ms) } else { "—".into() }, w.received, w.ringbuf_full, w.ringbuf_dropped
                );
            }
        }
        None => s.push_str("Not measured (see Failures).\n"),
    }

    let _ = writeln!(s, "\n## 4. Pyroscope push\n");
    let _ = writeln!(
        s,
        "{} Python processes, each with its own `OTEL_SERVICE_NAME`, mostly asleep but each \
         burning about 5 ms every 3 s, profiled at 999 Hz with `aggregation.window_secs: {}` and \
         both outputs on: `pprof_dir` (the profiles expected: one file per process with samples \
         per window) and `pyroscope.url` pointing at a receiver in the harness that answers \
         every `POST /ingest` with 200 and records its `service_name` label and `from`. After \
         {} windows the processes are killed; once neither files nor pushes change for a window \
         and 3 s, every expected (process, window) is looked for among the pushes received.\n",
        p.push_procs, p.push_window_secs, p.push_windows
    );
    match &r.push {
        Some(x) => {
            let _ = writeln!(
                s,
                "{} of {} processes profiled. Expected {} profiles, received {} ({} missing, {} \
                 duplicates, {} unparsed requests). `pyebpf_export_total{{target=\"pyroscope\"}}`: ok \
                 {:.0}, error {:.0}, dropped {:.0}; pprof_dir ok {:.0}. After SIGTERM (which flushes \
                 the partial window): {} expected, {} received.\n",
                x.profiled, x.procs, x.expected, x.received, x.missing, x.duplicates,
                x.unparsed_requests, x.export_ok, x.export_error, x.export_dropped, x.pprof_ok,
                x.after_stop_expected, x.after_stop_received
            );
            let _ = writeln!(
                s,
                "| window start (unix s) | expected | received |\n|---|---|---|"
            );
            for (start, e, rcv) in &x.per_window {
                let _ = writeln!(s, "| {start} | {e} | {rcv} |");
            }
        }
        None => s.push_str("Not measured (see Failures).\n"),
    }

    let _ = writeln!(s, "\n## 5. Gunicorn soak\n");
    let _ = writeln!(
        s,
        "gunicorn (`-k gthread`, {} workers x {} threads) serving handlers that do JSON, \
         hashing, generators, exceptions and recursion of random depth 5–300, under {:.0} \
         requests/s from {} client threads over keep-alive connections, for {:.0} s; daemon at \
         999 Hz with default aggregation settings (256 MiB / 32 MiB budgets, 600 s retention).\n",
        p.soak_workers, p.soak_threads, p.soak_rate, p.soak_load_threads, p.soak_secs
    );
    match &r.soak {
        Some(x) => {
            let _ = writeln!(
                s,
                "| requests (errors) | samples received | `[stack table full]` | evicted | ring-buffer drops | RSS start | max | end | slope (2nd half) | RSS − store slope | store end |\n\
                 |---|---|---|---|---|---|---|---|---|---|---|"
            );
            let _ = writeln!(
                s,
                "| {} ({}) | {:.0} | {:.0} ({:.4}%) | {:.0} | {:.0} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:+.2} MiB/min | {:+.2} MiB/min | {:.1} MiB |",
                x.requests, x.request_errors, x.received, x.overflowed,
                x.overflowed_share * 100.0, x.evicted_samples, x.ringbuf_dropped,
                x.rss.start_mib, x.rss.max_mib, x.rss.end_mib, x.rss.slope_mib_per_min,
                x.rss.nonstore_slope_mib_per_min,
                x.rss.store_end_mib
            );
        }
        None => s.push_str("Not measured (see Failures).\n"),
    }

    let _ = writeln!(s, "\n## Failures\n");
    if r.failures.is_empty() {
        s.push_str("None.\n");
    } else {
        for f in &r.failures {
            let _ = writeln!(s, "- {}", f.replace('\n', " "));
        }
    }
    s
}

// -------------------------------------------------------------------- run

pub fn run(mode: Mode, out: Option<PathBuf>, pyebpf: Option<PathBuf>) -> Result<()> {
    if !crate::util::is_root() {
        bail!("`cargo xtask bench --scale` needs root: the daemon loads BPF programs");
    }
    let started = Instant::now();
    let root = root();
    let python = super::python()?;
    let dir = std::env::temp_dir().join(format!("pyebpf-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (_, bin, version) = super::private_pyebpf(&dir, pyebpf)?;
    let cx = Cx {
        plan: ScalePlan::new(mode),
        root: root.clone(),
        python: python.clone(),
        pyebpf: bin,
        dir: dir.clone(),
        tag: format!("pyebpf-scale-{}", std::process::id()),
        failures: Default::default(),
    };
    let mem_kb = sys::mem_total_kb();
    let mut meta = ScaleMeta {
        date_utc: first_line(cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).probe()),
        mode,
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: mem_kb / 1048576.0,
        kernel: first_line(cmd("uname", &["-r"]).probe()),
        pyebpf_version: version,
        pyebpf_git: super::git_revision(),
        python_version: first_line(cmd(&python.to_string_lossy(), &["--version"]).probe()),
        loadavg_start: super::report::loadavg(),
        loadavg_end: String::new(),
        seconds: 0.0,
        section_seconds: Vec::new(),
    };
    println!(
        "pyebpf bench --scale ({mode:?}): {} CPUs, load average {}, {}",
        meta.nproc, meta.loadavg_start, meta.pyebpf_version
    );
    let mut timed = |name: &str, f: &mut dyn FnMut()| {
        println!("\n== {name}");
        let t = Instant::now();
        f();
        meta.section_seconds
            .push((name.to_string(), t.elapsed().as_secs_f64()));
    };
    let (mut many_r, mut storm_r, mut query_r, mut push_r, mut soak_r) =
        (None, None, None, None, None);
    timed("many processes", &mut || {
        let idle = cx.soft("idle daemon", idle_daemon(&cx));
        if let Some(idle) = idle {
            many_r = cx.soft("many processes", many(&cx, idle));
        }
    });
    timed("exec storm", &mut || {
        storm_r = cx.soft("exec storm", storm(&cx))
    });
    timed("query load", &mut || {
        query_r = cx.soft("query load", query(&cx))
    });
    timed("pyroscope push", &mut || {
        push_r = cx.soft("pyroscope push", push(&cx))
    });
    timed("gunicorn soak", &mut || {
        soak_r = cx.soft("gunicorn soak", soak(&cx))
    });
    let _ = std::fs::remove_dir_all(&dir);
    meta.loadavg_end = super::report::loadavg();
    meta.seconds = started.elapsed().as_secs_f64();
    let mut results = ScaleResults {
        meta,
        plan: cx.plan.clone(),
        many: many_r,
        storm: storm_r,
        query: query_r,
        push: push_r,
        soak: soak_r,
        targets: Vec::new(),
        failures: cx.failures.borrow().clone(),
    };
    results.targets = targets(&results);
    let out = out.unwrap_or(root);
    std::fs::create_dir_all(&out)?;
    let json = serde_json::to_string_pretty(&results)? + "\n";
    std::fs::write(out.join("benchmarks-scale.json"), json)?;
    std::fs::write(out.join("BENCHMARKS-scale.md"), markdown(&results))?;
    println!(
        "\nwrote {} and {} in {:.0} s",
        out.join("BENCHMARKS-scale.md").display(),
        out.join("benchmarks-scale.json").display(),
        results.meta.seconds
    );
    for t in &results.targets {
        let v = match t.met {
            Some(true) => "met".to_string(),
            Some(false) => format!("MISSED ({})", t.cause),
            None => "NOT MEASURED".into(),
        };
        println!("  {}: {} — {v}", t.target, t.measured);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_target() {
        let t = "/ingest?name=python%7Bservice_name%3Dscale-push-7%2Ccommand%3Dpython3%7D&from=1700000000&until=1700000010&spyName=pyebpf";
        assert_eq!(
            parse_ingest(t),
            Some(("scale-push-7".to_string(), 1_700_000_000))
        );
        assert_eq!(
            parse_ingest("/other?name=a%7Bservice_name%3Dx%7D&from=1"),
            None
        );
        assert_eq!(parse_ingest("/ingest?name=python%7B%7D&from=1"), None);
    }

    #[test]
    fn decoding() {
        assert_eq!(url_decode("a%2Cb+c%7"), "a,b c%7");
        assert_eq!(url_decode("%"), "%");
    }

    #[test]
    fn pprof_names() {
        let dir = std::env::temp_dir().join(format!("scale-pprof-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("scale-push-3-4242-1700000000.pb.gz"), b"").unwrap();
        std::fs::write(dir.join(".tmp"), b"").unwrap();
        let got = pprof_files(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got, BTreeSet::from([(4242, 1_700_000_000)]));
    }

    #[test]
    fn plans_fit_their_time() {
        // Rough lower bounds of each mode's duration from its plan.
        let secs = |p: &ScalePlan| {
            p.idle_secs
                + p.many_runs.iter().map(|r| r.1).sum::<f64>()
                + 2.0 * p.storm_secs * p.storm_rounds as f64
                + 2.0 * p.query_secs * p.query_rounds as f64
                + (p.push_window_secs * p.push_windows) as f64
                + p.soak_secs
        };
        assert!(secs(&ScalePlan::new(Mode::Quick)) < 300.0);
        assert!(secs(&ScalePlan::new(Mode::Full)) < 1800.0);
    }
}
