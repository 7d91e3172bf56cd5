//! Small helpers for running commands from the workspace root.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The workspace root (parent of the xtask crate).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

/// Effective uid is 0 (the owner of `/proc/self` is the process's euid).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// First executable called `name` on `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A command with the workspace root as working directory.
pub fn cmd(program: &str, args: &[&str]) -> Cmd {
    let mut c = Command::new(program);
    c.args(args).current_dir(root());
    Cmd(c)
}

/// `cargo <args>`, using the cargo that launched us when known.
pub fn cargo(args: &[&str]) -> Cmd {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    cmd(&cargo, args)
}

pub struct Cmd(pub Command);

impl Cmd {
    pub fn env(mut self, key: &str, val: &str) -> Self {
        self.0.env(key, val);
        self
    }

    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.0.args(args);
        self
    }

    /// Printable form, e.g. `cargo build --release`.
    pub fn display(&self) -> String {
        let prog = Path::new(self.0.get_program());
        let prog = prog.file_name().unwrap_or(prog.as_os_str());
        std::iter::once(prog)
            .chain(self.0.get_args())
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Run with inherited stdio; error unless it exits successfully.
    pub fn run(mut self) -> Result<()> {
        let shown = self.display();
        println!("$ {shown}");
        let status = self
            .0
            .status()
            .with_context(|| format!("cannot start `{shown}`"))?;
        if !status.success() {
            bail!("`{shown}` failed ({status})");
        }
        Ok(())
    }

    /// Run quietly and return trimmed stdout, or `None` if it can't start or fails.
    pub fn probe(mut self) -> Option<String> {
        let out = self
            .0
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// A stage banner for multi-step commands.
pub fn banner(text: &str) {
    let line = "=".repeat(text.len() + 8);
    println!("\n{line}\n=== {text} ===\n{line}");
}
