//! Malformed files the daemon must read: an interpreter or libpython whose
//! ELF section headers are cut off (the program still runs: the kernel and
//! the dynamic loader only need its segments). The daemon keeps running and
//! lists the process as `failed`, with the reason, in `/processes`.
mod common;

use common::daemon::Daemon;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Waits until `/processes?all=1` lists `pid` as failed; returns its entry.
fn failed_entry(d: &Daemon, pid: u32) -> serde_json::Value {
    // Discovery retries for about 30 s (the file may be mid-update) first.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all: Vec<serde_json::Value> =
            serde_json::from_slice(&d.get_ok("/processes?all=1").body).expect("JSON");
        if let Some(e) = all.iter().find(|e| e["labels"]["pid"] == pid) {
            if e["status"] == "failed" {
                return e.clone();
            }
            assert_ne!(e["status"], "profiled", "{e}");
        }
        assert!(
            Instant::now() < deadline,
            "{pid} never listed as failed:\n{}",
            d.log_text()
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
    let mut d = Daemon::start("bad-elf", "aggregation:\n  window_secs: 2\n");
    let dir = tempfile::tempdir().unwrap();

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
        let e = failed_entry(&d, pid);
        let reason = e["reason"].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "{what}: no reason: {e}");
        eprintln!("{what}: {reason}");
    }
    // Still alive and serving, and the log says why.
    assert!(d.healthy());
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon exited");
    let text = d.log_text();
    assert!(text.contains("not profiled, gave up"), "{text}");
    let metrics = d.metrics();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("pyebpf_processes_discovered_total{python=\"\",result=\"failed\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
}
