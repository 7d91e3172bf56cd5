//! The soak's pass criteria and its report (SOAK.md).
//!
//! Latency rule: each phase's load runs as consecutive wrk segments. For
//! p50 and for p99, the baseline's noise is the largest deviation of one
//! of its segments from the median of its segments; a profiled phase
//! passes when the median of its own segments is at most the baseline's
//! median plus that noise (i.e. no worse than the baseline's own worst
//! swing).

use super::{Phase, Results};
use crate::bench::stats::Summary;
use crate::bench::watch::FLAT_MIB_PER_MIN;
use serde::Serialize;
use std::fmt::Write as _;

/// Largest share of samples with errors (walk errors, drops, unknown frames).
pub const MAX_ERROR_SHARE: f64 = 0.01;

#[derive(Clone, Debug, Serialize)]
pub struct Criterion {
    pub name: String,
    pub phase: String,
    pub measured: String,
    pub pass: bool,
}

impl Criterion {
    pub fn line(&self) -> String {
        let v = if self.pass { "PASS" } else { "FAIL" };
        format!("{v} {} [{}]: {}", self.name, self.phase, self.measured)
    }
}

/// A note when the machine was busier outside the soak during `p` than
/// during any baseline segment: its latency then measures the other work too.
fn busier(base: &Phase, p: &Phase) -> String {
    let most = |ph: &Phase| {
        ph.load
            .segments
            .iter()
            .map(|s| s.other_cpu_pct)
            .fold(0.0, f64::max)
    };
    let (b, o) = (most(base), p.load.all.other_cpu_pct);
    if o > b + 10.0 {
        format!("; other processes used a median {o:.0}% of a core per segment, the baseline at most {b:.0}%")
    } else {
        String::new()
    }
}

/// (median, noise) of a baseline figure over its segments.
fn noise(values: &[f64]) -> (f64, f64) {
    let m = Summary::of(values).map_or(0.0, |s| s.median);
    let n = values.iter().map(|v| (v - m).abs()).fold(0.0, f64::max);
    (m, n)
}

