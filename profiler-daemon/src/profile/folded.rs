//! Brendan Gregg's folded-stacks text: `root;...;leaf COUNT`, one line per
//! distinct stack, as read by flamegraph.pl, inferno and speedscope. COUNT
//! is the profile's value: a sample count for a CPU profile, integer
//! nanoseconds for wall and off-CPU profiles.
//!
//! Frames are rendered with [`Frame`]'s `Display` (`qualname (file:line)`),
//! made safe for the format, which is lossy and meant for display:
//! - `;` (the frame separator) becomes `:`;
//! - control characters (newline, tab, ...) are written as Rust escapes
//!   (`\n`, `\t`, `\u{1b}`), so a frame never spans lines or hides a count.
//!
//! Lines are sorted as strings, the order flamegraph tools expect; stacks that
//! render identically after escaping are merged (counts summed).
use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{Frame, Profile};

/// The folded-format text of one frame (see the module docs).
pub fn frame_text(frame: &Frame) -> String {
    let raw = frame.to_string();
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            ';' => out.push(':'),
            c if c.is_control() => {
                // `escape_debug` keeps non-ASCII letters as they are.
                let _ = write!(out, "{}", c.escape_debug());
            }
            c => out.push(c),
        }
    }
    out
}

/// The folded lines of `p` (without newlines), sorted, duplicates merged.
/// Empty stacks are skipped: the format cannot represent them.
pub fn lines(p: &Profile) -> Vec<String> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for (stack, count) in &p.stacks {
        if stack.is_empty() {
            continue;
        }
        let key = stack.iter().map(frame_text).collect::<Vec<_>>().join(";");
        *merged.entry(key).or_insert(0) += count;
    }
    merged
        .into_iter()
        .map(|(stack, count)| format!("{stack} {count}"))
        .collect()
}

/// Write `p` as folded stacks, one `\n`-terminated line per stack.
pub fn write(p: &Profile, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let mut text = String::new();
    for line in lines(p) {
        text.push_str(&line);
        text.push('\n');
    }
    out.write_all(text.as_bytes())?;
    Ok(())
}

/// A malformed folded line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("line {line}: no count after the stack")]
    MissingCount { line: usize },
    #[error("line {line}: bad count {count:?}")]
    BadCount { line: usize, count: String },
    #[error("line {line}: empty stack")]
    EmptyStack { line: usize },
}

/// Parse folded text back into `(frames root first, count)`, in file order.
/// The count is what follows the last space; blank lines are skipped.
/// Line numbers in errors are 1-based.
pub fn parse(text: &str) -> Result<Vec<(Vec<String>, u64)>, ParseError> {
    let mut stacks = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let (stack, count) = line
            .rsplit_once(' ')
            .ok_or(ParseError::MissingCount { line: line_no })?;
        let count = count.parse::<u64>().map_err(|_| ParseError::BadCount {
            line: line_no,
            count: count.to_string(),
        })?;
        if stack.is_empty() {
            return Err(ParseError::EmptyStack { line: line_no });
        }
        stacks.push((stack.split(';').map(str::to_string).collect(), count));
    }
    Ok(stacks)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::profile::UnknownReason;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    pub(crate) fn py(qualname: &str, filename: &str, line: u32, first_line: u32) -> Frame {
        Frame::Python {
            qualname: Arc::from(qualname),
            filename: Arc::from(filename),
            line,
            first_line,
        }
    }

    /// A small profile exercising every frame kind and awkward names; shared
    /// by the tests of all formats.
    pub(crate) fn sample_profile() -> Profile {
        let mut p = Profile::new(100);
        p.start = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        p.duration = Duration::from_millis(2500);
        let root = Frame::Process {
            pid: 42,
            command: Arc::from("python3 app.py"),
        };
        let main = py("<module>", "/srv/app.py", 10, 1);
        let func = py("функция", "/srv/модуль.py", 7, 5);
        p.add(vec![root.clone(), main.clone(), func.clone()], 5);
        p.add(
            vec![
                root.clone(),
                main.clone(),
                py("Klass.odd;name", "/srv/app.py", 30, 28),
            ],
            3,
        );
        p.add(vec![root.clone(), main.clone()], 2);
        p.add(
            vec![
                Frame::Truncated,
                func.clone(),
                Frame::Unknown {
                    reason: UnknownReason::Stale,
                },
            ],
            4,
        );
        p.add(
            vec![
                Frame::Partial,
                py("worker", "/usr/lib/python3.11/threading.py", 975, 970),
            ],
            1,
        );
        p
    }

    const EXPECTED: &str = "\
[partial stack: read failed];worker (/usr/lib/python3.11/threading.py:975) 1
[truncated];функция (/srv/модуль.py:7);[unknown code object: stale] 4
process 42 (python3 app.py);<module> (/srv/app.py:10) 2
process 42 (python3 app.py);<module> (/srv/app.py:10);Klass.odd:name (/srv/app.py:30) 3
process 42 (python3 app.py);<module> (/srv/app.py:10);функция (/srv/модуль.py:7) 5
";

    #[test]
    fn exact_text() {
        let mut out = Vec::new();
        write(&sample_profile(), &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), EXPECTED);
    }

    #[test]
    fn parse_round_trip() {
        let parsed = parse(EXPECTED).unwrap();
        assert_eq!(parsed.len(), 5);
        let total: u64 = parsed.iter().map(|(_, c)| c).sum();
        assert_eq!(total, sample_profile().total_samples());
        let (frames, count) = &parsed[4];
        assert_eq!(*count, 5);
        assert_eq!(
            frames,
            &[
                "process 42 (python3 app.py)",
                "<module> (/srv/app.py:10)",
                "функция (/srv/модуль.py:7)"
            ]
        );
        // Each parsed stack is the rendering of a stack of the profile.
        let p = sample_profile();
        for (stack, count) in p.stacks.iter() {
            let rendered: Vec<String> = stack.iter().map(frame_text).collect();
            assert!(parsed.contains(&(rendered, *count)));
        }
    }

    #[test]
    fn escapes_control_characters_and_merges_collisions() {
        let mut p = Profile::new(100);
        p.add(vec![py("a\nb", "x\t.py", 1, 1)], 1);
        p.add(vec![py("a;b", "f.py", 2, 1)], 1);
        p.add(vec![py("a:b", "f.py", 2, 1)], 2);
        p.add(Vec::new(), 9);
        let mut out = Vec::new();
        write(&p, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, "a:b (f.py:2) 3\na\\nb (x\\t.py:1) 1\n");
        assert_eq!(parse(&text).unwrap().len(), 2);
    }

    #[test]
    fn parse_errors() {
        assert_eq!(parse("a;b\n"), Err(ParseError::MissingCount { line: 1 }));
        assert!(matches!(
            parse("a 1\n\na;b x\n"),
            Err(ParseError::BadCount { line: 3, .. })
        ));
        assert_eq!(parse(" 3"), Err(ParseError::EmptyStack { line: 1 }));
        assert_eq!(
            parse("a b;c 7").unwrap(),
            vec![(vec!["a b".into(), "c".into()], 7)]
        );
    }
}
