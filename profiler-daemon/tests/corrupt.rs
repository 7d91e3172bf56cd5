//! Fault injection, end to end, with real BPF and real CPython processes:
//!
//! - a CPython 3.11 target that corrupts its own interpreter state
//!   (tests/workloads/corrupt.py: a cyclic frame chain, a garbage code
//!   pointer, a code object whose name is unmapped, a thread-state slot
//!   pointing at junk). The target must be unaffected (exit 0, the result it
//!   computes without corruption), the daemon must stay up and answer
//!   /healthz throughout, every sample taken during a corruption must end in
//!   an explicit marker with the frames below the corruption exact, and the
//!   matching error counters must rise;
//! - the smallest ring buffer at the highest rate, overrun and relieved;
//! - a Pyroscope endpoint that answers 500, garbage, resets connections or
//!   never answers, then recovers; and one that takes seconds per request.
//!
//! Every daemon here profiles only its own test's processes (an include
//! rule on a `--tag=` argument), so its counters are the test's own.
mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const PARTIAL: &str = "[partial stack: read failed]";
const UNREADABLE: &str = "[unknown code object: unreadable]";

fn workload() -> PathBuf {
    repo_root().join("tests/workloads/corrupt.py")
}

/// `qualname (corrupt.py:LINE)` of a marker of corrupt.py.
fn at(qualname: &str, marker: &str) -> String {
    frame_in(&workload(), qualname, marker)
}

