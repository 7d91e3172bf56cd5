//! Every CPython version and build pyebpf supports, end to end: `pyebpf
//! record` with the real BPF sampler on real interpreters. 3.11 runs on the
//! host (pyenv's libpython build, Debian's static one); 3.13, 3.14 and 3.15
//! come from Debian roots (static executables, and libpython through a small
//! launcher) and run in their own mount and pid namespaces, so they double as
//! container tests with an interpreter the host cannot see at that path.
//!
//! The shape test compares pyebpf's stacks with the interpreter's own view of
//! them (tests/workloads/shapes.py samples itself with sys._current_frames(),
//! whose lines come from that interpreter's location tables).
mod common;

use std::collections::HashMap;

use common::pythons::{python, Python};
use common::*;

/// The interpreter called `name`, when BPF tests can run; a missing one fails
/// when every test must run (CI) and is reported skipped otherwise.
fn interpreter(name: &str) -> Option<Python> {
    let py = python(name);
    if py.is_none() {
        let why = format!("no interpreter {name} (see `cargo xtask bootstrap`)");
        assert!(
            std::env::var_os("PYEBPF_REQUIRE_BPF_TESTS").is_none(),
            "{why}; PYEBPF_REQUIRE_BPF_TESTS is set"
        );
        eprintln!("SKIPPED: {why}");
    }
    py
}

/// Line of the `# HOT:tag` / `# CALL:tag` marker in `tests/<script>`.
fn marker(script: &str, tag: &str) -> u32 {
    let src = std::fs::read_to_string(repo_root().join("tests").join(script)).expect("read script");
    src.lines()
        .position(|l| l.ends_with(&format!("# {tag}")))
        .map(|i| i as u32 + 1)
        .unwrap_or_else(|| panic!("no marker {tag} in {script}"))
}

fn at(py: &Python, script: &str, qualname: &str, tag: &str) -> String {
    format!(
        "{qualname} ({}:{})",
        py.script_path(script),
        marker(script, tag)
    )
}

