//! Reading CPython code objects (`PyCodeObject`) from target memory.
//!
//! Everything read here is untrusted: the address comes from a BPF sample and
//! the object may have been freed and reused since. `ob_type` must be
//! `PyCode_Type`, sizes are bounded, and the checksum lets the caller compare
//! with the one BPF computed at sample time. Offsets come from the process's
//! [`Layout`](super::layout::Layout).
use std::sync::Arc;

use profiler_common::{code_checksum, words_of, CODE_READ_LEN, CODE_READ_START, CODE_READ_WORDS};

use super::layout::{BytesLayout, CodeLayout, Layout, StrLayout};
use super::linetable::LineTable;
use super::unicode::{read_str, StrError};
use crate::process::memory::{MemoryError, RemoteMemory};

/// Most bytes of a code object's header read at once (`co_code_adaptive` is
/// at 184 to 208 in the supported versions).
pub const HEADER_MAX: usize = 256;
/// Longest name or file name accepted, in code points.
pub const NAME_MAX: usize = 4096;
/// Largest `co_linetable` accepted, in bytes.
pub const LINETABLE_MAX: usize = 1 << 20;
/// Largest code object accepted, in code units.
pub const UNITS_MAX: i64 = 10_000_000;

/// What reading one process's code objects needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeFormat {
    /// Address of `PyCode_Type` in the target.
    pub pycode_type: u64,
    pub code: CodeLayout,
    pub string: StrLayout,
    pub bytes: BytesLayout,
}

impl CodeFormat {
    pub fn new(pycode_type: u64, layout: &Layout) -> CodeFormat {
        CodeFormat {
            pycode_type,
            code: layout.code,
            string: layout.string,
            bytes: layout.bytes,
        }
    }

    /// Bytes of the header read: through the first code unit, which every
    /// code object has.
    fn header_len(&self) -> usize {
        usize::try_from(self.code.adaptive + 8).map_or(HEADER_MAX, |n| n.min(HEADER_MAX))
    }
}

/// A symbolised code object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeInfo {
    pub qualname: Arc<str>,
    pub filename: Arc<str>,
    pub first_line: u32,
    /// `ob_size`: bytecode length in 2-byte code units.
    pub n_units: u32,
    /// `co_linetable`, decoded once when the object is read: symbolising a
    /// frame is then a binary search, not a scan of the table.
    pub lines: LineTable,
    /// [`code_checksum`] of the header as read now.
    pub checksum: u32,
}

impl CodeInfo {
    /// Line of instruction `instr` (code units; -1 = frame not started).
    /// Clamped into `[-1, n_units)` first: a frame being pushed can carry a
    /// stale `prev_instr`.
    pub fn line_for(&self, instr: i32) -> Option<u32> {
        let last = i64::from(self.n_units) - 1;
        let i = i64::from(instr).clamp(-1, last.max(-1));
        // -1 is "not started": the first line, as `line_for_instr` answers.
        match u32::try_from(i) {
            Ok(unit) => self.lines.line(unit),
            Err(_) => Some(self.first_line),
        }
    }
}

/// Why a code object could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// Target memory unreadable (process gone, page not mapped...).
    #[error("cannot read {what} of code object {addr:#x}: {source}")]
    Memory {
        addr: u64,
        what: &'static str,
        #[source]
        source: MemoryError,
    },
    /// Not (or no longer) a code object.
    #[error("{addr:#x} is not a code object (ob_type {found:#x}, PyCode_Type is {expected:#x})")]
    NotCode {
        addr: u64,
        found: u64,
        expected: u64,
    },
    /// A code object whose fields are out of range or inconsistent.
    #[error("code object {addr:#x}: invalid {what}: {detail}")]
    Invalid {
        addr: u64,
        what: &'static str,
        detail: String,
    },
}

impl CodeError {
    /// True when the memory could not be read, as opposed to read and found
    /// wrong: the former may succeed later or say the process is gone.
    pub fn is_unreadable(&self) -> bool {
        matches!(self, CodeError::Memory { .. })
    }
}

