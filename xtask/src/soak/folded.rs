//! What a folded profile (`frame;frame;...;leaf COUNT`) shows of the soak's
//! workloads: samples at each `# HOT:name` marker line, and samples whose
//! stack has an unknown or partial frame.

use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// A `# HOT:name` line of a workload script, with the function it is in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Marker {
    pub name: String,
    /// `soak_app.py`.
    pub file: String,
    pub line: u32,
    pub function: String,
}

impl Marker {
    /// Whether `frame` (`qualname (path:line)`) is this marker's line.
    fn is(&self, frame: &str) -> bool {
        frame.starts_with(&format!("{} (", self.function))
            && (frame.ends_with(&format!("/{}:{})", self.file, self.line))
                || frame.ends_with(&format!("({}:{})", self.file, self.line)))
    }
}

/// The markers of `source` (the text of `file`); each belongs to the
/// nearest `def` above it.
pub fn markers(file: &str, source: &str) -> Vec<Marker> {
    let mut function = String::new();
    let mut out = Vec::new();
    for (i, line) in source.lines().enumerate() {
        if let Some(def) = line.trim_start().strip_prefix("def ") {
            function = def.split('(').next().unwrap_or(def).trim().to_string();
        }
        let Some(pos) = line.find("# HOT:") else {
            continue;
        };
        let name = line[pos + 6..].trim();
        // A marker ends its line with a plain name (not a mention in prose).
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(Marker {
                name: name.to_string(),
                file: file.to_string(),
                line: i as u32 + 1,
                function: function.clone(),
            });
        }
    }
    out
}

/// The markers of a script in `dir`.
pub fn markers_of(dir: &Path, file: &str) -> Result<Vec<Marker>> {
    let path = dir.join(file);
    let src =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(markers(file, &src))
}

/// Samples at one marker.
#[derive(Clone, Debug, Serialize)]
pub struct Hit {
    pub marker: String,
    /// `function (file:line)`.
    pub frame: String,
    pub samples: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Shown {
    pub samples: u64,
    /// Samples whose stack holds an `[unknown code object: ...]` frame.
    pub unknown: u64,
    /// Samples whose walk ended on a failed read (`[partial stack: ...]`).
    pub partial: u64,
    pub hits: Vec<Hit>,
}

impl Shown {
    /// Markers with no sample at their line.
    pub fn missing(&self) -> Vec<String> {
        self.hits
            .iter()
            .filter(|h| h.samples == 0)
            .map(|h| h.frame.clone())
            .collect()
    }
}

/// Reads folded `text` (one or several profiles concatenated).
pub fn shown(text: &str, markers: &[Marker]) -> Shown {
    let mut s = Shown {
        hits: markers
            .iter()
            .map(|m| Hit {
                marker: m.name.clone(),
                frame: format!("{} ({}:{})", m.function, m.file, m.line),
                samples: 0,
            })
            .collect(),
        ..Shown::default()
    };
    for line in text.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(count) = count.trim().parse::<u64>() else {
            continue;
        };
        s.samples += count;
        let frames: Vec<&str> = stack.split(';').collect();
        if frames.iter().any(|f| f.starts_with("[unknown code object")) {
            s.unknown += count;
        }
        if frames.iter().any(|f| f.starts_with("[partial stack")) {
            s.partial += count;
        }
        for (m, h) in markers.iter().zip(&mut s.hits) {
            if frames.iter().any(|f| m.is(f)) {
                h.samples += count;
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_hits() {
        let src = "\"\"\"Lines with `# HOT:name` markers.\"\"\"\ndef gen(n):\n    return sum(y)  # HOT:gen\n\n\
                   def exc():\n    try:\n        f()  # HOT:exc\n    except E:\n        pass\n";
        let m = markers("app.py", src);
        assert_eq!(
            m.iter()
                .map(|m| (m.name.as_str(), m.line, m.function.as_str()))
                .collect::<Vec<_>>(),
            [("gen", 3, "gen"), ("exc", 7, "exc")]
        );
        let folded = "process 1 (python3);app (/w/app.py:90);gen (/w/app.py:3) 7\n\
                      app (/w/app.py:90);gen (/w/app.py:4) 2\n\
                      app (/w/app.py:90);[unknown code object: stale] 1\n\
                      [partial stack: read failed];exc (/w/other_app.py:7) 3\n";
        let s = shown(folded, &m);
        assert_eq!((s.samples, s.unknown, s.partial), (13, 1, 3));
        assert_eq!(s.hits[0].samples, 7);
        // Another file's line 8 is not the marker.
        assert_eq!(s.missing(), ["exc (app.py:7)"]);
    }
}
