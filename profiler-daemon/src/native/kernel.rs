//! Function names of kernel stack addresses, from the kernel's symbol table
//! (`/proc/kallsyms`) read through blazesym.
//!
//! The table is copied once, at start: the kernel shows its addresses only
//! to a reader with CAP_SYSLOG, which `record` and the daemon give up once
//! the sampler is attached. blazesym's symbolizer is not `Send` (its caches
//! are shared through `Rc`), so each thread that symbolises keeps its own,
//! parsing the copy once; names are cached per address in one byte-bounded
//! LRU that every thread shares, so a thread's symbolizer is only asked for
//! addresses never seen before.
use std::cell::RefCell;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blazesym::symbolize::source::{Kernel, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer};
use blazesym::MaybeDefault;
use lru::LruCache;

/// Where the running kernel lists its symbols.
pub const KALLSYMS: &str = "/proc/kallsyms";

/// Default byte bound of the name cache.
pub const DEFAULT_CACHE_BYTES: usize = 4 << 20;

/// Bytes a cache entry costs beyond its name: the key, the `Arc`'s
/// counters, the LRU's links and the hash table's slot.
const ENTRY_OVERHEAD: usize = 80;

#[derive(Debug, thiserror::Error)]
pub enum KernelSymbolsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot copy the kernel's symbols: {0}")]
    Copy(std::io::Error),
    #[error(
        "{path} shows no addresses (all zero): reading them needs CAP_SYSLOG, or \
         kernel.kptr_restrict=0 with kernel.perf_event_paranoid<=1"
    )]
    Hidden { path: String },
}

/// Outcomes of name look-ups, for summaries and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelSymbolStats {
    pub hits: u64,
    pub misses: u64,
    /// Addresses in no known symbol: shown as their address.
    pub unknown: u64,
    /// Entries evicted to stay within the byte bound.
    pub evictions: u64,
}

struct Cache {
    names: LruCache<u64, Arc<str>>,
    bytes: usize,
    max_bytes: usize,
    stats: KernelSymbolStats,
}

impl Cache {
    fn put(&mut self, addr: u64, name: Arc<str>) {
        let size = ENTRY_OVERHEAD + name.len();
        if size > self.max_bytes {
            return;
        }
        while self.bytes + size > self.max_bytes {
            match self.names.pop_lru() {
                Some((_, old)) => {
                    self.bytes = self.bytes.saturating_sub(ENTRY_OVERHEAD + old.len());
                    self.stats.evictions += 1;
                }
                None => {
                    self.bytes = 0;
                    break;
                }
            }
        }
        if let Some(old) = self.names.put(addr, name) {
            self.bytes = self.bytes.saturating_sub(ENTRY_OVERHEAD + old.len());
        }
        self.bytes += size;
    }
}

/// Distinguishes instances, so a thread's symbolizer serves one copy only.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's symbolizer, and the instance (copy) it was made for.
    static SYMBOLIZER: RefCell<Option<(u64, Symbolizer)>> = const { RefCell::new(None) };
}

/// The kernel's symbols and a cache of the names looked up.
pub struct KernelSymbols {
    id: u64,
    /// The copy of the symbol table blazesym reads; removed on drop.
    copy: tempfile::NamedTempFile,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for KernelSymbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelSymbols")
            .field("copy", &self.copy.path())
            .finish_non_exhaustive()
    }
}

impl KernelSymbols {
    /// Copies the running kernel's symbol table: call it while the process
    /// still has CAP_SYSLOG.
    pub fn new(max_bytes: usize) -> Result<KernelSymbols, KernelSymbolsError> {
        Self::from_kallsyms(Path::new(KALLSYMS), max_bytes)
    }

