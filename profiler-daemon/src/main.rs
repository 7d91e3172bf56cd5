//! The `pyebpf` command line.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use pyebpf::bpf::sampler::SamplerConfig;
use pyebpf::profile::{Format, ProfileKind};
use pyebpf::record::{self, RecordOptions};

#[derive(Parser)]
#[command(
    name = "pyebpf",
    version,
    about = "eBPF profiler for CPython 3.11 to 3.15 services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Profile chosen CPython processes and write the profile to a file.
    Record(RecordArgs),
    /// Profile every supported CPython process on the host, continuously,
    /// and serve the results over HTTP (Prometheus, pprof, flamegraphs) and
    /// exports.
    Daemon(DaemonArgs),
    /// Live view of the hottest Python functions on this host, refreshed
    /// every second.
    ///
    /// Reads from a running `pyebpf daemon` (the one on 127.0.0.1:7464, or
    /// --daemon URL) when there is one: that needs no privileges at all.
    /// Otherwise samples by itself (or with --local), which needs CAP_BPF,
    /// CAP_PERFMON and CAP_SYS_PTRACE (or root), like `pyebpf record`.
    ///
    /// Keys: o/t/n sort by own/total/name, l line-level rows, w whole run vs
    /// last --window seconds, p or space pause, / filter by text, Tab process
    /// view (Enter shows one process, Esc clears filters), ? help, q or
    /// Ctrl-C quit.
    Top(TopArgs),
    /// Checks that a running daemon is alive: exit 0 if its `/healthz`
    /// answers 200 (ingest drained the ring buffer lately), 1 otherwise
    /// with the reason. For container health checks (ECS, Docker).
    Health {
        /// The daemon's API (or its metrics_listen).
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:7464")]
        url: String,
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 5)]
        timeout: u64,
    },
    /// Configuration file tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Prints the seccomp profile (OCI JSON) that `pyebpf daemon` runs
    /// under, or installs it with --output (the Kubernetes DaemonSet's init
    /// container writes it to the node's /var/lib/kubelet/seccomp).
    SeccompProfile {
        /// Write it to this file (atomically) instead of standard output.
        #[arg(long, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file without starting anything.
    Check {
        /// The YAML file.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// YAML configuration (see deploy/pyebpf.yaml); built-in defaults without it.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// HTTP address, overriding the configuration (default 127.0.0.1:7464).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<std::net::SocketAddr>,
}

#[derive(clap::Args)]
struct TopArgs {
    /// Only this process (repeatable).
    #[arg(long = "pid", short = 'p', value_name = "PID")]
    pids: Vec<u32>,
    /// Only processes with this service label (OTEL_SERVICE_NAME, else
    /// DD_SERVICE, else the command).
    #[arg(long, value_name = "NAME")]
    service: Option<String>,
    /// Samples per second per CPU when sampling locally [default: 99]; in
    /// daemon mode the daemon's rate applies.
    #[arg(long, short = 'r', value_name = "HZ", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    rate: Option<u64>,
    /// Length of the "last N seconds" view (`w` toggles it with the whole run).
    #[arg(long, short = 'w', value_name = "SECS", default_value_t = pyebpf::top::DEFAULT_WINDOW_SECS,
          value_parser = clap::value_parser!(u32).range(1..=86_400))]
    window: u32,
    /// Read from the pyebpf daemon whose HTTP API is at URL (e.g.
    /// http://127.0.0.1:7464). Needs no privileges.
    #[arg(long, value_name = "URL", conflicts_with = "local")]
    daemon: Option<String>,
    /// The daemon's bearer token (its `api.token_file`): needed when the
    /// daemon listens beyond localhost. The file must be mode 0600 or 0400.
    #[arg(long, value_name = "FILE", conflicts_with = "local")]
    token_file: Option<std::path::PathBuf>,
    /// Sample locally even if a daemon is running. Needs CAP_BPF, CAP_PERFMON
    /// and CAP_SYS_PTRACE (or root).
    #[arg(long)]
    local: bool,
    /// Local mode: also sample off-CPU time (the scheduler hooks), so that
    /// `m` switches the view between cpu, wall and off-cpu. A daemon shows
    /// the types of its `sampling.types`.
    #[arg(long, conflicts_with = "daemon")]
    off_cpu: bool,
    /// Start with one row per source line instead of per function (`l` toggles).
    #[arg(long)]
    line: bool,
    /// Print one snapshot after --duration seconds and exit, instead of the
    /// interactive view (for scripts).
    #[arg(long)]
    once: bool,
    /// With --once: seconds to sample (local mode) or to look back (daemon
    /// mode) [default: 5].
    #[arg(long, short = 'd', value_name = "SECS", requires = "once",
          value_parser = clap::value_parser!(u32).range(1..=86_400))]
    duration: Option<u32>,
    /// With --once: print the snapshot as JSON (the daemon's /api/top format).
    #[arg(long, requires = "once")]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    /// `frame;frame;...;leaf COUNT`, root first (py-spy's raw format).
    Folded,
    /// Interactive flamegraph.
    Svg,
    /// Gzipped pprof profile.proto (go tool pprof, Pyroscope).
    Pprof,
    /// speedscope JSON.
    Speedscope,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Folded => Format::Folded,
            FormatArg::Svg => Format::Svg,
            FormatArg::Pprof => Format::Pprof,
            FormatArg::Speedscope => Format::Speedscope,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    /// Threads on CPU, sampled with the perf clock (sample counts).
    Cpu,
    /// Every thread's elapsed time, on CPU or not (nanoseconds).
    Wall,
    /// Time threads spend off CPU, by where they block (nanoseconds).
    OffCpu,
}