fn dump(stacks: &[(Vec<String>, u64)]) -> String {
    let mut v: Vec<_> = stacks.iter().collect();
    v.sort_by_key(|(_, c)| std::cmp::Reverse(*c));
    v.iter()
        .take(25)
        .map(|(s, c)| format!("{c} {}", s.join(";")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(serde::Deserialize)]
struct Truth {
    samples: u64,
    stacks: HashMap<String, u64>,
}

/// Names and lines of every shape of frame (nested functions, methods,
/// generators, coroutines, comprehensions, lambdas, `__init__` behind 3.13+'s
/// shim, Python called from C, non-ASCII names) equal the interpreter's own;
/// a thread hashing with the GIL released has its own stack.
fn shapes(name: &str) {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let Some(py) = interpreter(name) else {
        return;
    };
    let label = py.label();
    const SCRIPT: &str = "workloads/shapes.py";
    let mut w = py.start(SCRIPT, &["hash"]);
    w.write_line("reset");
    assert_eq!(w.read_line(), "reset");
    let (out, text) = record(&[w.pid()], &["--duration", "6", "--rate", "999"]);
    assert_success(&out);
    w.write_line("truth");
    let truth: Truth = serde_json::from_str(&w.read_line()).expect("truth json");
    let stacks = parse_folded(&text);
    let total = total(&stacks);
    eprintln!(
        "{label}: {total} samples in {} stacks; truth: {} samples in {} stacks",
        stacks.len(),
        truth.samples,
        truth.stacks.len()
    );
    for bad in ["[truncated]", "[partial", "(<shim>:", "(__init__:"] {
        assert!(!text.contains(bad), "{label}: {bad} in\n{}", dump(&stacks));
    }
    // A module's code object is freed once its import is done (a lazy
    // import in the truth thread, say), so a sample taken during an import
    // may not be symbolised in time; anywhere else an unknown frame is a bug.
    for (s, _) in &stacks {
        if s.iter().any(|f| f.starts_with("[unknown")) {
            assert!(
                s.iter().any(|f| f.starts_with("_find_and_load (")),
                "{label}: unknown frame outside an import: {s:?}\n{}",
                dump(&stacks)
            );
        }
    }

    // The main thread: pyebpf's stacks against the interpreter's.
    let root = at(&py, SCRIPT, "<module>", "CALL:main");
    let main: Vec<_> = stacks.iter().filter(|(s, _)| s[0] == root).collect();
    let main_total: u64 = main.iter().map(|(_, c)| c).sum();
    let ours: HashMap<String, u64> = main.iter().map(|(s, c)| (s.join(";"), *c)).collect();
    // The main thread has a CPU of its own for 6 s at 999 Hz (about 6000
    // samples); 1500 leaves room for a loaded machine. Then a stack of 3% of
    // the truth expects at least 45 samples, and a quarter of that is far
    // (more than 4 sigma) below what even a halved share gives.
    // The truth thread takes a sample whenever it gets the GIL (at most
    // every few ms; fewer when the hashing thread competes for it).
    assert!(
        truth.samples >= 300,
        "{label}: truth has {} samples",
        truth.samples
    );
    assert!(
        main_total >= 1500,
        "{label}: {main_total} main-thread samples"
    );
    // Every stack the interpreter saw burning CPU (its leaf on a `# HOT:`
    // line) 3% of the time or more is there, with the same names and lines.
    // The two samplers see a thread at different moments (the truth thread
    // only where the main thread lets the GIL go, which over-represents loop
    // heads), so shares agree loosely: at least a quarter of the expected
    // count.
    let script_path = py.script_path(SCRIPT);
    let hot_lines: Vec<String> = std::fs::read_to_string(repo_root().join("tests").join(SCRIPT))
        .expect("read script")
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("# HOT:"))
        .map(|(i, _)| format!("({script_path}:{})", i + 1))
        .collect();
    let mut checked = 0;
    for (stack, &n) in &truth.stacks {
        let share = n as f64 / truth.samples as f64;
        if share < 0.03 || !hot_lines.iter().any(|l| stack.ends_with(l.as_str())) {
            continue;
        }
        checked += 1;
        let got = ours.get(stack).copied().unwrap_or(0);
        assert!(
            got as f64 >= share * main_total as f64 / 4.0,
            "{label}: the interpreter's stack ({:.1}%)\n  {stack}\nhas {got} of {main_total} samples in pyebpf's profile:\n{}",
            share * 100.0,
            dump(&stacks)
        );
    }
    // 13 scenarios of equal CPU: most are above 3% of a truth of 300+.
    assert!(checked >= 8, "{label}: only {checked} hot stacks above 3%");
    // And pyebpf shows nothing the interpreter never showed, beyond the
    // moments it cannot see (a frame being set up, a call being made).
    let known: u64 = ours
        .iter()
        .filter(|(s, _)| truth.stacks.contains_key(*s))
        .map(|(_, c)| c)
        .sum();
    assert!(
        known as f64 >= 0.9 * main_total as f64,
        "{label}: only {known} of {main_total} main-thread samples are on stacks the interpreter reported:\n{}",
        dump(&stacks)
    );

    // The hashing thread, sampled while it runs C code without the GIL.
    let hash_leaf = at(&py, SCRIPT, "hash_worker", "HOT:hash");
    let hashing = leaf_count(&stacks, &hash_leaf);
    assert!(
        hashing as f64 > 0.2 * total as f64,
        "{label}: hashing thread has {hashing} of {total} samples:\n{}",
        dump(&stacks)
    );
    for (s, _) in stacks.iter().filter(|(s, _)| s.last() == Some(&hash_leaf)) {
        assert!(s[0].starts_with("Thread._bootstrap ("), "{label}: {s:?}");
    }
}

/// A 1500-frame recursion is walked whole, every frame named and placed.
fn recursion(name: &str) {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let Some(py) = interpreter(name) else {
        return;
    };
    const SCRIPT: &str = "workloads/scenarios.py";
    let w = py.start(SCRIPT, &["recurse:1500"]);
    let (out, text) = record(&[w.pid()], &["--duration", "3", "--rate", "199"]);
    assert_success(&out);
    let stacks = parse_folded(&text);
    let leaf = at(&py, SCRIPT, "recurse", "HOT:recurse");
    let deepest = stacks
        .iter()
        .filter(|(s, _)| s.last() == Some(&leaf))
        .map(|(s, _)| s)
        .max_by_key(|s| s.len())
        .unwrap_or_else(|| panic!("{}: no recursion samples:\n{}", py.label(), dump(&stacks)));
    assert_eq!(deepest[0], at(&py, SCRIPT, "<module>", "CALL:main"));
    let call = at(&py, SCRIPT, "recurse", "CALL:recurse");
    let calls = deepest.iter().filter(|f| **f == call).count();
    assert_eq!(
        calls,
        1500,
        "{}: every recursive call site is present",
        py.label()
    );
    assert!(!text.contains("[truncated]") && !text.contains("[unknown"));
}

/// Three functions burning CPU 1:2:3 come out within sampling error.
fn cpu_split(name: &str) {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let Some(py) = interpreter(name) else {
        return;
    };
    const SCRIPT: &str = "workloads/scenarios.py";
    let w = py.start(SCRIPT, &["split"]);
    let (out, text) = record(&[w.pid()], &["--duration", "8", "--rate", "999"]);
    assert_success(&out);
    let stacks = parse_folded(&text);
    let total = total(&stacks) as f64;
    // With N samples the standard error of a share p is sqrt(p(1-p)/N),
    // at most 0.5/sqrt(N): N >= 1600 makes 5 points at least 4 sigma.
    assert!(
        total >= 1600.0,
        "too few samples for a 4-sigma check: {total}"
    );
    for (f, truth) in [
        ("split_a", 1.0 / 6.0),
        ("split_b", 2.0 / 6.0),
        ("split_c", 3.0 / 6.0),
    ] {
        let n = leaf_count(&stacks, &at(&py, SCRIPT, f, &format!("HOT:{f}"))) as f64;
        let share = n / total;
        eprintln!("{}: {f}: {share:.3} (truth {truth:.3})", py.label());
        assert!(
            (share - truth).abs() < 0.05,
            "{}: {f}: {share:.3} vs {truth:.3}\n{}",
            py.label(),
            dump(&stacks)
        );
    }
}

macro_rules! tests {
    ($check:ident: $($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                $check($name)
            }
        )*
    };
}

