//! Per-process stacks in one-second buckets, bounded in memory.
//!
//! Each distinct raw stack of a process is interned once and symbolised at
//! that moment (while its code objects are alive); buckets then only hold
//! `(stack id, count)` pairs. Queries merge the buckets they cover, so any
//! `seconds` up to the retention is answered at once, without waiting for a
//! window to close.
//!
//! Samples are added in three steps so that symbolisation, which reads the
//! target's memory, never runs under the lock the HTTP API shares:
//! [`Store::begin_batch`] counts samples of known stacks and returns the new
//! ones, [`Pending::resolve`] symbolises them without touching the store,
//! and [`Store::insert`] interns and counts them.
use super::unix_secs;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use profiler_common::RawFrame;

use super::{
    python_label, ProcessLabels, ProcessView, QueryError, Selector, STATUS_EXITED, STATUS_PROFILED,
    STATUS_UNSUPPORTED,
};
use crate::bpf::events::RawSample;
use crate::process::memory::{MemoryError, ProcessMemory, RemoteMemory};
use crate::profile::{Frame, Profile};
use crate::python::code::CodeFormat;
use crate::python::symbolizer::{SymbolStats, Symbolizer};
use crate::FastHashMap;

/// Limits of the store.
#[derive(Clone, Copy, Debug)]
pub struct StoreLimits {
    pub retention_secs: u32,
    pub max_processes: usize,
    pub max_stacks_per_process: usize,
}

/// Counters of what the store had to refuse or drop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Samples added.
    pub samples: u64,
    /// Samples from a pid the store does not hold.
    pub foreign_samples: u64,
    /// Samples whose stack was new while the stack table was full: counted
    /// under a synthetic `[stack table full]` stack instead.
    pub stacks_overflowed: u64,
    /// Stacks dropped by garbage collection after their buckets expired.
    pub stacks_collected: u64,
    /// Processes refused because `max_processes` were held.
    pub processes_refused: u64,
    /// Unsupported processes dropped from the list of them (the oldest, to
    /// keep at most [`MAX_UNSUPPORTED`]).
    pub unsupported_evicted: u64,
}

/// Most unsupported processes listed; the oldest is dropped for a new one.
pub const MAX_UNSUPPORTED: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RawKey {
    truncated: bool,
    partial: bool,
    frames: Box<[RawFrame]>,
}

impl RawKey {
    fn of(s: RawSample) -> RawKey {
        RawKey {
            truncated: s.truncated,
            partial: s.read_error.is_some(),
            frames: s.frames.into_boxed_slice(),
        }
    }
}

/// Memory the code objects of a process are read from: the live process, or
/// a stand-in in tests.
pub struct TargetMemory(Box<dyn RemoteMemory + Send>);

impl TargetMemory {
    pub fn new(mem: impl RemoteMemory + Send + 'static) -> Self {
        TargetMemory(Box::new(mem))
    }
}

impl RemoteMemory for TargetMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.0.read(addr, buf)
    }
}

/// A process's symbol cache. Its store entry holds it, but only
/// [`Pending::resolve`] locks it, with the store lock released.
type Symbols = Arc<Mutex<Symbolizer<TargetMemory>>>;

/// Symbolises a raw stack, root first (leaf first as sampled).
fn symbolise(symbols: &mut Symbolizer<TargetMemory>, key: &RawKey) -> Arc<[Frame]> {
    let mut v = Vec::with_capacity(key.frames.len() + 1);
    if key.truncated {
        v.push(Frame::Truncated);
    } else if key.partial {
        v.push(Frame::Partial);
    }
    v.extend(key.frames.iter().rev().map(|f| symbols.frame(f)));
    v.into()
}

/// New stacks of a batch, to symbolise without the store lock.
pub struct Pending {
    second: u64,
    procs: Vec<PendingProcess>,
}

struct PendingProcess {
    pid: u32,
    generation: u64,
    symbols: Symbols,
    /// Distinct new stacks and their sample counts.
    stacks: Vec<(RawKey, u64)>,
}

/// Stacks symbolised by [`Pending::resolve`], for [`Store::insert`].
pub struct Resolved {
    second: u64,
    procs: Vec<ResolvedProcess>,
}

struct ResolvedProcess {
    pid: u32,
    generation: u64,
    /// What this resolution added to the process's symbol statistics.
    symbol_stats: SymbolStats,
    stacks: Vec<(RawKey, Arc<[Frame]>, u64)>,
}

