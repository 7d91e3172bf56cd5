//! A `pyebpf daemon` under test: started with a configuration that profiles
//! only the benchmark's own processes (a command-line tag), read through
//! its HTTP API.

use super::sys::{self, Output, Proc};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// One HTTP/1.0 GET (so the body is never chunked): status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no HTTP header in the answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {path}: bad status line"))?;
    Ok((status, body.to_string()))
}

/// Prometheus text: `(name, labels, value)` per sample line.
pub type Samples = Vec<(String, Vec<(String, String)>, f64)>;

pub fn parse_metrics(text: &str) -> Samples {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Vec::new()),
            Some((n, rest)) => (n.to_string(), parse_labels(rest.trim_end_matches('}'))),
        };
        out.push((name, labels, value));
    }
    out
}

/// `a="x",b="y\"z"` (escapes kept simple: `\"`, `\\`, `\n`).
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            break;
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(o) => val.push(o),
                    None => break,
                },
                '"' => break,
                o => val.push(o),
            }
        }
        out.push((key.trim_start_matches(',').trim().to_string(), val));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

/// Sum of every series of `name` whose labels include `labels`.
pub fn metric(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(k2, v2)| k2 == k && v2 == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// The daemon's counters at one moment, with its CPU time.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub at: Instant,
    pub threads: HashMap<u32, u64>,
    pub metrics: Samples,
}

impl Snapshot {
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.metrics, name, labels)
    }
    pub fn events(&self, outcome: &str) -> f64 {
        self.get("pyebpf_bpf_events_total", &[("outcome", outcome)])
    }
}

/// What happened between two snapshots.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Delta {
    pub seconds: f64,
    /// Daemon CPU (user + system, all threads).
    pub cpu_s: f64,
    /// Kernel-measured run time of the BPF sampler.
    pub bpf_s: f64,
    /// BPF program runs (perf events on every CPU).
    pub bpf_runs: f64,
    /// Stacks sent to userspace.
    pub sampled: f64,
    pub not_profiled: f64,
    pub no_thread_state: f64,
    pub truncated: f64,
    pub read_failed: f64,
    pub ringbuf_full: f64,
    pub tail_call_failed: f64,
    pub received: f64,
}

pub fn delta(a: &Snapshot, b: &Snapshot) -> Delta {
    let d = |f: &dyn Fn(&Snapshot) -> f64| f(b) - f(a);
    Delta {
        seconds: (b.at - a.at).as_secs_f64(),
        cpu_s: sys::cpu_between(&a.threads, &b.threads).as_secs_f64(),
        bpf_s: d(&|s| s.get("pyebpf_bpf_run_time_seconds_total", &[])),
        bpf_runs: d(&|s| s.get("pyebpf_bpf_run_count_total", &[])),
        sampled: d(&|s| s.events("sampled")),
        not_profiled: d(&|s| s.events("not_profiled")),
        no_thread_state: d(&|s| s.events("no_thread_state")),
        truncated: d(&|s| s.events("truncated")),
        read_failed: d(&|s| s.events("read_failed")),
        ringbuf_full: d(&|s| s.events("ringbuf_full")),
        tail_call_failed: d(&|s| s.events("tail_call_failed")),
        received: d(&|s| s.get("pyebpf_samples_received_total", &[])),
    }
}

/// Settings of one daemon run.
pub struct DaemonConfig<'a> {
    pub rate_hz: u64,
    pub max_depth: u32,
    pub ring_bytes: u32,
    /// Regex on the command line of the processes to profile.
    pub tag: &'a str,
}

pub struct Daemon {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Daemon {
    pub fn start(pyebpf: &Path, dir: &Path, c: &DaemonConfig) -> Result<Daemon> {
        Daemon::start_with(pyebpf, dir, c, "")
    }

