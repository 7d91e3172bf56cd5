//! Keeps `cargo xtask bench` working: runs it in its smallest form
//! (`--smoke`: every measurement once, tiny, no criterion) into a scratch
//! directory and checks that both reports are written and hold every
//! section. No timing is asserted. Section 7 (CPython versions) runs 3.15 from the
//! Debian roots of `cargo xtask bootstrap`; without them it measures 3.11 only and
//! prints that it skipped the rest.
//!
//! Needs root (BPF, and py-spy reading another process). Without root it
//! fails when PYEBPF_REQUIRE_BPF_TESTS is set, and is skipped otherwise.
mod common;

#[test]
fn bench_smoke() {
    let Some(pyebpf) = common::prerequisites("the bench smoke test") else {
        return;
    };
    let (out, status) = common::xtask(&["bench", "--smoke"], "bench-smoke", &pyebpf);
    assert!(
        status.success(),
        "cargo xtask bench --smoke failed: {status}"
    );

    let md = std::fs::read_to_string(out.join("BENCHMARKS.md")).expect("BENCHMARKS.md");
    for section in [
        "## Machine and versions",
        "## Targets",
        "### Where pyebpf does not yet meet a target",
        "## 1. Target slowdown",
        "## 2. Profiler cost per sample",
        "## 3. BPF walk cost by stack depth",
        "## 4. Throughput",
        "## 5. Memory",
        "## 6. Accuracy",
        "## 7. CPython versions",
    ] {
        assert!(
            md.contains(section),
            "BENCHMARKS.md lacks {section:?}:\n{md}"
        );
    }
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("benchmarks.json")).expect("benchmarks.json"),
    )
    .expect("valid JSON");
    // Every measurement produced data (values themselves are not judged).
    let rows = json["slowdown"]["rows"].as_array().expect("slowdown rows");
    assert!(
        rows.iter()
            .any(|r| r["label"].as_str() == Some("pyebpf @ 999 Hz")
                && r["samples"][0].as_u64() > Some(0)),
        "{rows:?}"
    );
    let cost = json["cost"].as_array().expect("cost rows");
    assert!(
        cost.len() >= 2
            && cost
                .iter()
                .all(|c| c["summary"]["median"].as_f64() > Some(0.0))
    );
    assert!(json["walk"]["rows"][0]["deepest_stack"].as_u64() > Some(10));
    assert!(json["throughput"]["levels"][0]["samples_per_s"].as_f64() > Some(0.0));
    assert!(json["memory"]["rss"].as_u64() > Some(0));
    let acc = json["accuracy"]["rows"].as_array().expect("accuracy rows");
    assert!(
        acc.iter().all(|r| r["samples"][0].as_u64() > Some(0)),
        "{acc:?}"
    );
    // 7. CPython versions: the 3.11 baseline always; the roots' interpreter (3.15) when
    // `cargo xtask bootstrap` built the roots, else a reason.
    let versions = &json["versions"];
    let rows = versions["rows"].as_array().expect("versions rows");
    let measured = |r: &serde_json::Value| {
        r["bpf_ns_per_frame"][0].as_f64().is_some()
            && r["pyebpf_cost"]["ns_per_sample"][0].as_f64() > Some(0.0)
            && r["pyebpf_accuracy"]["samples"][0].as_f64() > Some(0.0)
    };
    assert!(
        rows.iter()
            .any(|r| r["interpreter"]["baseline"] == true && measured(r)),
        "{versions:#}"
    );
    match versions["skipped"].as_str() {
        Some(why) => eprintln!("SKIPPED: CPython versions other than 3.11: {why}"),
        None => assert!(
            rows.iter()
                .any(|r| r["interpreter"]["baseline"] == false && measured(r)),
            "{versions:#}"
        ),
    }
    assert!(json["targets"].as_array().is_some_and(|t| !t.is_empty()));
    let _ = std::fs::remove_dir_all(&out);
}