impl Pending {
    /// True when the batch had no new stack: nothing to resolve or insert.
    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// Symbolises the new stacks, reading code objects from target memory.
    /// Takes no store: call it with the store lock released.
    pub fn resolve(self) -> Resolved {
        let procs = self
            .procs
            .into_iter()
            .map(|p| {
                // A panic while symbolising leaves at worst a partial cache.
                let mut symbols = p.symbols.lock().unwrap_or_else(|e| e.into_inner());
                let before = symbols.stats;
                let stacks = p
                    .stacks
                    .into_iter()
                    .map(|(key, n)| {
                        let frames = symbolise(&mut symbols, &key);
                        (key, frames, n)
                    })
                    .collect();
                ResolvedProcess {
                    pid: p.pid,
                    generation: p.generation,
                    symbol_stats: symbols.stats.since(&before),
                    stacks,
                }
            })
            .collect();
        Resolved {
            second: self.second,
            procs,
        }
    }
}

struct Bucket {
    second: u64,
    counts: HashMap<u32, u64>,
}

/// One profiled process.
struct Entry {
    labels: ProcessLabels,
    start_time: u64,
    /// Unique over the store's life: tells a pid replaced (reused) while its
    /// new stacks were resolved from the entry they were resolved for.
    generation: u64,
    python_version: String,
    /// A free-threaded build (`python` gets a `t`). Always false for now:
    /// inspection refuses those builds.
    free_threaded: bool,
    since: SystemTime,
    exited_at: Option<u64>,
    symbols: Symbols,
    /// Symbolisation outcomes, added as resolved stacks are inserted.
    symbol_stats: SymbolStats,
    intern: FastHashMap<RawKey, u32>,
    /// Symbolised stacks by id, root first; `None` for free slots.
    stacks: Vec<Option<Arc<[Frame]>>>,
    free: Vec<u32>,
    overflow_id: Option<u32>,
    buckets: VecDeque<Bucket>,
    samples: u64,
}

impl Entry {
    fn store_stack(&mut self, frames: Arc<[Frame]>) -> u32 {
        match self.free.pop() {
            Some(id) => {
                self.stacks[id as usize] = Some(frames);
                id
            }
            None => {
                self.stacks.push(Some(frames));
                (self.stacks.len() - 1) as u32
            }
        }
    }

    fn live_stacks(&self) -> usize {
        self.stacks.len() - self.free.len()
    }

    /// The synthetic `[stack table full]` stack, stored on first use.
    fn overflow_id(&mut self) -> u32 {
        if let Some(id) = self.overflow_id {
            return id;
        }
        let id = self.store_stack(vec![Frame::Overflow].into());
        self.overflow_id = Some(id);
        id
    }

    /// Counts `n` samples of stack `id` in second `second`.
    fn add(&mut self, second: u64, id: u32, n: u64) {
        self.samples += n;
        match self.buckets.back_mut() {
            Some(b) if b.second == second => *b.counts.entry(id).or_insert(0) += n,
            Some(b) if b.second > second => {
                // A late sample (clock step): count it in the newest bucket.
                *b.counts.entry(id).or_insert(0) += n;
            }
            _ => {
                let mut counts = HashMap::new();
                counts.insert(id, n);
                self.buckets.push_back(Bucket { second, counts });
            }
        }
    }

    /// Drops buckets before `oldest` and the stacks no bucket refers to.
    fn expire(&mut self, oldest: u64) -> u64 {
        let mut dropped = false;
        while self.buckets.front().is_some_and(|b| b.second < oldest) {
            self.buckets.pop_front();
            dropped = true;
        }
        if !dropped {
            return 0;
        }
        let mut used = vec![false; self.stacks.len()];
        for b in &self.buckets {
            for id in b.counts.keys() {
                if let Some(u) = used.get_mut(*id as usize) {
                    *u = true;
                }
            }
        }
        let mut collected = 0;
        self.intern.retain(|_, id| {
            let keep = used.get(*id as usize).copied().unwrap_or(false);
            if !keep {
                collected += 1;
            }
            keep
        });
        for (id, slot) in self.stacks.iter_mut().enumerate() {
            if slot.is_some() && !used[id] {
                *slot = None;
                self.free.push(id as u32);
                if self.overflow_id == Some(id as u32) {
                    self.overflow_id = None;
                }
            }
        }
        collected
    }

