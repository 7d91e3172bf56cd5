//! speedscope's JSON file format
//! (https://www.speedscope.app/file-format-schema.json).
//!
//! One "sampled" profile. Weights are nanoseconds (CPU samples times their
//! period, or the wall and off-CPU profiles' own nanoseconds) with unit
//! "nanoseconds", so speedscope shows times rather than bare sample counts. Each distinct [`Frame`] is one shared
//! frame: Python frames carry `file` and the executing `line` (like py-spy),
//! synthetic frames only a name.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{Frame, Profile};

pub const SCHEMA: &str = "https://www.speedscope.app/file-format-schema.json";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct File {
    #[serde(rename = "$schema")]
    pub schema: String,
    pub shared: Shared,
    pub profiles: Vec<SampledProfile>,
    pub name: String,
    #[serde(rename = "activeProfileIndex")]
    pub active_profile_index: usize,
    pub exporter: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Shared {
    pub frames: Vec<SharedFrame>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SharedFrame {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SampledProfile {
    /// Always "sampled".
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub unit: String,
    #[serde(rename = "startValue")]
    pub start_value: u64,
    #[serde(rename = "endValue")]
    pub end_value: u64,
    /// Indices into `shared.frames`, root first.
    pub samples: Vec<Vec<usize>>,
    pub weights: Vec<u64>,
}

/// `p` as a speedscope document. Frames are numbered in order of first use
/// over the sorted stacks, so the output is deterministic.
pub fn build(p: &Profile, title: &str) -> File {
    let period = p.ns_per_value();
    let mut index: HashMap<&Frame, usize> = HashMap::new();
    let mut frames = Vec::new();
    let mut samples = Vec::with_capacity(p.stacks.len());
    let mut weights = Vec::with_capacity(p.stacks.len());
    for (stack, count) in p.sorted_stacks() {
        let sample = stack
            .iter()
            .map(|f| {
                *index.entry(f).or_insert_with(|| {
                    frames.push(shared_frame(f));
                    frames.len() - 1
                })
            })
            .collect();
        samples.push(sample);
        weights.push(count.saturating_mul(period));
    }
    let end_value = weights.iter().fold(0u64, |a, w| a.saturating_add(*w));
    File {
        schema: SCHEMA.to_string(),
        shared: Shared { frames },
        profiles: vec![SampledProfile {
            kind: "sampled".to_string(),
            name: title.to_string(),
            unit: "nanoseconds".to_string(),
            start_value: 0,
            end_value,
            samples,
            weights,
        }],
        name: title.to_string(),
        active_profile_index: 0,
        exporter: format!("pyebpf {}", env!("CARGO_PKG_VERSION")),
    }
}

fn shared_frame(f: &Frame) -> SharedFrame {
    match f {
        Frame::Python {
            qualname,
            filename,
            line,
            ..
        } => SharedFrame {
            name: qualname.to_string(),
            file: Some(filename.to_string()),
            line: Some(*line),
        },
        _ => SharedFrame {
            name: f.to_string(),
            file: None,
            line: None,
        },
    }
}

/// Write `p` as a speedscope JSON file titled `title`.
pub fn write(p: &Profile, title: &str, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, &build(p, title))?;
    out.write_all(b"\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::folded::tests::sample_profile;

    #[test]
    fn json_round_trip() {
        let mut out = Vec::new();
        write(&sample_profile(), "my \"title\"", &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["$schema"], SCHEMA);
        assert!(v["exporter"].as_str().unwrap().starts_with("pyebpf"));
        assert_eq!(v["profiles"][0]["type"], "sampled");
        assert_eq!(v["profiles"][0]["unit"], "nanoseconds");
        assert_eq!(v["name"], "my \"title\"");
        // Synthetic frames have no file/line keys at all.
        let frames = v["shared"]["frames"].as_array().unwrap();
        let trunc = frames.iter().find(|f| f["name"] == "[truncated]").unwrap();
        assert_eq!(trunc.as_object().unwrap().len(), 1);

        let f: File = serde_json::from_slice(&out).unwrap();
        let prof = &f.profiles[0];
        assert_eq!(prof.samples.len(), 5);
        assert_eq!(prof.weights.len(), 5);
        assert_eq!(prof.end_value, 15 * 10_000_000);
        assert_eq!(prof.weights.iter().sum::<u64>(), prof.end_value);

        let render = |i: usize| {
            let fr = &f.shared.frames[i];
            match (&fr.file, fr.line) {
                (Some(file), Some(line)) => format!("{} {file}:{line}", fr.name),
                _ => fr.name.clone(),
            }
        };
        let mut got: Vec<(Vec<String>, u64)> = prof
            .samples
            .iter()
            .zip(&prof.weights)
            .map(|(s, w)| (s.iter().map(|&i| render(i)).collect(), *w / 10_000_000))
            .collect();
        got.sort();
        let want: Vec<(Vec<&str>, u64)> = vec![
            (
                vec![
                    "[partial stack: read failed]",
                    "worker /usr/lib/python3.11/threading.py:975",
                ],
                1,
            ),
            (
                vec![
                    "[truncated]",
                    "функция /srv/модуль.py:7",
                    "[unknown code object: stale]",
                ],
                4,
            ),
            (
                vec!["process 42 (python3 app.py)", "<module> /srv/app.py:10"],
                2,
            ),
            (
                vec![
                    "process 42 (python3 app.py)",
                    "<module> /srv/app.py:10",
                    "Klass.odd;name /srv/app.py:30",
                ],
                3,
            ),
            (
                vec![
                    "process 42 (python3 app.py)",
                    "<module> /srv/app.py:10",
                    "функция /srv/модуль.py:7",
                ],
                5,
            ),
        ];
        let want: Vec<(Vec<String>, u64)> = want
            .into_iter()
            .map(|(s, c)| (s.into_iter().map(String::from).collect(), c))
            .collect();
        assert_eq!(got, want);
        // Distinct frames are shared, not repeated per sample.
        assert_eq!(f.shared.frames.len(), 8);
    }
}
