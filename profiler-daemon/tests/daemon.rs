//! End to end: the real `pyebpf daemon`, real CPython processes, real
//! HTTP (issue 3, "Tests").
//!
//! Every daemon here is system-wide: it profiles every CPython process on
//! the host, the workloads of tests running in parallel included. So each test
//! has its own daemon on its own port and only looks at its own pids (or, for
//! pushes, its own service name). Each daemon logs to a file that is printed
//! when the test fails; daemons and workloads are killed on drop.
//!
//! pprof output is checked with tests/tools/decode_pprof.py, which decodes it
//! with Python's protobuf and the public schema (tests/tools/profile.proto),
//! not with this crate's code.
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The requirement: a new process is listed within this long of its start.
const DISCOVERY: Duration = Duration::from_secs(2);
/// The daemon's default sampling rate, and the pprof period it implies.
const RATE_HZ: i64 = 99;
const PERIOD_NS: i64 = 1_000_000_000 / RATE_HZ;

// ----------------------------------------------------------- hot functions

/// A scenario of tests/workloads/scenarios.py and where it burns its CPU.
#[derive(Clone, Copy, Debug)]
struct Hot {
    scenario: &'static str,
    qualname: &'static str,
    marker: &'static str,
    /// The leaf's caller (qualname, marker of the call site).
    caller: (&'static str, &'static str),
}

const PLAIN: Hot = Hot {
    scenario: "plain",
    qualname: "plain_function",
    marker: "HOT=plain",
    caller: ("loop_forever", "CALL=loop"),
};
const METHOD: Hot = Hot {
    scenario: "method",
    qualname: "Worker.method",
    marker: "HOT=method",
    caller: ("loop_forever", "CALL=loop"),
};
const NESTED: Hot = Hot {
    scenario: "nested",
    qualname: "outer.<locals>.inner",
    marker: "HOT=nested",
    caller: ("outer", "CALL=nested"),
};

fn line_of(marker: &str) -> u32 {
    *markers()
        .get(marker)
        .unwrap_or_else(|| panic!("no marker {marker}"))
}

impl Hot {
    /// The leaf as folded output shows it: `qualname (file:line)`.
    fn frame(&self) -> String {
        frame(self.qualname, self.marker)
    }

    /// The leaf as decode_pprof.py shows it: [name, file, line].
    fn pprof_frame(&self) -> Value {
        json!([self.qualname, script(), line_of(self.marker)])
    }
}

/// Checks a decoded pprof from the daemon: sample types, period, values
/// (count and count * period), and the hot function's frames with their
/// file and lines; returns the hot function's samples.
fn check_pprof(p: &Value, hot: Hot, min: i64) -> i64 {
    assert_eq!(
        p["sample_types"],
        json!([["samples", "count"], ["cpu", "nanoseconds"]])
    );
    assert_eq!(p["period_type"], json!(["cpu", "nanoseconds"]));
    assert_eq!(p["period"], json!(PERIOD_NS));
    let leaf = hot.pprof_frame();
    let caller = json!([hot.caller.0, script(), line_of(hot.caller.1)]);
    let root = json!(["<module>", script(), line_of("CALL=main")]);
    let mut n = 0;
    for s in p["samples"].as_array().unwrap() {
        let v = s["values"].as_array().unwrap();
        let count = v[0].as_i64().unwrap();
        assert!(count > 0, "sample without samples: {s}");
        assert_eq!(v[1].as_i64().unwrap(), count * PERIOD_NS, "cpu value: {s}");
        let stack = s["stack"].as_array().unwrap();
        if stack.first() == Some(&leaf) {
            n += count;
            assert_eq!(stack[1], caller, "caller of the hot function: {s}");
            assert_eq!(stack.last(), Some(&root), "root frame: {s}");
        }
    }
    assert!(
        n >= min,
        "{} has {n} samples (want >= {min}) in the pprof:\n{p:#}",
        hot.qualname
    );
    n
}

