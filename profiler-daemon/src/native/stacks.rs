//! Native stacks of sampled processes: one owner for each process's
//! mappings, the unwinder and the symbolizer, which is what the sampler's
//! reader calls per sample.
use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::maps::ProcessMaps;
use super::unwind::{
    NativeFrame, StopReason, UnwindLimits, UnwindStats, Unwinder, Unwound, UserStack,
};
use super::user::{NativeSymbol, Symbol, SymbolLimits, SymbolStats, Unsymbolised, UserSymbolizer};

/// Bounds of [`NativeStacks`].
#[derive(Clone, Copy, Debug)]
pub struct NativeLimits {
    pub unwind: UnwindLimits,
    pub symbols: SymbolLimits,
    /// A process's mappings are read again when an address is in none of
    /// them (a library loaded since), at most this often.
    pub maps_refresh: Duration,
}

impl Default for NativeLimits {
    fn default() -> Self {
        NativeLimits {
            unwind: UnwindLimits::default(),
            symbols: SymbolLimits::default(),
            maps_refresh: Duration::from_millis(250),
        }
    }
}

/// Counters of [`NativeStacks`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NativeStats {
    pub unwind: UnwindStats,
    pub symbols: SymbolStats,
    /// Reads of `/proc/PID/maps`.
    pub maps_reads: u64,
}

/// A native stack: frames leaf first, each with its symbol.
#[derive(Clone, Debug)]
pub struct NativeStack {
    pub unwound: Unwound,
    pub symbols: Vec<Arc<NativeSymbol>>,
}

impl NativeStack {
    /// Each frame with its symbol: what [`super::merge::merge`] takes to
    /// pair activations by stack address.
    pub fn frames(&self) -> Vec<(NativeFrame, Arc<NativeSymbol>)> {
        self.unwound
            .frames
            .iter()
            .copied()
            .zip(self.symbols.iter().cloned())
            .collect()
    }
}

/// Unwinds and symbolises user stacks of any number of processes.
pub struct NativeStacks {
    limits: NativeLimits,
    maps: crate::FastHashMap<u32, ProcessMaps>,
    unwinder: Unwinder,
    symbols: UserSymbolizer,
    maps_reads: u64,
}

impl NativeStacks {
    pub fn new(limits: NativeLimits) -> NativeStacks {
        NativeStacks {
            limits,
            maps: Default::default(),
            unwinder: Unwinder::new(limits.unwind),
            symbols: UserSymbolizer::new(limits.symbols),
            maps_reads: 0,
        }
    }

    pub fn stats(&self) -> NativeStats {
        NativeStats {
            unwind: self.unwinder.stats(),
            symbols: self.symbols.stats(),
            maps_reads: self.maps_reads,
        }
    }

    /// Drop everything kept for `pid`; call when it exits (a reused pid
    /// would otherwise be read with the old process's mappings).
    pub fn forget_pid(&mut self, pid: u32) {
        self.maps.remove(&pid);
        self.unwinder.forget_pid(pid);
        self.symbols.forget_pid(pid);
    }

    /// Unwind and symbolise `stack` of a thread of `pid`. Fails only if the
    /// process's mappings cannot be read (it has exited).
    pub fn native_stack(&mut self, pid: u32, stack: &UserStack<'_>) -> io::Result<NativeStack> {
        let unwound = self.unwind(pid, stack)?;
        let lookups: Vec<u64> = unwound.frames.iter().map(|f| f.lookup_address()).collect();
        let symbols = self.symbolise(pid, &lookups)?;
        Ok(NativeStack { unwound, symbols })
    }

    /// See [`Unwinder::unwind`].
    pub fn unwind(&mut self, pid: u32, stack: &UserStack<'_>) -> io::Result<Unwound> {
        let unwound = self
            .unwinder
            .unwind(maps_of(&mut self.maps, &mut self.maps_reads, pid)?, stack);
        if matches!(unwound.stop, StopReason::NotExecutable { .. }) && self.refresh(pid)? {
            return Ok(self
                .unwinder
                .unwind(maps_of(&mut self.maps, &mut self.maps_reads, pid)?, stack));
        }
        Ok(unwound)
    }

    /// See [`UserSymbolizer::symbolise`].
    pub fn symbolise(&mut self, pid: u32, lookups: &[u64]) -> io::Result<Vec<Arc<NativeSymbol>>> {
        let symbols = self
            .symbols
            .symbolise(maps_of(&mut self.maps, &mut self.maps_reads, pid)?, lookups);
        let unmapped = |s: &Arc<NativeSymbol>| {
            matches!(s.symbol, Symbol::Unsymbolised(Unsymbolised::NotMapped))
        };
        if symbols.iter().any(unmapped) && self.refresh(pid)? {
            return Ok(self
                .symbols
                .symbolise(maps_of(&mut self.maps, &mut self.maps_reads, pid)?, lookups));
        }
        Ok(symbols)
    }

    /// Read `pid`'s mappings again if the copy is old enough; true if read.
    fn refresh(&mut self, pid: u32) -> io::Result<bool> {
        let stale = self
            .maps
            .get(&pid)
            .is_none_or(|m| m.read_at.elapsed() >= self.limits.maps_refresh);
        if stale {
            self.maps_reads += 1;
            self.maps.insert(pid, ProcessMaps::read(pid)?);
        }
        Ok(stale)
    }
}

/// `pid`'s mappings, read on first use.
fn maps_of<'m>(
    maps: &'m mut crate::FastHashMap<u32, ProcessMaps>,
    reads: &mut u64,
    pid: u32,
) -> io::Result<&'m ProcessMaps> {
    match maps.entry(pid) {
        std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
        std::collections::hash_map::Entry::Vacant(e) => {
            *reads += 1;
            Ok(e.insert(ProcessMaps::read(pid)?))
        }
    }
}
