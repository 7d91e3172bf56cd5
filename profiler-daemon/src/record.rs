//! `pyebpf record`: profile chosen CPython processes to a file.
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use aya::maps::{MapData, RingBuf};
use profiler_common::{Counter, ReadStep};

use crate::aggregate::Aggregator;
use crate::bpf::counters::Counters;
use crate::bpf::events;
use crate::bpf::sampler::{drain_timer, poll_ring, Sampler, SamplerConfig};
use crate::process::python::{self, PythonProcess};
use crate::profile::Format;

/// What `pyebpf record` was asked to do.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub pids: Vec<u32>,
    pub duration: Option<Duration>,
    pub sampler: SamplerConfig,
    pub format: Format,
    pub output: PathBuf,
    /// Show a live status line on stderr (when it is a terminal).
    pub status: bool,
}

/// A recorded process, as the summary describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedProcess {
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub command: String,
    /// e.g. "3.14.10".
    pub version: String,
    /// `_PyRuntime` is in libpython (a shared build), not in the executable.
    pub libpython: bool,
}

impl RecordedProcess {
    pub fn of(p: &PythonProcess) -> Self {
        RecordedProcess {
            pid: p.pid,
            command: p.command.clone(),
            version: p.version.to_string(),
            libpython: p.interp_binary != p.exe,
        }
    }

    /// `process 4242 (python3.14): CPython 3.14.10, static build` (or
    /// `libpython`).
    pub fn describe(&self) -> String {
        format!(
            "process {} ({}): CPython {}, {}",
            self.pid,
            self.command,
            self.version,
            if self.libpython {
                "libpython"
            } else {
                "static build"
            }
        )
    }
}

/// What happened during a recording, printed at the end.
#[derive(Clone, Debug, Default)]
pub struct RecordSummary {
    pub elapsed: Duration,
    /// The processes recorded, in `--pid` order.
    pub processes: Vec<RecordedProcess>,
    pub counters: Counters,
    /// Samples received and aggregated.
    pub samples: u64,
    pub distinct_stacks: usize,
    pub unknown_frames: u64,
    pub stale_code: u64,
    pub decode_errors: u64,
    pub exited: Vec<u32>,
    /// Kernel-measured run time of the BPF programs.
    pub bpf: crate::bpf::sampler::RunStats,
}

impl RecordSummary {
    /// Multi-line, human-readable summary.
    pub fn render(&self, opts: &RecordOptions) -> String {
        let c = &self.counters;
        let mut s = format!(
            "pyebpf record: {:.1} s, {} process(es), {} samples ({} distinct stacks) written to {} ({})\n",
            self.elapsed.as_secs_f64(),
            opts.pids.len(),
            self.samples,
            self.distinct_stacks,
            opts.output.display(),
            format_name(opts.format),
        );
        for p in &self.processes {
            s += &format!("  {}\n", p.describe());
        }
        s += &format!(
            "  truncated at --max-depth {}: {}   partial (read failed): {}   ring buffer full (dropped): {}\n",
            opts.sampler.max_depth,
            c.get(Counter::Truncated),
            c.get(Counter::ReadFailed),
            c.get(Counter::RingBufFull),
        );
        let steps: Vec<String> = ReadStep::ALL
            .iter()
            .filter(|st| c.read_error(**st) > 0)
            .map(|st| format!("{} {}", st.name(), c.read_error(*st)))
            .collect();
        if !steps.is_empty() {
            s += &format!("  read failures by step: {}\n", steps.join(", "));
        }
        s += &format!(
            "  threads without Python state: {}   unknown frames: {} (code object replaced: {})   tail-call failures: {}   bad records: {}\n",
            c.get(Counter::NoThreadState),
            self.unknown_frames,
            self.stale_code,
            c.get(Counter::TailCallFailed),
            self.decode_errors,
        );
        let sampled = c.get(Counter::Sampled);
        let wakeups = c.get(Counter::Wakeups);
        s += &format!(
            "  reader wakeups: {wakeups} ({:.1} stacks per wakeup; new code objects wake it at once)\n",
            sampled as f64 / wakeups.max(1) as f64,
        );
        if self.bpf.samples > 0 && sampled > 0 {
            s += &format!(
                "  BPF cost (kernel stats): {:.1} us per stack sent, {:.0} ns per perf event, {:.1} ms in total\n",
                self.bpf.run_time.as_secs_f64() * 1e6 / sampled as f64,
                self.bpf.run_time.as_secs_f64() * 1e9 / self.bpf.samples as f64,
                self.bpf.run_time.as_secs_f64() * 1e3,
            );
        }
        if !self.exited.is_empty() {
            let p: Vec<String> = self.exited.iter().map(u32::to_string).collect();
            s += &format!(
                "  exited during recording (samples kept): {}\n",
                p.join(", ")
            );
        }
        s
    }
}

