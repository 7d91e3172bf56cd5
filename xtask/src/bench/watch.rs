//! A process's RSS sampled over a run (and, for a daemon, its store
//! metrics), with a verdict on whether it stays flat.

use super::daemon::{http_get, metric, parse_metrics, Daemon, Samples};
use super::stats::Summary;
use super::sys;
use anyhow::{bail, Result};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const MIB: f64 = 1048576.0;

/// A rise of RSS within one second worth naming.
pub const STEP_MIB: f64 = 4.0;

/// One reading of the watched process, once a second (the store figures
/// are zero for a process that is not a daemon).
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub t: f64,
    pub rss_mib: f64,
    /// `pyebpf_store_bytes` over every kind.
    pub store_mib: f64,
    pub evicted: f64,
    pub overflowed: f64,
    pub received: f64,
}

/// Runs `body` while a thread reads the daemon's RSS and store metrics every second.
pub fn watched<T>(d: &Daemon, body: impl FnOnce() -> Result<T>) -> Result<(T, Vec<Point>)> {
    watched_pid(d.proc.pid, Some(d.addr), body)
}

/// Runs `body` while a thread reads the RSS of `pid` every second, and the
/// store metrics of the daemon at `api` when given (zero otherwise).
pub fn watched_pid<T>(
    pid: u32,
    api: Option<SocketAddr>,
    body: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<Point>)> {
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let h = s.spawn(|| {
            let start = Instant::now();
            let mut out = Vec::new();
            let mut next = start;
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    if let Ok((rss, _)) = sys::rss(pid) {
                        let m = api.and_then(|a| metrics_at(a).ok()).unwrap_or_default();
                        out.push(Point {
                            t: start.elapsed().as_secs_f64(),
                            rss_mib: rss as f64 / MIB,
                            store_mib: metric(&m, "pyebpf_store_bytes", &[]) / MIB,
                            evicted: metric(&m, "pyebpf_store_evicted_samples_total", &[]),
                            overflowed: metric(&m, "pyebpf_stacks_overflowed_total", &[]),
                            received: metric(&m, "pyebpf_samples_received_total", &[]),
                        });
                    }
                    next += Duration::from_secs(1);
                }
                thread::sleep(Duration::from_millis(20));
            }
            out
        });
        let r = body();
        stop.store(true, Ordering::Relaxed);
        let points = h.join().unwrap_or_default();
        r.map(|v| (v, points))
    })
}

pub fn metrics_at(addr: SocketAddr) -> Result<Samples> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(parse_metrics(&body))
}

/// Least-squares slope of `(x, y)`; 0 for fewer than two points.
pub fn slope(xy: &[(f64, f64)]) -> f64 {
    let n = xy.len() as f64;
    if xy.len() < 2 {
        return 0.0;
    }
    let mx = xy.iter().map(|p| p.0).sum::<f64>() / n;
    let my = xy.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = xy.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = xy.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

/// RSS over a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RssSeries {
    pub start_mib: f64,
    pub p50_mib: f64,
    pub max_mib: f64,
    pub end_mib: f64,
    /// Of a linear fit over the second half of the run.
    pub slope_mib_per_min: f64,
    pub store_max_mib: f64,
    pub store_end_mib: f64,
    /// Slope of RSS minus the store's bytes over the second half: growth the
    /// budgets do not cover (the store may grow legitimately until its
    /// retention is full).
    pub nonstore_slope_mib_per_min: f64,
    /// (seconds into the run, MiB) of each rise of at least [`STEP_MIB`]
    /// from one reading to the next: sudden allocations, to be matched with
    /// what the daemon does then (window closes every `window_secs`).
    pub steps: Vec<(f64, f64)>,
    pub points: Vec<Point>,
}

impl RssSeries {
    pub fn of(points: Vec<Point>) -> Result<RssSeries> {
        let (Some(first), Some(last)) = (points.first(), points.last()) else {
            bail!("no RSS readings of the daemon");
        };
        let rss: Vec<f64> = points.iter().map(|p| p.rss_mib).collect();
        let half: Vec<(f64, f64)> = points[points.len() / 2..]
            .iter()
            .map(|p| (p.t / 60.0, p.rss_mib))
            .collect();
        Ok(RssSeries {
            start_mib: first.rss_mib,
            p50_mib: Summary::of(&rss).map_or(0.0, |s| s.median),
            max_mib: rss.iter().copied().fold(0.0, f64::max),
            end_mib: last.rss_mib,
            slope_mib_per_min: slope(&half),
            steps: points
                .windows(2)
                .filter(|w| w[1].rss_mib - w[0].rss_mib >= STEP_MIB)
                .map(|w| (w[1].t, w[1].rss_mib - w[0].rss_mib))
                .collect(),
            nonstore_slope_mib_per_min: slope(
                &points[points.len() / 2..]
                    .iter()
                    .map(|p| (p.t / 60.0, p.rss_mib - p.store_mib))
                    .collect::<Vec<_>>(),
            ),
            store_max_mib: points.iter().map(|p| p.store_mib).fold(0.0, f64::max),
            store_end_mib: last.store_mib,
            points,
        })
    }
}

/// A flat RSS: under this growth per minute over the second half, or (in
/// runs too short for a slope to mean much) under 1 MiB of fitted growth
/// over the second half.
pub const FLAT_MIB_PER_MIN: f64 = 1.0;

pub fn flat(r: &RssSeries) -> bool {
    let half_min = r.points.last().map_or(0.0, |p| p.t) / 2.0 / 60.0;
    r.slope_mib_per_min < FLAT_MIB_PER_MIN || r.slope_mib_per_min * half_min < 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit() {
        let xy: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 + 2.0 * i as f64)).collect();
        assert!((slope(&xy) - 2.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 1.0)]), 0.0);
    }
}
