//! The load: `wrk` with the soak's Lua script, run as consecutive segments
//! so that a phase's latency comes with its own spread.

use crate::bench::stats::Summary;
use crate::bench::sys::tied;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

/// Fixed shape of the load (the same in every phase).
#[derive(Clone, Debug, Serialize)]
pub struct LoadShape {
    pub threads: usize,
    pub connections: usize,
    /// Pause of a connection between its requests (the script's `delay()`):
    /// keeps the load below saturation, so latency is service time rather
    /// than queueing behind a full CPU.
    pub pause_ms: u32,
    pub segments: usize,
}

/// One wrk run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Segment {
    pub seconds: f64,
    pub requests: u64,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
    /// CPU used by processes outside the soak during the segment, in % of
    /// one core (see [`super::busy`]); for the phase, the median.
    pub other_cpu_pct: f64,
}

/// A phase's segments, and all of them together.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Load {
    pub segments: Vec<Segment>,
    /// Seconds, requests and errors summed; rate and latencies the
    /// medians of the segments'.
    pub all: Segment,
}

impl Load {
    fn of(segments: Vec<Segment>) -> Load {
        let median = |f: fn(&Segment) -> f64| {
            Summary::of(&segments.iter().map(f).collect::<Vec<_>>()).map_or(0.0, |s| s.median)
        };
        let all = Segment {
            seconds: segments.iter().map(|s| s.seconds).sum(),
            requests: segments.iter().map(|s| s.requests).sum(),
            requests_per_s: median(|s| s.requests_per_s),
            p50_ms: median(|s| s.p50_ms),
            p99_ms: median(|s| s.p99_ms),
            non_2xx: segments.iter().map(|s| s.non_2xx).sum(),
            socket_errors: segments.iter().map(|s| s.socket_errors).sum(),
            other_cpu_pct: median(|s| s.other_cpu_pct),
        };
        Load { segments, all }
    }
}

/// `4.80ms` -> 4.8 (wrk's units: us, ms, s, m, h).
fn millis(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(n * scale)
}

/// The figures of one `wrk --latency` output.
pub fn parse(text: &str, seconds: f64) -> Result<Segment> {
    let mut s = Segment {
        seconds,
        ..Segment::default()
    };
    let (mut p50, mut p99, mut rps) = (None, None, None);
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => p50 = millis(v),
            ["99%", v] => p99 = millis(v),
            ["Requests/sec:", v] => rps = v.parse().ok(),
            [n, "requests", "in", ..] => s.requests = n.parse().context("request count")?,
            ["Non-2xx", "or", "3xx", "responses:", n] => s.non_2xx = n.parse()?,
            ["Socket", "errors:", rest @ ..] => {
                // connect N, read N, write N, timeout N
                s.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    match (p50, p99, rps) {
        (Some(a), Some(b), Some(r)) => {
            s.p50_ms = a;
            s.p99_ms = b;
            s.requests_per_s = r;
            Ok(s)
        }
        _ => bail!("wrk printed no latency distribution or rate:\n{text}"),
    }
}

/// `wrk` on PATH, or an error saying how to get it.
pub fn check_installed() -> Result<()> {
    crate::util::which("wrk")
        .context("wrk is not installed: `apt-get install wrk` (or `cargo xtask bootstrap`)")?;
    Ok(())
}

/// Runs `shape.segments` wrk runs of `seg_secs` each against `addr`.
pub fn run(addr: SocketAddr, script: &Path, shape: &LoadShape, seg_secs: u64) -> Result<Load> {
    let mut segments = Vec::with_capacity(shape.segments);
    for i in 0..shape.segments {
        segments.push(
            segment(addr, script, shape, seg_secs)
                .with_context(|| format!("wrk segment {} of {}", i + 1, shape.segments))?,
        );
    }
    Ok(Load::of(segments))
}

/// One wrk run of `secs` seconds.
pub fn segment(addr: SocketAddr, script: &Path, shape: &LoadShape, secs: u64) -> Result<Segment> {
    let start = super::busy::Mark::now();
    let out = tied(Command::new("wrk"))
        .arg(format!("-t{}", shape.threads))
        .arg(format!("-c{}", shape.connections))
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(format!("http://{addr}/"))
        .arg("--")
        .arg(shape.pause_ms.to_string())
        .output()
        .context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut seg = parse(&text, secs as f64)?;
    if let (Some(a), Some(b)) = (start, super::busy::Mark::now()) {
        seg.other_cpu_pct = a.other_cpu_pct(&b);
    }
    Ok(seg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let t = "Running 10s test @ http://127.0.0.1:8080/\n  2 threads and 16 connections\n\
                 \x20 Latency Distribution\n     50%  480.00us\n     75%    6.00ms\n     99%   1.20s\n\
                 \x20 3000 requests in 10.01s, 400.00KB read\n\
                 \x20 Socket errors: connect 0, read 2, write 0, timeout 3\n\
                 \x20 Non-2xx or 3xx responses: 5\nRequests/sec:    299.70\n";
        let s = parse(t, 10.0).unwrap();
        assert_eq!(s.requests, 3000);
        assert!((s.p50_ms - 0.48).abs() < 1e-9 && (s.p99_ms - 1200.0).abs() < 1e-9);
        assert_eq!((s.non_2xx, s.socket_errors), (5, 5));
        assert!((s.requests_per_s - 299.7).abs() < 1e-9);
        assert!(parse("nothing", 1.0).is_err());
    }
}
