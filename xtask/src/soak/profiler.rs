//! The profiler of a profiled phase, `pyebpf daemon` or `pyebpf record` at
//! the soak's rate, measured while the load runs: CPU, RSS over time,
//! whether it stayed up, samples and their errors, and what its profile
//! shows of the handlers.

use super::folded::{self, Marker, Shown};
use crate::bench::daemon::{metric, Daemon, DaemonConfig, Samples};
use crate::bench::sys::{self, tied, Output, Proc};
use crate::bench::watch::{flat, watched_pid, RssSeries};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Samples per second per CPU of both profiled phases.
pub const RATE_HZ: u64 = 999;

#[derive(Clone, Debug, Serialize)]
pub struct Profiled {
    pub tool: String,
    pub pid: u32,
    /// utime + stime over the load, in % of one core.
    pub cpu_pct: f64,
    /// Run time of the BPF sampler over the load (kernel statistics), in %
    /// of one core: charged to the sampled processes, not to `cpu_pct`.
    pub bpf_cpu_pct: f64,
    pub rss: RssSeries,
    pub rss_flat: bool,
    /// The daemon: alive (same pid) through the load and exit 0 on SIGTERM;
    /// record: alive through the load, then exit 0 at the end of its duration.
    pub stayed_up: bool,
    pub exit: String,
    pub samples: f64,
    /// Walks ended by a failed read or a failed tail call.
    pub walk_errors: f64,
    /// Failed reads by the step of the walk that failed, e.g. `tls 75`.
    pub read_errors_by_step: String,
    pub ringbuf_dropped: f64,
    /// Samples with an unknown frame in the profile.
    pub unknown_frames: u64,
    /// (walk errors + drops + unknown) / samples.
    pub error_share: f64,
    pub shown: Shown,
}

/// What the profiler is asked to watch, and how.
pub struct Target<'a> {
    pub pyebpf: &'a Path,
    pub dir: &'a Path,
    pub tag: &'a str,
    pub pids: &'a [u32],
    pub markers: &'a [Marker],
}

/// CPU of `pid` between two readings, as % of one core.
fn cpu_pct(before: Duration, after: Duration, wall: Duration) -> f64 {
    after.saturating_sub(before).as_secs_f64() / wall.as_secs_f64().max(1e-9) * 100.0
}

/// A profiler watched over the load: RSS each second, CPU, and whether it
/// was still running at the end.
struct Watched<T> {
    out: T,
    secs: f64,
    cpu_pct: f64,
    rss: RssSeries,
    alive: bool,
}

/// Runs `load` while watching profiler `pid` (a daemon's store metrics
/// through `api` when given); `exited` says whether the profiler ended.
fn watch<T>(
    pid: u32,
    api: Option<SocketAddr>,
    exited: impl Fn() -> bool,
    load: impl FnOnce() -> Result<T>,
) -> Result<Watched<T>> {
    let (cpu0, t0) = (sys::process_cpu(pid)?, Instant::now());
    let (out, points) = watched_pid(pid, api, load)?;
    let alive = !exited();
    let cpu1 = sys::process_cpu(pid).unwrap_or(cpu0);
    Ok(Watched {
        out,
        secs: t0.elapsed().as_secs_f64(),
        cpu_pct: cpu_pct(cpu0, cpu1, t0.elapsed()),
        rss: RssSeries::of(points)?,
        alive,
    })
}

/// A [`Profiled`] of what `w` measured, the rest zero until filled in.
fn base<T>(tool: &str, pid: u32, w: &Watched<T>, shown: Shown) -> Profiled {
    Profiled {
        tool: format!("pyebpf {tool} @ {RATE_HZ} Hz"),
        pid,
        cpu_pct: w.cpu_pct,
        bpf_cpu_pct: 0.0,
        rss: w.rss.clone(),
        rss_flat: flat(&w.rss),
        stayed_up: w.alive,
        exit: String::new(),
        samples: 0.0,
        walk_errors: 0.0,
        read_errors_by_step: String::new(),
        ringbuf_dropped: 0.0,
        unknown_frames: shown.unknown,
        error_share: 0.0,
        shown,
    }
}