    /// [`KernelSymbols::new`] from a kallsyms-format file at `path`.
    pub fn from_kallsyms(
        path: &Path,
        max_bytes: usize,
    ) -> Result<KernelSymbols, KernelSymbolsError> {
        let read_err = |source| KernelSymbolsError::Read {
            path: path.display().to_string(),
            source,
        };
        let src = std::fs::File::open(path).map_err(read_err)?;
        let mut copy = tempfile::Builder::new()
            .prefix("pyebpf-kallsyms-")
            .tempfile()
            .map_err(KernelSymbolsError::Copy)?;
        let mut shown = false;
        {
            let mut out = std::io::BufWriter::new(copy.as_file_mut());
            for line in BufReader::new(src).lines() {
                let line = line.map_err(read_err)?;
                // Hidden addresses read as zeros; one that is not tells
                // they are shown.
                shown = shown
                    || line
                        .split_whitespace()
                        .next()
                        .is_some_and(|a| a.bytes().any(|b| b != b'0'));
                writeln!(out, "{line}").map_err(KernelSymbolsError::Copy)?;
            }
            out.flush().map_err(KernelSymbolsError::Copy)?;
        }
        if !shown {
            return Err(KernelSymbolsError::Hidden {
                path: path.display().to_string(),
            });
        }
        Ok(KernelSymbols {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            copy,
            cache: Mutex::new(Cache {
                names: LruCache::unbounded(),
                bytes: 0,
                max_bytes,
                stats: KernelSymbolStats::default(),
            }),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic elsewhere leaves at worst a cache missing an entry.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The function of each kernel address, in order: its name, or
    /// `0x<address>` when no symbol holds it. `addrs` are the innermost
    /// first, as sampled; all but the first (when `exact_leaf`: an
    /// interrupted instruction) are return addresses, looked up one byte
    /// back so a call at the very end of a function names that function.
    pub fn names(&self, addrs: &[u64], exact_leaf: bool) -> Vec<Arc<str>> {
        let lookup: Vec<u64> = addrs
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                if i == 0 && exact_leaf {
                    a
                } else {
                    a.saturating_sub(1)
                }
            })
            .collect();
        let mut out: Vec<Option<Arc<str>>> = Vec::with_capacity(lookup.len());
        let mut missing = Vec::new();
        {
            let mut cache = self.cache();
            for &a in &lookup {
                let hit = cache.names.get(&a).cloned();
                match hit {
                    Some(n) => {
                        cache.stats.hits += 1;
                        out.push(Some(n));
                    }
                    None => {
                        cache.stats.misses += 1;
                        missing.push(a);
                        out.push(None);
                    }
                }
            }
        }
        if missing.is_empty() {
            return out.into_iter().flatten().collect();
        }
        missing.sort_unstable();
        missing.dedup();
        let found = self.symbolize(&missing);
        let mut cache = self.cache();
        for (&a, name) in missing.iter().zip(&found) {
            if name.is_none() {
                cache.stats.unknown += 1;
            }
            let name = name.clone().unwrap_or_else(|| hex(a));
            cache.put(a, name);
        }
        drop(cache);
        lookup
            .iter()
            .zip(out)
            .map(|(a, n)| {
                n.unwrap_or_else(|| match missing.binary_search(a) {
                    Ok(i) => found[i].clone().unwrap_or_else(|| hex(*a)),
                    Err(_) => hex(*a),
                })
            })
            .collect()
    }

    /// Names of `addrs` from this thread's symbolizer; `None` for an
    /// address no symbol holds (or every address, if blazesym fails).
    fn symbolize(&self, addrs: &[u64]) -> Vec<Option<Arc<str>>> {
        let src = Source::Kernel(Kernel {
            kallsyms: MaybeDefault::Some(PathBuf::from(self.copy.path())),
            vmlinux: MaybeDefault::None,
            kaslr_offset: Some(0),
            debug_syms: false,
            ..Kernel::default()
        });
        SYMBOLIZER.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(id, _)| *id != self.id) {
                *slot = Some((self.id, Symbolizer::new()));
            }
            let Some((_, symbolizer)) = slot.as_ref() else {
                return vec![None; addrs.len()];
            };
            match symbolizer.symbolize(&src, Input::AbsAddr(addrs)) {
                Ok(syms) if syms.len() == addrs.len() => syms
                    .iter()
                    .map(|s| match s {
                        Symbolized::Sym(sym) => Some(Arc::from(&*sym.name)),
                        Symbolized::Unknown(_) => None,
                    })
                    .collect(),
                Ok(syms) => {
                    tracing::warn!(
                        asked = addrs.len(),
                        got = syms.len(),
                        "kernel symbolization answered for another number of addresses"
                    );
                    vec![None; addrs.len()]
                }
                Err(e) => {
                    tracing::warn!("kernel symbolization failed: {e}");
                    vec![None; addrs.len()]
                }
            }
        })
    }

    pub fn stats(&self) -> KernelSymbolStats {
        self.cache().stats
    }

    /// Bytes the name cache holds.
    pub fn bytes(&self) -> usize {
        self.cache().bytes
    }
}

