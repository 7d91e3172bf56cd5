//! Least privilege, end to end: once the sampler is loaded and attached,
//! `pyebpf daemon`, `pyebpf record` and `pyebpf top --local` keep only the
//! capabilities reading targets needs, on every thread, and still profile
//! processes found later.
mod common;

use common::daemon::{http_get, Daemon};
use common::*;
use std::io::Read as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// CAP_DAC_READ_SEARCH (2), CAP_SYS_PTRACE (19), CAP_CHECKPOINT_RESTORE (40):
/// what `pyebpf::caps::KEEP_AFTER_START` keeps of a root test runner's set.
const KEPT: u64 = (1 << 2) | (1 << 19) | (1 << 40);

fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in:\n{status}"))
        .trim()
        .to_string()
}

/// Every thread of `pid` has exactly [`KEPT`] as its effective, permitted
/// and bounding sets, no ambient or inheritable ones, and `no_new_privs`.
fn assert_dropped(pid: u32) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads");
    let mut n = 0;
    for t in tasks {
        let path = t.expect("thread entry").path().join("status");
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue; // a thread that just ended
        };
        n += 1;
        let name = status_field(&status, "Name:");
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            let v = u64::from_str_radix(&status_field(&status, set), 16).expect("hex");
            assert_eq!(v, KEPT, "{} thread {name}: {set} {v:#x}", path.display());
        }
        for set in ["CapInh:", "CapAmb:"] {
            let v = u64::from_str_radix(&status_field(&status, set), 16).expect("hex");
            assert_eq!(v, 0, "{} thread {name}: {set} {v:#x}", path.display());
        }
        assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "thread {name}");
    }
    assert!(n >= 1, "no thread of {pid} read");
}

/// Waits until `pid`'s main thread shows the drop (it follows the
/// sampler's start), then checks every thread with [`assert_dropped`].
fn wait_dropped(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("{what} ended before dropping its capabilities: {e}"));
        if u64::from_str_radix(&status_field(&status, "CapEff:"), 16).expect("hex") == KEPT {
            break;
        }
        // Not reaped yet: a zombie.
        assert!(
            !status_field(&status, "State:").starts_with('Z'),
            "{what} ended before dropping its capabilities"
        );
        assert!(Instant::now() < deadline, "{what} never dropped them");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_dropped(pid);
}

/// The body of a 200 answer to `GET path`, else `None`.
fn ok_text(addr: SocketAddr, path: &str) -> Option<String> {
    http_get(addr, path)
        .ok()
        .filter(|r| r.status == 200)
        .map(|r| r.text())
}

fn hot_plain() -> String {
    frame("plain_function", "HOT=plain")
}