fn finish(mut p: Profiled) -> Profiled {
    p.error_share =
        (p.walk_errors + p.ringbuf_dropped + p.unknown_frames as f64) / p.samples.max(1.0);
    p
}

/// The daemon's `aggregation.retention_secs` for a phase of `secs`: a
/// quarter of it (60 to 600, the default), so that in a long phase the
/// store is full well before the second half, where RSS is judged flat;
/// with the default 600 s it would still be filling at the end of a 600 s
/// phase, and its legitimate growth would hide a leak or fake one.
pub fn retention_secs(secs: u64) -> u64 {
    (secs / 4).clamp(60, 600)
}

/// Runs `load` (of `secs`) under a `pyebpf daemon` profiling `t.pids`.
pub fn daemon<T>(t: &Target, secs: u64, load: impl FnOnce() -> Result<T>) -> Result<(T, Profiled)> {
    let retention = retention_secs(secs);
    let d = Daemon::start_with(
        t.pyebpf,
        t.dir,
        &DaemonConfig {
            rate_hz: RATE_HZ,
            max_depth: 2048,
            ring_bytes: 8 << 20,
            tag: t.tag,
        },
        &format!("aggregation:\n  retention_secs: {retention}\n"),
    )?;
    // Forked workers are found by the daemon's /proc rescan (10 s by default).
    d.wait_profiled(t.pids, Duration::from_secs(40))?;
    let pid = d.proc.pid;
    let (m0, t0) = (d.metrics()?, Instant::now());
    let w = watch(pid, Some(d.addr), || d.proc.exited(), load)?;
    let wall = t0.elapsed();
    let m1 = d.metrics()?;
    // The load's seconds, at most the retention (the most /folded accepts).
    let window = (wall.as_secs() + 1).min(retention) as u32;
    let mut text = String::new();
    for &p in t.pids {
        text += &d
            .folded(p, window)
            .with_context(|| format!("/folded of {p}"))?;
        text.push('\n');
    }
    let stop = d.stop();
    let dm = |m: &str, l: &[(&str, &str)]| metric(&m1, m, l) - metric(&m0, m, l);
    let events = |o: &str| dm("pyebpf_bpf_events_total", &[("outcome", o)]);
    let shown = folded::shown(&text, t.markers);
    let p = Profiled {
        stayed_up: w.alive && stop.is_ok(),
        exit: match (&stop, w.alive) {
            (Ok(_), true) => "alive through the load; exit 0 on SIGTERM".into(),
            (_, false) => "EXITED during the load".into(),
            (Err(e), true) => format!("alive through the load; then {e:#}"),
        },
        samples: dm("pyebpf_samples_received_total", &[]),
        walk_errors: events("read_failed") + events("tail_call_failed"),
        read_errors_by_step: steps(&m0, &m1),
        ringbuf_dropped: dm("pyebpf_ringbuf_dropped_samples_total", &[]),
        bpf_cpu_pct: dm("pyebpf_bpf_run_time_seconds_total", &[]) / w.secs.max(1e-9) * 100.0,
        ..base("daemon", pid, &w, shown)
    };
    unknown_lookups(&m0, &m1);
    Ok((w.out, finish(p)))
}

/// `pyebpf_bpf_read_errors_total` between two scrapes, by step, e.g.
/// `tls 75, bad_frame 3` (steps without errors left out).
fn steps(m0: &Samples, m1: &Samples) -> String {
    let name = "pyebpf_bpf_read_errors_total";
    let mut out = Vec::new();
    for (n, labels, _) in m1 {
        let Some((_, step)) = labels.iter().find(|(k, _)| k == "step") else {
            continue;
        };
        if n != name {
            continue;
        }
        let l = [("step", step.as_str())];
        let d = metric(m1, name, &l) - metric(m0, name, &l);
        if d > 0.0 {
            out.push(format!("{step} {d}"));
        }
    }
    out.join(", ")
}

