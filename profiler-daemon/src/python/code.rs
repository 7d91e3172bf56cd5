//! Reading CPython 3.11 code objects (`PyCodeObject`) from target memory.
//!
//! Everything read here is untrusted: the address comes from a BPF sample and
//! the object may have been freed and reused since. `ob_type` must be
//! `PyCode_Type`, sizes are bounded, and the checksum lets the caller compare
//! with the one BPF computed at sample time.
use std::sync::Arc;

use profiler_common::{code_checksum, CODE_READ_LEN, CODE_READ_START};

use super::linetable::LineTable;
use super::unicode::{read_str, StrError};
use crate::process::memory::{MemoryError, RemoteMemory};

/// Bytes of the header read in one go: `tp_basicsize` (184) plus the first
/// code units, which every code object has (RESUME ... RETURN_VALUE).
pub const HEADER_LEN: usize = 192;
/// Longest name or file name accepted, in code points.
pub const NAME_MAX: usize = 4096;
/// Largest `co_linetable` accepted, in bytes.
pub const LINETABLE_MAX: usize = 1 << 20;
/// Largest code object accepted, in code units.
pub const UNITS_MAX: i64 = 10_000_000;

const OB_TYPE: usize = 8;
const OB_SIZE: usize = 16;
const FIRSTLINENO: usize = 72;
const FILENAME: usize = 112;
const QUALNAME: usize = 128;
const LINETABLE: usize = 136;
/// `PyBytesObject`: `ob_size` and `ob_sval`.
const BYTES_SIZE: u64 = 16;
const BYTES_DATA: u64 = 32;

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

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

/// Read and validate the code object at `addr`; `pycode_type` is the address
/// of `PyCode_Type` in the target.
pub fn read_code(
    mem: &dyn RemoteMemory,
    addr: u64,
    pycode_type: u64,
) -> Result<CodeInfo, CodeError> {
    let mem_err = |what: &'static str| move |source| CodeError::Memory { addr, what, source };
    let invalid = |what: &'static str, detail: String| CodeError::Invalid { addr, what, detail };

    let mut hdr = [0u8; HEADER_LEN];
    mem.read(addr, &mut hdr).map_err(mem_err("header"))?;
    let found = u64_at(&hdr, OB_TYPE);
    if found != pycode_type {
        return Err(CodeError::NotCode {
            addr,
            found,
            expected: pycode_type,
        });
    }
    let size = u64_at(&hdr, OB_SIZE) as i64;
    if size <= 0 || size > UNITS_MAX {
        return Err(invalid("ob_size", format!("{size} code units")));
    }
    let first = i32::from_le_bytes([
        hdr[FIRSTLINENO],
        hdr[FIRSTLINENO + 1],
        hdr[FIRSTLINENO + 2],
        hdr[FIRSTLINENO + 3],
    ]);
    let first_line =
        u32::try_from(first).map_err(|_| invalid("co_firstlineno", first.to_string()))?;

    let string = |what: &'static str, off: usize| -> Result<Arc<str>, CodeError> {
        read_str(mem, u64_at(&hdr, off), NAME_MAX)
            .map(Arc::from)
            .map_err(|e| match e {
                StrError::Memory(source) => CodeError::Memory { addr, what, source },
                other => invalid(what, other.to_string()),
            })
    };
    let qualname = string("co_qualname", QUALNAME)?;
    let filename = string("co_filename", FILENAME)?;

    let table = u64_at(&hdr, LINETABLE);
    let table_len = mem
        .read_u64(table.wrapping_add(BYTES_SIZE))
        .map_err(mem_err("co_linetable"))? as i64;
    let table_len = usize::try_from(table_len)
        .ok()
        .filter(|&n| n <= LINETABLE_MAX)
        .ok_or_else(|| invalid("co_linetable", format!("{table_len} bytes")))?;
    let linetable = mem
        .read_vec(table.wrapping_add(BYTES_DATA), table_len)
        .map_err(mem_err("co_linetable"))?;

    let start = CODE_READ_START as usize;
    let mut sum_bytes = [0u8; CODE_READ_LEN];
    sum_bytes.copy_from_slice(&hdr[start..start + CODE_READ_LEN]);

    Ok(CodeInfo {
        qualname,
        filename,
        first_line,
        // size is in 1..=UNITS_MAX.
        n_units: size as u32,
        lines: LineTable::decode(&linetable, first_line, size as u32),
        checksum: code_checksum(&sum_bytes),
    })
}

