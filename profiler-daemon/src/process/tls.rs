//! Finding, and proving, where a thread's `PyThreadState*` lives relative to
//! its thread pointer (FS base).
//!
//! Up to 3.14 the BPF sampler finds the current thread's state through
//! CPython's `autoTSSkey` pthread key, whose per-thread slot sits at a
//! libc-specific offset from the thread pointer. A wrong layout would make
//! every sample silently wrong, so nothing here is trusted: each candidate
//! layout is tried on the interpreter's real threads, whose `thread_id` (a
//! `pthread_t`, equal to the thread pointer on glibc and musl) gives the FS
//! base, and a layout is accepted only if the slot it names holds exactly
//! that thread's state. (3.15's thread-local binding: [`super::gilstate`].)
use profiler_common::{TlsKind, TlsLayout};

use super::maps::MapEntry;
use super::memory::{MemoryError, RemoteMemory};
use crate::python::layout::ThreadsLayout;

/// glibc (2.27-2.38) `struct pthread.specific_1stblock` and `specific[]`.
pub const GLIBC_FIRST_BLOCK: u32 = 0x310;
pub const GLIBC_SECOND_LEVEL: u32 = 0x510;
/// `specific[]` follows the 32 16-byte entries of `specific_1stblock`.
const GLIBC_SECOND_LEVEL_GAP: u32 = 32 * 16;
/// glibc's `PTHREAD_KEYS_MAX`.
pub const GLIBC_KEYS_MAX: u32 = 1024;
/// Offsets of musl's `struct pthread.tsd` (1.2.x first, then older).
pub const MUSL_TSD_OFFSETS: [u32; 3] = [0x80, 0x88, 0x98];
/// musl's `PTHREAD_KEYS_MAX`.
pub const MUSL_KEYS_MAX: u32 = 128;
/// Range scanned for glibc's `specific_1stblock` when the known offset fails.
pub const GLIBC_SCAN: std::ops::Range<u32> = 0x200..0x800;

/// Most thread states walked, over all interpreters (survives cycles and
/// garbage in target memory).
pub const MAX_THREADS: usize = 10_000;
/// Most interpreters walked.
pub const MAX_INTERPRETERS: usize = 1_000;

/// Which libc the target's maps suggest; it only orders the candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LibcHint {
    Glibc,
    Musl,
    Unknown,
}

/// Guess the libc from the file names mapped into the target.
pub fn libc_hint(maps: &[MapEntry]) -> LibcHint {
    let mut hint = LibcHint::Unknown;
    for name in maps
        .iter()
        .filter(|m| m.is_file())
        .filter_map(MapEntry::file_name)
    {
        if name.starts_with("ld-musl-") || name.starts_with("libc.musl-") {
            return LibcHint::Musl;
        }
        if name.starts_with("libc.so.6")
            || name.starts_with("libc-2.")
            || name.starts_with("ld-linux")
        {
            hint = LibcHint::Glibc;
        }
    }
    hint
}

/// One `PyThreadState` of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadState {
    /// Address of the `PyThreadState`.
    pub addr: u64,
    /// Its `thread_id`: the thread's `pthread_t`, i.e. its FS base.
    pub thread_id: u64,
}

/// Why no layout could be established.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("autoTSSkey {key} is out of range for any libc (glibc < {GLIBC_KEYS_MAX})")]
    KeyOutOfRange { key: u32 },
    #[error("{0}")]
    ThreadLocal(String),
    #[error("the interpreter has no thread states to verify a TLS layout with")]
    NoThreads,
    #[error("cannot walk the interpreter's thread list: {0}")]
    Memory(#[from] MemoryError),
    #[error(
        "no TLS layout finds the thread states of {threads} thread(s) via autoTSSkey {key}; \
         tried {tried}"
    )]
    NoMatch {
        key: u32,
        threads: usize,
        tried: String,
    },
}

