//! Medians and spreads, folded stacks, and distances between distributions.

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// Median and spread of repeated measurements.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    /// Interquartile range bounds (linear interpolation), and extremes.
    pub q1: f64,
    pub q3: f64,
    pub min: f64,
    pub max: f64,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Summary {
    /// `None` for no finite values.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Summary {
            n: v.len(),
            median: quantile(&v, 0.5),
            q1: quantile(&v, 0.25),
            q3: quantile(&v, 0.75),
            min: v[0],
            max: v[v.len() - 1],
        })
    }

    /// `median [min–max]` with `f` formatting each number.
    pub fn show(&self, f: impl Fn(f64) -> String) -> String {
        if self.n == 1 {
            return f(self.median);
        }
        format!("{} [{}–{}]", f(self.median), f(self.min), f(self.max))
    }
}

/// A distribution-free 95% confidence interval of the median of `values` (finite ones):
/// the order statistics x(r) and x(n + 1 − r) for the largest r with
/// P(Bin(n, ½) ≤ r − 1) ≤ 2.5%. With fewer than 6 values no such r exists, and the
/// interval is the whole range.
pub fn median_ci95(values: &[f64]) -> Option<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    // P(X <= j) for X ~ Bin(n, 1/2), accumulated term by term.
    let mut term = 0.5f64.powi(n as i32);
    let mut below = term; // P(X <= 0)
    let mut r = 1;
    while r < n / 2 {
        term *= (n - r + 1) as f64 / r as f64;
        if below + term > 0.025 {
            break;
        }
        below += term;
        r += 1;
    }
    if r == 1 && below > 0.025 {
        return Some((v[0], v[n - 1]));
    }
    Some((v[r - 1], v[n - r]))
}

/// One frame of a folded line: `qualname (file:line)`, or a synthetic frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub name: &'a str,
    pub file: Option<&'a str>,
    pub line: Option<u32>,
}

pub fn parse_frame(f: &str) -> Frame<'_> {
    let f = f.trim();
    // Names hold no " (" in practice; file names may.
    if let Some(open) = f.find(" (") {
        if let Some(inner) = f[open + 2..].strip_suffix(')') {
            if let Some((file, line)) = inner.rsplit_once(':') {
                if let Ok(line) = line.parse() {
                    return Frame {
                        name: &f[..open],
                        file: Some(file),
                        line: Some(line),
                    };
                }
            }
        }
    }
    Frame {
        name: f,
        file: None,
        line: None,
    }
}

/// `(frames root first, count)` of each `a;b;c COUNT` line.
pub fn parse_folded(text: &str) -> Vec<(Vec<&str>, u64)> {
    text.lines()
        .filter_map(|l| {
            let (stack, count) = l.trim_end().rsplit_once(' ')?;
            Some((stack.split(';').collect(), count.parse().ok()?))
        })
        .collect()
}

pub fn total_samples(text: &str) -> u64 {
    parse_folded(text).iter().map(|(_, n)| n).sum()
}

/// Deepest stack whose leaf function is `leaf`, in frames.
pub fn max_depth_with_leaf(text: &str, leaf: &str) -> usize {
    parse_folded(text)
        .iter()
        .filter(|(f, _)| f.last().is_some_and(|l| parse_frame(l).name == leaf))
        .map(|(f, _)| f.len())
        .max()
        .unwrap_or(0)
}

/// Share of samples per leaf function name.
pub fn leaf_shares(text: &str) -> BTreeMap<String, f64> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = 0;
    for (frames, n) in parse_folded(text) {
        let leaf = frames.last().map(|f| parse_frame(f).name).unwrap_or("");
        *counts.entry(leaf.to_string()).or_default() += n;
        total += n;
    }
    counts
        .into_iter()
        .map(|(k, n)| (k, n as f64 / total.max(1) as f64))
        .collect()
}