/// The `result` line corrupt.py prints with `args` without corrupting
/// anything.
fn ground_truth(interp: Interp, args: &[&str]) -> String {
    let out = Command::new(interp.path())
        .arg(workload())
        .arg("--clean")
        .args(args)
        .output()
        .expect("run corrupt.py --clean");
    assert!(out.status.success(), "corrupt.py --clean: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("result "))
        .unwrap_or_else(|| panic!("no result line in:\n{text}"));
    line.to_string()
}

/// Sum of the samples of `stacks` that `pred` accepts.
fn samples(stacks: &[(Vec<String>, u64)], pred: impl Fn(&[String]) -> bool) -> u64 {
    stacks.iter().filter(|(s, _)| pred(s)).map(|(_, c)| c).sum()
}

fn read_errors(metrics: &str, step: &str) -> f64 {
    prom_sum(metrics, "pyebpf_bpf_read_errors_total", &[("step", step)])
}

/// Samples of each corruption in a profile of corrupt.py.
struct Seen {
    cycle: u64,
    bad_code: u64,
    unreadable_name: u64,
}

/// Checks the stacks of a profile of corrupt.py (see the file's doc):
/// every sample of a corruption ends in its marker with the frames below it
/// exact, and nothing is attributed to a thread whose state was junk.
fn check_stacks(stacks: &[(Vec<String>, u64)], restored_leaf: &str) -> Seen {
    let show = || {
        let mut v: Vec<String> = stacks
            .iter()
            .map(|(s, c)| format!("{} {c}", s.join(";")))
            .collect();
        v.sort();
        v.join("\n")
    };

    // No stack comes near the depth bound (the deepest real ones are
    // imports at start-up, some 50 frames), none is cut at it.
    for (s, _) in stacks {
        assert!(s.len() < 200, "a {}-frame stack:\n{}", s.len(), show());
        assert!(s[0] != "[truncated]", "a truncated stack:\n{}", show());
    }

    // (1) A cycle: the leaf's caller's caller points back at the leaf. Every
    // sample of the spin ends (root side) in the marker; the frames walked
    // are the cycle's own, with the two nearest the leaf exact.
    let cycle_leaf = at("cycle_leaf", "HOT=cycle");
    let cycle_frames = [
        at("cycle_outer", "CALL=cycle_outer"),
        at("cycle_middle", "CALL=cycle_middle"),
        cycle_leaf.clone(),
    ];
    let cycled = leaf_count(stacks, &cycle_leaf);
    assert!(cycled >= 20, "{cycled} samples of the cycle:\n{}", show());
    for (s, _) in stacks.iter().filter(|(s, _)| s.last() == Some(&cycle_leaf)) {
        assert_eq!(s[0], PARTIAL, "cycle without marker:\n{}", show());
        assert!(s[1..].iter().all(|f| cycle_frames.contains(f)), "{s:?}");
        assert!(s.ends_with(&cycle_frames[1..]), "{s:?}");
        assert!(s.len() <= 1 + 3 * cycle_frames.len(), "{s:?}");
    }

    // (2) A caller's code pointer into an unmapped page: the walk stops
    // there; the frames below it are exact.
    let bad_leaf = at("badcode_leaf", "HOT=badcode");
    let bad = leaf_count(stacks, &bad_leaf);
    assert!(
        bad >= 20,
        "{bad} samples of the bad code pointer:\n{}",
        show()
    );
    let want = vec![
        PARTIAL.to_string(),
        at("badcode_middle", "CALL=badcode_middle"),
        bad_leaf.clone(),
    ];
    assert_eq!(
        samples(stacks, |s| s == want.as_slice()),
        bad,
        "stacks of the bad code pointer:\n{}",
        show()
    );

    // (3) A code object whose name is unmapped: an explicit unknown leaf
    // under its exact callers; its name is never shown.
    let want = vec![
        at("<module>", "CALL=module"),
        at("main", "CALL=main"),
        at("name_caller", "CALL=name"),
        UNREADABLE.to_string(),
    ];
    let unknown = samples(stacks, |s| s == want.as_slice());
    assert!(
        unknown >= 20,
        "{unknown} samples of the unreadable name:\n{}",
        show()
    );
    assert_eq!(
        samples(stacks, |s| s.iter().any(|f| f.contains("named_victim"))),
        0,
        "the unreadable name shown:\n{}",
        show()
    );

    // (4) The thread's TSS slot holds junk, then another thread's state:
    // none of its samples is attributed to any stack (the other thread's
    // in particular), all are counted; once restored, its stack is exact.
    for spin in ["tss_unmapped_spin", "tss_foreign_spin"] {
        assert_eq!(
            samples(stacks, |s| s
                .iter()
                .any(|f| f.starts_with(&format!("{spin} ")))),
            0,
            "{spin} sampled while its thread state was junk:\n{}",
            show()
        );
    }
    let restored = leaf_count(stacks, restored_leaf);
    assert!(
        restored >= 20,
        "{restored} samples after the restore:\n{}",
        show()
    );
    // The waiting thread is itself on a CPU for a moment when it wakes (a
    // sample or two of its own); its stack given to the spinning thread
    // would show in about as many samples as a spin of the same length.
    for waiter in ["CALL=tss_wait_unmapped", "CALL=tss_wait_foreign"] {
        let f = at("tss_phase", waiter);
        let n = samples(stacks, |s| s.contains(&f));
        assert!(
            n * 10 < restored,
            "the waiting thread's stack attributed to the spinning one ({n} samples, \
             {restored} of a spin as long):\n{}",
            show()
        );
    }
    let tail = [
        at("tss_phase.<locals>.worker", "CALL=tss_restored"),
        restored_leaf.to_string(),
    ];
    assert_eq!(
        samples(stacks, |s| s.last().map(String::as_str)
            == Some(restored_leaf)
            && s.ends_with(&tail)
            && s[0].starts_with("Thread._bootstrap (")),
        restored,
        "stacks after the restore:\n{}",
        show()
    );
    Seen {
        cycle: cycled,
        bad_code: bad,
        unreadable_name: unknown,
    }
}

fn corrupt_target_under_the_daemon(interp: Interp) {
    let _guard = match serial_bpf_test() {
        Some(g) => g,
        None => return,
    };
    let truth = ground_truth(interp, &["all"]);
    let tag = format!("--tag=corrupt-{}-{:?}", std::process::id(), interp);
    let config = format!(
        "sampling:\n  rate_hz: 499\naggregation:\n  window_secs: 1\n  retention_secs: 300\n\
         discovery:\n  include:\n    - cmdline: \"{tag}\"\n"
    );
    let d = Daemon::start("corrupt", &config);
    let before = d.metrics();

    let mut target = Command::new(interp.path())
        .arg(workload())
        .args(["--wait", &tag, "all"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start corrupt.py");
    let pid = target.id();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut stdout = BufReader::new(target.stdout.take().expect("stdout"));
    let mut ready = String::new();
    stdout.read_line(&mut ready).expect("read ready");
    assert_eq!(ready.trim(), "ready");
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in stdout.lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        })
    };
    d.wait_profiled(pid, Duration::from_secs(30));
    writeln!(target.stdin.take().expect("stdin"), "go").expect("start the phases");

    // /healthz answers while the target corrupts itself, and the daemon
    // stays up.
    let start = Instant::now();
    let mut checks = 0;
    let status = loop {
        if let Some(st) = target.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "corrupt.py still running after 180 s; output so far: {:?}",
            lines.lock().unwrap()
        );
        assert!(
            d.healthy(),
            "/healthz failed {:?} into the run",
            start.elapsed()
        );
        checks += 1;
        std::thread::sleep(Duration::from_millis(200));
    };
    reader.join().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut target.stderr.take().unwrap(), &mut stderr).unwrap();
    let out = lines.lock().unwrap().clone();
    eprintln!(
        "corrupt.py ({interp:?}) ran {:?}, /healthz answered {checks} times",
        start.elapsed()
    );
    // The target is unaffected: it ran every phase and computed what it
    // computes uncorrupted.
    assert!(
        status.success(),
        "corrupt.py exited with {status}:\n{stderr}"
    );
    for phase in ["cycle", "badcode", "name", "tss"] {
        assert!(
            out.contains(&format!("done {phase}")),
            "phase {phase} missing: {out:?}"
        );
    }
    assert_eq!(
        out.last(),
        Some(&truth),
        "output {out:?}\nstderr:\n{stderr}"
    );
    assert!(d.healthy(), "/healthz failed after the run");

    // Every sample is in the store once the windows that hold them close:
    // wait until the last phase's samples are there and stop changing.
    let restored_leaf = at("tss_restored_spin", "HOT=tss_restored");
    let query = format!("pid={pid}&seconds=300");
    let mut last = 0;
    let stacks = loop {
        let stacks = parse_folded(&d.get_ok(&format!("/folded?{query}")).text());
        let now = total(&stacks);
        if now == last && leaf_count(&stacks, &restored_leaf) > 0 {
            break stacks;
        }
        last = now;
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "samples still arriving"
        );
        std::thread::sleep(Duration::from_millis(1500));
    };
    let after = d.metrics();
    let seen = check_stacks(&stacks, &restored_leaf);
    let rise = |step: &str| read_errors(&after, step) - read_errors(&before, step);
    // Every sample ended by a corruption is counted at its step (the
    // daemon profiles only this process).
    assert!(
        rise("cycle") >= seen.cycle as f64,
        "cycle errors rose by {}",
        rise("cycle")
    );
    assert!(
        rise("code_object") >= seen.bad_code as f64,
        "code_object errors rose by {}, {} samples",
        rise("code_object"),
        seen.bad_code
    );
    assert!(
        rise("thread_state") >= 20.0,
        "thread_state read errors rose by {} over two spins of the thread",
        rise("thread_state")
    );
    let unreadable =
        |m: &str| prom_sum(m, "pyebpf_symbol_cache_total", &[("result", "unreadable")]);
    assert!(
        seen.unreadable_name > 0 && unreadable(&after) > unreadable(&before),
        "no unreadable code object counted"
    );
}

