//! End to end: the daemon's profile types (`sampling.types`), on real
//! Python 3.11 processes: `/folded?type=cpu|wall|off-cpu` of
//! tests/workloads/waits.py, whose threads spend their time at the lines its
//! `# WAIT:` markers name; each type pushed to Pyroscope and OTLP as its own
//! profile; the per-process GIL metric; and a gunicorn handler blocked on a
//! lock another request holds, found by `record --mode off-cpu`.
mod common;

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::pythons::Python;
use common::stacks::{has, has_prefix, python_leaf, secs, time_of};
use common::*;
use serde_json::json;

const SCRIPT: &str = "workloads/waits.py";
const RATE_HZ: f64 = 499.0;
/// waits.py's PERIOD: the longest a thread of it blocks at once.
const PERIOD_S: f64 = 0.05;
/// Seconds of profile asked for (the current, partial second included: it
/// covers between SECONDS - 1 and SECONDS seconds).
const SECONDS: u64 = 6;
const SLEEP: &str = "[kernel] do_nanosleep";
const RECV: &str = "[kernel] unix_stream_read_generic";
const FUTEX: &str = "[kernel] futex_wait";
const SCHEDULE: &str = "[kernel] __schedule";
const GIL: &str = "[waiting for the GIL]";

/// The line of `# WAIT:<name>` in `tests/<script>`.
fn line_in(script: &str, name: &str) -> u32 {
    let src = std::fs::read_to_string(repo_root().join("tests").join(script)).expect("workload");
    let tag = format!("# WAIT:{name}");
    src.lines()
        .position(|l| l.trim_end().ends_with(&tag))
        .map(|i| i as u32 + 1)
        .unwrap_or_else(|| panic!("no {tag} in {script}"))
}

fn at(py: &Python, qualname: &str, marker: &str) -> String {
    format!(
        "{qualname} ({}:{})",
        py.script_path(SCRIPT),
        line_in(SCRIPT, marker)
    )
}

fn function(py: &Python, qualname: &str) -> String {
    format!("{qualname} ({}:", py.script_path(SCRIPT))
}

