//! A fake Pyroscope ingest endpoint for the end-to-end tests.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::daemon::{find, parse_headers, split_head};

/// One request received by [`Receiver`].
#[derive(Clone, Debug)]
pub struct Ingest {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub content_type: String,
    /// The `profile` part of the multipart body.
    pub profile: Vec<u8>,
    pub part_headers: String,
}

impl Ingest {
    pub fn param(&self, k: &str) -> Option<&str> {
        let mut it = self.query.iter().filter(|(n, _)| n == k);
        let v = it.next().map(|(_, v)| v.as_str());
        assert!(it.next().is_none(), "{k} given twice");
        v
    }

    /// `app{k=v,...}` of the `name` parameter.
    pub fn name(&self) -> (String, BTreeMap<String, String>) {
        let name = self.param("name").expect("name parameter");
        let (app, rest) = name.split_once('{').expect("name has labels");
        let inner = rest.strip_suffix('}').expect("name ends with }");
        let labels = inner
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("k=v");
                (k.to_string(), v.to_string())
            })
            .collect();
        (app.to_string(), labels)
    }

    pub fn service(&self) -> Option<String> {
        self.name().1.get("service_name").cloned()
    }

    pub fn from(&self) -> u64 {
        self.param("from").unwrap().parse().unwrap()
    }

    pub fn until(&self) -> u64 {
        self.param("until").unwrap().parse().unwrap()
    }

    /// The pushed pprof, decoded with this crate's prost messages (the
    /// independent decoder is used on a sample of them).
    pub fn pprof(&self) -> pyebpf::profile::pprof::proto::Profile {
        use prost::Message as _;
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&self.profile[..])
            .read_to_end(&mut raw)
            .expect("gzipped pprof");
        pyebpf::profile::pprof::proto::Profile::decode(&raw[..]).expect("pprof")
    }

    pub fn comments(&self) -> Vec<String> {
        let p = self.pprof();
        p.comment
            .iter()
            .map(|i| p.string_table[*i as usize].clone())
            .collect()
    }

    pub fn samples(&self) -> i64 {
        self.pprof().sample.iter().map(|s| s.value[0]).sum()
    }
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).expect("percent escape"));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).expect("utf-8 query")
}

pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// The `profile` part of a multipart/form-data body: (part headers, content).
pub fn multipart_profile(content_type: &str, body: &[u8]) -> Result<(String, Vec<u8>), String> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .ok_or("no boundary")?
        .trim_matches('"');
    let delim = format!("--{boundary}");
    let close = format!("\r\n--{boundary}--");
    if !body.starts_with(format!("{delim}\r\n").as_bytes()) {
        return Err("body does not start with the boundary".into());
    }
    if find(body, close.as_bytes()).is_none() {
        return Err("no closing boundary".into());
    }
    let mut rest = &body[delim.len() + 2..];
    loop {
        let (headers, content) = split_head(rest).ok_or("part without headers")?;
        let end = find(content, format!("\r\n{delim}").as_bytes()).ok_or("unterminated part")?;
        if headers.contains("name=\"profile\"") {
            return Ok((headers, content[..end].to_vec()));
        }
        rest = &content[end + 2 + delim.len()..];
        if rest.starts_with(b"--") {
            return Err("no part named profile".into());
        }
        rest = &rest[2..];
    }
}

/// An HTTP request: method, target (path and query), headers, body.
pub type Request = (String, String, Vec<(String, String)>, Vec<u8>);

/// Reads one HTTP/1.1 request (with a Content-Length body).
pub fn read_request(s: &mut TcpStream) -> Result<Request, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let (head, body_start) = loop {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed in the headers".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break (String::from_utf8_lossy(&buf[..end]).into_owned(), end + 4);
        }
    };
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or("").split(' ');
    let method = request_line.next().unwrap_or("").to_string();
    let target = request_line.next().unwrap_or("").to_string();
    let headers = parse_headers(lines);
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or("no Content-Length")?;
    let mut body = buf[body_start..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed in the body".into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok((method, target, headers, body))
}

/// How [`Receiver`] answers a request (changed at run time with
/// [`Receiver::set_fault`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Records the request and answers 200 (400 if it is malformed).
    None,
    /// Answers 500 Internal Server Error.
    Status500,
    /// Answers bytes that are not HTTP, then closes.
    Garbage,
    /// Reads the request, then resets the connection (RST).
    Reset,
    /// Reads the request and never answers (until the client gives up or
    /// the receiver stops).
    Hang,
    /// Reads the request, takes this long, then records it and answers as
    /// [`Fault::None`] does: a slow server that works. The request counts
    /// as received even if the client gave up meanwhile, as on a real one.
    Slow(Duration),
}