/// The text of an address no symbol holds.
fn hex(a: u64) -> Arc<str> {
    Arc::from(format!("{a:#x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    const TABLE: &str = "\
ffffffff81000000 T _stext
ffffffff81001000 T do_nanosleep
ffffffff81001200 t futex_wait_queue
ffffffff81001400 T tcp_recvmsg
ffffffff81002000 T _etext
";

    #[test]
    fn names_from_a_table() {
        let t = table(TABLE);
        let k = KernelSymbols::from_kallsyms(t.path(), DEFAULT_CACHE_BYTES).unwrap();
        // Return addresses just past a function's last call name it.
        let names = k.names(
            &[
                0xffff_ffff_8100_1210,
                0xffff_ffff_8100_1200,
                0xffff_ffff_8100_1401,
            ],
            true,
        );
        let names: Vec<&str> = names.iter().map(|n| &**n).collect();
        assert_eq!(names, ["futex_wait_queue", "do_nanosleep", "tcp_recvmsg"]);
        // Not exact: the leaf is a return address too.
        assert_eq!(
            &*k.names(&[0xffff_ffff_8100_1200], false)[0],
            "do_nanosleep"
        );
        assert_eq!(
            &*k.names(&[0xffff_ffff_8100_1200], true)[0],
            "futex_wait_queue"
        );
        // The second look-up of 0x...11ff was cached.
        let s = k.stats();
        assert_eq!((s.misses, s.hits), (4, 1), "{s:?}");
        let again = k.names(&[0xffff_ffff_8100_1210, 0xffff_ffff_8100_1200], true);
        assert_eq!(&*again[1], "do_nanosleep");
        assert_eq!(k.stats().hits, 3);
    }

    #[test]
    fn unknown_addresses_are_shown_as_such() {
        let t = table(TABLE);
        let k = KernelSymbols::from_kallsyms(t.path(), DEFAULT_CACHE_BYTES).unwrap();
        let names = k.names(&[0x1000, 0xffff_ffff_8100_1001], true);
        assert_eq!(&*names[0], "0x1000");
        assert_eq!(&*names[1], "do_nanosleep");
        assert_eq!(k.stats().unknown, 1);
    }

    #[test]
    fn hidden_addresses_are_an_error() {
        let t = table("0000000000000000 T _stext\n0000000000000000 T do_nanosleep\n");
        let e = KernelSymbols::from_kallsyms(t.path(), DEFAULT_CACHE_BYTES).unwrap_err();
        assert!(e.to_string().contains("CAP_SYSLOG"), "{e}");
    }

    #[test]
    fn the_cache_is_bounded_in_bytes() {
        let t = table(TABLE);
        let bound = 3 * (ENTRY_OVERHEAD + 16);
        let k = KernelSymbols::from_kallsyms(t.path(), bound).unwrap();
        for i in 0..50u64 {
            k.names(&[0xffff_ffff_8100_1000 + i], true);
            assert!(k.bytes() <= bound);
        }
        assert!(k.stats().evictions > 40);
    }

    /// The running kernel's own table: the scheduler's entry is found.
    #[test]
    fn the_running_kernel() {
        let Ok(k) = KernelSymbols::new(DEFAULT_CACHE_BYTES) else {
            // Without CAP_SYSLOG the table shows no addresses.
            assert_ne!(unsafe { libc::geteuid() }, 0, "root must see kallsyms");
            return;
        };
        let text = std::fs::read_to_string(KALLSYMS).unwrap();
        let addr = text
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                let (a, _, name) = (f.next()?, f.next()?, f.next()?);
                (name == "schedule").then(|| u64::from_str_radix(a, 16).ok())?
            })
            .expect("schedule in kallsyms");
        assert_eq!(&*k.names(&[addr + 1], true)[0], "schedule");
    }
}
