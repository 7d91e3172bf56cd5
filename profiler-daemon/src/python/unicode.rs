//! Reading CPython `str` objects (PEP 393 layout) from target memory.
//!
//! Layout (64-bit, offsets per version in [`StrLayout`]): `length` (code
//! points) and `state` (only the low byte is meaningful: `interned:2`,
//! `kind:3`, `compact:1`, `ascii:1` in every supported version), then the
//! data: right after `PyASCIIObject` for compact ASCII, after
//! `PyCompactUnicodeObject` for other compact strings, or behind the pointer
//! there for legacy strings (e.g. instances of `str` subclasses).
//! `PyASCIIObject` lost its `wstr` in 3.12, which moved both data offsets.
use super::layout::StrLayout;
use crate::process::memory::{MemoryError, RemoteMemory};

/// Bytes read at once for the header: up to the end of
/// `PyCompactUnicodeObject` in every supported version.
const HEADER_READ: usize = 72;

/// Why a string could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StrError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("str at {addr:#x}: invalid kind {kind} (state byte {state:#04x})")]
    BadKind { addr: u64, kind: u8, state: u8 },
    #[error("str at {addr:#x}: length {len} is outside the accepted 0..={max} code points")]
    TooLong { addr: u64, len: i64, max: usize },
    #[error("str at {addr:#x}: the layout puts its header beyond {HEADER_READ} bytes")]
    BadLayout { addr: u64 },
}

/// Bytes per code point of the data (`PyUnicode_KIND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Latin-1 (also compact ASCII).
    One = 1,
    /// UCS-2, little-endian; may contain lone surrogates.
    Two = 2,
    /// UCS-4, little-endian.
    Four = 4,
}

impl Kind {
    pub fn from_bits(kind: u8) -> Option<Kind> {
        match kind {
            1 => Some(Kind::One),
            2 => Some(Kind::Two),
            4 => Some(Kind::Four),
            _ => None,
        }
    }

    pub fn width(self) -> usize {
        self as usize
    }
}

/// Decode string data of `kind`. Code points that are not Unicode scalar
/// values (surrogates, > U+10FFFF) and a trailing partial unit become U+FFFD:
/// a name with a lone surrogate is still worth showing.
pub fn decode_units(kind: Kind, bytes: &[u8]) -> String {
    let w = kind.width();
    let chunks = bytes.chunks_exact(w);
    let partial = !chunks.remainder().is_empty();
    let mut out = String::with_capacity(bytes.len() / w + 3 * usize::from(partial));
    for c in chunks {
        let cp = match kind {
            Kind::One => u32::from(c[0]),
            Kind::Two => u32::from(u16::from_le_bytes([c[0], c[1]])),
            Kind::Four => u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
        };
        out.push(char::from_u32(cp).unwrap_or(char::REPLACEMENT_CHARACTER));
    }
    if partial {
        out.push(char::REPLACEMENT_CHARACTER);
    }
    out
}

