//! A `pyebpf daemon` under test and what tests talk to it with: a minimal
//! HTTP client, a Prometheus text parser, the pprof decoder, and the Python
//! processes it profiles.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::*;

pub const POLL: Duration = Duration::from_millis(100);

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

// ---------------------------------------------------------------- HTTP client

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Head (request or status line and headers) and the bytes after it.
pub fn split_head(raw: &[u8]) -> Option<(String, &[u8])> {
    let end = find(raw, b"\r\n\r\n")?;
    Some((
        String::from_utf8_lossy(&raw[..end]).into_owned(),
        &raw[end + 4..],
    ))
}

pub fn parse_headers<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(b, b"\r\n") {
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).expect("chunk size");
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

/// `GET path` over HTTP/1.1, one connection per request.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let (head, rest) = split_head(&raw).ok_or_else(|| bad("no end of headers"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers = parse_headers(lines);
    let mut r = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    r.body = if r
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        dechunk(rest)
    } else if let Some(n) = r.header("content-length").and_then(|v| v.parse().ok()) {
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(r)
}

// -------------------------------------------------------------- Prometheus

pub type PromSample = (String, BTreeMap<String, String>, f64);

/// `name{k="v",...} value` lines of a text exposition.
pub fn prom_parse(text: &str) -> Vec<PromSample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices();
            let mut key = String::new();
            let mut end = r.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        end = i + 1;
                        break;
                    }
                    ',' | ' ' => {}
                    '=' => {
                        let mut val = String::new();
                        chars.next(); // opening quote
                        while let Some((_, c)) = chars.next() {
                            match c {
                                '\\' => match chars.next() {
                                    Some((_, 'n')) => val.push('\n'),
                                    Some((_, c)) => val.push(c),
                                    None => {}
                                },
                                '"' => break,
                                c => val.push(c),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), val);
                    }
                    c => key.push(c),
                }
            }
            rest = &r[end..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        out.push((name, labels, value));
    }
    out
}