tests!(shapes:
    bpf_shapes_3_11_shared => "3.11-shared",
    bpf_shapes_3_11_static => "3.11-static",
    bpf_shapes_3_13_trixie_static => "3.13-trixie-static",
    bpf_shapes_3_13_trixie_shared => "3.13-trixie-shared",
    bpf_shapes_3_13_static => "3.13-static",
    bpf_shapes_3_13_shared => "3.13-shared",
    bpf_shapes_3_14_static => "3.14-static",
    bpf_shapes_3_14_shared => "3.14-shared",
    bpf_shapes_3_15_static => "3.15-static",
    bpf_shapes_3_15_shared => "3.15-shared",
);

tests!(recursion:
    bpf_recursion_1500_3_11_shared => "3.11-shared",
    bpf_recursion_1500_3_13_trixie_static => "3.13-trixie-static",
    bpf_recursion_1500_3_13_static => "3.13-static",
    bpf_recursion_1500_3_14_static => "3.14-static",
    bpf_recursion_1500_3_15_static => "3.15-static",
    bpf_recursion_1500_3_15_shared => "3.15-shared",
);

tests!(cpu_split:
    bpf_cpu_split_3_11_shared => "3.11-shared",
    bpf_cpu_split_3_13_static => "3.13-static",
    bpf_cpu_split_3_14_static => "3.14-static",
    bpf_cpu_split_3_15_static => "3.15-static",
);
