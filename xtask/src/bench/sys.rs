//! Processes for the benchmark: spawning with line-wise output, CPU time,
//! memory, and the kernel's BPF run statistics of a process's programs.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// A child process killed and reaped on drop, with its stdout (and, when
/// asked, stderr) delivered line by line.
pub struct Proc {
    child: Option<Child>,
    pub pid: u32,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every line seen so far, for error messages.
    seen: Vec<String>,
    what: String,
}

/// Which streams of a child [`Proc`] reads (the others go to /dev/null).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
    Both,
}

impl Proc {
    pub fn spawn(mut cmd: Command, what: &str, output: Output, stdin: bool) -> Result<Proc> {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() });
        let (out, err) = match output {
            Output::Stdout => (Stdio::piped(), Stdio::null()),
            Output::Stderr => (Stdio::null(), Stdio::piped()),
            Output::Both => (Stdio::piped(), Stdio::piped()),
        };
        cmd.stdout(out).stderr(err);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let (tx, rx) = channel();
        if let Some(s) = child.stdout.take() {
            let tx = tx.clone();
            thread::spawn(move || {
                for l in BufReader::new(s).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
        }
        if let Some(s) = child.stderr.take() {
            thread::spawn(move || {
                for l in BufReader::new(s).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
        }
        Ok(Proc {
            pid: child.id(),
            stdin: child.stdin.take(),
            child: Some(child),
            lines: rx,
            seen: Vec::new(),
            what: what.to_string(),
        })
    }

    /// Waits for a line containing `needle`; returns it.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return Ok(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let tail = self.tail();
                    bail!(
                        "{} printed no line with {needle:?} within {timeout:?}; output:\n{}",
                        self.what,
                        tail
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let tail = self.tail();
                    bail!(
                        "{} closed its output before printing {needle:?}; output:\n{}",
                        self.what,
                        tail
                    )
                }
            }
        }
    }

    /// The last lines seen (for errors).
    pub fn tail(&mut self) -> String {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        let n = self.seen.len();
        self.seen[n.saturating_sub(20)..].join("\n")
    }

    pub fn write_line(&mut self, line: &str) -> Result<()> {
        let s = self.stdin.as_mut().context("stdin not piped")?;
        writeln!(s, "{line}")?;
        s.flush()?;
        Ok(())
    }

    /// Whether the child has ended, without reaping it (so that
    /// [`Self::wait_rusage`] still gets its resource usage).
    pub fn exited(&self) -> bool {
        if self.child.is_none() {
            return true;
        }
        // SAFETY: waitid with WNOWAIT on our own child; siginfo is plain data.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is set by waitid (0 when the child still runs).
        r == 0 && unsafe { info.si_pid() } != 0
    }

    pub fn signal(&self, sig: i32) {
        if self.child.is_some() {
            // SAFETY: kill(2) with a pid we spawned and have not reaped.
            unsafe { libc::kill(self.pid as i32, sig) };
        }
    }

    /// Waits for exit (sending SIGKILL after `timeout`), returning the exit
    /// status and the child's CPU time (user + system, all threads).
    pub fn wait_rusage(&mut self, timeout: Duration) -> Result<(i32, Duration)> {
        let Some(child) = self.child.take() else {
            bail!("{} already reaped", self.what);
        };
        let deadline = Instant::now() + timeout;
        let pid = child.id() as i32;
        loop {
            let mut status = 0;
            // SAFETY: plain wait4 on our own child; rusage is plain data.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
            if r == pid {
                let tv = |t: libc::timeval| {
                    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
                };
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    -libc::WTERMSIG(status)
                };
                // The Child must not be reaped again.
                std::mem::forget(child);
                return Ok((code, tv(ru.ru_utime) + tv(ru.ru_stime)));
            }
            if r < 0 {
                bail!("wait4 {}: {}", self.what, std::io::Error::last_os_error());
            }
            if Instant::now() > deadline {
                // SAFETY: see signal().
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps.
    pub fn stop(&mut self, sig: i32, grace: Duration) -> Result<(i32, Duration)> {
        self.signal(sig);
        self.wait_rusage(grace)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Makes the child die with the thread that spawns it (Ctrl-C, a panic, a
/// SIGKILL of the harness): spawn long-lived children from the main thread only.
pub fn tied(mut c: Command) -> Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// CPU time (user + system) of process `pid` so far, all its threads,
/// ended ones included, from `/proc/PID/stat` (clock ticks).
pub fn process_cpu(pid: u32) -> Result<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces): state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')').context("no command in stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad /proc/{pid}/stat"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(Duration::from_secs_f64((tick(11)? + tick(12)?) as f64 / hz))
}

/// CPU time of every thread of `pid` so far, per thread id, from
/// `/proc/PID/task/TID/schedstat` (nanoseconds on CPU, exact; `/proc/PID/stat`
/// only has clock ticks).
pub fn thread_cpu(pid: u32) -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
            if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
                out.insert(tid, ns);
            }
        }
    }
    out
}