pub fn format_name(f: Format) -> &'static str {
    match f {
        Format::Folded => "folded",
        Format::Svg => "svg",
        Format::Pprof => "pprof",
        Format::Speedscope => "speedscope",
    }
}

/// Inspects every target; the first one that cannot be profiled is an error
/// naming the reason.
pub fn inspect_targets(pids: &[u32]) -> anyhow::Result<Vec<PythonProcess>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for &pid in pids {
        if !seen.insert(pid) {
            continue;
        }
        out.push(python::inspect(pid).with_context(|| format!("cannot profile process {pid}"))?);
    }
    Ok(out)
}

/// Records until the duration elapses, Ctrl-C, or every target has exited.
pub async fn run(opts: &RecordOptions) -> anyhow::Result<RecordSummary> {
    if opts.pids.is_empty() {
        bail!("no process to record: give at least one --pid");
    }
    let targets = inspect_targets(&opts.pids)?;
    let mut sampler = Sampler::start(opts.sampler)?;
    let mut agg = Aggregator::default();
    for t in &targets {
        agg.add_target(t.pid, &t.command, t.code_format());
        sampler
            .add_process(t.pid, t.proc_info())
            .with_context(|| format!("cannot register process {}", t.pid))?;
    }
    let ring = sampler.take_ring().context("ring buffer already taken")?;
    let mut ring = poll_ring(ring)?;

    let started = Instant::now();
    let wall_start = SystemTime::now();
    let deadline = opts.duration.map(|d| started + d);
    let mut alive: HashMap<u32, u64> = targets.iter().map(|t| (t.pid, t.start_time)).collect();
    let mut exited = Vec::new();
    let mut decode_errors = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut batch = drain_timer();
    let show_status = opts.status && std::io::stderr().is_terminal();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    loop {
        let sleep_until = deadline.map(tokio::time::Instant::from_std);
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("polling the ring buffer")?;
                drain(guard.get_inner_mut(), &mut agg, &mut decode_errors);
                guard.clear_ready();
            }
            _ = batch.tick() => drain(ring.get_mut(), &mut agg, &mut decode_errors),
            _ = tick.tick() => {
                // Samples queued before an exit are symbolised first.
                drain(ring.get_mut(), &mut agg, &mut decode_errors);
                alive.retain(|pid, start| {
                    let same = python::is_alive(*pid, *start);
                    if !same {
                        sampler.remove_process(*pid);
                        exited.push(*pid);
                    }
                    same
                });
                if show_status {
                    status_line(&sampler, &agg, started.elapsed());
                }
                if alive.is_empty() {
                    tracing::info!("every target has exited; stopping");
                    break;
                }
            }
            _ = async { tokio::time::sleep_until(sleep_until.unwrap_or_else(tokio::time::Instant::now)).await }, if sleep_until.is_some() => break,
            r = &mut ctrl_c => {
                r.context("waiting for Ctrl-C")?;
                break;
            }
        }
    }
    if show_status {
        eprintln!();
    }
    // Stop new samples, then take what is already in the ring.
    for pid in alive.keys() {
        sampler.remove_process(*pid);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    drain(ring.get_mut(), &mut agg, &mut decode_errors);
    let counters = sampler.counters()?;
    let bpf = sampler.run_stats();
    drop(sampler);

    let (mut profile, unknown_frames) =
        agg.to_profile(opts.sampler.rate_hz as u32, targets.len() > 1);
    profile.start = Some(wall_start);
    profile.duration = started.elapsed();
    write_profile(&profile, opts)?;
    let sym = agg.symbol_stats();
    Ok(RecordSummary {
        elapsed: started.elapsed(),
        processes: targets.iter().map(RecordedProcess::of).collect(),
        counters,
        samples: agg.samples,
        distinct_stacks: agg.distinct_stacks(),
        unknown_frames,
        stale_code: sym.stale,
        decode_errors,
        exited,
        bpf,
    })
}

