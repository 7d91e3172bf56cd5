//! End to end: process lifecycle with the real daemon, the real `record`
//! and real processes: a main thread that exits before the others, exec
//! into another program, exit events of untracked processes, and a PID
//! namespace that is not the host's.
//!
//! The daemons here are system-wide and count host-wide events, so the tests
//! of this file run one at a time ([`serial_bpf_test`]).
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// `GET path` as HTTP/1.0 (no chunked encoding): status and body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// A running `pyebpf daemon`, killed on drop (its log printed on failure).
struct Daemon {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("pyebpf.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("daemon.log");
        let (child, addr) = spawn_daemon(&config_path, &log);
        let mut d = Daemon {
            child,
            addr,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("the daemon exited with {st}:\n{}", d.log_text());
            }
            if matches!(http_get(d.addr, "/readyz"), Ok((200, _))) {
                return d;
            }
            assert!(Instant::now() < deadline, "daemon not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> String {
        let (status, body) = http_get(self.addr, path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    fn process(&self, pid: u32) -> Option<Value> {
        let list: Vec<Value> = serde_json::from_str(&self.get("/processes")).unwrap();
        list.into_iter()
            .find(|p| p["labels"]["pid"] == serde_json::json!(pid))
    }

    /// Polls until `pid`'s entry satisfies `ok`.
    fn wait_process(&self, pid: u32, within: Duration, ok: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let p = self.process(pid);
            if let Some(v) = p.as_ref().filter(|v| ok(v)) {
                return v.clone();
            }
            assert!(
                start.elapsed() < within,
                "pid {pid}: not as expected after {within:?}: {p:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Samples of stacks whose leaf function is named `function`, in pid's
    /// folded profile, with the frame text seen.
    fn leaf_samples(&self, pid: u32, function: &str) -> (u64, Vec<String>) {
        let text = self.get(&format!("/folded?pid={pid}&seconds=600"));
        let mut frames = Vec::new();
        let mut n = 0;
        for (stack, count) in parse_folded(&text) {
            if let Some(leaf) = stack
                .last()
                .filter(|l| l.starts_with(&format!("{function} (")))
            {
                n += count;
                frames.push(leaf.clone());
            }
        }
        (n, frames)
    }

    fn metric(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        let text = self.get("/metrics");
        let want = match label {
            Some((k, v)) => format!("{name}{{{k}=\"{v}\"}} "),
            None => format!("{name} "),
        };
        text.lines()
            .find_map(|l| l.strip_prefix(&want))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {want} in /metrics"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("===== daemon log =====\n{}", self.log_text());
        }
    }
}

/// A child killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The 1-based line of the first line of `src` containing `marker`.
fn line_of(src: &str, marker: &str) -> u32 {
    src.lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker}")) as u32
        + 1
}

const LEADER_EXITS: &str = r#"import ctypes, os, sys, threading, time
go, stop = sys.argv[1], sys.argv[2]

def before_leader_exit():
    while not os.path.exists(go):
        for _ in range(100000): pass  # HOT:before

def after_leader_exit():
    while not os.path.exists(stop):
        for _ in range(100000): pass  # HOT:after

def worker():
    before_leader_exit()
    after_leader_exit()

threading.Thread(target=worker).start()
print("ready", flush=True)
time.sleep(float(sys.argv[3]))
# The main thread exits alone; the worker keeps the process alive.
ctypes.CDLL(None).pthread_exit(None)
"#;

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn leader_state(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("")
        .to_string()
}

/// The main thread of a profiled process exits (pthread_exit) while a
/// worker thread runs on: the process stays profiled, its stacks keep
/// coming (with code objects first seen after the main thread's exit
/// symbolised), and once the worker ends it is marked exited.
#[test]
fn bpf_main_thread_exit_keeps_the_process_profiled() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    // No rescan during the test: only the exit event can tell the end.
    let d =
        Daemon::start("aggregation:\n  window_secs: 2\ndiscovery:\n  rescan_interval_secs: 3600\n");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("leader_exits.py");
    std::fs::write(&script, LEADER_EXITS).unwrap();
    let (go, stop) = (dir.path().join("go"), dir.path().join("stop"));
    let mut child = Command::new(Interp::Shared.path())
        .arg(&script)
        .arg(&go)
        .arg(&stop)
        .arg("2")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.id();
    let child = Proc(child);
    d.wait_process(pid, Duration::from_secs(10), |p| p["status"] == "profiled");

    // The main thread is gone (a zombie), the worker runs.
    let t = Instant::now();
    while leader_state(pid) != "Z" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "main thread still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(thread_count(pid), 2);
    std::fs::write(&go, "").unwrap();
    let after = format!("after_leader_exit ({}:", script.display());
    let want_line = line_of(LEADER_EXITS, "HOT:after");
    let t = Instant::now();
    let frames = loop {
        let (n, frames) = d.leaf_samples(pid, "after_leader_exit");
        if n >= 50 {
            break frames;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "only {n} samples of after_leader_exit after the main thread's exit: {frames:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // Symbolised: its file, and mostly the hot line (the loop test is
    // the other line of the function).
    assert!(frames.iter().all(|f| f.starts_with(&after)), "{frames:?}");
    let (hot, _) = d.leaf_samples(pid, "after_leader_exit");
    let at_hot = d
        .get(&format!("/folded?pid={pid}&seconds=600"))
        .lines()
        .filter(|l| l.contains(&format!("{after}{want_line}) ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum::<u64>();
    assert!(
        at_hot * 10 >= hot * 8,
        "{at_hot} of {hot} samples at line {want_line}: {frames:?}"
    );
    let p = d.process(pid).expect("still listed");
    assert_eq!(p["status"], "profiled", "{p}");
    let exits_before = d.metric("pyebpf_process_events_total", Some(("event", "exit")));

    // The last thread ends: the process is gone.
    std::fs::write(&stop, "").unwrap();
    let t = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}/task")).exists() && thread_count(pid) > 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "worker still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(child);
    let p = d.wait_process(pid, Duration::from_secs(3), |p| p["status"] != "profiled");
    assert_eq!(p["status"], "exited", "{p}");
    // Told by the exit event.
    assert!(
        d.metric("pyebpf_process_events_total", Some(("event", "exit"))) > exits_before,
        "no exit event for the last thread"
    );
    let log = strip_ansi(&d.log_text());
    let exit_line = format!("exit event pid={pid}");
    let n = log
        .lines()
        .filter(|l| l.trim_end().ends_with(&exit_line))
        .count();
    assert_eq!(n, 1, "{exit_line}");
    assert_eq!(d.metric("pyebpf_exit_liveness_unreadable_total", None), 0.0);
}

/// Short-lived processes the daemon does not track cost no exit event:
/// 200 runs of `sleep` bring 200 exec events and no exit event, and their
/// executable is judged from its cached verdict, not inspected each time.
/// (The host is shared with other tests whose Python processes the daemon
/// does track, so exit events are checked by pid, from the daemon's log.)
#[test]
fn bpf_untracked_exits_send_no_events() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let d = Daemon::start("aggregation:\n  window_secs: 2\n");
    // `sleep` lives long enough for the daemon to handle its exec while it
    // runs. One first, so its executable is judged once before counting.
    let sleep = |_| {
        let mut c = Command::new("/bin/sleep").arg("0.02").spawn().unwrap();
        let pid = c.id();
        assert!(c.wait().unwrap().success());
        pid
    };
    sleep(0);
    std::thread::sleep(Duration::from_secs(2));
    let execs = d.metric("pyebpf_process_events_total", Some(("event", "exec")));
    let skipped = d.metric("pyebpf_exec_inspections_skipped_total", None);
    let pids: Vec<u32> = (0..200).map(sleep).collect();
    std::thread::sleep(Duration::from_secs(2));
    let exec_delta = d.metric("pyebpf_process_events_total", Some(("event", "exec"))) - execs;
    let skipped_delta = d.metric("pyebpf_exec_inspections_skipped_total", None) - skipped;
    assert!(exec_delta >= 200.0, "{exec_delta} exec events");
    let log = strip_ansi(&d.log_text());
    let exited: Vec<u32> = log
        .lines()
        .filter(|l| l.contains("exit event"))
        .filter_map(|l| {
            l.split("pid=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let ours: Vec<&u32> = exited.iter().filter(|p| pids.contains(p)).collect();
    assert!(ours.is_empty(), "exit events for untracked pids {ours:?}");
    // Most never reach the inspection (one that ends before the daemon
    // handles its exec is not looked at at all).
    assert!(
        skipped_delta >= 100.0,
        "{skipped_delta} execs decided from the cached verdict"
    );
    assert_eq!(d.metric("pyebpf_process_events_lost_total", None), 0.0);
}

/// The daemon's log without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `pyebpf daemon` in a child PID namespace (its own /proc) refuses to
/// start and says how to fix it; so does `record`.
#[test]
fn bpf_child_pid_namespace_is_refused() {
    // Serial too: its short-lived processes would count in the others'
    // host-wide event counts.
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pyebpf.yaml");
    std::fs::write(&config, "aggregation:\n  window_secs: 2\n").unwrap();
    let port = free_port().to_string();
    for args in [
        vec![
            "daemon",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        vec![
            "record",
            "--pid",
            "1",
            "--duration",
            "1",
            "--output",
            "/dev/null",
        ],
    ] {
        let out = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(pyebpf())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run unshare");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran: {err}");
        assert!(
            err.contains("not in the host's PID namespace"),
            "{args:?}: {err}"
        );
        for fix in ["hostPID: true", "--pid=host", "pidMode: host"] {
            assert!(err.contains(fix), "{args:?}: no `{fix}` in: {err}");
        }
    }
}

// CPU time, not wall time: the sample counts do not depend on the load.
const FIRST: &str = r#"import os, sys, time
def wait_for_go():
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
def first_program():
    t = time.process_time()
    while time.process_time() - t < 1.0: pass  # HOT:first
print("ready", flush=True)
wait_for_go()
first_program()
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"#;

const SECOND: &str = r#"import sys, time
# Padding, so the hot lines differ from the first program's.


def second_program():
    t = time.process_time()
    while time.process_time() - t < 2.0: pass  # HOT:second
second_program()
"#;

/// Starts `script` (FIRST or a variant), which waits for the file `go`,
/// runs, then execs into `next` (run by the same interpreter).
fn start_first(script: &Path, go: &Path, next: &[&str]) -> (Proc, u32) {
    let mut child = Command::new(Interp::Shared.path())
        .arg(script)
        .arg(go)
        .args(next)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.id();
    (Proc(child), pid)
}

/// `pyebpf record --pid pid` to a folded file, with `go` created once the
/// sampler had time to start: its summary (stderr), the profile, and how
/// long it took after `go`.
fn record_after_go(pid: u32, go: &Path, out: &Path) -> (std::process::Output, String, Duration) {
    let child = Command::new(pyebpf())
        .args([
            "record",
            "--quiet",
            "--duration",
            "60",
            "--format",
            "folded",
        ])
        .arg("--pid")
        .arg(pid.to_string())
        .arg("--output")
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pyebpf record");
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(go, "").unwrap();
    let t = Instant::now();
    let output = child.wait_with_output().unwrap();
    let text = std::fs::read_to_string(out).unwrap_or_default();
    (output, text, t.elapsed())
}

/// `record` on a pid that execs into another Python program follows it:
/// the profile has both programs' functions at their own files and lines,
/// and the recording ends when the second program exits.
#[test]
fn bpf_record_follows_exec_into_another_python_program() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (first, second, go) = (
        dir.path().join("first.py"),
        dir.path().join("second.py"),
        dir.path().join("go"),
    );
    std::fs::write(&first, FIRST).unwrap();
    std::fs::write(&second, SECOND).unwrap();
    let (_child, pid) = start_first(&first, &go, &[second.to_str().unwrap()]);
    let (out, text, took) = record_after_go(pid, &go, &dir.path().join("p.folded"));
    assert_success(&out);
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(
        took < Duration::from_secs(30),
        "record did not end with its target: {summary}"
    );
    let stacks = parse_folded(&text);
    let first_frame = format!(
        "first_program ({}:{})",
        first.display(),
        line_of(FIRST, "HOT:first")
    );
    let second_frame = format!(
        "second_program ({}:{})",
        second.display(),
        line_of(SECOND, "HOT:second")
    );
    let n1 = leaf_count(&stacks, &first_frame);
    let n2 = leaf_count(&stacks, &second_frame);
    assert!(
        n1 >= 50,
        "{n1} samples of {first_frame}:\n{text}\n{summary}"
    );
    assert!(
        n2 >= 100,
        "{n2} samples of {second_frame}:\n{text}\n{summary}"
    );
    // No frame of the second program carries the first one's file, nor
    // the reverse; nothing unknown in either program's code. (Code run
    // once at start-up, e.g. a site-packages `.pth` import, can be freed
    // before it is read: the known limit for short-lived code.)
    for (stack, _) in &stacks {
        let has_first = stack.iter().any(|f| f.contains("first.py"));
        let has_second = stack.iter().any(|f| f.contains("second.py"));
        assert!(!(has_first && has_second), "mixed stack {stack:?}");
        let unknown = stack.iter().any(|f| f.contains("unknown code object"));
        let importing = stack.iter().any(|f| f.contains("<frozen importlib"));
        assert!(!unknown || importing, "{stack:?}");
    }
    // Both programs are described, and the pid's exit ended the recording.
    assert_eq!(
        summary.matches(&format!("process {pid} (")).count(),
        2,
        "{summary}"
    );
    assert!(
        summary.contains(&format!("exited during recording (samples kept): {pid}")),
        "{summary}"
    );
}

/// A target that execs into a program that is not Python is reported in
/// the summary, its samples before the exec kept, and is not waited for.
#[test]
fn bpf_record_reports_exec_into_a_non_python_program() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (first, go) = (dir.path().join("first.py"), dir.path().join("go"));
    std::fs::write(
        &first,
        FIRST.replace(
            "os.execv(sys.executable, [sys.executable] + sys.argv[2:])",
            "os.execv('/bin/sleep', ['sleep', '30'])",
        ),
    )
    .unwrap();
    let (_child, pid) = start_first(&first, &go, &[]);
    let (out, text, took) = record_after_go(pid, &go, &dir.path().join("p.folded"));
    assert_success(&out);
    let summary = String::from_utf8_lossy(&out.stderr);
    // `sleep` runs 30 s: record ended because it stopped following it.
    assert!(
        took < Duration::from_secs(20),
        "record waited for the non-Python program: {summary}"
    );
    assert!(
        summary.contains(&format!(
            "process {pid} exec'd into a program that is not profiled"
        )),
        "{summary}"
    );
    let frame = format!(
        "first_program ({}:{})",
        first.display(),
        line_of(FIRST, "HOT:first")
    );
    assert!(leaf_count(&parse_folded(&text), &frame) >= 50, "{text}");
}