fn deaths_text(p: &Phase) -> String {
    let mut parts: Vec<String> = p
        .deaths
        .iter()
        .map(|d| format!("{} {}", d.pid, d.how))
        .collect();
    parts.extend(p.vanished.iter().map(|v| format!("{v} gone")));
    if !p.master_alive {
        parts.push("master exited".into());
    }
    if !p.churn_alive {
        parts.push("churn exited".into());
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

pub fn criteria(r: &Results) -> Vec<Criterion> {
    let mut out = Vec::new();
    let mut add = |name: &str, phase: &str, measured: String, pass: bool| {
        out.push(Criterion {
            name: name.into(),
            phase: phase.into(),
            measured,
            pass,
        })
    };
    for name in ["baseline", "daemon", "record"] {
        if !r.phases.iter().any(|p| p.name == name) {
            add("phase ran", name, "did not complete".into(), false);
        }
    }
    let base = r.phases.iter().find(|p| p.name == "baseline");
    for p in &r.phases {
        let ok = p.worker_deaths() == 0 && p.master_alive && p.churn_alive;
        add("zero worker deaths", &p.name, deaths_text(p), ok);
        let failed = p.load.all.non_2xx + p.load.all.socket_errors;
        add(
            "zero failed requests",
            &p.name,
            format!(
                "{} non-2xx, {} socket errors of {} requests",
                p.load.all.non_2xx, p.load.all.socket_errors, p.load.all.requests
            ),
            failed == 0,
        );
        let Some(f) = &p.profiler else { continue };
        add("zero profiler exits", &p.name, f.exit.clone(), f.stayed_up);
        add(
            "RSS flat",
            &p.name,
            format!(
                "{:.1} -> {:.1} MiB (max {:.1}), {:+.2} MiB/min over the second half",
                f.rss.start_mib, f.rss.end_mib, f.rss.max_mib, f.rss.slope_mib_per_min
            ),
            f.rss_flat,
        );
        add(
            "errors < 1% of samples",
            &p.name,
            format!(
                "{:.3}% ({} walk errors{}, {} dropped, {} unknown of {} samples)",
                f.error_share * 100.0,
                f.walk_errors,
                if f.read_errors_by_step.is_empty() {
                    String::new()
                } else {
                    format!(" [failed reads by step: {}]", f.read_errors_by_step)
                },
                f.ringbuf_dropped,
                f.unknown_frames,
                f.samples
            ),
            f.error_share < MAX_ERROR_SHARE && f.samples > 0.0,
        );
        let missing = f.shown.missing();
        add(
            "handlers at their marker lines",
            &p.name,
            if missing.is_empty() {
                format!("all {} markers found", f.shown.hits.len())
            } else {
                format!("missing: {}", missing.join(", "))
            },
            missing.is_empty(),
        );
        if let Some(b) = base {
            for (q, get) in [
                ("p50", (|s: &super::wrk::Segment| s.p50_ms) as fn(&_) -> f64),
                ("p99", |s| s.p99_ms),
            ] {
                let (m, n) = noise(&b.load.segments.iter().map(get).collect::<Vec<_>>());
                let v = get(&p.load.all);
                add(
                    &format!("{q} latency within the baseline's noise"),
                    &p.name,
                    format!(
                        "{v:.2} ms vs baseline {m:.2} ± {n:.2} ms (limit {:.2}){}",
                        m + n,
                        busier(b, p)
                    ),
                    v <= m + n,
                );
            }
        }
    }
    out
}

/// One phase's figures on the console.
pub fn print_phase(p: &Phase) {
    let l = &p.load.all;
    println!(
        "  {}: {} requests, {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} non-2xx, {} socket errors; worker deaths: {}",
        p.name, l.requests, l.requests_per_s, l.p50_ms, l.p99_ms, l.non_2xx, l.socket_errors, deaths_text(p)
    );
    if let Some(f) = &p.profiler {
        println!(
            "  {}: CPU {:.1}% of a core (+ BPF {:.2}%), RSS {:.1} -> {:.1} MiB ({:+.2} MiB/min), {} samples, \
             {} walk errors, {} dropped, {} unknown; {}; missing markers: {:?}",
            f.tool,
            f.cpu_pct,
            f.bpf_cpu_pct,
            f.rss.start_mib,
            f.rss.end_mib,
            f.rss.slope_mib_per_min,
            f.samples,
            f.walk_errors,
            f.ringbuf_dropped,
            f.unknown_frames,
            f.exit,
            f.shown.missing()
        );
    }
}

fn opt(p: &Phase, f: impl Fn(&super::profiler::Profiled) -> String) -> String {
    p.profiler.as_ref().map_or("—".into(), f)
}

/// A table's header: `first`, then one column per phase.
fn header<'a>(o: &mut String, first: &str, phases: impl Iterator<Item = &'a Phase>) {
    let names: Vec<&str> = phases.map(|p| p.name.as_str()).collect();
    let _ = writeln!(
        o,
        "| {first} | {} |\n|---|{}",
        names.join(" | "),
        "---|".repeat(names.len())
    );
}

pub fn markdown(r: &Results) -> String {
    let m = &r.meta;
    let s = &r.setup;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# pyebpf soak: can profiling hurt a production service?\n"
    );
    let _ = writeln!(
        o,
        "Written by `cargo xtask soak` ({} s of load per phase). A gunicorn app \
         (`tests/workloads/soak_app.py`, `-k gthread`, {} workers x {} threads) whose handlers \
         create and drop frames fast (generators, exceptions raised and caught, short-lived \
         threads, JSON, hashing, `gc.collect`) serves a bounded wrk load while a churn process \
         (`soak_churn.py`) keeps about {} threads being born and dying. The same service runs \
         through three phases: **baseline** (no profiler), **daemon** (`pyebpf daemon` at {} Hz) \
         and **record** (`pyebpf record` at {} Hz of the master, the workers and the churn).\n",
        s.phase_secs, s.workers, s.threads, s.churn_threads, s.rate_hz, s.rate_hz
    );
    let _ = writeln!(o, "## Machine\n");
    let _ = writeln!(o, "| | |\n|---|---|");
    for (k, v) in [
        ("date", m.date_utc.clone()),
        ("kernel", m.kernel.clone()),
        ("CPUs (nproc)", m.nproc.to_string()),
        ("memory", format!("{:.1} GiB", m.memory_gib)),
        ("load average at start", m.loadavg_start.clone()),
        ("load average at end", m.loadavg_end.clone()),
        ("git revision", m.git.clone()),
        ("pyebpf", m.pyebpf_version.clone()),
        ("Python", m.python_version.clone()),
        ("gunicorn", m.gunicorn_version.clone()),
        ("wrk", m.wrk_version.clone()),
        ("duration of the run", format!("{:.0} s", m.seconds)),
    ] {
        let _ = writeln!(o, "| {k} | {v} |");
    }
    let _ = writeln!(
        o,
        "\nThe machine is shared: other builds and tests ran beside the soak, which shows in \
         the load average and in the latency's spread.\n"
    );
    let _ = writeln!(o, "## Verdict\n");
    let _ = writeln!(
        o,
        "| criterion | phase | measured | verdict |\n|---|---|---|---|"
    );
    for c in &r.criteria {
        let v = if c.pass { "PASS" } else { "**FAIL**" };
        let _ = writeln!(o, "| {} | {} | {} | {v} |", c.name, c.phase, c.measured);
    }
    for f in &r.failures {
        let _ = writeln!(o, "\nFailed to run: {f}");
    }
    let _ = writeln!(o, "\n## Phases\n");
    header(&mut o, "", r.phases.iter());
    let row = |o: &mut String, k: &str, f: &dyn Fn(&Phase) -> String| {
        let cells: Vec<String> = r.phases.iter().map(f).collect();
        let _ = writeln!(o, "| {k} | {} |", cells.join(" | "));
    };
    row(&mut o, "requests", &|p| p.load.all.requests.to_string());
    row(&mut o, "requests/s (median of segments)", &|p| {
        format!("{:.1}", p.load.all.requests_per_s)
    });
    row(&mut o, "p50 latency (median of segments)", &|p| {
        format!("{:.2} ms", p.load.all.p50_ms)
    });
    row(&mut o, "p99 latency (median of segments)", &|p| {
        format!("{:.2} ms", p.load.all.p99_ms)
    });
    row(&mut o, "p99 of each segment", &|p| {
        p.load
            .segments
            .iter()
            .map(|s| format!("{:.1}", s.p99_ms))
            .collect::<Vec<_>>()
            .join(", ")
    });
    row(
        &mut o,
        "CPU of other processes, each segment (% of a core)",
        &|p| {
            p.load
                .segments
                .iter()
                .map(|s| format!("{:.0}", s.other_cpu_pct))
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    row(&mut o, "non-2xx / socket errors", &|p| {
        format!("{} / {}", p.load.all.non_2xx, p.load.all.socket_errors)
    });
    row(&mut o, "worker deaths (signals)", &|p| deaths_text(p));
    row(&mut o, "workers booted", &|p| p.boots.to_string());
    row(&mut o, "profiler CPU (% of a core)", &|p| {
        opt(p, |f| format!("{:.1}", f.cpu_pct))
    });
    row(
        &mut o,
        "BPF sampler CPU (% of a core, charged to the targets)",
        &|p| opt(p, |f| format!("{:.2}", f.bpf_cpu_pct)),
    );
    row(&mut o, "profiler RSS start -> end (max)", &|p| {
        opt(p, |f| {
            format!(
                "{:.1} -> {:.1} ({:.1}) MiB",
                f.rss.start_mib, f.rss.end_mib, f.rss.max_mib
            )
        })
    });
    row(&mut o, "RSS slope, second half", &|p| {
        opt(p, |f| {
            let v = if f.rss_flat { "flat" } else { "NOT flat" };
            format!("{:+.2} MiB/min ({v})", f.rss.slope_mib_per_min)
        })
    });
    row(&mut o, "samples received", &|p| {
        opt(p, |f| format!("{:.0}", f.samples))
    });
    row(&mut o, "walk errors (read / tail call)", &|p| {
        opt(p, |f| format!("{:.0}", f.walk_errors))
    });
    row(&mut o, "failed reads by walk step", &|p| {
        opt(p, |f| f.read_errors_by_step.clone())
    });
    row(&mut o, "ring-buffer drops", &|p| {
        opt(p, |f| format!("{:.0}", f.ringbuf_dropped))
    });
    row(&mut o, "samples with unknown frames", &|p| {
        opt(p, |f| f.unknown_frames.to_string())
    });
    row(&mut o, "profiler stayed up", &|p| {
        opt(p, |f| f.exit.clone())
    });
    let _ = writeln!(o, "\n### Samples at each handler's marker line\n");
    header(
        &mut o,
        "frame",
        r.phases.iter().filter(|p| p.profiler.is_some()),
    );
    let frames: Vec<String> = r
        .phases
        .iter()
        .find_map(|p| p.profiler.as_ref())
        .map(|f| f.shown.hits.iter().map(|h| h.frame.clone()).collect())
        .unwrap_or_default();
    for frame in frames {
        let cells: Vec<String> = r
            .phases
            .iter()
            .filter_map(|p| p.profiler.as_ref())
            .map(|f| {
                f.shown
                    .hits
                    .iter()
                    .find(|h| h.frame == frame)
                    .map_or("—".into(), |h| h.samples.to_string())
            })
            .collect();
        let _ = writeln!(o, "| `{frame}` | {} |", cells.join(" | "));
    }
    let _ = writeln!(o, "\n## Method and pass criteria\n");
    let _ = writeln!(
        o,
        "- One gunicorn master and the churn run through all phases (a warm-up of {} s of load \
         first, not reported); the profilers attach to the running service, as in production.\n\
         - Load: `wrk -t{} -c{} --latency` with `tests/workloads/soak_wrk.lua`, which cycles \
         through the six handlers and pauses {} ms between a connection's requests, so the \
         service is loaded but not saturated and latency is service time rather than queueing. \
         Each phase runs {} consecutive wrk segments of {} s.\n\
         - The daemon runs with its defaults but `aggregation.retention_secs: {}` (a quarter \
         of the phase, at least 60 s): with the default 600 s its store would still be filling \
         at the end of a 600 s phase, and that legitimate growth would blur the RSS verdict. \
         Its profile is read from `/folded` of every target over that retention.\n\
         - Profiler CPU: utime + stime of the daemon or record process (`/proc/PID/stat`) over \
         the load, in % of one core. The BPF sampler runs in the interrupted process's context, \
         so its run time (the kernel's BPF statistics) is charged to the profiled processes and \
         shown on its own line.\n\
         - **Zero worker deaths**: no line \"Worker (pid:N) was sent SIG…\", \"exited with \
         code\" or \"WORKER TIMEOUT\" in gunicorn's error log during the phase, every worker of \
         the phase's start still there at its end, and master and churn alive.\n\
         - **Zero failed requests**: no non-2xx response and no socket error (connect, read, \
         write, timeout) in any segment.\n\
         - **Zero profiler exits**: the daemon keeps its pid through the load and exits 0 on \
         SIGTERM; record stays up through the load and exits 0 at the end of `--duration`.\n\
         - **RSS flat**: the profiler's RSS, read every second during the load, grows less than \
         {FLAT_MIB_PER_MIN} MiB/min by a least-squares fit over the second half of the phase \
         (or less than 1 MiB in all over that half).\n\
         - **Errors < 1% of samples**: (walks ended by a failed read or tail call + ring-buffer \
         drops + samples with an `[unknown code object]` frame) / samples received, over the \
         load (daemon: its /metrics before and after and its /folded of every target; record: \
         its summary and its folded output).\n\
         - **Handlers at their marker lines**: every `# HOT:name` line of soak_app.py and \
         soak_churn.py shows up as a frame `function (…/file.py:LINE)` at exactly that line in \
         the phase's profile.\n\
         - **Latency within the baseline's noise**: for p50 and p99 separately, the noise is the \
         largest deviation of one baseline segment from the median of the baseline's segments; \
         a profiled phase passes if the median of its segments is at most the baseline median \
         plus that noise. Each segment also records the CPU used by processes outside the soak \
         (machine-wide busy time from `/proc/stat` minus this run's own process tree): a verdict \
         reached while the machine was busier than in every baseline segment says so.\n",
        s.warmup_secs,
        s.load.threads,
        s.load.connections,
        s.load.pause_ms,
        s.load.segments,
        s.segment_secs,
        s.daemon_retention_secs
    );
    o
}