/// Sum of the series of `name` whose labels include all of `want`.
pub fn prom_sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    prom_parse(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

// ----------------------------------------------------------------- pprof

/// Decodes a (gzipped) pprof with tests/tools/decode_pprof.py.
pub fn decode_pprof(bytes: &[u8]) -> Value {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    let out = Command::new(Interp::Shared.path())
        .arg(repo_root().join("tests/tools/decode_pprof.py"))
        .arg(f.path())
        .output()
        .expect("run decode_pprof.py");
    assert!(
        out.status.success(),
        "decode_pprof.py failed ({}); needs `pip install -r tests/requirements.txt`:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("decode_pprof.py prints JSON")
}

/// Samples in a decoded pprof.
pub fn pprof_total(p: &Value) -> i64 {
    p["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["values"][0].as_i64().unwrap())
        .sum()
}

// ---------------------------------------------------------------- processes

/// A process started by a test; killed (and reaped) on drop.
pub struct Py {
    pub child: Child,
    /// The interpreter's pid as the host sees it.
    pub pid: u32,
    /// Taken just before the spawn.
    pub spawned: Instant,
    pub spawned_unix: u64,
    pub stdout: Option<BufReader<ChildStdout>>,
    /// argv joined by spaces, as the daemon's `cmdline` label should be.
    pub cmdline: String,
    /// Processes to SIGKILL first on drop (not our children).
    pub also_kill: Vec<u32>,
}

impl Py {
    /// `program` running scenarios.py with `scenario_args`.
    pub fn spawn(program: &Path, scenario_args: &[&str], env: &[(&str, &str)]) -> Py {
        let mut args = vec![script()];
        args.extend(scenario_args.iter().map(|a| a.to_string()));
        Py::spawn_args(program, &args, env)
    }

    /// `program` running the Python file `script` (no arguments).
    pub fn spawn_script(program: &Path, script: &Path) -> Py {
        Py::spawn_args(program, &[script.display().to_string()], &[])
    }

    fn spawn_args(program: &Path, args: &[String], env: &[(&str, &str)]) -> Py {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("DD_SERVICE")
            .env_remove("PYEBPF_DISABLE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let (spawned, spawned_unix) = (Instant::now(), unix_now());
        let child = cmd.spawn().expect("start python");
        let pid = child.id();
        let cmdline = format!("{} {}", program.display(), args.join(" "));
        Py::started(child, pid, (spawned, spawned_unix), cmdline, Vec::new())
    }

    /// A started process (`child`, or its descendant `pid`), spawned at
    /// `at`, its stdout piped.
    fn started(
        mut child: Child,
        pid: u32,
        at: (Instant, u64),
        cmdline: String,
        also_kill: Vec<u32>,
    ) -> Py {
        let stdout = child.stdout.take().map(BufReader::new);
        Py {
            child,
            pid,
            spawned: at.0,
            spawned_unix: at.1,
            stdout,
            cmdline,
            also_kill,
        }
    }

    /// `/usr/bin/python3.11` copied into a tmpfs of a new mount namespace
    /// (so its path does not exist on the host), run as pid 1 of a new pid
    /// namespace. Its host pid is the only child of `unshare`.
    pub fn spawn_hidden(scenario_args: &[&str]) -> Py {
        let args = scenario_args.join(" ");
        let at = (Instant::now(), unix_now());
        let (child, pid) = hidden_python(&args, |c| {
            c.env_remove("OTEL_SERVICE_NAME")
                .env_remove("DD_SERVICE")
                .env_remove("PYEBPF_DISABLE");
        });
        let cmdline = format!("{HIDDEN_PYTHON} {} {args}", script());
        Py::started(child, pid, at, cmdline, vec![pid])
    }

    /// Waits for the workload's "ready" line.
    pub fn wait_ready(&mut self) {
        let mut line = String::new();
        self.stdout
            .as_mut()
            .expect("stdout")
            .read_line(&mut line)
            .expect("read ready");
        assert_eq!(line.trim(), "ready", "workload {} did not start", self.pid);
    }

    pub fn kill(&mut self) {
        for pid in self.also_kill.drain(..) {
            signal(pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        self.kill();
    }
}

// ------------------------------------------------------------------ daemon

/// A running `pyebpf daemon`; killed on drop, its log printed if the test
/// is failing.
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl Daemon {
    /// Starts a daemon with `config` (`{dir}` stands for a fresh directory
    /// of its own) on a free port, and waits until /readyz says ready.
    pub fn start(name: &str, config: &str) -> Daemon {
        for attempt in 1..=3 {
            let dir = tempfile::Builder::new()
                .prefix(&format!("pyebpf-{name}-"))
                .tempdir()
                .unwrap();
            let config_path = dir.path().join("pyebpf.yaml");
            let text = config.replace("{dir}", &dir.path().display().to_string());
            std::fs::write(&config_path, text).unwrap();
            let log = dir.path().join("daemon.log");
            let (child, addr) = spawn_daemon(&config_path, &log);
            let mut d = Daemon {
                name: name.to_string(),
                child,
                addr,
                dir,
                log,
                config: config_path,
            };
            let started = Instant::now();
            match d.wait_ready(Duration::from_secs(60)) {
                Ok(()) => {
                    eprintln!("{name}: daemon ready in {:?}", started.elapsed());
                    return d;
                }
                Err(e) if attempt < 3 && d.log_text().contains("cannot listen") => {
                    eprintln!("{name}: {e}; retrying on another port");
                }
                Err(e) => panic!("{name}: daemon not ready: {e}"),
            }
        }
        unreachable!()
    }

    /// Starts the daemon again with the same configuration and directory,
    /// once the previous process has exited, logging to a new file; waits
    /// until /readyz says ready.
    pub fn restart(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_some(),
            "{}: restart while running",
            self.name
        );
        let n = std::fs::read_dir(self.dir.path())
            .map(|it| it.count())
            .unwrap_or(0);
        self.log = self.dir.path().join(format!("daemon-{n}.log"));
        let (child, addr) = spawn_daemon(&self.config, &self.log);
        self.child = child;
        self.addr = addr;
        let started = Instant::now();
        if let Err(e) = self.wait_ready(Duration::from_secs(60)) {
            panic!("{}: restarted daemon not ready: {e}", self.name);
        }
        eprintln!("{}: daemon restarted in {:?}", self.name, started.elapsed());
    }

    pub fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Err(format!("the daemon exited with {st}"));
            }
            if let Ok(r) = http_get(self.addr, "/readyz") {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Resp {
        http_get(self.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn get_ok(&self, path: &str) -> Resp {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r
    }

    pub fn processes(&self) -> Vec<Value> {
        serde_json::from_slice::<Vec<Value>>(&self.get_ok("/processes").body)
            .expect("/processes is a JSON array")
    }

    pub fn process(&self, pid: u32) -> Option<Value> {
        let mut found: Vec<Value> = self
            .processes()
            .into_iter()
            .filter(|p| p["labels"]["pid"] == json!(pid))
            .collect();
        assert!(found.len() <= 1, "pid {pid} listed twice: {found:?}");
        found.pop()
    }

    /// Polls /processes every 100 ms until each of `procs` is listed as
    /// profiled since its spawn; returns each one's entry and how long after
    /// its spawn it was first seen.
    pub fn wait_listed(&self, procs: &[&Py], within: Duration) -> Vec<(Value, Duration)> {
        let procs: Vec<_> = procs
            .iter()
            .map(|p| (p.pid, p.spawned, p.spawned_unix))
            .collect();
        self.wait_pids_listed(&procs, within)
    }

    /// [`Daemon::wait_listed`] for (pid, spawn instant, spawn unix seconds).
    pub fn wait_pids_listed(
        &self,
        procs: &[(u32, Instant, u64)],
        within: Duration,
    ) -> Vec<(Value, Duration)> {
        let mut seen: Vec<Option<(Value, Duration)>> = vec![None; procs.len()];
        let start = Instant::now();
        while seen.iter().any(Option::is_none) && start.elapsed() < within {
            let list = self.processes();
            let now = Instant::now();
            for (i, (pid, spawned, spawned_unix)) in procs.iter().enumerate() {
                if seen[i].is_some() {
                    continue;
                }
                if let Some(v) = list.iter().find(|v| {
                    v["labels"]["pid"] == json!(pid)
                        && v["status"] == "profiled"
                        && v["since"].as_u64().unwrap_or(0) >= *spawned_unix
                }) {
                    seen[i] = Some((v.clone(), now - *spawned));
                }
            }
            std::thread::sleep(POLL);
        }
        seen.into_iter()
            .zip(procs)
            .map(|(s, (pid, ..))| {
                s.unwrap_or_else(|| {
                    panic!(
                        "{}: pid {pid} not profiled {within:?} after its start",
                        self.name
                    )
                })
            })
            .collect()
    }

    pub fn folded(&self, query: &str) -> (String, Vec<(Vec<String>, u64)>) {
        let text = self.get_ok(&format!("/folded?{query}")).text();
        let stacks = parse_folded(&text);
        (text, stacks)
    }

    /// Polls `/folded?{query}` until stacks whose leaf is `leaf` have at
    /// least `min` samples there; returns the last answer. A process not
    /// profiled yet (404) is waited for as well.
    pub fn wait_leaf(&self, query: &str, leaf: &str, min: u64, within: Duration) -> String {
        let start = Instant::now();
        loop {
            let r = self.get(&format!("/folded?{query}"));
            let text = r.text();
            assert!(
                [200, 404].contains(&r.status),
                "GET /folded?{query}: {}",
                text
            );
            let n = if r.status == 200 {
                leaf_count(&parse_folded(&text), leaf)
            } else {
                0
            };
            if n >= min {
                return text;
            }
            assert!(
                start.elapsed() < within,
                "{}: {leaf} has {n} samples (want >= {min}) in /folded?{query} after {within:?}:\n{text}",
                self.name,
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Polls /processes until `pid` is listed as profiled.
    pub fn wait_profiled(&self, pid: u32, within: Duration) {
        let start = Instant::now();
        while self.process(pid).is_none_or(|v| v["status"] != "profiled") {
            assert!(
                start.elapsed() < within,
                "{}: pid {pid} not profiled after {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `/healthz` answers 200 now.
    pub fn healthy(&self) -> bool {
        http_get(self.addr, "/healthz").is_ok_and(|r| r.status == 200)
    }

    pub fn metrics(&self) -> String {
        self.get_ok("/metrics").text()
    }

    /// SIGTERM, then waits (at most `within`) for the exit.
    pub fn terminate(&mut self, within: Duration) -> (ExitStatus, Duration) {
        let t = Instant::now();
        signal(self.child.id(), libc::SIGTERM);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st, t.elapsed());
            }
            assert!(
                t.elapsed() < within,
                "{}: no exit {within:?} after SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(400)..];
            eprintln!(
                "===== {} daemon log ({} lines, last {} shown) =====\n{}\n===== end of {} daemon log =====",
                self.name,
                lines.len(),
                tail.len(),
                tail.join("\n"),
                self.name
            );
        }
    }
}

/// Makes the next process created in our pid namespace get `pid`, as root,
/// through /proc/sys/kernel/ns_last_pid; `spawn` must create exactly one
/// process. Retries if another process took the pid first.
pub fn spawn_with_pid(pid: u32, spawn: impl Fn() -> Py) -> Py {
    for attempt in 1..=20 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("write /proc/sys/kernel/ns_last_pid (root)");
        let p = spawn();
        if p.pid == pid {
            eprintln!("pid {pid} reused at attempt {attempt}");
            return p;
        }
        drop(p);
        std::thread::sleep(Duration::from_millis(20 * attempt));
    }
    panic!("could not get pid {pid} reused");
}