    /// [`Self::start`] with `extra` YAML (whole top-level sections) appended.
    pub fn start_with(pyebpf: &Path, dir: &Path, c: &DaemonConfig, extra: &str) -> Result<Daemon> {
        let config = dir.join("daemon.yaml");
        // Everything else stays at its default: the daemon as deployed.
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:0\n\
                 sampling:\n  rate_hz: {}\n  max_depth: {}\n  ring_buffer_bytes: {}\n\
                 discovery:\n  include:\n    - cmdline: '{}'\n\
                 logging:\n  format: json\n  level: info\n{extra}",
                c.rate_hz, c.max_depth, c.ring_bytes, c.tag
            ),
        )?;
        let mut cmd = Command::new(pyebpf);
        cmd.arg("daemon").arg("--config").arg(&config);
        Daemon::launch(sys::tied(cmd))
    }

    /// Starts `cmd` (a `pyebpf daemon` command line) and waits until its
    /// API answers `/readyz`.
    pub fn launch(mut cmd: Command) -> Result<Daemon> {
        cmd.env_remove("PYEBPF_LOG");
        let mut proc = Proc::spawn(cmd, "pyebpf daemon", Output::Stderr, false)?;
        let line = proc.wait_line("HTTP API on http://", Duration::from_secs(30))?;
        let addr = line
            .split("http://")
            .nth(1)
            .map(|s| {
                s.chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect::<String>()
            })
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no address in {line:?}"))?;
        let d = Daemon { proc, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(d.addr, "/readyz") {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!("the daemon did not become ready");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metrics(&self) -> Result<Samples> {
        let (status, body) = http_get(self.addr, "/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(parse_metrics(&body))
    }

    /// A snapshot taken right after the daemon's once-a-second refresh of
    /// its BPF metrics (found by polling, so take it before a window).
    pub fn aligned_snapshot(&self) -> Result<Snapshot> {
        let first = self.metrics()?;
        let runs = metric(&first, "pyebpf_bpf_run_count_total", &[]);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            thread::sleep(Duration::from_millis(25));
            // Take the CPU reading first: it must not include this scrape.
            let threads = sys::thread_cpu(self.proc.pid);
            let at = Instant::now();
            let m = self.metrics()?;
            if metric(&m, "pyebpf_bpf_run_count_total", &[]) != runs || Instant::now() > deadline {
                return Ok(Snapshot {
                    at,
                    threads,
                    metrics: m,
                });
            }
        }
    }

    /// A snapshot `whole_secs` refreshes after `a` (an [`Self::aligned_snapshot`]),
    /// with a single scrape, so that the window holds no polling: the
    /// counters of the two cover exactly `whole_secs` seconds.
    pub fn snapshot_after(&self, a: &Snapshot, whole_secs: u32) -> Result<Snapshot> {
        let due = a.at + Duration::from_secs(u64::from(whole_secs)) + Duration::from_millis(100);
        thread::sleep(due.saturating_duration_since(Instant::now()));
        let threads = sys::thread_cpu(self.proc.pid);
        let at = Instant::now();
        Ok(Snapshot {
            at,
            threads,
            metrics: self.metrics()?,
        })
    }

    /// Pids the daemon reports as profiled.
    pub fn profiled(&self) -> Result<Vec<u32>> {
        let (status, body) = http_get(self.addr, "/processes")?;
        if status != 200 {
            bail!("/processes answered {status}");
        }
        let v: serde_json::Value = serde_json::from_str(&body).context("/processes JSON")?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p["status"] == "profiled")
                    .filter_map(|p| p["labels"]["pid"].as_u64().map(|x| x as u32))
                    .collect()
            })
            .unwrap_or_default())
    }

    pub fn wait_profiled(&self, pids: &[u32], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.profiled()?;
            if pids.iter().all(|p| have.contains(p)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not profile {:?} within {timeout:?} (profiled: {have:?})",
                    pids.iter()
                        .filter(|p| !have.contains(p))
                        .collect::<Vec<_>>()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/folded` of one process over the last `seconds`.
    pub fn folded(&self, pid: u32, seconds: u32) -> Result<String> {
        let (status, body) = http_get(self.addr, &format!("/folded?pid={pid}&seconds={seconds}"))?;
        if status != 200 {
            bail!("/folded answered {status}: {body}");
        }
        Ok(body)
    }

    /// SIGTERM and wait: the daemon's whole-life CPU time.
    pub fn stop(mut self) -> Result<Duration> {
        let (code, cpu) = self
            .proc
            .stop(libc::SIGTERM, Duration::from_secs(20))
            .context("stopping the daemon")?;
        if code != 0 {
            bail!("the daemon exited with {code}:\n{}", self.proc.tail());
        }
        Ok(cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text() {
        let t = "# HELP x y\n# TYPE pyebpf_bpf_events_total counter\n\
                 pyebpf_bpf_events_total{outcome=\"sampled\"} 42\n\
                 pyebpf_bpf_events_total{outcome=\"ringbuf_full\"} 0\n\
                 pyebpf_function_samples{pid=\"1\",function=\"a,\\\"b\\\"\",file=\"/x.py\"} 3\n\
                 pyebpf_bpf_run_time_seconds_total 0.0125\n";
        let m = parse_metrics(t);
        assert_eq!(
            metric(&m, "pyebpf_bpf_events_total", &[("outcome", "sampled")]),
            42.0
        );
        assert_eq!(metric(&m, "pyebpf_bpf_events_total", &[]), 42.0);
        assert_eq!(metric(&m, "pyebpf_bpf_run_time_seconds_total", &[]), 0.0125);
        assert_eq!(
            metric(
                &m,
                "pyebpf_function_samples",
                &[("function", "a,\"b\""), ("file", "/x.py")]
            ),
            3.0
        );
        assert_eq!(metric(&m, "nope", &[]), 0.0);
    }
}
