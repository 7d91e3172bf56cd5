//! CPython `co_linetable` decoding (the format of 3.11 to 3.15): instruction
//! index -> line number.
//!
//! The table comes from target memory, so it is untrusted: every byte is
//! bounds-checked, varints are capped, and line arithmetic is done in i64 and
//! range-checked. A malformed table yields `None` from the point it breaks.
//!
//! Each entry is a header byte (bit 7 set) `1 cccc lll`: code `c`, covering
//! `l + 1` code units, followed by data bytes (bit 7 clear). Like CPython's
//! own `advance()` (codeobject.c), only the line delta is parsed; the rest of
//! the entry is skipped by scanning to the next header byte.

/// Varints longer than this many bytes are malformed (CPython writes at most
/// 6 bytes for a 32-bit value; shifts past that would overflow).
const MAX_VARINT_BYTES: u32 = 6;
/// `co_firstlineno` and line numbers are C `int`s.
const MAX_LINE: i64 = i32::MAX as i64;

const CODE_NO_LINE: u8 = 15;
const CODE_LONG: u8 = 14;
const CODE_NO_COLUMNS: u8 = 13;
const CODE_ONE_LINE0: u8 = 10;
const CODE_ONE_LINE2: u8 = 12;

/// Decoder state: position in the table, current line, end of the last
/// entry. Plain loops and indexing, no iterator adapters: `line_for_instr`
/// is O(table) per call and debug-build tests call it millions of times.
struct Decoder<'a> {
    table: &'a [u8],
    pos: usize,
    line: i64,
    addr: u64,
}

impl<'a> Decoder<'a> {
    fn new(table: &'a [u8], first_line: u32) -> Self {
        Decoder {
            table,
            pos: 0,
            line: i64::from(first_line),
            addr: 0,
        }
    }

    /// Signed varint at `pos`, or `None` if truncated or too long.
    fn svarint(&self, mut pos: usize) -> Option<i64> {
        let t = self.table;
        let mut b = *t.get(pos)?;
        let mut v = u64::from(b & 63);
        let mut shift = 0u32;
        while b & 64 != 0 {
            shift += 6;
            pos += 1;
            // Data bytes never have bit 7 set: one that does ends the entry.
            if shift >= 6 * MAX_VARINT_BYTES || pos >= t.len() || t[pos] & 128 != 0 {
                return None;
            }
            b = t[pos];
            v |= u64::from(b & 63) << shift;
        }
        // v < 2^36, so the casts are exact.
        Some(if v & 1 != 0 {
            -((v >> 1) as i64)
        } else {
            (v >> 1) as i64
        })
    }

    /// Decode the next entry: returns its end address (exclusive) and its
    /// line (`None` for code 15), or `None` at the end or on a malformed
    /// table (after which it stays at the end).
    fn next_entry(&mut self) -> Option<(u64, Option<i64>)> {
        let t = self.table;
        if self.pos >= t.len() {
            return None;
        }
        let head = t[self.pos];
        let code = (head >> 3) & 15;
        // Only the first byte can lack bit 7: later entries are found by
        // scanning for it.
        let delta = if head & 128 == 0 {
            None
        } else if code == CODE_LONG || code == CODE_NO_COLUMNS {
            self.svarint(self.pos + 1)
        } else if (CODE_ONE_LINE0..=CODE_ONE_LINE2).contains(&code) {
            Some(i64::from(code - CODE_ONE_LINE0))
        } else {
            Some(0)
        };
        // |delta| < 2^35 per entry, so overflow needs > 2^28 entries; checked anyway.
        let Some(line) = delta.and_then(|d| self.line.checked_add(d)) else {
            self.pos = t.len();
            return None;
        };
        self.line = line;
        self.addr += u64::from(head & 7) + 1;
        // Skip the entry's data bytes, as CPython does.
        self.pos += 1;
        while self.pos < t.len() && t[self.pos] & 128 == 0 {
            self.pos += 1;
        }
        Some((self.addr, (code != CODE_NO_LINE).then_some(line)))
    }
}

/// A decoded line as the caller sees it: `None` outside `0..=i32::MAX`.
fn valid_line(line: Option<i64>) -> Option<u32> {
    line.filter(|l| (0..=MAX_LINE).contains(l))
        .and_then(|l| u32::try_from(l).ok())
}