fn drain(ring: &mut RingBuf<MapData>, agg: &mut Aggregator, decode_errors: &mut u64) {
    while let Some(item) = ring.next() {
        match events::decode(&item) {
            Ok(s) => agg.add(s),
            Err(e) => {
                *decode_errors += 1;
                tracing::debug!("dropped a ring-buffer record: {e}");
            }
        }
    }
}

fn status_line(sampler: &Sampler, agg: &Aggregator, elapsed: Duration) {
    let c = sampler.counters().unwrap_or_default();
    let errors = c.get(Counter::ReadFailed) + c.get(Counter::TailCallFailed);
    eprint!(
        "\r\x1b[2K[pyebpf] {:>6.1}s  samples {}  stacks {}  errors {}  dropped {}  truncated {}",
        elapsed.as_secs_f64(),
        agg.samples,
        agg.distinct_stacks(),
        errors,
        c.get(Counter::RingBufFull),
        c.get(Counter::Truncated),
    );
    let _ = std::io::stderr().flush();
}

/// Writes atomically: a partial file never replaces a good one.
fn write_profile(profile: &crate::profile::Profile, opts: &RecordOptions) -> anyhow::Result<()> {
    let tmp = opts.output.with_extension("pyebpf-tmp");
    let title = format!(
        "pyebpf: {} ({} samples at {} Hz)",
        opts.pids
            .iter()
            .map(|p| format!("pid {p}"))
            .collect::<Vec<_>>()
            .join(", "),
        profile.total_samples(),
        opts.sampler.rate_hz
    );
    {
        let f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(f);
        opts.format.write(profile, &title, &mut w)?;
        w.flush()
            .with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &opts.output)
        .with_context(|| format!("cannot move the profile to {}", opts.output.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RecordOptions {
        RecordOptions {
            pids: vec![4242, 4343],
            duration: Some(Duration::from_secs(10)),
            sampler: SamplerConfig::default(),
            format: Format::Svg,
            output: PathBuf::from("app.svg"),
            status: false,
        }
    }

    #[test]
    fn summary_names_each_process_and_its_python() {
        let summary = RecordSummary {
            elapsed: Duration::from_secs(10),
            processes: vec![
                RecordedProcess {
                    pid: 4242,
                    command: "python3.14".into(),
                    version: "3.14.10".into(),
                    libpython: false,
                },
                RecordedProcess {
                    pid: 4343,
                    command: "gunicorn".into(),
                    version: "3.11.7".into(),
                    libpython: true,
                },
            ],
            samples: 1126,
            distinct_stacks: 42,
            ..RecordSummary::default()
        };
        let text = summary.render(&opts());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "pyebpf record: 10.0 s, 2 process(es), 1126 samples (42 distinct stacks) written to \
             app.svg (svg)"
        );
        assert_eq!(
            lines[1],
            "  process 4242 (python3.14): CPython 3.14.10, static build"
        );
        assert_eq!(
            lines[2],
            "  process 4343 (gunicorn): CPython 3.11.7, libpython"
        );
        assert!(
            lines[3].starts_with("  truncated at --max-depth 2048: 0   "),
            "{text}"
        );
    }

    /// The build kind comes from where `_PyRuntime` is: libpython for the
    /// shared interpreter found on PATH, if it is one.
    #[test]
    fn recorded_process_of_a_live_interpreter() {
        use crate::process::python::test_support::{path_python, spawn_ready};
        let (child, _) = spawn_ready(std::process::Command::new(path_python()).args([
            "-c",
            "print('ready', flush=True); import time; time.sleep(30)",
        ]));
        let p = python::inspect(child.pid()).expect("inspect the interpreter");
        let r = RecordedProcess::of(&p);
        assert_eq!(r.pid, child.pid());
        assert_eq!(r.version, p.version.to_string());
        let shared = p
            .interp_binary
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("libpython"));
        assert_eq!(r.libpython, shared, "{p:?}");
        assert!(
            r.describe().starts_with(&format!(
                "process {} ({}): CPython {}, ",
                r.pid, p.command, p.version
            )),
            "{}",
            r.describe()
        );
    }
}
