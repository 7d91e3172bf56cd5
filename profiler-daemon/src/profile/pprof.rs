//! pprof's gzipped `profile.proto`, readable by `go tool pprof`, Pyroscope,
//! Grafana, etc.
//!
//! One Function per distinct (name, filename, first line), one Location per
//! distinct (function, line); samples list location ids leaf first. Synthetic
//! frames (process roots, `[truncated]`, ...) are functions with an empty
//! filename. No mappings: locations are symbolic, `mapping_id` stays 0.
use std::collections::HashMap;
use std::io::Write as _;
use std::time::UNIX_EPOCH;

use flate2::{write::GzEncoder, Compression};
use prost::Message;

use super::{CompactProfile, Frame, Profile, ValueUnit};

/// The messages of pprof's profile.proto (`perftools.profiles`), fields 1-14
/// of `Profile`; later additions are not needed here.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
        #[prost(int64, tag = "3")]
        pub column: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

/// Interns strings, functions and locations, handing out pprof indices/ids.
#[derive(Default)]
struct Builder {
    out: proto::Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(String, String, u32), u64>,
    locations: HashMap<(u64, u32), u64>,
}

impl Builder {
    fn new() -> Self {
        let mut b = Builder::default();
        b.string(""); // index 0 must be "".
        b
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.out.string_table.len() as i64;
        self.out.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn value_type(&mut self, ty: &str, unit: &str) -> proto::ValueType {
        proto::ValueType {
            r#type: self.string(ty),
            unit: self.string(unit),
        }
    }

    fn location(&mut self, frame: &Frame) -> u64 {
        let (line, first_line) = match frame {
            Frame::Python {
                line, first_line, ..
            } => (*line, *first_line),
            _ => (frame.line().unwrap_or(0), 0),
        };
        let name = frame.function_name();
        let filename = frame.filename().unwrap_or("").to_string();
        let fkey = (name, filename, first_line);
        let function_id = match self.functions.get(&fkey) {
            Some(&id) => id,
            None => {
                let id = self.out.function.len() as u64 + 1;
                let function = proto::Function {
                    id,
                    name: self.string(&fkey.0),
                    system_name: 0,
                    filename: self.string(&fkey.1),
                    start_line: i64::from(first_line),
                };
                self.out.function.push(function);
                self.functions.insert(fkey, id);
                id
            }
        };
        *self
            .locations
            .entry((function_id, line))
            .or_insert_with(|| {
                let id = self.out.location.len() as u64 + 1;
                self.out.location.push(proto::Location {
                    id,
                    line: vec![proto::Line {
                        function_id,
                        line: i64::from(line),
                        column: 0,
                    }],
                    ..Default::default()
                });
                id
            })
    }
}

/// Saturating u64 -> i64 for counts and times.
fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `p` as a pprof message (ids and string indices as the module docs say).
pub fn build(p: &Profile) -> proto::Profile {
    build_compact(&CompactProfile::from(p))
}

/// [`build`] of a compact profile: each distinct frame becomes a location
/// once, and samples list them leaf first.
pub fn build_compact(p: &CompactProfile) -> proto::Profile {
    let mut b = Builder::new();
    // A CPU profile counts samples, each worth `period` ns of CPU; wall and
    // off-CPU profiles hold nanoseconds (the CPU sampling period is kept as
    // the profile's `period`, off-CPU intervals are weighted by their own).
    let unit = p.kind.unit();
    let period = to_i64(1_000_000_000 / u64::from(p.rate_hz.max(1)));
    let (sample_type, period_type) = match unit {
        ValueUnit::Samples => (
            vec![
                b.value_type("samples", "count"),
                b.value_type("cpu", "nanoseconds"),
            ],
            b.value_type("cpu", "nanoseconds"),
        ),
        ValueUnit::Nanoseconds => {
            let name = p.kind.name();
            (
                vec![b.value_type(name, "nanoseconds")],
                b.value_type(name, "nanoseconds"),
            )
        }
    };
    let locations: Vec<u64> = p.frames().iter().map(|f| b.location(f)).collect();
    let mut samples = Vec::with_capacity(p.stack_count());
    for (stack, count) in p.stacks() {
        let location_id = stack
            .ids()
            .iter()
            .rev()
            .filter_map(|&i| locations.get(i as usize).copied())
            .collect();
        let count = to_i64(count);
        let value = match unit {
            ValueUnit::Samples => vec![count, count.saturating_mul(period)],
            ValueUnit::Nanoseconds => vec![count],
        };
        samples.push(proto::Sample {
            location_id,
            value,
            label: Vec::new(),
        });
    }
    let time_nanos = p
        .start
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let mut out = b.out;
    out.sample_type = sample_type;
    out.sample = samples;
    out.period_type = Some(period_type);
    out.period = period;
    out.time_nanos = time_nanos;
    out.duration_nanos = i64::try_from(p.duration.as_nanos()).unwrap_or(i64::MAX);
    out
}

/// `p` as uncompressed profile.proto bytes.
pub fn encode(p: &Profile) -> Vec<u8> {
    build(p).encode_to_vec()
}

/// Write `p` as gzipped profile.proto, the on-disk form pprof expects.
pub fn write(p: &Profile, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let mut gz = GzEncoder::new(out, Compression::default());
    gz.write_all(&encode(p))?;
    gz.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::proto;
    use super::*;
    use crate::profile::folded::tests::sample_profile;
    use std::io::Read;

    fn decode_gz(bytes: &[u8]) -> (Vec<u8>, proto::Profile) {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .unwrap();
        let msg = proto::Profile::decode(&raw[..]).unwrap();
        (raw, msg)
    }

    /// The stack of a sample, root first, as "name file:line" strings.
    fn stack_of(m: &proto::Profile, s: &proto::Sample) -> Vec<String> {
        let st = |i: i64| m.string_table[i as usize].clone();
        s.location_id
            .iter()
            .rev()
            .map(|&id| {
                let loc = &m.location[id as usize - 1];
                assert_eq!(loc.id, id);
                assert_eq!(loc.line.len(), 1);
                let f = &m.function[loc.line[0].function_id as usize - 1];
                assert_eq!(f.id, loc.line[0].function_id);
                format!("{} {}:{}", st(f.name), st(f.filename), loc.line[0].line)
            })
            .collect()
    }

    #[test]
    fn gzip_round_trip() {
        let p = sample_profile();
        let mut out = Vec::new();
        write(&p, &mut out).unwrap();
        let (raw, m) = decode_gz(&out);
        assert_eq!(raw, encode(&p));

        assert_eq!(m.string_table[0], "");
        let st = |i: i64| m.string_table[i as usize].as_str();
        let types: Vec<_> = m
            .sample_type
            .iter()
            .map(|t| (st(t.r#type), st(t.unit)))
            .collect();
        assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
        let pt = m.period_type.as_ref().unwrap();
        assert_eq!((st(pt.r#type), st(pt.unit)), ("cpu", "nanoseconds"));
        assert_eq!(m.period, 10_000_000);
        assert_eq!(m.time_nanos, 1_700_000_000_000_000_000);
        assert_eq!(m.duration_nanos, 2_500_000_000);

        // Ids are dense from 1 and unique.
        for (i, f) in m.function.iter().enumerate() {
            assert_eq!(f.id, i as u64 + 1);
        }
        for (i, l) in m.location.iter().enumerate() {
            assert_eq!(l.id, i as u64 + 1);
        }

        let mut got: Vec<(Vec<String>, Vec<i64>)> = m
            .sample
            .iter()
            .map(|s| (stack_of(&m, s), s.value.clone()))
            .collect();
        got.sort();
        let ns = 10_000_000;
        let want: Vec<(Vec<&str>, Vec<i64>)> = vec![
            (
                vec![
                    "[partial stack: read failed] :0",
                    "worker /usr/lib/python3.11/threading.py:975",
                ],
                vec![1, ns],
            ),
            (
                vec![
                    "[truncated] :0",
                    "функция /srv/модуль.py:7",
                    "[unknown code object: stale] :0",
                ],
                vec![4, 4 * ns],
            ),
            (
                vec!["process 42 (python3 app.py) :0", "<module> /srv/app.py:10"],
                vec![2, 2 * ns],
            ),
            (
                vec![
                    "process 42 (python3 app.py) :0",
                    "<module> /srv/app.py:10",
                    "Klass.odd;name /srv/app.py:30",
                ],
                vec![3, 3 * ns],
            ),
            (
                vec![
                    "process 42 (python3 app.py) :0",
                    "<module> /srv/app.py:10",
                    "функция /srv/модуль.py:7",
                ],
                vec![5, 5 * ns],
            ),
        ];
        let want: Vec<(Vec<String>, Vec<i64>)> = want
            .into_iter()
            .map(|(s, v)| (s.into_iter().map(String::from).collect(), v))
            .collect();
        assert_eq!(got, want);

        // "функция" appears at line 7 in two stacks: one function, one location.
        let f: Vec<_> = m
            .function
            .iter()
            .filter(|f| st(f.name) == "функция")
            .collect();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].start_line, 5);
        assert_eq!(st(f[0].filename), "/srv/модуль.py");
        assert_eq!(m.function.len(), 8);
        assert_eq!(m.location.len(), 8);
    }

    #[test]
    fn leaf_first() {
        let m = build(&sample_profile());
        // The 5-sample stack is process -> <module> -> функция.
        let s = m.sample.iter().find(|s| s.value[0] == 5).unwrap();
        let leaf = &m.location[s.location_id[0] as usize - 1];
        let root = &m.location[*s.location_id.last().unwrap() as usize - 1];
        let name = |l: &proto::Location| {
            let f = &m.function[l.line[0].function_id as usize - 1];
            m.string_table[f.name as usize].clone()
        };
        assert_eq!(name(leaf), "функция");
        assert_eq!(name(root), "process 42 (python3 app.py)");
    }

    /// Minimal protobuf wire reader, independent of prost, to check the
    /// bytes follow the schema's tags.
    fn varint(buf: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = buf[0];
            *buf = &buf[1..];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
        }
        v
    }

    /// Top-level fields of a message: (field number, wire type, bytes, varint).
    fn fields(mut buf: &[u8]) -> Vec<(u64, u8, Vec<u8>, u64)> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let key = varint(&mut buf);
            let (field, wt) = (key >> 3, (key & 7) as u8);
            match wt {
                0 => out.push((field, wt, Vec::new(), varint(&mut buf))),
                2 => {
                    let len = varint(&mut buf) as usize;
                    out.push((field, wt, buf[..len].to_vec(), 0));
                    buf = &buf[len..];
                }
                _ => panic!("unexpected wire type {wt}"),
            }
        }
        out
    }

    #[test]
    fn wire_format_by_hand() {
        let raw = encode(&sample_profile());
        let top = fields(&raw);
        // string_table (6): first entry is the empty string, and the UTF-8
        // name is present verbatim.
        let strings: Vec<String> = top
            .iter()
            .filter(|f| f.0 == 6 && f.1 == 2)
            .map(|f| String::from_utf8(f.2.clone()).unwrap())
            .collect();
        assert_eq!(strings[0], "");
        assert!(strings.iter().any(|s| s == "функция"));
        // period (12) as a varint.
        assert!(top
            .iter()
            .any(|f| f.0 == 12 && f.1 == 0 && f.3 == 10_000_000));
        // Five samples (2); values (field 2 of Sample) are packed varints.
        let samples: Vec<_> = top.iter().filter(|f| f.0 == 2).collect();
        assert_eq!(samples.len(), 5);
        let mut counts = Vec::new();
        for s in samples {
            let packed = fields(&s.2)
                .into_iter()
                .find(|f| f.0 == 2 && f.1 == 2)
                .unwrap();
            let mut vals = Vec::new();
            let mut b = &packed.2[..];
            while !b.is_empty() {
                vals.push(varint(&mut b));
            }
            assert_eq!(vals[1], vals[0] * 10_000_000);
            counts.push(vals[0]);
        }
        counts.sort();
        assert_eq!(counts, [1, 2, 3, 4, 5]);
    }

    /// Wall and off-CPU profiles hold nanoseconds: one value per sample,
    /// typed by the profile's kind.
    #[test]
    fn nanosecond_profiles() {
        use crate::profile::ProfileKind;
        for kind in [ProfileKind::Wall, ProfileKind::OffCpu] {
            let mut p = Profile::of_kind(kind, 100);
            p.add(
                vec![
                    Frame::Python {
                        qualname: "handler".into(),
                        filename: "/srv/app.py".into(),
                        line: 12,
                        first_line: 10,
                    },
                    Frame::Kernel {
                        function: "do_nanosleep".into(),
                    },
                    Frame::GilWait,
                ],
                2_500_000,
            );
            let m = build(&p);
            let st = |i: i64| m.string_table[i as usize].as_str();
            let types: Vec<_> = m
                .sample_type
                .iter()
                .map(|t| (st(t.r#type), st(t.unit)))
                .collect();
            assert_eq!(types, [(kind.name(), "nanoseconds")]);
            let pt = m.period_type.as_ref().unwrap();
            assert_eq!((st(pt.r#type), st(pt.unit)), (kind.name(), "nanoseconds"));
            assert_eq!(m.period, 10_000_000);
            assert_eq!(m.sample.len(), 1);
            assert_eq!(m.sample[0].value, [2_500_000]);
            assert_eq!(
                stack_of(&m, &m.sample[0]),
                [
                    "handler /srv/app.py:12",
                    "[kernel] do_nanosleep :0",
                    "[waiting for the GIL] :0"
                ]
            );
        }
    }

    #[test]
    fn empty_profile() {
        let m = build(&Profile::new(0));
        assert!(m.sample.is_empty());
        assert_eq!(m.string_table[0], "");
        assert_eq!(m.period, 1_000_000_000);
        assert_eq!(m.time_nanos, 0);
    }
}
