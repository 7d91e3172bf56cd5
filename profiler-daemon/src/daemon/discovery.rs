//! Finding the processes to profile: the pids in `/proc`, and a [`Tracker`]
//! that remembers what was decided for each process so that a periodic
//! rescan only inspects new ones.
//!
//! A process is identified by its pid *and* its start time, so a reused pid is
//! a new process. A scan costs one read of `/proc/PID/stat` per pid; only new
//! processes (and retries that are due) are handed to the caller to inspect.
//!
//! The daemon's loop:
//!
//! ```text
//! let pids = list_pids();
//! for c in tracker.new_candidates(&pids) { handle(c) }   // every scan
//! for c in tracker.due_retries(now) { handle(c) }        // also between scans,
//!                                                        // at tracker.next_retry()
//! tracker.prune(&pids.iter().copied().collect());
//! for c in tracker.take_ended() { stop profiling c }
//!
//! handle(c): match inspect_candidate(c, &rules, cache) {    // rules first, then ELF
//!     Ok(Excluded) => tracker.mark(c, Seen::Excluded),
//!     Ok(Python(p)) => rules again → tracker.mark(c, Seen::Profiled / Seen::Excluded),
//!     Ok(Reused) => tracker.forget(c.pid),
//!     Err(e) => tracker.record_error(c, &e, now),   // retries NotInitialized with backoff;
//!                                                   // Seen::Unsupported: unsupported_process(c, &e)
//! }
//! ```
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::config::Discovery;
use super::labels::{self, LabelError};
use crate::model::labels::ProcessLabels;
use crate::process::python::{self, InspectError, PythonProcess, VerdictCache};
use crate::store::{NotProfiled, UnsupportedProcess};

/// The pids of all processes (thread-group leaders) in `/proc`, sorted.
/// Entries that vanish while listing are skipped; an unreadable `/proc` gives
/// an empty list.
pub fn list_pids() -> Vec<u32> {
    let dir = match std::fs::read_dir("/proc") {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("cannot list /proc: {e}");
            return Vec::new();
        }
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// Exec and exit events seen per pid, so that answers about a program the
/// pid no longer runs are told apart: an inspection records the pid's
/// generation when it starts, and its answer stands only if no exec or exit
/// of the pid came since ([`Lifecycle::is_current`]). Exits count as well
/// as execs: a pid may be reused by a new process after its exit event.
#[derive(Debug, Default)]
pub struct Lifecycle {
    events: u64,
    last: HashMap<u32, u64>,
}

impl Lifecycle {
    /// An exec or exit of `pid` was seen.
    pub fn bump(&mut self, pid: u32) {
        self.events += 1;
        self.last.insert(pid, self.events);
    }

    /// `pid`'s generation now, to hand to an inspection.
    pub fn generation(&self, pid: u32) -> u64 {
        self.last.get(&pid).copied().unwrap_or(0)
    }

    /// Whether an answer started at generation `gen` is about `pid`'s
    /// current program.
    pub fn is_current(&self, pid: u32, gen: u64) -> bool {
        self.generation(pid) == gen
    }

    /// Forgets the pids not in `live` (a full scan's): none of their old
    /// inspections can still be running after a scan interval.
    pub fn retain(&mut self, live: &HashSet<u32>) {
        self.last.retain(|pid, _| live.contains(pid));
    }
}

/// What [`inspect_candidate`] found.
#[derive(Debug)]
pub enum Inspection {
    /// Opted out (`PYEBPF_DISABLE`) or not selected by the rules, decided
    /// from `/proc` alone: none of its ELF files was read, so whether it
    /// runs Python is not known (nor needed).
    Excluded {
        labels: ProcessLabels,
        disabled: bool,
    },
    /// A supported CPython process the rules selected, with its labels and
    /// opt-out read again after the inspection (they may have changed: the
    /// caller decides on these). Boxed: a process's layout is large.
    Python {
        process: Box<PythonProcess>,
        labels: ProcessLabels,
        disabled: bool,
    },
    /// The pid belongs to another process than the candidate now (seen
    /// when labels were read first; otherwise the caller compares
    /// [`PythonProcess::start_time`]).
    Reused,
}

/// Labels for a process whose `/proc/PID/comm` (or other label file) could
/// not be read: its command only.
fn fallback_labels(pid: u32, command: String, err: &LabelError) -> (ProcessLabels, bool) {
    tracing::debug!(pid, "labels: {err}");
    let labels = ProcessLabels {
        pid,
        service: command.clone(),
        command,
        ..Default::default()
    };
    (labels, labels::disabled_by_env(pid))
}

/// Inspect candidate `c`, cheapest step first: read its labels and
/// `PYEBPF_DISABLE` from `/proc` and apply `rules`; only a process they
/// select has its ELF files looked at (through `cache`) to find a
/// supported CPython interpreter. On a busy host most processes stop at the
/// first step, or find every file they map already in the cache.
pub fn inspect_candidate(
    c: Candidate,
    rules: &Discovery,
    cache: &VerdictCache,
) -> Result<Inspection, InspectError> {
    let pid = c.pid;
    // Without include or exclude rules only the opt-out can exclude: one
    // read of the environment tells whether the labels are needed first.
    let no_rules = rules.include.is_empty() && rules.exclude.is_empty();
    if !no_rules || labels::disabled_by_env(pid) {
        let read = labels::read_labels_and_opt_out(pid);
        if let Err(LabelError::NoSuchProcess(_)) = read {
            return Err(InspectError::NoSuchProcess(pid));
        }
        // Read after the labels: the same start time as the candidate's
        // means the labels were the candidate's.
        let (start_time, command) = python::start_time_and_command(pid)?;
        if start_time != c.start_time {
            return Ok(Inspection::Reused);
        }
        let (labels, disabled) = read.unwrap_or_else(|e| fallback_labels(pid, command, &e));
        if disabled || !rules.selects(&labels) {
            return Ok(Inspection::Excluded { labels, disabled });
        }
    }
    let process = python::inspect_cached(pid, cache)?;
    // Again: the process may have exec'd since the first read.
    let (labels, disabled) = labels::read_labels_and_opt_out(pid)
        .unwrap_or_else(|e| fallback_labels(pid, process.command.clone(), &e));
    Ok(Inspection::Python {
        process: Box::new(process),
        labels,
        disabled,
    })
}

/// What to list about candidate `c` when `err` refused it as a CPython of an
/// unsupported version or build (`None` for any other error): its labels
/// (read now; the command alone if they cannot be), version and the
/// error's message as the reason.
pub fn unsupported_process(c: Candidate, err: &InspectError) -> Option<UnsupportedProcess> {
    let (version, free_threaded) = match err {
        InspectError::UnsupportedVersion { version, .. }
        | InspectError::Incompatible { version, .. } => (version.clone(), false),
        InspectError::FreeThreaded { version, .. } => (version.clone(), true),
        _ => return None,
    };
    Some(not_profiled(
        c,
        err,
        NotProfiled::Unsupported,
        version,
        free_threaded,
    ))
}

/// What to list about candidate `c` once discovery gave up on it after
/// `err` (retried with backoff): its labels, and the error as the reason;
/// `None` unless it is Python by its files (errors that only come after a
/// Python-looking file was found) or its name: any process whose `/proc`
/// files cannot be read is not worth a line.
pub fn failed_process(c: Candidate, err: &InspectError) -> Option<UnsupportedProcess> {
    let pythonish = match err {
        InspectError::Elf(_)
        | InspectError::Tls { .. }
        | InspectError::Memory(_)
        | InspectError::NotInitialized { .. } => true,
        _ => python::command(c.pid).is_ok_and(|comm| python_named(c.pid, &comm)),
    };
    pythonish.then(|| not_profiled(c, err, NotProfiled::Failed, String::new(), false))
}

fn not_profiled(
    c: Candidate,
    err: &InspectError,
    not_profiled: NotProfiled,
    python_version: String,
    free_threaded: bool,
) -> UnsupportedProcess {
    let labels = match labels::read_labels_and_opt_out(c.pid) {
        Ok((labels, _)) => labels,
        Err(e) => {
            let command = python::command(c.pid).unwrap_or_default();
            fallback_labels(c.pid, command, &e).0
        }
    };
    UnsupportedProcess {
        labels,
        start_time: c.start_time,
        not_profiled,
        python_version,
        free_threaded,
        reason: err.to_string(),
    }
}

/// A process to look at: a pid at one start time (clock ticks after boot,
/// `/proc/PID/stat` field 22).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Candidate {
    pub pid: u32,
    pub start_time: u64,
}

