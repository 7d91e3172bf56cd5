//! Cost of discovery looking at a process that is not Python (`sleep 60`),
//! the common case on a busy host:
//!
//! - `inspect/uncached`: `python::inspect` with an empty ELF verdict cache,
//!   so every executable file it maps is opened and its symbol tables
//!   searched (the first time a binary is seen);
//! - `inspect/cached`: the same with a warm cache (a `stat` per file);
//! - `candidate/no_rules_cached`: the daemon's whole step under the default
//!   configuration (no include or exclude rules: the `PYEBPF_DISABLE`
//!   check, then the cached ELF verdicts);
//! - `candidate/included_cached`: the same when an include rule selects the
//!   process (its labels are read first);
//! - `candidate/excluded`: a process an exclude rule rejects (labels from
//!   `/proc` only, no ELF file looked at).
//!
//! `cargo bench -p profiler-daemon --bench discovery`
use std::hint::black_box;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use pyebpf::daemon::config;
use pyebpf::daemon::discovery::{inspect_candidate, Candidate, Inspection};
use pyebpf::process::elf_cache::DEFAULT_CAPACITY;
use pyebpf::process::python::{self, InspectError, VerdictCache};

/// `sleep 60`, killed on drop.
struct Sleeper(Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sleeper() -> Sleeper {
    let s = Sleeper(
        Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("cannot run sleep"),
    );
    // Until exec is done and libc is mapped, the maps still change.
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = s.0.id();
    while python::command(pid).ok().as_deref() != Some("sleep")
        || !std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap_or_default()
            .contains("libc")
    {
        assert!(Instant::now() < deadline, "sleep did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    s
}

fn not_python(r: &Result<python::PythonProcess, InspectError>) -> bool {
    matches!(r, Err(InspectError::NotPython(..)))
}

fn bench_inspect(c: &mut Criterion) {
    let child = sleeper();
    let pid = child.0.id();
    let mut g = c.benchmark_group("inspect");
    g.bench_function("uncached", |b| {
        b.iter_batched(
            || VerdictCache::new(DEFAULT_CAPACITY),
            |cache| {
                let r = python::inspect_cached(black_box(pid), &cache);
                assert!(not_python(&r), "{r:?}");
                cache
            },
            BatchSize::SmallInput,
        )
    });
    let warm = VerdictCache::new(DEFAULT_CAPACITY);
    assert!(not_python(&python::inspect_cached(pid, &warm)));
    let parsed = warm.stats().misses;
    g.bench_function("cached", |b| {
        b.iter(|| {
            let r = python::inspect_cached(black_box(pid), &warm);
            assert!(not_python(&r), "{r:?}");
        })
    });
    g.finish();
    assert_eq!(warm.stats().misses, parsed, "the warm cache missed");
    eprintln!("files looked up per inspection: {parsed}");
}

fn bench_candidate(c: &mut Criterion) {
    let child = sleeper();
    let pid = child.0.id();
    let candidate = Candidate {
        pid,
        start_time: python::start_time(pid).expect("start time"),
    };
    let rules = |yaml: &str| {
        config::parse(yaml, "bench")
            .expect("valid configuration")
            .discovery
    };
    let warm = VerdictCache::new(DEFAULT_CAPACITY);
    let mut g = c.benchmark_group("candidate");
    for (name, yaml) in [
        ("no_rules_cached", ""),
        (
            "included_cached",
            "discovery: {include: [{command: sleep}]}",
        ),
    ] {
        let selected = rules(yaml);
        g.bench_function(name, |b| {
            b.iter(|| {
                let r = inspect_candidate(black_box(candidate), &selected, &warm);
                assert!(matches!(r, Err(InspectError::NotPython(..))), "{r:?}");
            })
        });
    }
    let no_sleep = rules("discovery: {exclude: [{command: sleep}]}");
    let before = warm.stats();
    g.bench_function("excluded", |b| {
        b.iter(|| {
            let r = inspect_candidate(black_box(candidate), &no_sleep, &warm);
            assert!(matches!(r, Ok(Inspection::Excluded { .. })), "{r:?}");
        })
    });
    g.finish();
    assert_eq!(warm.stats(), before, "an excluded process looked at files");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench_inspect, bench_candidate
}
criterion_main!(benches);
