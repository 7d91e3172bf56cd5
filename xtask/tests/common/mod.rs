//! Helpers of the xtask integration tests (each test file uses a part).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a missing prerequisite must fail the test rather than skip it.
pub fn required() -> bool {
    std::env::var_os("PYEBPF_REQUIRE_BPF_TESTS").is_some()
}

/// The newest working `pyebpf`: the one built in the same profile as this
/// test (cargo builds every workspace binary for `cargo test --workspace`)
/// or the release build.
pub fn pyebpf() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe.parent()?.parent()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    [
        profile_dir.join("pyebpf"),
        root.join("target/release/pyebpf"),
    ]
    .into_iter()
    .filter(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"pyebpf "))
    })
    .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

/// Root and a pyebpf binary, or `None` after printing why the test is
/// skipped (a panic instead when PYEBPF_REQUIRE_BPF_TESTS is set).
pub fn prerequisites(what: &str) -> Option<PathBuf> {
    if !is_root() {
        assert!(
            !required(),
            "{what} must run as root (PYEBPF_REQUIRE_BPF_TESTS is set)"
        );
        eprintln!("SKIPPED: {what} needs root");
        return None;
    }
    let Some(pyebpf) = pyebpf() else {
        assert!(
            !required(),
            "no pyebpf binary: build the workspace first (cargo build --release)"
        );
        eprintln!("SKIPPED: no pyebpf binary built yet");
        return None;
    };
    Some(pyebpf)
}

/// `cargo xtask ARGS --out DIR --pyebpf PYEBPF` with a fresh scratch DIR
/// named after `name`: the directory and the exit status.
pub fn xtask(args: &[&str], name: &str, pyebpf: &Path) -> (PathBuf, ExitStatus) {
    let out = std::env::temp_dir().join(format!("pyebpf-{name}-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .arg("--pyebpf")
        .arg(pyebpf)
        .status()
        .expect("run xtask");
    (out, status)
}
