//! Per-process cache from sampled code objects to names and line tables.
//!
//! Keyed by (address, checksum): a code object freed and replaced at the same
//! address carries another checksum, so it is read afresh and never shown
//! under the old name.
use std::sync::Arc;

use profiler_common::RawFrame;

use super::code::{read_code, CodeFormat, CodeInfo};
use crate::process::memory::RemoteMemory;
use crate::profile::{Frame, UnknownReason};
use crate::FastHashMap;

/// Most entries kept per process before the cache is reset (counted).
pub const CACHE_CAP: usize = 200_000;

/// Symbolisation outcomes, for status lines and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolStats {
    pub hits: u64,
    pub misses: u64,
    /// The code object at the address changed between sample and read.
    pub stale: u64,
    pub unreadable: u64,
    pub invalid: u64,
    /// Times the cache was reset at `CACHE_CAP`.
    pub resets: u64,
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
            resets: self.resets.saturating_sub(earlier.resets),
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
        self.resets += o.resets;
    }
}

type Entry = Result<Arc<CodeInfo>, UnknownReason>;

/// Symbolises the frames of one process.
pub struct Symbolizer<M> {
    mem: M,
    format: CodeFormat,
    cache: FastHashMap<(u64, u32), Entry>,
    pub stats: SymbolStats,
}

impl<M: RemoteMemory> Symbolizer<M> {
    pub fn new(mem: M, format: CodeFormat) -> Self {
        Symbolizer {
            mem,
            format,
            cache: FastHashMap::default(),
            stats: SymbolStats::default(),
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
        if self.cache.len() >= CACHE_CAP {
            self.cache.clear();
            self.stats.resets += 1;
        }
        self.cache.insert(key, entry.clone());
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
