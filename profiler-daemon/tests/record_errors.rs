//! `pyebpf record` refuses what it cannot profile with a one-line reason and
//! a non-zero exit, before loading anything.
mod common;

use std::process::{Command, Output, Stdio};

use common::*;

fn record_pid(pid: u32) -> Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(pyebpf())
        .args(["record", "--quiet", "--duration", "1", "--pid"])
        .arg(pid.to_string())
        .arg("--output")
        .arg(dir.path().join("p.folded"))
        .output()
        .unwrap()
}

/// Exactly one line on stderr, containing every `needles`.
fn assert_refused(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "should have failed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
}

#[test]
fn missing_pid_is_refused() {
    if !bpf_available() {
        return;
    }
    // A pid that existed and is gone.
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    assert_refused(&record_pid(pid), &[&pid.to_string(), "does not exist"]);
}

#[test]
fn non_python_process_is_refused() {
    if !bpf_available() {
        return;
    }
    let c = Killed(Command::new("sleep").arg("30").spawn().unwrap());
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_refused(&record_pid(c.0.id()), &["is not a Python process"]);
}

#[test]
fn other_python_version_is_refused() {
    if !bpf_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = build_tool(dir.path(), "fake_python.c", &["-rdynamic"]);
    let mut c = Killed(Command::new(&exe).stdout(Stdio::piped()).spawn().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(c.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_refused(
        &record_pid(c.0.id()),
        &["Python 3.16.0", "supports CPython 3.11 to 3.15"],
    );
}

#[test]
fn missing_capabilities_are_named() {
    if !bpf_available() {
        return;
    }
    let w = Workload::start(Interp::Shared, &["idle"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    // A copy the unprivileged user can reach whatever the checkout's permissions.
    let exe = dir.path().join("pyebpf");
    std::fs::copy(pyebpf(), &exe).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&exe)
        .args(["record", "--duration", "1", "--pid"])
        .arg(w.pid().to_string())
        .arg("--output")
        .arg(dir.path().join("p.folded"))
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    assert_refused(
        &out,
        &["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "missing:"],
    );
}
