//! A `pyebpf daemon` under test and what tests talk to it with: a minimal
//! HTTP client and a Prometheus text parser.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::*;

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

    pub fn folded(&self, query: &str) -> (String, Vec<(Vec<String>, u64)>) {
        let text = self.get_ok(&format!("/folded?{query}")).text();
        let stacks = parse_folded(&text);
        (text, stacks)
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
