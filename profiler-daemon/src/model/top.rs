//! What `pyebpf top` shows (locally, or from the daemon's `/api/top`),
//! computed from per-process profiles: pure data, no terminal and no BPF, so
//! every rule here is unit-tested.
//!
//! - A *function row* is one Python function (or one line of it, in
//!   line-level mode) in one process. `own` counts the samples where it was
//!   the leaf (running its own code); `total` counts the samples whose stack
//!   contains it anywhere, once per stack even when it recurses.
//! - Synthetic frames (`[truncated]`, `[unknown code object: ...]`, process
//!   roots, ...) are not functions: they never get a row, but their samples
//!   still count in the totals the percentages are taken of.
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::labels::ProcessLabels;
use crate::profile::{CompactProfile, Frame, ProfileKind};

/// What a `top` view asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopQuery {
    /// The last `seconds` seconds; `None`: everything held (the whole run in
    /// local mode, the daemon's retention in daemon mode).
    pub seconds: Option<u32>,
    /// Only these processes (all when empty).
    pub pids: Vec<u32>,
    /// Only processes with this service label.
    pub service: Option<String>,
    /// One row per (function, line) instead of per function.
    pub line_level: bool,
    /// At most this many function rows by own samples plus this many by
    /// total samples (their union), and this many process rows; `None`:
    /// all. The daemon's `/api/top` always sets it, to bound its answers.
    pub limit: Option<u32>,
    /// The profile type shown (`type=`): cpu by default.
    pub kind: ProfileKind,
}

impl TopQuery {
    /// Whether the pid and service filters keep this process.
    pub fn selects(&self, labels: &ProcessLabels) -> bool {
        (self.pids.is_empty() || self.pids.contains(&labels.pid))
            && self.service.as_ref().is_none_or(|s| *s == labels.service)
    }
}

/// One function (or line, in line-level mode) of one process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRow {
    pub qualname: String,
    pub filename: String,
    /// The line, in line-level mode only.
    pub line: Option<u32>,
    /// `co_firstlineno`: where the function starts.
    pub first_line: u32,
    pub pid: u32,
    pub command: String,
    pub service: String,
    /// The process's Python, major.minor (`"3.14"`, `"3.14t"` for a
    /// free-threaded build); empty when not known (an older daemon).
    #[serde(default)]
    pub python: String,
    /// Samples where this was the leaf frame.
    pub own: u64,
    /// Samples whose stack contains it (once per stack).
    pub total: u64,
}

impl FunctionRow {
    /// The line shown next to the file: the line in line-level mode, else
    /// the function's first line.
    pub fn shown_line(&self) -> u32 {
        self.line.unwrap_or(self.first_line)
    }

    /// `qualname (file:line)`, as flamegraphs and `record` write frames.
    pub fn label(&self) -> String {
        format!(
            "{} ({}:{})",
            self.qualname,
            self.filename,
            self.shown_line()
        )
    }
}

/// One process and its samples in the window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRow {
    pub pid: u32,
    pub command: String,
    pub service: String,
    /// Its Python, major.minor (`"3.14"`, `"3.14t"` for a free-threaded
    /// build); empty when not known (an older daemon).
    #[serde(default)]
    pub python: String,
    pub samples: u64,
    /// Share of its threads' wall time spent waiting for the GIL since it
    /// was first profiled, in tenths of a percent (with off-CPU sampling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gil_wait_permille: Option<u32>,
}

