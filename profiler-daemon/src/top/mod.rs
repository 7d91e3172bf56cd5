//! `pyebpf top`: a live, system-wide view of the hottest Python code.
//!
//! - [`display`]: numbers as they are printed (the rows themselves are
//!   [`crate::model::top`]'s).
//! - [`source`]: where snapshots come from: a running `pyebpf daemon`'s
//!   `/api/top` (no privileges needed), or a sampler loaded by `top` itself
//!   (CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE).
//! - [`ui`]: the terminal interface (ratatui + crossterm).
//!
//! `--once` prints a single snapshot (a table, or JSON) instead, for scripts.
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use self::display::{format_duration, percent, seconds_of};
use self::source::{Mode, TopSource};
use crate::model::api::PrepareLocal;
use crate::model::top::{TopQuery, TopSnapshot};

pub mod display;
pub mod source;
pub mod ui;

/// Where a running daemon is looked for when neither `--daemon` nor
/// `--local` is given (the daemon's default `listen`).
pub const DEFAULT_DAEMON_URL: &str = "http://127.0.0.1:7464";
/// [`DEFAULT_DAEMON_URL`]'s address.
pub const DEFAULT_DAEMON_ADDR: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 7464),
);
/// `--window` when not given: the "last N seconds" view.
pub const DEFAULT_WINDOW_SECS: u32 = 10;
/// `--duration` of `--once` when not given.
pub const DEFAULT_ONCE_SECS: u32 = 5;
/// `--rate` in local mode when not given (the daemon's default).
pub const DEFAULT_RATE_HZ: u64 = 99;
/// Rows of the `--once` text table (JSON has them all).
pub const TEXT_ROWS: usize = 40;

/// Which source to read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceChoice {
    /// The daemon at [`DEFAULT_DAEMON_URL`] if it answers, else local.
    Auto,
    /// This daemon's HTTP API (a base URL such as `http://127.0.0.1:7464`).
    Daemon(String),
    /// Always sample locally.
    Local,
}

/// `--once`: one snapshot, printed, then exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Once {
    /// Seconds to sample (local) or look back (daemon) before printing.
    pub duration_secs: u32,
    /// JSON ([`TopSnapshot`]) instead of a text table.
    pub json: bool,
}

/// Everything `pyebpf top` was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopOptions {
    /// Only these processes (all when empty).
    pub pids: Vec<u32>,
    /// Only processes with this service label.
    pub service: Option<String>,
    /// Local sampling rate; `None`: [`DEFAULT_RATE_HZ`]. Daemon mode uses
    /// the daemon's rate.
    pub rate_hz: Option<u64>,
    /// The "last N seconds" window.
    pub window_secs: u32,
    pub source: SourceChoice,
    /// Start with line-level rows.
    pub line_level: bool,
    /// The daemon's bearer token file (`--token-file`).
    pub token_file: Option<std::path::PathBuf>,
    pub once: Option<Once>,
    /// Local mode: also trace off-CPU time, so that `m` switches between
    /// cpu, wall and off-cpu (`--off-cpu`).
    pub off_cpu: bool,
}

impl Default for TopOptions {
    fn default() -> Self {
        TopOptions {
            pids: Vec::new(),
            service: None,
            rate_hz: None,
            window_secs: DEFAULT_WINDOW_SECS,
            source: SourceChoice::Auto,
            line_level: false,
            token_file: None,
            once: None,
            off_cpu: false,
        }
    }
}

/// Runs `pyebpf top` until the user quits (or, with `--once`, prints one
/// snapshot). `prepare_local` loads the sampling loop of local mode (the
/// daemon's, handed in by the caller so that `top` does not depend on it).
pub fn run(opts: TopOptions, prepare_local: PrepareLocal) -> anyhow::Result<()> {
    if let Some(once) = opts.once {
        if !(1..=86_400).contains(&once.duration_secs) {
            anyhow::bail!(
                "--duration must be from 1 to 86400 seconds, got {}",
                once.duration_secs
            );
        }
    } else {
        // Checked before anything is loaded or asked.
        ui::check_terminal()?;
    }
    // Before the runtime's threads: local mode loads and drops privileges.
    let plan = source::plan(&opts, prepare_local)?;
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pyebpf-top")
            .enable_all()
            .build()
            .context("cannot start the async runtime")?,
    );
    let mut src = source::open(plan, rt.clone())?;
    let result = match opts.once {
        Some(once) => run_once(src.as_mut(), &opts, once),
        None => ui::run(src.as_mut(), &opts, &rt),
    };
    let stopped = src.shutdown();
    result.and(stopped)
}