    /// Counts per stack over buckets with `second >= from` and `< until`.
    fn counts(&self, from: u64, until: u64) -> HashMap<u32, u64> {
        let mut out = HashMap::new();
        for b in self
            .buckets
            .iter()
            .filter(|b| b.second >= from && b.second < until)
        {
            for (id, c) in &b.counts {
                *out.entry(*id).or_insert(0) += c;
            }
        }
        out
    }

    fn add_to_profile(&self, profile: &mut Profile, from: u64, until: u64) {
        for (id, c) in self.counts(from, until) {
            if let Some(Some(frames)) = self.stacks.get(id as usize) {
                profile.add(frames.to_vec(), c);
            }
        }
    }
}

/// Everything the daemon holds about profiled processes.
pub struct Store {
    limits: StoreLimits,
    rate_hz: u32,
    entries: HashMap<u32, Entry>,
    pub stats: StoreStats,
    /// Symbol statistics of processes already removed.
    retired_symbols: SymbolStats,
    /// The next entry's `generation`.
    next_generation: u64,
    /// CPython processes refused for their version or build, oldest first,
    /// with when; at most [`MAX_UNSUPPORTED`].
    unsupported: VecDeque<(UnsupportedProcess, SystemTime)>,
}

/// A CPython process discovery refused for its version or build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsupportedProcess {
    pub labels: ProcessLabels,
    pub start_time: u64,
    /// e.g. "3.16.0" (without the `t` of a free-threaded build).
    pub python_version: String,
    pub free_threaded: bool,
    /// Why it is not profiled (the inspection's message).
    pub reason: String,
}

impl UnsupportedProcess {
    /// Its `python` label: "3.16", "3.14t".
    pub fn python(&self) -> String {
        python_label(&self.python_version, self.free_threaded)
    }
}

/// What a new process brings to the store.
pub struct NewProcess {
    pub labels: ProcessLabels,
    pub start_time: u64,
    pub python_version: String,
    /// How its code objects are read.
    pub code_format: CodeFormat,
}

impl Store {
    pub fn new(limits: StoreLimits, rate_hz: u32) -> Self {
        Store {
            limits,
            rate_hz,
            entries: HashMap::new(),
            stats: StoreStats::default(),
            retired_symbols: SymbolStats::default(),
            next_generation: 0,
            unsupported: VecDeque::new(),
        }
    }

    pub fn set_limits(&mut self, limits: StoreLimits) {
        self.limits = limits;
    }

    pub fn retention_secs(&self) -> u32 {
        self.limits.retention_secs
    }

    /// Starts holding a process; `false` if `max_processes` are held. A pid
    /// already held (reused by a new process) is replaced.
    pub fn add_process(&mut self, p: NewProcess, now: SystemTime) -> bool {
        let mem = TargetMemory::new(ProcessMemory::new(p.labels.pid));
        self.add_process_reading(p, now, mem)
    }

    /// [`Store::add_process`], with code objects read from `mem`.
    pub fn add_process_reading(
        &mut self,
        p: NewProcess,
        now: SystemTime,
        mem: TargetMemory,
    ) -> bool {
        let pid = p.labels.pid;
        if let Some(old) = self.entries.remove(&pid) {
            self.retire(old);
        }
        // Whatever ran under this pid before is not what runs now.
        self.unsupported.retain(|(u, _)| u.labels.pid != pid);
        if self.entries.len() >= self.limits.max_processes {
            self.stats.processes_refused += 1;
            return false;
        }
        self.entries.insert(
            pid,
            Entry {
                symbols: Arc::new(Mutex::new(Symbolizer::new(mem, p.code_format))),
                symbol_stats: SymbolStats::default(),
                labels: p.labels,
                start_time: p.start_time,
                generation: self.next_generation,
                python_version: p.python_version,
                free_threaded: false,
                since: now,
                exited_at: None,
                intern: FastHashMap::default(),
                stacks: Vec::new(),
                free: Vec::new(),
                overflow_id: None,
                buckets: VecDeque::new(),
                samples: 0,
            },
        );
        self.next_generation += 1;
        true
    }

    fn retire(&mut self, e: Entry) {
        self.retired_symbols += e.symbol_stats;
    }

    pub fn holds(&self, pid: u32, start_time: u64) -> bool {
        self.entries
            .get(&pid)
            .is_some_and(|e| e.start_time == start_time && e.exited_at.is_none())
    }

