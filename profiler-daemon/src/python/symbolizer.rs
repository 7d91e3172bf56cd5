//! Per-process cache from sampled code objects to names and line tables.
//!
//! Keyed by (address, checksum): a code object freed and replaced at the same
//! address carries another checksum, so it is read afresh and never shown
//! under the old name. A least-recently-used cache bounded in bytes: a
//! process that makes code objects without end (`exec`, templating) costs
//! re-reads of its coldest code objects, never unbounded memory.
use std::sync::Arc;

use lru::LruCache;

use profiler_common::RawFrame;

use super::code::{read_code, CodeFormat, CodeInfo};
use crate::process::memory::RemoteMemory;
use crate::profile::{Frame, UnknownReason};

/// Default byte bound of one process's cache.
pub const DEFAULT_CACHE_BYTES: usize = 8 << 20;

/// Bytes an entry costs beyond its strings and line table: the key, the
/// `Arc`'s counters, the LRU's links and the hash table's slot.
const ENTRY_OVERHEAD: usize = 96;

/// Symbolisation outcomes, for status lines and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolStats {
    pub hits: u64,
    pub misses: u64,
    /// The code object at the address changed between sample and read.
    pub stale: u64,
    pub unreadable: u64,
    pub invalid: u64,
    /// Entries evicted (least recently used first) to stay within the
    /// cache's byte bound.
    pub evictions: u64,
}

impl SymbolStats {
    pub fn unknown(&self) -> u64 {
        self.stale + self.unreadable + self.invalid
    }
}

impl SymbolStats {
    /// What was counted since `earlier` (a copy of the same counters).
    pub fn since(&self, earlier: &SymbolStats) -> SymbolStats {
        SymbolStats {
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            stale: self.stale.saturating_sub(earlier.stale),
            unreadable: self.unreadable.saturating_sub(earlier.unreadable),
            invalid: self.invalid.saturating_sub(earlier.invalid),
            evictions: self.evictions.saturating_sub(earlier.evictions),
        }
    }
}

impl std::ops::AddAssign for SymbolStats {
    fn add_assign(&mut self, o: SymbolStats) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.stale += o.stale;
        self.unreadable += o.unreadable;
        self.invalid += o.invalid;
        self.evictions += o.evictions;
    }
}

type Entry = Result<Arc<CodeInfo>, UnknownReason>;

/// Bytes `e` holds in the cache.
fn entry_bytes(e: &Entry) -> usize {
    ENTRY_OVERHEAD
        + match e {
            Ok(info) => {
                std::mem::size_of::<CodeInfo>()
                    + info.qualname.len()
                    + info.filename.len()
                    + info.lines.heap_bytes()
            }
            Err(_) => 0,
        }
}

/// Symbolises the frames of one process.
pub struct Symbolizer<M> {
    mem: M,
    format: CodeFormat,
    cache: LruCache<(u64, u32), Entry, foldhash::fast::RandomState>,
    /// What the cached entries hold, by [`entry_bytes`].
    bytes: usize,
    max_bytes: usize,
    pub stats: SymbolStats,
}

impl<M: RemoteMemory> Symbolizer<M> {
    pub fn new(mem: M, format: CodeFormat) -> Self {
        Self::with_max_bytes(mem, format, DEFAULT_CACHE_BYTES)
    }

    /// A cache holding at most `max_bytes` (but always the last entry read).
    pub fn with_max_bytes(mem: M, format: CodeFormat, max_bytes: usize) -> Self {
        Symbolizer {
            mem,
            format,
            cache: LruCache::unbounded_with_hasher(foldhash::fast::RandomState::default()),
            bytes: 0,
            max_bytes,
            stats: SymbolStats::default(),
        }
    }

    /// Bytes the cache holds now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Changes the bound, evicting what is over it now.
    pub fn set_max_bytes(&mut self, max_bytes: usize) {
        self.max_bytes = max_bytes;
        self.evict_to(max_bytes);
    }

    /// Evicts least recently used entries until at most `limit` bytes are
    /// held.
    fn evict_to(&mut self, limit: usize) {
        while self.bytes > limit {
            match self.cache.pop_lru() {
                Some((_, e)) => {
                    self.bytes = self.bytes.saturating_sub(entry_bytes(&e));
                    self.stats.evictions += 1;
                }
                None => {
                    self.bytes = 0;
                    break;
                }
            }
        }
    }

    /// Looks up (reading the target on a miss) the code object of `raw`.
    pub fn code(&mut self, raw: &RawFrame) -> Entry {
        let key = (raw.code, raw.checksum);
        if let Some(e) = self.cache.get(&key) {
            self.stats.hits += 1;
            return e.clone();
        }
        self.stats.misses += 1;
        let entry = match read_code(&self.mem, raw.code, &self.format) {
            Ok(info) if info.checksum == raw.checksum => Ok(Arc::new(info)),
            Ok(_) => {
                self.stats.stale += 1;
                Err(UnknownReason::Stale)
            }
            Err(e) if e.is_unreadable() => {
                self.stats.unreadable += 1;
                Err(UnknownReason::Unreadable)
            }
            Err(_) => {
                self.stats.invalid += 1;
                Err(UnknownReason::Invalid)
            }
        };
        let size = entry_bytes(&entry);
        self.evict_to(self.max_bytes.saturating_sub(size));
        self.bytes += size;
        self.cache.put(key, entry.clone());
        entry
    }

    /// The symbolised frame: `qualname (file:line)` or an explicit unknown.
    pub fn frame(&mut self, raw: &RawFrame) -> Frame {
        match self.code(raw) {
            Ok(info) => Frame::Python {
                qualname: info.qualname.clone(),
                filename: info.filename.clone(),
                // An instruction without a line (artificial code) is shown at
                // the function's first line rather than dropped.
                line: info.line_for(raw.instr).unwrap_or(info.first_line),
                first_line: info.first_line,
            },
            Err(reason) => Frame::Unknown { reason },
        }
    }
}
