//! Malformed files the daemon must read: an interpreter or libpython whose
//! ELF section headers are cut off (the program still runs: the kernel and
//! the dynamic loader only need its segments). The daemon keeps running and
//! lists the process as `failed`, with the reason, in `/processes`.
mod common;

use common::*;
use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::Write as _;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// A copy of `src` at `dst` without its section header table (and what
/// follows it): `e_shoff` (ELF64, offset 0x28) is where it starts, after
/// every segment in the files used here.
fn without_section_headers(src: &Path, dst: &Path) {
    let bytes = std::fs::read(src).expect("read the ELF file");
    let shoff = u64::from_le_bytes(bytes[0x28..0x30].try_into().unwrap()) as usize;
    assert!(
        shoff > 0 && shoff < bytes.len(),
        "{}: e_shoff {shoff}",
        src.display()
    );
    std::fs::write(dst, &bytes[..shoff]).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755)).unwrap();
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `/processes` lists `pid` as failed; returns its entry.
fn failed_entry(addr: SocketAddr, pid: u32, log: &Path) -> serde_json::Value {
    // Discovery retries for about 30 s (the file may be mid-update) first.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(text) = get(addr, "/processes") {
            let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            if let Some(e) = v
                .as_array()
                .expect("a list")
                .iter()
                .find(|e| e["labels"]["pid"] == pid)
            {
                if e["status"] == "failed" {
                    return e.clone();
                }
                assert_ne!(e["status"], "profiled", "{e}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "{pid} never listed as failed:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn libpython() -> PathBuf {
    let out = Command::new(Interp::Shared.path())
        .args([
            "-c",
            "import sysconfig, os; print(os.path.join(sysconfig.get_config_var('LIBDIR'), \
             sysconfig.get_config_var('INSTSONAME')))",
        ])
        .output()
        .expect("python3");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn bpf_malformed_elf_files_are_listed_as_failed() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pyebpf.yaml");
    std::fs::write(&config, "aggregation:\n  window_secs: 2\n").unwrap();
    let log = dir.path().join("daemon.log");
    let (child, addr) = spawn_daemon(&config, &log);
    let daemon = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(addr, "/readyz").is_none() {
        assert!(Instant::now() < deadline, "daemon not ready");
        std::thread::sleep(Duration::from_millis(200));
    }

    // 1. Debian's static interpreter, cut.
    let exe = dir.path().join("python3.11");
    without_section_headers(Path::new("/usr/bin/python3.11"), &exe);
    let cut_exe = Killed(
        Command::new(&exe)
            .arg(scenarios())
            .arg("plain")
            .stdout(Stdio::null())
            .spawn()
            .expect("run the cut interpreter"),
    );

    // 2. pyenv's libpython, cut, bind-mounted over the real one in the
    // process's own mount namespace: only /proc/PID/root shows it.
    let lib = libpython();
    let cut_lib = dir.path().join("libpython-cut.so");
    without_section_headers(&lib, &cut_lib);
    let shell = format!(
        "mount --bind {} {} && exec {} {} plain",
        cut_lib.display(),
        lib.display(),
        Interp::Shared.path().display(),
        scenarios().display()
    );
    let ns = Killed(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &shell])
            .stdout(Stdio::null())
            .spawn()
            .expect("unshare"),
    );
    let ns_pid = ns.0.id(); // sh execs the interpreter: same pid

    for (what, pid) in [("interpreter", cut_exe.0.id()), ("libpython", ns_pid)] {
        let e = failed_entry(addr, pid, &log);
        let reason = e["reason"].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "{what}: no reason: {e}");
        eprintln!("{what}: {reason}");
    }
    // Still alive and serving, and the log says why.
    assert!(get(addr, "/healthz").is_some());
    let mut d = daemon;
    assert!(d.0.try_wait().unwrap().is_none(), "the daemon exited");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("not profiled, gave up"), "{text}");
    let metrics = get(addr, "/metrics").unwrap();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("pyebpf_processes_discovered_total{python=\"\",result=\"failed\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
}
