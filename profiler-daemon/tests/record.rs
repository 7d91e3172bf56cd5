//! End to end: `pyebpf record` loads the real BPF programs and profiles real
//! Python 3.11 processes on both interpreters. Expected lines come from the
//! markers in tests/workloads/scenarios.py. (The checks every version gets,
//! 3.11 included: shapes against the interpreter's own stacks, a thread that
//! released the GIL, recursion and CPU split, are in versions.rs.)
mod common;

use common::*;

/// Leaf, its caller, and that every such stack starts at the module.
fn check_scenario(
    stacks: &[(Vec<String>, u64)],
    leaf: &str,
    parent: Option<&str>,
    min_samples: u64,
) {
    let matching: Vec<_> = stacks
        .iter()
        .filter(|(s, _)| s.last().map(String::as_str) == Some(leaf))
        .collect();
    let n: u64 = matching.iter().map(|(_, c)| c).sum();
    assert!(
        n >= min_samples,
        "expected >= {min_samples} samples with leaf {leaf}, got {n}; stacks:\n{}",
        dump(stacks)
    );
    let root = frame("<module>", "CALL=main");
    for (s, _) in &matching {
        assert_eq!(s[0], root, "stack does not start at the module: {s:?}");
        if let Some(p) = parent {
            assert_eq!(s[s.len() - 2], p, "wrong caller in {s:?}");
        }
    }
}

fn dump(stacks: &[(Vec<String>, u64)]) -> String {
    let mut v: Vec<_> = stacks.iter().collect();
    v.sort_by_key(|(_, c)| std::cmp::Reverse(*c));
    v.iter()
        .take(15)
        .map(|(s, c)| format!("{c} {}", s.join(";")))
        .collect::<Vec<_>>()
        .join("\n")
}

fn names_and_lines(interp: Interp) {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let w = Workload::start(interp, &["all"]);
    let (out, text) = record(&[w.pid()], &["--duration", "8", "--rate", "499"]);
    assert_success(&out);
    let stacks = parse_folded(&text);
    let total = total(&stacks);
    eprintln!("{interp:?}: {total} samples in {} stacks", stacks.len());
    let min = 20;
    check_scenario(
        &stacks,
        &frame("plain_function", "HOT=plain"),
        Some(&frame("loop_forever", "CALL=loop")),
        min,
    );
    check_scenario(
        &stacks,
        &frame("Worker.method", "HOT=method"),
        Some(&frame("loop_forever", "CALL=loop")),
        min,
    );
    check_scenario(
        &stacks,
        &frame("outer.<locals>.inner", "HOT=nested"),
        Some(&frame("outer", "CALL=nested")),
        min,
    );
    check_scenario(
        &stacks,
        &frame("<lambda>", "HOT=lambda"),
        Some(&frame("call_lambda", "CALL=lambda")),
        min,
    );
    check_scenario(
        &stacks,
        &frame("comprehension.<locals>.<listcomp>", "HOT=comprehension"),
        Some(&frame("comprehension", "HOT=comprehension")),
        min,
    );
    check_scenario(
        &stacks,
        &frame("counting_generator", "HOT=generator"),
        Some(&frame("consume_generator", "CALL=generator")),
        min,
    );
    check_scenario(
        &stacks,
        &frame("busy_coroutine", "HOT=coroutine"),
        Some(&frame("coroutine_main", "CALL=coroutine")),
        min,
    );
    check_scenario(&stacks, &frame("café", "HOT=latin1"), None, min);
    check_scenario(&stacks, &frame("функция", "HOT=ucs2"), None, min);
    check_scenario(&stacks, &frame("𠀀", "HOT=ucs4"), None, min);
    assert!(
        !text.contains("[unknown"),
        "unknown frames:\n{}",
        dump(&stacks)
    );
    assert!(!text.contains("[truncated]") && !text.contains("[partial"));
}

#[test]
fn bpf_names_and_lines_shared_libpython() {
    names_and_lines(Interp::Shared);
}

#[test]
fn bpf_names_and_lines_static_debian() {
    names_and_lines(Interp::Static);
}

fn deepest(stacks: &[(Vec<String>, u64)], leaf: &str) -> Vec<String> {
    stacks
        .iter()
        .filter(|(s, _)| s.last().map(String::as_str) == Some(leaf))
        .map(|(s, _)| s.clone())
        .max_by_key(|s| s.len())
        .unwrap_or_default()
}