impl From<ModeArg> for ProfileKind {
    fn from(m: ModeArg) -> ProfileKind {
        match m {
            ModeArg::Cpu => ProfileKind::Cpu,
            ModeArg::Wall => ProfileKind::Wall,
            ModeArg::OffCpu => ProfileKind::OffCpu,
        }
    }
}

#[derive(clap::Args)]
struct RecordArgs {
    /// Process to profile (repeatable).
    #[arg(long = "pid", short = 'p', required = true, value_name = "PID")]
    pids: Vec<u32>,
    /// Seconds to record; without it, records until Ctrl-C.
    #[arg(long, short = 'd', value_name = "SECS")]
    duration: Option<f64>,
    /// Samples per second per CPU.
    #[arg(long, short = 'r', default_value_t = 99, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    rate: u64,
    /// What to profile: CPU time (folded values are sample counts), wall
    /// time or off-CPU time (folded values are nanoseconds).
    #[arg(long, value_enum, default_value = "cpu")]
    mode: ModeArg,
    /// Kernel stacks of CPU samples taken in the kernel (always on for wall
    /// and off-cpu).
    #[arg(long)]
    kernel: bool,
    /// Below each sample's Python frames, the native function its thread was
    /// in (C code such as `[native] crc32_z (libz.so.1)`, or the system
    /// call's caller when in the kernel), named from the target's ELF
    /// symbols and debug info with blazesym.
    #[arg(long)]
    native: bool,
    /// Whole native stacks, merged with the Python frames: each eval-loop
    /// activation stands for the Python frames it runs, C frames keep their
    /// place. BPF copies `--native-stack-bytes` of each sampled thread's
    /// stack; pyebpf unwinds it from the ELF files' CFI (.eh_frame), so
    /// builds without frame pointers unwind too.
    #[arg(long)]
    native_stacks: bool,
    /// Keep each thread's stacks apart, each rooted at a `thread TID (name)`
    /// frame (py-spy's `--threads`).
    #[arg(long)]
    threads: bool,
    /// Bytes of user stack copied per sample for --native-stacks; a deeper
    /// native stack ends early, its older Python frames after a
    /// `[native frames missing]` mark.
    #[arg(long, value_name = "BYTES", default_value_t = profiler_common::USER_STACK_MAX as u32,
          value_parser = clap::value_parser!(u32).range(profiler_common::USER_STACK_MIN as i64..=profiler_common::USER_STACK_MAX as i64))]
    native_stack_bytes: u32,
    /// Off-CPU sampling period T in microseconds: an interval of d is walked
    /// with probability min(1, d/T) and weighs max(d, T) [default: the CPU
    /// sampling period, 1/rate].
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    off_cpu_period_us: Option<u64>,
    /// Deepest stack walked; deeper stacks are cut here and flagged [truncated].
    #[arg(long, default_value_t = profiler_common::DEFAULT_MAX_DEPTH,
          value_parser = clap::value_parser!(u32).range(1..=profiler_common::MAX_FRAMES as i64))]
    max_depth: u32,
    /// Output format; default from the file name (.svg, .pb.gz/.pprof, .json), else folded.
    #[arg(long, short = 'f', value_enum)]
    format: Option<FormatArg>,
    /// Where to write the profile.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: PathBuf,
    /// No live status line.
    #[arg(long)]
    quiet: bool,
    /// Memory the recorded stacks may hold, in MiB; beyond it the oldest
    /// seconds are evicted (reported in the summary).
    #[arg(long, value_name = "MIB", default_value_t = record::DEFAULT_MEMORY_BUDGET_MIB as u64,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    memory_budget_mib: u64,
}

fn format_from_name(path: &Path) -> Format {
    let name = path.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".svg") {
        Format::Svg
    } else if name.ends_with(".pb.gz") || name.ends_with(".pprof") || name.ends_with(".pb") {
        Format::Pprof
    } else if name.ends_with(".json") {
        Format::Speedscope
    } else {
        Format::Folded
    }
}