/// Everything one refresh of `top` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TopSnapshot {
    /// Samples per second per CPU: a sample stands for `1 / rate_hz` s of
    /// CPU. 0 while unknown (nothing profiled yet).
    pub rate_hz: u32,
    /// Samples received per second lately, every profiled process counted.
    pub samples_per_sec: f64,
    /// Python processes being profiled now (whatever the filters).
    pub processes_profiled: u64,
    /// Samples lost since the sampler started (BPF ring buffer full).
    pub drops: u64,
    /// Stack walks that failed since the sampler started (read errors,
    /// failed tail calls); those samples are kept, flagged partial.
    pub errors: u64,
    /// Samples of the selected processes in the window: what the
    /// percentages are of.
    pub total_samples: u64,
    /// Seconds the window covers.
    pub window_secs: u32,
    /// Sorted by own samples, most first.
    pub functions: Vec<FunctionRow>,
    /// Sorted by samples, most first.
    pub processes: Vec<ProcessRow>,
    /// Function rows before the query's `limit` (more than `functions`
    /// holds when rows were left out).
    #[serde(default)]
    pub functions_total: u64,
    /// Process rows before the query's `limit`.
    #[serde(default)]
    pub processes_total: u64,
    /// The profile type of the values (`cpu`: samples at `rate_hz`; `wall`,
    /// `off-cpu`: nanoseconds); empty from an older daemon (cpu).
    #[serde(default)]
    pub kind: String,
    /// The types the source holds (`m` cycles through them); empty from an
    /// older daemon (cpu only).
    #[serde(default)]
    pub types: Vec<String>,
}

impl TopSnapshot {
    /// The profile type of its values.
    pub fn profile_kind(&self) -> ProfileKind {
        ProfileKind::ALL
            .into_iter()
            .find(|k| k.name() == self.kind)
            .unwrap_or_default()
    }

    /// Values per second of time: `rate_hz` for CPU samples, 1e9 for
    /// nanoseconds.
    pub fn values_per_sec(&self) -> u32 {
        match self.profile_kind().unit() {
            crate::profile::ValueUnit::Samples => self.rate_hz,
            crate::profile::ValueUnit::Nanoseconds => 1_000_000_000,
        }
    }
}

impl TopSnapshot {
    /// Sets the `python` of every row from its pid (left empty where
    /// `python_of` does not know the pid).
    pub fn set_python<'a>(&mut self, python_of: impl Fn(u32) -> Option<&'a str>) {
        for r in &mut self.functions {
            r.python = python_of(r.pid).unwrap_or_default().to_string();
        }
        for p in &mut self.processes {
            p.python = python_of(p.pid).unwrap_or_default().to_string();
        }
    }
}

/// The header numbers [`snapshot`] does not compute from profiles.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Header {
    pub rate_hz: u32,
    pub samples_per_sec: f64,
    pub processes_profiled: u64,
    pub drops: u64,
    pub errors: u64,
    pub window_secs: u32,
}

/// How rows are ordered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Own samples, most first.
    #[default]
    Own,
    /// Total samples, most first.
    Total,
    /// Qualified name, A to Z.
    Name,
}

impl SortKey {
    pub fn as_str(self) -> &'static str {
        match self {
            SortKey::Own => "own",
            SortKey::Total => "total",
            SortKey::Name => "name",
        }
    }
}

/// Identity of a row within one process.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    qualname: Arc<str>,
    filename: Arc<str>,
    line: Option<u32>,
    first_line: u32,
}

fn key_of(f: &Frame, line_level: bool) -> Option<Key> {
    match f {
        Frame::Python {
            qualname,
            filename,
            line,
            first_line,
        } => Some(Key {
            qualname: qualname.clone(),
            filename: filename.clone(),
            line: line_level.then_some(*line),
            first_line: *first_line,
        }),
        _ => None,
    }
}

