//! End to end: the real `pyebpf daemon` exporting a real CPython workload
//! over OTLP profiles (gRPC and HTTP/protobuf) to a receiver that is not
//! ours: tests/tools/otlp_receiver.py decodes every request with the
//! official `opentelemetry-proto` classes (issue 13).
//!
//! Each daemon only profiles this test's workload (an include rule on its
//! command line), so every profile it exports, and every counter, is the
//! workload's.
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const RATE_HZ: i64 = 99;
const PERIOD_NS: i64 = 1_000_000_000 / RATE_HZ;
const HEADER: &str = "x-pyebpf-test";

fn config(endpoint: &str, protocol: &str, window_secs: u64, token: &str, extra: &str) -> String {
    let only_ours = regex::escape(&format!("{} plain", script()));
    format!(
        "aggregation:\n  window_secs: {window_secs}\n  retention_secs: 120\n\
         discovery:\n  rescan_interval_secs: 1\n  include:\n    - cmdline: '{only_ours}$'\n\
         outputs:\n  otlp:\n    endpoint: {endpoint}\n    protocol: {protocol}\n    \
         headers:\n      {HEADER}: {token}\n    compression: gzip\n    timeout_secs: 5\n{extra}"
    )
}

/// Line of a `# HOT:`/`# CALL:` marker in scenarios.py.
fn line_of(marker: &str) -> u32 {
    *markers()
        .get(marker)
        .unwrap_or_else(|| panic!("no marker {marker}"))
}

/// Line of `def <name>(` in scenarios.py.
fn def_line(name: &str) -> i64 {
    let src = std::fs::read_to_string(scenarios()).unwrap();
    let i = src
        .lines()
        .position(|l| l.starts_with(&format!("def {name}(")))
        .unwrap_or_else(|| panic!("no def {name}"));
    i as i64 + 1
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// CPU seconds (user + system) the process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = after
        .split(' ')
        .skip(11)
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[0] + f[1]) as f64 / hz
}