/// A minimal Pyroscope ingest endpoint: records every request, answers 200
/// (or as its [`Fault`] says), and notes when each connection arrived.
pub struct Receiver {
    pub addr: SocketAddr,
    pub got: Arc<Mutex<Vec<Ingest>>>,
    pub errors: Arc<Mutex<Vec<String>>>,
    pub stop: Arc<AtomicBool>,
    pub thread: Option<JoinHandle<()>>,
    pub fault: Arc<Mutex<Fault>>,
    /// When each connection was accepted, and the fault it met.
    pub attempts: Arc<Mutex<Vec<(Instant, Fault)>>>,
}

/// Parses an ingest request.
fn ingest(s: &mut TcpStream) -> Result<Ingest, String> {
    read_request(s).and_then(|(method, target, headers, body)| {
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let content_type = headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let (part_headers, profile) = multipart_profile(&content_type, &body)?;
        Ok(Ingest {
            method,
            path: path.to_string(),
            query: parse_query(query),
            content_type,
            profile,
            part_headers,
        })
    })
}

/// Records `request` and answers it: 200, or 400 if it is malformed.
fn answer(
    s: &mut TcpStream,
    request: Result<Ingest, String>,
    got: &Mutex<Vec<Ingest>>,
    errors: &Mutex<Vec<String>>,
) {
    let status = match request {
        Ok(i) => {
            got.lock().unwrap().push(i);
            "200 OK"
        }
        Err(e) => {
            errors.lock().unwrap().push(e);
            "400 Bad Request"
        }
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

/// Sleeps `d`, or until the receiver stops.
fn pause(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            return;
        };
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Answers one connection with `fault` (never [`Fault::None`] nor
/// [`Fault::Slow`]).
fn misbehave(mut s: TcpStream, fault: Fault, stop: &AtomicBool) {
    let _ = read_request(&mut s);
    match fault {
        Fault::None | Fault::Slow(_) => {}
        Fault::Status500 => {
            let _ = write!(
                s,
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops\n"
            );
        }
        Fault::Garbage => {
            let _ = s.write_all(b"\x00\xffNOT HTTP AT ALL\r\n\r\n\x16\x03\x01garbage");
        }
        Fault::Reset => {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt on a socket this function owns, with a
            // linger struct of the size given; closing it then sends RST.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
        }
        Fault::Hang => {
            // Until the client closes (its timeout) or the receiver stops.
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
        }
    }
}

impl Receiver {
    pub fn start(listener: TcpListener) -> Receiver {
        Receiver::start_with(listener, Fault::None)
    }

    /// A receiver answering with `fault` until told otherwise.
    pub fn start_with(listener: TcpListener, fault: Fault) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let fault = Arc::new(Mutex::new(fault));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (got, errors, stop) = (got.clone(), errors.clone(), stop.clone());
            let (fault, attempts) = (fault.clone(), attempts.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut s) = conn else { continue };
                    let now = *fault.lock().unwrap();
                    attempts.lock().unwrap().push((Instant::now(), now));
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    // A thread per slow or faulty connection: one must not
                    // hold up the others.
                    let stop = stop.clone();
                    match now {
                        Fault::None => {
                            let r = ingest(&mut s);
                            answer(&mut s, r, &got, &errors);
                        }
                        Fault::Slow(d) => {
                            let (got, errors) = (got.clone(), errors.clone());
                            std::thread::spawn(move || {
                                let r = ingest(&mut s);
                                pause(d, &stop);
                                answer(&mut s, r, &got, &errors);
                            });
                        }
                        _ => {
                            std::thread::spawn(move || misbehave(s, now, &stop));
                        }
                    }
                }
            })
        };
        Receiver {
            addr,
            got,
            errors,
            stop,
            thread: Some(thread),
            fault,
            attempts,
        }
    }

    /// Answers from now on as `fault` says.
    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// When connections met `fault`, in arrival order.
    pub fn attempts_with(&self, fault: Fault) -> Vec<Instant> {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, f)| *f == fault)
            .map(|(t, _)| *t)
            .collect()
    }

    /// Requests for `service`, in arrival order.
    pub fn for_service(&self, service: &str) -> Vec<Ingest> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|i| i.service().as_deref() == Some(service))
            .cloned()
            .collect()
    }

    pub fn total(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