/// The layout that was proven, and how well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsDetection {
    pub layout: TlsLayout,
    /// Thread states walked (at most [`MAX_THREADS`]).
    pub threads: usize,
    /// Thread states whose slot, under `layout`, reads back the state itself.
    pub matched: usize,
    /// The glibc offset was found by scanning, not from the known table.
    pub scanned: bool,
}

/// Human-readable description of a layout, for errors and logs.
pub fn describe(layout: &TlsLayout) -> String {
    if layout.kind == TlsKind::Static as u32 {
        let (sign, off) = if layout.tp_offset < 0 {
            ('-', layout.tp_offset.unsigned_abs())
        } else {
            ('+', layout.tp_offset as u64)
        };
        format!("thread-local(tp{sign}{off:#x})")
    } else if layout.kind == TlsKind::Musl as u32 {
        format!("musl(tsd@{:#x})", layout.first_block)
    } else {
        format!(
            "glibc(1stblock@{:#x}, specific@{:#x})",
            layout.first_block, layout.second_level
        )
    }
}

fn glibc(first_block: u32, key: u32) -> TlsLayout {
    TlsLayout {
        kind: TlsKind::Glibc as u32,
        first_block,
        second_level: first_block + GLIBC_SECOND_LEVEL_GAP,
        key,
        tp_offset: 0,
    }
}

fn musl(tsd: u32, key: u32) -> TlsLayout {
    TlsLayout {
        kind: TlsKind::Musl as u32,
        first_block: tsd,
        second_level: 0,
        key,
        tp_offset: 0,
    }
}

/// The known layouts, most likely first for `hint`, all using `key`.
pub fn candidates(hint: LibcHint, key: u32) -> Vec<TlsLayout> {
    let g = [glibc(GLIBC_FIRST_BLOCK, key)];
    let m = MUSL_TSD_OFFSETS.map(|o| musl(o, key));
    match hint {
        LibcHint::Musl => m.into_iter().chain(g).collect(),
        LibcHint::Glibc | LibcHint::Unknown => g.into_iter().chain(m).collect(),
    }
}

/// Walk every interpreter's thread list from `_PyRuntime`, laid out as `l`.
///
/// Reads that fail end the list they are in (a thread may be exiting);
/// a cycle or more than [`MAX_THREADS`] states ends the walk.
pub fn thread_states<M: RemoteMemory>(
    mem: &M,
    runtime_addr: u64,
    l: &ThreadsLayout,
) -> Result<Vec<ThreadState>, MemoryError> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut interp = mem.read_u64(runtime_addr.wrapping_add(l.runtime_interpreters_head))?;
    let mut interps = 0;
    while interp != 0 && interps < MAX_INTERPRETERS && seen.insert(interp) {
        interps += 1;
        let mut tstate = match mem.read_u64(interp.wrapping_add(l.interp_threads_head)) {
            Ok(t) => t,
            Err(_) => break,
        };
        while tstate != 0 && out.len() < MAX_THREADS && seen.insert(tstate) {
            let Ok(thread_id) = mem.read_u64(tstate.wrapping_add(l.tstate_thread_id)) else {
                break;
            };
            out.push(ThreadState {
                addr: tstate,
                thread_id,
            });
            tstate = match mem.read_u64(tstate.wrapping_add(l.tstate_next)) {
                Ok(t) => t,
                Err(_) => break,
            };
        }
        if out.len() >= MAX_THREADS {
            break;
        }
        interp = match mem.read_u64(interp.wrapping_add(l.interp_next)) {
            Ok(i) => i,
            Err(_) => break,
        };
    }
    Ok(out)
}

/// What the BPF program reads for `layout` in the thread whose FS base is
/// `fsbase`: the value of the `key` slot.
pub fn slot_value<M: RemoteMemory>(
    mem: &M,
    layout: &TlsLayout,
    fsbase: u64,
) -> Result<u64, MemoryError> {
    mem.read_u64(slot_addr(mem, layout, fsbase)?)
}