/// Waits `once.duration_secs`, then prints one snapshot on stdout.
fn run_once(src: &mut dyn TopSource, opts: &TopOptions, once: Once) -> anyhow::Result<()> {
    let q = TopQuery {
        // Local: everything since sampling started; daemon: as long back.
        seconds: match src.mode() {
            Mode::Local => None,
            Mode::Daemon(_) => Some(once.duration_secs),
        },
        pids: opts.pids.clone(),
        service: opts.service.clone(),
        line_level: opts.line_level,
        limit: None,
        kind: crate::profile::ProfileKind::Cpu,
    };
    let deadline = Instant::now() + Duration::from_secs(u64::from(once.duration_secs));
    loop {
        // A local sampler that died ends the wait with its error.
        src.health()?;
        match deadline.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => {
                std::thread::sleep(left.min(Duration::from_millis(200)))
            }
            _ => break,
        }
    }
    let snap = src.snapshot(&q)?;
    let out = if once.json {
        let mut s = serde_json::to_string_pretty(&snap)?;
        s.push('\n');
        s
    } else {
        text_report(&snap, src.mode(), &q, TEXT_ROWS)
    };
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// What the header says about the window: `last 10 s` or `whole run (42 s)`.
pub fn window_label(q: &TopQuery, snap: Option<&TopSnapshot>) -> String {
    match (q.seconds, snap) {
        (Some(s), _) => format!("last {s} s"),
        (None, Some(snap)) => format!("whole run ({} s)", snap.window_secs),
        (None, None) => "whole run".to_string(),
    }
}

/// `99 Hz`, or `-` while the rate is not known (nothing profiled yet).
pub fn rate_label(rate_hz: u32) -> String {
    if rate_hz == 0 {
        "-".to_string()
    } else {
        format!("{rate_hz} Hz")
    }
}

/// A row's Python version for display: `3.14`, or `-` when not known (a
/// daemon that does not say).
pub fn python_or_dash(python: &str) -> &str {
    if python.is_empty() {
        "-"
    } else {
        python
    }
}