/// Total-variation distance between two distributions (missing keys are 0).
pub fn tv_distance(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> f64 {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    0.5 * keys
        .into_iter()
        .map(|k| (a.get(k).unwrap_or(&0.0) - b.get(k).unwrap_or(&0.0)).abs())
        .sum::<f64>()
}

/// Share of samples whose leaf frame is in `file_name` (compared by base
/// name) at one of `lines`.
pub fn leaf_line_agreement(text: &str, file_name: &str, lines: &[u32]) -> f64 {
    let mut hit = 0;
    let mut total = 0;
    for (frames, n) in parse_folded(text) {
        total += n;
        let Some(leaf) = frames.last().map(|f| parse_frame(f)) else {
            continue;
        };
        let same_file = leaf
            .file
            .is_some_and(|f| f.rsplit('/').next() == Some(file_name));
        if same_file && leaf.line.is_some_and(|l| lines.contains(&l)) {
            hit += n;
        }
    }
    hit as f64 / total.max(1) as f64
}

/// Lines (1-based) of each `# HOT:<name>` marker in a workload's source.
pub fn hot_lines(source: &str) -> HashMap<String, Vec<u32>> {
    let mut out: HashMap<String, Vec<u32>> = HashMap::new();
    for (i, l) in source.lines().enumerate() {
        if let Some(pos) = l.find("# HOT:") {
            let name: String = l[pos + 6..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.entry(name).or_default().push(i as u32 + 1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary() {
        let s = Summary::of(&[5.0, 1.0, 3.0, f64::NAN, 2.0, 4.0]).unwrap();
        assert_eq!(s.n, 5);
        assert_eq!(s.median, 3.0);
        assert_eq!((s.q1, s.q3), (2.0, 4.0));
        assert_eq!((s.min, s.max), (1.0, 5.0));
        assert_eq!(Summary::of(&[1.0, 2.0]).unwrap().median, 1.5);
        assert!(Summary::of(&[]).is_none());
        assert_eq!(s.show(|x| format!("{x:.0}")), "3 [1–5]");
    }

    #[test]
    fn median_confidence_interval() {
        let v: Vec<f64> = (1..=15).map(f64::from).collect();
        // P(Bin(15, ½) <= 3) = 1.76%, P(<= 4) = 5.9%: x(4) and x(12).
        assert_eq!(median_ci95(&v), Some((4.0, 12.0)));
        // P(Bin(6, ½) <= 0) = 1.6%, P(<= 1) = 10.9%: the extremes.
        assert_eq!(
            median_ci95(&[3.0, 1.0, 2.0, 6.0, 5.0, 4.0]),
            Some((1.0, 6.0))
        );
        // Fewer than 6: the whole range.
        assert_eq!(median_ci95(&[2.0, f64::NAN, 1.0]), Some((1.0, 2.0)));
        assert_eq!(median_ci95(&[7.0]), Some((7.0, 7.0)));
        assert_eq!(median_ci95(&[]), None);
        // n = 20: P(<= 5) = 2.07%, P(<= 6) = 5.8%: x(6) and x(15).
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(median_ci95(&v), Some((6.0, 15.0)));
    }

    #[test]
    fn frames() {
        assert_eq!(
            parse_frame("split_a (/w/scenarios.py:110)"),
            Frame {
                name: "split_a",
                file: Some("/w/scenarios.py"),
                line: Some(110)
            }
        );
        assert_eq!(
            parse_frame("f (x (y).py:3)"),
            Frame {
                name: "f",
                file: Some("x (y).py"),
                line: Some(3)
            }
        );
        assert_eq!(parse_frame("[truncated]").name, "[truncated]");
        assert_eq!(parse_frame("[truncated]").line, None);
    }

    #[test]
    fn distributions() {
        let folded = "<module> (a.py:1);split_a (/x/scenarios.py:110) 10\n\
                      <module> (a.py:1);split_b (scenarios.py:115) 20\n\
                      <module> (a.py:1);split_b (scenarios.py:113) 5\n\
                      [unknown code object: stale] 5\n\
                      garbage\n";
        assert_eq!(total_samples(folded), 40);
        assert_eq!(max_depth_with_leaf(folded, "split_b"), 2);
        assert_eq!(max_depth_with_leaf(folded, "nope"), 0);
        let m = leaf_shares(folded);
        assert_eq!(m["split_a"], 0.25);
        assert_eq!(m["split_b"], 25.0 / 40.0);
        let truth = BTreeMap::from([
            ("split_a".to_string(), 1.0 / 3.0),
            ("split_b".to_string(), 2.0 / 3.0),
        ]);
        let tv = tv_distance(&m, &truth);
        // |0.25-1/3| + |0.625-2/3| + |0.125-0|, halved.
        assert!((tv - 0.125).abs() < 1e-12, "{tv}");
        assert_eq!(tv_distance(&truth, &truth), 0.0);
        let agree = leaf_line_agreement(folded, "scenarios.py", &[110, 115]);
        assert_eq!(agree, 30.0 / 40.0);
    }

    #[test]
    fn hot_markers() {
        let src = "x = 1\nwhile f(): pass  # HOT:split_a\n# HOT:b-c\n";
        let h = hot_lines(src);
        assert_eq!(h["split_a"], vec![2]);
        assert_eq!(h["b"], vec![3]);
    }
}