fn dump(stacks: &[(Vec<String>, u64)]) -> String {
    let mut v: Vec<_> = stacks.iter().collect();
    v.sort_by_key(|(_, c)| std::cmp::Reverse(*c));
    v.iter()
        .take(25)
        .map(|(s, c)| format!("{c} {}", s.join(";")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How far a thread's time in a query of `e` seconds may fall from `e`: the
/// waits under way at the query's two edges (at most PERIOD each, plus a
/// scheduler slice), plus 4 standard deviations of the estimate: off-CPU
/// intervals shorter than the period T = 1/rate are kept with probability
/// d/T at weight T, CPU samples count 1/rate each, so sigma^2 <= e / rate
/// (see tests/offcpu.rs).
fn tolerance(e: f64) -> f64 {
    2.0 * PERIOD_S + 0.02 + 4.0 * (e / RATE_HZ).sqrt()
}

fn daemon_config(extra: &str) -> String {
    format!(
        "sampling:\n  rate_hz: {}\n  types: [cpu, off-cpu, wall]\n\
         aggregation:\n  window_secs: 2\n  retention_secs: 60\n\
         discovery:\n  rescan_interval_secs: 1\n  include:\n    - cmdline: 'waits\\.py (split|gil)$'\n\
         {extra}",
        RATE_HZ as u64
    )
}

/// `/folded?pid=..&seconds=SECONDS&type=..`, which must answer.
fn folded(d: &Daemon, pid: u32, kind: &str) -> Vec<(Vec<String>, u64)> {
    d.folded(&format!("pid={pid}&seconds={SECONDS}&type={kind}"))
        .1
}

/// A daemon keeping cpu, off-cpu and wall profiles of waits.py's four
/// workers: each type shows what it should, at the exact lines, and each
/// is pushed to Pyroscope and OTLP as its own profile type.
#[test]
fn bpf_daemon_types_split() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let py = Python::Host(Interp::Shared);
    let pyroscope = Receiver::start(TcpListener::bind("127.0.0.1:0").unwrap());
    let otlp = OtlpReceiver::start();
    let outputs = format!(
        "outputs:\n  pyroscope:\n    url: http://{}\n    application_name: pyebpf-modes\n    \
         timeout_secs: 5\n  otlp:\n    endpoint: http://127.0.0.1:{}\n    protocol: grpc\n    \
         timeout_secs: 5\n",
        pyroscope.addr, otlp.grpc_port
    );
    let d = Daemon::start("types", &daemon_config(&outputs));
    let w = py.start(SCRIPT, &["split"]);
    let pid = w.pid();
    d.wait_profiled(pid, Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(SECONDS + 2));

    // /processes lists the types.
    let v = d.process(pid).expect("listed");
    assert_eq!(v["types"], json!(["cpu", "off-cpu", "wall"]), "{v}");
    assert!(v["gil_wait_seconds"].is_number(), "{v}");
    assert!(v["wall_seconds"].as_f64().unwrap_or(0.0) > 1.0, "{v}");
    eprintln!(
        "memory of waits.py split with cpu, off-cpu, wall after {} s: {} bytes, {} CPU samples",
        SECONDS + 2,
        v["memory_bytes"],
        v["samples"]
    );

    let off = folded(&d, pid, "off-cpu");
    let wall = folded(&d, pid, "wall");
    let cpu = folded(&d, pid, "cpu");
    let (lo, hi) = ((SECONDS - 1) as f64, SECONDS as f64);
    let tol = tolerance(hi);

    // Off-CPU: every waiter blocked at its line, in the kernel function
    // its wait sleeps in; every stack ends off CPU.
    for (st, v) in &off {
        let last = st.last().map(String::as_str);
        assert!(
            last == Some(SCHEDULE)
                || (last.is_some_and(|l| l.starts_with('[')) && has(st, SCHEDULE)),
            "not an off-CPU stack ({v} ns): {st:?}"
        );
    }
    for (f, marker, kernel) in [
        ("sleeper", "sleep", SLEEP),
        ("reader", "recv", RECV),
        ("waiter", "lock", FUTEX),
    ] {
        let line = at(&py, f, marker);
        let blocked = secs(time_of(&off, |st| {
            python_leaf(st) == Some(line.as_str()) && has(st, kernel)
        }));
        eprintln!("off-cpu: {f} blocked at {line} in {kernel}: {blocked:.3} s");
        assert!(
            blocked >= 0.5 * lo && blocked <= hi + tol,
            "off-cpu: {f} blocked {blocked:.3} s at {line} in {kernel}\n{}",
            dump(&off)
        );
    }

    // Wall: each of the seven threads is there all the time.
    for f in [
        "sleeper", "reader", "waiter", "spinner", "feeder", "holder", "main",
    ] {
        let t = secs(time_of(&wall, |st| has_prefix(st, &function(&py, f))));
        eprintln!("wall: {f} {t:.3} s (expected {lo}..{hi} +- {tol:.3})");
        assert!(
            t >= lo - tol && t <= hi + tol,
            "wall: {f} {t:.3} s, expected {lo}..{hi} s +- {tol:.3}\n{}",
            dump(&wall)
        );
    }
    // The spinner is on CPU in wall (CPU samples as time) and in cpu.
    let spin = at(&py, "spinner", "spin");
    let spin_cpu = time_of(&cpu, |st| python_leaf(st) == Some(spin.as_str()));
    let spin_wall = secs(time_of(&wall, |st| {
        python_leaf(st) == Some(spin.as_str()) && !st.last().is_some_and(|l| l.starts_with('['))
    }));
    assert!(spin_cpu > 0 && spin_wall > 0.0, "{}", dump(&cpu));
    // Wall's CPU part is the cpu profile's samples at 1/rate each: the two
    // queries differ at most by what arrived between them.
    let spin_cpu_s = spin_cpu as f64 / RATE_HZ;
    assert!(
        (spin_wall - spin_cpu_s).abs() <= 0.5 + 0.2 * spin_cpu_s,
        "spinner: {spin_wall:.3} s on CPU in wall, {spin_cpu_s:.3} s in cpu"
    );

    // CPU: no waits (CPU samples carry kernel stacks here, and one may
    // land in the scheduler itself, but never a wait's leaf), and the
    // sleepers hardly there: they wake for microseconds every PERIOD, so
    // their CPU time is far below 5% of the window (the waiter, which runs
    // its acquire/release loop whenever the holder lets go, is left out).
    assert!(
        !cpu.iter()
            .any(|(st, _)| has(st, GIL) || has(st, "[runnable: waiting for a CPU]")),
        "off-CPU frames in the cpu profile\n{}",
        dump(&cpu)
    );
    for f in ["sleeper", "reader"] {
        let n = time_of(&cpu, |st| has_prefix(st, &function(&py, f)));
        eprintln!("cpu: {f} {n} samples (spinner {spin_cpu})");
        assert!(
            n as f64 / RATE_HZ <= 0.05 * lo,
            "cpu: {f} has {n} samples (spinner {spin_cpu})\n{}",
            dump(&cpu)
        );
    }

    // A type that is not a type, and the SVG names its type.
    let r = d.get(&format!("/folded?pid={pid}&type=gpu"));
    assert_eq!(r.status, 400, "{}", r.text());
    let svg = d
        .get_ok(&format!("/flamegraph.svg?pid={pid}&type=off-cpu"))
        .text();
    assert!(svg.contains("off-CPU time"), "svg title");

    // Pyroscope: each type as its own profile (its pprof sample types),
    // nanosecond values announced as such.
    let service = v["labels"]["service"]
        .as_str()
        .expect("service")
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let by_type = loop {
        let mut by_type = std::collections::BTreeMap::new();
        for i in pyroscope.for_service(&service) {
            let p = i.pprof();
            let types: Vec<(String, String)> = p
                .sample_type
                .iter()
                .map(|t| {
                    (
                        p.string_table[t.r#type as usize].clone(),
                        p.string_table[t.unit as usize].clone(),
                    )
                })
                .collect();
            let rate = i.param("sampleRate").unwrap_or("").to_string();
            let units = i.param("units").unwrap_or("").to_string();
            by_type.insert(types, (rate, units));
        }
        if by_type.len() >= 3 || Instant::now() > deadline {
            break by_type;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("pyroscope: {by_type:?}");
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        by_type.get(&vec![s("samples", "count"), s("cpu", "nanoseconds")]),
        Some(&s("499", "samples")),
        "{by_type:?}"
    );
    for t in ["wall", "off-cpu"] {
        assert_eq!(
            by_type.get(&vec![s(t, "nanoseconds")]),
            Some(&s("1000000000", "nanoseconds")),
            "{t}: {by_type:?}"
        );
    }
    // OTLP: a Profile per type, its sample type naming it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let mut seen = std::collections::BTreeSet::new();
        for (_, res) in otlp.resources_of(pid) {
            for p in res["profiles"].as_array().into_iter().flatten() {
                seen.insert(p["sample_type"].to_string());
            }
        }
        if seen.len() >= 3 || Instant::now() > deadline {
            break seen;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("otlp: {seen:?}");
    for t in ["cpu", "wall", "off-cpu"] {
        assert!(
            seen.contains(&json!([t, "nanoseconds"]).to_string()),
            "otlp: no {t} profile in {seen:?}"
        );
    }
    drop(w);
}

/// A daemon with only cpu: the other types are a 400 naming the enabled
/// one, and no GIL metric.
#[test]
fn bpf_daemon_types_default_cpu_only() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let py = Python::Host(Interp::Shared);
    let d = Daemon::start(
        "types-cpu",
        "sampling:\n  rate_hz: 499\n\
         aggregation:\n  window_secs: 1\n  retention_secs: 60\n\
         discovery:\n  rescan_interval_secs: 1\n  include:\n    - cmdline: 'waits\\.py split$'\n",
    );
    let w = py.start(SCRIPT, &["split"]);
    d.wait_profiled(w.pid(), Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(SECONDS + 2));
    let v = d.process(w.pid()).expect("listed");
    eprintln!(
        "memory of waits.py split with cpu only after {} s: {} bytes, {} CPU samples",
        SECONDS + 2,
        v["memory_bytes"],
        v["samples"]
    );
    assert_eq!(v["types"], json!(["cpu"]), "{v}");
    assert!(v.get("gil_wait_seconds").is_none(), "{v}");
    for t in ["wall", "off-cpu"] {
        let r = d.get(&format!("/folded?pid={}&type={t}", w.pid()));
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("enabled: cpu"), "{t}: {}", r.text());
    }
    assert!(!d.metrics().contains("pyebpf_gil_wait_seconds_total{"));
}

/// GIL contention per process: two pure-Python loops fighting for the GIL
/// and a thread hashing with the GIL released. The main thread blocks on
/// stdin all along: an interval still open is never seen, so the process's
/// wall time is its three workers'. The fighters wait for the GIL 25-75%
/// of their time each (tests/offcpu.rs derives it; 36-42% measured here),
/// the hasher under 20% of its: the metric's share is between
/// 2 x 0.25 / 3 and (2 x 0.75 + 0.2) / 3, and it is the wall profile's GIL
/// time.
#[test]
fn bpf_daemon_gil_metric() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let py = Python::Host(Interp::Shared);
    let d = Daemon::start("gil", &daemon_config(""));
    let w = py.start(SCRIPT, &["gil"]);
    let pid = w.pid();
    d.wait_profiled(pid, Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(10));
    let m = d.metrics();
    let labels = [("pid", pid.to_string())];
    let want: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gil = prom_sum(&m, "pyebpf_gil_wait_seconds_total", &want);
    let wall = prom_sum(&m, "pyebpf_wall_seconds_total", &want);
    let share = gil / wall;
    eprintln!(
        "GIL wait {gil:.3} s of {wall:.3} s wall: {:.1}%",
        100.0 * share
    );
    assert!(
        (2.0 * 0.25 / 3.0..=(2.0 * 0.75 + 0.2) / 3.0).contains(&share),
        "GIL share {:.1}%",
        100.0 * share
    );
    // The hasher, with the GIL released while it hashes, hardly waits.
    let wall_p = d.folded(&format!("pid={pid}&seconds=8&type=wall")).1;
    let hasher = function(&py, "hasher");
    let hashing = time_of(&wall_p, |st| has_prefix(st, &hasher));
    let hasher_gil = time_of(&wall_p, |st| {
        has_prefix(st, &hasher) && st.last().map(String::as_str) == Some(GIL)
    });
    let hash_line = at(&py, "hasher", "hash");
    let at_hash = time_of(&wall_p, |st| python_leaf(st) == Some(hash_line.as_str()));
    eprintln!(
        "hasher: {:.3} s, {:.3} s at {hash_line}, {:.3} s waiting for the GIL",
        secs(hashing),
        secs(at_hash),
        secs(hasher_gil)
    );
    assert!(secs(hashing) > 5.0, "{}", dump(&wall_p));
    assert!(2 * at_hash >= hashing, "{}", dump(&wall_p));
    assert!(
        (hasher_gil as f64) < 0.2 * hashing as f64,
        "hasher waits for the GIL {:.3} s of {:.3}\n{}",
        secs(hasher_gil),
        secs(hashing),
        dump(&wall_p)
    );
    // The metric counts the same GIL waits as the profile: over the profile's
    // window, its GIL leaves are the fighters' and hasher's GIL time.
    let fighters_gil = time_of(&wall_p, |st| {
        has_prefix(st, &function(&py, "fighter")) && st.last().map(String::as_str) == Some(GIL)
    });
    let all_gil = time_of(&wall_p, |st| st.last().map(String::as_str) == Some(GIL));
    assert_eq!(all_gil, fighters_gil + hasher_gil, "{}", dump(&wall_p));
    drop(w);
}

// --------------------------------------------------------------- gunicorn

const APP: &str = "workloads/lock_app.py";

/// The pids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// One GET of `path` on `port`, HTTP/1.0 (the connection closes after it).
fn get(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").is_err() {
        return false;
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).is_ok() && out.starts_with(b"HTTP/1.")
}

/// A gunicorn gthread worker: one request holds a lock (HOLD = 0.2 s at a
/// time, back to back), another blocks on it. `record --mode off-cpu` of
/// the worker shows the blocked handler's line, in futex_wait, as where
/// its time went: it waits nearly all the time (the holder lets go for the
/// length of one request's round trip).
#[test]
fn bpf_gunicorn_lock_wait_off_cpu() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let port = free_port();
    let app_dir = repo_root().join("tests").join("workloads");
    let master = std::process::Command::new(Interp::Shared.path())
        .args([
            "-m",
            "gunicorn",
            "--worker-class",
            "gthread",
            "--threads",
            "4",
        ])
        .args(["--workers", "1", "--bind"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--chdir")
        .arg(&app_dir)
        .arg("lock_app:app")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start gunicorn");
    let mut master = Killed(master);
    let master_pid = master.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get(port, "/") {
        assert!(Instant::now() < deadline, "gunicorn never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let worker = *children(master_pid).first().expect("a gunicorn worker");
    // The worker is not our child: killed by pid, before its master.
    struct KillPid(u32);
    impl Drop for KillPid {
        fn drop(&mut self) {
            signal(self.0, 9);
        }
    }
    let _worker = KillPid(worker);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = ["/hold", "/wait"]
        .into_iter()
        .map(|path| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    get(port, path);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (out, text) = record(&[worker], &["--mode", "off-cpu", "--duration", "5"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let _ = master.0.kill();
    let _ = master.0.wait();
    assert_success(&out);
    let stacks = parse_folded(&text);
    let path = repo_root().join("tests").join(APP);
    let handler = format!("wait ({}:{})", path.display(), line_in(APP, "handler"));
    let blocked = secs(time_of(&stacks, |st| {
        python_leaf(st) == Some(handler.as_str()) && has(st, FUTEX)
    }));
    let in_wait = secs(time_of(&stacks, |st| {
        has_prefix(st, &format!("wait ({}:", path.display()))
    }));
    eprintln!("gunicorn: {handler} blocked {blocked:.3} s (in wait(): {in_wait:.3} s)");
    // 5 s recorded; the waiter waits all but a round trip per 0.2 s hold.
    assert!(
        blocked >= 0.6 * 5.0,
        "{handler} blocked {blocked:.3} s\n{}",
        dump(&stacks)
    );
    assert!(blocked >= 0.9 * in_wait, "{}", dump(&stacks));
    // The top Python line by off-CPU time among the app's lines.
    let hold = format!("hold ({}:{})", path.display(), line_in(APP, "hold"));
    let holding = secs(time_of(&stacks, |st| {
        python_leaf(st) == Some(hold.as_str())
    }));
    eprintln!("gunicorn: {hold} {holding:.3} s");
    assert!(holding >= 0.6 * 5.0, "{}", dump(&stacks));
}

// -------------------------------------------------------------------- top

/// A tmux server of its own, killed on drop (as tests/top.rs drives it).
struct Tmux(String);

impl Tmux {
    fn start(name: &str) -> Tmux {
        let t = Tmux(format!("pyebpf-modes-{name}-{}", std::process::id()));
        let ok = t
            .cmd()
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t"])
            .args(["-x", "200", "-y", "50"])
            .args(["env", "PS1=$ ", "TERM=xterm-256color", "bash", "--norc"])
            .status()
            .expect("tmux (apt-get install tmux)");
        assert!(ok.success(), "tmux new-session failed");
        t
    }

    fn cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new("tmux");
        c.arg("-L").arg(&self.0);
        c
    }

    fn keys(&self, keys: &[&str]) {
        let ok = self
            .cmd()
            .args(["send-keys", "-t", "t"])
            .args(keys)
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn line(&self, text: &str) {
        let ok = self
            .cmd()
            .args(["send-keys", "-t", "t", "-l", text])
            .status()
            .unwrap();
        assert!(ok.success());
        self.keys(&["Enter"]);
    }

    fn capture(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "t"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait(&self, what: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let screen = self.capture();
            if ok(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(150));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .arg("kill-server")
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The function rows of the screen: the lines after the column titles.
fn data_rows(screen: &str) -> Vec<String> {
    screen
        .lines()
        .skip_while(|l| !l.contains("OWN%"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// `m` cycles `top`'s view through cpu, wall and off-cpu (what the source
/// has), the header saying which: on CPU the spinner is the hottest
/// function; off CPU it hardly appears, and the six threads that block
/// each hold about a sixth of the time.
fn top_switches_type(source: &[&str], name: &str, pid: u32) {
    let t = Tmux::start(name);
    let mut cmd = format!("{} top --window 5 --pid {pid}", pyebpf());
    for a in source {
        cmd.push(' ');
        cmd.push_str(a);
    }
    t.line(&cmd);
    let first = |s: &str| data_rows(s).first().cloned().unwrap_or_default();
    t.wait("cpu view, spinner on top", 30, |s| {
        s.contains("type cpu") && first(s).contains("spinner")
    });
    t.keys(&["m"]);
    t.wait("wall view", 15, |s| {
        s.contains("type wall") && !data_rows(s).is_empty()
    });
    t.keys(&["m"]);
    let screen = t.wait("off-cpu view, a waiter on top", 15, |s| {
        s.contains("type off-cpu")
            && ["sleeper", "reader", "waiter", "feeder", "holder", "main"]
                .iter()
                .any(|f| first(s).contains(f))
    });
    assert!(
        !data_rows(&screen)
            .iter()
            .take(6)
            .any(|r| r.contains("spinner")),
        "the spinner among the top off-CPU functions:\n{screen}"
    );
    t.keys(&["m"]);
    t.wait("back to cpu", 15, |s| s.contains("type cpu"));
    t.keys(&["Tab"]);
    t.wait("GIL column", 15, |s| s.contains("GIL%"));
    t.keys(&["q"]);
    t.wait("top quit", 10, |s| !s.contains("GIL%"));
}

#[test]
fn bpf_top_key_switches_type_local() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let py = Python::Host(Interp::Shared);
    let w = py.start(SCRIPT, &["split"]);
    top_switches_type(&["--local", "--off-cpu", "--rate", "499"], "local", w.pid());
}

#[test]
fn bpf_top_key_switches_type_daemon() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let py = Python::Host(Interp::Shared);
    let d = Daemon::start("top-types", &daemon_config(""));
    let w = py.start(SCRIPT, &["split"]);
    d.wait_profiled(w.pid(), Duration::from_secs(15));
    // The API says which types there are, and a type not held is refused.
    let snap: serde_json::Value = serde_json::from_slice(
        &d.get_ok(&format!("/api/top?pid={}&type=off-cpu", w.pid()))
            .body,
    )
    .expect("json");
    assert_eq!(snap["kind"], json!("off-cpu"));
    assert_eq!(snap["types"], json!(["cpu", "off-cpu", "wall"]));
    let url = format!("http://{}", d.addr);
    top_switches_type(&["--daemon", &url], "daemon", w.pid());
}