/// Locating the Python interpreters the tests compare against.
#[cfg(test)]
pub(crate) mod test_python {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::OnceLock;

    /// `sys.executable` of the `python3` on PATH, resolved once. Tests need a
    /// real 3.11 to produce ground truth; without one they fail, not skip.
    pub fn python3() -> &'static Path {
        static EXE: OnceLock<PathBuf> = OnceLock::new();
        EXE.get_or_init(|| {
            let out = Command::new("python3")
                .args([
                    "-c",
                    "import sys; print(sys.executable); print(sys.version_info[:2] == (3, 11))",
                ])
                .output()
                .expect("python3 on PATH is needed for these tests");
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines = text.lines();
            let exe = lines.next().unwrap_or_default().trim().to_owned();
            assert!(
                out.status.success() && !exe.is_empty(),
                "python3 failed: {out:?}"
            );
            assert_eq!(lines.next(), Some("True"), "python3 ({exe}) is not 3.11");
            PathBuf::from(exe)
        })
    }
}

/// Synthetic code objects for tests here and in the store.
#[cfg(test)]
pub(crate) mod test_code {
    use super::*;
    use crate::process::memory::SliceMemory;

    /// Where [`fake`] puts the code object.
    pub const CODE: u64 = 0x10_000;

    /// A synthetic code object at [`CODE`] in test memory (type `0xc0de`,
    /// qualname `f`): `size` units from line `first`, a `table_len`-byte
    /// table whose first entry is one unit at line `first + 1`.
    pub fn fake(size: i64, first: i32, table_len: i64) -> SliceMemory {
        const NAME: u64 = 0x20_000;
        const TABLE: u64 = 0x30_000;
        let mut hdr = vec![0u8; HEADER_LEN];
        hdr[OB_TYPE..OB_TYPE + 8].copy_from_slice(&0xc0de_u64.to_le_bytes());
        hdr[OB_SIZE..OB_SIZE + 8].copy_from_slice(&size.to_le_bytes());
        hdr[FIRSTLINENO..FIRSTLINENO + 4].copy_from_slice(&first.to_le_bytes());
        for off in [FILENAME, QUALNAME] {
            hdr[off..off + 8].copy_from_slice(&NAME.to_le_bytes());
        }
        hdr[LINETABLE..LINETABLE + 8].copy_from_slice(&TABLE.to_le_bytes());
        // Compact ASCII "f": length 1, state = ready|ascii|compact|kind 1.
        let mut name = vec![0u8; 50];
        name[16] = 1;
        name[32] = 0x80 | 0x40 | 0x20 | (1 << 2);
        name[48] = b'f';
        let mut table = vec![0u8; 34];
        table[16..24].copy_from_slice(&table_len.to_le_bytes());
        table[32] = 0x80 | (13 << 3); // 1 unit, line +1
        table[33] = 2;
        let mut m = SliceMemory::new();
        m.add(CODE, hdr).add(NAME, name).add(TABLE, table);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::test_code::fake;
    use super::*;
    use crate::process::memory::ProcessMemory;
    use crate::python::linetable::line_for_instr;
    use std::io::{BufRead, BufReader, Write};
    use std::path::Path;
    use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

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
        return [i for i in range(x)]
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
        fn spawn(python: &Path, script: &Path) -> Target {
            let mut child = Command::new(python)
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
    fn check_interpreter(python: &Path) -> usize {
        let dir = tempfile::tempdir().expect("tempdir");
        // A non-ASCII file name exercises co_filename decoding as well.
        let script = dir.path().join("цель_目标.py");
        let filler = "\n".repeat(5000);
        std::fs::write(&script, format!("{TARGET}{filler}{TAIL}")).expect("write script");
        let mut t = Target::spawn(python, &script);
        let v: serde_json::Value = serde_json::from_str(&t.line()).expect("json");
        let mem = ProcessMemory::new(t.child.id());
        let codes = v["codes"].as_array().expect("codes");
        assert_eq!(codes.len(), 10, "all code objects listed");

        let mut infos = Vec::new();
        for c in codes {
            let addr = c["addr"].as_u64().expect("addr");
            let ty = c["type"].as_u64().expect("type");
            let info = read_code(&mem, addr, ty).unwrap_or_else(|e| panic!("{c}: {e}"));
            assert_eq!(&*info.qualname, c["qualname"].as_str().expect("qualname"));
            assert_eq!(&*info.filename, c["filename"].as_str().expect("filename"));
            assert_eq!(&*info.filename, script.to_str().expect("utf-8 path"));
            assert_eq!(
                u64::from(info.first_line),
                c["first"].as_u64().expect("first")
            );
            assert_eq!(u64::from(info.n_units), c["n"].as_u64().expect("n"));
            let hdr: [u8; CODE_READ_LEN] = unhex(c["hdr"].as_str().expect("hdr"))
                .try_into()
                .expect("64 bytes");
            assert_eq!(info.checksum, code_checksum(&hdr), "{}", info.qualname);
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
            let after = read_code(&mem, *addr, *ty).expect("re-read");
            assert_eq!(after.checksum, before.checksum, "{}", before.qualname);
            assert_eq!(&after, before);
        }

        // A str is readable but not a code object.
        let ty = infos[0].1;
        let s = v["str"].as_u64().expect("str");
        let err = read_code(&mem, s, ty).expect_err("str is not code");
        assert!(matches!(err, CodeError::NotCode { .. }), "{err}");
        assert!(!err.is_unreadable());
        let err = read_code(&mem, 8, ty).expect_err("unmapped");
        assert!(err.is_unreadable(), "{err}");
        infos.len()
    }

    #[test]
    fn reads_live_code_objects() {
        let n = check_interpreter(test_python::python3());
        println!(
            "code: {n} code objects checked in {}",
            test_python::python3().display()
        );
    }

    /// Debian's static, non-PIE build: same layout, different address space.
    #[test]
    fn reads_live_code_objects_static_python() {
        let p = Path::new("/usr/bin/python3.11");
        if !p.exists() {
            println!("code: {} not present, skipped", p.display());
            return;
        }
        let n = check_interpreter(p);
        println!("code: {n} code objects checked in {}", p.display());
    }

    #[test]
    fn validation() {
        let ok = read_code(&fake(1, 7, 2), 0x10_000, 0xc0de).expect("valid fake");
        assert_eq!((&*ok.qualname, ok.first_line, ok.n_units), ("f", 7, 1));
        assert_eq!(ok.line_for(0), Some(8));
        assert!(matches!(
            read_code(&fake(1, 7, 2), 0x10_000, 0xbeef),
            Err(CodeError::NotCode { found: 0xc0de, .. })
        ));
        for (size, first, len, what) in [
            (0, 1, 2, "ob_size"),
            (-3, 1, 2, "ob_size"),
            (UNITS_MAX + 1, 1, 2, "ob_size"),
            (1, -1, 2, "co_firstlineno"),
            (1, 1, -1, "co_linetable"),
            (1, 1, LINETABLE_MAX as i64 + 1, "co_linetable"),
        ] {
            match read_code(&fake(size, first, len), 0x10_000, 0xc0de) {
                Err(CodeError::Invalid { what: w, .. }) => assert_eq!(w, what),
                other => panic!("{size} {first} {len}: {other:?}"),
            }
        }
        // Table length readable but the bytes are not there.
        let err = read_code(&fake(1, 1, 100), 0x10_000, 0xc0de).expect_err("short table");
        assert!(err.is_unreadable(), "{err}");
    }
}