/// Line of code unit `instr` (as in `frame.f_lineno`): `first_line` for -1
/// (frame not started), `None` for a unit with no line, an index past the
/// table, or a malformed table.
pub fn line_for_instr(linetable: &[u8], first_line: u32, instr: i64) -> Option<u32> {
    if instr == -1 {
        return Some(first_line);
    }
    let instr = u64::try_from(instr).ok()?;
    let mut d = Decoder::new(linetable, first_line);
    while let Some((end, line)) = d.next_entry() {
        if instr < end {
            return valid_line(line);
        }
    }
    None
}

/// Lines of code units `0..n_units` in one pass (`line_for_instr` is O(table)
/// per call). Allocates `n_units` entries: the caller bounds it.
pub fn lines_for_all(linetable: &[u8], first_line: u32, n_units: usize) -> Vec<Option<u32>> {
    let mut out = Vec::with_capacity(n_units);
    let mut d = Decoder::new(linetable, first_line);
    while out.len() < n_units {
        let Some((end, line)) = d.next_entry() else {
            break;
        };
        let line = valid_line(line);
        while (out.len() as u64) < end && out.len() < n_units {
            out.push(line);
        }
    }
    out.resize(n_units, None);
    out
}

/// A code object's line table decoded once, for the symbol cache: sorted
/// ranges of code units, each with one line (consecutive entries on the same
/// line merged), answered by binary search instead of a scan of the table.
///
/// Only units `0..n_units` are kept (callers clamp into that range). A
/// malformed table ends in a range without a line, so answers equal
/// [`line_for_instr`] on every unit. Ranges are 4 bytes when the code's units
/// and its spread of lines fit 16 bits (every code object of the standard
/// library), 8 bytes otherwise; the raw table is about four times larger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineTable {
    /// Added to narrow lines.
    base: u32,
    ranges: Ranges,
}

/// `(first unit, line)` ranges, sorted, the first one at unit 0.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ranges {
    /// Line minus `base`; `u16::MAX` for none.
    Narrow(Box<[(u16, u16)]>),
    /// Absolute line; `u32::MAX` (above any valid line) for none.
    Wide(Box<[(u32, u32)]>),
}

impl LineTable {
    /// Decodes `linetable` for units `0..n_units`.
    pub fn decode(linetable: &[u8], first_line: u32, n_units: u32) -> LineTable {
        let n = u64::from(n_units);
        let mut ranges: Vec<(u32, Option<u32>)> = Vec::new();
        let mut d = Decoder::new(linetable, first_line);
        let mut start = 0u64;
        while start < n {
            let Some((end, line)) = d.next_entry() else {
                break;
            };
            let line = valid_line(line);
            if ranges.last().map(|r| r.1) != Some(line) {
                // start < n <= u32::MAX.
                ranges.push((start as u32, line));
            }
            start = end;
        }
        if start < n && ranges.last().is_some_and(|r| r.1.is_some()) {
            // The table stops short of the code (or breaks): no line after.
            ranges.push((start as u32, None));
        }
        let lines = ranges.iter().filter_map(|r| r.1);
        let (lo, hi) = lines.fold((u32::MAX, 0), |(lo, hi), l| (lo.min(l), hi.max(l)));
        let base = if lo > hi { 0 } else { lo };
        let narrow = n_units <= 1 << 16 && hi.saturating_sub(base) < u32::from(u16::MAX);
        let ranges = if narrow {
            // Starts are < n_units <= 2^16 and offsets < u16::MAX: no truncation.
            Ranges::Narrow(
                ranges
                    .iter()
                    .map(|&(s, l)| (s as u16, l.map_or(u16::MAX, |l| (l - base) as u16)))
                    .collect(),
            )
        } else {
            Ranges::Wide(
                ranges
                    .iter()
                    .map(|&(s, l)| (s, l.unwrap_or(u32::MAX)))
                    .collect(),
            )
        };
        LineTable { base, ranges }
    }

