//! End to end: `pyebpf record --native` names the native function each
//! sampled thread is in, below the right Python line, on pyenv's shared
//! 3.11 and Debian's static 3.11. The oracle is gdb: the innermost frame it
//! shows of each thread of the same process (a stripped library's static
//! function is `??` for both). `--native-stacks` merges whole native stacks
//! with the Python frames, on those two and on a 3.14 (its activations
//! start with boundary frames, not 3.11's entry flags).
mod common;

use std::collections::{HashMap, HashSet};

use common::pythons::{Python, Running};
use common::*;

const SCRIPT: &str = "workloads/native_leaf.py";
/// Threads in C code: name, the library their time goes to.
const IN_C: [(&str, &str); 2] = [("checksum", "libz.so"), ("digest", "libcrypto.so")];
/// gdb snapshots taken at most to see each C thread inside its library.
const SNAPSHOTS: usize = 20;

/// `qualname (path:line)` of the `# HOT:<name>` line, as the interpreter
/// sees the script.
fn hot(py: &Python, name: &str) -> String {
    let path = repo_root().join("tests").join(SCRIPT);
    let line = markers_in(&path)
        .get(&format!("HOT={name}"))
        .copied()
        .unwrap_or_else(|| panic!("no HOT:{name} in {SCRIPT}"));
    format!("{name} ({}:{line})", py.script_path(SCRIPT))
}

/// The workload's `name=tid` line, with each thread id as the host sees it
/// (a workload in its own pid namespace prints its namespace's ids).
fn thread_ids(w: &mut Running) -> HashMap<String, u32> {
    let host_tid = host_tids(w.pid());
    w.read_line()
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let tid: u32 = v.parse().ok()?;
            Some((k.to_string(), host_tid.get(&tid).copied().unwrap_or(tid)))
        })
        .collect()
}

/// The host's id of each thread of `pid`, by its id in the innermost pid
/// namespace (`NSpid` in its status).
fn host_tids(pid: u32) -> HashMap<u32, u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|status| {
            let ids: Vec<u32> = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))?
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            Some((*ids.last()?, *ids.first()?))
        })
        .collect()
}

/// gdb's innermost frame of one thread: its function (`??` when gdb has
/// no name) and, when gdb says, the file it is in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GdbLeaf {
    function: String,
    module: Option<String>,
}

/// The innermost frame of every thread of `pid`, by thread id, from one
/// `gdb -batch` (which stops the process for a moment). Libraries are read
/// through `/proc/PID/root`, so a target in a chroot shows its own.
fn gdb_leaves(pid: u32) -> HashMap<u32, GdbLeaf> {
    let out = std::process::Command::new("gdb")
        .args(["-nx", "-batch", "-ex"])
        .arg(format!("set sysroot /proc/{pid}/root"))
        .args(["-p", &pid.to_string(), "-ex", "thread apply all bt 1"])
        .output()
        .expect("gdb is installed by cargo xtask bootstrap");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut leaves = HashMap::new();
    let mut tid = None;
    for line in text.lines() {
        if line.starts_with("Thread ") {
            // `(LWP 123)`, or `(LWP 123 "name")` without libthread_db.
            tid = line
                .split("(LWP ")
                .nth(1)
                .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|s| s.parse::<u32>().ok());
        } else if let (Some(t), Some(rest)) = (tid, line.strip_prefix("#0  ")) {
            // `0x... in NAME (...) from /lib/libz.so.1` or `NAME (...) at f.c:1`.
            let rest = rest.split_once(" in ").map_or(rest, |(_, r)| r);
            let function = rest.split(" (").next().unwrap_or(rest).to_string();
            let module = rest
                .rsplit_once(" from ")
                .map(|(_, m)| m.rsplit('/').next().unwrap_or(m).to_string());
            leaves.insert(t, GdbLeaf { function, module });
            tid = None;
        }
    }
    leaves
}