/// Logs the daemon's own count of symbol lookups that gave an unknown
/// frame (per distinct stack, not per sample: the profile's count is the
/// one judged).
fn unknown_lookups(m0: &Samples, m1: &Samples) {
    let n: f64 = ["stale", "unreadable", "invalid"]
        .iter()
        .map(|r| {
            let l = [("result", *r)];
            metric(m1, "pyebpf_symbol_cache_total", &l)
                - metric(m0, "pyebpf_symbol_cache_total", &l)
        })
        .sum();
    println!("  daemon: {n} code object lookups gave an unknown frame");
}

/// The number after `label` in `text`.
fn number_after(text: &str, label: &str) -> Option<f64> {
    let rest = text.split_once(label)?.1.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Runs `load` under `pyebpf record` of `t.pids` for `secs` (plus a margin).
pub fn record<T>(t: &Target, secs: u64, load: impl FnOnce() -> Result<T>) -> Result<(T, Profiled)> {
    let output = t.dir.join("record.folded");
    let mut c = Command::new(t.pyebpf);
    c.arg("record");
    for p in t.pids {
        c.arg("--pid").arg(p.to_string());
    }
    // The margin covers the start-up before the load begins.
    c.arg("--rate")
        .arg(RATE_HZ.to_string())
        .arg("--duration")
        .arg((secs + 5).to_string())
        .args(["--format", "folded", "--quiet", "--output"])
        .arg(&output)
        .env_remove("PYEBPF_LOG");
    let mut p = Proc::spawn(tied(c), "pyebpf record", Output::Both, false)?;
    sys::wait_sampler_running(&mut p, Duration::from_secs(30))?;
    let pid = p.pid;
    let w = watch(pid, None, || p.exited(), load)?;
    let (code, _) = p.wait_rusage(Duration::from_secs(secs + 120))?;
    let summary = p.tail();
    if code != 0 {
        bail!("pyebpf record exited with {code}:\n{summary}");
    }
    let text = std::fs::read_to_string(&output)
        .with_context(|| format!("reading {}", output.display()))?;
    let shown = folded::shown(&text, t.markers);
    let n = |label: &str| number_after(&summary, label).unwrap_or(0.0);
    let p = Profiled {
        exit: if w.alive {
            "alive through the load; exit 0 at the end of --duration".into()
        } else {
            "EXITED during the load".into()
        },
        samples: n("process(es), "),
        walk_errors: n("partial (read failed): ") + n("tail-call failures: "),
        read_errors_by_step: summary
            .lines()
            .find_map(|l| l.trim().strip_prefix("read failures by step: "))
            .unwrap_or_default()
            .to_string(),
        ringbuf_dropped: n("ring buffer full (dropped): "),
        // Over the whole recording, which lasts a few seconds longer than the load.
        bpf_cpu_pct: n("ns per perf event, ") / 1e3 / w.secs.max(1e-9) * 100.0,
        ..base("record", pid, &w, shown)
    };
    println!("{summary}");
    Ok((w.out, finish(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_summary_numbers() {
        let s = "pyebpf record: 12.0 s, 6 process(es), 23456 samples (80 distinct stacks) written to x (folded)\n\
                 \x20 truncated at --max-depth 2048: 0   partial (read failed): 12   ring buffer full (dropped): 0\n\
                 \x20 threads without Python state: 3   unknown frames: 1 (code object replaced: 0)   tail-call failures: 2   bad records: 0\n";
        assert_eq!(number_after(s, "process(es), "), Some(23456.0));
        assert_eq!(number_after(s, "partial (read failed): "), Some(12.0));
        assert_eq!(number_after(s, "tail-call failures: "), Some(2.0));
        assert_eq!(number_after(s, "nope"), None);
        let cost = "  BPF cost (kernel stats): 12.3 us per stack sent, 3905 ns per perf event, 132.4 ms in total\n";
        assert_eq!(number_after(cost, "ns per perf event, "), Some(132.4));
    }
}