/// The `--once` text table: a header line, the top `rows` functions by own
/// samples, and the processes.
pub fn text_report(snap: &TopSnapshot, mode: &Mode, q: &TopQuery, rows: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pyebpf top: {}, rate {}, {:.0} samples/s, {} processes profiled, {} drops, {} errors, \
         {}, {} samples, {} level",
        mode.describe(),
        rate_label(snap.rate_hz),
        snap.samples_per_sec,
        snap.processes_profiled,
        snap.drops,
        snap.errors,
        window_label(q, Some(snap)),
        snap.total_samples,
        if q.line_level { "line" } else { "function" },
    );
    out.push('\n');
    let _ = writeln!(
        out,
        "{:>6} {:>7} {:>8} {:>8} {:>8}  {:<15} {:<6} {:<16} FUNCTION",
        "OWN%", "TOTAL%", "OWN", "TOTAL", "PID", "COMMAND", "PYTHON", "SERVICE"
    );
    let rate = snap.rate_hz;
    for r in snap.functions.iter().take(rows) {
        let _ = writeln!(
            out,
            "{:>5.1}% {:>6.1}% {:>8} {:>8} {:>8}  {:<15} {:<6} {:<16} {}",
            percent(r.own, snap.total_samples),
            percent(r.total, snap.total_samples),
            format_duration(seconds_of(r.own, rate)),
            format_duration(seconds_of(r.total, rate)),
            r.pid,
            r.command,
            python_or_dash(&r.python),
            r.service,
            r.label()
        );
    }
    if snap.functions.len() > rows {
        let _ = writeln!(
            out,
            "... {} more (--json has every row)",
            snap.functions.len() - rows
        );
    }
    if snap.functions.is_empty() {
        out.push_str("(no Python samples)\n");
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "{:>8} {:>9} {:>7} {:>9}  {:<15} {:<6} SERVICE",
        "PID", "SAMPLES", "SHARE%", "CPU TIME", "COMMAND", "PYTHON"
    );
    for p in &snap.processes {
        let _ = writeln!(
            out,
            "{:>8} {:>9} {:>6.1}% {:>9}  {:<15} {:<6} {}",
            p.pid,
            p.samples,
            percent(p.samples, snap.total_samples),
            format_duration(seconds_of(p.samples, rate)),
            p.command,
            python_or_dash(&p.python),
            p.service
        );
    }
    if snap.processes.is_empty() {
        out.push_str("(no profiled process matches)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::top::{FunctionRow, ProcessRow};

    fn sample_snapshot() -> TopSnapshot {
        let row = |name: &str, own: u64, total: u64| FunctionRow {
            qualname: name.into(),
            filename: "/srv/app/handlers.py".into(),
            line: None,
            first_line: 12,
            pid: 4242,
            command: "python3".into(),
            service: "web".into(),
            python: "3.14".into(),
            own,
            total,
        };
        TopSnapshot {
            rate_hz: 99,
            samples_per_sec: 98.7,
            processes_profiled: 2,
            drops: 0,
            errors: 1,
            total_samples: 200,
            window_secs: 10,
            functions: vec![row("handle", 150, 190), row("<module>", 10, 200)],
            processes: vec![ProcessRow {
                pid: 4242,
                command: "python3".into(),
                service: "web".into(),
                python: "3.14".into(),
                samples: 200,
                gil_wait_permille: None,
            }],
            functions_total: 2,
            processes_total: 1,
            kind: String::new(),
            types: Vec::new(),
        }
    }

    #[test]
    fn text_report_has_header_rows_and_processes() {
        let q = TopQuery {
            seconds: Some(10),
            ..Default::default()
        };
        let t = text_report(&sample_snapshot(), &Mode::Local, &q, 1);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with(
                "pyebpf top: local, rate 99 Hz, 99 samples/s, 2 processes profiled, 0 drops, \
                 1 errors, last 10 s, 200 samples, function level"
            ),
            "{t}"
        );
        assert!(lines[2].contains("OWN%") && lines[2].ends_with("FUNCTION"));
        assert!(
            lines[2].contains("  COMMAND         PYTHON SERVICE "),
            "{t}"
        );
        assert!(
            lines[3].starts_with(
                " 75.0%   95.0%    1.52s    1.92s     4242  python3         3.14   web"
            ),
            "{t}"
        );
        assert!(
            lines[3].ends_with("handle (/srv/app/handlers.py:12)"),
            "{t}"
        );
        assert_eq!(lines[4], "... 1 more (--json has every row)");
        assert!(
            t.contains("     PID   SAMPLES  SHARE%  CPU TIME  COMMAND         PYTHON SERVICE\n"),
            "{t}"
        );
        assert!(
            t.contains("    4242       200  100.0%     2.02s  python3         3.14   web\n"),
            "{t}"
        );
        // A daemon that does not give the version: a dash.
        let mut old = sample_snapshot();
        old.processes[0].python.clear();
        old.functions[0].python.clear();
        let t = text_report(&old, &Mode::Local, &q, 1);
        assert!(
            t.contains("    4242       200  100.0%     2.02s  python3         -      web\n"),
            "{t}"
        );
        assert!(t.contains("4242  python3         -      web "), "{t}");
        let q = TopQuery::default();
        let t = text_report(
            &TopSnapshot::default(),
            &Mode::Daemon("http://x".into()),
            &q,
            5,
        );
        assert!(
            t.starts_with("pyebpf top: daemon http://x, rate -, "),
            "{t}"
        );
        assert!(t.contains("whole run (0 s)"));
        assert!(t.contains("(no Python samples)") && t.contains("(no profiled process matches)"));
    }

    #[test]
    fn default_daemon_address_is_the_urls() {
        assert_eq!(DEFAULT_DAEMON_URL, format!("http://{DEFAULT_DAEMON_ADDR}"));
    }

    #[test]
    fn labels() {
        let q = TopQuery::default();
        assert_eq!(window_label(&q, None), "whole run");
        assert_eq!(rate_label(0), "-");
        assert_eq!(rate_label(99), "99 Hz");
    }
}