/// Builds the view of `per_process` (one profile per process) that `query`
/// asks for. Processes outside the pid/service filters are left out; the
/// others are listed even without samples. The window in `query` is the
/// caller's business (the profiles already cover it).
pub fn snapshot(
    per_process: &[(ProcessLabels, CompactProfile)],
    query: &TopQuery,
    header: &Header,
) -> TopSnapshot {
    let mut functions = Vec::new();
    let mut processes = Vec::new();
    let mut total_samples = 0;
    for (labels, profile) in per_process.iter().filter(|(l, _)| query.selects(l)) {
        let mut own: HashMap<Key, u64> = HashMap::new();
        let mut total: HashMap<Key, u64> = HashMap::new();
        let mut samples = 0;
        let mut seen = HashSet::new();
        for (stack, count) in profile.stacks() {
            samples += count;
            // Own: the innermost Python frame, under which only the kernel
            // or a wait's synthetic leaf may lie (the line where the thread
            // was, on CPU in the kernel or blocked).
            let leaf = stack.iter().rev().find(|f| {
                !matches!(
                    f,
                    Frame::Kernel { .. }
                        | Frame::Native { .. }
                        | Frame::NativeMarker(_)
                        | Frame::KernelTruncated
                        | Frame::KernelUnavailable
                        | Frame::GilWait
                        | Frame::Runnable
                )
            });
            if let Some(k) = leaf.and_then(|f| key_of(f, query.line_level)) {
                *own.entry(k).or_insert(0) += count;
            }
            seen.clear();
            for k in stack.iter().filter_map(|f| key_of(f, query.line_level)) {
                if seen.insert(k.clone()) {
                    *total.entry(k).or_insert(0) += count;
                }
            }
        }
        total_samples += samples;
        processes.push(ProcessRow {
            pid: labels.pid,
            command: labels.command.clone(),
            service: labels.service.clone(),
            python: String::new(),
            samples,
            gil_wait_permille: None,
        });
        for (k, t) in total {
            functions.push(FunctionRow {
                own: own.get(&k).copied().unwrap_or(0),
                total: t,
                qualname: k.qualname.to_string(),
                filename: k.filename.to_string(),
                line: k.line,
                first_line: k.first_line,
                pid: labels.pid,
                command: labels.command.clone(),
                service: labels.service.clone(),
                python: String::new(),
            });
        }
    }
    let (functions_total, processes_total) = (functions.len() as u64, processes.len() as u64);
    sort_processes(&mut processes);
    if let Some(limit) = query.limit {
        functions = hottest(functions, limit as usize);
        processes.truncate(limit as usize);
    }
    sort_functions(&mut functions, SortKey::Own);
    TopSnapshot {
        rate_hz: header.rate_hz,
        samples_per_sec: header.samples_per_sec,
        processes_profiled: header.processes_profiled,
        drops: header.drops,
        errors: header.errors,
        total_samples,
        window_secs: header.window_secs,
        functions,
        processes,
        functions_total,
        processes_total,
        kind: String::new(),
        types: Vec::new(),
    }
}

/// The `limit` hottest rows by total samples and the `limit` hottest by own
/// samples: a view sorted by either shows its top rows right.
fn hottest(mut rows: Vec<FunctionRow>, limit: usize) -> Vec<FunctionRow> {
    if rows.len() <= limit {
        return rows;
    }
    sort_functions(&mut rows, SortKey::Total);
    let mut by_own: Vec<FunctionRow> = rows.split_off(limit);
    sort_functions(&mut by_own, SortKey::Own);
    by_own.truncate(limit);
    rows.extend(by_own);
    rows
}

fn by_name(a: &FunctionRow, b: &FunctionRow) -> Ordering {
    a.qualname
        .cmp(&b.qualname)
        .then_with(|| a.filename.cmp(&b.filename))
        .then_with(|| a.shown_line().cmp(&b.shown_line()))
        .then_with(|| a.pid.cmp(&b.pid))
}

/// Orders rows by `key`; ties are broken by the other counts, then by name
/// and pid, so the order is deterministic.
pub fn sort_functions(rows: &mut [FunctionRow], key: SortKey) {
    match key {
        SortKey::Own => rows.sort_by(|a, b| {
            b.own
                .cmp(&a.own)
                .then_with(|| b.total.cmp(&a.total))
                .then_with(|| by_name(a, b))
        }),
        SortKey::Total => rows.sort_by(|a, b| {
            b.total
                .cmp(&a.total)
                .then_with(|| b.own.cmp(&a.own))
                .then_with(|| by_name(a, b))
        }),
        SortKey::Name => rows.sort_by(by_name),
    }
}

/// Most samples first, then by pid.
pub fn sort_processes(rows: &mut [ProcessRow]) {
    rows.sort_by(|a, b| b.samples.cmp(&a.samples).then_with(|| a.pid.cmp(&b.pid)));
}

/// Whether `row` matches the text filter: a case-insensitive substring of
/// its qualified name or its file. An empty filter matches everything.
pub fn matches_filter(row: &FunctionRow, filter: &str) -> bool {
    if filter.is_empty() {
        return true;
    }
    let needle = filter.to_lowercase();
    row.qualname.to_lowercase().contains(&needle) || row.filename.to_lowercase().contains(&needle)
}