fn python_version() -> String {
    let out = std::process::Command::new(Interp::Shared.path())
        .args(["-c", "import platform; print(platform.python_version())"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Checks one exported resource of the workload `p` (service `service`):
/// its attributes, its profile's types, period and window, and the hot
/// function's stacks with their files and lines; returns its samples.
/// One exported window of a process: its samples, those in the hot
/// function, and its span in ns since the epoch.
struct Window {
    total: i64,
    hot: i64,
    start: u64,
    end: u64,
}

fn check_resource(res: &Value, p: &Py, service: &str, window_secs: u64) -> Window {
    // /proc/PID/exe names the file a symlink (pyenv's python3) points to.
    let exe = std::fs::canonicalize(Interp::Shared.path()).unwrap();
    let a = &res["attributes"];
    assert_eq!(a["service.name"], json!(service), "{a}");
    assert_eq!(a["process.pid"], json!(p.pid), "{a}");
    assert_eq!(
        a["process.executable.name"],
        json!(exe.file_name().unwrap().to_str().unwrap()),
        "{a}"
    );
    assert_eq!(a["process.executable.path"], json!(exe.to_str().unwrap()));
    assert_eq!(a["process.runtime.name"], json!("cpython"));
    assert_eq!(a["process.runtime.version"], json!(python_version()));
    assert_eq!(a["host.name"], json!(host_name()));
    assert!(a.get("process.command_line").is_none(), "{a}");
    let profiles = res["profiles"].as_array().unwrap();
    assert_eq!(profiles.len(), 1, "{res}");
    let prof = &profiles[0];
    assert_eq!(prof["scope"][0], "pyebpf");
    assert_eq!(prof["sample_type"], json!(["cpu", "nanoseconds"]));
    assert_eq!(prof["period_type"], json!(["cpu", "nanoseconds"]));
    assert_eq!(prof["period"], json!(PERIOD_NS));
    let start = prof["time_unix_nano"].as_u64().unwrap();
    assert_eq!(start % 1_000_000_000, 0, "windows start on a second");
    let duration = prof["duration_nano"].as_u64().unwrap();
    // A window closed late (a busy host) is longer than window_secs: it
    // runs to when it was closed, on a whole second.
    assert!(
        duration >= 1_000_000_000 && duration.is_multiple_of(1_000_000_000),
        "duration {duration} (window_secs {window_secs})"
    );
    assert!(
        start / 1_000_000_000 + 1 >= p.spawned_unix,
        "window before the process"
    );
    assert_eq!(prof["profile_id"].as_str().unwrap().len(), 32);

    let cpython = json!({"profile.frame.type": "cpython"});
    let file = script();
    let leaf = json!({
        "function": "plain_function", "system_name": "plain_function", "file": file,
        "line": line_of("HOT=plain"), "start_line": def_line("plain_function"),
        "attributes": cpython, "mapping": 0,
    });
    let caller = json!({
        "function": "loop_forever", "system_name": "loop_forever", "file": file,
        "line": line_of("CALL=loop"), "start_line": def_line("loop_forever"),
        "attributes": cpython, "mapping": 0,
    });
    let (mut total, mut hot) = (0, 0);
    for s in prof["samples"].as_array().unwrap() {
        let values = s["values"].as_array().unwrap();
        assert_eq!(values.len(), 1, "{s}");
        let v = values[0].as_i64().unwrap();
        assert!(
            v > 0 && v % PERIOD_NS == 0,
            "value {v} is not samples x period"
        );
        total += v / PERIOD_NS;
        assert_eq!(
            s["attributes"],
            json!({}),
            "no thread attributes are invented"
        );
        let stack = s["stack"].as_array().unwrap();
        for f in stack {
            let synthetic = f["function"].as_str().unwrap().starts_with('[');
            if !synthetic {
                assert_eq!(f["attributes"], cpython, "a Python frame: {f}");
            }
        }
        if stack.first() == Some(&leaf) {
            hot += v / PERIOD_NS;
            assert_eq!(stack[1], caller, "caller of the hot function: {s}");
            let root = stack.last().unwrap();
            assert_eq!(root["function"], "<module>", "{s}");
            assert_eq!(root["line"], json!(line_of("CALL=main")), "{s}");
        }
    }
    assert!(total > 0);
    Window {
        total,
        hot,
        start,
        end: start + duration,
    }
}

fn metric(d: &Daemon, name: &str, labels: &[(&str, &str)]) -> f64 {
    prom_sum(&d.metrics(), name, labels)
}

/// Kills the workload, waits until the daemon holds all its samples, stops
/// the daemon (which exports the last window) and returns the samples the
/// daemon held for it.
fn finish(d: &mut Daemon, p: &mut Py) -> u64 {
    let pid = p.pid;
    p.kill();
    let start = Instant::now();
    while d.process(pid).is_none_or(|v| v["status"] != "exited") {
        assert!(start.elapsed() < Duration::from_secs(10), "exit not seen");
        std::thread::sleep(POLL);
    }
    let held = |d: &Daemon| total(&d.folded(&format!("pid={pid}&seconds=120")).1);
    let mut before = held(d);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = held(d);
        if now == before {
            break;
        }
        before = now;
    }
    let (status, _) = d.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    before
}

/// Sum of the samples of `pid` in everything the receiver accepted.
/// The hot function's exact stack must be among them (start-up windows,
/// spent importing, have none).
fn exported_samples(rx: &OtlpReceiver, p: &Py, service: &str, window_secs: u64) -> i64 {
    let windows: Vec<Window> = rx
        .resources_of(p.pid)
        .iter()
        .map(|(_, res)| check_resource(res, p, service, window_secs))
        .collect();
    let total: i64 = windows.iter().map(|w| w.total).sum();
    let hot: i64 = windows.iter().map(|w| w.hot).sum();
    assert!(
        hot * 2 > total,
        "{hot} of {total} samples in the hot function"
    );
    // At most one sample per period (one busy thread) over the time the
    // windows span. Not per window: a window holds the samples read while
    // it was open, and on a busy host the ring buffer's reader can lag, so
    // the first window may also hold up to a second of earlier samples,
    // and a window those of the one before it (even a dropped one).
    let first = windows.iter().map(|w| w.start).min().unwrap_or(0);
    let last = windows.iter().map(|w| w.end).max().unwrap_or(0);
    let span_secs = (last.saturating_sub(first) / 1_000_000_000) as i64;
    let max = RATE_HZ * (span_secs + 1);
    assert!(
        total <= max + max / 10 + 2,
        "{total} samples in {} windows over {span_secs} s",
        windows.len()
    );
    total
}

/// Waits for at least `n` accepted requests carrying `pid`.
fn wait_windows(rx: &OtlpReceiver, pid: u32, n: usize, within: Duration) {
    let t = Instant::now();
    while rx.resources_of(pid).len() < n {
        assert!(
            t.elapsed() < within,
            "{} windows of pid {pid} exported in {within:?} ({} requests: {:?})",
            rx.resources_of(pid).len(),
            rx.requests().len(),
            rx.requests().last()
        );
        std::thread::sleep(POLL);
    }
}

/// gRPC: windows arrive as ExportProfilesServiceRequests the official
/// classes decode, with the workload's stack, lines, attributes and frame
/// types, gzip, the configured header; the samples add up to what the
/// daemon took and are consistent with the workload's CPU time and the rate.
#[test]
fn bpf_otlp_grpc_export() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let rx = OtlpReceiver::start();
    let token = format!("token-{}", std::process::id());
    let endpoint = format!("http://127.0.0.1:{}", rx.grpc_port);
    let mut d = Daemon::start("otlp-grpc", &config(&endpoint, "grpc", 2, &token, ""));
    let service = format!("otlp-grpc-{}", std::process::id());
    let mut p = Py::spawn(
        Interp::Shared.path(),
        &["plain"],
        &[("OTEL_SERVICE_NAME", &service)],
    );
    d.wait_listed(&[&p], Duration::from_secs(15));
    let cpu0 = cpu_secs(p.pid);
    wait_windows(&rx, p.pid, 4, Duration::from_secs(30));
    let cpu1 = cpu_secs(p.pid);

    eprintln!("grpc request metadata: {}", rx.requests()[0]["headers"]);
    for r in rx.requests() {
        assert_eq!(r["protocol"], "grpc");
        assert_eq!(r["accepted"], true, "{r}");
        assert_eq!(r["errors"], json!([]), "format errors: {r}");
        assert_eq!(r["headers"][HEADER], json!(token), "{}", r["headers"]);
        assert!(
            r["headers"]["user-agent"]
                .as_str()
                .is_some_and(|u| u.starts_with("pyebpf/")),
            "{}",
            r["headers"]
        );
    }
    let held = finish(&mut d, &mut p);
    let exported = exported_samples(&rx, &p, &service, 2);
    eprintln!(
        "grpc: {exported} samples exported in {} windows, {held} held, {:.2} CPU s while \
         watched",
        rx.resources_of(p.pid).len(),
        cpu1 - cpu0
    );
    assert_eq!(
        exported, held as i64,
        "samples exported vs held by the daemon"
    );
    // The rate: the samples of the watched span are about its CPU seconds
    // times 99 (the whole export covers more than that span).
    let watched = (cpu1 - cpu0) * RATE_HZ as f64;
    assert!(
        exported as f64 >= 0.8 * watched,
        "{exported} samples for {watched:.0} expected from the CPU time"
    );
    assert!(
        exported as f64 <= 1.1 * p.spawned.elapsed().as_secs_f64() * RATE_HZ as f64 + 5.0,
        "{exported} samples exceed the process's life at {RATE_HZ} Hz (one busy thread)"
    );
    // Window bookkeeping: one profile per process per window, and the
    // counters say the same as the receiver.
    let mut starts: Vec<u64> = rx
        .resources_of(p.pid)
        .iter()
        .map(|(_, r)| r["profiles"][0]["time_unix_nano"].as_u64().unwrap())
        .collect();
    let n = starts.len();
    starts.sort();
    starts.dedup();
    assert_eq!(starts.len(), n, "a window exported twice");
}

/// HTTP/protobuf with gzip, through an outage: the receiver answers 503
/// (Retry-After: 1) first; sampling goes on, attempts are retried and
/// counted, nothing is lost while the queue holds it, and every window
/// arrives once the receiver is back. A partial success is counted.
#[test]
fn bpf_otlp_http_outage_and_partial_success() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let mut rx = OtlpReceiver::start();
    rx.command("down");
    let token = format!("token-http-{}", std::process::id());
    let endpoint = format!("http://127.0.0.1:{}", rx.http_port);
    let mut d = Daemon::start(
        "otlp-http",
        &config(
            &endpoint,
            "http/protobuf",
            1,
            &token,
            "    max_retry_secs: 120\n",
        ),
    );
    let service = format!("otlp-http-{}", std::process::id());
    let mut p = Py::spawn(
        Interp::Shared.path(),
        &["plain"],
        &[("OTEL_SERVICE_NAME", &service)],
    );
    d.wait_listed(&[&p], Duration::from_secs(15));

    // Down for 6 s: sampling goes on, attempts fail and are counted.
    let held = |d: &Daemon| total(&d.folded(&format!("pid={}&seconds=120", p.pid)).1);
    let outage = Instant::now();
    let mut last = held(&d);
    while outage.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_secs(1));
        let now = held(&d);
        assert!(
            now > last,
            "sampling stalled during the outage: {now} <= {last}"
        );
        last = now;
    }
    let refused = rx.requests().len();
    assert!(refused >= 2, "{refused} attempts during the outage");
    assert!(rx.accepted().is_empty());
    let failed = metric(
        &d,
        "pyebpf_export_total",
        &[("target", "otlp"), ("result", "error")],
    );
    assert!(failed >= 2.0, "{failed} failed attempts counted");
    assert_eq!(
        metric(
            &d,
            "pyebpf_export_total",
            &[("target", "otlp"), ("result", "dropped")]
        ),
        0.0
    );
    // Retry-After: 1 and the back-off space the attempts: not a storm.
    assert!(refused < 40, "{refused} attempts in 6 s");

    rx.command("up");
    let up_unix = unix_now();
    let t = Instant::now();
    loop {
        let m = d.metrics();
        let held = prom_sum(&m, "pyebpf_otlp_queue_profiles", &[])
            + prom_sum(&m, "pyebpf_otlp_exports_in_flight", &[]);
        let after_up = rx.resources_of(p.pid).iter().any(|(_, r)| {
            r["profiles"][0]["time_unix_nano"].as_u64().unwrap() / 1_000_000_000 > up_unix
        });
        if after_up && held == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(45),
            "exports did not resume"
        );
        std::thread::sleep(POLL);
    }
    // A partial success: counted as such, its rejected profile as a loss.
    let before = rx.accepted().len();
    rx.command("partial 1");
    let t = Instant::now();
    while rx.accepted().len() == before {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no request after `partial`"
        );
        std::thread::sleep(POLL);
    }
    let t = Instant::now();
    while metric(&d, "pyebpf_otlp_partial_success_total", &[]) < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "partial success not counted"
        );
        std::thread::sleep(POLL);
    }
    let m = d.metrics();
    assert_eq!(
        prom_sum(
            &m,
            "pyebpf_otlp_dropped_profiles_total",
            &[("reason", "partially_rejected")]
        ),
        1.0
    );
    assert_eq!(
        prom_sum(
            &m,
            "pyebpf_otlp_dropped_profiles_total",
            &[("reason", "queue_full")]
        ),
        0.0
    );

    for r in rx.accepted() {
        assert_eq!(r["protocol"], "http");
        assert_eq!(r["path"], "/v1development/profiles");
        assert_eq!(r["errors"], json!([]), "format errors: {r}");
        assert_eq!(r["headers"]["content-type"], "application/x-protobuf");
        assert_eq!(r["headers"]["content-encoding"], "gzip");
        assert_eq!(r["gzip_magic"], true);
        assert_eq!(r["headers"][HEADER], json!(token));
    }
    let held = finish(&mut d, &mut p);
    let exported = exported_samples(&rx, &p, &service, 1);
    let windows = rx.resources_of(p.pid).len();
    eprintln!("http: {exported} samples in {windows} windows, {held} held; {refused} refused");
    assert_eq!(
        exported, held as i64,
        "samples exported vs held: nothing lost"
    );
    let mut starts: Vec<u64> = rx
        .resources_of(p.pid)
        .iter()
        .map(|(_, r)| r["profiles"][0]["time_unix_nano"].as_u64().unwrap())
        .collect();
    starts.sort();
    starts.dedup();
    assert_eq!(starts.len(), windows, "a window exported twice");
    let outage_windows = starts
        .iter()
        .filter(|&&s| s / 1_000_000_000 < up_unix)
        .count();
    assert!(
        outage_windows >= 4,
        "{outage_windows} windows of the outage arrived"
    );
}

