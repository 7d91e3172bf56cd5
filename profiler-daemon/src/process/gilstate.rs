//! Where each thread's gilstate binding is: the per-thread pointer to its
//! `PyThreadState` that survives the thread releasing the GIL (unlike
//! `_Py_tss_tstate`, which 3.12+ clears on release and which would lose
//! exactly the threads that run C code without the GIL).
//!
//! - 3.11 to 3.14: the pthread key in `_PyRuntime`'s `Py_tss_t autoTSSkey`.
//!   Its offset is known for each version's headers; if a patch release
//!   moved it, `_PyRuntime` is searched for `Py_tss_t`-shaped pairs and each
//!   key is tried.
//! - 3.15+: the `_Py_tss_gilstate` thread-local, located by decoding
//!   `PyGILState_GetThisThreadState` ([`super::tls_access`]) or, failing
//!   that, by searching the threads' static TLS for their own states.
//!
//! Whatever the route, the answer is accepted only when the binding of the
//! interpreter's live threads reads back their own `PyThreadState`.
use profiler_common::{TlsKind, TlsLayout};

use super::memory::{MemoryError, RemoteMemory};
use super::tls::{self, LibcHint, ThreadState, TlsDetection, TlsError, GLIBC_KEYS_MAX};
use super::tls_access::TlsAccess;
use crate::python::layout::Gilstate;

/// Bytes of `_PyRuntime` searched for a moved `autoTSSkey`.
const RUNTIME_SCAN: usize = 64 << 10;
/// Bytes below each thread pointer searched for a thread-local binding.
const TLS_SCAN: u64 = 4096;