/// What was decided for a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Being profiled.
    Profiled,
    /// Not a Python process pyebpf can read (no interpreter found, or an
    /// unexpected build), or a kernel thread or zombie. Looked at again
    /// only if its command changes (an `exec`).
    NotPython,
    /// CPython, but of a version or build pyebpf does not support (too old,
    /// too new, free-threaded). Like `NotPython`, looked at again only
    /// after an `exec`.
    Unsupported,
    /// Python, but excluded by `PYEBPF_DISABLE` or the configured rules.
    Excluded,
    /// Inspection failed (e.g. the interpreter is not initialized yet) and is
    /// retried at `next_retry`; `attempts` failures so far.
    Failed { attempts: u32, next_retry: Instant },
    /// Failed for longer than the retry schedule allows, or denied access;
    /// like `NotPython`, looked at again only after an `exec`.
    GaveUp,
}

/// Retry delays after the first six failures, fast enough that a freshly
/// exec'd interpreter is profiled within a second of being found.
const FAST_RETRIES_MS: [u64; 6] = [20, 50, 100, 200, 500, 1000];
/// Then one retry every 5 s ...
const SLOW_RETRY: Duration = Duration::from_secs(5);
/// ... for 30 s, after which the process is given up.
const SLOW_RETRIES: u32 = 6;
/// A "not Python" answer for a process whose command or executable name
/// starts with `python` is retried this many times (it may be between `exec` and the dynamic loader
/// mapping `libpython`).
const PYTHON_NAMED_RETRIES: u32 = 3;
/// At most this many ended processes are kept for [`Tracker::take_ended`].
const MAX_ENDED: usize = 4096;

/// The delay before the retry that follows failure number `attempt` (1 for
/// the first failure): 20 ms, 50 ms, 100 ms, 200 ms, 500 ms, 1 s, then 5 s six
/// times (30 s); `None` once the schedule is exhausted (give up).
pub fn retry_delay(attempt: u32) -> Option<Duration> {
    let fast = FAST_RETRIES_MS.len() as u32;
    match attempt {
        0 => Some(Duration::ZERO),
        n if n <= fast => Some(Duration::from_millis(FAST_RETRIES_MS[(n - 1) as usize])),
        n if n <= fast + SLOW_RETRIES => Some(SLOW_RETRY),
        _ => None,
    }
}

/// Whether a process looks like an interpreter by name: its command, or the
/// file name of its executable (for scripts, the interpreter).
fn python_named(pid: u32, comm: &str) -> bool {
    comm.starts_with("python")
        || std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
            exe.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python"))
        })
}

/// `PF_KTHREAD` in the `flags` field of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// `/proc/PID/comm` is at most 15 bytes; kept zero-padded.
type Comm = [u8; 16];

/// What one scan reads from `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProcStat {
    start_time: u64,
    comm: Comm,
    kernel_thread: bool,
    /// Exited (zombie or dead), not reaped yet.
    exited: bool,
}

fn comm_bytes(s: &[u8]) -> Comm {
    let mut c = [0u8; 16];
    let n = s.len().min(16);
    c[..n].copy_from_slice(&s[..n]);
    c
}

/// Parse a `/proc/PID/stat` line. The command (field 2, in parentheses) may
/// contain spaces and parentheses: the fields after it are counted from the
/// last `)`.
fn parse_stat(stat: &str) -> Option<ProcStat> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let mut rest = stat[close + 1..].split_ascii_whitespace();
    // Fields 3 (state) .. : state is 3, flags is 9, starttime is 22.
    let state = rest.next()?;
    let flags: u64 = rest.nth(9 - 4)?.parse().ok()?;
    let start_time = rest.nth(22 - 10)?.parse().ok()?;
    Some(ProcStat {
        start_time,
        comm: comm_bytes(comm.as_bytes()),
        kernel_thread: flags & PF_KTHREAD != 0,
        exited: matches!(state, "Z" | "X" | "x"),
    })
}