/// A queue smaller than an outage's windows: the oldest requests are
/// dropped and counted as queue_full, the queue stays within its bound,
/// and the newest windows arrive once the receiver is back.
#[test]
fn bpf_otlp_queue_overflow_is_counted() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let mut rx = OtlpReceiver::start();
    rx.command("down");
    let endpoint = format!("http://127.0.0.1:{}", rx.grpc_port);
    const MAX: f64 = 6000.0;
    let mut d = Daemon::start(
        "otlp-overflow",
        &config(
            &endpoint,
            "grpc",
            1,
            "t",
            "    max_queue_bytes: 6000\n    max_retry_secs: 120\n",
        ),
    );
    let service = format!("otlp-overflow-{}", std::process::id());
    let mut p = Py::spawn(
        Interp::Shared.path(),
        &["plain"],
        &[("OTEL_SERVICE_NAME", &service)],
    );
    d.wait_listed(&[&p], Duration::from_secs(15));
    let t = Instant::now();
    loop {
        let m = d.metrics();
        let bytes = prom_sum(&m, "pyebpf_otlp_queue_bytes", &[]);
        assert!(bytes <= MAX, "queue holds {bytes} bytes");
        let full = prom_sum(
            &m,
            "pyebpf_otlp_dropped_profiles_total",
            &[("reason", "queue_full")],
        );
        if full >= 2.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "no overflow counted: {m}"
        );
        std::thread::sleep(POLL);
    }
    rx.command("up");
    wait_windows(&rx, p.pid, 1, Duration::from_secs(30));
    let t = Instant::now();
    loop {
        let m = d.metrics();
        let held = prom_sum(&m, "pyebpf_otlp_queue_profiles", &[])
            + prom_sum(&m, "pyebpf_otlp_exports_in_flight", &[]);
        let ok = prom_sum(
            &m,
            "pyebpf_export_total",
            &[("target", "otlp"), ("result", "ok")],
        );
        // Every profile accepted is one the receiver got (the include rule
        // leaves only the workload).
        if held == 0.0 && ok == rx.resources_of(p.pid).len() as f64 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "queue not drained: {m}"
        );
        std::thread::sleep(POLL);
    }
    let held = finish(&mut d, &mut p);
    let exported = exported_samples(&rx, &p, &service, 1);
    eprintln!("overflow: {exported} samples exported, {held} held");
    assert!(
        exported > 0 && exported < held as i64,
        "{exported} of {held}"
    );
}