/// Failed walks by step, from `pyebpf record`'s summary line
/// `read failures by step: thread_state 190, code_object 104`.
fn record_read_failures(summary: &str) -> Vec<(String, u64)> {
    summary
        .lines()
        .find_map(|l| l.trim().strip_prefix("read failures by step:"))
        .unwrap_or_else(|| panic!("no read failures in the summary:\n{summary}"))
        .split(',')
        .filter_map(|kv| kv.trim().split_once(' '))
        .map(|(k, v)| (k.to_string(), v.parse().expect("a count")))
        .collect()
}

/// The same target under `pyebpf record`: the profile it writes holds the
/// same markers and exact frames, and its summary counts the failed walks
/// by step. The phases run three times, so that a recorder attaching
/// late still sees whole rounds.
#[test]
fn bpf_corrupt_target_under_record() {
    let _guard = match serial_bpf_test() {
        Some(g) => g,
        None => return,
    };
    let args = ["--rounds=3", "all"];
    let truth = ground_truth(Interp::Shared, &args);
    let mut target = Command::new(Interp::Shared.path())
        .arg(workload())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start corrupt.py");
    let pid = target.id();
    let mut stdout = BufReader::new(target.stdout.take().expect("stdout"));
    let mut ready = String::new();
    stdout.read_line(&mut ready).expect("read ready");
    assert_eq!(ready.trim(), "ready");
    // Until the target exits (record stops when its last process has).
    let (out, text) = record(&[pid], &["--rate", "499"]);
    assert_success(&out);
    let status = target.wait().unwrap();
    let lines: Vec<String> = stdout.lines().map_while(Result::ok).collect();
    assert!(status.success(), "corrupt.py exited with {status}");
    assert_eq!(lines.last(), Some(&truth), "output {lines:?}");
    let summary = String::from_utf8_lossy(&out.stderr);
    let seen = check_stacks(
        &parse_folded(&text),
        &at("tss_restored_spin", "HOT=tss_restored"),
    );
    let failures = record_read_failures(&summary);
    let count = |step: &str| {
        failures
            .iter()
            .find(|(k, _)| k == step)
            .map_or(0, |(_, n)| *n)
    };
    assert!(count("cycle") >= seen.cycle, "{summary}");
    assert!(count("code_object") >= seen.bad_code, "{summary}");
    assert!(count("thread_state") >= 20, "{summary}");
    assert!(seen.unreadable_name > 0);
}