/// The rows matching `filter`, ordered by `key`.
pub fn filtered_sorted(rows: &[FunctionRow], filter: &str, key: SortKey) -> Vec<FunctionRow> {
    let mut v: Vec<FunctionRow> = rows
        .iter()
        .filter(|r| matches_filter(r, filter))
        .cloned()
        .collect();
    sort_functions(&mut v, key);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profile;

    /// [`super::snapshot`] of profiles spelled out.
    fn snapshot(per: &[(ProcessLabels, Profile)], q: &TopQuery, h: &Header) -> TopSnapshot {
        let compact: Vec<_> = per
            .iter()
            .map(|(l, p)| (l.clone(), CompactProfile::from(p)))
            .collect();
        super::snapshot(&compact, q, h)
    }

    fn py(name: &str, line: u32, first: u32) -> Frame {
        Frame::Python {
            qualname: name.into(),
            filename: "/srv/app.py".into(),
            line,
            first_line: first,
        }
    }

    fn labels(pid: u32, service: &str) -> ProcessLabels {
        ProcessLabels::python3(pid, service)
    }

    fn header() -> Header {
        Header {
            rate_hz: 100,
            samples_per_sec: 12.5,
            processes_profiled: 3,
            drops: 1,
            errors: 2,
            window_secs: 10,
        }
    }

    /// main -> handle(line 10) leaf: 6; main -> handle(11) -> dumps: 3;
    /// main leaf: 1; [truncated] -> handle(10): 2; unknown leaf under main: 4.
    fn web() -> Profile {
        let mut p = Profile::new(100);
        let main = py("<module>", 3, 1);
        p.add(vec![main.clone(), py("handle", 10, 9)], 6);
        p.add(
            vec![main.clone(), py("handle", 11, 9), py("dumps", 231, 200)],
            3,
        );
        p.add(vec![main.clone()], 1);
        p.add(vec![Frame::Truncated, py("handle", 10, 9)], 2);
        p.add(
            vec![
                main,
                Frame::Unknown {
                    reason: crate::profile::UnknownReason::Stale,
                },
            ],
            4,
        );
        p
    }

    fn find<'a>(s: &'a TopSnapshot, name: &str, line: Option<u32>) -> &'a FunctionRow {
        s.functions
            .iter()
            .find(|r| r.qualname == name && r.line == line)
            .unwrap_or_else(|| panic!("no row {name} {line:?} in {:#?}", s.functions))
    }

    #[test]
    fn own_and_total_at_function_level() {
        let q = TopQuery::default();
        let s = snapshot(&[(labels(42, "web"), web())], &q, &header());
        assert_eq!(s.total_samples, 16);
        assert_eq!(s.rate_hz, 100);
        assert_eq!((s.drops, s.errors, s.processes_profiled), (1, 2, 3));
        assert_eq!(s.window_secs, 10);
        // Synthetic frames are not functions.
        assert_eq!(s.functions.len(), 3, "{:#?}", s.functions);
        let handle = find(&s, "handle", None);
        assert_eq!((handle.own, handle.total), (8, 11));
        assert_eq!(handle.first_line, 9);
        assert_eq!(handle.shown_line(), 9);
        assert_eq!(handle.label(), "handle (/srv/app.py:9)");
        let main = find(&s, "<module>", None);
        assert_eq!((main.own, main.total), (1, 14));
        let dumps = find(&s, "dumps", None);
        assert_eq!((dumps.own, dumps.total), (3, 3));
        assert_eq!((dumps.pid, dumps.service.as_str()), (42, "web"));
        // Sorted by own.
        let names: Vec<_> = s.functions.iter().map(|r| r.qualname.as_str()).collect();
        assert_eq!(names, ["handle", "dumps", "<module>"]);
        assert_eq!(
            s.processes,
            vec![ProcessRow {
                pid: 42,
                command: "python3".into(),
                service: "web".into(),
                python: String::new(),
                samples: 16,
                gil_wait_permille: None,
            }]
        );
    }

    #[test]
    fn a_limit_keeps_the_hottest_by_own_and_by_total() {
        // handle: own 8, total 11; dumps: own 3, total 3; <module>: own 1,
        // total 14.
        let procs = [(labels(42, "web"), web()), (labels(43, "web"), web())];
        let all = snapshot(&procs, &TopQuery::default(), &header());
        assert_eq!((all.functions.len(), all.functions_total), (6, 6));
        let q = TopQuery {
            limit: Some(1),
            ..Default::default()
        };
        let s = snapshot(&procs, &q, &header());
        assert_eq!((s.functions_total, s.processes_total), (6, 2));
        assert_eq!(s.processes.len(), 1);
        // The hottest by total (<module> of one pid) and by own (handle of
        // one pid), sorted by own.
        let rows: Vec<(&str, u64, u64)> = s
            .functions
            .iter()
            .map(|r| (r.qualname.as_str(), r.own, r.total))
            .collect();
        assert_eq!(rows, [("handle", 8, 11), ("<module>", 1, 14)]);
        // The totals the percentages are of are not cut.
        assert_eq!(s.total_samples, all.total_samples);
    }

    #[test]
    fn line_level_splits_by_line() {
        let q = TopQuery {
            line_level: true,
            ..Default::default()
        };
        let s = snapshot(&[(labels(42, "web"), web())], &q, &header());
        let h10 = find(&s, "handle", Some(10));
        let h11 = find(&s, "handle", Some(11));
        assert_eq!((h10.own, h10.total), (8, 8));
        assert_eq!((h11.own, h11.total), (0, 3));
        assert_eq!(h11.label(), "handle (/srv/app.py:11)");
        assert_eq!(s.functions.len(), 4);
    }

    #[test]
    fn recursion_counts_once_per_stack() {
        let mut p = Profile::new(100);
        let r = py("recurse", 5, 4);
        p.add(
            vec![py("<module>", 1, 1), r.clone(), r.clone(), r.clone()],
            7,
        );
        // Function level: the three frames are one function.
        let s = snapshot(&[(labels(1, "a"), p)], &TopQuery::default(), &header());
        let row = find(&s, "recurse", None);
        assert_eq!((row.own, row.total), (7, 7));
        // Different lines of one function on one stack: once per line.
        let mut p = Profile::new(100);
        p.add(vec![py("f", 2, 1), py("f", 3, 1)], 5);
        let s = snapshot(
            &[(labels(1, "a"), p.clone())],
            &TopQuery::default(),
            &header(),
        );
        let f = find(&s, "f", None);
        assert_eq!((f.own, f.total), (5, 5));
        let q = TopQuery {
            line_level: true,
            ..Default::default()
        };
        let s = snapshot(&[(labels(1, "a"), p)], &q, &header());
        assert_eq!(find(&s, "f", Some(2)).total, 5);
        assert_eq!(find(&s, "f", Some(2)).own, 0);
        assert_eq!(find(&s, "f", Some(3)).own, 5);
    }

    #[test]
    fn filters_by_pid_and_service_and_keeps_idle_processes() {
        let data = vec![
            (labels(1, "web"), web()),
            (labels(2, "worker"), web()),
            (labels(3, "web"), Profile::new(100)),
        ];
        let all = snapshot(&data, &TopQuery::default(), &header());
        assert_eq!(all.total_samples, 32);
        assert_eq!(all.processes.len(), 3);
        assert_eq!(all.processes[2].pid, 3, "idle process last");
        assert_eq!(all.processes[2].samples, 0);
        // The same function in two processes: two rows.
        assert_eq!(
            all.functions
                .iter()
                .filter(|r| r.qualname == "handle")
                .count(),
            2
        );
        let q = TopQuery {
            pids: vec![2, 3],
            ..Default::default()
        };
        let s = snapshot(&data, &q, &header());
        assert_eq!(s.total_samples, 16);
        assert!(s.functions.iter().all(|r| r.pid == 2));
        let pids: Vec<u32> = s.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [2, 3]);
        let q = TopQuery {
            service: Some("web".into()),
            ..Default::default()
        };
        let s = snapshot(&data, &q, &header());
        let pids: Vec<u32> = s.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [1, 3]);
        // Both filters: both must hold.
        let q = TopQuery {
            pids: vec![2],
            service: Some("web".into()),
            ..Default::default()
        };
        let s = snapshot(&data, &q, &header());
        assert!(s.processes.is_empty() && s.functions.is_empty());
        assert_eq!(s.total_samples, 0);
    }

    #[test]
    fn sorting_and_text_filter() {
        let s = snapshot(
            &[(labels(42, "web"), web())],
            &TopQuery::default(),
            &header(),
        );
        let names = |rows: &[FunctionRow]| -> Vec<String> {
            rows.iter().map(|r| r.qualname.clone()).collect()
        };
        let total = filtered_sorted(&s.functions, "", SortKey::Total);
        assert_eq!(names(&total), ["<module>", "handle", "dumps"]);
        let by_name = filtered_sorted(&s.functions, "", SortKey::Name);
        assert_eq!(names(&by_name), ["<module>", "dumps", "handle"]);
        let own = filtered_sorted(&s.functions, "", SortKey::Own);
        assert_eq!(names(&own), ["handle", "dumps", "<module>"]);
        // Case-insensitive, qualname or file.
        assert_eq!(
            names(&filtered_sorted(&s.functions, "HAND", SortKey::Own)),
            ["handle"]
        );
        assert_eq!(
            filtered_sorted(&s.functions, "APP.PY", SortKey::Own).len(),
            3
        );
        assert!(filtered_sorted(&s.functions, "nope", SortKey::Own).is_empty());
        assert_eq!(SortKey::Name.as_str(), "name");
    }

    #[test]
    fn ties_sort_deterministically() {
        let row = |name: &str, pid: u32, own: u64| FunctionRow {
            qualname: name.into(),
            filename: "f.py".into(),
            line: None,
            first_line: 1,
            pid,
            command: "c".into(),
            service: "s".into(),
            python: "3.14".into(),
            own,
            total: own,
        };
        let mut v = vec![
            row("b", 2, 5),
            row("a", 9, 5),
            row("b", 1, 5),
            row("z", 1, 6),
        ];
        sort_functions(&mut v, SortKey::Own);
        let got: Vec<(String, u32)> = v.iter().map(|r| (r.qualname.clone(), r.pid)).collect();
        assert_eq!(
            got,
            [
                ("z".to_string(), 1),
                ("a".to_string(), 9),
                ("b".to_string(), 1),
                ("b".to_string(), 2)
            ]
        );
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let s = snapshot(
            &[(labels(42, "web"), web())],
            &TopQuery::default(),
            &header(),
        );
        let json = serde_json::to_string(&s).unwrap();
        let back: TopSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["functions"][0]["qualname"], "handle");
        assert_eq!(v["functions"][0]["line"], serde_json::Value::Null);
        assert_eq!(v["functions"][0]["python"], "");
        assert_eq!(v["processes"][0]["samples"], 16);
        assert_eq!(v["processes"][0]["python"], "");
    }

    #[test]
    fn python_is_set_per_pid_and_optional_in_json() {
        let data = vec![(labels(1, "web"), web()), (labels(2, "worker"), web())];
        let mut s = snapshot(&data, &TopQuery::default(), &header());
        assert!(s.functions.iter().all(|r| r.python.is_empty()));
        s.set_python(|pid| (pid == 1).then_some("3.14"));
        for r in &s.functions {
            assert_eq!(r.python, if r.pid == 1 { "3.14" } else { "" }, "{r:?}");
        }
        let by_pid: Vec<(u32, &str)> = s
            .processes
            .iter()
            .map(|p| (p.pid, p.python.as_str()))
            .collect();
        assert_eq!(by_pid, [(1, "3.14"), (2, "")]);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["processes"][0]["python"], "3.14");
        // A snapshot from a daemon without the field still reads.
        let mut old = v.clone();
        for list in ["functions", "processes"] {
            for row in old[list].as_array_mut().unwrap() {
                row.as_object_mut().unwrap().remove("python");
            }
        }
        let back: TopSnapshot = serde_json::from_value(old).unwrap();
        assert!(back.processes.iter().all(|p| p.python.is_empty()));
        assert!(back.functions.iter().all(|r| r.python.is_empty()));
    }
}