#[test]
fn bpf_recursion_3000_is_flagged_truncated() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let w = Workload::start(Interp::Static, &["recurse:3000"]);
    let (out, text) = record(&[w.pid()], &["--duration", "3", "--rate", "199"]);
    assert_success(&out);
    let stacks = parse_folded(&text);
    let s = deepest(&stacks, &frame("recurse", "HOT=recurse"));
    assert_eq!(s.first().map(String::as_str), Some("[truncated]"), "{s:?}");
    assert_eq!(s.len(), 1 + 2048, "cut exactly at the default --max-depth");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("truncated at --max-depth 2048: "),
        "{stderr}"
    );
    assert!(
        !stderr.contains("truncated at --max-depth 2048: 0 "),
        "{stderr}"
    );
}

#[test]
fn bpf_threads_and_two_processes() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let a = Workload::start(Interp::Shared, &["thread:method", "thread:nested", "plain"]);
    let b = Workload::start(Interp::Static, &["comprehension"]);
    let (out, text) = record(&[a.pid(), b.pid()], &["--duration", "5", "--rate", "499"]);
    assert_success(&out);
    let stacks = parse_folded(&text);
    let comm = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim()
            .to_string()
    };
    let root_a = format!("process {} ({})", a.pid(), comm(a.pid()));
    let root_b = format!("process {} ({})", b.pid(), comm(b.pid()));
    for (s, _) in &stacks {
        assert!(s[0] == root_a || s[0] == root_b, "no process root: {s:?}");
    }
    let in_proc = |root: &str, leaf: &str| -> u64 {
        stacks
            .iter()
            .filter(|(s, _)| s[0] == root && s.last().map(String::as_str) == Some(leaf))
            .map(|(_, c)| c)
            .sum()
    };
    for leaf in [
        frame("Worker.method", "HOT=method"),
        frame("outer.<locals>.inner", "HOT=nested"),
        frame("plain_function", "HOT=plain"),
    ] {
        assert!(
            in_proc(&root_a, &leaf) > 20,
            "{leaf} missing in A:\n{}",
            dump(&stacks)
        );
        assert_eq!(in_proc(&root_b, &leaf), 0);
    }
    let lc = frame("comprehension.<locals>.<listcomp>", "HOT=comprehension");
    assert!(
        in_proc(&root_b, &lc) > 20,
        "listcomp missing in B:\n{}",
        dump(&stacks)
    );
    assert_eq!(in_proc(&root_a, &lc), 0);
}

#[test]
fn bpf_target_exiting_mid_record_keeps_samples() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    // 1 s of CPU at 499 Hz: about 500 samples whatever the load.
    let w = Workload::start(Interp::Shared, &["exit-after-cpu:1", "plain"]);
    let started = std::time::Instant::now();
    let (out, text) = record(&[w.pid()], &["--duration", "20", "--rate", "499"]);
    assert_success(&out);
    assert!(
        started.elapsed().as_secs() < 15,
        "did not stop when the target exited"
    );
    let stacks = parse_folded(&text);
    assert!(
        leaf_count(&stacks, &frame("plain_function", "HOT=plain")) > 50,
        "{text}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "exited during recording (samples kept): {}",
            w.pid()
        )),
        "{stderr}"
    );
}

#[test]
fn bpf_all_formats_from_a_real_recording() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let w = Workload::start(Interp::Static, &["plain"]);
    let dir = tempfile::tempdir().unwrap();
    for (fmt, file) in [
        ("svg", "p.svg"),
        ("pprof", "p.pb.gz"),
        ("speedscope", "p.json"),
    ] {
        let path = dir.path().join(file);
        let out = std::process::Command::new(pyebpf())
            .args([
                "record",
                "--quiet",
                "--duration",
                "2",
                "--rate",
                "199",
                "--pid",
            ])
            .arg(w.pid().to_string())
            .args(["--format", fmt, "--output"])
            .arg(&path)
            .output()
            .unwrap();
        assert_success(&out);
        let bytes = std::fs::read(&path).unwrap();
        match fmt {
            "svg" => {
                let s = String::from_utf8(bytes).unwrap();
                assert!(
                    s.contains("<svg") && s.contains("plain_function"),
                    "svg lacks the hot function"
                );
            }
            "pprof" => assert_eq!(&bytes[..2], &[0x1f, 0x8b], "pprof is gzipped"),
            _ => {
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let names = v["shared"]["frames"].to_string();
                assert!(names.contains("plain_function"), "{names}");
            }
        }
    }
}

