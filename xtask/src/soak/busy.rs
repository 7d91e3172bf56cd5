//! How busy the machine was outside the soak during a wrk segment: CPU used
//! by every process that is not this xtask or one of its descendants (the
//! service, the churn, wrk and the profiler). A latency verdict of a phase
//! that ran beside other work says little; this shows when that happened.

use std::collections::HashMap;
use std::time::Instant;

/// Clock ticks of CPU, machine-wide and of this process tree, at one moment.
pub struct Mark {
    at: Instant,
    machine: u64,
    tree: u64,
}

impl Mark {
    pub fn now() -> Option<Mark> {
        Some(Mark {
            at: Instant::now(),
            machine: machine_busy()?,
            tree: tree_ticks(std::process::id()),
        })
    }

    /// CPU of other processes since `self`, in % of one core.
    pub fn other_cpu_pct(&self, end: &Mark) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let secs = end.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let machine = end.machine.saturating_sub(self.machine);
        let tree = end.tree.saturating_sub(self.tree);
        (machine.saturating_sub(tree) as f64 / hz / secs * 100.0).max(0.0)
    }
}

/// Busy ticks of all CPUs (the first line of `/proc/stat` without idle and
/// iowait; guest time is already inside user).
fn machine_busy() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(get(0) + get(1) + get(2) + get(5) + get(6) + get(7))
}

/// (ppid, utime + stime, cutime + cstime) of one `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(u32, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((n(1)? as u32, n(11)? + n(12)?, n(13)? + n(14)?))
}

/// Ticks used by `root` and its live descendants, and by the children they
/// have reaped (wrk runs end inside a segment and are waited for by us).
fn tree_ticks(root: u32) -> u64 {
    let mut procs: HashMap<u32, (u32, u64, u64)> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                if let Some(s) = stat(pid) {
                    procs.insert(pid, s);
                }
            }
        }
    }
    let in_tree = |mut pid: u32| {
        // Parent chains are short; the bound guards against a pid reused
        // into a loop while we read.
        for _ in 0..64 {
            if pid == root {
                return true;
            }
            match procs.get(&pid) {
                Some(&(ppid, _, _)) if ppid != 0 => pid = ppid,
                _ => return false,
            }
        }
        false
    };
    procs
        .iter()
        .filter(|(pid, _)| in_tree(**pid))
        .map(|(pid, &(_, own, reaped))| own + if *pid == root { reaped } else { 0 })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaped_children_count_as_the_tree() {
        let before = tree_ticks(std::process::id());
        // A child that burns about 0.4 s of CPU, then is reaped by us: its
        // time must move into our tree's ticks (as wrk's does).
        let st = std::process::Command::new("sh")
            .args([
                "-c",
                "end=$(($(date +%s%N) + 400000000)); while [ $(date +%s%N) -lt $end ]; do :; done",
            ])
            .status()
            .expect("sh");
        assert!(st.success());
        let grown = tree_ticks(std::process::id()) - before;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        assert!(grown >= hz / 10, "{grown} ticks");
        let (a, b) = (Mark::now().expect("stat"), Mark::now().expect("stat"));
        assert!(a.other_cpu_pct(&b) >= 0.0);
    }
}
