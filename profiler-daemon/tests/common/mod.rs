//! Shared harness for the end-to-end tests: real interpreters, real BPF.
#![allow(dead_code)]
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

pub mod daemon;
pub mod otlp;
pub mod pyroscope;
pub mod pythons;
pub mod roots;
pub mod stacks;

// Not every test binary uses them.
#[allow(unused_imports)]
pub use self::daemon::*;
#[allow(unused_imports)]
pub use self::otlp::*;
#[allow(unused_imports)]
pub use self::pyroscope::*;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn scenarios() -> PathBuf {
    repo_root().join("tests/workloads/scenarios.py")
}

/// [`scenarios`] as text.
pub fn script() -> String {
    scenarios().display().to_string()
}

pub fn pyebpf() -> &'static str {
    env!("CARGO_BIN_EXE_pyebpf")
}

/// BPF tests need root. Without it they fail when PYEBPF_REQUIRE_BPF_TESTS is
/// set (CI), and are reported as skipped otherwise.
/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `pyebpf daemon --config config` on a free localhost port, its output
/// to `log`; not waited for.
pub fn spawn_daemon(config: &Path, log: &Path) -> (Child, std::net::SocketAddr) {
    let f = std::fs::File::create(log).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = Command::new(pyebpf())
        .arg("daemon")
        .arg("--config")
        .arg(config)
        .arg("--listen")
        .arg(addr.to_string())
        .env("PYEBPF_LOG", "info,pyebpf::daemon::run=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .spawn()
        .expect("start pyebpf daemon");
    (child, addr)
}

pub fn bpf_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var_os("PYEBPF_REQUIRE_BPF_TESTS").is_some() {
            panic!("BPF tests must run as root (PYEBPF_REQUIRE_BPF_TESTS is set)");
        }
        eprintln!("SKIPPED: BPF test needs root");
    }
    root
}

/// For BPF tests that measure CPU: `None` when BPF tests cannot run (see
/// [`bpf_available`]); otherwise a guard that runs such tests of one test
/// binary one at a time, so that on a 2-CPU machine one test's busy workloads
/// do not starve another's of the CPU its sample counts depend on.
pub fn serial_bpf_test() -> Option<std::sync::MutexGuard<'static, ()>> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if !bpf_available() {
        return None;
    }
    // A test that panicked while holding the lock poisons it; the next test
    // is still valid.
    Some(LOCK.lock().unwrap_or_else(|p| p.into_inner()))
}

/// The two interpreters every behaviour is checked on.
#[derive(Clone, Copy, Debug)]
pub enum Interp {
    /// `python3` on PATH: pyenv's shared-library build (libpython3.11.so).
    Shared,
    /// Debian's `/usr/bin/python3.11`: static, non-PIE.
    Static,
}

impl Interp {
    pub fn path(self) -> &'static Path {
        static SHARED: OnceLock<PathBuf> = OnceLock::new();
        match self {
            Interp::Static => Path::new("/usr/bin/python3.11"),
            Interp::Shared => SHARED.get_or_init(|| {
                // Resolve the real binary: a pyenv shim would exec it under
                // another pid.
                let out = Command::new("python3")
                    .args(["-c", "import sys; print(sys.executable)"])
                    .output()
                    .expect("python3 on PATH");
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }),
        }
    }
}

/// A child process killed (and reaped) on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running workload; killed on drop.
pub struct Workload {
    pub child: Child,
}

impl Workload {
    pub fn start(interp: Interp, args: &[&str]) -> Workload {
        Workload::start_with_env(interp, args, &[])
    }

