//! The criterion microbenchmarks (`profiler-daemon/benches/{userspace,discovery}.rs`),
//! run with a short measurement time; their estimates are read back from
//! criterion's JSON files.

use super::Ctx;
use crate::util::cargo;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Micro {
    pub name: String,
    /// Median time per iteration and its 95% confidence interval, ns.
    pub median_ns: f64,
    pub ci_low_ns: f64,
    pub ci_high_ns: f64,
}

pub fn run(ctx: &Ctx, warm: f64, measure: f64) -> Result<Vec<Micro>> {
    let home = ctx.scratch("criterion");
    let warm = warm.to_string();
    let measure = measure.to_string();
    cargo(&[
        "bench",
        "-p",
        "profiler-daemon",
        "--bench",
        "userspace",
        "--bench",
        "discovery",
        "--",
        "--warm-up-time",
        &warm,
        "--measurement-time",
        &measure,
        "--noplot",
    ])
    .env("CRITERION_HOME", &home.to_string_lossy())
    .run()?;
    let mut out = Vec::new();
    collect(&home, &mut out)?;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    if out.is_empty() {
        anyhow::bail!("criterion wrote no estimates under {}", home.display());
    }
    Ok(out)
}

/// Every `new/benchmark.json` + `new/estimates.json` pair under `dir`.
fn collect(dir: &Path, out: &mut Vec<Micro>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            let bench = std::fs::read_to_string(path.join("benchmark.json"));
            let est = std::fs::read_to_string(path.join("estimates.json"));
            if let (Ok(b), Ok(e)) = (bench, est) {
                out.push(parse(&b, &e)?);
            }
        } else {
            collect(&path, out)?;
        }
    }
    Ok(())
}

/// One benchmark from criterion's `benchmark.json` and `estimates.json`.
pub fn parse(benchmark: &str, estimates: &str) -> Result<Micro> {
    let b: serde_json::Value = serde_json::from_str(benchmark)?;
    let e: serde_json::Value = serde_json::from_str(estimates)?;
    let name = b["full_id"]
        .as_str()
        .or_else(|| b["title"].as_str())
        .context("benchmark.json without full_id")?
        .to_string();
    let m = &e["median"];
    let num = |v: &serde_json::Value| v.as_f64().context("estimates.json: missing median");
    Ok(Micro {
        name,
        median_ns: num(&m["point_estimate"])?,
        ci_low_ns: num(&m["confidence_interval"]["lower_bound"])?,
        ci_high_ns: num(&m["confidence_interval"]["upper_bound"])?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_criterion_files() {
        let b = r#"{"group_id":"decode","function_id":"16_frames","value_str":null,
                    "throughput":null,"full_id":"decode/16_frames","directory_name":"decode/16_frames",
                    "title":"decode/16_frames"}"#;
        let e = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":40.0,"upper_bound":44.0},"point_estimate":42.0,"standard_error":1.0},
                    "median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":39.5,"upper_bound":41.5},"point_estimate":40.5,"standard_error":0.5}}"#;
        let m = super::parse(b, e).unwrap();
        assert_eq!(m.name, "decode/16_frames");
        assert_eq!((m.median_ns, m.ci_low_ns, m.ci_high_ns), (40.5, 39.5, 41.5));
        assert!(super::parse(b, "{}").is_err());
    }
}