fn python_version(exe: &Path) -> String {
    let out = Command::new(exe)
        .args(["-c", "import platform; print(platform.python_version())"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl Daemon {
    /// Polls `/folded?{query}` until `hot` has at least `min` samples there.
    fn wait_hot(&self, query: &str, hot: Hot, min: u64, within: Duration) -> String {
        self.wait_leaf(query, &hot.frame(), min, within)
    }
}

// ------------------------------------------------------------------ tests

/// The API is not served beyond loopback without a token: the daemon
/// refuses to start, naming the ways out, before loading anything; with a
/// token file it serves, and `metrics_listen` serves metrics without one.
#[test]
fn bpf_api_beyond_loopback_needs_a_token() {
    if !bpf_available() {
        return;
    }
    let out = Command::new(pyebpf())
        .args(["daemon", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("not a loopback address") && err.contains("api.token_file"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let metrics_port = free_port();
    let d = Daemon::start(
        "token",
        &format!(
            "metrics_listen: 127.0.0.1:{metrics_port}\napi:\n  token_file: {}\n",
            token.display()
        ),
    );
    let status = |addr: SocketAddr, path: &str, auth: Option<&str>| {
        let mut s = TcpStream::connect(addr).unwrap();
        let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        resp.split(' ').nth(1).unwrap_or("").to_string()
    };
    assert_eq!(status(d.addr, "/processes", None), "401");
    assert_eq!(
        status(
            d.addr,
            "/processes",
            Some("0123456789abcdef0123456789abcdef")
        ),
        "200"
    );
    assert_eq!(status(d.addr, "/healthz", None), "200");
    let m = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    assert_eq!(status(m, "/metrics", None), "200");
    assert_eq!(status(m, "/processes", None), "404");
}

/// Processes started after the daemon, on both interpreters, with a service
/// name, and in another mount and pid namespace from a path the host cannot
/// see: each is listed within 2 s with the right labels, and its hot
/// function is in /folded, /profile (decoded independently) and /metrics.
#[test]
fn bpf_new_processes_are_found_labelled_and_profiled() {
    if !bpf_available() {
        return;
    }
    let d = Daemon::start(
        "discover",
        "aggregation:\n  window_secs: 2\napi:\n  show_cmdline: true\n",
    );
    let shared = Interp::Shared.path();
    let stat = Interp::Static.path();
    let mut a = Py::spawn(shared, &[PLAIN.scenario], &[]);
    let mut b = Py::spawn(stat, &[METHOD.scenario], &[]);
    let mut c = Py::spawn(
        shared,
        &[NESTED.scenario],
        &[("OTEL_SERVICE_NAME", "checkout")],
    );
    let mut h = Py::spawn_hidden(&[PLAIN.scenario]);
    let procs = [&a, &b, &c, &h];
    let found = d.wait_listed(&procs, Duration::from_secs(15));
    for (p, (_, took)) in procs.iter().zip(&found) {
        eprintln!(
            "pid {} ({}) listed {took:?} after its start",
            p.pid, p.cmdline
        );
    }
    for (p, (v, took)) in procs.iter().zip(&found) {
        assert!(
            *took <= DISCOVERY,
            "pid {} ({}) listed only {took:?} after its start: {v}",
            p.pid,
            p.cmdline
        );
    }
    for p in [&mut a, &mut b, &mut c, &mut h] {
        p.wait_ready();
    }
    assert!(
        !Path::new("/mnt/hidden-python").exists(),
        "the hidden interpreter's path must not exist on the host"
    );
    assert_eq!(d.get_ok("/healthz").text().trim(), "ok");
    assert_eq!(d.get_ok("/readyz").text().trim(), "ready");

    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap().display().to_string();
    let shared_version = python_version(shared);
    let static_version = python_version(stat);
    let cases = [
        (
            &a,
            PLAIN,
            "python3",
            "python3",
            canonical(shared),
            &shared_version,
        ),
        (
            &b,
            METHOD,
            "python3.11",
            "python3.11",
            canonical(stat),
            &static_version,
        ),
        (
            &c,
            NESTED,
            "python3",
            "checkout",
            canonical(shared),
            &shared_version,
        ),
        (
            &h,
            PLAIN,
            "hidden-python",
            "hidden-python",
            "/mnt/hidden-python".to_string(),
            &static_version,
        ),
    ];
    for ((p, _, command, service, exe, version), (v, _)) in cases.iter().zip(&found) {
        let l = &v["labels"];
        assert_eq!(l["pid"], json!(p.pid), "{v}");
        assert_eq!(l["command"], json!(command), "{v}");
        assert_eq!(l["service"], json!(service), "{v}");
        assert_eq!(l["exe"], json!(exe), "{v}");
        assert_eq!(l["cmdline"], json!(p.cmdline), "{v}");
        for k in ["container_id", "pod_uid", "qos_class", "ecs_task_id"] {
            assert!(l.get(k).is_some(), "label {k} missing: {v}");
        }
        assert!(version.starts_with("3.11."), "{version}");
        assert_eq!(v["python_version"], json!(version), "{v}");
        assert_eq!(v["status"], "profiled");
    }

    // /folded: the hot leaf under its caller, from the module down.
    for (p, hot, ..) in &cases {
        let text = d.wait_hot(
            &format!("pid={}&seconds=5", p.pid),
            *hot,
            20,
            Duration::from_secs(15),
        );
        let caller = frame(hot.caller.0, hot.caller.1);
        for (s, _) in parse_folded(&text)
            .iter()
            .filter(|(s, _)| s.last() == Some(&hot.frame()))
        {
            assert_eq!(s[0], frame("<module>", "CALL=main"), "{s:?}");
            assert_eq!(s[s.len() - 2], caller, "{s:?}");
        }
        for other in [PLAIN, METHOD, NESTED] {
            if other.qualname != hot.qualname {
                assert!(
                    !text.contains(other.qualname),
                    "pid {} shows another process's function {}:\n{text}",
                    p.pid,
                    other.qualname
                );
            }
        }
    }
    // By service: the one process named checkout.
    d.wait_hot(
        "service=checkout&seconds=5",
        NESTED,
        20,
        Duration::from_secs(5),
    );

    // /profile: gzipped pprof, decoded by Python's protobuf.
    for (p, hot, ..) in &cases {
        let asked = unix_now() as i64;
        let r = d.get_ok(&format!("/profile?pid={}&seconds=5", p.pid));
        let answered = unix_now() as i64;
        assert_eq!(&r.body[..2], &[0x1f, 0x8b], "gzipped");
        let decoded = decode_pprof(&r.body);
        let n = check_pprof(&decoded, *hot, 5);
        // The last 5 s: the current second and the 4 before it.
        assert_eq!(decoded["duration_nanos"], json!(5_000_000_000i64));
        let start = decoded["time_nanos"].as_i64().unwrap() / 1_000_000_000;
        assert!(
            (asked - 4..=answered - 4).contains(&start),
            "time_nanos {start}, asked at {asked}, answered at {answered}"
        );
        eprintln!("pid {}: {n} samples of {} in /profile", p.pid, hot.qualname);
    }

    // /metrics: each process's hot function among its top functions of the
    // last closed window (2 s windows).
    let start = Instant::now();
    let mut text;
    loop {
        text = d.metrics();
        let missing: Vec<_> = cases
            .iter()
            .filter(|(p, hot, _, service, ..)| {
                prom_sum(
                    &text,
                    "pyebpf_function_samples",
                    &[
                        ("pid", &p.pid.to_string()),
                        ("service", *service),
                        ("function", hot.qualname),
                        ("file", &script()),
                    ],
                ) < 1.0
            })
            .map(|(p, hot, ..)| (p.pid, hot.qualname))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no pyebpf_function_samples for {missing:?}:\n{}",
            text.lines()
                .filter(|l| l.starts_with("pyebpf_function_samples"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(prom_sum(&text, "pyebpf_samples_received_total", &[]) > 0.0);
    assert!(prom_sum(&text, "pyebpf_processes_profiled", &[]) >= 4.0);
}

/// A bad configuration is refused with its file, line and column, both by
/// `pyebpf config check` and by `pyebpf daemon --config`, before any BPF.
#[test]
fn bad_config_fails_with_its_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        // An unknown key (a typo) on line 5, column 3.
        (
            "typo.yaml",
            "# sampling settings\nlisten: 127.0.0.1:7464\nsampling:\n  rate_hz: 99\n  rte_hz: 5\n",
            5,
            Some(3),
            "rte_hz",
        ),
        // An out-of-range value on line 4, column 16.
        (
            "range.yaml",
            "sampling:\n  rate_hz: 99\naggregation:\n  window_secs: 0\n",
            4,
            Some(16),
            "window_secs",
        ),
        // Not YAML: line 3, column 15.
        (
            "syntax.yaml",
            "sampling:\n  rate_hz: 99\n  max_depth: 5: 6\n",
            3,
            Some(15),
            "mapping values",
        ),
    ];
    for (file, text, line, column, what) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        let prefix = format!("{}:{line}:", path.display());
        let check_message = |how: &str, stderr: &str| {
            let at = stderr
                .find(&prefix)
                .unwrap_or_else(|| panic!("{how}: no `{prefix}COL` in:\n{stderr}"));
            let rest = &stderr[at + prefix.len()..];
            let col: String = rest.chars().take_while(char::is_ascii_digit).collect();
            assert!(!col.is_empty(), "{how}: no column after {prefix}: {stderr}");
            if let Some(c) = column {
                assert_eq!(col, c.to_string(), "{how}: column: {stderr}");
            }
            assert!(stderr.contains(what), "{how}: {stderr}");
        };

        let out = Command::new(pyebpf())
            .args(["config", "check"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "config check accepted {file}");
        check_message("config check", &stderr);

        let mut child = Command::new(pyebpf())
            .arg("daemon")
            .arg("--config")
            .arg(&path)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("pyebpf daemon kept running with {file}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(!status.success(), "daemon started with {file}");
        check_message("daemon --config", &stderr);
    }
    // And a good one passes the check.
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "aggregation:\n  window_secs: 2\n").unwrap();
    let out = Command::new(pyebpf())
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert_success(&out);
}

/// SIGTERM flushes the window being filled (60 s long, far from closing) to
/// outputs.pprof_dir, and the daemon exits 0 promptly.
#[test]
fn bpf_sigterm_writes_the_final_window() {
    if !bpf_available() {
        return;
    }
    let service = format!("sigterm-test-{}", std::process::id());
    let mut d = Daemon::start(
        "sigterm",
        "aggregation:\n  window_secs: 60\noutputs:\n  pprof_dir:\n    path: {dir}/profiles\n",
    );
    let p = Py::spawn(
        Interp::Shared.path(),
        &[PLAIN.scenario],
        &[("OTEL_SERVICE_NAME", &service)],
    );
    d.wait_listed(&[&p], Duration::from_secs(15));
    let text = d.wait_hot(
        &format!("pid={}&seconds=60", p.pid),
        PLAIN,
        30,
        Duration::from_secs(15),
    );
    let before = total(&parse_folded(&text));
    let dir = d.dir().join("profiles");
    let ours = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|it| {
                it.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| {
                        f.file_name()
                            .unwrap()
                            .to_string_lossy()
                            .starts_with(&format!("{service}-{}-", p.pid))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        ours(&dir).is_empty(),
        "no window closed yet: {:?}",
        ours(&dir)
    );

    let (status, took) = d.terminate(Duration::from_secs(15));
    eprintln!("exit {status} {took:?} after SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert!(d.log_text().contains("flushing the last window"));

    let files = ours(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let decoded = decode_pprof(&std::fs::read(&files[0]).unwrap());
    check_pprof(&decoded, PLAIN, 30);
    let comments = &decoded["comments"];
    for want in [format!("pid={}", p.pid), format!("service_name={service}")] {
        assert!(
            comments.as_array().unwrap().contains(&json!(want)),
            "{want} not in the comments: {comments}"
        );
    }
    // The final window covers everything since the daemon started.
    let n = pprof_total(&decoded);
    assert!(
        n >= before as i64,
        "{n} samples in the final window, {before} seen before"
    );
}

/// An exited process is listed as "exited" (its data still served), then
/// dropped once its data is past the retention.
#[test]
fn bpf_exited_processes_are_dropped() {
    if !bpf_available() {
        return;
    }
    let d = Daemon::start(
        "exited",
        "aggregation:\n  window_secs: 1\n  retention_secs: 3\n",
    );
    let mut p = Py::spawn(
        Interp::Shared.path(),
        &["exit-after:4", PLAIN.scenario],
        &[],
    );
    d.wait_listed(&[&p], Duration::from_secs(3));
    let pid = p.pid;
    d.wait_hot(
        &format!("pid={pid}&seconds=3"),
        PLAIN,
        5,
        Duration::from_secs(4),
    );
    let status = p.child.wait().unwrap();
    let exited = Instant::now();
    assert!(status.success(), "workload: {status}");

    let mut seen_exited = None;
    let gone = loop {
        let t = exited.elapsed();
        match d.process(pid) {
            None => break t,
            Some(v) if v["status"] == "exited" => {
                if seen_exited.is_none() {
                    seen_exited = Some(t);
                    // Still served while within the retention.
                    let (text, _) = d.folded(&format!("pid={pid}&seconds=3"));
                    assert!(text.contains("plain_function"), "{text}");
                }
            }
            Some(v) => assert_eq!(v["status"], "profiled", "{v}"),
        }
        assert!(
            t < Duration::from_secs(10),
            "pid {pid} still listed {t:?} after its exit"
        );
        std::thread::sleep(POLL);
    };
    eprintln!("exited: status \"exited\" after {seen_exited:?}, gone after {gone:?}");
    let seen_exited = seen_exited.expect("never listed as exited");
    assert!(seen_exited < Duration::from_secs(2), "{seen_exited:?}");
    assert!(
        gone < Duration::from_secs(3 + 4),
        "dropped only {gone:?} after the exit (retention 3 s)"
    );
    let r = d.get(&format!("/folded?pid={pid}&seconds=3"));
    assert_eq!(r.status, 404, "{}", r.text());
}

/// A pid reused by a new process running other code: the new process gets
/// fresh symbols, never the old process's functions.
#[test]
fn bpf_reused_pid_gets_fresh_symbols() {
    if !bpf_available() {
        return;
    }
    let d = Daemon::start(
        "pid-reuse",
        "aggregation:\n  window_secs: 1\n  retention_secs: 60\n",
    );
    let old = Py::spawn(Interp::Shared.path(), &[PLAIN.scenario], &[]);
    let pid = old.pid;
    d.wait_listed(&[&old], Duration::from_secs(15));
    d.wait_hot(
        &format!("pid={pid}&seconds=5"),
        PLAIN,
        20,
        Duration::from_secs(15),
    );
    drop(old);

    // The same interpreter binary, running another function.
    let new = spawn_with_pid(pid, || {
        Py::spawn(Interp::Shared.path(), &[METHOD.scenario], &[])
    });
    let found = d.wait_listed(&[&new], Duration::from_secs(15));
    eprintln!(
        "reused pid {pid} listed again {:?} after its start",
        found[0].1
    );
    assert!(found[0].1 <= DISCOVERY, "{:?}", found[0]);
    let query = format!("pid={pid}&seconds=60");
    d.wait_hot(&query, METHOD, 20, Duration::from_secs(15));
    // Everything held for the pid (all of the retention) is the new process's.
    let (text, stacks) = d.folded(&query);
    assert!(
        !text.contains("plain_function"),
        "the old process's function under the reused pid:\n{text}"
    );
    // A module's code object is freed once its import is done, so a sample
    // taken during an import may not be symbolised in time; anywhere else an
    // unknown frame would be suspect.
    for (s, _) in &stacks {
        if s.iter().any(|f| f.starts_with("[unknown")) {
            assert!(
                s.iter().any(|f| f.starts_with("_find_and_load (")),
                "unknown frame outside an import: {s:?}"
            );
        }
    }
    // Frames of the workload file are all the new process's code: the
    // module (and its class body, while importing), main, the loop and
    // Worker.method.
    let ours = format!(" ({}:", script());
    for (s, _) in &stacks {
        for f in s.iter().filter(|f| f.contains(&ours)) {
            let name = f.split(&ours).next().unwrap();
            assert!(
                [
                    "<module>",
                    "Worker",
                    "main",
                    "loop_forever",
                    "Worker.method"
                ]
                .contains(&name),
                "{f} in the reused pid's stacks:\n{text}"
            );
        }
    }
    let v = d.process(pid).unwrap();
    assert_eq!(v["status"], "profiled", "{v}");
    // Command lines are not shown by default (api.show_cmdline).
    assert_eq!(v["labels"]["cmdline"], json!("[redacted]"), "{v}");
}

/// PYEBPF_DISABLE=1 in a process's environment, and an exclude rule on its
/// command, keep a process from being profiled; others still are.
#[test]
fn bpf_opt_out_and_exclude_rules() {
    if !bpf_available() {
        return;
    }
    let d = Daemon::start(
        "exclude",
        "discovery:\n  exclude:\n    - command: pyebpf-excluded\n",
    );
    let links = tempfile::tempdir().unwrap();
    let excluded_exe = links.path().join("pyebpf-excluded");
    std::os::unix::fs::symlink(Interp::Static.path(), &excluded_exe).unwrap();

    let mut control = Py::spawn(Interp::Shared.path(), &[PLAIN.scenario], &[]);
    let mut disabled = Py::spawn(
        Interp::Shared.path(),
        &[PLAIN.scenario],
        &[("PYEBPF_DISABLE", "1")],
    );
    let mut excluded = Py::spawn(&excluded_exe, &[PLAIN.scenario], &[]);
    d.wait_listed(&[&control], Duration::from_secs(15));
    for p in [&mut control, &mut disabled, &mut excluded] {
        p.wait_ready();
    }
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", excluded.pid)).unwrap();
    assert_eq!(comm.trim(), "pyebpf-excluded");
    // Give them the time a new process has to be listed, and more.
    let until = Instant::now() + DISCOVERY + Duration::from_secs(1);
    while Instant::now() < until {
        for (p, why) in [
            (&disabled, "PYEBPF_DISABLE=1"),
            (&excluded, "excluded by command"),
        ] {
            assert!(
                d.process(p.pid).is_none(),
                "pid {} ({why}) is profiled: {:?}",
                p.pid,
                d.process(p.pid)
            );
        }
        std::thread::sleep(POLL);
    }
    for p in [&disabled, &excluded] {
        let r = d.get(&format!("/profile?pid={}&seconds=5", p.pid));
        assert_eq!(r.status, 404, "{}", r.text());
    }
    let m = d.metrics();
    assert!(
        prom_sum(
            &m,
            "pyebpf_processes_discovered_total",
            &[("result", "excluded")]
        ) >= 2.0,
        "{}",
        m.lines()
            .filter(|l| l.contains("discovered"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    d.wait_hot(
        &format!("pid={}&seconds=5", control.pid),
        PLAIN,
        10,
        Duration::from_secs(10),
    );
}

/// Runs scenarios.py (argv[1], with the rest as its arguments) in a child
/// forked without exec once a line arrives on stdin, as prefork servers
/// (gunicorn, celery) and multiprocessing's fork start method make their
/// workers; prints the child's pid.
const FORKER: &str = r#"import os, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
print("ready", flush=True)
sys.stdin.readline()
pid = os.fork()
if pid == 0:
    sys.stdout = open(os.devnull, "w")
    runpy.run_path(script, run_name="__main__")
    os._exit(0)
print(pid, flush=True)
os.waitpid(pid, 0)
"#;

/// A Python process forked (not exec'd) from a profiled one, like a
/// gunicorn worker, is found as fast as an exec'd one.
#[test]
fn bpf_forked_python_child_is_found() {
    if !bpf_available() {
        return;
    }
    let d = Daemon::start("fork", "aggregation:\n  window_secs: 2\n");
    let program = Interp::Shared.path();
    let spawned = Instant::now();
    let spawned_unix = unix_now();
    let mut child = Command::new(program)
        .arg("-c")
        .arg(FORKER)
        .arg(scenarios())
        .arg(PLAIN.scenario)
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("DD_SERVICE")
        .env_remove("PYEBPF_DISABLE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().map(BufReader::new);
    let pid = child.id();
    let mut parent = Py {
        child,
        pid,
        spawned,
        spawned_unix,
        stdout,
        cmdline: String::new(),
        also_kill: Vec::new(),
    };
    parent.wait_ready();
    d.wait_listed(&[&parent], Duration::from_secs(15));

    let forked = Instant::now();
    let forked_unix = unix_now();
    writeln!(stdin).unwrap();
    let mut line = String::new();
    parent
        .stdout
        .as_mut()
        .unwrap()
        .read_line(&mut line)
        .unwrap();
    let worker: u32 = line.trim().parse().expect("the forked child's pid");
    parent.also_kill.push(worker);
    let found = d.wait_pids_listed(&[(worker, forked, forked_unix)], Duration::from_secs(15));
    let (v, took) = &found[0];
    eprintln!("forked pid {worker} listed {took:?} after the fork");
    assert!(
        *took <= DISCOVERY,
        "forked pid {worker} listed only {took:?} after the fork: {v}"
    );
    assert_eq!(v["labels"]["command"], "python3", "{v}");
    d.wait_hot(
        &format!("pid={worker}&seconds=5"),
        PLAIN,
        10,
        Duration::from_secs(10),
    );
}

/// SIGHUP re-reads the configuration: a rule that excluded a process is
/// dropped (it gets profiled), and new outputs and window length apply.
#[test]
fn bpf_sighup_reloads_rules_and_outputs() {
    if !bpf_available() {
        return;
    }
    let links = tempfile::tempdir().unwrap();
    let exe = links.path().join("pyebpf-reload");
    std::os::unix::fs::symlink(Interp::Static.path(), &exe).unwrap();
    let service = format!("reload-{}", std::process::id());
    let d = Daemon::start(
        "reload",
        "aggregation:\n  window_secs: 60\ndiscovery:\n  exclude:\n    - command: pyebpf-reload\n",
    );
    let mut p = Py::spawn(&exe, &[PLAIN.scenario], &[("OTEL_SERVICE_NAME", &service)]);
    p.wait_ready();
    std::thread::sleep(DISCOVERY);
    assert!(d.process(p.pid).is_none(), "excluded, yet profiled");

    let profiles = d.dir().join("profiles");
    std::fs::write(
        &d.config,
        format!(
            "aggregation:\n  window_secs: 1\noutputs:\n  pprof_dir:\n    path: {}\n",
            profiles.display()
        ),
    )
    .unwrap();
    let hup = Instant::now();
    let hup_unix = unix_now();
    signal(d.child.id(), libc::SIGHUP);
    let found = d.wait_pids_listed(&[(p.pid, hup, hup_unix)], Duration::from_secs(15));
    eprintln!(
        "reload: pid {} profiled {:?} after SIGHUP",
        p.pid, found[0].1
    );
    assert!(found[0].1 <= DISCOVERY, "{:?}", found[0]);
    // 1 s windows of the process are written to the new directory.
    let prefix = format!("{service}-{}-", p.pid);
    let start = Instant::now();
    loop {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&profiles)
            .map(|it| {
                it.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| {
                        f.file_name()
                            .unwrap()
                            .to_string_lossy()
                            .starts_with(&prefix)
                    })
                    .collect()
            })
            .unwrap_or_default();
        // `<service>-<pid>-<window start>.pb.gz`: by name is by time.
        files.sort();
        if files.len() >= 3 {
            eprintln!(
                "reload: {} windows written {:?} after SIGHUP",
                files.len(),
                hup.elapsed()
            );
            // The first window was started before the reload; the last
            // one has the new length.
            let decoded = decode_pprof(&std::fs::read(files.last().unwrap()).unwrap());
            assert!(
                decoded["duration_nanos"].as_i64().unwrap() <= 2_000_000_000,
                "windows are not the new length: {}",
                decoded["duration_nanos"]
            );
            check_pprof(&decoded, PLAIN, 1);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "{} windows of {prefix}* in {} {:?} after SIGHUP",
            files.len(),
            profiles.display(),
            hup.elapsed()
        );
        std::thread::sleep(POLL);
    }
    assert!(d.log_text().contains("configuration reloaded"));
}

fn pyroscope_config(addr: SocketAddr, extra: &str) -> String {
    format!(
        "aggregation:\n  window_secs: 1\n  retention_secs: 60\noutputs:\n  pyroscope:\n    \
         url: http://{addr}\n    application_name: pyebpf-test\n    timeout_secs: 5\n{extra}"
    )
}

/// Windows of one process, in the order they arrived: one after the other,
/// none overlapping. (A window in which the process got no sample is not
/// pushed for it, so there may be gaps.)
fn check_window_order(windows: &[Ingest]) {
    for pair in windows.windows(2) {
        assert!(
            pair[0].until() <= pair[1].from(),
            "windows out of order or overlapping: [{}, {}) then [{}, {})",
            pair[0].from(),
            pair[0].until(),
            pair[1].from(),
            pair[1].until()
        );
    }
}

/// Checks one pushed window of process `p` with service `service`.
fn check_ingest(w: &Ingest, p: &Py, service: &str) {
    assert_eq!(w.method, "POST");
    assert_eq!(w.path, "/ingest");
    assert!(
        w.content_type.starts_with("multipart/form-data; boundary="),
        "{}",
        w.content_type
    );
    assert!(
        w.part_headers.contains("filename=\"profile.pprof\""),
        "{}",
        w.part_headers
    );
    let (app, labels) = w.name();
    assert_eq!(app, "pyebpf-test");
    assert_eq!(
        labels.get("service_name").map(String::as_str),
        Some(service)
    );
    assert_eq!(
        labels.get("command").map(String::as_str),
        Some("python3"),
        "{labels:?}"
    );
    assert_eq!(w.param("spyName"), Some("pyebpf"));
    assert_eq!(w.param("sampleRate"), Some("99"));
    let (from, until) = (w.from(), w.until());
    assert!(from < until, "from {from} until {until}");
    assert!(
        until >= p.spawned_unix && until <= unix_now() + 1,
        "from {from} until {until}, process started at {}",
        p.spawned_unix
    );
    let pprof = w.pprof();
    assert_eq!(pprof.time_nanos, from as i64 * 1_000_000_000);
    assert_eq!(pprof.duration_nanos, (until - from) as i64 * 1_000_000_000);
    let comments = w.comments();
    assert!(comments.contains(&format!("pid={}", p.pid)), "{comments:?}");
    assert!(w.samples() > 0);
}

/// Windows pushed to a Pyroscope ingest endpoint: multipart pprof with the
/// process's samples, its labels in `name`, and the window in from/until.
#[test]
fn bpf_push_to_pyroscope() {
    if !bpf_available() {
        return;
    }
    let rx = Receiver::start(TcpListener::bind("127.0.0.1:0").unwrap());
    let service = format!("push-ok-{}", std::process::id());
    let mut d = Daemon::start("push", &pyroscope_config(rx.addr, ""));
    let p = Py::spawn(
        Interp::Shared.path(),
        &[PLAIN.scenario],
        &[("OTEL_SERVICE_NAME", &service)],
    );
    d.wait_listed(&[&p], Duration::from_secs(15));
    let start = Instant::now();
    let windows = loop {
        let w = rx.for_service(&service);
        if w.len() >= 4 {
            break w;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} windows of {service} pushed ({} in all, errors {:?})",
            w.len(),
            rx.total(),
            rx.errors()
        );
        std::thread::sleep(POLL);
    };
    assert!(rx.errors().is_empty(), "{:?}", rx.errors());
    for w in &windows {
        check_ingest(w, &p, &service);
    }
    check_window_order(&windows);
    // The fullest window, through the independent decoder.
    let best = windows.iter().max_by_key(|w| w.samples()).unwrap();
    let decoded = decode_pprof(&best.profile);
    check_pprof(&decoded, PLAIN, 3);
    assert_eq!(pprof_total(&decoded), best.samples());

    // SIGTERM pushes the last, partial window before exiting.
    let term_unix = unix_now();
    let (status, took) = d.terminate(Duration::from_secs(20));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    let windows = rx.for_service(&service);
    check_window_order(&windows);
    let last = windows.last().unwrap();
    assert!(
        last.until() > term_unix,
        "the last window pushed ends at {}, SIGTERM at {term_unix}",
        last.until()
    );
    check_ingest(last, &p, &service);
}

/// The receiver is down when the first windows close, and comes up later on
/// the same port: every window queued meanwhile (the queue holds them all)
/// arrives (in any order: uploads run concurrently), sampling never stalled,
/// and the windows pushed add up to every sample the daemon took of the
/// process.
#[test]
fn bpf_push_survives_a_receiver_outage() {
    if !bpf_available() {
        return;
    }
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let service = format!("push-outage-{}", std::process::id());
    let mut d = Daemon::start(
        "push-outage",
        &pyroscope_config(
            addr,
            "    max_queue_bytes: 268435456\n    max_retry_secs: 120\n",
        ),
    );
    let mut p = Py::spawn(
        Interp::Shared.path(),
        &[PLAIN.scenario],
        &[("OTEL_SERVICE_NAME", &service)],
    );
    d.wait_listed(&[&p], Duration::from_secs(15));

    // Down for 5 s: sampling and window closing go on. The store is read
    // directly (the samples counter in /metrics is only updated once a
    // second, by the same loop).
    let outage = Instant::now();
    let held = |d: &Daemon| total(&d.folded(&format!("pid={}&seconds=60", p.pid)).1);
    let received_before = prom_sum(&d.metrics(), "pyebpf_samples_received_total", &[]);
    let mut last = held(&d);
    while outage.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_secs(1));
        let now = held(&d);
        assert!(
            now > last,
            "sampling stalled during the outage: {now} <= {last} samples of pid {}",
            p.pid
        );
        last = now;
    }
    let received = prom_sum(&d.metrics(), "pyebpf_samples_received_total", &[]);
    assert!(
        received > received_before,
        "pyebpf_samples_received_total stalled during the outage: {received} <= {received_before}"
    );
    let m = d.metrics();
    let failed = prom_sum(
        &m,
        "pyebpf_export_total",
        &[("target", "pyroscope"), ("result", "error")],
    );
    assert!(failed >= 1.0, "no failed push counted during the outage");
    assert!(
        prom_sum(
            &m,
            "pyebpf_function_samples",
            &[("pid", &p.pid.to_string())]
        ) > 0.0,
        "windows stopped closing during the outage"
    );

    let rx = Receiver::start(TcpListener::bind(addr).expect("rebind the receiver's port"));
    let up_unix = unix_now();
    let up = Instant::now();
    // Once a window that closed after the receiver came up has arrived and
    // nothing is held for sending, all the queued ones have been sent.
    let windows = loop {
        let mut w = rx.for_service(&service);
        let m = d.metrics();
        let held = prom_sum(&m, "pyebpf_pyroscope_queue_profiles", &[])
            + prom_sum(&m, "pyebpf_pyroscope_uploads_in_flight", &[]);
        if w.iter().any(|w| w.from() > up_unix) && held == 0.0 {
            w.sort_by_key(Ingest::from);
            break w;
        }
        assert!(
            up.elapsed() < Duration::from_secs(45),
            "pushes did not resume: {} windows of {service} ({} in all, errors {:?})",
            w.len(),
            rx.total(),
            rx.errors()
        );
        std::thread::sleep(POLL);
    };
    eprintln!(
        "outage: {} windows of {service} received, the last queued one {:?} after the receiver came up",
        windows.len(),
        up.elapsed()
    );
    assert!(rx.errors().is_empty(), "{:?}", rx.errors());
    for w in &windows {
        check_ingest(w, &p, &service);
    }
    check_window_order(&windows);
    let outage_unix = up_unix - up.duration_since(outage).as_secs();
    assert!(
        windows
            .iter()
            .filter(|w| w.until() <= up_unix && w.from() >= outage_unix)
            .count()
            >= 3,
        "windows of the outage missing"
    );

    // Nothing lost: once the workload is gone and the daemon has flushed
    // and sent everything (SIGTERM), the windows pushed for it add up to
    // every sample the daemon holds for it (all within the retention).
    let pid = p.pid;
    p.kill();
    let start = Instant::now();
    while d.process(pid).is_none_or(|v| v["status"] != "exited") {
        assert!(start.elapsed() < Duration::from_secs(5), "exit not seen");
        std::thread::sleep(POLL);
    }
    let held = |d: &Daemon| total(&d.folded(&format!("pid={pid}&seconds=60")).1);
    let mut before = held(&d);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = held(&d);
        if now == before {
            break;
        }
        before = now;
    }
    let m = d.metrics();
    assert_eq!(
        prom_sum(
            &m,
            "pyebpf_export_total",
            &[("target", "pyroscope"), ("result", "dropped")]
        ),
        0.0,
        "windows dropped"
    );
    let (status, _) = d.terminate(Duration::from_secs(20));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let mut windows = rx.for_service(&service);
    windows.sort_by_key(Ingest::from);
    check_window_order(&windows);
    let pushed: i64 = windows.iter().map(Ingest::samples).sum();
    eprintln!(
        "outage: {pushed} samples pushed in {} windows, {before} held",
        windows.len()
    );
    assert_eq!(
        pushed, before as i64,
        "samples pushed vs held by the daemon"
    );
}

/// One daemon profiles CPython 3.11, 3.13, 3.14 and 3.15 at once (the newer
/// ones from Debian roots, in their own namespaces; static and libpython
/// builds): each is listed with its version, its hot function has its own
/// name and exact line, and /metrics counts them by version.
#[test]
fn bpf_every_python_version_at_once() {
    use common::pythons::{python, Python};
    if !bpf_available() {
        return;
    }
    let interpreters = ["3.11-shared", "3.13-static", "3.14-shared", "3.15-static"];
    let pythons: Vec<Python> = interpreters
        .iter()
        .filter_map(|name| {
            let p = python(name);
            if p.is_none() {
                assert!(
                    std::env::var_os("PYEBPF_REQUIRE_BPF_TESTS").is_none(),
                    "no interpreter {name} (see `cargo xtask bootstrap`)"
                );
                eprintln!("SKIPPED: no interpreter {name}");
            }
            p
        })
        .collect();
    if pythons.len() < interpreters.len() {
        return;
    }
    let d = Daemon::start("versions", "aggregation:\n  window_secs: 2\n");
    // A different hot function in each, so no stack can be credited to the
    // wrong process unnoticed.
    let hots = [PLAIN, METHOD, NESTED, PLAIN];
    let spawned_unix = unix_now();
    let spawned = Instant::now();
    let mut running: Vec<_> = pythons
        .iter()
        .zip(hots)
        .map(|(py, hot)| py.start("workloads/scenarios.py", &[hot.scenario]))
        .collect();
    let procs: Vec<_> = running
        .iter()
        .map(|r| (r.pid(), spawned, spawned_unix))
        .collect();
    let found = d.wait_pids_listed(&procs, Duration::from_secs(15));
    for ((py, r), (v, took)) in pythons.iter().zip(&running).zip(&found) {
        eprintln!(
            "{} (pid {}) listed {took:?} after its start",
            py.label(),
            r.pid()
        );
        let minor = format!("3.{}", py.minor());
        assert_eq!(v["python"], json!(minor), "{v}");
        assert!(
            v["python_version"]
                .as_str()
                .is_some_and(|s| s.starts_with(&format!("{minor}."))),
            "{v}"
        );
        assert_eq!(v["status"], "profiled");
    }
    for ((py, r), hot) in pythons.iter().zip(&running).zip(hots) {
        let script = py.script_path("workloads/scenarios.py");
        let at =
            |qualname: &str, marker: &str| format!("{qualname} ({script}:{})", line_of(marker));
        let leaf = at(hot.qualname, hot.marker);
        let start = Instant::now();
        let text = loop {
            let (text, stacks) = d.folded(&format!("pid={}&seconds=5", r.pid()));
            if leaf_count(&stacks, &leaf) >= 20 {
                break text;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{}: {leaf} not in /folded:\n{text}",
                py.label()
            );
            std::thread::sleep(Duration::from_millis(250));
        };
        for (s, _) in parse_folded(&text)
            .iter()
            .filter(|(s, _)| s.last() == Some(&leaf))
        {
            assert_eq!(s[0], at("<module>", "CALL=main"), "{}: {s:?}", py.label());
            assert_eq!(
                s[s.len() - 2],
                at(hot.caller.0, hot.caller.1),
                "{}: {s:?}",
                py.label()
            );
            // Imports at start-up run code objects that are freed at once
            // (see the README's known limits); the hot stacks are whole.
            assert!(
                !s.iter().any(|f| f.starts_with("[unknown")),
                "{}: {s:?}",
                py.label()
            );
        }
    }
    let text = d.metrics();
    for py in &pythons {
        let minor = format!("3.{}", py.minor());
        assert!(
            prom_sum(&text, "pyebpf_processes_profiled", &[("python", &minor)]) >= 1.0,
            "{minor} not counted:\n{}",
            text.lines()
                .filter(|l| l.contains("pyebpf_processes_"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            prom_sum(
                &text,
                "pyebpf_processes_discovered_total",
                &[("result", "profiled"), ("python", &minor)]
            ) >= 1.0
        );
    }
    running.clear();
}

/// A process that makes a new, deep stack on every sample is held to its
/// memory budget: its oldest seconds are evicted and counted, its newest
/// are whole, and a well-behaved neighbour loses nothing.
#[test]
fn bpf_memory_budgets_evict_the_oldest_seconds_counted() {
    if !bpf_available() {
        return;
    }
    const BUDGET: u64 = 1 << 20;
    let d = Daemon::start(
        "budget",
        "sampling:\n  rate_hz: 999\naggregation:\n  window_secs: 60\n  retention_secs: 60\n  \
         memory_budget_mib: 16\n  process_memory_budget_mib: 1\n",
    );
    let mut hostile = Py::spawn(Interp::Shared.path(), &["unique-stacks"], &[]);
    let mut plain = Py::spawn(Interp::Shared.path(), &[PLAIN.scenario], &[]);
    hostile.wait_ready();
    plain.wait_ready();
    d.wait_listed(&[&hostile, &plain], Duration::from_secs(5));

    // Until the hostile process has had seconds evicted twice (at 999 Hz
    // its new stacks of 50-250 frames fill 1 MiB in seconds; a loaded
    // machine gives it less CPU, hence the generous deadline), never
    // holding more than its budget meanwhile.
    let start = Instant::now();
    let mut evictions = Vec::new();
    let h2 = loop {
        let h = d.process(hostile.pid).expect("hostile listed");
        let bytes = h["memory_bytes"].as_u64().expect("memory_bytes");
        assert!(
            bytes <= BUDGET,
            "{bytes} bytes held over a {BUDGET}-byte budget: {h}"
        );
        let evicted = h["evicted_samples"].as_u64().unwrap_or(0);
        if evicted > 0 && evictions.last() != Some(&evicted) {
            evictions.push(evicted);
        }
        if evictions.len() >= 2 {
            break h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "evictions {evictions:?} after 60 s: {h}\n{}",
            d.metrics()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let p = d.process(plain.pid).expect("plain listed");
    eprintln!("budget: evictions {evictions:?}, hostile {h2}\nplain {p}");
    let evicted = h2["evicted_samples"].as_u64().unwrap_or(0);
    // Counted where an operator sees it (the metrics follow once a second).
    let start = Instant::now();
    let m = loop {
        let m = d.metrics();
        if prom_sum(&m, "pyebpf_store_evicted_samples_total", &[]) >= evicted as f64 {
            break m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{evicted} evicted:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let held: f64 = prom_sum(&m, "pyebpf_store_bytes", &[]);
    assert!(
        held > 0.0 && held <= (16u64 << 20) as f64,
        "{held} bytes held"
    );
    assert_eq!(
        prom_sum(&m, "pyebpf_store_budget_bytes", &[("scope", "process")]),
        BUDGET as f64
    );
    // The newest seconds are whole: they hold its own frames, not the
    // overflow stack (a second of new stacks fits the budget).
    let (text, stacks) = d.folded(&format!("pid={}&seconds=2", hostile.pid));
    let total: u64 = stacks.iter().map(|(_, n)| n).sum();
    let full: u64 = stacks
        .iter()
        .filter(|(s, _)| s.iter().any(|f| f == "[stack table full]"))
        .map(|(_, n)| n)
        .sum();
    let generated = stacks
        .iter()
        .filter(|(s, _)| s.iter().any(|f| f.starts_with("unique_")))
        .count();
    assert!(
        total > 0 && full * 10 < total,
        "{full} of {total} overflowed:\n{text}"
    );
    assert!(generated > 10, "{generated} generated stacks:\n{text}");
    // The neighbour is far under its budget: nothing of it was evicted.
    assert_eq!(p["evicted_samples"], json!(0), "{p}");
    d.wait_hot(
        &format!("pid={}&seconds=10", plain.pid),
        PLAIN,
        20,
        Duration::from_secs(10),
    );
    hostile.kill();
    plain.kill();
}
