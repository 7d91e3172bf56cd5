//! One `check` per fuzz target: the parsers of untrusted input (target
//! memory, files, the ring buffer, the configuration, HTTP queries), each
//! with the properties it must keep on any input. `fuzz/` calls these from
//! cargo-fuzz, and the test below replays every committed corpus file
//! through them on a plain `cargo test`.
//!
//! A `check` panics on a broken property; any panic, hang or runaway
//! allocation in a parser is a bug in the parser, fixed there.

use crate::bpf::btf::Btf;
use crate::bpf::events;
use crate::daemon::{config, http, labels};
use crate::process::elf::ElfFile;
use crate::process::python::{self, GILSTATE_GETTER, RUNTIME_SECTION};
use crate::process::{maps, tls_access};
use crate::python::linetable::{self, LineTable};
use crate::python::unicode::{self, Kind};
use profiler_common::{
    kstack_bytes, FLAG_IN_KERNEL, FLAG_PREEMPTED, FLAG_READ_ERROR, FLAG_TRUNCATED, FLAG_USER_REGS,
    HEADER_LEN, KSTACK_MAX, MAX_FRAMES, RAW_FRAME_LEN, USER_STACK_MAX, USER_STACK_MIN,
};

/// A target's check of one input.
pub type Check = fn(&[u8]);

/// Every target: its name (the corpus directory `fuzz/corpus/<name>`) and
/// its check.
pub const TARGETS: [(&str, Check); 10] = [
    ("linetable", linetable),
    ("unicode", unicode),
    ("events", events),
    ("elf", elf),
    ("btf", btf),
    ("config", config),
    ("http_query", http_query),
    ("maps", maps),
    ("proc_stat", proc_stat),
    ("cgroup", cgroup),
];

/// Code units queried one by one (and compared with the O(table) scan).
const MAX_QUERIED_UNITS: u32 = 4096;
/// Units compared with [`linetable::line_for_instr`], O(table) each.
const MAX_SCANNED_UNITS: u32 = 64;

/// Input: `first_line` (4 bytes LE), `n_units` (4 bytes LE), the table.
/// The three decoders must agree on every unit.
pub fn linetable(data: &[u8]) {
    let Some((head, table)) = data.split_at_checked(8) else {
        return;
    };
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let first_line = word(0);
    let n_units = word(4);
    let lt = LineTable::decode(table, first_line, n_units);
    let queried = n_units.min(MAX_QUERIED_UNITS);
    let all = linetable::lines_for_all(table, first_line, queried as usize);
    assert_eq!(all.len(), queried as usize);
    for (unit, &expected) in (0..queried).zip(&all) {
        assert_eq!(lt.line(unit), expected, "unit {unit}");
        if unit < MAX_SCANNED_UNITS {
            let scanned = linetable::line_for_instr(table, first_line, i64::from(unit));
            assert_eq!(scanned, expected, "unit {unit}");
        }
    }
    assert_eq!(
        linetable::line_for_instr(table, first_line, -1),
        Some(first_line)
    );
    // Past the units asked for, and absurd indexes: an answer, not a panic.
    let _ = lt.line(n_units);
    let _ = lt.line(u32::MAX);
    let _ = linetable::line_for_instr(table, first_line, i64::MIN);
    let _ = linetable::line_for_instr(table, first_line, i64::MAX);
    let _ = lt.heap_bytes();
}