fn read_stat(pid: u32) -> Option<ProcStat> {
    let raw = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&String::from_utf8_lossy(&raw))
}

/// One remembered process.
#[derive(Clone, Copy, Debug)]
struct Entry {
    start_time: u64,
    comm: Comm,
    /// `None`: handed out by [`Tracker::new_candidates`], not decided yet.
    state: Option<Seen>,
}

/// How many tracked processes are in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerCounts {
    pub pending: usize,
    pub profiled: usize,
    pub not_python: usize,
    pub unsupported: usize,
    pub excluded: usize,
    pub failed: usize,
    pub gave_up: usize,
}

/// Which processes were already seen and what was decided for them; one
/// small entry per live process (drop the dead ones with [`Tracker::prune`]).
#[derive(Debug)]
pub struct Tracker {
    entries: HashMap<u32, Entry>,
    own_pid: u32,
    ended: Vec<Candidate>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker {
            entries: HashMap::new(),
            own_pid: std::process::id(),
            ended: Vec::new(),
        }
    }

    /// The processes among `pids` that need inspecting: never seen, seen
    /// under another start time (a reused pid), seen but not decided yet, or
    /// decided "not Python" but since exec'd into another command. Our own
    /// process, kernel threads and zombies are never returned (the latter two
    /// are remembered as [`Seen::NotPython`]); pids that vanished are skipped.
    /// Processes waiting for a retry are left to [`Tracker::due_retries`].
    pub fn new_candidates(&mut self, pids: &[u32]) -> Vec<Candidate> {
        let own = self.own_pid;
        pids.iter()
            .filter(|&&pid| pid != own)
            .filter_map(|&pid| self.observe(pid, read_stat(pid)?))
            .collect()
    }

    fn observe(&mut self, pid: u32, stat: ProcStat) -> Option<Candidate> {
        let c = Candidate {
            pid,
            start_time: stat.start_time,
        };
        let skip = stat.kernel_thread || stat.exited;
        if let Some(e) = self.entries.get_mut(&pid) {
            if e.start_time == stat.start_time {
                let exec_d = e.comm != stat.comm;
                e.comm = stat.comm;
                return match e.state {
                    _ if skip => None,
                    None => Some(c),
                    Some(Seen::NotPython | Seen::Unsupported | Seen::GaveUp) if exec_d => {
                        e.state = None;
                        Some(c)
                    }
                    Some(_) => None,
                };
            }
        }
        // New, or the pid was reused.
        let old = self.entries.insert(
            pid,
            Entry {
                start_time: stat.start_time,
                comm: stat.comm,
                state: skip.then_some(Seen::NotPython),
            },
        );
        if let Some(old) = old {
            self.ended_if_profiled(pid, &old);
        }
        (!skip).then_some(c)
    }

    fn ended_if_profiled(&mut self, pid: u32, e: &Entry) {
        if e.state == Some(Seen::Profiled) {
            if self.ended.len() >= MAX_ENDED {
                self.ended.remove(0);
            }
            self.ended.push(Candidate {
                pid,
                start_time: e.start_time,
            });
        }
    }

    /// Record what was decided for `c`. Ignored if `c.pid` now belongs to a
    /// newer process than `c`.
    pub fn mark(&mut self, c: Candidate, state: Seen) {
        match self.entries.get_mut(&c.pid) {
            Some(e) if e.start_time == c.start_time => e.state = Some(state),
            Some(_) => {}
            None => {
                let comm = std::fs::read(format!("/proc/{}/comm", c.pid))
                    .map(|b| comm_bytes(b.strip_suffix(b"\n").unwrap_or(&b)))
                    .unwrap_or_default();
                self.entries.insert(
                    c.pid,
                    Entry {
                        start_time: c.start_time,
                        comm,
                        state: Some(state),
                    },
                );
            }
        }
    }

    /// The state recorded for `c`, if `c` is the process tracked under its pid.
    pub fn state(&self, c: Candidate) -> Option<Seen> {
        self.entries
            .get(&c.pid)
            .filter(|e| e.start_time == c.start_time)
            .and_then(|e| e.state)
    }

    /// The process tracked under `pid`, and its state (`None`: undecided).
    pub fn get(&self, pid: u32) -> Option<(Candidate, Option<Seen>)> {
        self.entries.get(&pid).map(|e| {
            (
                Candidate {
                    pid,
                    start_time: e.start_time,
                },
                e.state,
            )
        })
    }

    /// Record one more failure of `c` and schedule its retry (see
    /// [`retry_delay`]); [`Seen::GaveUp`] once the schedule is exhausted.
    /// Returns the new state.
    pub fn retry_later(&mut self, c: Candidate, now: Instant) -> Seen {
        let attempts = match self.state(c) {
            Some(Seen::Failed { attempts, .. }) => attempts + 1,
            _ => 1,
        };
        let state = match retry_delay(attempts) {
            Some(d) => Seen::Failed {
                attempts,
                next_retry: now + d,
            },
            None => Seen::GaveUp,
        };
        self.mark(c, state);
        state
    }

    /// Record the outcome of a failed `python::inspect(c.pid)`:
    /// - the process is gone: forgotten (returns `None`);
    /// - CPython of a version or build not supported (too old, too new,
    ///   free-threaded): [`Seen::Unsupported`], at once (the answer will not
    ///   change; see [`unsupported_process`] for what to list);
    /// - not Python, or an incompatible build:
    ///   [`Seen::NotPython`] (but a process whose command or executable is
    ///   named `python*`, e.g. a `#!/usr/bin/python3` script, is retried a
    ///   few times first: it may be between its `exec` and the dynamic loader
    ///   mapping `libpython`);
    /// - access denied: [`Seen::GaveUp`], at once. Every mode holds
    ///   CAP_SYS_PTRACE (checked at start, kept after the drop), so the
    ///   denial is a security policy's (SELinux, AppArmor, Landlock, Yama)
    ///   or a file only its owner may read, and stands until the process
    ///   execs;
    /// - not initialized yet, and other possibly transient errors (memory,
    ///   TLS, ELF, `/proc` reads): retried with backoff.
    pub fn record_error(&mut self, c: Candidate, err: &InspectError, now: Instant) -> Option<Seen> {
        let state = match err {
            InspectError::NoSuchProcess(_) => {
                if self.get(c.pid).is_some_and(|(t, _)| t == c) {
                    self.entries.remove(&c.pid);
                }
                return None;
            }
            InspectError::NotPython(_, comm) if python_named(c.pid, comm) => match self.state(c) {
                Some(Seen::Failed { attempts, .. }) if attempts >= PYTHON_NAMED_RETRIES => {
                    self.mark(c, Seen::NotPython);
                    Seen::NotPython
                }
                _ => self.retry_later(c, now),
            },
            InspectError::UnsupportedVersion { .. }
            | InspectError::FreeThreaded { .. }
            | InspectError::Incompatible { .. } => {
                self.mark(c, Seen::Unsupported);
                Seen::Unsupported
            }
            InspectError::NotPython(..) | InspectError::MissingSymbol { .. } => {
                self.mark(c, Seen::NotPython);
                Seen::NotPython
            }
            InspectError::Permission { .. } => {
                self.mark(c, Seen::GaveUp);
                Seen::GaveUp
            }
            InspectError::NotInitialized { .. }
            | InspectError::Tls { .. }
            | InspectError::Memory(_)
            | InspectError::Elf(_)
            | InspectError::Proc { .. } => self.retry_later(c, now),
        };
        Some(state)
    }

    /// The failed processes whose retry is due at `now`, by pid. Processes
    /// that exited (or whose pid was reused) meanwhile are dropped instead.
    /// A returned candidate stays due until it is marked again.
    pub fn due_retries(&mut self, now: Instant) -> Vec<Candidate> {
        let mut due: Vec<Candidate> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                matches!(e.state, Some(Seen::Failed { next_retry, .. }) if next_retry <= now)
            })
            .map(|(&pid, e)| Candidate {
                pid,
                start_time: e.start_time,
            })
            .collect();
        due.retain(|c| {
            let alive = python::is_alive(c.pid, c.start_time);
            if !alive {
                self.entries.remove(&c.pid);
            }
            alive
        });
        due.sort_unstable();
        due
    }

    /// When the earliest pending retry is due, if any (to sleep until then).
    pub fn next_retry(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|e| match e.state {
                Some(Seen::Failed { next_retry, .. }) => Some(next_retry),
                _ => None,
            })
            .min()
    }

    /// Drop what is known about `pid` (it will be a new candidate if seen
    /// again).
    pub fn forget(&mut self, pid: u32) {
        self.entries.remove(&pid);
    }

    /// Drop the processes whose pid is not in `live` (the pids of the scan
    /// just made); profiled ones are reported by [`Tracker::take_ended`].
    pub fn prune(&mut self, live: &HashSet<u32>) {
        let gone: Vec<u32> = self
            .entries
            .keys()
            .filter(|pid| !live.contains(pid))
            .copied()
            .collect();
        for pid in gone {
            if let Some(e) = self.entries.remove(&pid) {
                self.ended_if_profiled(pid, &e);
            }
        }
        if self.entries.capacity() > 2 * self.entries.len() + 1024 {
            self.entries.shrink_to_fit();
        }
    }

    /// Profiled processes the tracker saw end (pruned, or their pid reused),
    /// oldest first, for the caller to stop sampling them. At most
    /// 4096 are kept between calls.
    pub fn take_ended(&mut self) -> Vec<Candidate> {
        std::mem::take(&mut self.ended)
    }

    /// Number of tracked processes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many tracked processes are in each state.
    pub fn counts(&self) -> TrackerCounts {
        let mut n = TrackerCounts::default();
        for e in self.entries.values() {
            match e.state {
                None => n.pending += 1,
                Some(Seen::Profiled) => n.profiled += 1,
                Some(Seen::NotPython) => n.not_python += 1,
                Some(Seen::Unsupported) => n.unsupported += 1,
                Some(Seen::Excluded) => n.excluded += 1,
                Some(Seen::Failed { .. }) => n.failed += 1,
                Some(Seen::GaveUp) => n.gave_up += 1,
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::python::test_support::{
        build_fake_python, path_python, spawn_ready, ChildGuard,
    };
    use std::process::Command;

    fn stat(start_time: u64, comm: &str) -> ProcStat {
        ProcStat {
            start_time,
            comm: comm_bytes(comm.as_bytes()),
            kernel_thread: false,
            exited: false,
        }
    }

    fn cand(pid: u32, start_time: u64) -> Candidate {
        Candidate { pid, start_time }
    }

    fn rules(yaml: &str) -> Discovery {
        super::super::config::parse(yaml, "test").unwrap().discovery
    }

    /// `sleep 30` with `env` added, once it runs `sleep` (comm, environment
    /// and libraries set up), and its candidate.
    fn sleeper(env: &[(&str, &str)]) -> (ChildGuard, Candidate) {
        let mut cmd = Command::new("sleep");
        cmd.arg("30")
            .env_remove("PYEBPF_DISABLE")
            .envs(env.iter().copied());
        let child = ChildGuard(cmd.spawn().unwrap());
        let pid = child.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Until the dynamic loader mapped libc, the maps still change.
        while python::command(pid).unwrap() != "sleep"
            || std::fs::read(format!("/proc/{pid}/environ"))
                .unwrap()
                .is_empty()
            || !std::fs::read_to_string(format!("/proc/{pid}/maps"))
                .unwrap()
                .contains("libc")
        {
            assert!(Instant::now() < deadline, "sleep did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        let c = cand(pid, python::start_time(pid).unwrap());
        (child, c)
    }

    /// Excluded by a rule or by PYEBPF_DISABLE: decided without reading a
    /// single ELF file (the cache is never even consulted).
    #[test]
    fn excluded_processes_are_never_parsed() {
        let cache = VerdictCache::new(16);
        let (_child, c) = sleeper(&[]);
        let r = inspect_candidate(
            c,
            &rules("discovery: {exclude: [{command: sleep}]}"),
            &cache,
        );
        assert!(
            matches!(&r, Ok(Inspection::Excluded { labels, disabled: false }) if labels.command == "sleep" && labels.pid == c.pid),
            "{r:?}"
        );
        let r = inspect_candidate(
            c,
            &rules("discovery: {include: [{command: gunicorn}]}"),
            &cache,
        );
        assert!(matches!(r, Ok(Inspection::Excluded { .. })), "{r:?}");
        let (_child, c) = sleeper(&[("PYEBPF_DISABLE", "1")]);
        let r = inspect_candidate(c, &rules(""), &cache);
        assert!(
            matches!(r, Ok(Inspection::Excluded { disabled: true, .. })),
            "{r:?}"
        );
        assert_eq!(cache.stats(), Default::default());
    }

    /// Selected but not Python: the files are parsed once, then every
    /// later inspection of such a process only hits the cache.
    #[test]
    fn selected_non_python_uses_the_cache() {
        let cache = VerdictCache::new(16);
        let (_child, c) = sleeper(&[]);
        let r = inspect_candidate(c, &rules(""), &cache);
        assert!(
            matches!(&r, Err(InspectError::NotPython(p, comm)) if *p == c.pid && comm == "sleep"),
            "{r:?}"
        );
        let first = cache.stats();
        assert!(first.misses > 0 && first.entries > 0, "{first:?}");
        assert_eq!(first.hits, 0);
        let (_other, c2) = sleeper(&[]);
        let r = inspect_candidate(
            c2,
            &rules("discovery: {include: [{command: sleep}]}"),
            &cache,
        );
        assert!(matches!(r, Err(InspectError::NotPython(..))), "{r:?}");
        let second = cache.stats();
        assert_eq!(second.misses, first.misses, "{second:?}");
        assert_eq!(second.hits, first.misses);
        assert_eq!(second.entries, first.entries);
    }

    #[test]
    fn reused_and_gone_pids() {
        let cache = VerdictCache::new(16);
        let (_child, c) = sleeper(&[]);
        let older = cand(c.pid, c.start_time.wrapping_sub(1));
        let sleep = rules("discovery: {include: [{command: sleep}]}");
        assert!(matches!(
            inspect_candidate(older, &sleep, &cache),
            Ok(Inspection::Reused)
        ));
        let gone = cand(0x3fff_ffff, 1);
        for r in [rules(""), sleep] {
            assert!(matches!(
                inspect_candidate(gone, &r, &cache),
                Err(InspectError::NoSuchProcess(0x3fff_ffff))
            ));
        }
        assert_eq!(cache.stats(), Default::default());
    }

    /// A selected Python process is inspected, with its labels; the same
    /// process under a rule that excludes it is not.
    #[test]
    fn python_process_selected_or_excluded() {
        let cache = VerdictCache::new(64);
        let (child, _) = spawn_ready(Command::new(path_python()).args([
            "-c",
            "import time; print('ready', flush=True); time.sleep(30)",
        ]));
        let pid = child.pid();
        let c = cand(pid, python::start_time(pid).unwrap());
        let comm = python::command(pid).unwrap();
        match inspect_candidate(c, &rules(""), &cache) {
            Ok(Inspection::Python {
                process,
                labels,
                disabled,
            }) => {
                assert_eq!((process.pid, process.start_time), (pid, c.start_time));
                assert_eq!(process.version.minor, 11);
                assert_eq!(labels.command, comm);
                assert!(!disabled);
            }
            r => panic!("{r:?}"),
        }
        let misses = cache.stats().misses;
        assert!(misses > 0);
        // Again: the interpreter binary's symbols come from the cache.
        let r = inspect_candidate(c, &rules(""), &cache);
        assert!(matches!(r, Ok(Inspection::Python { .. })), "{r:?}");
        assert_eq!(cache.stats().misses, misses);
        let before = cache.stats();
        let yaml = format!("discovery: {{exclude: [{{command: {comm}}}]}}");
        let r = inspect_candidate(c, &rules(&yaml), &cache);
        assert!(matches!(r, Ok(Inspection::Excluded { .. })), "{r:?}");
        assert_eq!(cache.stats(), before, "excluded: no file looked at");
    }

    #[test]
    fn stat_parsing() {
        let line =
            "1234 (a) b) (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 10";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.start_time, 987654);
        assert_eq!(&s.comm[..9], b"a) b) (c\0");
        assert!(!s.kernel_thread && !s.exited);
        // kthreadd: flags 0x208040 has PF_KTHREAD.
        let k = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 3 0 0";
        let s = parse_stat(k).unwrap();
        assert!(s.kernel_thread);
        assert_eq!(s.start_time, 3);
        let z = "99 (defunct) Z 1 99 99 0 -1 4227084 0 0 0 0 0 0 0 0 20 0 1 0 555 0 0";
        assert!(parse_stat(z).unwrap().exited);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
        assert_eq!(parse_stat(""), None);
        // Our own stat parses and agrees with python::start_time.
        let own = read_stat(std::process::id()).unwrap();
        assert_eq!(
            own.start_time,
            python::start_time(std::process::id()).unwrap()
        );
        assert!(!own.kernel_thread);
        // kthreadd, where it is pid 2.
        if let Some(s) = read_stat(2).filter(|s| s.comm.starts_with(b"kthreadd\0")) {
            assert!(s.kernel_thread);
        }
    }

    #[test]
    fn schedule() {
        let ms = |n| retry_delay(n).map(|d| d.as_millis());
        let got: Vec<_> = (1..=14).map(ms).collect();
        let mut want: Vec<Option<u128>> = [20, 50, 100, 200, 500, 1000].map(Some).to_vec();
        want.extend([Some(5000); 6]);
        want.extend([None, None]);
        assert_eq!(got, want);
        // The fast part sums to under 2 s: a process that needs up to ~0.9 s
        // to initialise is picked up within 1 s of being found.
        let fast: u128 = (1..=5).filter_map(ms).sum();
        assert!(fast < 1000, "{fast}");
        let total: u128 = (1..=12).filter_map(ms).sum();
        assert!((30_000..35_000).contains(&total), "{total}");
    }

    #[test]
    fn seen_processes_are_not_candidates_again() {
        let mut t = Tracker::new();
        assert_eq!(t.observe(10, stat(100, "python3")), Some(cand(10, 100)));
        // Undecided: handed out again.
        assert_eq!(t.observe(10, stat(100, "python3")), Some(cand(10, 100)));
        t.mark(cand(10, 100), Seen::Profiled);
        assert_eq!(t.observe(10, stat(100, "python3")), None);
        // A command change (setproctitle) does not disturb a profiled process.
        assert_eq!(t.observe(10, stat(100, "gunicorn: work")), None);
        assert_eq!(t.state(cand(10, 100)), Some(Seen::Profiled));

        t.observe(11, stat(200, "bash"));
        t.mark(cand(11, 200), Seen::NotPython);
        t.observe(12, stat(300, "python3"));
        t.mark(cand(12, 300), Seen::Excluded);
        assert_eq!(t.observe(11, stat(200, "bash")), None);
        assert_eq!(t.observe(12, stat(300, "python3")), None);
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.counts(),
            TrackerCounts {
                profiled: 1,
                not_python: 1,
                excluded: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn exec_after_not_python_is_a_new_candidate() {
        let mut t = Tracker::new();
        // `sh -c 'exec python3 app.py'` seen before its exec.
        let c = t.observe(20, stat(500, "sh")).unwrap();
        t.mark(c, Seen::NotPython);
        assert_eq!(t.observe(20, stat(500, "sh")), None);
        assert_eq!(t.observe(20, stat(500, "python3")), Some(c));
        assert_eq!(t.get(20), Some((c, None)));
        t.mark(c, Seen::GaveUp);
        assert_eq!(t.observe(20, stat(500, "python3")), None);
        assert_eq!(t.observe(20, stat(500, "python3.11")), Some(c));
    }

    #[test]
    fn reused_pid_is_a_new_process() {
        let mut t = Tracker::new();
        let old = t.observe(30, stat(100, "python3")).unwrap();
        t.mark(old, Seen::Profiled);
        let new = t.observe(30, stat(900, "python3")).unwrap();
        assert_eq!(new, cand(30, 900));
        assert_eq!(t.get(30), Some((new, None)));
        assert_eq!(t.state(old), None);
        // The old one ended; the caller is told once.
        assert_eq!(t.take_ended(), vec![old]);
        assert!(t.take_ended().is_empty());
        // A late mark for the old process does not touch the new one.
        t.mark(old, Seen::Excluded);
        assert_eq!(t.get(30), Some((new, None)));
        // Reuse while a retry is pending also resets.
        t.mark(
            new,
            Seen::Failed {
                attempts: 2,
                next_retry: Instant::now(),
            },
        );
        assert_eq!(t.observe(30, stat(901, "x")), Some(cand(30, 901)));
        assert!(t.take_ended().is_empty(), "only profiled processes end");
    }

    #[test]
    fn kernel_threads_and_zombies_are_skipped() {
        let mut t = Tracker::new();
        let mut k = stat(3, "kthreadd");
        k.kernel_thread = true;
        assert_eq!(t.observe(2, k), None);
        assert_eq!(t.observe(2, k), None);
        assert_eq!(t.get(2), Some((cand(2, 3), Some(Seen::NotPython))));
        let mut z = stat(50, "python3");
        z.exited = true;
        assert_eq!(t.observe(40, z), None);
        // A tracked process that becomes a zombie is left as it was.
        let c = t.observe(41, stat(60, "python3")).unwrap();
        let mut z = stat(60, "python3");
        z.exited = true;
        assert_eq!(t.observe(41, z), None);
        assert_eq!(t.get(41), Some((c, None)));
        // Our own pid is never a candidate.
        let own = std::process::id();
        assert!(!t.new_candidates(&[own]).iter().any(|c| c.pid == own));
        assert!(t.get(own).is_none());
    }

    #[test]
    fn retries_follow_the_schedule() {
        let mut t = Tracker::new();
        let c = t.observe(50, stat(7, "python3")).unwrap();
        let t0 = Instant::now();
        let mut now = t0;
        let mut delays = Vec::new();
        loop {
            match t.retry_later(c, now) {
                Seen::Failed {
                    attempts,
                    next_retry,
                } => {
                    assert_eq!(attempts as usize, delays.len() + 1);
                    assert_eq!(t.next_retry(), Some(next_retry));
                    delays.push((next_retry - now).as_millis());
                    // Not due before next_retry (checked without /proc: the
                    // entry is not Failed-due so nothing is looked up).
                    assert!(t.due_pids(next_retry - Duration::from_millis(1)).is_empty());
                    assert_eq!(t.due_pids(next_retry), vec![50]);
                    now = next_retry;
                }
                Seen::GaveUp => break,
                s => panic!("{s:?}"),
            }
        }
        assert_eq!(
            delays,
            [20, 50, 100, 200, 500, 1000, 5000, 5000, 5000, 5000, 5000, 5000]
        );
        assert_eq!(t.state(c), Some(Seen::GaveUp));
        assert_eq!(t.next_retry(), None);
        assert!((now - t0) >= Duration::from_secs(30));
    }

    #[test]
    fn error_outcomes() {
        let mut t = Tracker::new();
        let now = Instant::now();
        let c = t.observe(0x3fff_ff60, stat(1, "python3")).unwrap();
        let s = t.record_error(
            c,
            &InspectError::NotInitialized {
                pid: 0x3fff_ff60,
                detail: "test".into(),
            },
            now,
        );
        assert!(matches!(s, Some(Seen::Failed { attempts: 1, .. })));
        let s = t.record_error(
            c,
            &InspectError::NotInitialized {
                pid: 0x3fff_ff60,
                detail: "test".into(),
            },
            now,
        );
        assert!(matches!(s, Some(Seen::Failed { attempts: 2, .. })));
        assert_eq!(
            t.record_error(c, &InspectError::NoSuchProcess(0x3fff_ff60), now),
            None
        );
        assert!(t.get(0x3fff_ff60).is_none());

        let c = t.observe(0x3fff_ff61, stat(1, "node")).unwrap();
        let s = t.record_error(c, &InspectError::NotPython(0x3fff_ff61, "node".into()), now);
        assert_eq!(s, Some(Seen::NotPython));
        let c = t.observe(0x3fff_ff62, stat(1, "python3.16")).unwrap();
        let e = InspectError::UnsupportedVersion {
            pid: 0x3fff_ff62,
            version: "3.16.0".into(),
        };
        assert_eq!(t.record_error(c, &e, now), Some(Seen::Unsupported));
        let c = t.observe(0x3fff_ff64, stat(1, "python3.14t")).unwrap();
        let e = InspectError::FreeThreaded {
            pid: 0x3fff_ff64,
            version: "3.14.0".into(),
        };
        assert_eq!(t.record_error(c, &e, now), Some(Seen::Unsupported));

        // "python" that is not Python (yet): a few quick retries, then no.
        let c = t.observe(0x3fff_ff63, stat(1, "python3")).unwrap();
        let e = InspectError::NotPython(0x3fff_ff63, "python3".into());
        let got: Vec<_> = (0..4)
            .map(|_| t.record_error(c, &e, now).unwrap())
            .collect();
        assert!(matches!(got[0], Seen::Failed { attempts: 1, .. }));
        assert!(matches!(got[2], Seen::Failed { attempts: 3, .. }));
        assert_eq!(got[3], Seen::NotPython);

        // Access denied: given up at once, not retried; an exec (a new
        // command) makes it a candidate again.
        let c = t.observe(0x3fff_ff65, stat(1, "python3")).unwrap();
        let e = InspectError::Permission {
            pid: 0x3fff_ff65,
            what: "reading /proc/PID/exe".into(),
        };
        assert_eq!(t.record_error(c, &e, now), Some(Seen::GaveUp));
        assert!(!t.due_retries(now + Duration::from_secs(3600)).contains(&c));
        assert_eq!(t.observe(0x3fff_ff65, stat(1, "python3")), None);
        assert_eq!(t.observe(0x3fff_ff65, stat(1, "gunicorn")), Some(c));
    }

    #[test]
    fn unsupported_is_decided_once_and_listed() {
        let child = ChildGuard(Command::new("sleep").arg("30").spawn().unwrap());
        let pid = child.pid();
        let c = cand(pid, python::start_time(pid).unwrap());
        let mut t = Tracker::new();
        let now = Instant::now();
        assert_eq!(t.observe(pid, stat(c.start_time, "sleep")), Some(c));
        let e = InspectError::UnsupportedVersion {
            pid,
            version: "3.16.0a1".into(),
        };
        assert_eq!(t.record_error(c, &e, now), Some(Seen::Unsupported));
        // Decided: neither a candidate again nor retried.
        assert_eq!(t.observe(pid, stat(c.start_time, "sleep")), None);
        assert!(t.due_retries(now + Duration::from_secs(3600)).is_empty());
        assert_eq!(t.next_retry(), None);
        assert_eq!(
            t.counts(),
            TrackerCounts {
                unsupported: 1,
                ..Default::default()
            }
        );
        // What is listed: its labels, version and the reason.
        let u = unsupported_process(c, &e).unwrap();
        assert_eq!((u.labels.pid, u.labels.command.as_str()), (pid, "sleep"));
        assert!(u.labels.exe.ends_with("/sleep"), "{u:?}");
        assert_eq!(u.start_time, c.start_time);
        assert_eq!(
            (u.python_version.as_str(), u.python()),
            ("3.16.0a1", "3.16".into())
        );
        assert!(!u.free_threaded);
        assert_eq!(u.reason, e.to_string());
        let ft = InspectError::FreeThreaded {
            pid,
            version: "3.14.10".into(),
        };
        let u = unsupported_process(c, &ft).unwrap();
        assert_eq!(
            (u.python_version.as_str(), u.python()),
            ("3.14.10", "3.14t".into())
        );
        assert!(
            u.free_threaded && u.reason.contains("free-threaded"),
            "{u:?}"
        );
        // An unexpected layout is listed with its version and reason.
        let odd = InspectError::Incompatible {
            pid,
            version: "3.14.0".into(),
            reason: "x".into(),
        };
        let u = unsupported_process(c, &odd).unwrap();
        assert_eq!(u.python_version, "3.14.0");
        assert_eq!(u.not_profiled, NotProfiled::Unsupported);
        // Other errors are not "unsupported"; given up on, they are "failed".
        let other = InspectError::NotPython(pid, "sleep".into());
        assert!(unsupported_process(c, &other).is_none(), "{other}");
        // A `sleep` whose files cannot be read is not listed; an ELF error
        // (only reported for Python-looking files) is.
        assert!(failed_process(c, &other).is_none());
        let elf = InspectError::NotInitialized {
            pid,
            detail: "x".into(),
        };
        let f = failed_process(c, &elf).unwrap();
        assert_eq!(
            (f.not_profiled.status(), f.python_version.as_str()),
            ("failed", "")
        );
        assert_eq!(f.reason, elf.to_string());
        // After an exec it is looked at again.
        assert_eq!(t.observe(pid, stat(c.start_time, "python3.11")), Some(c));
        // A process gone meanwhile is still listed, with its pid only.
        let gone = cand(0x3fff_fff0, 1);
        let u = unsupported_process(gone, &e).unwrap();
        assert_eq!((u.labels.pid, u.labels.command.as_str()), (gone.pid, ""));
    }

    #[test]
    fn scripts_with_a_python_shebang_are_python_named() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("checkout-svc");
        std::fs::write(
            &script,
            format!(
                "#!{}\nprint('ready', flush=True)\nimport time; time.sleep(30)\n",
                path_python().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let (child, _) = spawn_ready(&mut Command::new(&script));
        let comm = python::command(child.pid()).unwrap();
        assert_eq!(comm, "checkout-svc");
        assert!(python_named(child.pid(), &comm));
        assert!(!python_named(std::process::id(), "pyebpf"));
        assert!(python_named(0x3fff_ffff, "python3"));
    }

    #[test]
    fn prune_drops_dead_processes() {
        let mut t = Tracker::new();
        for (pid, state) in [
            (70, Seen::Profiled),
            (71, Seen::NotPython),
            (72, Seen::Profiled),
            (73, Seen::Excluded),
        ] {
            let c = t.observe(pid, stat(pid as u64, "p")).unwrap();
            t.mark(c, state);
        }
        t.prune(&[71, 72].into_iter().collect());
        assert_eq!(t.len(), 2);
        assert!(t.get(70).is_none() && t.get(73).is_none());
        assert_eq!(t.take_ended(), vec![cand(70, 70)]);
        // Seen again after being pruned: new.
        assert_eq!(t.observe(70, stat(70, "p")), Some(cand(70, 70)));
        t.prune(&HashSet::new());
        assert!(t.is_empty());
        assert_eq!(t.take_ended(), vec![cand(72, 72)]);
    }

    #[test]
    fn exec_and_exit_both_outdate_inspections() {
        let mut l = Lifecycle::default();
        let before = l.generation(90);
        assert!(l.is_current(90, before));
        // An exit while the inspection ran: its answer is stale.
        l.bump(90);
        assert!(!l.is_current(90, before));
        let after_exit = l.generation(90);
        // So is one started before an exec.
        l.bump(90);
        assert!(!l.is_current(90, after_exit));
        assert!(l.is_current(90, l.generation(90)));
        // Other pids are not affected.
        assert!(l.is_current(91, 0));
        l.bump(91);
        assert!(!l.is_current(91, 0));
        l.retain(&[91].into_iter().collect());
        assert_eq!(l.generation(90), 0);
        assert!(l.generation(91) > 0);
    }

    #[test]
    fn forget_makes_a_process_new_again() {
        let mut t = Tracker::new();
        let c = t.observe(80, stat(1, "python3")).unwrap();
        t.mark(c, Seen::Excluded);
        t.forget(80);
        assert_eq!(t.observe(80, stat(1, "python3")), Some(c));
    }

    #[test]
    fn due_retries_drop_dead_processes() {
        let mut t = Tracker::new();
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        let c = cand(pid, python::start_time(pid).unwrap());
        child.wait().unwrap();
        let now = Instant::now();
        t.mark(
            c,
            Seen::Failed {
                attempts: 1,
                next_retry: now,
            },
        );
        assert!(t.due_retries(now).is_empty());
        assert!(t.get(pid).is_none());
    }

    #[test]
    fn list_pids_sees_us_and_a_child() {
        let child = ChildGuard(Command::new("sleep").arg("30").spawn().unwrap());
        let pids = list_pids();
        assert!(pids.contains(&std::process::id()));
        assert!(pids.contains(&child.pid()));
        assert!(pids.windows(2).all(|w| w[0] < w[1]));
        // A whole-host scan: every candidate is a live user process.
        let mut t = Tracker::new();
        let cands = t.new_candidates(&pids);
        assert!(cands.iter().any(|c| c.pid == child.pid()));
        assert!(!cands.iter().any(|c| c.pid == std::process::id()));
        assert!(cands.len() <= pids.len());
    }

    /// The not-yet-initialised fake interpreter is retried on schedule.
    #[test]
    fn uninitialised_interpreter_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let exe = build_fake_python(dir.path());
        let (child, _) = spawn_ready(Command::new(exe).args(["0x030b07f0", "uninit"]));
        let pid = child.pid();
        let mut t = Tracker::new();
        let c = *t
            .new_candidates(&[pid])
            .first()
            .expect("the fake is a candidate");
        let t0 = Instant::now();
        let err = python::inspect(pid).unwrap_err();
        assert!(matches!(err, InspectError::NotInitialized { .. }), "{err}");
        let s = t.record_error(c, &err, t0).unwrap();
        assert!(matches!(s, Seen::Failed { attempts: 1, .. }));
        assert!(
            t.new_candidates(&[pid]).is_empty(),
            "retries are not rescans"
        );
        assert!(t.due_retries(t0).is_empty());
        assert_eq!(t.due_retries(t0 + Duration::from_millis(20)), vec![c]);
        let err = python::inspect(pid).unwrap_err();
        let s = t
            .record_error(c, &err, t0 + Duration::from_millis(20))
            .unwrap();
        assert_eq!(
            s,
            Seen::Failed {
                attempts: 2,
                next_retry: t0 + Duration::from_millis(70)
            }
        );
        // It exits: the due retry is dropped instead of returned.
        drop(child);
        assert!(t.due_retries(t0 + Duration::from_secs(1)).is_empty());
        assert!(t.get(pid).is_none());
    }

    /// `python3` (here pyenv's shim, a script that execs the real
    /// interpreter) is found by scanning and profiled after retries.
    #[test]
    fn real_python_is_discovered() {
        let child = ChildGuard(
            Command::new("python3")
                .args(["-c", "import time; time.sleep(30)"])
                .spawn()
                .expect("python3 on PATH"),
        );
        let pid = child.pid();
        let started = Instant::now();
        let mut t = Tracker::new();
        let mut outcomes = Vec::new();
        let profiled = loop {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "not profiled: {outcomes:?}"
            );
            let pids = list_pids();
            assert!(pids.contains(&pid));
            let mut work = t.new_candidates(&pids);
            // Decide the rest of the host without inspecting it.
            work.retain(|c| {
                if c.pid != pid {
                    t.mark(*c, Seen::NotPython);
                }
                c.pid == pid
            });
            work.extend(t.due_retries(Instant::now()));
            let mut done = None;
            for c in work {
                match python::inspect(c.pid) {
                    Ok(p) => {
                        assert_eq!(p.start_time, c.start_time);
                        t.mark(c, Seen::Profiled);
                        done = Some((c, p));
                    }
                    Err(e) => {
                        outcomes.push(e.to_string());
                        t.record_error(c, &e, Instant::now());
                    }
                }
            }
            t.prune(&pids.iter().copied().collect());
            if let Some(d) = done {
                break d;
            }
            let wait = t
                .next_retry()
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_millis(10))
                .min(Duration::from_millis(10));
            std::thread::sleep(wait);
        };
        println!(
            "profiled {} ({}) after {:?}; earlier: {outcomes:?}",
            pid,
            profiled.1.version,
            started.elapsed()
        );
        assert_eq!(profiled.1.version.minor, 11);
        // Profiled: later scans leave it alone.
        assert!(t.new_candidates(&[pid]).is_empty());
        assert_eq!(t.state(profiled.0), Some(Seen::Profiled));
        drop(child);
        let pids = list_pids();
        t.prune(&pids.iter().copied().collect());
        assert_eq!(t.take_ended(), vec![profiled.0]);
    }

    impl Tracker {
        /// Pids due at `now`, without the liveness check of `due_retries`.
        fn due_pids(&self, now: Instant) -> Vec<u32> {
            self.entries
                .iter()
                .filter(|(_, e)| {
                    matches!(e.state, Some(Seen::Failed { next_retry, .. }) if next_retry <= now)
                })
                .map(|(&p, _)| p)
                .collect()
        }
    }
}