/// The bytes at `off..off + N` of `b`, or zeros past its end (a layout that
/// puts a field beyond the header read is caught as invalid by its caller).
fn bytes_at<const N: usize>(b: &[u8], off: u64) -> [u8; N] {
    let mut w = [0u8; N];
    if let Some(src) = usize::try_from(off)
        .ok()
        .and_then(|o| b.get(o..o.checked_add(N)?))
    {
        w.copy_from_slice(src);
    }
    w
}

fn u64_at(b: &[u8], off: u64) -> u64 {
    u64::from_le_bytes(bytes_at(b, off))
}

/// The header words the walker checksums, from a header read at the code
/// object's start.
pub fn checksum_window(hdr: &[u8]) -> [u64; CODE_READ_WORDS] {
    words_of(&bytes_at::<CODE_READ_LEN>(hdr, CODE_READ_START))
}

/// Read and validate the code object at `addr`.
pub fn read_code(
    mem: &dyn RemoteMemory,
    addr: u64,
    format: &CodeFormat,
) -> Result<CodeInfo, CodeError> {
    let mem_err = |what: &'static str| move |source| CodeError::Memory { addr, what, source };
    let invalid = |what: &'static str, detail: String| CodeError::Invalid { addr, what, detail };
    let l = &format.code;

    let mut buf = [0u8; HEADER_MAX];
    let hdr = &mut buf[..format.header_len()];
    mem.read(addr, hdr).map_err(mem_err("header"))?;
    let hdr = &*hdr;
    let found = u64_at(hdr, l.ob_type);
    if found != format.pycode_type {
        return Err(CodeError::NotCode {
            addr,
            found,
            expected: format.pycode_type,
        });
    }
    let size = u64_at(hdr, l.ob_size) as i64;
    if size <= 0 || size > UNITS_MAX {
        return Err(invalid("ob_size", format!("{size} code units")));
    }
    let first = i32::from_le_bytes(bytes_at(hdr, l.firstlineno));
    let first_line =
        u32::try_from(first).map_err(|_| invalid("co_firstlineno", first.to_string()))?;

    let string = |what: &'static str, off: u64| -> Result<Arc<str>, CodeError> {
        read_str(mem, u64_at(hdr, off), NAME_MAX, &format.string)
            .map(Arc::from)
            .map_err(|e| match e {
                StrError::Memory(source) => CodeError::Memory { addr, what, source },
                other => invalid(what, other.to_string()),
            })
    };
    let qualname = string("co_qualname", l.qualname)?;
    let filename = string("co_filename", l.filename)?;

    let table = u64_at(hdr, l.linetable);
    let table_len = mem
        .read_u64(table.wrapping_add(format.bytes.ob_size))
        .map_err(mem_err("co_linetable"))? as i64;
    let table_len = usize::try_from(table_len)
        .ok()
        .filter(|&n| n <= LINETABLE_MAX)
        .ok_or_else(|| invalid("co_linetable", format!("{table_len} bytes")))?;
    let linetable = mem
        .read_vec(table.wrapping_add(format.bytes.ob_sval), table_len)
        .map_err(mem_err("co_linetable"))?;

    Ok(CodeInfo {
        qualname,
        filename,
        first_line,
        // size is in 1..=UNITS_MAX.
        n_units: size as u32,
        lines: LineTable::decode(&linetable, first_line, size as u32),
        checksum: code_checksum(&checksum_window(hdr), &l.checksum_masks),
    })
}

/// Synthetic code objects for tests here and in the store.
#[cfg(test)]
pub(crate) mod test_code {
    use super::*;
    use crate::process::memory::SliceMemory;
    use crate::python::layout::Minor;

    /// Where [`fake`] puts the code object.
    pub const CODE: u64 = 0x10_000;
    /// Its type.
    pub const TYPE: u64 = 0xc0de;

    /// How [`fake`]'s code object is read: 3.11.
    pub fn format() -> CodeFormat {
        CodeFormat::new(TYPE, &Minor::V3_11.header_layout())
    }

    /// A synthetic 3.11 code object at [`CODE`] in test memory (type
    /// [`TYPE`], qualname `f`): `size` units from line `first`, a
    /// `table_len`-byte table whose first entry is one unit at line
    /// `first + 1`.
    pub fn fake(size: i64, first: i32, table_len: i64) -> SliceMemory {
        fake_in(&Minor::V3_11.header_layout(), size, first, table_len)
    }