/// `aggregation.per_thread`: each sample carries its thread's `thread.id`
/// and `thread.name` (semantic conventions) instead of a frame, and each
/// of tests/workloads/native_leaf.py's threads is under its own id.
#[test]
fn bpf_otlp_thread_attributes() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let rx = OtlpReceiver::start();
    let d = Daemon::start(
        "otlp-threads",
        &format!(
            "aggregation:\n  window_secs: 2\n  per_thread: true\n\
             discovery:\n  rescan_interval_secs: 1\n  include:\n    - cmdline: 'native_leaf\\.py$'\n\
             outputs:\n  otlp:\n    endpoint: http://127.0.0.1:{}\n    protocol: grpc\n    \
             timeout_secs: 5\n",
            rx.grpc_port
        ),
    );
    let py = common::pythons::Python::Host(Interp::Shared);
    let mut w = py.start("workloads/native_leaf.py", &[]);
    let tids: std::collections::HashMap<String, i64> = w
        .read_line()
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect();
    let pid = w.pid();
    d.wait_profiled(pid, Duration::from_secs(15));
    wait_windows(&rx, pid, 3, Duration::from_secs(30));
    let comm = |tid: i64| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .unwrap()
            .trim_end()
            .to_string()
    };
    let mut by_thread: std::collections::HashMap<String, i64> = Default::default();
    for (_, res) in rx.resources_of(pid) {
        for s in res["profiles"][0]["samples"].as_array().unwrap() {
            let a = &s["attributes"];
            let tid = a["thread.id"]
                .as_i64()
                .unwrap_or_else(|| panic!("no integer thread.id: {s}"));
            assert_eq!(a["thread.name"], json!(comm(tid)), "{s}");
            let stack = s["stack"].as_array().unwrap();
            assert!(
                stack
                    .iter()
                    .all(|f| !f["function"].as_str().unwrap().starts_with("thread ")),
                "the thread is an attribute, not a frame: {s}"
            );
            let leaf = stack[0]["function"].as_str().unwrap();
            if let Some(expected) = tids.get(leaf) {
                assert_eq!(tid, *expected, "{leaf} sampled under another thread: {s}");
                *by_thread.entry(leaf.to_string()).or_default() += 1;
            }
        }
    }
    for t in ["checksum", "digest", "spin"] {
        assert!(
            by_thread.get(t).is_some_and(|n| *n > 0),
            "no sample of {t} ({by_thread:?})"
        );
    }
}
