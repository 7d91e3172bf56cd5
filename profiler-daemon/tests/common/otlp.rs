//! An OTLP profiles receiver that is not ours: tests/tools/otlp_receiver.py
//! (the official `opentelemetry-proto` classes and grpcio), driven over its
//! stdin and read from its stdout, one JSON object per request.
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

pub struct OtlpReceiver {
    child: Child,
    stdin: ChildStdin,
    pub grpc_port: u16,
    pub http_port: u16,
    requests: Arc<Mutex<Vec<Value>>>,
    acks: Arc<Mutex<Vec<String>>>,
}

impl OtlpReceiver {
    /// Starts the receiver; fails the test if its Python dependencies are
    /// missing.
    pub fn start() -> OtlpReceiver {
        let mut child = Command::new(Interp::Shared.path())
            .arg(repo_root().join("tests/tools/otlp_receiver.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start otlp_receiver.py");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        let ports: Vec<u16> = first
            .strip_prefix("ready ")
            .map(|r| {
                r.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if ports.len() != 2 {
            let _ = child.kill();
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
            panic!(
                "otlp_receiver.py did not start (needs `pip install -r tests/requirements.txt`: \
                 opentelemetry-proto, grpcio): {first}\n{err}"
            );
        }
        let requests = Arc::new(Mutex::new(Vec::new()));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let (r, a) = (requests.clone(), acks.clone());
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line).expect("receiver prints JSON");
                match v["ack"].as_str() {
                    Some(cmd) => a.lock().unwrap().push(cmd.to_string()),
                    None => r.lock().unwrap().push(v),
                }
            }
        });
        let stdin = child.stdin.take().unwrap();
        OtlpReceiver {
            child,
            stdin,
            grpc_port: ports[0],
            http_port: ports[1],
            requests,
            acks,
        }
    }

    /// Sends a command and waits until the receiver has applied it.
    pub fn command(&mut self, cmd: &str) {
        let before = self
            .acks
            .lock()
            .unwrap()
            .iter()
            .filter(|a| *a == cmd)
            .count();
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let t = Instant::now();
        while self
            .acks
            .lock()
            .unwrap()
            .iter()
            .filter(|a| *a == cmd)
            .count()
            == before
        {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "receiver ignored {cmd}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every request so far (accepted or not), in arrival order.
    pub fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }

    pub fn accepted(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r["accepted"] == true)
            .collect()
    }

    /// (request, resource) of process `pid` in the accepted requests.
    pub fn resources_of(&self, pid: u32) -> Vec<(Value, Value)> {
        let mut out = Vec::new();
        for r in self.accepted() {
            for res in r["resources"].as_array().unwrap() {
                if res["attributes"]["process.pid"] == serde_json::json!(pid.to_string())
                    || res["attributes"]["process.pid"] == serde_json::json!(pid)
                {
                    out.push((r.clone(), res.clone()));
                }
            }
        }
        out
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