/// Address of the `key` slot, following the second level if needed.
fn slot_addr<M: RemoteMemory>(
    mem: &M,
    layout: &TlsLayout,
    fsbase: u64,
) -> Result<u64, MemoryError> {
    if layout.kind == TlsKind::Static as u32 {
        return Ok(fsbase.wrapping_add(layout.tp_offset as u64));
    }
    let key = u64::from(layout.key);
    if layout.kind == TlsKind::Musl as u32 {
        let tsd = mem.read_u64(fsbase.wrapping_add(layout.first_block.into()))?;
        return Ok(tsd.wrapping_add(key * 8));
    }
    if key < 32 {
        Ok(fsbase
            .wrapping_add(layout.first_block.into())
            .wrapping_add(key * 16 + 8))
    } else {
        let blk = mem.read_u64(
            fsbase
                .wrapping_add(layout.second_level.into())
                .wrapping_add((key >> 5) * 8),
        )?;
        // A null block (key never set in this thread) reads near 0 and faults.
        Ok(blk.wrapping_add((key & 31) * 16 + 8))
    }
}

/// The thread pointer points to itself on both libcs (glibc `tcbhead_t.tcb`,
/// musl `pthread.self`), and glibc's `tcbhead_t.self` at +16 too.
pub fn is_thread_pointer<M: RemoteMemory>(mem: &M, kind: u32, fsbase: u64) -> bool {
    if fsbase == 0 || mem.read_u64(fsbase).ok() != Some(fsbase) {
        return false;
    }
    kind != TlsKind::Glibc as u32 || mem.read_u64(fsbase.wrapping_add(16)).ok() == Some(fsbase)
}

/// Whether `layout` finds `t` in its own thread.
pub fn layout_finds<M: RemoteMemory>(mem: &M, layout: &TlsLayout, t: &ThreadState) -> bool {
    is_thread_pointer(mem, layout.kind, t.thread_id)
        && slot_value(mem, layout, t.thread_id).ok() == Some(t.addr)
}

/// Stricter check for scanned glibc offsets: the slot's `seq` word, just
/// before the data, must be odd (glibc marks live keys with odd sequence
/// numbers), which rules out a stray copy of the pointer.
fn glibc_seq_ok<M: RemoteMemory>(mem: &M, layout: &TlsLayout, t: &ThreadState) -> bool {
    slot_addr(mem, layout, t.thread_id)
        .and_then(|a| mem.read_u64(a.wrapping_sub(8)))
        .is_ok_and(|seq| seq & 1 == 1)
}

/// Count the threads that `layout` finds.
pub fn score<M: RemoteMemory>(mem: &M, layout: &TlsLayout, threads: &[ThreadState]) -> usize {
    threads
        .iter()
        .filter(|t| layout_finds(mem, layout, t))
        .count()
}

/// The known layout (ordered by `hint`) under which the `key` slot of the
/// most `threads` holds their own thread state, if any finds one; each
/// layout tried is described into `tried`.
pub fn detect_known<M: RemoteMemory>(
    mem: &M,
    threads: &[ThreadState],
    key: u32,
    hint: LibcHint,
    tried: &mut Vec<String>,
) -> Option<TlsDetection> {
    let mut best: Option<(TlsLayout, usize)> = None;
    for layout in candidates(hint, key) {
        if layout.kind == TlsKind::Musl as u32 && key >= MUSL_KEYS_MAX {
            continue;
        }
        tried.push(describe(&layout));
        let n = score(mem, &layout, threads);
        if n > 0 && best.is_none_or(|(_, b)| n > b) {
            best = Some((layout, n));
        }
    }
    best.map(|(layout, matched)| TlsDetection {
        layout,
        threads: threads.len(),
        matched,
        scanned: false,
    })
}