    /// Line of code unit `unit` (`< n_units` given to [`LineTable::decode`];
    /// a larger one gets the last range's answer).
    pub fn line(&self, unit: u32) -> Option<u32> {
        match &self.ranges {
            Ranges::Narrow(r) => {
                let i = r.partition_point(|&(s, _)| u32::from(s) <= unit);
                let (_, l) = *r.get(i.checked_sub(1)?)?;
                (l != u16::MAX).then(|| self.base + u32::from(l))
            }
            Ranges::Wide(r) => {
                let i = r.partition_point(|&(s, _)| s <= unit);
                let (_, l) = *r.get(i.checked_sub(1)?)?;
                (l != u32::MAX).then_some(l)
            }
        }
    }

    /// Heap bytes held (the struct itself is not counted).
    pub fn heap_bytes(&self) -> usize {
        match &self.ranges {
            Ranges::Narrow(r) => std::mem::size_of_val::<[(u16, u16)]>(r),
            Ranges::Wide(r) => std::mem::size_of_val::<[(u32, u32)]>(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::test_python::{self, TestPython};
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    /// Entry header byte.
    fn h(code: u8, units: u8) -> u8 {
        0x80 | (code << 3) | (units - 1)
    }

    #[test]
    fn hand_built_table() {
        // 2 units at first line (code 10 + column bytes), 1 unit line+2
        // (code 12), 3 units with no line, 2 units line-3 (code 13: svarint 7 = -3),
        // 1 unit line+100 (code 14: svarint 200 = 8 + 3*64, then 3 varints).
        let t = [
            h(10, 2),
            1,
            2,
            h(12, 1),
            0,
            0,
            h(15, 3),
            h(13, 2),
            7,
            h(14, 1),
            0x48,
            3,
            0,
            1,
            2,
        ];
        let want = [
            Some(10),
            Some(10),
            Some(12),
            None,
            None,
            None,
            Some(9),
            Some(9),
            Some(109),
        ];
        for (i, w) in want.iter().enumerate() {
            assert_eq!(line_for_instr(&t, 10, i as i64), *w, "unit {i}");
        }
        assert_eq!(lines_for_all(&t, 10, want.len()), want);
        assert_eq!(line_for_instr(&t, 10, -1), Some(10));
        assert_eq!(line_for_instr(&t, 10, want.len() as i64), None);
        assert_eq!(line_for_instr(&t, 10, -2), None);
        assert_eq!(line_for_instr(&t, 10, i64::MAX), None);
        assert_eq!(line_for_instr(&t, 10, i64::MIN), None);
        assert_eq!(line_for_instr(&[], 10, -1), Some(10));
        assert_eq!(line_for_instr(&[], 10, 0), None);
        // More units asked for than the table covers: padded with None.
        assert_eq!(lines_for_all(&t, 10, 11)[9..], [None, None]);
        assert_eq!(lines_for_all(&t, 10, 1), [Some(10)]);
        // Decoded once: same answers, consecutive same-line entries merged,
        // a trailing range without a line where the table stops short.
        let lt = LineTable::decode(&t, 10, 11);
        let got: Vec<_> = (0..11).map(|i| lt.line(i)).collect();
        assert_eq!(got, lines_for_all(&t, 10, 11));
        assert_eq!(
            lt.ranges,
            Ranges::Narrow(
                [
                    (0, 1),
                    (2, 3),
                    (3, u16::MAX),
                    (6, 0),
                    (8, 100),
                    (9, u16::MAX)
                ]
                .into()
            )
        );
        assert_eq!(lt.base, 9);
        // Units past the code are cut off: no trailing range.
        let lt = LineTable::decode(&t, 10, 3);
        assert_eq!(lt.ranges, Ranges::Narrow([(0, 0), (2, 2)].into()));
        assert_eq!(LineTable::decode(&[], 10, 5).line(0), None);
    }

    #[test]
    fn wide_line_tables() {
        // Line +100000 (svarint 200000: 6-bit groups 0, 53, 48).
        let t = [h(0, 2), 0, h(14, 1), 0x40, 0x75, 0x30, 0, 1, 2, h(0, 1), 0];
        let want = [Some(5), Some(5), Some(100_005), Some(100_005)];
        let lt = LineTable::decode(&t, 5, 4);
        assert!(matches!(lt.ranges, Ranges::Wide(_)), "{lt:?}");
        for (i, w) in want.iter().enumerate() {
            assert_eq!(line_for_instr(&t, 5, i as i64), *w, "unit {i}");
            assert_eq!(lt.line(i as u32), *w, "unit {i}");
        }
        // More than 2^16 units: wide starts.
        let long: Vec<u8> = (0..10_000).flat_map(|_| [h(0, 8), 0]).collect();
        let lt = LineTable::decode(&long, 1, 80_000);
        assert!(matches!(lt.ranges, Ranges::Wide(_)), "{lt:?}");
        assert_eq!(lt.line(79_999), Some(1));
        assert_eq!(lt.heap_bytes(), 8, "one merged range");
        assert_eq!(LineTable::decode(&long, 1, 100).heap_bytes(), 4);
    }

    #[test]
    fn code_15_keeps_the_line() {
        // Line +5, no line, then a same-line entry: line stays first+5.
        let t = [h(13, 1), 10, h(15, 1), h(0, 1), 0];
        assert_eq!(lines_for_all(&t, 1, 3), [Some(6), None, Some(6)]);
    }

    #[test]
    fn absurd_lines_are_none() {
        // Line goes negative: -(2^35-1) from svarint of 6 bytes of 63.
        let neg = [h(13, 1), 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x3f];
        assert_eq!(line_for_instr(&neg, 1, 0), None);
        // Beyond i32::MAX.
        let big = [h(13, 1), 0x7e, 0x7f, 0x7f, 0x7f, 0x7f, 0x3f];
        assert_eq!(line_for_instr(&big, 1, 0), None);
        // A 7-byte varint is malformed.
        let long = [h(13, 1), 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0];
        assert_eq!(line_for_instr(&long, 1, 0), None);
        // Truncated varint.
        assert_eq!(line_for_instr(&[h(13, 1), 0x42], 1, 0), None);
        assert_eq!(line_for_instr(&[h(14, 1)], 1, 0), None);
        // First byte is not a header.
        assert_eq!(line_for_instr(&[0x10, h(0, 1), 0], 1, 0), None);
    }

    /// xorshift64: no rand crate needed for a robustness loop.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_and_truncated_tables_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut checked = 0u64;
        for round in 0..5_000 {
            let len = (rng.next() % 64) as usize;
            let mut t: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if round % 2 == 0 {
                // Mostly well-formed-looking: headers with bit 7 and varints.
                for (i, b) in t.iter_mut().enumerate() {
                    if i % 3 == 0 {
                        *b |= 0x80;
                    } else {
                        *b &= 0x7f;
                    }
                }
            }
            let first = rng.next() as u32;
            let all = lines_for_all(&t, first, 600);
            assert_eq!(all.len(), 600);
            let lt = LineTable::decode(&t, first, 600);
            for (i, want) in all.iter().enumerate() {
                assert_eq!(lt.line(i as u32), *want, "unit {i} of {t:?}");
            }
            for cut in 0..=t.len() {
                let lt = LineTable::decode(&t[..cut], first, 600);
                for instr in [-1, 0, 1, 7, 63, 599, 1 << 40] {
                    let got = line_for_instr(&t[..cut], first, instr);
                    if cut == t.len() && (0..600).contains(&instr) {
                        assert_eq!(got, all[instr as usize]);
                    }
                    if (0..600).contains(&instr) {
                        assert_eq!(
                            lt.line(instr as u32),
                            got,
                            "unit {instr} of {:?}",
                            &t[..cut]
                        );
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 100_000);
    }

    /// One code object from `tests/tools/linetable_truth.py`.
    #[derive(serde::Deserialize)]
    struct Truth {
        first: u32,
        table: String,
        n: usize,
        lines: Vec<Option<u32>>,
    }

    /// `line_for_instr` is O(table) per call, so checking it on every unit is
    /// quadratic: ~2*10^9 steps for the stdlib, about a minute in a debug
    /// build. Debug builds check it on every unit of objects under this
    /// `units * table bytes` budget (most objects) and on a sample of the
    /// rest; release builds, or PYEBPF_LINETABLE_EXHAUSTIVE=1, on all units.
    /// `lines_for_all` (same decoder) is checked on every unit regardless.
    const DEBUG_BUDGET: usize = 50_000;

    fn units_to_check(n: usize, table_len: usize, exhaustive: bool, rng: &mut Rng) -> Vec<usize> {
        if exhaustive || n.saturating_mul(table_len) <= DEBUG_BUDGET {
            return (0..n).collect();
        }
        let mut v: Vec<usize> = (0..8.min(n)).collect();
        v.push(n - 1);
        v.extend((0..8).map(|_| (rng.next() % n as u64) as usize));
        v
    }

    /// Every code object of the standard library of one interpreter of each
    /// version, against `co_positions()` of the interpreter that compiled it.
    #[test]
    fn matches_cpython_on_stdlib() {
        let mut seen = Vec::new();
        for python in test_python::all() {
            if !seen.contains(&python.minor) {
                seen.push(python.minor);
                matches_cpython_on_stdlib_of(&python);
            }
        }
    }

    fn matches_cpython_on_stdlib_of(python: &TestPython) {
        let exhaustive = !cfg!(debug_assertions)
            || std::env::var_os("PYEBPF_LINETABLE_EXHAUSTIVE").is_some_and(|v| v == "1");
        let source = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/tools/linetable_truth.py"
        ))
        .expect("read linetable_truth.py");
        let script = python.share("linetable_truth.py", &source);
        let mut child = python
            .command()
            .arg(script)
            .stdout(Stdio::piped())
            .spawn()
            .expect("run linetable_truth.py");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let (mut objects, mut units, mut no_line, mut done) = (0u64, 0u64, 0u64, None);
        let (mut instr_units, mut instr_full) = (0u64, 0u64);
        let (mut table_bytes, mut decoded_bytes) = (0u64, 0u64);
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read truth stream");
            if line.starts_with("{\"done\"") {
                let v: serde_json::Value = serde_json::from_str(&line).expect("json");
                done = v["done"].as_u64();
                continue;
            }
            let t: Truth = serde_json::from_str(&line).expect("json line");
            let table: Vec<u8> = (0..t.table.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&t.table[i..i + 2], 16).expect("hex"))
                .collect();
            assert_eq!(t.lines.len(), t.n);
            let all = lines_for_all(&table, t.first, t.n);
            assert_eq!(all, t.lines, "lines_for_all, object {objects}: {line}");
            // The decoded-once table of the symbol cache, on every unit.
            let n_units = u32::try_from(t.n).expect("units fit u32");
            let lt = LineTable::decode(&table, t.first, n_units);
            for (i, want) in all.iter().enumerate() {
                assert_eq!(
                    lt.line(i as u32),
                    *want,
                    "LineTable unit {i} of object {objects}"
                );
            }
            table_bytes += table.len() as u64;
            decoded_bytes += lt.heap_bytes() as u64;
            let check = units_to_check(t.n, table.len(), exhaustive, &mut rng);
            instr_full += u64::from(check.len() == t.n);
            for &i in &check {
                let got = line_for_instr(&table, t.first, i as i64);
                assert_eq!(got, t.lines[i], "unit {i} of object {objects}: {line}");
            }
            instr_units += check.len() as u64;
            assert_eq!(line_for_instr(&table, t.first, -1), Some(t.first));
            assert_eq!(line_for_instr(&table, t.first, t.n as i64), None);
            no_line += t.lines.iter().filter(|l| l.is_none()).count() as u64;
            units += t.n as u64;
            objects += 1;
        }
        let status = child.wait().expect("wait for python");
        assert!(status.success(), "linetable_truth.py failed: {status}");
        assert_eq!(done, Some(objects), "truth stream cut short");
        println!(
            "linetable ({}): {objects} code objects, {units} code units ({no_line} without a line) \
             checked with lines_for_all; line_for_instr checked on {instr_units} units, \
             every unit of {instr_full} objects (exhaustive: {exhaustive}); LineTable \
             checked on every unit, {:.1} bytes per object decoded vs {:.1} raw",
            python.label,
            decoded_bytes as f64 / objects.max(1) as f64,
            table_bytes as f64 / objects.max(1) as f64,
        );
        assert!(objects > 1000, "only {objects} code objects checked");
        assert!(instr_full > 1000, "only {instr_full} objects fully checked");
        assert!(no_line > 0, "corpus never exercised code 15");
    }
}