/// A folded profile: stacks root first, with their counts.
type Profile = Vec<(Vec<String>, u64)>;
/// What gdb saw each C thread in while inside its library.
type Seen = HashMap<&'static str, HashSet<GdbLeaf>>;

/// For each C thread, what gdb saw it in while inside its library: taken
/// until every thread was seen there once.
fn oracle(pid: u32, tids: &HashMap<String, u32>) -> Seen {
    let mut seen: Seen = HashMap::new();
    for _ in 0..SNAPSHOTS {
        let leaves = gdb_leaves(pid);
        for (thread, lib) in IN_C {
            let Some(leaf) = tids.get(thread).and_then(|t| leaves.get(t)) else {
                continue;
            };
            if leaf.module.as_deref().is_some_and(|m| m.starts_with(lib)) {
                seen.entry(thread).or_default().insert(leaf.clone());
            }
        }
        if seen.len() == IN_C.len() {
            break;
        }
    }
    seen
}

/// `[native] NAME (MODULE)` or `[native] NAME (FILE:LINE, MODULE)` split
/// into its name and module.
fn native(frame: &str) -> Option<(&str, &str)> {
    let rest = frame.strip_prefix("[native] ")?;
    let (name, inside) = rest.split_once(" (")?;
    let inside = inside.strip_suffix(')')?;
    let module = inside.rsplit_once(", ").map_or(inside, |(_, m)| m);
    Some((name, module))
}

fn dump(stacks: &[(Vec<String>, u64)]) -> String {
    let mut s: Vec<_> = stacks.iter().collect();
    s.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    s.iter()
        .take(25)
        .map(|(f, n)| format!("{n:6} {}", f.join(";")))
        .collect::<Vec<_>>()
        .join("\n")
}

fn native_leaves(py: Python) {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let (stacks, seen) = record_profile(&py, "--native");
    check(&py, &py.label(), &stacks, &seen);
}

/// What a profile of native_leaf.py with native leaves must show, `seen`
/// being gdb's view of its C threads.
fn check(py: &Python, label: &str, stacks: &[(Vec<String>, u64)], seen: &Seen) {
    let all = dump(stacks);
    assert!(!stacks.is_empty(), "{label}: empty profile");

    // The native leaf is the innermost frame, right under a Python frame.
    for (s, _) in stacks {
        if let Some(i) = s.iter().position(|f| f.starts_with("[native] ")) {
            assert_eq!(i, s.len() - 1, "{label}: native frame not the leaf: {s:?}");
            assert!(
                i > 0 && s[i - 1].contains(".py:"),
                "{label}: native leaf not under a Python frame: {s:?}"
            );
        }
    }

    for (thread, lib) in IN_C {
        let at = hot(py, thread);
        // Samples whose Python leaf is the thread's hot line, by native leaf.
        let mut by_leaf: HashMap<Option<(&str, &str)>, u64> = HashMap::new();
        for (s, n) in stacks {
            let Some(i) = s.iter().position(|f| *f == at) else {
                continue;
            };
            let leaf = s.get(i + 1).and_then(|f| native(f));
            *by_leaf.entry(leaf).or_default() += n;
        }
        let total: u64 = by_leaf.values().sum();
        let in_lib: u64 = by_leaf
            .iter()
            .filter(|(l, _)| l.is_some_and(|(_, m)| m.starts_with(lib)))
            .map(|(_, n)| n)
            .sum();
        // At 199 Hz for 4 s a thread always in C gives ~800 samples; it
        // waits for the GIL between calls (off CPU, not sampled), so ask
        // for far fewer.
        assert!(total >= 40, "{label}: {total} samples at {at}\n{all}");
        // A few samples catch the call's own bytecode in the eval loop or
        // the GIL's release and reacquisition in libpython and libc.
        assert!(
            in_lib * 10 >= total * 8,
            "{label}: {in_lib} of {total} samples at {at} in {lib}: {by_leaf:?}"
        );
        let (top, _) = by_leaf
            .iter()
            .filter_map(|(l, n)| Some((l.as_ref()?, n)))
            .max_by_key(|(_, n)| **n)
            .expect("a native leaf");
        let gdb = seen
            .get(thread)
            .unwrap_or_else(|| panic!("{label}: gdb never saw {thread} in {lib}"));
        assert!(
            gdb.iter()
                .any(|g| g.function == top.0
                    && g.module.as_deref().is_none_or(|m| top.1.starts_with(m))),
            "{label}: {thread}'s native leaf is {top:?}; gdb saw {gdb:?}"
        );
    }

    // The pure-Python thread is never given a C thread's library.
    let spin = hot(py, "spin");
    for (s, _) in stacks.iter().filter(|(s, _)| s.contains(&spin)) {
        let leaf = s.last().and_then(|f| native(f));
        assert!(
            !leaf.is_some_and(|(_, m)| IN_C.iter().any(|(_, lib)| m.starts_with(lib))),
            "{label}: spin under a C thread's library: {s:?}"
        );
    }
}