    /// [`fake`] laid out as `l` says.
    pub fn fake_in(l: &Layout, size: i64, first: i32, table_len: i64) -> SliceMemory {
        let mut m = SliceMemory::new();
        m.add(CODE, header(l, size, first));
        add_name_and_table(&mut m, l, table_len);
        m
    }

    /// `n` synthetic 3.11 code objects of 8 units, the `k`th at
    /// `CODE + k * 0x1000` with first line `10 * (k + 1)`, and their
    /// checksums: instruction 0 is on the line after the first, the others
    /// on the first line.
    pub fn fakes(n: u64) -> (SliceMemory, Vec<(u64, u32)>) {
        let l = Minor::V3_11.header_layout();
        let fmt = format();
        let mut m = SliceMemory::new();
        add_name_and_table(&mut m, &l, 2);
        let mut codes = Vec::new();
        for k in 0..n {
            let addr = CODE + k * 0x1000;
            m.add(addr, header(&l, 8, 10 * (k as i32 + 1)));
            codes.push(addr);
        }
        let sums = codes
            .into_iter()
            .map(|a| {
                let info = read_code(&m, a, &fmt).expect("synthetic code object reads");
                (a, info.checksum)
            })
            .collect();
        (m, sums)
    }

    /// Past the last of 480 [`fakes`].
    const NAME: u64 = 0x20_0000;
    const TABLE: u64 = 0x30_0000;

    fn header(l: &Layout, size: i64, first: i32) -> Vec<u8> {
        let c = &l.code;
        let mut hdr = vec![0u8; l.code_header_len()];
        let mut put = |off: u64, v: &[u8]| {
            let o = off as usize;
            hdr[o..o + v.len()].copy_from_slice(v);
        };
        put(c.ob_type, &TYPE.to_le_bytes());
        put(c.ob_size, &size.to_le_bytes());
        put(c.firstlineno, &first.to_le_bytes());
        put(c.filename, &NAME.to_le_bytes());
        put(c.qualname, &NAME.to_le_bytes());
        put(c.linetable, &TABLE.to_le_bytes());
        hdr
    }

    fn add_name_and_table(m: &mut SliceMemory, l: &Layout, table_len: i64) {
        // Compact ASCII "f": length 1, state = ascii|compact|kind 1.
        let s = &l.string;
        let mut name = vec![0u8; s.ascii_data as usize + 2];
        name[s.length as usize] = 1;
        name[s.state as usize] = 0x40 | 0x20 | (1 << 2);
        name[s.ascii_data as usize] = b'f';
        let b = &l.bytes;
        let mut table = vec![0u8; b.ob_sval as usize + 2];
        table[b.ob_size as usize..b.ob_size as usize + 8].copy_from_slice(&table_len.to_le_bytes());
        table[b.ob_sval as usize] = 0x80 | (13 << 3); // 1 unit, line +1
        table[b.ob_sval as usize + 1] = 2;
        m.add(NAME, name).add(TABLE, table);
    }
}

#[cfg(test)]
mod tests {
    use super::test_code::{fake, fake_in, format, CODE, TYPE};
    use super::*;
    use crate::process::memory::ProcessMemory;
    use crate::python::layout::Minor;
    use crate::python::linetable::line_for_instr;
    use crate::python::test_python::{self, TestPython};
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Child, ChildStdin, ChildStdout, Stdio};

    /// The target program. Filler lines push later functions past line 64 and
    /// 4096, so line deltas need multi-byte varints.
    const TARGET: &str = r#"
import ctypes, json, sys

def plain(a, b):
    x = a + b
    return x * 2

class Klass:
    def method(self, n):
        total = 0
        for i in range(n):
            total += i
        return total

def outer():
    def inner(y):
        try:
            return 1 / y
        except ZeroDivisionError:
            return None
    return inner

lam = lambda q: (q,
                 q * 2)

def функция():
    return "ф"

def 𠀀():
    return "𠀀"

def gen():
    yield 1
    yield 2
"#;

    const TAIL: &str = r#"
def far_away(x):
    if x:
        return list(i for i in range(x))  # a genexpr: 3.12+ inline list comprehensions
    return None