#[test]
fn bpf_corrupt_target_shared_python() {
    corrupt_target_under_the_daemon(Interp::Shared);
}

#[test]
fn bpf_corrupt_target_static_python() {
    corrupt_target_under_the_daemon(Interp::Static);
}

// ------------------------------------------------------------ ring buffer

/// The smallest ring buffer at the highest rate, overrun by busy threads
/// with deep stacks: the drops are counted and exported; once the load is
/// gone they stop while samples keep arriving, and the remaining process's
/// profile is exact.
#[test]
fn bpf_tiny_ring_buffer_overflows_and_recovers() {
    let _guard = match serial_bpf_test() {
        Some(g) => g,
        None => return,
    };
    let tag = format!("--tag=ring-{}", std::process::id());
    let config = format!(
        "sampling:\n  rate_hz: 10000\n  ring_buffer_bytes: 65536\n\
         aggregation:\n  window_secs: 1\n  retention_secs: 300\n\
         discovery:\n  include:\n    - cmdline: \"{tag}\"\n"
    );
    let d = Daemon::start("ring", &config);
    let dropped = |m: &str| prom_sum(m, "pyebpf_ringbuf_dropped_samples_total", &[]);
    let received = |m: &str| prom_sum(m, "pyebpf_samples_received_total", &[]);
    // Busy about a third of the time, so that alone it leaves the reader
    // room even on a loaded machine.
    let survivor = Workload::start(Interp::Shared, &[&tag, "plain", "idle"]);
    let deep: Vec<Workload> = (0..3)
        .map(|_| {
            Workload::start(
                Interp::Shared,
                &[&tag, "recurse:400", "thread:plain", "thread:nested"],
            )
        })
        .collect();
    for w in deep.iter().chain([&survivor]) {
        d.wait_profiled(w.pid(), Duration::from_secs(30));
    }

    // Overload: the drops rise, and /metrics says so.
    let start = Instant::now();
    let overloaded = loop {
        let m = d.metrics();
        if dropped(&m) >= 1000.0 {
            break dropped(&m);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no ring-buffer drops counted under overload:\n{}",
            m.lines()
                .filter(
                    |l| l.starts_with("pyebpf_bpf_events_total") || l.starts_with("pyebpf_ringbuf")
                )
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(d.healthy(), "/healthz failed under overload");
    drop(deep);
    let relieved = Instant::now();

    // Recovery: a 3-second span in which samples keep arriving and no
    // sample is dropped (the metrics are refreshed once a second).
    let mut prev = d.metrics();
    let recovered_after = loop {
        std::thread::sleep(Duration::from_secs(3));
        let m = d.metrics();
        if dropped(&m) == dropped(&prev) && received(&m) > received(&prev) {
            break relieved.elapsed();
        }
        assert!(
            relieved.elapsed() < Duration::from_secs(60),
            "still dropping (or not receiving) 60 s after the load stopped: dropped {} -> {}, \
             received {} -> {}",
            dropped(&prev),
            dropped(&m),
            received(&prev),
            received(&m)
        );
        prev = m;
    };
    eprintln!(
        "ring: {overloaded} samples dropped under overload, recovered {recovered_after:?} after it \
         stopped"
    );

    // The survivor's profile: every sample of its hot line has its exact
    // stack, and they are most of its samples.
    let stacks = parse_folded(
        &d.get_ok(&format!("/folded?pid={}&seconds=300", survivor.pid()))
            .text(),
    );
    let hot = frame("plain_function", "HOT=plain");
    let exact = [frame("loop_forever", "CALL=loop"), hot.clone()];
    let n = leaf_count(&stacks, &hot);
    let all = total(&stacks);
    assert!(n >= 100, "{n} samples of the survivor's hot line");
    assert_eq!(
        samples(&stacks, |s| s.last() == Some(&hot)
            && s.ends_with(&exact)
            && s.len() == 4
            && s[0] == frame("<module>", "CALL=main")
            && s[1].starts_with("main (")),
        n,
        "the survivor's hot stacks:\n{stacks:?}"
    );
    assert!(
        n * 10 >= all * 8,
        "{n} of the survivor's {all} samples on its hot line: {stacks:?}"
    );
}

// ------------------------------------------------------- Pyroscope faults

/// The daemon pushes to a receiver that misbehaves as `fault` says, then
/// recovers. While it misbehaves: the push queue stays within its byte
/// bound, attempts are spaced by a growing back-off, lost profiles are
/// counted, sampling goes on without ring-buffer drops and /healthz
/// answers. Once it behaves, pushes resume.
fn push_to_a_faulty_receiver(fault: Fault) {
    if !bpf_available() {
        return;
    }
    const MAX_QUEUE: f64 = 1_048_576.0;
    let rx = Receiver::start_with(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), fault);
    let name = format!("{fault:?}").to_lowercase();
    let tag = format!("--tag=push-{name}-{}", std::process::id());
    let service = format!("push-{name}-{}", std::process::id());
    let config = format!(
        "aggregation:\n  window_secs: 1\n  retention_secs: 60\n\
         discovery:\n  include:\n    - cmdline: \"{tag}\"\n\
         outputs:\n  pyroscope:\n    url: http://{}\n    application_name: pyebpf-test\n    \
         timeout_secs: 1\n    max_queue_bytes: {MAX_QUEUE}\n    max_retry_secs: 4\n",
        rx.addr
    );
    let d = Daemon::start(&format!("push-{name}"), &config);
    let p = Workload::start_with_env(
        Interp::Shared,
        &[&tag, "plain"],
        &[("OTEL_SERVICE_NAME", &service)],
    );
    d.wait_profiled(p.pid(), Duration::from_secs(30));

    let m0 = d.metrics();
    let ring = |m: &str| prom_sum(m, "pyebpf_ringbuf_dropped_samples_total", &[]);
    let received = |m: &str| prom_sum(m, "pyebpf_samples_received_total", &[]);
    let gave_up = |m: &str| {
        prom_sum(
            m,
            "pyebpf_pyroscope_dropped_profiles_total",
            &[("reason", "gave_up")],
        )
    };
    let failed = |m: &str| {
        prom_sum(
            m,
            "pyebpf_export_total",
            &[("target", "pyroscope"), ("result", "error")],
        )
    };
    let start = Instant::now();
    let (mut prev, mut max_queue, mut slowest) = (m0.clone(), 0f64, Duration::ZERO);
    // At least 12 s and 7 attempts, so the back-off has grown a few times,
    // and a lost profile counted.
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let t = Instant::now();
        assert!(
            d.healthy(),
            "{name}: /healthz failed {:?} in",
            start.elapsed()
        );
        slowest = slowest.max(t.elapsed());
        let m = d.metrics();
        let queued = prom_sum(&m, "pyebpf_pyroscope_queue_bytes", &[]);
        max_queue = max_queue.max(queued);
        assert!(queued <= MAX_QUEUE, "{name}: {queued} bytes queued");
        assert!(
            received(&m) > received(&prev),
            "{name}: sampling stalled: {} samples received, as 2 s before",
            received(&m)
        );
        assert_eq!(
            ring(&m),
            ring(&m0),
            "{name}: ring-buffer drops while pushing"
        );
        prev = m;
        let attempts = rx.attempts_with(fault).len();
        if start.elapsed() >= Duration::from_secs(12) && attempts >= 7 && gave_up(&prev) >= 1.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{name}: after 90 s: {attempts} attempts, {} profiles given up",
            gave_up(&prev)
        );
    }
    assert!(
        failed(&prev) >= 3.0,
        "{name}: {} failed attempts counted",
        failed(&prev)
    );
    let lost = prom_sum(
        &prev,
        "pyebpf_export_total",
        &[("target", "pyroscope"), ("result", "dropped")],
    );
    assert!(
        lost >= gave_up(&prev),
        "{name}: {lost} dropped exports, {} given up",
        gave_up(&prev)
    );
    assert_eq!(rx.total(), 0, "{name}: a profile got through the fault");

    // Back-off: attempts a few per second at most, with gaps that grow.
    let attempts = rx.attempts_with(fault);
    let secs = start.elapsed().as_secs_f64() + 5.0;
    assert!(
        (attempts.len() as f64) <= 2.0 * secs,
        "{name}: {} attempts in {secs:.0} s",
        attempts.len()
    );
    let gaps: Vec<f64> = attempts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    eprintln!(
        "{name}: {} attempts, gaps {:?} s, queue at most {max_queue} bytes, /healthz at most {slowest:?}",
        attempts.len(),
        gaps.iter().map(|g| (g * 10.0).round() / 10.0).collect::<Vec<_>>()
    );
    // The pauses double (with jitter in their upper half): by the 7th
    // attempt the last gap is at least twice the first ones (about a
    // window apart) and about the largest (25% left for scheduling noise).
    let first = gaps[0].max(gaps[1]);
    let widest = gaps.iter().copied().fold(0.0, f64::max);
    let last = gaps[gaps.len() - 1];
    assert!(
        last >= 2.0 * first && last >= 0.75 * widest,
        "{name}: gaps between attempts do not grow: {gaps:?}"
    );

    // Recovery: a window that closed after the receiver came back arrives.
    rx.set_fault(Fault::None);
    let up = unix_now();
    let back = Instant::now();
    let w = loop {
        if let Some(w) = rx
            .for_service(&service)
            .into_iter()
            .find(|w| w.from() >= up)
        {
            break w;
        }
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "{name}: no push 60 s after the receiver recovered ({} received, errors {:?})",
            rx.total(),
            rx.errors()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "{name}: pushes resumed {:?} after the receiver did",
        back.elapsed()
    );
    assert!(w.samples() > 0);
    assert!(
        w.comments().contains(&format!("pid={}", p.pid())),
        "{:?}",
        w.comments()
    );
    assert!(rx.errors().is_empty(), "{:?}", rx.errors());
    assert!(d.healthy());
    let m = d.metrics();
    assert!(
        prom_sum(
            &m,
            "pyebpf_export_total",
            &[("target", "pyroscope"), ("result", "ok")]
        ) >= 1.0
    );
    assert_eq!(
        ring(&m),
        ring(&m0),
        "{name}: ring-buffer drops while pushing"
    );
}

