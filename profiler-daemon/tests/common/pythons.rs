//! Every real interpreter the end-to-end tests profile, behind one type: the
//! host's CPython 3.11 (pyenv's shared-library build and Debian's static
//! `/usr/bin/python3.11`) and the Debian roots' 3.13, 3.14 and 3.15 (static
//! and libpython builds), which run in their own mount and pid namespaces.
use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;

use super::roots::{line_reader, root_pythons, Build, RootProcess, RootPython, READ_TIMEOUT};
use super::{repo_root, Interp};

/// One interpreter to run workloads with.
#[derive(Clone, Debug)]
pub enum Python {
    Host(Interp),
    Root(RootPython),
}

impl Python {
    /// e.g. `3.14.10 (sid, static)`.
    pub fn label(&self) -> String {
        match self {
            Python::Host(Interp::Shared) => "3.11 (pyenv, shared)".into(),
            Python::Host(Interp::Static) => "3.11 (Debian, static)".into(),
            Python::Root(r) => r.label(),
        }
    }

    /// The minor version, e.g. 14.
    pub fn minor(&self) -> u8 {
        match self {
            Python::Host(_) => 11,
            Python::Root(r) => r.minor(),
        }
    }

    /// Where the interpreter sees `tests/<script>`.
    pub fn script_path(&self, script: &str) -> String {
        match self {
            Python::Host(_) => repo_root().join("tests").join(script).display().to_string(),
            Python::Root(r) => r.in_root_path(script),
        }
    }

    /// Runs `tests/<script> ARGS` and waits for its `ready` line.
    pub fn start(&self, script: &str, args: &[&str]) -> Running {
        let mut r = match self {
            Python::Host(i) => {
                let mut child = Command::new(i.path())
                    .arg(repo_root().join("tests").join(script))
                    .args(args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("start python");
                let stdin = child.stdin.take().expect("stdin");
                let lines = line_reader(child.stdout.take().expect("stdout"));
                Running::Host {
                    child,
                    stdin,
                    lines,
                }
            }
            Python::Root(r) => Running::Root(r.spawn(script, args, &[])),
        };
        let line = r.read_line();
        assert_eq!(
            line.trim(),
            "ready",
            "{}: {script} did not start",
            self.label()
        );
        r
    }
}

/// A running workload; killed on drop.
pub enum Running {
    Host {
        child: Child,
        stdin: ChildStdin,
        lines: Receiver<String>,
    },
    Root(RootProcess),
}

impl Running {
    /// Its pid as the host (and BPF) sees it.
    pub fn pid(&self) -> u32 {
        match self {
            Running::Host { child, .. } => child.id(),
            Running::Root(r) => r.pid(),
        }
    }

    pub fn read_line(&mut self) -> String {
        match self {
            Running::Host { lines, .. } => lines
                .recv_timeout(READ_TIMEOUT)
                .unwrap_or_else(|e| panic!("no line from the workload: {e}")),
            Running::Root(r) => r.read_line(),
        }
    }

    pub fn write_line(&mut self, line: &str) {
        match self {
            Running::Host { stdin, .. } => {
                writeln!(stdin, "{line}").expect("write to the workload");
                stdin.flush().expect("flush");
            }
            Running::Root(r) => r.write_line(line),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Running::Host { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The interpreter called `name` in [`all`]: `3.11-shared`, `3.11-static`,
/// `3.13-trixie-static`, `3.13-static`, `3.14-shared`, ... (3.13 comes from
/// sid unless trixie is named).
pub fn python(name: &str) -> Option<Python> {
    all().remove(name)
}

/// Every interpreter, by the names [`python`] takes. Without the roots (see
/// [`root_pythons`]) only the host's.
pub fn all() -> HashMap<String, Python> {
    let mut out = HashMap::new();
    out.insert("3.11-shared".to_string(), Python::Host(Interp::Shared));
    out.insert("3.11-static".to_string(), Python::Host(Interp::Static));
    for r in root_pythons() {
        let build = match r.build {
            Build::Static => "static",
            Build::Shared => "shared",
        };
        let name = if r.suite == "sid" {
            format!("3.{}-{build}", r.minor())
        } else {
            format!("3.{}-{}-{build}", r.minor(), r.suite)
        };
        out.insert(name, Python::Root(r));
    }
    out
}