#[test]
fn bpf_daemon_keeps_only_what_reading_targets_needs() {
    if !bpf_available() {
        return;
    }
    let d = Daemon::start("caps", "aggregation:\n  window_secs: 2\n");
    assert_dropped(d.child.id());
    let text = d.log_text();
    assert!(
        text.contains("capabilities dropped; kept: CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_CHECKPOINT_RESTORE"),
        "{text}"
    );

    // Started after the drop: found, read and symbolised without the
    // capabilities the daemon gave up.
    for interp in [Interp::Shared, Interp::Static] {
        let w = Workload::start(interp, &["plain"]);
        let query = format!("pid={}&seconds=60", w.pid());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (folded, stacks) = d.folded(&query);
            if leaf_count(&stacks, &hot_plain()) >= 20 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{interp:?}: no samples at {} after the drop:\n{folded}\n{}",
                hot_plain(),
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Threads started since (inspections, exports) inherited the drop.
    assert_dropped(d.child.id());
}

#[test]
fn bpf_record_keeps_only_what_reading_targets_needs() {
    if !bpf_available() {
        return;
    }
    let w = Workload::start(Interp::Shared, &["plain"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.folded");
    let rec = Killed(
        Command::new(pyebpf())
            .args(["record", "--quiet", "--duration", "6", "--format", "folded"])
            .arg("--pid")
            .arg(w.pid().to_string())
            .arg("--output")
            .arg(&out)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pyebpf record"),
    );
    let pid = rec.0.id();
    wait_dropped(pid, "pyebpf record");
    let mut rec = rec;
    let status = rec.0.wait().expect("wait for record");
    let mut err = String::new();
    if let Some(mut e) = rec.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "record failed: {err}");
    let stacks = parse_folded(&std::fs::read_to_string(&out).unwrap());
    assert!(
        leaf_count(&stacks, &hot_plain()) >= 20,
        "no samples at {}: {stacks:?}",
        hot_plain()
    );
}

/// `top --local` drops before its runtime starts any thread, and still
/// finds, reads and shows a process started after the drop.
#[test]
fn bpf_top_local_keeps_only_what_reading_targets_needs() {
    if !bpf_available() {
        return;
    }
    let top = Killed(
        Command::new(pyebpf())
            .args(["top", "--local", "--once", "--json", "--duration", "8"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pyebpf top --local"),
    );
    let pid = top.0.id();
    wait_dropped(pid, "pyebpf top --local");
    let w = Workload::start(Interp::Static, &["plain"]);
    // The runtime's threads and the loop's, started since, inherited it.
    assert_dropped(pid);
    let mut top = top;
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = top.0.stdout.take() {
        o.read_to_string(&mut out).expect("read top's output");
    }
    let status = top.0.wait().expect("wait for top");
    if let Some(mut e) = top.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "top failed: {err}");
    let snap: pyebpf::model::top::TopSnapshot =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not a snapshot ({e}):\n{out}"));
    let own: u64 = snap
        .functions
        .iter()
        .filter(|r| r.pid == w.pid() && r.qualname == "plain_function")
        .map(|r| r.own)
        .sum();
    assert!(
        own >= 20,
        "{own} samples of plain_function in pid {}: {:?}",
        w.pid(),
        snap.functions.iter().take(10).collect::<Vec<_>>()
    );
}

/// The shipped seccomp profile (what `pyebpf seccomp-profile` prints) as a
/// seccompiler filter with the same default action (EPERM).
fn shipped_filter() -> seccompiler::BpfProgram {
    let out = Command::new(pyebpf())
        .arg("seccomp-profile")
        .output()
        .expect("run pyebpf seccomp-profile");
    assert!(out.status.success());
    let shipped =
        std::fs::read_to_string(repo_root().join("deploy/kubernetes/pyebpf-seccomp.json"))
            .expect("read the shipped profile");
    assert_eq!(String::from_utf8_lossy(&out.stdout), shipped);
    let oci: serde_json::Value = serde_json::from_str(&shipped).expect("profile is JSON");
    assert_eq!(oci["defaultAction"], "SCMP_ACT_ERRNO");
    assert_eq!(oci["defaultErrnoRet"], 1);
    let names: Vec<serde_json::Value> = oci["syscalls"]
        .as_array()
        .expect("syscalls")
        .iter()
        .inspect(|r| assert_eq!(r["action"], "SCMP_ACT_ALLOW", "{r}"))
        .flat_map(|r| r["names"].as_array().expect("names").clone())
        .map(|n| serde_json::json!({ "syscall": n }))
        .collect();
    let filters = serde_json::json!({
        "pyebpf": {
            "mismatch_action": { "errno": 1 },
            "match_action": "allow",
            "filter": names,
        }
    });
    let mut map = seccompiler::compile_from_json(
        filters.to_string().as_bytes(),
        seccompiler::TargetArch::x86_64,
    )
    .expect("every name in the profile is an x86_64 system call");
    map.remove("pyebpf").expect("compiled filter")
}

/// The daemon, confined by the profile shipped for its container, finds,
/// profiles and exports as usual, reloads and shuts down cleanly.
#[test]
fn bpf_daemon_runs_under_the_shipped_seccomp_profile() {
    use std::os::unix::process::CommandExt as _;
    if !bpf_available() {
        return;
    }
    let filter = shipped_filter();
    let dir = tempfile::tempdir().unwrap();
    let pprof = dir.path().join("pprof");
    let config = dir.path().join("pyebpf.yaml");
    let metrics_port = free_port();
    std::fs::write(
        &config,
        format!(
            "metrics_listen: 127.0.0.1:{metrics_port}\naggregation:\n  window_secs: 2\n\
             outputs:\n  pprof_dir:\n    path: {}\n",
            pprof.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let f = std::fs::File::create(&log).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new(pyebpf());
    cmd.arg("daemon")
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f));
    // SAFETY: between fork and exec only prctl(2) and seccomp(2) run, on a
    // filter compiled before the fork; no allocation, no lock.
    unsafe {
        cmd.pre_exec(move || seccompiler::apply_filter(&filter).map_err(std::io::Error::other));
    }
    let mut daemon = Killed(cmd.spawn().expect("start the confined daemon"));
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ok_text(addr, "/readyz").is_none() {
        assert!(
            daemon.0.try_wait().unwrap().is_none(),
            "the daemon died under the profile:\n{}",
            logged()
        );
        assert!(Instant::now() < deadline, "not ready:\n{}", logged());
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.0.id())).unwrap();
    assert_eq!(status_field(&status, "Seccomp:"), "2", "not confined");

    let w = Workload::start(Interp::Static, &["plain"]);
    let path = format!("/folded?pid={}&seconds=60", w.pid());
    let deadline = Instant::now() + Duration::from_secs(60);
    while leaf_count(
        &parse_folded(&ok_text(addr, &path).unwrap_or_default()),
        &hot_plain(),
    ) < 20
    {
        assert!(Instant::now() < deadline, "no samples:\n{}", logged());
        std::thread::sleep(Duration::from_millis(500));
    }
    for p in [
        format!("/profile?pid={}&seconds=10", w.pid()),
        format!("/flamegraph.svg?pid={}&seconds=10", w.pid()),
        "/processes".to_string(),
        "/api/top?seconds=10".to_string(),
        "/metrics".to_string(),
    ] {
        assert!(ok_text(addr, &p).is_some(), "{p} failed:\n{}", logged());
    }
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    assert!(ok_text(metrics_addr, "/metrics").is_some());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logged().contains("SIGHUP: configuration reloaded") {
        assert!(Instant::now() < deadline, "no reload logged:\n{}", logged());
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(w);
    // SAFETY: as above.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let exit = daemon.0.wait().unwrap();
    let text = logged();
    assert!(exit.success(), "{exit}:\n{text}");
    // A call the profile forgot fails with EPERM ("os error 1"), somewhere.
    assert!(!text.contains("os error 1)"), "a denied call:\n{text}");
    assert!(
        std::fs::read_dir(&pprof).unwrap().count() > 0,
        "no pprof file written:\n{text}"
    );
}