    /// Live (not exited) processes: pid and start time.
    pub fn live(&self) -> Vec<(u32, u64)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.exited_at.is_none())
            .map(|(pid, e)| (*pid, e.start_time))
            .collect()
    }

    /// Marks a process exited; its data stays queryable until it expires.
    pub fn mark_exited(&mut self, pid: u32, now: SystemTime) {
        if let Some(e) = self.entries.get_mut(&pid) {
            e.exited_at.get_or_insert(unix_secs(now));
        }
        // An unsupported process that exits (or execs) is no longer listed.
        self.unsupported.retain(|(u, _)| u.labels.pid != pid);
    }

    /// Lists `p` as unsupported (since `now`); `false` if it already was
    /// (same pid, start time and version): the caller counts and logs it
    /// only once per process. The oldest is dropped beyond
    /// [`MAX_UNSUPPORTED`] (counted in `stats.unsupported_evicted`).
    pub fn add_unsupported(&mut self, p: UnsupportedProcess, now: SystemTime) -> bool {
        let pid = p.labels.pid;
        if let Some(i) = self
            .unsupported
            .iter()
            .position(|(u, _)| u.labels.pid == pid)
        {
            let old = &self.unsupported[i].0;
            if old.start_time == p.start_time
                && old.python_version == p.python_version
                && old.free_threaded == p.free_threaded
            {
                return false;
            }
            self.unsupported.remove(i);
        }
        while self.unsupported.len() >= MAX_UNSUPPORTED {
            self.unsupported.pop_front();
            self.stats.unsupported_evicted += 1;
            if self.stats.unsupported_evicted == 1 {
                tracing::warn!(
                    "more than {MAX_UNSUPPORTED} unsupported CPython processes: \
                     /processes?all=1 lists the latest {MAX_UNSUPPORTED}"
                );
            }
        }
        self.unsupported.push_back((p, now));
        true
    }

    /// Adds one sample, symbolising its stack if new: all three steps with
    /// the store at hand (see `Shared::add_samples` for the locked store).
    pub fn add_sample(&mut self, s: RawSample, now: SystemTime) {
        self.add_samples(std::iter::once(s), now);
    }

    /// [`Store::add_sample`] for a batch.
    pub fn add_samples(&mut self, samples: impl IntoIterator<Item = RawSample>, now: SystemTime) {
        let pending = self.begin_batch(samples, now);
        if !pending.is_empty() {
            self.insert(pending.resolve());
        }
    }

    /// Step one of adding samples (all counted at `now`): counts those whose
    /// stack is interned, and those over the per-process stack cap under
    /// `[stack table full]`; returns the distinct new stacks, with their
    /// counts, to resolve. Slots for them are reserved against the cap, so
    /// the cap holds as if they had been interned one by one.
    pub fn begin_batch(
        &mut self,
        samples: impl IntoIterator<Item = RawSample>,
        now: SystemTime,
    ) -> Pending {
        let second = unix_secs(now);
        let cap = self.limits.max_stacks_per_process;
        let mut procs: Vec<PendingProcess> = Vec::new();
        // Index in `procs` of each pid, and, for each of `procs`, where each
        // of its new stacks is in its `stacks`.
        let mut at_pid: HashMap<u32, usize> = HashMap::new();
        let mut seen: Vec<FastHashMap<RawKey, usize>> = Vec::new();
        for s in samples {
            let pid = s.pid;
            let Some(e) = self.entries.get_mut(&pid) else {
                self.stats.foreign_samples += 1;
                continue;
            };
            let key = RawKey::of(s);
            if let Some(&id) = e.intern.get(&key) {
                self.stats.samples += 1;
                e.add(second, id, 1);
                continue;
            }
            let at = at_pid.get(&pid).copied();
            if let Some(at) = at {
                if let Some(&k) = seen[at].get(&key) {
                    procs[at].stacks[k].1 += 1;
                    continue;
                }
            }
            let reserved = at.map_or(0, |at| procs[at].stacks.len());
            if e.live_stacks() + reserved >= cap {
                self.stats.samples += 1;
                self.stats.stacks_overflowed += 1;
                let id = e.overflow_id();
                e.add(second, id, 1);
                continue;
            }
            let at = match at {
                Some(at) => at,
                None => {
                    procs.push(PendingProcess {
                        pid,
                        generation: e.generation,
                        symbols: e.symbols.clone(),
                        stacks: Vec::new(),
                    });
                    seen.push(FastHashMap::default());
                    at_pid.insert(pid, procs.len() - 1);
                    procs.len() - 1
                }
            };
            seen[at].insert(key.clone(), procs[at].stacks.len());
            procs[at].stacks.push((key, 1));
        }
        Pending { second, procs }
    }

    /// Step three: interns and counts resolved stacks. Stacks of a process
    /// removed or replaced meanwhile are counted as foreign samples.
    ///
    /// The cap is not checked again: `begin_batch` reserved the slots (and
    /// may have taken one more for `[stack table full]` since, as one by one
    /// it would have after them). Only batches overlapping (the daemon adds
    /// one at a time) or a cap lowered in between (a reload) can exceed it,
    /// by at most a batch, until expiry.
    pub fn insert(&mut self, r: Resolved) {
        for p in r.procs {
            let entry = self.entries.get_mut(&p.pid);
            let Some(e) = entry.filter(|e| e.generation == p.generation) else {
                self.stats.foreign_samples += p.stacks.iter().map(|s| s.2).sum::<u64>();
                self.retired_symbols += p.symbol_stats;
                continue;
            };
            e.symbol_stats += p.symbol_stats;
            for (key, frames, n) in p.stacks {
                self.stats.samples += n;
                // Interned meanwhile only if batches overlapped.
                let id = match e.intern.get(&key) {
                    Some(&id) => id,
                    None => {
                        let id = e.store_stack(frames);
                        e.intern.insert(key, id);
                        id
                    }
                };
                e.add(r.second, id, n);
            }
        }
    }

    /// Drops data older than the retention, and exited processes with none left.
    pub fn expire(&mut self, now: SystemTime) {
        let oldest = unix_secs(now).saturating_sub(u64::from(self.limits.retention_secs));
        let mut gone = Vec::new();
        for (pid, e) in &mut self.entries {
            self.stats.stacks_collected += e.expire(oldest);
            if e.exited_at.is_some() && e.buckets.is_empty() {
                gone.push(*pid);
            }
        }
        for pid in gone {
            if let Some(e) = self.entries.remove(&pid) {
                self.retire(e);
            }
        }
    }

    /// Symbolisation statistics over every process ever held.
    pub fn symbol_stats(&self) -> SymbolStats {
        let mut t = self.retired_symbols;
        for s in self.entries.values().map(|e| e.symbol_stats) {
            t += s;
        }
        t
    }

    pub fn processes_profiled(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.exited_at.is_none())
            .count()
    }

    /// How many processes are profiled now, by `python` label ("3.11",
    /// "3.14t").
    pub fn processes_profiled_by_python(&self) -> BTreeMap<String, usize> {
        let mut by = BTreeMap::new();
        for e in self.entries.values().filter(|e| e.exited_at.is_none()) {
            *by.entry(python_label(&e.python_version, e.free_threaded))
                .or_insert(0) += 1;
        }
        by
    }

    /// Every process held, by pid (profiled, and exited ones while their
    /// data is retained), then the unsupported ones by pid (without
    /// samples). An unsupported process whose pid is still held for an
    /// exited one is left out until that one expires, so that a pid is
    /// listed once.
    pub fn views(&self) -> Vec<ProcessView> {
        let mut v: Vec<_> = self
            .entries
            .values()
            .map(|e| ProcessView {
                labels: e.labels.clone(),
                python_version: e.python_version.clone(),
                python: python_label(&e.python_version, e.free_threaded),
                status: if e.exited_at.is_some() {
                    STATUS_EXITED
                } else {
                    STATUS_PROFILED
                },
                since: unix_secs(e.since),
                samples: e.buckets.iter().flat_map(|b| b.counts.values()).sum(),
                reason: None,
            })
            .collect();
        v.sort_by_key(|p| p.labels.pid);
        let held: HashSet<u32> = self.entries.keys().copied().collect();
        let mut unsupported: Vec<_> = self
            .unsupported
            .iter()
            .filter(|(u, _)| !held.contains(&u.labels.pid))
            .map(|(u, at)| ProcessView {
                labels: u.labels.clone(),
                python_version: u.python_version.clone(),
                python: u.python(),
                status: STATUS_UNSUPPORTED,
                since: unix_secs(*at),
                samples: 0,
                reason: Some(u.reason.clone()),
            })
            .collect();
        unsupported.sort_by_key(|p| p.labels.pid);
        v.extend(unsupported);
        v
    }

    /// The last `seconds` seconds (the current, partial second included).
    pub fn query(
        &self,
        selector: &Selector,
        seconds: u32,
        now: SystemTime,
    ) -> Result<Profile, QueryError> {
        if seconds == 0 || seconds > self.limits.retention_secs {
            return Err(QueryError::BadRequest(format!(
                "seconds must be between 1 and {} (the retention)",
                self.limits.retention_secs
            )));
        }
        let until = unix_secs(now) + 1;
        let from = until.saturating_sub(u64::from(seconds));
        let mut profile = Profile::new(self.rate_hz);
        let mut found = false;
        for e in self.select(selector) {
            found = true;
            e.add_to_profile(&mut profile, from, until);
        }
        if !found {
            return Err(QueryError::NotFound(match selector {
                Selector::Pid(p) => format!("process {p} is not profiled"),
                Selector::Service(s) => format!("no profiled process has service {s:?}"),
            }));
        }
        profile.start = Some(UNIX_EPOCH + std::time::Duration::from_secs(from));
        profile.duration = std::time::Duration::from_secs(u64::from(seconds));
        Ok(profile)
    }

    fn select<'a>(&'a self, selector: &'a Selector) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries.values().filter(move |e| match selector {
            Selector::Pid(p) => e.labels.pid == *p,
            Selector::Service(s) => e.labels.service == *s,
        })
    }

    /// One profile per process over `[from, until)` unix seconds, for window
    /// exports; processes without samples there are left out.
    pub fn window(&self, from: u64, until: u64) -> Vec<(ProcessLabels, Profile)> {
        let mut out = Vec::new();
        for e in self.entries.values() {
            let mut p = Profile::new(self.rate_hz);
            e.add_to_profile(&mut p, from, until);
            if p.total_samples() > 0 {
                p.start = Some(UNIX_EPOCH + std::time::Duration::from_secs(from));
                p.duration = std::time::Duration::from_secs(until.saturating_sub(from));
                out.push((e.labels.clone(), p));
            }
        }
        out.sort_by_key(|(l, _)| l.pid);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn labels(pid: u32, service: &str) -> ProcessLabels {
        ProcessLabels::python3(pid, service)
    }

    fn store(max_stacks: usize) -> Store {
        Store::new(
            StoreLimits {
                retention_secs: 10,
                max_processes: 2,
                max_stacks_per_process: max_stacks,
            },
            100,
        )
    }

    fn sample(pid: u32, code: u64) -> RawSample {
        RawSample::one_frame(pid, code, 1)
    }

    fn new_proc(pid: u32, service: &str) -> NewProcess {
        NewProcess {
            labels: labels(pid, service),
            start_time: 1,
            python_version: "3.11.7".into(),
            code_format: crate::python::code::test_code::format(),
        }
    }

    #[test]
    fn buckets_answer_any_span_up_to_retention() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(100);
        assert!(s.add_process(new_proc(1, "a"), t0));
        for i in 0..5 {
            s.add_sample(sample(1, 8), t0 + Duration::from_secs(i));
        }
        let now = t0 + Duration::from_secs(4);
        assert_eq!(
            s.query(&Selector::Pid(1), 1, now).unwrap().total_samples(),
            1
        );
        assert_eq!(
            s.query(&Selector::Pid(1), 3, now).unwrap().total_samples(),
            3
        );
        assert_eq!(
            s.query(&Selector::Pid(1), 10, now).unwrap().total_samples(),
            5
        );
        assert!(matches!(
            s.query(&Selector::Pid(1), 11, now),
            Err(QueryError::BadRequest(_))
        ));
        assert!(matches!(
            s.query(&Selector::Pid(2), 1, now),
            Err(QueryError::NotFound(_))
        ));
        assert_eq!(s.window(1_000, 1_002)[0].1.total_samples(), 2);
    }

    #[test]
    fn unreadable_code_becomes_an_explicit_unknown_frame() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(100);
        s.add_process(new_proc(std::process::id(), "a"), t0);
        s.add_sample(sample(std::process::id(), 8), t0);
        let p = s.query(&Selector::Pid(std::process::id()), 1, t0).unwrap();
        let (stack, _) = p.stacks.iter().next().unwrap();
        assert!(matches!(stack[0], Frame::Unknown { .. }));
        assert_eq!(s.symbol_stats().unreadable, 1);
    }

    #[test]
    fn stack_table_is_capped_with_a_visible_overflow() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(3);
        s.add_process(new_proc(1, "a"), t0);
        for code in 0..10 {
            s.add_sample(sample(1, 8 + code * 8), t0);
        }
        assert_eq!(s.stats.stacks_overflowed, 7);
        let p = s.query(&Selector::Pid(1), 1, t0).unwrap();
        assert_eq!(p.total_samples(), 10);
        assert_eq!(p.stacks.get(&vec![Frame::Overflow]), Some(&7));
    }

    #[test]
    fn a_batch_counts_as_samples_added_one_by_one() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        // New stacks repeated within the batch, a known one, a foreign pid,
        // and more new stacks than the cap leaves room for.
        let codes = [8, 16, 8, 24, 32, 16, 40, 48, 8, 56];
        let mut one = store(4);
        let mut batch = store(4);
        for s in [&mut one, &mut batch] {
            s.add_process(new_proc(1, "a"), t0);
            s.add_sample(sample(1, 8), t0);
        }
        for code in codes {
            one.add_sample(sample(1, code), t0);
        }
        one.add_sample(sample(9, 8), t0);
        let samples = codes.map(|c| sample(1, c)).into_iter();
        let pending = batch.begin_batch(samples.chain([sample(9, 8)]), t0);
        assert_eq!(pending.procs.len(), 1);
        assert_eq!(pending.procs[0].stacks.len(), 3, "16, 24, 32: room for 3");
        batch.insert(pending.resolve());
        assert_eq!(batch.stats, one.stats);
        assert_eq!(batch.stats.stacks_overflowed, 3, "40, 48, 56");
        assert_eq!(batch.symbol_stats(), one.symbol_stats());
        let q = |s: &Store| s.query(&Selector::Pid(1), 1, t0).unwrap().stacks;
        assert_eq!(q(&batch), q(&one));
        assert_eq!(q(&batch).get(&vec![Frame::Overflow]), Some(&3));
    }

    #[test]
    fn a_process_replaced_while_resolving_gets_none_of_its_stacks() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(100);
        s.add_process(new_proc(1, "a"), t0);
        let pending = s.begin_batch([sample(1, 8), sample(1, 8)], t0);
        let resolved = pending.resolve();
        let mut reused = new_proc(1, "new");
        reused.start_time = 2;
        assert!(s.add_process(reused, t0));
        s.insert(resolved);
        assert_eq!(s.stats.foreign_samples, 2);
        assert_eq!(s.stats.samples, 0);
        assert_eq!(
            s.query(&Selector::Pid(1), 1, t0).unwrap().total_samples(),
            0
        );
        // Its symbol statistics are kept, as a removed process's are.
        assert_eq!(s.symbol_stats().misses, 1);
    }

    #[test]
    fn expiry_frees_stacks_and_exited_processes() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(100);
        s.add_process(new_proc(1, "a"), t0);
        s.add_sample(sample(1, 8), t0);
        s.mark_exited(1, t0);
        assert_eq!(s.views()[0].status, "exited");
        s.expire(t0 + Duration::from_secs(5));
        assert_eq!(
            s.views().len(),
            1,
            "kept while its data is within retention"
        );
        s.expire(t0 + Duration::from_secs(11));
        assert!(s.views().is_empty());
        assert_eq!(s.stats.stacks_collected, 1);
    }

    fn unsupported(pid: u32, start_time: u64, version: &str) -> UnsupportedProcess {
        UnsupportedProcess {
            labels: ProcessLabels {
                pid,
                command: "python3".into(),
                ..Default::default()
            },
            start_time,
            python_version: version.into(),
            free_threaded: false,
            reason: format!("process {pid} runs Python {version}; not supported"),
        }
    }

    #[test]
    fn views_carry_the_python_label_and_list_unsupported_processes_last() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = Store::new(
            StoreLimits {
                retention_secs: 10,
                max_processes: 10,
                max_stacks_per_process: 10,
            },
            100,
        );
        let mut p = new_proc(5, "a");
        p.python_version = "3.14.10".into();
        s.add_process(p, t0);
        s.add_process(new_proc(9, "b"), t0);
        s.add_process(new_proc(12, "c"), t0);
        s.mark_exited(12, t0);
        let by: Vec<(String, usize)> = s.processes_profiled_by_python().into_iter().collect();
        assert_eq!(by, [("3.11".to_string(), 1), ("3.14".to_string(), 1)]);

        assert!(s.add_unsupported(unsupported(3, 7, "3.16.0"), t0));
        let mut ft = unsupported(7, 7, "3.14.2");
        ft.free_threaded = true;
        assert!(s.add_unsupported(ft, t0 + Duration::from_secs(1)));
        let v = s.views();
        let got: Vec<(u32, &str, &str, &str)> = v
            .iter()
            .map(|v| {
                (
                    v.labels.pid,
                    v.status,
                    v.python.as_str(),
                    v.python_version.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (5, "profiled", "3.14", "3.14.10"),
                (9, "profiled", "3.11", "3.11.7"),
                (12, "exited", "3.11", "3.11.7"),
                (3, "unsupported", "3.16", "3.16.0"),
                (7, "unsupported", "3.14t", "3.14.2"),
            ]
        );
        assert!(v[..3].iter().all(|v| v.reason.is_none()));
        assert_eq!(
            v[3].reason.as_deref(),
            Some("process 3 runs Python 3.16.0; not supported")
        );
        assert_eq!((v[3].since, v[4].since, v[4].samples), (1_000, 1_001, 0));
        // Unsupported processes are not profiled ones.
        assert_eq!(s.processes_profiled(), 2);
        assert!(s.query(&Selector::Pid(3), 1, t0).is_err());

        // The same process again (a reload inspects it anew): listed once,
        // and the caller is told not to count it again.
        assert!(!s.add_unsupported(unsupported(3, 7, "3.16.0"), t0 + Duration::from_secs(5)));
        assert_eq!(s.views().iter().filter(|v| v.labels.pid == 3).count(), 1);
        // Another process under the pid (reused, or exec'd): new.
        assert!(s.add_unsupported(unsupported(3, 8, "3.16.0"), t0));
        assert!(s.add_unsupported(unsupported(3, 8, "3.10.4"), t0));
        assert_eq!(s.views().iter().filter(|v| v.labels.pid == 3).count(), 1);
        // It exits (or execs): gone from the list.
        s.mark_exited(3, t0);
        assert!(!s.views().iter().any(|v| v.labels.pid == 3));
        // A pid still held for an exited process is listed once, as that.
        assert!(s.add_unsupported(unsupported(12, 9, "3.16.0"), t0));
        let twelve: Vec<_> = s
            .views()
            .into_iter()
            .filter(|v| v.labels.pid == 12)
            .collect();
        assert_eq!(twelve.len(), 1);
        assert_eq!(twelve[0].status, "exited");
        s.expire(t0 + Duration::from_secs(20));
        let twelve: Vec<_> = s
            .views()
            .into_iter()
            .filter(|v| v.labels.pid == 12)
            .collect();
        assert_eq!(twelve[0].status, "unsupported");
        // A profiled process replaces an unsupported one of its pid.
        s.add_process(new_proc(7, "d"), t0);
        let seven: Vec<_> = s
            .views()
            .into_iter()
            .filter(|v| v.labels.pid == 7)
            .collect();
        assert_eq!(seven.len(), 1);
        assert_eq!(seven[0].status, "profiled");
    }

    #[test]
    fn unsupported_list_is_bounded() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(10);
        let n = MAX_UNSUPPORTED as u32 + 10;
        for pid in 1..=n {
            assert!(s.add_unsupported(unsupported(pid, 1, "3.16.0"), t0));
        }
        let v = s.views();
        assert_eq!(v.len(), MAX_UNSUPPORTED);
        assert_eq!(s.stats.unsupported_evicted, 10);
        // The oldest went first.
        assert_eq!(v[0].labels.pid, 11);
        assert_eq!(v.last().unwrap().labels.pid, n);
        // An evicted one seen again is new again.
        assert!(s.add_unsupported(unsupported(1, 1, "3.16.0"), t0));
        assert_eq!(s.stats.unsupported_evicted, 11);
    }

    #[test]
    fn process_cap_and_pid_reuse() {
        let t0 = UNIX_EPOCH;
        let mut s = store(100);
        assert!(s.add_process(new_proc(1, "a"), t0));
        assert!(s.add_process(new_proc(2, "b"), t0));
        assert!(!s.add_process(new_proc(3, "c"), t0));
        assert_eq!(s.stats.processes_refused, 1);
        s.add_sample(sample(1, 8), t0);
        // pid 1 reused by another process: fresh entry, old data gone.
        let mut reused = new_proc(1, "new");
        reused.start_time = 2;
        assert!(s.add_process(reused, t0));
        assert!(s.holds(1, 2) && !s.holds(1, 1));
        assert_eq!(
            s.query(&Selector::Pid(1), 1, t0).unwrap().total_samples(),
            0
        );
        assert!(s.query(&Selector::Service("new".into()), 1, t0).is_ok());
    }
}