    pub fn start_with_env(interp: Interp, args: &[&str], env: &[(&str, &str)]) -> Workload {
        let mut child = Command::new(interp.path())
            .arg(scenarios())
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read ready");
        assert_eq!(line.trim(), "ready", "workload did not start");
        Workload { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Compiles `tests/tools/<source>` (a C file) into `dir` with `flags`; the
/// executable is named after the source.
pub fn build_tool(dir: &Path, source: &str, flags: &[&str]) -> PathBuf {
    let src = repo_root().join("tests/tools").join(source);
    let out = dir.join(source.trim_end_matches(".c"));
    let status = Command::new("cc")
        .args(["-O0", "-pthread"])
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc is needed for these tests");
    assert!(status.success(), "cc failed on {}", src.display());
    out
}

/// Runs `pyebpf record` and returns its output and the profile text.
pub fn record(pids: &[u32], args: &[&str]) -> (Output, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("profile.folded");
    let mut cmd = Command::new(pyebpf());
    cmd.arg("record").arg("--quiet");
    for p in pids {
        cmd.arg("--pid").arg(p.to_string());
    }
    cmd.args(args)
        .arg("--format")
        .arg("folded")
        .arg("--output")
        .arg(&out);
    let output = cmd.output().expect("run pyebpf");
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    (output, text)
}

/// Folded lines as (frames root first, count).
pub fn parse_folded(text: &str) -> Vec<(Vec<String>, u64)> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (stack, count) = l.rsplit_once(' ').expect("count");
            (
                stack.split(';').map(str::to_string).collect(),
                count.parse().expect("count is a number"),
            )
        })
        .collect()
}

/// `# HOT:name` / `# CALL:name` markers of the workload: name -> line.
pub fn markers() -> HashMap<String, u32> {
    markers_in(&scenarios())
}

/// The markers of another workload file.
pub fn markers_in(path: &Path) -> HashMap<String, u32> {
    let src = std::fs::read_to_string(path).expect("read workload");
    let mut m = HashMap::new();
    for (i, line) in src.lines().enumerate() {
        if let Some(pos) = line.find("# HOT:").or_else(|| line.find("# CALL:")) {
            let tag = line[pos + 2..].trim().replace(':', "=");
            m.insert(tag, i as u32 + 1);
        }
    }
    m
}

/// `qualname (scenarios.py:LINE)` for a marker such as `HOT=plain`.
pub fn frame(qualname: &str, marker: &str) -> String {
    frame_in(&scenarios(), qualname, marker)
}

/// [`frame`] of the workload file `path`.
pub fn frame_in(path: &Path, qualname: &str, marker: &str) -> String {
    let line = markers_in(path)
        .get(marker)
        .copied()
        .unwrap_or_else(|| panic!("no marker {marker}"));
    format!("{qualname} ({}:{line})", path.display())
}

/// Total samples of stacks whose leaf is `leaf`.
pub fn leaf_count(stacks: &[(Vec<String>, u64)], leaf: &str) -> u64 {
    stacks
        .iter()
        .filter(|(s, _)| s.last().map(String::as_str) == Some(leaf))
        .map(|(_, c)| c)
        .sum()
}

pub fn total(stacks: &[(Vec<String>, u64)]) -> u64 {
    stacks.iter().map(|(_, c)| c).sum()
}

pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "pyebpf failed: {}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where [`hidden_python`] runs Debian's static interpreter from: a tmpfs
/// mounted in its own mount namespace, so the path does not exist on the host.
pub const HIDDEN_PYTHON: &str = "/mnt/hidden-python";

/// `/usr/bin/python3.11` copied to [`HIDDEN_PYTHON`] and run on scenarios.py
/// with `args`, as the first process of new mount and pid namespaces;
/// `configure` adjusts the `unshare` command (its stdout is piped). Returns
/// `unshare` and the interpreter's host pid (`unshare`'s only child).
pub fn hidden_python(args: &str, configure: impl FnOnce(&mut Command)) -> (Child, u32) {
    let shell = format!(
        "mount -t tmpfs none /mnt && cp /usr/bin/python3.11 {HIDDEN_PYTHON} && exec {HIDDEN_PYTHON} {} {args}",
        scenarios().display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--pid",
        "--fork",
        "--propagation",
        "private",
        "sh",
        "-c",
        &shell,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    configure(&mut cmd);
    let child = cmd.spawn().expect("unshare (util-linux)");
    let u = child.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let pid = loop {
        let children =
            std::fs::read_to_string(format!("/proc/{u}/task/{u}/children")).unwrap_or_default();
        if let Some(p) = children.split_whitespace().next() {
            break p.parse().expect("a pid");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "unshare started no child"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    (child, pid)
}