/// Why no binding was established.
#[derive(Debug, thiserror::Error)]
pub enum GilstateError {
    /// Not an error of the process: it has not finished starting.
    #[error("{0}")]
    NotReady(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl From<MemoryError> for GilstateError {
    fn from(e: MemoryError) -> Self {
        GilstateError::Tls(TlsError::Memory(e))
    }
}

/// What locating the binding needs besides the thread states.
pub struct Binary {
    /// How `PyGILState_GetThisThreadState` reads the binding, if it reads a
    /// thread-local.
    pub access: Option<TlsAccess>,
    /// Load bias of the interpreter binary (link-time address + bias =
    /// address in the target).
    pub bias: u64,
}

/// Find, and prove on `threads`, how each thread's binding is reached.
pub fn locate<M: RemoteMemory>(
    mem: &M,
    runtime_addr: u64,
    gilstate: Gilstate,
    threads: &[ThreadState],
    hint: LibcHint,
    binary: &Binary,
) -> Result<TlsDetection, GilstateError> {
    if threads.is_empty() {
        return Err(GilstateError::NotReady(
            "the interpreter has no thread states yet".into(),
        ));
    }
    match gilstate {
        Gilstate::TssKey { runtime_offset } => {
            tss_key(mem, runtime_addr, runtime_offset, threads, hint)
        }
        Gilstate::ThreadLocal => thread_local(mem, threads, binary),
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn tss_key<M: RemoteMemory>(
    mem: &M,
    runtime_addr: u64,
    offset: u64,
    threads: &[ThreadState],
    hint: LibcHint,
) -> Result<TlsDetection, GilstateError> {
    let mut pair = [0u8; 8];
    mem.read(runtime_addr.wrapping_add(offset), &mut pair)?;
    let (initialized, key) = (u32_at(&pair, 0), u32_at(&pair, 4));
    let mut first_error = None;
    if initialized == 1 {
        match tls::detect_with_threads(mem, threads, key, hint) {
            Ok(d) => return Ok(d),
            Err(TlsError::Memory(
                e @ (MemoryError::Gone { .. } | MemoryError::Permission { .. }),
            )) => return Err(e.into()),
            Err(e) => first_error = Some(e),
        }
    }
    // A patch release may have moved the key: try every `Py_tss_t`-shaped
    // pair (`_is_initialized == 1`, a key any libc can have) in `_PyRuntime`,
    // nearest the headers' offset first.
    let raw = read_prefix(mem, runtime_addr, RUNTIME_SCAN);
    let mut candidates: Vec<(u64, u32)> = (0..raw.len().saturating_sub(7))
        .step_by(4)
        .filter(|&o| o as u64 != offset && u32_at(&raw, o) == 1)
        .map(|o| (o as u64, u32_at(&raw, o + 4)))
        .filter(|&(_, k)| k < GLIBC_KEYS_MAX && (initialized != 1 || k != key))
        .collect();
    candidates.sort_by_key(|&(o, _)| o.abs_diff(offset));
    let mut tried_keys = std::collections::HashSet::new();
    for (o, k) in candidates {
        if !tried_keys.insert(k) {
            continue;
        }
        if let Some(d) = tls::detect_known(mem, threads, k, hint, &mut Vec::new()) {
            tracing::info!(
                headers = offset,
                found = o,
                key = k,
                "autoTSSkey is not where this version's headers put it; found it by search"
            );
            return Ok(d);
        }
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Err(GilstateError::NotReady("autoTSSkey not created yet".into())),
    }
}

/// Up to `len` bytes from `addr`, fewer if the mapping ends first.
fn read_prefix<M: RemoteMemory>(mem: &M, addr: u64, len: usize) -> Vec<u8> {
    const PAGE: usize = 4096;
    let mut out = Vec::with_capacity(len);
    let mut page = [0u8; PAGE];
    while out.len() < len {
        if mem
            .read(addr.wrapping_add(out.len() as u64), &mut page)
            .is_err()
        {
            break;
        }
        out.extend_from_slice(&page);
    }
    out
}

fn static_layout(tp_offset: i64) -> TlsLayout {
    TlsLayout::static_tls(tp_offset)
}

fn detection(
    tp_offset: i64,
    threads: &[ThreadState],
    matched: usize,
    scanned: bool,
) -> TlsDetection {
    TlsDetection {
        layout: static_layout(tp_offset),
        threads: threads.len(),
        matched,
        scanned,
    }
}

fn thread_local<M: RemoteMemory>(
    mem: &M,
    threads: &[ThreadState],
    binary: &Binary,
) -> Result<TlsDetection, GilstateError> {
    let mut why = String::from(
        "PyGILState_GetThisThreadState does not read a thread-local this reader follows",
    );
    if let Some(access) = binary.access {
        match resolve(mem, access, binary.bias, threads) {
            Ok(tp_offset) => {
                let n = tls::score(mem, &static_layout(tp_offset), threads);
                if n > 0 {
                    return Ok(detection(tp_offset, threads, n, false));
                }
                why = format!(
                    "the thread-local PyGILState_GetThisThreadState reads ({access:?}, {}) \
                     holds none of {} thread state(s)",
                    tls::describe(&static_layout(tp_offset)),
                    threads.len()
                );
            }
            Err(ResolveError::Memory(
                e @ (MemoryError::Gone { .. } | MemoryError::Permission { .. }),
            )) => return Err(e.into()),
            Err(e) => why = e.to_string(),
        }
    }
    scan_below_tp(mem, threads).map_err(|e| match e {
        ScanError::Ambiguous(n) => GilstateError::NotReady(format!(
            "{why}; searching the threads' TLS found {n} equally good places (the binding and \
             the current-thread pointer cannot be told apart while every thread holds the GIL)"
        )),
        ScanError::Nothing => GilstateError::Tls(TlsError::ThreadLocal(format!(
            "{why}; no thread's static TLS holds its own thread state"
        ))),
    })
}

#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(
        "the interpreter's thread-local storage is not at one offset from the thread pointer \
         in every thread (libpython loaded with dlopen?): {0:?}"
    )]
    Dynamic(Vec<i64>),
    #[error("no thread's DTV resolves libpython's TLS block (module {0})")]
    NoBlock(u64),
}

/// The offset from the thread pointer of the variable `access` names.
fn resolve<M: RemoteMemory>(
    mem: &M,
    access: TlsAccess,
    bias: u64,
    threads: &[ThreadState],
) -> Result<i64, ResolveError> {
    let at = |vaddr: u64| bias.wrapping_add(vaddr);
    match access {
        TlsAccess::LocalExec { tp_offset } => Ok(tp_offset),
        TlsAccess::InitialExec { got, addend } => {
            Ok((mem.read_u64(at(got))? as i64).wrapping_add(addend))
        }
        TlsAccess::Descriptor { desc, addend } => {
            Ok((mem.read_u64(at(desc).wrapping_add(8))? as i64).wrapping_add(addend))
        }
        TlsAccess::GeneralDynamic { tls_index, addend } => {
            // `tls_index` is `{module id, offset in the module's block}`;
            // the thread's DTV (at tp+8 in glibc's and musl's TCB) maps module
            // ids to blocks: 16-byte entries in glibc, 8-byte in musl.
            let module = mem.read_u64(at(tls_index))?;
            let offset = mem.read_u64(at(tls_index).wrapping_add(8))?;
            let mut offsets = Vec::new();
            for t in threads {
                let fsbase = t.thread_id;
                if !tls::is_thread_pointer(mem, TlsKind::Static as u32, fsbase) {
                    continue;
                }
                let Ok(dtv) = mem.read_u64(fsbase.wrapping_add(8)) else {
                    continue;
                };
                for entry in [16u64, 8] {
                    let Ok(block) = mem.read_u64(dtv.wrapping_add(module.wrapping_mul(entry)))
                    else {
                        continue;
                    };
                    if block == 0 || block == u64::MAX {
                        continue;
                    }
                    let var = block.wrapping_add(offset).wrapping_add(addend as u64);
                    if mem.read_u64(var).ok() == Some(t.addr) {
                        offsets.push(var.wrapping_sub(fsbase) as i64);
                        break;
                    }
                }
            }
            offsets.dedup();
            match offsets[..] {
                [] => Err(ResolveError::NoBlock(module)),
                [one] => Ok(one),
                _ => {
                    offsets.sort_unstable();
                    offsets.dedup();
                    if offsets.len() == 1 {
                        Ok(offsets[0])
                    } else {
                        Err(ResolveError::Dynamic(offsets))
                    }
                }
            }
        }
    }
}

enum ScanError {
    Ambiguous(usize),
    Nothing,
}

/// The offset below the thread pointer, within [`TLS_SCAN`] bytes, where the
/// most threads keep their own state; it must be the only such offset.
fn scan_below_tp<M: RemoteMemory>(
    mem: &M,
    threads: &[ThreadState],
) -> Result<TlsDetection, ScanError> {
    let mut counts: std::collections::BTreeMap<i64, usize> = Default::default();
    let mut buf = vec![0u8; TLS_SCAN as usize];
    for t in threads {
        let fsbase = t.thread_id;
        if !tls::is_thread_pointer(mem, TlsKind::Static as u32, fsbase)
            || mem.read(fsbase.wrapping_sub(TLS_SCAN), &mut buf).is_err()
        {
            continue;
        }
        for (i, w) in buf.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(w.try_into().unwrap_or_default());
            if v == t.addr {
                *counts.entry(i as i64 * 8 - TLS_SCAN as i64).or_default() += 1;
            }
        }
    }
    let best = counts.values().copied().max().ok_or(ScanError::Nothing)?;
    let tops: Vec<i64> = counts
        .iter()
        .filter(|(_, &n)| n == best)
        .map(|(&o, _)| o)
        .collect();
    match tops[..] {
        [one] => Ok(detection(one, threads, best, true)),
        _ => Err(ScanError::Ambiguous(tops.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::SliceMemory;

    const FS1: u64 = 0x7000_0000_0000;
    const FS2: u64 = 0x7100_0000_0000;
    const TS1: u64 = 0x3000;
    const TS2: u64 = 0x4000;

    fn threads() -> Vec<ThreadState> {
        vec![
            ThreadState {
                addr: TS1,
                thread_id: FS1,
            },
            ThreadState {
                addr: TS2,
                thread_id: FS2,
            },
        ]
    }

    /// Thread blocks: TLS below the thread pointer, the TCB above it (self
    /// pointers at +0 and +16, the DTV pointer at +8).
    fn thread(mem: &mut SliceMemory, fs: u64, below: &[(i64, u64)], dtv: u64) {
        let mut b = vec![0u8; 0x2000];
        let base = fs - 0x1000;
        let mut put = |addr: u64, v: u64| {
            let o = (addr - base) as usize;
            b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        };
        put(fs, fs);
        put(fs + 8, dtv);
        put(fs + 16, fs);
        for &(off, v) in below {
            put(fs.wrapping_add(off as u64), v);
        }
        mem.add(base, b);
    }

    fn binary(access: Option<TlsAccess>) -> Binary {
        Binary { access, bias: 0 }
    }

    #[test]
    fn local_exec_is_proven_on_threads() {
        let mut mem = SliceMemory::new();
        thread(&mut mem, FS1, &[(-0x28, TS1), (-0x30, TS1)], 0);
        thread(&mut mem, FS2, &[(-0x28, TS2)], 0);
        let d = thread_local(
            &mem,
            &threads(),
            &binary(Some(TlsAccess::LocalExec { tp_offset: -0x28 })),
        )
        .unwrap();
        assert_eq!(d.layout, TlsLayout::static_tls(-0x28));
        assert_eq!((d.threads, d.matched, d.scanned), (2, 2, false));
        assert_eq!(tls::describe(&d.layout), "thread-local(tp-0x28)");
    }

    #[test]
    fn general_dynamic_resolves_through_the_dtv() {
        const TI: u64 = 0x9000;
        const DTV1: u64 = 0xa000;
        const DTV2: u64 = 0xb000;
        let mut mem = SliceMemory::new();
        // tls_index {module 2, offset 0}; the module's block sits 0x400
        // below each thread pointer (static TLS); the variable is at +0x28.
        let mut ti = vec![0u8; 16];
        ti[..8].copy_from_slice(&2u64.to_le_bytes());
        mem.add(TI, ti);
        for (dtv, fs) in [(DTV1, FS1), (DTV2, FS2)] {
            let mut d = vec![0u8; 64];
            d[32..40].copy_from_slice(&(fs - 0x400).to_le_bytes());
            mem.add(dtv, d);
        }
        thread(&mut mem, FS1, &[(-0x400 + 0x28, TS1)], DTV1);
        thread(&mut mem, FS2, &[(-0x400 + 0x28, TS2)], DTV2);
        let gd = TlsAccess::GeneralDynamic {
            tls_index: TI,
            addend: 0x28,
        };
        let d = thread_local(&mem, &threads(), &binary(Some(gd))).unwrap();
        assert_eq!(d.layout, TlsLayout::static_tls(-0x400 + 0x28));
        assert_eq!(d.matched, 2);

        // Blocks at different offsets per thread: dynamic TLS, refused.
        let mut mem2 = SliceMemory::new();
        let mut ti = vec![0u8; 16];
        ti[..8].copy_from_slice(&2u64.to_le_bytes());
        mem2.add(TI, ti);
        for (dtv, blk) in [(DTV1, FS1 - 0x400), (DTV2, FS2 - 0x800)] {
            let mut d = vec![0u8; 64];
            d[32..40].copy_from_slice(&blk.to_le_bytes());
            mem2.add(dtv, d);
        }
        thread(&mut mem2, FS1, &[(-0x400 + 0x28, TS1)], DTV1);
        thread(&mut mem2, FS2, &[(-0x800 + 0x28, TS2)], DTV2);
        let e = resolve(&mem2, gd, 0, &threads()).unwrap_err();
        assert!(matches!(e, ResolveError::Dynamic(_)), "{e}");
    }

    #[test]
    fn search_fallback_needs_a_unique_answer() {
        // Both threads keep their state at -0x28; thread 1 also at -0x30
        // (its current-thread pointer): -0x28 wins, 2 against 1.
        let mut mem = SliceMemory::new();
        thread(&mut mem, FS1, &[(-0x28, TS1), (-0x30, TS1)], 0);
        thread(&mut mem, FS2, &[(-0x28, TS2)], 0);
        let d = thread_local(&mem, &threads(), &binary(None)).unwrap();
        assert_eq!((d.layout, d.scanned), (TlsLayout::static_tls(-0x28), true));

        // A single thread holding the GIL: two places, cannot tell.
        let mut mem = SliceMemory::new();
        thread(&mut mem, FS1, &[(-0x28, TS1), (-0x30, TS1)], 0);
        let e = thread_local(&mem, &threads()[..1], &binary(None)).unwrap_err();
        assert!(matches!(e, GilstateError::NotReady(_)), "{e}");
        assert!(e.to_string().contains("2 equally good places"), "{e}");

        // Nothing anywhere.
        let mut mem = SliceMemory::new();
        thread(&mut mem, FS1, &[], 0);
        let e = thread_local(
            &mem,
            &threads()[..1],
            &binary(Some(TlsAccess::LocalExec { tp_offset: -8 })),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("holds none of 1 thread state"),
            "{e}"
        );
    }

    /// A runtime whose `autoTSSkey` is not where the headers say: found by
    /// search, and only a key whose slots hold the threads' states counts.
    #[test]
    fn moved_tss_key_is_found_by_search() {
        const RT: u64 = 0x10_0000;
        let slot = |key: u64| tls::GLIBC_FIRST_BLOCK as i64 + key as i64 * 16 + 8;
        // glibc's specific_1stblock is above the thread pointer: write the
        // slot of key 3 in the TCB region.
        let mut tcb1 = vec![0u8; 0x1000];
        tcb1[..8].copy_from_slice(&FS1.to_le_bytes());
        tcb1[16..24].copy_from_slice(&FS1.to_le_bytes());
        let s = slot(3) as usize;
        tcb1[s..s + 8].copy_from_slice(&TS1.to_le_bytes());
        // Decoys: a pair with key 5 (no thread has it) nearer the headers'
        // offset than the real one with key 3.
        let mut mem2 = SliceMemory::new();
        mem2.add(RT, {
            let mut r = vec![0u8; 0x2000];
            r[0x800..0x808].copy_from_slice(&[1, 0, 0, 0, 5, 0, 0, 0]);
            r[0x900..0x908].copy_from_slice(&[1, 0, 0, 0, 3, 0, 0, 0]);
            r
        });
        mem2.add(FS1, tcb1);
        let one = [ThreadState {
            addr: TS1,
            thread_id: FS1,
        }];
        let d = tss_key(&mem2, RT, 0x850, &one, LibcHint::Glibc).unwrap();
        assert_eq!(d.layout.key, 3);
        assert_eq!(d.matched, 1);
        // Not created, and nothing that looks like it: not ready.
        let mut mem3 = SliceMemory::new();
        mem3.add(RT, vec![0u8; 0x2000]);
        mem3.add(FS1, vec![0u8; 0x1000]);
        let e = tss_key(&mem3, RT, 0x850, &one, LibcHint::Glibc).unwrap_err();
        assert!(matches!(e, GilstateError::NotReady(_)), "{e}");
    }
}