/// Find the layout under which the `key` slot of the most `threads` holds
/// their own thread state, trying the known layouts (ordered by `hint`) and
/// then, if none finds any thread, scanning for glibc's `specific_1stblock`.
pub fn detect_with_threads<M: RemoteMemory>(
    mem: &M,
    threads: &[ThreadState],
    key: u32,
    hint: LibcHint,
) -> Result<TlsDetection, TlsError> {
    if key >= GLIBC_KEYS_MAX {
        return Err(TlsError::KeyOutOfRange { key });
    }
    if threads.is_empty() {
        return Err(TlsError::NoThreads);
    }
    let mut tried = Vec::new();
    if let Some(d) = detect_known(mem, threads, key, hint, &mut tried) {
        return Ok(d);
    }

    // glibc builds with another `struct pthread` size: scan for the block.
    let mut scanned: Option<(TlsLayout, usize)> = None;
    for off in GLIBC_SCAN.step_by(8) {
        let layout = glibc(off, key);
        let n = threads
            .iter()
            .filter(|t| layout_finds(mem, &layout, t) && glibc_seq_ok(mem, &layout, t))
            .count();
        if n > 0 && scanned.is_none_or(|(_, b)| n > b) {
            scanned = Some((layout, n));
        }
    }
    tried.push(format!(
        "glibc(1stblock scanned over {:#x}..{:#x})",
        GLIBC_SCAN.start, GLIBC_SCAN.end
    ));
    if let Some((layout, matched)) = scanned {
        return Ok(TlsDetection {
            layout,
            threads: threads.len(),
            matched,
            scanned: true,
        });
    }
    Err(TlsError::NoMatch {
        key,
        threads: threads.len(),
        tried: tried.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::{ProcessMemory, SliceMemory};
    use crate::python::layout::Minor;

    fn layout() -> ThreadsLayout {
        Minor::V3_11.header_layout().threads
    }
    const RUNTIME_INTERPRETERS_HEAD: u64 = 40;
    const INTERP_THREADS_HEAD: u64 = 16;
    const TSTATE_NEXT: u64 = 8;
    const TSTATE_THREAD_ID: u64 = 152;

    /// The 3.11 thread list from `runtime_addr`, then the layout for `key`.
    fn detect<M: RemoteMemory>(
        mem: &M,
        runtime_addr: u64,
        key: u32,
        hint: LibcHint,
    ) -> Result<TlsDetection, TlsError> {
        if key >= GLIBC_KEYS_MAX {
            return Err(TlsError::KeyOutOfRange { key });
        }
        let threads = thread_states(mem, runtime_addr, &layout())?;
        detect_with_threads(mem, &threads, key, hint)
    }

    #[test]
    fn constants_are_the_311_layout() {
        let l = layout();
        assert_eq!(
            (
                l.runtime_interpreters_head,
                l.interp_threads_head,
                l.tstate_next,
                l.tstate_thread_id
            ),
            (
                RUNTIME_INTERPRETERS_HEAD,
                INTERP_THREADS_HEAD,
                TSTATE_NEXT,
                TSTATE_THREAD_ID
            )
        );
    }

    const FS1: u64 = 0x7000_0000_0000;
    const FS2: u64 = 0x7100_0000_0000;
    const RT: u64 = 0x1000;
    const INTERP: u64 = 0x2000;
    const TS1: u64 = 0x3000;
    const TS2: u64 = 0x4000;
    const BLK: u64 = 0x5000;

    fn put(buf: &mut [u8], at: u64, v: u64) {
        buf[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn runtime_with_two_threads(mem: &mut SliceMemory, next2: u64) {
        let mut rt = vec![0u8; 0x400];
        put(&mut rt, RUNTIME_INTERPRETERS_HEAD, INTERP);
        mem.add(RT, rt);
        let mut interp = vec![0u8; 0x100];
        put(&mut interp, INTERP_THREADS_HEAD, TS1);
        mem.add(INTERP, interp);
        let mut t1 = vec![0u8; 0x100];
        put(&mut t1, TSTATE_NEXT, TS2);
        put(&mut t1, TSTATE_THREAD_ID, FS1);
        mem.add(TS1, t1);
        let mut t2 = vec![0u8; 0x100];
        put(&mut t2, TSTATE_NEXT, next2);
        put(&mut t2, TSTATE_THREAD_ID, FS2);
        mem.add(TS2, t2);
    }

    fn blk_for(fs: u64) -> u64 {
        BLK + (fs >> 40) * 0x1000
    }

    /// A glibc-like thread block: self pointers, and `tstate` in the slot of
    /// `key` under `first_block`.
    fn glibc_thread(fs: u64, first_block: u32, key: u32, tstate: u64, seq: u64) -> Vec<u8> {
        let mut b = vec![0u8; 0x1000];
        put(&mut b, 0, fs);
        put(&mut b, 16, fs);
        let fb = u64::from(first_block);
        if key < 32 {
            put(&mut b, fb + u64::from(key) * 16, seq);
            put(&mut b, fb + u64::from(key) * 16 + 8, tstate);
        } else {
            put(&mut b, fb + 0x200 + u64::from(key >> 5) * 8, blk_for(fs));
        }
        b
    }

    #[test]
    fn glibc_first_level() {
        let mut mem = SliceMemory::new();
        runtime_with_two_threads(&mut mem, 0);
        mem.add(FS1, glibc_thread(FS1, 0x310, 3, TS1, 7));
        mem.add(FS2, glibc_thread(FS2, 0x310, 3, TS2, 7));
        let d = detect(&mem, RT, 3, LibcHint::Musl).unwrap();
        assert_eq!(d.layout, glibc(0x310, 3));
        assert_eq!(d.layout.second_level, GLIBC_SECOND_LEVEL);
        assert_eq!((d.threads, d.matched, d.scanned), (2, 2, false));
    }

    #[test]
    fn glibc_second_level() {
        let key = 40;
        let mut mem = SliceMemory::new();
        runtime_with_two_threads(&mut mem, 0);
        for (fs, ts) in [(FS1, TS1), (FS2, TS2)] {
            mem.add(fs, glibc_thread(fs, 0x310, key, 0, 0));
            let mut blk = vec![0u8; 32 * 16];
            put(&mut blk, u64::from(key & 31) * 16 + 8, ts);
            mem.add(blk_for(fs), blk);
        }
        let d = detect(&mem, RT, key, LibcHint::Glibc).unwrap();
        assert_eq!(d.layout, glibc(0x310, key));
        assert_eq!(d.matched, 2);
    }

    #[test]
    fn glibc_scan_finds_other_offset() {
        let mut mem = SliceMemory::new();
        runtime_with_two_threads(&mut mem, 0);
        mem.add(FS1, glibc_thread(FS1, 0x330, 1, TS1, 1));
        mem.add(FS2, glibc_thread(FS2, 0x330, 1, TS2, 1));
        let d = detect(&mem, RT, 1, LibcHint::Glibc).unwrap();
        assert!(d.scanned);
        assert_eq!(d.layout, glibc(0x330, 1));
        assert_eq!(d.matched, 2);
    }

    #[test]
    fn scan_rejects_even_sequence() {
        let mut mem = SliceMemory::new();
        runtime_with_two_threads(&mut mem, 0);
        mem.add(FS1, glibc_thread(FS1, 0x330, 1, TS1, 2));
        mem.add(FS2, glibc_thread(FS2, 0x330, 1, TS2, 2));
        let err = detect(&mem, RT, 1, LibcHint::Glibc).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("glibc(1stblock@0x310"), "{msg}");
        assert!(msg.contains("musl(tsd@0x80)"), "{msg}");
        assert!(msg.contains("scanned"), "{msg}");
    }

    #[test]
    fn musl_layout() {
        let key = 5;
        let mut mem = SliceMemory::new();
        runtime_with_two_threads(&mut mem, 0);
        for (fs, ts, tsd) in [(FS1, TS1, 0x6000u64), (FS2, TS2, 0x7000)] {
            let mut b = vec![0u8; 0x200];
            put(&mut b, 0, fs);
            put(&mut b, 0x88, tsd);
            mem.add(fs, b);
            let mut v = vec![0u8; 128 * 8];
            put(&mut v, u64::from(key) * 8, ts);
            mem.add(tsd, v);
        }
        let d = detect(&mem, RT, key, LibcHint::Unknown).unwrap();
        assert_eq!(d.layout, musl(0x88, key));
        assert_eq!(d.layout.kind, TlsKind::Musl as u32);
        assert_eq!(d.matched, 2);
    }

    #[test]
    fn not_a_thread_pointer_is_rejected() {
        let mut mem = SliceMemory::new();
        runtime_with_two_threads(&mut mem, 0);
        let mut b1 = glibc_thread(FS1, 0x310, 3, TS1, 1);
        put(&mut b1, 0, 0); // tcb is not self
        mem.add(FS1, b1);
        mem.add(FS2, glibc_thread(FS2, 0x310, 3, TS2, 1));
        let d = detect(&mem, RT, 3, LibcHint::Glibc).unwrap();
        assert_eq!((d.threads, d.matched), (2, 1));
    }

    #[test]
    fn cycle_in_thread_list_terminates() {
        let mut mem = SliceMemory::new();
        runtime_with_two_threads(&mut mem, TS1);
        let t = thread_states(&mem, RT, &layout()).unwrap();
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn empty_and_out_of_range() {
        let mut mem = SliceMemory::new();
        mem.add(RT, vec![0u8; 0x400]);
        assert!(matches!(
            detect(&mem, RT, 1, LibcHint::Glibc),
            Err(TlsError::NoThreads)
        ));
        assert!(matches!(
            detect(&mem, RT, 5000, LibcHint::Glibc),
            Err(TlsError::KeyOutOfRange { key: 5000 })
        ));
        assert!(matches!(
            detect(&SliceMemory::new(), RT, 1, LibcHint::Glibc),
            Err(TlsError::Memory(_))
        ));
    }

    /// In this very process: a real glibc pthread key, set in this thread,
    /// is found through our own thread pointer.
    #[test]
    fn own_thread_real_glibc_key() {
        let hint = libc_hint(&crate::process::maps::read(std::process::id()).unwrap());
        assert_eq!(hint, LibcHint::Glibc);
        let mem = ProcessMemory::new(std::process::id());
        // Take enough keys to reach both levels.
        let mut keys = Vec::new();
        for _ in 0..40 {
            let mut k: libc::pthread_key_t = 0;
            // SAFETY: plain pthread key API with a valid out pointer.
            assert_eq!(unsafe { libc::pthread_key_create(&mut k, None) }, 0);
            keys.push(k);
        }
        let value = Box::new(0u64);
        let value_addr = &*value as *const u64 as u64;
        // SAFETY: pthread_self has no preconditions.
        let fsbase = unsafe { libc::pthread_self() } as u64;
        let t = ThreadState {
            addr: value_addr,
            thread_id: fsbase,
        };
        for &k in &keys {
            // SAFETY: `k` is a live key; the value is only stored.
            unsafe { libc::pthread_setspecific(k, value_addr as *const libc::c_void) };
            let d = detect_with_threads(&mem, &[t], k, hint).unwrap();
            assert_eq!(d.layout, glibc(GLIBC_FIRST_BLOCK, k), "key {k}");
            assert!(!d.scanned);
            // SAFETY: as above.
            unsafe { libc::pthread_setspecific(k, std::ptr::null()) };
            assert!(detect_with_threads(&mem, &[t], k, hint).is_err());
        }
        for k in keys {
            // SAFETY: deleting keys this test created.
            unsafe { libc::pthread_key_delete(k) };
        }
    }
}