#[test]
fn bpf_native_leaves_shared_libpython() {
    native_leaves(Python::Host(Interp::Shared));
}

#[test]
fn bpf_native_leaves_static_debian() {
    native_leaves(Python::Host(Interp::Static));
}

/// A profile of native_leaf.py from a daemon whose `sampling:` section
/// holds `option: true`, and gdb's view of its C threads.
fn daemon_profile(option: &str) -> (Python, Profile, Seen) {
    let py = Python::Host(Interp::Shared);
    let d = common::daemon::Daemon::start(
        option,
        &format!(
            "sampling:\n  rate_hz: 199\n  {option}: true\n\
             aggregation:\n  window_secs: 2\n\
             discovery:\n  rescan_interval_secs: 1\n  include:\n    - cmdline: 'native_leaf\\.py$'\n"
        ),
    );
    let mut w = py.start(SCRIPT, &[]);
    let tids = thread_ids(&mut w);
    let pid = w.pid();
    d.wait_profiled(pid, std::time::Duration::from_secs(15));
    std::thread::sleep(std::time::Duration::from_secs(5));
    let (_, stacks) = d.folded(&format!("pid={pid}&seconds=4"));
    let seen = oracle(pid, &tids);
    (py, stacks, seen)
}

/// A 4 s `pyebpf record FLAG` of native_leaf.py run by `py`, and gdb's
/// view of its C threads.
fn record_profile(py: &Python, flag: &str) -> (Profile, Seen) {
    let mut w = py.start(SCRIPT, &[]);
    let tids = thread_ids(&mut w);
    let (out, text) = record(&[w.pid()], &[flag, "--duration", "4", "--rate", "199"]);
    assert_success(&out);
    (parse_folded(&text), oracle(w.pid(), &tids))
}

/// The daemon with `sampling.native: true`: its profiles carry the same
/// native leaves.
#[test]
fn bpf_daemon_native_leaves() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let (py, stacks, seen) = daemon_profile("native");
    check(&py, "daemon", &stacks, &seen);
}

/// The Python frames of a stack, root first.
fn python_frames(s: &[String]) -> Vec<&str> {
    s.iter()
        .filter(|f| f.contains(".py:"))
        .map(String::as_str)
        .collect()
}

fn native_stacks(py: Python) {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let (stacks, seen) = record_profile(&py, "--native-stacks");
    check_stacks(&py, &py.label(), &stacks, &seen);
}