inner = outer()
codes = [plain.__code__, Klass.method.__code__, outer.__code__, inner.__code__,
         lam.__code__, функция.__code__, 𠀀.__code__, gen.__code__,
         far_away.__code__,
         next(k for k in far_away.__code__.co_consts if isinstance(k, type(plain.__code__)))]

def run_all():
    for _ in range(2000):
        plain(1, 2); Klass().method(5); inner(2); inner(0); lam(3)
        функция(); 𠀀(); list(gen()); far_away(3); far_away(0)

out = []
for c in codes:
    out.append({
        "addr": id(c),
        "type": id(type(c)),
        "qualname": c.co_qualname,
        "filename": c.co_filename,
        "first": c.co_firstlineno,
        "n": len(c.co_code) // 2,
        "lines": [p[0] for p in c.co_positions()],
        "table": c.co_linetable.hex(),
        "hdr": ctypes.string_at(id(c) + 16, 64).hex(),
    })
not_code = "just a string"
print(json.dumps({"codes": out, "str": id(not_code)}), flush=True)
for cmd in sys.stdin:
    if cmd.strip() == "run":
        run_all()
        print("ran", flush=True)
"#;

    /// A child interpreter, killed on drop so a failing test leaves nothing.
    struct Target {
        child: Child,
        stdin: ChildStdin,
        stdout: BufReader<ChildStdout>,
    }

    impl Target {
        fn spawn(python: &TestPython, script: &str) -> Target {
            let mut child = python
                .command()
                .arg(script)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn python");
            let stdin = child.stdin.take().expect("stdin");
            let stdout = BufReader::new(child.stdout.take().expect("stdout"));
            Target {
                child,
                stdin,
                stdout,
            }
        }

        fn line(&mut self) -> String {
            let mut s = String::new();
            self.stdout.read_line(&mut s).expect("read child");
            assert!(!s.is_empty(), "child exited early");
            s
        }
    }

    impl Drop for Target {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Read every code object of the target through `ProcessMemory` and
    /// compare with what the interpreter itself reports.
    fn check_interpreter(python: &TestPython) -> usize {
        // A non-ASCII file name exercises co_filename decoding as well.
        let filler = "\n".repeat(5000);
        let script = python.share(
            &format!("цель_目标_{}.py", std::process::id()),
            format!("{TARGET}{filler}{TAIL}").as_bytes(),
        );
        let mut t = Target::spawn(python, &script);
        let layout = python.minor.header_layout();
        let v: serde_json::Value = serde_json::from_str(&t.line()).expect("json");
        let mem = ProcessMemory::new(t.child.id());
        let codes = v["codes"].as_array().expect("codes");
        assert_eq!(codes.len(), 10, "all code objects listed");

        let mut infos = Vec::new();
        for c in codes {
            let addr = c["addr"].as_u64().expect("addr");
            let ty = c["type"].as_u64().expect("type");
            let info = read_code(&mem, addr, &CodeFormat::new(ty, &layout))
                .unwrap_or_else(|e| panic!("{}: {c}: {e}", python.label));
            assert_eq!(&*info.qualname, c["qualname"].as_str().expect("qualname"));
            assert_eq!(&*info.filename, c["filename"].as_str().expect("filename"));
            assert_eq!(&*info.filename, script);
            assert_eq!(
                u64::from(info.first_line),
                c["first"].as_u64().expect("first")
            );
            assert_eq!(u64::from(info.n_units), c["n"].as_u64().expect("n"));
            let hdr: [u8; CODE_READ_LEN] = unhex(c["hdr"].as_str().expect("hdr"))
                .try_into()
                .expect("64 bytes");
            assert_eq!(
                info.checksum,
                code_checksum(&words_of(&hdr), &layout.code.checksum_masks),
                "{}",
                info.qualname
            );
            let lines = c["lines"].as_array().expect("lines");
            let table = unhex(c["table"].as_str().expect("table"));
            for (i, want) in lines.iter().enumerate() {
                let want = want.as_u64().map(|l| l as u32);
                assert_eq!(info.line_for(i as i32), want, "{} unit {i}", info.qualname);
                // The table decoded at read time answers as a scan of the raw one.
                let direct = line_for_instr(&table, info.first_line, i as i64);
                assert_eq!(
                    info.line_for(i as i32),
                    direct,
                    "{} unit {i}",
                    info.qualname
                );
            }
            // Clamping: before the start is "not started", past the end is the last unit.
            assert_eq!(info.line_for(-1), Some(info.first_line));
            assert_eq!(info.line_for(i32::MIN), Some(info.first_line));
            let last = lines.last().expect("non-empty").as_u64().map(|l| l as u32);
            assert_eq!(info.line_for(i32::MAX), last);
            infos.push((addr, ty, info));
        }
        let names: Vec<&str> = infos.iter().map(|(_, _, i)| &*i.qualname).collect();
        for want in [
            "Klass.method",
            "outer.<locals>.inner",
            "<lambda>",
            "функция",
            "𠀀",
        ] {
            assert!(names.contains(&want), "{want} in {names:?}");
        }
        assert!(infos.iter().any(|(_, _, i)| i.first_line > 4096));

        // Run everything hot (warm-up counters, quickening), then re-read:
        // the checksum must not move.
        writeln!(t.stdin, "run").expect("write child");
        assert_eq!(t.line().trim(), "ran");
        for (addr, ty, before) in &infos {
            let after = read_code(&mem, *addr, &CodeFormat::new(*ty, &layout)).expect("re-read");
            assert_eq!(after.checksum, before.checksum, "{}", before.qualname);
            assert_eq!(&after, before);
        }

        // A str is readable but not a code object.
        let ty = infos[0].1;
        let s = v["str"].as_u64().expect("str");
        let fmt = CodeFormat::new(ty, &layout);
        let err = read_code(&mem, s, &fmt).expect_err("str is not code");
        assert!(matches!(err, CodeError::NotCode { .. }), "{err}");
        assert!(!err.is_unreadable());
        let err = read_code(&mem, 8, &fmt).expect_err("unmapped");
        assert!(err.is_unreadable(), "{err}");
        infos.len()
    }

    /// Every interpreter: the host's 3.11s and the roots' 3.13-3.15.
    #[test]
    fn reads_live_code_objects() {
        let mut minors = Vec::new();
        for python in test_python::all() {
            let n = check_interpreter(&python);
            println!("code: {n} code objects checked in {}", python.label);
            minors.push(python.minor);
        }
        assert!(minors.contains(&Minor::V3_11));
    }

    #[test]
    fn validation() {
        let ok = read_code(&fake(1, 7, 2), CODE, &format()).expect("valid fake");
        assert_eq!((&*ok.qualname, ok.first_line, ok.n_units), ("f", 7, 1));
        assert_eq!(ok.line_for(0), Some(8));
        let other_type = CodeFormat {
            pycode_type: 0xbeef,
            ..format()
        };
        assert!(matches!(
            read_code(&fake(1, 7, 2), CODE, &other_type),
            Err(CodeError::NotCode { found: TYPE, .. })
        ));
        // Each version's own layout reads its own fake.
        for minor in Minor::ALL {
            let l = minor.header_layout();
            let got = read_code(&fake_in(&l, 3, 9, 2), CODE, &CodeFormat::new(TYPE, &l))
                .unwrap_or_else(|e| panic!("{minor}: {e}"));
            assert_eq!((&*got.qualname, got.first_line, got.n_units), ("f", 9, 3));
        }
        for (size, first, len, what) in [
            (0, 1, 2, "ob_size"),
            (-3, 1, 2, "ob_size"),
            (UNITS_MAX + 1, 1, 2, "ob_size"),
            (1, -1, 2, "co_firstlineno"),
            (1, 1, -1, "co_linetable"),
            (1, 1, LINETABLE_MAX as i64 + 1, "co_linetable"),
        ] {
            match read_code(&fake(size, first, len), CODE, &format()) {
                Err(CodeError::Invalid { what: w, .. }) => assert_eq!(w, what),
                other => panic!("{size} {first} {len}: {other:?}"),
            }
        }
        // Table length readable but the bytes are not there.
        let err = read_code(&fake(1, 1, 100), CODE, &format()).expect_err("short table");
        assert!(err.is_unreadable(), "{err}");
    }
}
