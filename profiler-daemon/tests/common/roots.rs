//! CPython 3.13+ for the end-to-end tests: the interpreters of the Debian roots that
//! `cargo xtask bootstrap` builds as root (xtask/src/roots.rs) and lists in
//! `interpreters.json` of its cache (`/var/cache/pyebpf/roots`, or `$PYEBPF_ROOTS_DIR`).
//!
//! [`RootPython::spawn`] runs one in its root, in its own mount and pid namespaces, with the
//! repository's `tests/` mounted (read-only) at `/pyebpf`.
use serde::Deserialize;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub const DEFAULT_ROOTS_DIR: &str = "/var/cache/pyebpf/roots";
/// Where each root sees the repository's `tests/`.
pub const TESTS_IN_ROOT: &str = "/pyebpf";
/// How long [`RootProcess::read_line`] waits.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// PATH for the commands that enter a root, and for the interpreter.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The cache of roots: `$PYEBPF_ROOTS_DIR`, else [`DEFAULT_ROOTS_DIR`].
pub fn roots_dir() -> PathBuf {
    std::env::var_os("PYEBPF_ROOTS_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOTS_DIR))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Build {
    /// Debian's `/usr/bin/python3.X`: libpython linked in.
    Static,
    /// `/usr/bin/python3.X-shared`: tests/tools/pylaunch.c on the root's libpython3.X.so.1.0.
    Shared,
}

/// One interpreter of `interpreters.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct RootPython {
    /// The root, on the host.
    pub root: PathBuf,
    /// The interpreter, as seen inside the root (e.g. `/usr/bin/python3.15`).
    pub path: PathBuf,
    /// e.g. "3.15.2".
    pub version: String,
    /// `sys.hexversion`.
    pub hex: u32,
    pub build: Build,
    /// Debian suite of the root: "trixie" or "sid".
    pub suite: String,
    /// The executable is position-independent.
    #[serde(default)]
    pub pie: bool,
}

/// Every interpreter of the roots. Without `interpreters.json`: a panic when
/// PYEBPF_REQUIRE_BPF_TESTS is set, else a SKIPPED note and no interpreters.
pub fn root_pythons() -> Vec<RootPython> {
    let json = roots_dir().join("interpreters.json");
    let text = match std::fs::read_to_string(&json) {
        Ok(text) => text,
        Err(e) => {
            let why = format!(
                "no Debian-root interpreters ({}: {e}); run `cargo xtask bootstrap` as root",
                json.display()
            );
            if std::env::var_os("PYEBPF_REQUIRE_BPF_TESTS").is_some() {
                panic!("{why} (PYEBPF_REQUIRE_BPF_TESTS is set)");
            }
            eprintln!("SKIPPED: {why}");
            return Vec::new();
        }
    };
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", json.display()))
}

/// Python 3.`minor` of the given build, from sid if it has one (sid has 3.13 too; see
/// [`root_python_in`] for trixie's).
pub fn root_python(minor: u8, build: Build) -> Option<RootPython> {
    root_python_in("sid", minor, build).or_else(|| {
        root_pythons()
            .into_iter()
            .find(|p| p.minor() == minor && p.build == build)
    })
}

/// Python 3.`minor` of the given build from the root of Debian `suite`.
pub fn root_python_in(suite: &str, minor: u8, build: Build) -> Option<RootPython> {
    root_pythons()
        .into_iter()
        .find(|p| p.suite == suite && p.minor() == minor && p.build == build)
}

impl RootPython {
    pub fn minor(&self) -> u8 {
        (self.hex >> 16) as u8
    }

    /// The interpreter's file on the host.
    pub fn host_path(&self) -> PathBuf {
        self.root
            .join(self.path.strip_prefix("/").unwrap_or(&self.path))
    }

    /// e.g. "3.15.2 (sid, static)", for messages.
    pub fn label(&self) -> String {
        let build = match self.build {
            Build::Static => "static",
            Build::Shared => "shared",
        };
        format!("{} ({}, {build})", self.version, self.suite)
    }