/// Without --duration, recording runs until Ctrl-C (SIGINT) and then writes
/// the profile.
#[test]
fn bpf_records_until_ctrl_c() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let w = Workload::start(Interp::Shared, &["plain"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.folded");
    let child = std::process::Command::new(pyebpf())
        .args(["record", "--quiet", "--rate", "199", "--pid"])
        .arg(w.pid().to_string())
        .arg("--output")
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_success(&out);
    let stacks = parse_folded(&std::fs::read_to_string(&path).unwrap());
    assert!(leaf_count(&stacks, &frame("plain_function", "HOT=plain")) > 10);
}

/// A process in its own PID and mount namespace, running an interpreter from
/// a path that does not exist on the host, is found and symbolised.
#[test]
fn bpf_process_in_other_mount_and_pid_namespace() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let (mut unshare, pid) = hidden_python("plain", |_| {});
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(unshare.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    assert!(!std::path::Path::new(HIDDEN_PYTHON).exists());
    let (out, text) = record(&[pid], &["--duration", "2", "--rate", "499"]);
    let _ = unshare.kill();
    // SAFETY: kill(2) on the namespaced interpreter so it does not outlive the test.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = unshare.wait();
    assert_success(&out);
    let stacks = parse_folded(&text);
    assert!(
        leaf_count(&stacks, &frame("plain_function", "HOT=plain")) > 100,
        "{text}"
    );
}

/// Functions that live for 20 ms of CPU and are freed right after are still
/// named: a sample holding a code object userspace has not seen wakes it at
/// once, while the many samples of known code wait to be read in batches.
#[test]
fn bpf_short_lived_code_is_named_and_samples_are_batched() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    // Every object through malloc, and freed memory overwritten at once: a
    // code object read after its function is gone cannot pass for alive.
    let w = Workload::start_with_env(
        Interp::Shared,
        &["short-lived"],
        &[
            ("PYTHONMALLOC", "malloc"),
            // The per-thread cache keeps freed chunks intact; without it
            // glibc overwrites every freed chunk.
            (
                "GLIBC_TUNABLES",
                "glibc.malloc.tcache_count=0:glibc.malloc.perturb=85",
            ),
        ],
    );
    let (out, text) = record(&[w.pid()], &["--duration", "6", "--rate", "999"]);
    assert_success(&out);
    let stacks = parse_folded(&text);
    let caller = frame("short_lived", "CALL=short_lived");
    let (mut named, mut unknown) = (0u64, 0u64);
    for (s, c) in &stacks {
        if s.len() < 2 || s[s.len() - 2] != caller {
            continue;
        }
        let leaf = &s[s.len() - 1];
        if leaf.starts_with("[unknown") {
            unknown += c;
        } else {
            // `short_lived_N (<short-lived>:LINE)`: LINE is the loop, 4 + N % 50,
            // or the line before it.
            let parsed = leaf
                .strip_prefix("short_lived_")
                .and_then(|r| r.strip_suffix(')'))
                .and_then(|r| r.split_once(" (<short-lived>:"))
                .and_then(|(n, line)| Some((n.parse::<u32>().ok()?, line.parse::<u32>().ok()?)));
            let Some((n, line)) = parsed else {
                panic!(
                    "unexpected leaf under short_lived: {leaf}\n{}",
                    dump(&stacks)
                )
            };
            assert!(matches!(line.checked_sub(n % 50), Some(3 | 4)), "{leaf}");
            named += c;
        }
    }
    eprintln!("short-lived code: {named} named, {unknown} unknown");
    // Read 50 ms late, about half of these samples would be unknown.
    assert!(named >= 500, "too few samples: {named}\n{}", dump(&stacks));
    assert!(
        unknown * 20 <= named + unknown,
        "{unknown} of {} samples unknown\n{}",
        named + unknown,
        dump(&stacks)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let number_after = |label: &str| -> u64 {
        let rest = &stderr[stderr
            .find(label)
            .unwrap_or_else(|| panic!("no {label:?} in {stderr}"))
            + label.len()..];
        rest.trim_start()
            .split(|ch: char| !ch.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {label:?} in {stderr}"))
    };
    let samples = number_after("process(es),");
    let wakeups = number_after("reader wakeups:");
    eprintln!("{samples} samples, {wakeups} wakeups");
    // Some tens of new functions a second: one wakeup each, not one per
    // sample.
    assert!(
        wakeups * 4 < samples,
        "{wakeups} wakeups for {samples} samples"
    );
}
