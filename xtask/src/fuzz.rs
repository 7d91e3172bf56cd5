//! `cargo xtask fuzz`: run the cargo-fuzz targets of `fuzz/` one after the
//! other, each for a fixed time on its committed corpus, and report time
//! and executions per target.
//!
//! cargo-fuzz is installed on first use (pinned, `--locked`); the targets
//! build with the pinned nightly that `cargo xtask bootstrap` installs.

use crate::bootstrap::NIGHTLY;
use crate::util::{banner, cargo, cmd, root, target_dir};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

const CARGO_FUZZ: &str = "cargo-fuzz";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds per input before libFuzzer calls it a hang.
const INPUT_TIMEOUT_SECS: u32 = 10;
/// Memory per process before libFuzzer calls it an OOM.
const RSS_LIMIT_MB: u32 = 2048;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Only this target (default: every target in fuzz/Cargo.toml).
    #[arg(long)]
    target: Option<String>,
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    secs: u32,
    /// Afterwards, minimise each target's corpus (`cargo fuzz cmin`).
    #[arg(long)]
    cmin: bool,
}

/// libFuzzer's closing numbers for one run.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    execs: Option<u64>,
    execs_per_sec: Option<u64>,
    /// Seconds spent fuzzing (`Done N runs in S second(s)`), build excluded.
    fuzz_secs: Option<u64>,
}

struct Outcome {
    target: String,
    /// Wall time of `cargo fuzz run`, build included.
    secs: f64,
    stats: Stats,
    corpus_files: usize,
    ok: bool,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz_cargo = |sub: &[&str]| {
        let mut c = cmd("cargo", &[&format!("+{NIGHTLY}"), "fuzz"])
            .args(sub)
            .env("AYA_BUILD_SKIP", "1");
        // What `cargo xtask` (a `cargo run`) set for xtask itself: build
        // scripts watch some of these (ring's), so leaving them makes
        // every dependency rebuild when the targets were last built from
        // a shell, and the nested cargo must choose its own toolchain.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || matches!(
                    k.as_ref(),
                    "CARGO"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "RUSTUP_TOOLCHAIN"
                )
            {
                c.0.env_remove(&key);
            }
        }
        c
    };
    let listed = fuzz_cargo(&["list"])
        .probe()
        .context("`cargo fuzz list` failed")?;
    let all: Vec<String> = listed.lines().map(|l| l.trim().to_string()).collect();
    let targets = match &args.target {
        Some(t) if all.contains(t) => vec![t.clone()],
        Some(t) => bail!("no fuzz target {t:?}; targets: {}", all.join(", ")),
        None => all,
    };
    let logs = target_dir().join("fuzz-logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    banner("building the fuzz targets");
    fuzz_cargo(&["build", "-O"]).run()?;

    let mut outcomes = Vec::new();
    for target in &targets {
        banner(&format!("fuzz {target} for {} s", args.secs));
        let corpus = root().join("fuzz/corpus").join(target);
        let log_path = logs.join(format!("{target}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut c = fuzz_cargo(&["run", "-O", target]);
        c.0.arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={}", args.secs))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg("-print_final_stats=1")
            .stdout(Stdio::null())
            .stderr(log);
        println!("$ {} (log: {})", c.display(), log_path.display());
        let started = Instant::now();
        let status = c.0.status().context("cannot start cargo fuzz run")?;
        let secs = started.elapsed().as_secs_f64();
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if !status.success() {
            println!("FAILED ({status}); the end of its log:");
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(30)..] {
                println!("  {l}");
            }
        }
        if status.success() && args.cmin {
            fuzz_cargo(&["cmin", "-O", target]).run()?;
        }
        outcomes.push(Outcome {
            target: target.clone(),
            secs,
            stats: parse_stats(&text),
            corpus_files: count_files(&corpus),
            ok: status.success(),
        });
    }
    report(&outcomes)
}

/// Installs cargo-fuzz unless the pinned version is on `PATH`.
fn ensure_cargo_fuzz() -> Result<()> {
    let version = cmd("cargo", &["fuzz", "--version"]).probe();
    if version
        .as_deref()
        .is_some_and(|v| v.trim_start_matches("cargo-fuzz ") == CARGO_FUZZ_VERSION)
    {
        return Ok(());
    }
    println!("fuzz: installing {CARGO_FUZZ} {CARGO_FUZZ_VERSION} (found: {version:?})");
    cargo(&[
        "install",
        &format!("{CARGO_FUZZ}@{CARGO_FUZZ_VERSION}"),
        "--locked",
    ])
    .run()
}

/// The numbers of libFuzzer's last status line (`#N DONE ... exec/s: M
/// ...`), or of the last line of any kind when it ended early.
fn parse_stats(log: &str) -> Stats {
    let mut status_lines = log.lines().rev().filter(|l| l.starts_with('#'));
    let last = status_lines
        .clone()
        .find(|l| l.contains("DONE"))
        .or_else(|| status_lines.next());
    let fuzz_secs = log.lines().rev().find_map(|l| {
        let rest = l.strip_prefix("Done ")?;
        let (_, secs) = rest.split_once(" runs in ")?;
        secs.strip_suffix(" second(s)")?.parse().ok()
    });
    let Some(line) = last else {
        return Stats {
            fuzz_secs,
            ..Stats::default()
        };
    };
    let execs = line
        .trim_start_matches('#')
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok());
    let mut words = line.split_whitespace();
    let execs_per_sec = words
        .by_ref()
        .find(|w| *w == "exec/s:")
        .and_then(|_| words.next())
        .and_then(|n| n.parse().ok());
    Stats {
        execs,
        execs_per_sec,
        fuzz_secs,
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).count())
        .unwrap_or(0)
}

fn report(outcomes: &[Outcome]) -> Result<()> {
    let show = |n: Option<u64>| n.map_or("?".to_string(), |n| n.to_string());
    banner("fuzz summary");
    println!(
        "  {:<12} {:>8} {:>7} {:>12} {:>8} {:>7}  result",
        "target", "fuzz s", "wall s", "executions", "exec/s", "corpus"
    );
    for o in outcomes {
        println!(
            "  {:<12} {:>8} {:>7.0} {:>12} {:>8} {:>7}  {}",
            o.target,
            show(o.stats.fuzz_secs),
            o.secs,
            show(o.stats.execs),
            show(o.stats.execs_per_sec),
            o.corpus_files,
            if o.ok {
                "ok"
            } else {
                "FAILED (see fuzz/artifacts)"
            }
        );
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| o.target.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_line_is_parsed() {
        let log = "INFO: Seed: 1\n\
                   #2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #65536\tpulse  cov: 12 ft: 13 corp: 2/2b lim: 4 exec/s: 32768 rss: 31Mb\n\
                   #120000\tDONE   cov: 12 ft: 13 corp: 2/2b lim: 4 exec/s: 1967 rss: 31Mb\n\
                   Done 120000 runs in 61 second(s)\n\
                   stat::number_of_executed_units: 120000\n";
        assert_eq!(
            parse_stats(log),
            Stats {
                execs: Some(120000),
                execs_per_sec: Some(1967),
                fuzz_secs: Some(61),
            }
        );
        // A crash: no DONE line, the last status line counts.
        let log = "#2\tINITED exec/s: 0\n#500\tNEW    cov: 3 exec/s: 250 rss: 1Mb\n==1== ERROR\n";
        assert_eq!(
            parse_stats(log),
            Stats {
                execs: Some(500),
                execs_per_sec: Some(250),
                fuzz_secs: None,
            }
        );
        assert_eq!(parse_stats(""), Stats::default());
    }
}
