//! Project automation: `cargo xtask <command>` (alias in `.cargo/config.toml`).

mod bench;
mod bootstrap;
mod demo;
mod dist;
mod fuzz;
mod soak;
mod test;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "pyebpf development tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install whatever is missing (LLVM 22, nightly + rust-src, bpf-linker, test deps).
    Bootstrap,
    /// Bootstrap, then `cargo build --release` (also builds the eBPF object).
    Build,
    /// Bootstrap, build, fmt check, clippy, `cargo test --release --workspace [ARGS]`, then
    /// `cargo xtask dist` (the release artifacts and their checks).
    Test {
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Bootstrap, build, then profile examples/busy.py and write a flamegraph.
    Demo,
    /// Release artifacts in target/artifacts/: the static (musl) binary, the .deb, the OCI image,
    /// the Helm chart and SHA256SUMS, each checked (installs, runs, renders); needs root.
    Dist(dist::DistArgs),
    /// Benchmarks against py-spy: writes BENCHMARKS.md and benchmarks.json (needs root);
    /// `--scale`: the daemon at production scale, BENCHMARKS-scale.md.
    Bench(bench::BenchArgs),
    /// Run each cargo-fuzz target of fuzz/ for `--secs` seconds (default 60) on its
    /// committed corpus (installs cargo-fuzz on first use); reports executions per target.
    Fuzz(fuzz::FuzzArgs),
    /// Gunicorn soak proving profiling cannot hurt production: baseline, `pyebpf daemon`
    /// and `pyebpf record` at 999 Hz under wrk load (needs root, gunicorn, wrk); writes
    /// SOAK.md and soak.json, exits 2 if a pass criterion fails. 600 s per phase,
    /// `--quick` 60 s, `--secs N`.
    Soak(soak::SoakArgs),
}

fn main() -> ExitCode {
    // Print the error chain without anyhow's backtrace (RUST_BACKTRACE may be set).
    if let Err(err) = run(Cli::parse().command) {
        eprintln!("error: {err:#}");
        if err.is::<soak::CriteriaFailed>() {
            return ExitCode::from(2);
        }
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Bootstrap => bootstrap::run(),
        Command::Build => {
            bootstrap::run()?;
            util::cargo(&["build", "--release"]).run()
        }
        Command::Test { args } => test::run(&args),
        Command::Demo => demo::run(),
        Command::Dist(args) => dist::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Soak(args) => soak::run(&args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_passes_extra_args_through() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Test { args } => args,
            _ => unreachable!(),
        };
        assert!(parse(&["xtask", "test"]).is_empty());
        assert_eq!(parse(&["xtask", "test", "--", "filter"]), ["filter"]);
        assert_eq!(
            parse(&["xtask", "test", "--", "-p", "x", "--", "--nocapture"]),
            ["-p", "x", "--", "--nocapture"]
        );
    }
}