/// Read the `str` object at `addr`, laid out as `l` says. Its `ob_type` is
/// not checked: callers reach strings through fields of objects they already
/// validated. Longer than `max_len` code points is an error, never a silent
/// truncation.
pub fn read_str(
    mem: &dyn RemoteMemory,
    addr: u64,
    max_len: usize,
    l: &StrLayout,
) -> Result<String, StrError> {
    // The length and state words; every layout keeps them in the header.
    let head =
        usize::try_from(l.length.max(l.state) + 8).map_or(HEADER_READ, |n| n.min(HEADER_READ));
    let mut buf = [0u8; HEADER_READ];
    let hdr = &mut buf[..head];
    mem.read(addr, hdr)?;
    let word = |off: u64| -> Option<[u8; 8]> {
        let o = usize::try_from(off).ok()?;
        hdr.get(o..o + 8)?.try_into().ok()
    };
    let (Some(len_bytes), Some(state_bytes)) = (word(l.length), word(l.state)) else {
        return Err(StrError::BadLayout { addr });
    };
    let len = i64::from_le_bytes(len_bytes);
    let state = state_bytes[0];
    let kind_bits = (state >> 2) & 7;
    let compact = (state >> 5) & 1 == 1;
    let ascii = (state >> 6) & 1 == 1;

    let kind = Kind::from_bits(kind_bits).ok_or(StrError::BadKind {
        addr,
        kind: kind_bits,
        state,
    })?;
    // An ASCII string of another kind is a corrupt or misread header.
    if ascii && kind != Kind::One {
        return Err(StrError::BadKind {
            addr,
            kind: kind_bits,
            state,
        });
    }
    let n = usize::try_from(len)
        .ok()
        .filter(|&n| n <= max_len)
        .ok_or(StrError::TooLong {
            addr,
            len,
            max: max_len,
        })?;
    let data = match (compact, ascii) {
        (true, true) => addr.wrapping_add(l.ascii_data),
        (true, false) => addr.wrapping_add(l.compact_data),
        (false, _) => mem.read_u64(addr.wrapping_add(l.compact_data))?,
    };
    // n <= max_len, so this only overflows for absurd limits.
    let size = n.checked_mul(kind.width()).ok_or(StrError::TooLong {
        addr,
        len,
        max: max_len,
    })?;
    let bytes = mem.read_vec(data, size)?;
    Ok(decode_units(kind, &bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::SliceMemory;
    use crate::python::layout::Minor;
    use crate::python::test_python::{self, TestPython};

    #[test]
    fn decode_kinds() {
        assert_eq!(decode_units(Kind::One, b"caf\xe9"), "café");
        let ucs2: Vec<u8> = "функция"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(decode_units(Kind::Two, &ucs2), "функция");
        let ucs4: Vec<u8> = "𠀀x"
            .chars()
            .flat_map(|c| (c as u32).to_le_bytes())
            .collect();
        assert_eq!(decode_units(Kind::Four, &ucs4), "𠀀x");
        // Lone surrogate, beyond U+10FFFF, and a trailing partial unit.
        assert_eq!(
            decode_units(Kind::Two, &[0x00, 0xd8, 0x41, 0x00, 0x42]),
            "\u{fffd}A\u{fffd}"
        );
        assert_eq!(
            decode_units(Kind::Four, &[0x00, 0x00, 0x11, 0x00, 0x41, 0, 0, 0]),
            "\u{fffd}A"
        );
        assert_eq!(decode_units(Kind::Four, &[]), "");
    }

    /// One string object as Python laid it out in memory.
    struct Sample {
        expect: String,
        addr: u64,
        obj: Vec<u8>,
        data: Option<(u64, Vec<u8>)>,
    }

    /// Prints, for each string, its object bytes and (for legacy strings) the
    /// separately allocated data. `expect` has lone surrogates replaced by
    /// U+FFFD, which is what `read_str` must return.
    const DUMP: &str = r#"
import ctypes, json, sys
class S(str): pass
strings = ["plain", "café", "функция", "函数", "𠀀x", "", "x" * 10000,
           "ü" * 5000 + "€", "a\ud800b", "\U0001F600\udfff", "\xff",
           S("legacy"), S("légacy"), S("функция"), S("𠀀")]
out = []
for s in strings:
    rec = {"expect": "".join("\ufffd" if 0xd800 <= ord(c) < 0xe000 else c for c in s),
           "addr": id(s)}
    if type(s) is str:
        rec["obj"] = ctypes.string_at(id(s), sys.getsizeof(s)).hex()
    else:
        rec["obj"] = ctypes.string_at(id(s), 80).hex()
        ptr = ctypes.c_void_p.from_address(id(s) + COMPACT).value
        kind = (ctypes.c_uint8.from_address(id(s) + STATE).value >> 2) & 7
        rec["data_addr"] = ptr
        rec["data"] = ctypes.string_at(ptr, (len(s) + 1) * kind).hex()
    out.append(rec)
print(json.dumps(out))
"#;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// The strings of [`DUMP`], as `python` lays them out.
    fn samples_of(python: &TestPython) -> Vec<Sample> {
        let l = python.minor.header_layout().string;
        let script = format!("COMPACT = {}\nSTATE = {}\n{DUMP}", l.compact_data, l.state);
        let out = python
            .command()
            .args(["-c", &script])
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v.as_array()
            .expect("array")
            .iter()
            .map(|r| Sample {
                expect: r["expect"].as_str().expect("expect").to_owned(),
                addr: r["addr"].as_u64().expect("addr"),
                obj: unhex(r["obj"].as_str().expect("obj")),
                data: r["data_addr"]
                    .as_u64()
                    .map(|a| (a, unhex(r["data"].as_str().expect("data")))),
            })
            .collect()
    }

    /// The host 3.11's strings, for the tests of error paths.
    fn samples() -> Vec<Sample> {
        samples_of(&test_python::all()[0])
    }

    fn l311() -> StrLayout {
        Minor::V3_11.header_layout().string
    }

    fn memory(s: &Sample, obj: Vec<u8>) -> SliceMemory {
        let mut m = SliceMemory::new();
        m.add(s.addr, obj);
        if let Some((a, d)) = &s.data {
            m.add(*a, d.clone());
        }
        m
    }

    /// Every interpreter's own string objects, read with its version's
    /// layout.
    #[test]
    fn round_trips_real_string_objects() {
        for python in test_python::all() {
            let l = python.minor.header_layout().string;
            let samples = samples_of(&python);
            let mut kinds = [0usize; 5];
            let mut legacy = 0;
            for s in &samples {
                let m = memory(s, s.obj.clone());
                let got = read_str(&m, s.addr, 100_000, &l)
                    .unwrap_or_else(|e| panic!("{}: {:?}: {e}", python.label, s.expect));
                assert_eq!(got, s.expect, "{}", python.label);
                kinds[usize::from((s.obj[l.state as usize] >> 2) & 7)] += 1;
                legacy += usize::from(s.data.is_some());
            }
            // The corpus covers every kind and the legacy layout.
            assert!(kinds[1] > 0 && kinds[2] > 0 && kinds[4] > 0, "{kinds:?}");
            assert!(legacy >= 3);
            println!(
                "unicode: {} real str objects round-tripped ({legacy} legacy) in {}",
                samples.len(),
                python.label
            );
        }
    }

    #[test]
    fn too_long_is_an_error_with_the_length() {
        let samples = samples();
        let s = samples
            .iter()
            .find(|s| s.expect.len() == 10_000)
            .expect("10k string");
        let m = memory(s, s.obj.clone());
        assert_eq!(
            read_str(&m, s.addr, 10_000, &l311()).expect("fits").len(),
            10_000
        );
        let err = read_str(&m, s.addr, 9_999, &l311()).expect_err("too long");
        assert!(matches!(
            err,
            StrError::TooLong {
                len: 10_000,
                max: 9_999,
                ..
            }
        ));
        assert!(err.to_string().contains("10000"), "{err}");
        // Negative length (corrupt header) is refused the same way.
        let mut obj = s.obj.clone();
        obj[16..24].copy_from_slice(&(-5i64).to_le_bytes());
        let m = memory(s, obj);
        assert!(matches!(
            read_str(&m, s.addr, 100, &l311()),
            Err(StrError::TooLong { len: -5, .. })
        ));
    }

    #[test]
    fn bad_kind_and_unreadable() {
        let samples = samples();
        let s = samples.iter().find(|s| s.expect == "plain").expect("plain");
        for kind in [0u8, 3, 5, 7] {
            let mut obj = s.obj.clone();
            obj[32] = (obj[32] & !(7 << 2)) | (kind << 2);
            let m = memory(s, obj);
            assert!(
                matches!(read_str(&m, s.addr, 100, &l311()), Err(StrError::BadKind { kind: k, .. }) if k == kind),
                "kind {kind}"
            );
        }
        // ASCII flag with kind 2 is inconsistent.
        let mut obj = s.obj.clone();
        obj[32] = (obj[32] & !(7 << 2)) | (2 << 2);
        assert!(matches!(
            read_str(&memory(s, obj), s.addr, 100, &l311()),
            Err(StrError::BadKind { kind: 2, .. })
        ));
        // Garbage in the upper 24 bits of `state` is ignored.
        let mut obj = s.obj.clone();
        obj[33..36].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert_eq!(
            read_str(&memory(s, obj), s.addr, 100, &l311()).expect("read"),
            "plain"
        );
        // Header readable, data not (length points past the region).
        let mut obj = s.obj[..l311().ascii_data as usize].to_vec();
        obj[16..24].copy_from_slice(&64i64.to_le_bytes());
        assert!(matches!(
            read_str(&memory(s, obj), s.addr, 100, &l311()),
            Err(StrError::Memory(_))
        ));
        assert!(matches!(
            read_str(&SliceMemory::new(), 0x1000, 100, &l311()),
            Err(StrError::Memory(_))
        ));
    }
}
