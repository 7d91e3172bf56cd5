//! `cargo xtask test`: bootstrap, build, fmt, clippy, tests; stops at the first failure.

use crate::bootstrap;
use crate::util::{banner, cargo, is_root};
use anyhow::{Context, Result};

pub fn run(extra: &[String]) -> Result<()> {
    let test_cmd = cargo(&["test", "--release", "--workspace"])
        .args(extra)
        .env("PYEBPF_REQUIRE_BPF_TESTS", "1");
    let stages = [
        cargo(&["build", "--release"]),
        cargo(&["fmt", "--all", "--", "--check"]),
        // Clippy needs no BPF object: skip building it again in debug.
        cargo(&[
            "clippy",
            "--workspace",
            // The no_std BPF crate only builds for the BPF target (its build
            // through aya-build already denies errors).
            "--exclude",
            "profiler-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .env("AYA_BUILD_SKIP", "1"),
        test_cmd,
    ];
    // + bootstrap, + dist (the release artifacts, built and checked).
    let total = stages.len() + 2;

    banner(&format!("[1/{total}] bootstrap"));
    bootstrap::run().context("stage `bootstrap` failed")?;

    for (i, stage) in stages.into_iter().enumerate() {
        let name = stage.display();
        banner(&format!("[{}/{total}] {name}", i + 2));
        if name.starts_with("cargo test") && is_root() {
            println!(
                "running as root: the bpf_* tests load the real BPF programs and profile real \
                 CPython 3.11-3.15 processes; PYEBPF_REQUIRE_BPF_TESTS=1 makes any skip a failure"
            );
        }
        if name.starts_with("cargo test") && !is_root() {
            println!(
                "WARNING: not root: the BPF tests need root (CAP_BPF, CAP_PERFMON) and will fail"
            );
            println!("         (PYEBPF_REQUIRE_BPF_TESTS=1 stops them from skipping)");
        }
        stage
            .run()
            .with_context(|| format!("stage `{name}` failed"))?;
    }
    banner(&format!("[{total}/{total}] cargo xtask dist"));
    let started = std::time::Instant::now();
    crate::dist::run(&crate::dist::DistArgs { no_bootstrap: true })
        .context("stage `cargo xtask dist` failed")?;
    println!(
        "dist stage: {:.0} s (build and checks of the release artifacts)",
        started.elapsed().as_secs_f64()
    );
    banner("all stages passed");
    Ok(())
}
