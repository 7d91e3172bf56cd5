//! `cargo xtask bench --self-profile`: where pyebpf's own daemon spends its
//! CPU. Runs the throughput workload (busy Python processes) under the
//! daemon at a high rate, samples the daemon with `perf record` (DWARF call
//! graphs: release builds keep no frame pointers), and writes a flamegraph
//! and the folded stacks, then prints the functions with most self time.

use super::daemon::{Daemon, DaemonConfig};
use super::{sys, Ctx};
use crate::util::{cmd, which};
use anyhow::{bail, Context, Result};
use inferno::collapse::Collapse;
use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Daemon rate, busy processes and seconds sampled.
const RATE_HZ: u64 = 4999;
const PROCESSES: usize = 4;
const SECONDS: u32 = 10;

pub fn run(ctx: &Ctx, out: &Path) -> Result<()> {
    ensure_perf()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let workers: Vec<sys::Proc> = (0..PROCESSES)
        .map(|_| ctx.scenario(&["recurse:50".to_string()]))
        .collect::<Result<_>>()?;
    let pids: Vec<u32> = workers.iter().map(|w| w.pid).collect();
    let d = Daemon::start(
        &ctx.pyebpf,
        &ctx.dir,
        &DaemonConfig {
            rate_hz: RATE_HZ,
            max_depth: 2048,
            ring_bytes: 8 << 20,
            tag: &ctx.tag,
        },
    )?;
    d.wait_profiled(&pids, Duration::from_secs(30))?;
    sys::sleep_secs(1.0);
    let data = ctx.scratch("perf.data");
    println!(
        "perf record of the daemon (pid {}) for {SECONDS} s, {PROCESSES} busy processes at {RATE_HZ} Hz",
        d.proc.pid
    );
    let status = Command::new("perf")
        .args([
            "record",
            "-q",
            "-F",
            "997",
            "--call-graph",
            "dwarf,16384",
            "-o",
        ])
        .arg(&data)
        .args([
            "-p",
            &d.proc.pid.to_string(),
            "--",
            "sleep",
            &SECONDS.to_string(),
        ])
        .stdout(Stdio::null())
        .status()
        .context("running perf record")?;
    d.stop()?;
    drop(workers);
    if !status.success() {
        bail!("perf record failed ({status})");
    }
    let script = Command::new("perf")
        .args(["script", "-i"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running perf script")?;
    let stdout = script.stdout.context("perf script output")?;
    let mut folded = Vec::new();
    inferno::collapse::perf::Folder::default()
        .collapse(BufReader::new(stdout), &mut folded)
        .context("folding perf script output")?;
    let folded = String::from_utf8_lossy(&folded).into_owned();
    std::fs::write(out.join("daemon.folded"), &folded)?;
    let svg = std::fs::File::create(out.join("daemon.svg"))?;
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = format!("pyebpf daemon, {PROCESSES} busy processes at {RATE_HZ} Hz");
    inferno::flamegraph::from_lines(&mut opts, folded.lines(), svg)
        .context("drawing the flamegraph")?;
    println!(
        "wrote {} and {}",
        out.join("daemon.svg").display(),
        out.join("daemon.folded").display()
    );
    // perf's folded counts are weighted by the sample period (ns of CPU).
    let (total, top) = self_time(&folded, 20);
    println!(
        "\nself time of the daemon ({:.0} ms sampled), top {}:",
        total as f64 / 1e6,
        top.len()
    );
    for (name, n) in top {
        println!("{:>6.1}%  {name}", 100.0 * n as f64 / total.max(1) as f64);
    }
    Ok(())
}

/// Samples per leaf function, most first.
fn self_time(folded: &str, k: usize) -> (u64, Vec<(String, u64)>) {
    let mut by_leaf: HashMap<&str, u64> = HashMap::new();
    let mut total = 0;
    for line in folded.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        let leaf = stack.rsplit(';').next().unwrap_or(stack);
        *by_leaf.entry(leaf).or_default() += n;
        total += n;
    }
    let mut v: Vec<(String, u64)> = by_leaf
        .into_iter()
        .map(|(l, n)| (l.to_string(), n))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(k);
    (total, v)
}

/// perf is Debian's `linux-perf`; installed on first use.
fn ensure_perf() -> Result<()> {
    if which("perf").is_some() && cmd("perf", &["--version"]).probe().is_some() {
        return Ok(());
    }
    println!("installing linux-perf (for perf record)");
    cmd("apt-get", &["update"]).run()?;
    cmd(
        "apt-get",
        &["install", "-y", "--no-install-recommends", "linux-perf"],
    )
    .run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_time_sums_leaves() {
        let folded = "main;a;b 3\nmain;c;b 2\nmain;a 4\nbad line\n";
        let (total, top) = self_time(folded, 2);
        assert_eq!(total, 9);
        assert_eq!(top, vec![("b".to_string(), 5), ("a".to_string(), 4)]);
    }
}