/// Logs to stderr: `PYEBPF_LOG` overrides `level`; JSON when asked.
fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PYEBPF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of contexts, outermost first.
            eprintln!("pyebpf: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let c = pyebpf::daemon::config::load(&file)?;
            println!(
                "{}: ok (listen {}, {} Hz, window {} s, retention {} s, {} include / {} exclude rules)",
                file.display(),
                c.listen,
                c.sampling.rate_hz,
                c.aggregation.window_secs,
                c.aggregation.retention_secs,
                c.discovery.include.len(),
                c.discovery.exclude.len()
            );
            Ok(())
        }
        Command::SeccompProfile { output } => match output {
            Some(path) => {
                pyebpf::seccomp::install(&path)?;
                println!("seccomp profile written to {}", path.display());
                Ok(())
            }
            None => {
                print!("{}", pyebpf::seccomp::PROFILE);
                Ok(())
            }
        },
        Command::Health { url, timeout } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let status = rt.block_on(pyebpf::daemon::health::check(
                &url,
                std::time::Duration::from_secs(timeout),
            ))?;
            println!("{status}");
            Ok(())
        }
        Command::Daemon(a) => {
            let mut config = match &a.config {
                Some(path) => pyebpf::daemon::config::load(path)?,
                None => pyebpf::daemon::config::Config::default(),
            };
            if let Some(l) = a.listen {
                config.listen = l;
            }
            init_logging(
                &config.logging.level,
                config.logging.format == pyebpf::daemon::config::LogFormat::Json,
            );
            pyebpf::caps::require("pyebpf daemon", &pyebpf::caps::record_requirements())?;
            let prepared = pyebpf::daemon::run::prepare(pyebpf::daemon::run::DaemonOptions {
                config,
                config_path: a.config,
                serve_http: true,
            })?;
            // Loaded, attached and bound: from here on only reading targets
            // needs privileges. Before the runtime: capabilities are per thread.
            let kept = pyebpf::caps::drop_after_start()?;
            tracing::info!("capabilities dropped; kept: {}", pyebpf::caps::names(&kept));
            // Inspections run on short-lived blocking threads; with glibc's
            // default of one arena per thread their freed memory stays
            // mapped (150 MB idle RSS instead of 60 MB in the benchmarks).
            // (musl, the static release build, has one heap and no mallopt.)
            // SAFETY: mallopt only tunes the allocator; called before any
            // thread is started.
            #[cfg(target_env = "gnu")]
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 2)
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(pyebpf::daemon::run::run(prepared))
        }
        Command::Top(a) => {
            let once = a.once.then(|| pyebpf::top::Once {
                duration_secs: a.duration.unwrap_or(pyebpf::top::DEFAULT_ONCE_SECS),
                json: a.json,
            });
            // The interactive view owns the terminal: no log lines there,
            // unless stderr goes elsewhere (`2>top.log`).
            use std::io::IsTerminal as _;
            if once.is_some() || !std::io::stderr().is_terminal() {
                init_logging("warn", false);
            }
            pyebpf::top::run(
                pyebpf::top::TopOptions {
                    pids: a.pids,
                    service: a.service,
                    rate_hz: a.rate,
                    window_secs: a.window,
                    source: match (a.daemon, a.local) {
                        (Some(url), _) => pyebpf::top::SourceChoice::Daemon(url),
                        (None, true) => pyebpf::top::SourceChoice::Local,
                        (None, false) => pyebpf::top::SourceChoice::Auto,
                    },
                    line_level: a.line,
                    token_file: a.token_file,
                    once,
                    off_cpu: a.off_cpu,
                },
                // Local mode runs the daemon's loop in this process.
                pyebpf::daemon::local::prepare,
            )
        }
        Command::Record(a) => {
            init_logging("warn", false);
            let duration = match a.duration {
                Some(d) if !(d.is_finite() && d > 0.0 && d <= 86_400.0 * 365.0) => {
                    anyhow::bail!("--duration must be a positive number of seconds, got {d}")
                }
                Some(d) => Some(Duration::from_secs_f64(d)),
                None => None,
            };
            let opts = RecordOptions {
                format: a
                    .format
                    .map(Format::from)
                    .unwrap_or_else(|| format_from_name(&a.output)),
                pids: a.pids,
                duration,
                kind: a.mode.into(),
                sampler: RecordOptions::sampler_for(
                    a.mode.into(),
                    SamplerConfig {
                        rate_hz: a.rate,
                        max_depth: a.max_depth,
                        user_stack_bytes: if a.native_stacks {
                            a.native_stack_bytes
                        } else {
                            0
                        },
                        ..SamplerConfig::default()
                    },
                    a.off_cpu_period_us.map(|us| us * 1_000),
                    a.kernel,
                ),
                output: a.output,
                status: !a.quiet,
                native: a.native || a.native_stacks,
                per_thread: a.threads,
                // At most 1 TiB (checked above): fits a usize on 64-bit hosts.
                memory_budget: usize::try_from(a.memory_budget_mib << 20).map_err(|_| {
                    anyhow::anyhow!("--memory-budget-mib is too large for this host")
                })?,
            };
            pyebpf::caps::require("pyebpf record", &pyebpf::caps::record_requirements())?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let summary = rt.block_on(record::run(&opts))?;
            eprint!("{}", summary.render(&opts));
            Ok(())
        }
    }
}