/// What a profile of native_leaf.py with whole native stacks must show.
fn check_stacks(py: &Python, label: &str, stacks: &[(Vec<String>, u64)], seen: &Seen) {
    let all = dump(stacks);
    assert!(!stacks.is_empty(), "{label}: empty profile");
    for (thread, lib) in IN_C {
        let at = hot(py, thread);
        let gdb = seen
            .get(thread)
            .unwrap_or_else(|| panic!("{label}: gdb never saw {thread} in {lib}"));
        let mut total = 0;
        let mut whole = 0;
        for (s, n) in stacks {
            if python_frames(s).last() != Some(&at.as_str()) {
                continue;
            }
            total += n;
            let Some(i) = s.iter().position(|f| *f == at) else {
                continue;
            };
            // Root to leaf: the thread's start in libc (`clone3`, or `??`
            // where libc has no symbol for it, as in the Debian roots),
            // native frames between the Python runs (no eval loop left
            // unmerged), the hot line, then C frames down to the library
            // gdb saw.
            let below: Vec<_> = s[i + 1..].iter().filter_map(|f| native(f)).collect();
            let starts_in_libc = native(&s[0]).is_some_and(|(f, m)| {
                (f == "??" || f.starts_with("clone")) && m.starts_with("libc.so")
            });
            let merged = !s
                .iter()
                .any(|f| f.starts_with("[unmerged") || f.contains("_PyEval_EvalFrameDefault"));
            let leaf_ok = below.last().is_some_and(|(f, m)| {
                m.starts_with(lib)
                    && gdb.iter().any(|g| {
                        g.function == *f && g.module.as_deref().is_none_or(|gm| m.starts_with(gm))
                    })
            });
            let runs_between = s[..i]
                .iter()
                .skip_while(|f| !f.contains(".py:"))
                .any(|f| f.starts_with("[native] "));
            if starts_in_libc && merged && leaf_ok && below.len() >= 2 && runs_between {
                whole += n;
            }
        }
        // At 199 Hz for 4 s, ~800 if always on CPU; it waits for the GIL
        // between calls (not sampled), much longer on a loaded machine.
        assert!(total >= 40, "{label}: {total} samples at {at}\n{all}");
        // Some samples catch the thread between calls (in the eval loop,
        // or taking the GIL back in libpython and libc).
        assert!(
            whole * 10 >= total * 7,
            "{label}: {whole} of {total} samples at {at} have the whole merged stack\n{all}"
        );
    }
    // Every Python frame keeps its place: the pure-Python thread's Python
    // frames are those of a stack without native frames.
    let spin = hot(py, "spin");
    let spins: Vec<_> = stacks
        .iter()
        .filter(|(s, _)| python_frames(s).last() == Some(&spin.as_str()))
        .collect();
    assert!(!spins.is_empty(), "{label}: no sample at {spin}\n{all}");
    for (s, _) in spins {
        let py_frames = python_frames(s);
        assert!(
            py_frames.len() == 4 && py_frames[0].starts_with("Thread._bootstrap ("),
            "{label}: Python frames out of place: {s:?}"
        );
    }
}

#[test]
fn bpf_native_stacks_shared_libpython() {
    native_stacks(Python::Host(Interp::Shared));
}

#[test]
fn bpf_native_stacks_static_debian() {
    native_stacks(Python::Host(Interp::Static));
}

/// 3.14's libpython build from the sid root, in its own namespaces.
#[test]
fn bpf_native_stacks_3_14_shared() {
    match common::pythons::python("3.14-shared") {
        Some(py) => native_stacks(py),
        None => {
            eprintln!("SKIPPED: no 3.14 libpython build (cargo xtask bootstrap makes the roots)")
        }
    }
}

/// The daemon with `sampling.native_stacks: true`: merged native stacks.
#[test]
fn bpf_daemon_native_stacks() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let (py, stacks, seen) = daemon_profile("native_stacks");
    check_stacks(&py, "daemon", &stacks, &seen);
}

/// 3.14's static build from the sid root, whose eval loop has no symbol
/// (an unnamed LTO clone): activations are found by the stack addresses
/// of their boundary frames.
#[test]
fn bpf_native_stacks_3_14_static() {
    match common::pythons::python("3.14-static") {
        Some(py) => native_stacks(py),
        None => eprintln!("SKIPPED: no 3.14 static build (cargo xtask bootstrap makes the roots)"),
    }
}