#[test]
fn bpf_push_to_a_receiver_answering_500() {
    push_to_a_faulty_receiver(Fault::Status500);
}

#[test]
fn bpf_push_to_a_receiver_answering_garbage() {
    push_to_a_faulty_receiver(Fault::Garbage);
}

#[test]
fn bpf_push_to_a_receiver_resetting_connections() {
    push_to_a_faulty_receiver(Fault::Reset);
}

#[test]
fn bpf_push_to_a_receiver_that_never_answers() {
    push_to_a_faulty_receiver(Fault::Hang);
}

/// A Pyroscope that takes 3 s per request but accepts everything, under a
/// 5 s upload timeout: nothing may be lost. Two uploads at a time deliver
/// fewer profiles (2 per 3 s) than the daemon closes (one window a second),
/// so a backlog builds: the queue stays within its bytes, both upload slots
/// stay busy and every upload is timed as slow, and sampling and /healthz
/// go on as usual. Once the server is fast again the backlog drains, and
/// every profile pushed was accepted, once.
#[test]
fn bpf_push_to_a_slow_receiver() {
    if !bpf_available() {
        return;
    }
    const MAX_QUEUE: f64 = 1_048_576.0;
    const SLOTS: f64 = 2.0;
    let rx = Receiver::start_with(
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        Fault::Slow(Duration::from_secs(3)),
    );
    let tag = format!("--tag=push-slow-{}", std::process::id());
    let service = format!("push-slow-{}", std::process::id());
    let config = format!(
        "aggregation:\n  window_secs: 1\n  retention_secs: 60\n\
         discovery:\n  include:\n    - cmdline: \"{tag}\"\n\
         outputs:\n  pyroscope:\n    url: http://{}\n    application_name: pyebpf-test\n    \
         timeout_secs: 5\n    max_queue_bytes: {MAX_QUEUE}\n    max_concurrent_uploads: {SLOTS}\n",
        rx.addr
    );
    let d = Daemon::start("push-slow", &config);
    let p = Workload::start_with_env(
        Interp::Shared,
        &[&tag, "plain"],
        &[("OTEL_SERVICE_NAME", &service)],
    );
    d.wait_profiled(p.pid(), Duration::from_secs(30));

    let metric = |m: &str, name: &str| prom_sum(m, name, &[]);
    let export = |m: &str, result: &str| {
        prom_sum(
            m,
            "pyebpf_export_total",
            &[("target", "pyroscope"), ("result", result)],
        )
    };
    let uploads_under = |m: &str, le: &str| {
        prom_sum(
            m,
            "pyebpf_pyroscope_upload_duration_seconds_bucket",
            &[("le", le)],
        )
    };
    let m0 = d.metrics();
    let start = Instant::now();
    let (mut prev, mut busiest, mut backlog) = (m0.clone(), 0f64, 0f64);
    while start.elapsed() < Duration::from_secs(16) {
        std::thread::sleep(Duration::from_secs(2));
        assert!(d.healthy(), "/healthz failed {:?} in", start.elapsed());
        let m = d.metrics();
        let queued = metric(&m, "pyebpf_pyroscope_queue_bytes");
        assert!(queued <= MAX_QUEUE, "{queued} bytes queued");
        let in_flight = metric(&m, "pyebpf_pyroscope_uploads_in_flight");
        assert!(in_flight <= SLOTS, "{in_flight} uploads at once");
        busiest = busiest.max(in_flight);
        backlog = backlog.max(metric(&m, "pyebpf_pyroscope_queue_profiles"));
        assert!(
            metric(&m, "pyebpf_samples_received_total")
                > metric(&prev, "pyebpf_samples_received_total"),
            "sampling stalled {:?} in",
            start.elapsed()
        );
        assert_eq!(
            metric(&m, "pyebpf_ringbuf_dropped_samples_total"),
            metric(&m0, "pyebpf_ringbuf_dropped_samples_total"),
            "ring-buffer drops while pushing"
        );
        assert_eq!(export(&m, "error"), 0.0, "a failed upload");
        assert_eq!(export(&m, "dropped"), 0.0, "a lost profile");
        prev = m;
    }
    let slow = &prev;
    eprintln!(
        "slow: {} accepted in {:?}, at most {busiest} in flight and {backlog} waiting",
        export(slow, "ok"),
        start.elapsed()
    );
    assert!(export(slow, "ok") >= 1.0, "no upload succeeded");
    assert_eq!(busiest, SLOTS, "the backlog did not use every upload slot");
    assert!(backlog >= 1.0, "no backlog shown");
    // Every upload so far waited for the server's 3 s.
    assert!(uploads_under(slow, "+Inf") >= 1.0);
    assert_eq!(uploads_under(slow, "2.5"), 0.0, "a fast upload");

    // Fast again: the backlog drains, oldest first, until a window closed
    // after the switch is in; then every profile the daemon accepted the
    // upload of is at the server (the receiver records before it answers)
    // once, and none was lost.
    rx.set_fault(Fault::None);
    let up = unix_now();
    let back = Instant::now();
    let m = loop {
        let m = d.metrics();
        let got = rx.for_service(&service);
        let settled = metric(&m, "pyebpf_pyroscope_uploads_in_flight") == 0.0
            && metric(&m, "pyebpf_pyroscope_queue_profiles") == 0.0
            && export(&m, "ok") == got.len() as f64;
        if settled && got.iter().any(|w| w.from() >= up) {
            break m;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "not drained 30 s after the server got fast: {} accepted, {} received, {} in \
             flight, {} waiting",
            export(&m, "ok"),
            got.len(),
            metric(&m, "pyebpf_pyroscope_uploads_in_flight"),
            metric(&m, "pyebpf_pyroscope_queue_profiles")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "slow: drained {:?} after the server got fast",
        back.elapsed()
    );
    assert_eq!(export(&m, "error"), 0.0);
    assert_eq!(export(&m, "dropped"), 0.0);
    assert_eq!(rx.total(), rx.for_service(&service).len());
    let mut froms: Vec<u64> = rx.for_service(&service).iter().map(|w| w.from()).collect();
    let n = froms.len();
    froms.sort_unstable();
    froms.dedup();
    assert_eq!(froms.len(), n, "a window pushed twice");
    assert!(rx.errors().is_empty(), "{:?}", rx.errors());
    assert!(d.healthy());
}