/// CPU time used between two [`thread_cpu`] snapshots: threads present in
/// both count their difference, threads born in between count whole.
/// (Threads that ended in between lose their last part: idle pool threads.)
pub fn cpu_between(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> Duration {
    let ns: u64 = after
        .iter()
        .map(|(tid, a)| a.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum();
    Duration::from_nanos(ns)
}

/// `VmRSS` and `VmHWM` of a process, in bytes.
pub fn rss(pid: u32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Option<u64> {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Ok((
        field("VmRSS:").context("no VmRSS")?,
        field("VmHWM:").context("no VmHWM")?,
    ))
}

/// Kernel statistics of one BPF program, from `/proc/PID/fdinfo`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub prog_type: u32,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The BPF programs `pid` holds open, by program id (each counted once).
pub fn bpf_progs(pid: u32) -> HashMap<u32, ProgStats> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(s) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if let Some((id, st)) = parse_prog_fdinfo(&s) {
            out.insert(id, st);
        }
    }
    out
}

/// `(prog_id, stats)` of a BPF program fd's fdinfo; `None` for other fds.
pub fn parse_prog_fdinfo(text: &str) -> Option<(u32, ProgStats)> {
    let mut id = None;
    let mut st = ProgStats::default();
    let mut has_runtime = false;
    for l in text.lines() {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "prog_id" => id = v.parse().ok(),
            "prog_type" => st.prog_type = v.parse().ok()?,
            "run_time_ns" => {
                st.run_time_ns = v.parse().ok()?;
                has_runtime = true;
            }
            "run_cnt" => st.run_cnt = v.parse().ok()?,
            _ => {}
        }
    }
    // A link fd also shows prog_id, but no run statistics.
    if has_runtime {
        id.map(|i| (i, st))
    } else {
        None
    }
}

/// `BPF_PROG_TYPE_PERF_EVENT`.
pub const PROG_TYPE_PERF_EVENT: u32 = 7;

/// Total run time and count of the perf-event programs (the sampler) of `pid`.
pub fn sampler_stats(pid: u32) -> (u64, u64) {
    bpf_progs(pid)
        .values()
        .filter(|s| s.prog_type == PROG_TYPE_PERF_EVENT)
        .fold((0, 0), |(t, n), s| (t + s.run_time_ns, n + s.run_cnt))
}

/// Waits until the sampler of `p` (a pyebpf process) has run at least once:
/// it is attached.
pub fn wait_sampler_running(p: &mut Proc, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if sampler_stats(p.pid).1 > 0 {
            return Ok(());
        }
        if p.exited() {
            let tail = p.tail();
            bail!("pyebpf ended before its sampler ran:\n{tail}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let tail = p.tail();
    bail!(
        "the sampler of pyebpf (pid {}) did not run within {timeout:?} (are BPF stats enabled?):\n{tail}",
        p.pid
    )
}

/// The CPUs thread `tid` may run on.
pub fn affinity(tid: u32) -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; the kernel writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: as above.
    let r = unsafe { libc::sched_getaffinity(tid as libc::pid_t, size, &mut set) };
    (r == 0).then_some(set)
}

/// Restricts thread `tid` to `set` (see [`affinity`], [`cpu_set`]).
pub fn set_affinity(tid: u32, set: &libc::cpu_set_t) -> Result<()> {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a valid cpu_set_t of `size` bytes.
    if unsafe { libc::sched_setaffinity(tid as libc::pid_t, size, set) } != 0 {
        bail!(
            "sched_setaffinity({tid}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The set of just `cpu`.
pub fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data, all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET bounds-checks `cpu` against the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// `MemTotal` of `/proc/meminfo`, in KiB (0 when unreadable).
pub fn mem_total_kb() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

pub fn sleep_secs(s: f64) {
    thread::sleep(Duration::from_secs_f64(s));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prog_fdinfo() {
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nprog_type:\t7\n\
                    prog_jited:\t1\nprog_tag:\tabc\nmemlock:\t4096\nprog_id:\t238\n\
                    run_time_ns:\t525850\nrun_cnt:\t380\nrecursion_misses:\t0\n";
        assert_eq!(
            parse_prog_fdinfo(prog),
            Some((
                238,
                ProgStats {
                    prog_type: 7,
                    run_time_ns: 525_850,
                    run_cnt: 380
                }
            ))
        );
        let link = "pos:\t0\nlink_type:\tperf\nlink_id:\t3\nprog_tag:\tabc\nprog_id:\t238\n";
        assert_eq!(parse_prog_fdinfo(link), None);
        assert_eq!(parse_prog_fdinfo("pos:\t0\nflags:\t0\n"), None);
    }

    #[test]
    fn cpu_between_handles_new_and_gone_threads() {
        let a = HashMap::from([(1, 100), (2, 50), (3, 10)]);
        let b = HashMap::from([(1, 160), (2, 50), (4, 7)]);
        assert_eq!(cpu_between(&a, &b), Duration::from_nanos(67));
    }

    #[test]
    fn affinity_round_trip() {
        let tid = unsafe { libc::gettid() } as u32;
        let before = affinity(tid).unwrap();
        set_affinity(tid, &cpu_set(0)).unwrap();
        let now = affinity(tid).unwrap();
        assert!(unsafe { libc::CPU_ISSET(0, &now) } && unsafe { libc::CPU_COUNT(&now) } == 1);
        set_affinity(tid, &before).unwrap();
    }

    #[test]
    fn own_process_is_measurable() {
        let pid = std::process::id();
        assert!(!thread_cpu(pid).is_empty());
        let (rss, hwm) = rss(pid).unwrap();
        assert!(rss > 0 && hwm >= rss);
    }
}