/// Every kind on the same bytes: one char per whole unit, plus one
/// U+FFFD for a partial one.
pub fn unicode(data: &[u8]) {
    for kind in [Kind::One, Kind::Two, Kind::Four] {
        let s = unicode::decode_units(kind, data);
        let w = kind.width();
        assert_eq!(s.chars().count(), data.len().div_ceil(w), "{kind:?}");
        if kind == Kind::One {
            assert!(s
                .chars()
                .zip(data)
                .all(|(c, &b)| u32::from(c) == u32::from(b)));
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// A decoded record holds exactly what its bytes say; anything else is
/// an error.
pub fn events(data: &[u8]) {
    let Ok(s) = events::decode(data) else {
        return;
    };
    assert!(s.frames.len() <= MAX_FRAMES);
    let nkernel = u32_at(data, 36) as usize;
    assert!(s.kernel.len() <= nkernel && nkernel <= KSTACK_MAX);
    let kbytes = kstack_bytes(nkernel);
    let body_end = HEADER_LEN + kbytes + s.frames.len() * RAW_FRAME_LEN;
    // The rest is the user stack copy, whole, or nothing.
    match &s.user_stack {
        Some(stack) => {
            assert!((USER_STACK_MIN..=USER_STACK_MAX).contains(&stack.len()));
            assert_eq!(&data[body_end..], &stack[..]);
            assert!(s.regs.is_some());
        }
        None => assert_eq!(data.len(), body_end),
    }
    assert_eq!(u32_at(data, 8), s.pid);
    assert_eq!(u32_at(data, 12), s.tid);
    assert_eq!(u32_at(data, 16), s.cpu);
    let flags = u32_at(data, 24);
    assert_eq!(s.truncated, flags & FLAG_TRUNCATED != 0);
    assert_eq!(s.read_error.is_some(), flags & FLAG_READ_ERROR != 0);
    assert_eq!(s.preempted, flags & FLAG_PREEMPTED != 0);
    assert_eq!(s.regs.is_some(), flags & FLAG_USER_REGS != 0);
    assert_eq!(s.entry.is_some(), flags & FLAG_IN_KERNEL != 0);
    assert_eq!(u64_at(data, 40), s.weight_ns);
    // Every address kept is the record's; only zeros are cut at the end.
    for i in 0..nkernel {
        let a = u64_at(data, HEADER_LEN + i * 8);
        match s.kernel.get(i) {
            Some(k) => assert_eq!(*k, a),
            None => assert_eq!(a, 0),
        }
    }
    for (i, f) in s.frames.iter().enumerate() {
        let at = HEADER_LEN + kbytes + i * RAW_FRAME_LEN;
        assert_eq!(u64_at(data, at), f.code);
        assert_eq!(u32_at(data, at + 8) as i32, f.instr);
        assert_eq!(u32_at(data, at + 12), f.checksum);
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | u64::from(u32_at(b, off + 4)) << 32
}

/// Parse an ELF image and make every look-up the daemon makes of a
/// mapped file (`python::analyze`, `exe_filter`).
pub fn elf(data: &[u8]) {
    let Ok(file) = ElfFile::from_bytes("fuzz", data.to_vec()) else {
        return;
    };
    for name in ["_PyRuntime", "Py_Version", "PyCode_Type", "main"] {
        let _ = file.symbol(name);
        let _ = file.dynamic_symbol(name);
    }
    let _ = file.section_address(RUNTIME_SECTION);
    let _ = file.section_address(".text");
    let _ = file.needed();
    let _ = file.build_id_hex();
    let layout = file.layout();
    for (start, offset) in [(0, 0), (0x7f00_0000_0000, 0x1000), (u64::MAX, u64::MAX)] {
        let a = file.load_bias(start, offset).ok();
        assert_eq!(a, layout.load_bias(file.path(), start, offset).ok());
    }
    if let Ok(Some(f)) = file.symbol(GILSTATE_GETTER) {
        if let Ok(code) = file.read_vaddr(f.value, f.size.clamp(1, 256) as usize) {
            let _ = tls_access::decode(&code, f.value);
        }
    }
    for s in file.load_segments().iter().take(4) {
        let _ = file.read_vaddr(s.vaddr, 8);
    }
}

/// Parse BTF, then the look-ups the sampler makes at start, and a few more.
pub fn btf(data: &[u8]) {
    let Ok(btf) = Btf::parse(data) else {
        return;
    };
    let _ = btf.len();
    let _ = btf.is_empty();
    for name in ["task_struct", "signal_struct", "thread_struct", "a", "s"] {
        let _ = btf.struct_size(name);
    }
    let paths: [(&str, &[&str]); 6] = [
        ("task_struct", &["thread", "fsbase"]),
        ("task_struct", &["signal"]),
        ("signal_struct", &["live", "counter"]),
        ("s", &["a"]),
        ("s", &["a", "b"]),
        ("s", &["a", "b", "c"]),
    ];
    for (s, path) in paths {
        let _ = btf.member_offset(s, path);
    }
}

/// The configuration file, YAML (invalid UTF-8 is refused before parsing).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = config::parse(text, "fuzz.yaml");
    let _ = config::locate(text, &["aggregation", "window_secs"]);
}

/// A query string, decoded as the handlers' `Query` extractor does, then
/// validated by all three endpoint parsers; also split raw, so that
/// strings the URI parser refuses still reach the validators.
pub fn http_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The server refuses longer query strings before any handler runs.
    if text.len() > http::MAX_QUERY_LEN {
        return;
    }
    let raw: Vec<(String, String)> = text
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let decoded = format!("/profile?{text}")
        .parse::<axum::http::Uri>()
        .ok()
        .and_then(|uri| {
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri)
                .ok()
                .map(|q| q.0)
        });
    for pairs in std::iter::once(raw).chain(decoded) {
        for retention in [0, 1, 5, 300, u32::MAX] {
            check_queries(&pairs, retention);
        }
    }
}

fn check_queries(pairs: &[(String, String)], retention: u32) {
    let (_, profile, top) = http::parse_queries(pairs, retention);
    if let Ok((selector, seconds)) = profile {
        assert!((1..=retention.max(1)).contains(&seconds));
        match selector {
            crate::model::query::Selector::Pid(pid) => assert!(pid > 0),
            crate::model::query::Selector::Service(s) => assert!(!s.is_empty()),
        }
    }
    if let Ok(q) = top {
        assert!(q.pids.len() <= http::MAX_TOP_PIDS);
        assert!(q.pids.iter().all(|&p| p > 0));
        assert!(q
            .limit
            .is_some_and(|l| (1..=http::MAX_TOP_LIMIT).contains(&l)));
        if let Some(s) = q.seconds {
            assert!((1..=retention.max(1)).contains(&s));
        }
    }
}

/// `/proc/PID/maps`.
pub fn maps(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for m in maps::parse(&text) {
        assert!(m.start <= m.end);
        let _ = m.file_name();
        let _ = m.contains(m.start);
    }
}

/// `/proc/PID/stat`.
pub fn proc_stat(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = python::parse_start_time(&text);
    let _ = python::parse_command(&text);
}

/// `/proc/PID/cgroup` and `/proc/PID/environ`.
pub fn cgroup(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let info = labels::parse_cgroup(&text);
    assert!(info.qos_class.is_none() || info.pod_uid.is_some());
    let _ = labels::service_from_environ(data);
    let _ = labels::disabled_in_environ(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Replays `fuzz/corpus/<target>/*` (the committed corpora) through
    /// each target's check; a missing or empty corpus fails.
    #[test]
    fn fuzz_corpora_replay() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (name, check) in TARGETS {
            let dir = root.join(name);
            let entries = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("corpus {} unreadable: {e}", dir.display()));
            let mut files: Vec<_> = entries
                .map(|e| e.expect("corpus entry").path())
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            assert!(!files.is_empty(), "corpus {} is empty", dir.display());
            for f in &files {
                let data = std::fs::read(f).expect("corpus file");
                let caught = std::panic::catch_unwind(|| check(&data));
                assert!(caught.is_ok(), "{name}: {} fails its check", f.display());
            }
            println!("{name}: {} corpus files replayed", files.len());
        }
    }

    /// The BTF corpus keeps an input (the hand-built seed, or a variant of
    /// it) on which the sampler's look-ups succeed.
    #[test]
    fn btf_corpus_reaches_the_sampler_members() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/btf");
        let found = std::fs::read_dir(dir)
            .expect("BTF corpus")
            .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
            .filter_map(|data| Btf::parse(&data).ok())
            .any(|btf| {
                let at = |s: &str, path: &[&str]| btf.member_offset(s, path).ok();
                at("task_struct", &["thread", "fsbase"]).is_some()
                    && at("task_struct", &["signal"]).is_some()
                    && at("signal_struct", &["live", "counter"]).is_some()
            });
        assert!(
            found,
            "no BTF corpus file has task_struct.thread.fsbase and co."
        );
    }
}
