//! What the daemon cannot read: an interpreter or libpython whose ELF
//! section headers are cut off (the program still runs: the kernel and the
//! dynamic loader only need its segments), and a Python process a security
//! policy does not let it read. The daemon keeps running and profiling
//! the others, and lists the process as `failed`, with the reason, in
//! `/processes`.
mod common;

use common::daemon::{Daemon, Py};
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

/// Puts the calling thread, and what it starts from now on, in a new
/// Landlock domain. A process in one may read another (`/proc/PID/exe`,
/// `root`, `mem`, `process_vm_readv`) only if it is in the same domain or
/// one nested in it, whatever its capabilities: what an SELinux or AppArmor
/// policy does to a container's daemon, without a policy to install. The
/// domain restricts one file access nothing here uses (making block
/// devices). Fails the test where Landlock is not available.
fn enter_landlock_domain() {
    /// `struct landlock_ruleset_attr` of Landlock ABI 1.
    #[repr(C)]
    struct RulesetAttr {
        handled_access_fs: u64,
    }
    const LANDLOCK_ACCESS_FS_MAKE_BLOCK: u64 = 1 << 11;
    let attr = RulesetAttr {
        handled_access_fs: LANDLOCK_ACCESS_FS_MAKE_BLOCK,
    };
    // SAFETY: the kernel reads `size_of::<RulesetAttr>()` bytes at `attr`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        )
    };
    assert!(
        fd >= 0,
        "landlock_create_ruleset: {} (this test needs Landlock)",
        std::io::Error::last_os_error()
    );
    // SAFETY: restricts this thread with the ruleset `fd` (root: no
    // no_new_privs needed), then closes the descriptor it owns.
    unsafe {
        let r = libc::syscall(libc::SYS_landlock_restrict_self, fd as libc::c_int, 0u32);
        let err = std::io::Error::last_os_error();
        libc::close(fd as libc::c_int);
        assert_eq!(r, 0, "landlock_restrict_self: {err}");
    }
}

/// A Python process the daemon may not read (it runs in a Landlock domain
/// the process is not in, as root with CAP_SYS_PTRACE): listed at once as
/// `failed` in `/processes` with the reason, warned about once, while the
/// daemon profiles a process it may read.
#[test]
fn bpf_unreadable_process_is_listed_as_failed() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let mut outside = Py::spawn(Interp::Shared.path(), &["plain"], &[]);
    outside.wait_ready();
    // The daemon and a process it may read share a domain, made by a
    // thread of their own so that the test's threads stay outside.
    let (d, inside) = std::thread::spawn(|| {
        enter_landlock_domain();
        let d = Daemon::start("unreadable", "aggregation:\n  window_secs: 2\n");
        let mut inside = Py::spawn(Interp::Shared.path(), &["plain"], &[]);
        inside.wait_ready();
        (d, inside)
    })
    .join()
    .expect("start the confined daemon");

    // Found by the first scan, before the daemon was ready: a denial is
    // not retried (it stands until the process execs).
    let ready = Instant::now();
    let e = failed_entry(&d, outside.pid);
    assert!(
        ready.elapsed() < Duration::from_secs(10),
        "listed {:?} after the daemon was ready",
        ready.elapsed()
    );
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(&format!(
            "no permission to inspect process {} (reading /proc/{}/",
            outside.pid, outside.pid
        )) && reason.contains("Landlock"),
        "{e}"
    );
    let command = e["labels"]["command"].as_str().unwrap_or_default();
    assert!(command.starts_with("python"), "{e}");
    // Not only with all=1.
    assert_eq!(
        d.process(outside.pid).map(|v| v["status"].clone()),
        Some(serde_json::json!("failed"))
    );

    d.wait_leaf(
        &format!("pid={}&seconds=60", inside.pid),
        &frame("plain_function", "HOT=plain"),
        20,
        Duration::from_secs(60),
    );
    assert!(d.healthy());
    let mut d = d;
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon exited");
    // One warning for it; a warning only for a Python process, listed as
    // failed while it runs (the domain hides the whole host from the
    // daemon: the rest is only logged at debug level).
    let text = d.log_text();
    let warned: Vec<u32> = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("not profiled, gave up"))
        .filter_map(|l| {
            let rest = &l[l.find("inspect process ")? + "inspect process ".len()..];
            rest.split(' ').next()?.parse().ok()
        })
        .collect();
    assert_eq!(
        warned.iter().filter(|&&p| p == outside.pid).count(),
        1,
        "{text}"
    );
    let failed: Vec<u32> = d
        .processes()
        .iter()
        .filter(|v| v["status"] == "failed")
        .filter_map(|v| v["labels"]["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    for p in warned {
        assert!(
            failed.contains(&p) || !Path::new(&format!("/proc/{p}")).exists(),
            "warned about {p}, a running process not listed as failed ({failed:?}):\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.contains("DEBUG") && l.contains("not profiled, gave up")),
        "no other process denied: is the domain in force?\n{text}"
    );
}