    /// What the target sees as the file name of `script_in_tests` (a path relative to the
    /// repository's `tests/`, e.g. `workloads/scenarios.py`).
    pub fn in_root_path(&self, script_in_tests: &str) -> String {
        format!(
            "{TESTS_IN_ROOT}/{}",
            script_in_tests.trim_start_matches('/')
        )
    }

    /// Runs `tests/<script_in_tests> ARGS` with this interpreter in its root, as the first
    /// process (pid 1) of new mount and pid namespaces, with `/proc` mounted and
    /// the repository's `tests/` at `/pyebpf` (read-only). The environment is
    /// PATH plus `env` only. Stdout is piped (see [`RootProcess::read_line`]), stderr
    /// inherited.
    pub fn spawn(&self, script_in_tests: &str, args: &[&str], env: &[(&str, &str)]) -> RootProcess {
        // Everything is passed as positional parameters: nothing needs quoting.
        const SHELL: &str = r#"mount --bind -o ro "$1" "$2/pyebpf" && mount -t proc proc "$2/proc" && root=$2 && shift 2 && exec chroot "$root" "$@""#;
        let label = format!("python {} on {script_in_tests}", self.label());
        let mut unshare = Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--fork",
                // If unshare is killed, so is the namespace.
                "--kill-child",
                "--propagation",
                "private",
                "sh",
                "-c",
                SHELL,
                "sh",
            ])
            .arg(super::repo_root().join("tests"))
            .arg(&self.root)
            .arg(&self.path)
            .arg(self.in_root_path(script_in_tests))
            .args(args)
            .env_clear()
            .env("PATH", PATH)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("unshare (util-linux)");
        let stdin = unshare.stdin.take().expect("stdin");
        let lines = line_reader(unshare.stdout.take().expect("stdout"));
        let u = unshare.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{u}/task/{u}/children")).unwrap_or_default();
            if let Some(p) = children.split_whitespace().next() {
                break p.parse().expect("a pid");
            }
            if let Ok(Some(status)) = unshare.try_wait() {
                panic!("{label}: unshare exited ({status}) before starting it");
            }
            assert!(
                Instant::now() < deadline,
                "{label}: unshare started no child"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        RootProcess {
            unshare,
            pid,
            stdin,
            lines,
            label,
        }
    }
}

/// The lines of `stdout`, read on a thread of their own, so a reader can wait
/// for one with a timeout.
pub fn line_reader(stdout: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// An interpreter started by [`RootPython::spawn`]; its namespace is killed on drop.
pub struct RootProcess {
    unshare: Child,
    pid: u32,
    stdin: ChildStdin,
    lines: Receiver<String>,
    label: String,
}

impl RootProcess {
    /// The interpreter's pid as the host sees it (in its own namespace it is 1).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next line of its stdout (without the newline); panics after [`READ_TIMEOUT`] or
    /// if stdout closes first.
    pub fn read_line(&mut self) -> String {
        self.read_line_within(READ_TIMEOUT)
            .unwrap_or_else(|| panic!("{}: no line on stdout within {READ_TIMEOUT:?}", self.label))
    }

    /// The next line of its stdout, or `None` if none came within `timeout`; panics if
    /// stdout is closed (the process is gone).
    pub fn read_line_within(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.unshare.wait().ok();
                panic!("{}: stdout closed (exit status {status:?})", self.label)
            }
        }
    }

    /// Writes `line` and a newline to its stdin.
    pub fn write_line(&mut self, line: &str) {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot write to stdin: {e}", self.label));
    }

    /// The host's view of the process's files, e.g. `/proc/<pid>`.
    pub fn proc_dir(&self) -> PathBuf {
        Path::new("/proc").join(self.pid.to_string())
    }
}

impl Drop for RootProcess {
    fn drop(&mut self) {
        // SIGKILL to the pid namespace's init kills everything in the namespace;
        // unshare then exits and is reaped. While unshare runs, its child's pid
        // (alive, or a zombie until unshare reaps it) cannot be reused.
        if matches!(self.unshare.try_wait(), Ok(None)) {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}
