//! Per-process stacks in one-second buckets, bounded in bytes: the one
//! store behind the daemon, `pyebpf top`'s local mode and `pyebpf record`.
//!
//! A raw stack (code objects and instruction indexes) is symbolised when a
//! process first shows it, while its code objects are alive, into a stack of
//! line-level frames interned in the process's [`StackTable`]: many raw
//! stacks (instructions on the same lines) share one stack there. A
//! byte-bounded LRU maps raw stacks to their stack ids, so repeated samples
//! cost a hash lookup. Buckets only hold `(stack id, count)` pairs, and
//! queries merge the buckets they cover, so any `seconds` up to the
//! retention is answered at once.
//!
//! Memory is bounded in bytes, per process and in total (frames, stacks,
//! buckets, the raw-stack cache and the symbol cache). A new stack that does
//! not fit first evicts the oldest seconds (of its process, or of the
//! largest process when the total is the limit), counted; only when nothing
//! older is left are its samples counted under `[stack table full]`.
//!
//! Samples are added in three steps so that symbolisation, which reads the
//! target's memory, never runs under the lock the HTTP API shares:
//! [`Store::begin_batch`] counts samples of cached raw stacks and returns the
//! new ones, [`Pending::resolve`] symbolises them without touching the
//! store, and [`Store::insert`] interns and counts them.
mod raw;
mod stacks;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use lru::LruCache;

use crate::bpf::events::{RawSample, SampleKind};
use crate::model::labels::{python_label, ProcessLabels};
use crate::model::query::{
    ProcessView, QueryError, Selector, STATUS_EXITED, STATUS_FAILED, STATUS_PROFILED,
    STATUS_REPLACED, STATUS_UNSUPPORTED,
};
use crate::native::kernel::KernelSymbols;
use crate::native::service::NativeService;
use crate::native::user::NativeSymbol;
use crate::process::memory::{MemoryError, ProcessMemory, RemoteMemory};
use crate::profile::{CompactProfile, Frame, ProfileKind, ValueUnit};
use crate::python::code::CodeFormat;
use crate::python::symbolizer::{SymbolStats, Symbolizer};
use crate::FastHashMap;
use raw::{symbolise, RawKey};
use stacks::{StackId, StackTable};

/// Whole seconds since the Unix epoch (0 for a time before it): the
/// store's buckets are keyed by them.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Limits of the store.
#[derive(Clone, Copy, Debug)]
pub struct StoreLimits {
    pub retention_secs: u32,
    pub max_processes: usize,
    /// Most distinct (line-level) stacks per process.
    pub max_stacks_per_process: usize,
    /// Bytes all processes may hold together.
    pub max_bytes: usize,
    /// Bytes one process may hold.
    pub max_bytes_per_process: usize,
}

impl StoreLimits {
    /// The byte bound of each of a process's two caches (symbols, raw
    /// stacks) when `processes` are held: a quarter of its share, so that
    /// at least half of it is left for its stacks and counts.
    fn cache_bytes(&self, processes: usize) -> usize {
        let share = self.max_bytes / processes.max(1);
        self.max_bytes_per_process.min(share) / 4
    }
}

/// Counters of what the store had to refuse or drop. Counts of samples
/// are sample counts, except `samples_evicted`, which is in the store's
/// value unit (samples, or nanoseconds for wall and off-CPU stores).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Samples added.
    pub samples: u64,
    /// Samples from a pid the store does not hold.
    pub foreign_samples: u64,
    /// Samples of a kind the store does not hold (off-CPU samples in a CPU
    /// store, CPU samples in an off-CPU one).
    pub other_kind_samples: u64,
    /// Samples whose stack was new while it could not be stored (stack cap
    /// or byte budget reached with nothing older left to evict): counted
    /// under a synthetic `[stack table full]` stack instead.
    pub stacks_overflowed: u64,
    /// Stacks freed because every second counting them expired.
    pub stacks_collected: u64,
    /// Stacks freed early, with the seconds evicted to fit the budgets.
    pub stacks_evicted: u64,
    /// Samples of seconds evicted before the end of the retention to fit
    /// the budgets.
    pub samples_evicted: u64,
    /// Off-CPU nanoseconds of those seconds (a store with off-CPU sampling).
    pub off_cpu_ns_evicted: u64,
    /// Seconds (one process's bucket each) evicted to fit the budgets.
    pub seconds_evicted: u64,
    /// Raw stacks dropped from the per-process raw-stack caches (least
    /// recently used first).
    pub raw_cache_evictions: u64,
    /// Processes refused because `max_processes` were held.
    pub processes_refused: u64,
    /// Unsupported processes dropped from the list of them (the oldest, to
    /// keep at most [`MAX_UNSUPPORTED`]).
    pub unsupported_evicted: u64,
}

/// Bytes the store holds, by what holds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreBytes {
    /// Interned frames and stacks.
    pub stacks: usize,
    /// One-second buckets of counts.
    pub buckets: usize,
    /// Raw-stack caches.
    pub raw_cache: usize,
    /// Symbol caches (as of their last use).
    pub symbols: usize,
}

impl StoreBytes {
    pub fn total(&self) -> usize {
        self.stacks + self.buckets + self.raw_cache + self.symbols
    }
}

/// Most unsupported processes listed; the oldest is dropped for a new one.
pub const MAX_UNSUPPORTED: usize = 256;

/// Bytes a bucket costs beyond its entries.
const BUCKET_OVERHEAD: usize = 64;
/// Bytes a `(stack id, count)` entry of a bucket costs, load factor included.
const BUCKET_ENTRY: usize = 24;
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

/// New stacks of a batch, to symbolise without the store lock.
pub struct Pending {
    second: u64,
    kernel: Option<Arc<KernelSymbols>>,
    native: Option<Arc<NativeService>>,
    procs: Vec<PendingProcess>,
}

struct PendingProcess {
    pid: u32,
    generation: u64,
    symbols: Symbols,
    /// The symbol cache's byte bound now.
    symbol_bytes: usize,
    /// Distinct new raw stacks, their sample counts and values.
    stacks: Vec<(RawKey, u64, u64)>,
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
    /// Bytes its symbol cache holds after resolving.
    symbol_bytes: usize,
    /// Raw stack, its frames, sample count and value.
    stacks: Vec<(RawKey, Vec<Frame>, u64, u64)>,
}

/// The root frame of thread `tid` of `pid`, named by its `comm` now (a
/// thread gone since is named `[exited]`).
fn thread_frame(pid: u32, tid: u32) -> Frame {
    let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| "[exited]".to_string());
    Frame::Thread {
        tid,
        name: name.into(),
    }
}

impl Pending {
    /// True when the batch had no new stack: nothing to resolve or insert.
    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// The symbols of the new stacks' native addresses, named in one
    /// request.
    fn native_symbols(&self) -> FastHashMap<(u32, u64), Arc<NativeSymbol>> {
        let Some(service) = &self.native else {
            return FastHashMap::default();
        };
        let lookups: Vec<(u32, u64)> = self
            .procs
            .iter()
            .flat_map(|p| {
                p.stacks
                    .iter()
                    .flat_map(move |(k, ..)| k.native().lookups().iter().map(move |a| (p.pid, *a)))
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if lookups.is_empty() {
            return FastHashMap::default();
        }
        let names = service.name(lookups.clone());
        lookups.into_iter().zip(names).collect()
    }

    /// Symbolises the new stacks, reading code objects from target memory.
    /// Takes no store: call it with the store lock released.
    pub fn resolve(self) -> Resolved {
        let kernel = self.kernel.as_deref();
        let named = self.native_symbols();
        let procs = self
            .procs
            .into_iter()
            .map(|p| {
                // A panic while symbolising leaves at worst a partial cache.
                let mut symbols = p.symbols.lock().unwrap_or_else(|e| e.into_inner());
                symbols.set_max_bytes(p.symbol_bytes);
                let before = symbols.stats;
                // Read once per thread in the batch.
                let mut threads: FastHashMap<u32, Frame> = FastHashMap::default();
                let stacks = p
                    .stacks
                    .into_iter()
                    .map(|(key, n, value)| {
                        let native: Vec<Arc<NativeSymbol>> = key
                            .native()
                            .lookups()
                            .iter()
                            .filter_map(|a| named.get(&(p.pid, *a)).cloned())
                            .collect();
                        let thread = key.tid().map(|tid| {
                            threads
                                .entry(tid)
                                .or_insert_with(|| thread_frame(p.pid, tid))
                                .clone()
                        });
                        let frames = symbolise(&mut symbols, kernel, &native, thread, &key);
                        (key, frames, n, value)
                    })
                    .collect();
                ResolvedProcess {
                    pid: p.pid,
                    generation: p.generation,
                    symbol_stats: symbols.stats.since(&before),
                    symbol_bytes: symbols.bytes(),
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
    counts: FastHashMap<StackId, u64>,
}

/// One profiled process.
struct Entry {
    labels: ProcessLabels,
    start_time: u64,
    /// Unique over the store's life: tells a pid replaced (reused) while its
    /// new stacks were resolved from the entry they were resolved for.
    generation: u64,
    python_version: String,
    /// Its GIL state's addresses, if known: off-CPU samples blocked there
    /// are GIL waits.
    gil: Option<std::ops::Range<u64>>,
    /// A free-threaded build (`python` gets a `t`). Always false for now:
    /// inspection refuses those builds.
    free_threaded: bool,
    since: SystemTime,
    exited_at: Option<u64>,
    /// What the pid runs since an exec ended its Python program.
    replaced_by: Option<String>,
    symbols: Symbols,
    /// Symbolisation outcomes, added as resolved stacks are inserted.
    symbol_stats: SymbolStats,
    /// Bytes its symbol cache held at its last use.
    symbol_bytes: usize,
    /// Raw stack -> (stack id, that stack's serial): a stale id (its stack
    /// freed, the slot reused) is told by the serial.
    raw: LruCache<RawKey, (StackId, u64), foldhash::fast::RandomState>,
    raw_bytes: usize,
    table: StackTable,
    buckets: VecDeque<Bucket>,
    bucket_bytes: usize,
    /// Samples in `buckets`.
    retained_samples: u64,
    /// Counts per stack over all of `buckets`: a query of the whole
    /// retention reads this instead of every bucket.
    retained: FastHashMap<StackId, u64>,
    /// Samples of its seconds evicted to fit the budgets.
    evicted_samples: u64,
    /// Off-CPU nanoseconds in `buckets` (under [`OFF_TAG`] ids).
    retained_off_ns: u64,
    /// Off-CPU nanoseconds of its seconds evicted to fit the budgets.
    evicted_off_ns: u64,
    /// Since profiling started, never evicted: off-CPU ns waiting for the
    /// GIL, all off-CPU ns, CPU samples.
    gil_wait_ns: u64,
    off_cpu_ns: u64,
    cpu_samples: u64,
}

/// Marks a bucket count of off-CPU nanoseconds in a store holding both
/// kinds: the id without it is the stack's. Stack ids are dense indexes,
/// far below it.
const OFF_TAG: StackId = 1 << 31;

/// Which of a split store's counts a query reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sel {
    /// Every count as held (a store of one kind).
    All,
    /// CPU sample counts only.
    Cpu,
    /// Off-CPU nanoseconds only.
    Off,
    /// Both in nanoseconds: CPU samples count this many ns each.
    Wall(u64),
}

impl Sel {
    /// The count of tagged id `id`, as this selection reads it: its stack
    /// id and value, or `None` if it is not selected.
    fn pick(self, id: StackId, n: u64) -> Option<(StackId, u64)> {
        let off = id & OFF_TAG != 0;
        let stack = id & !OFF_TAG;
        match (self, off) {
            (Sel::All, _) => Some((id, n)),
            (Sel::Cpu, false) | (Sel::Off, true) => Some((stack, n)),
            (Sel::Wall(ns), false) => Some((stack, n.saturating_mul(ns))),
            (Sel::Wall(_), true) => Some((stack, n)),
            _ => None,
        }
    }
}

/// What evicting a process's oldest second freed.
struct Evicted {
    samples: u64,
    off_ns: u64,
    stacks: u64,
    bytes: usize,
}

impl Entry {
    /// Counts a sample of a split store in the since-start totals; returns
    /// the tag its bucket count goes under.
    fn tally(&mut self, key: &RawKey, value: u64) -> StackId {
        if key.off_cpu() {
            self.off_cpu_ns += value;
            if key.gil_wait() {
                self.gil_wait_ns += value;
            }
            OFF_TAG
        } else {
            self.cpu_samples += 1;
            0
        }
    }

    /// Wall nanoseconds of its threads since profiling started: CPU samples
    /// at `1e9 / rate_hz` ns each, plus off-CPU time.
    fn wall_ns(&self, rate_hz: u32) -> u64 {
        self.cpu_samples
            .saturating_mul(ProfileKind::Cpu.ns_per_value(rate_hz))
            .saturating_add(self.off_cpu_ns)
    }

    fn bytes(&self) -> usize {
        self.table.bytes()
            + self.bucket_bytes
            + BUCKET_ENTRY * self.retained.len()
            + self.raw_bytes
            + self.symbol_bytes
    }

    /// The cached stack id of raw stack `key`, if still valid.
    fn cached(&mut self, key: &RawKey) -> Option<StackId> {
        let &(id, serial) = self.raw.get(key)?;
        if self.table.serial(id) == Some(serial) {
            return Some(id);
        }
        if let Some((k, _)) = self.raw.pop_entry(key) {
            self.raw_bytes = self.raw_bytes.saturating_sub(k.bytes());
        }
        None
    }

    /// Caches `key` -> `id`, evicting the least recently used beyond
    /// `max_bytes`; returns how many were evicted.
    fn cache(&mut self, key: RawKey, id: StackId, max_bytes: usize) -> u64 {
        let Some(serial) = self.table.serial(id) else {
            return 0;
        };
        let size = key.bytes();
        if size > max_bytes {
            return 0;
        }
        let mut evicted = 0;
        while self.raw_bytes + size > max_bytes {
            match self.raw.pop_lru() {
                Some((k, _)) => {
                    self.raw_bytes = self.raw_bytes.saturating_sub(k.bytes());
                    evicted += 1;
                }
                None => {
                    self.raw_bytes = 0;
                    break;
                }
            }
        }
        if let Some((old, _)) = self.raw.push(key, (id, serial)) {
            // Same key replaced (or an LRU push-out, which unbounded never does).
            self.raw_bytes = self.raw_bytes.saturating_sub(old.bytes());
        }
        self.raw_bytes += size;
        evicted
    }

    /// Adds `n` (in the store's value unit) to stack `id` in second
    /// `second`.
    fn add(&mut self, second: u64, id: StackId, n: u64) {
        if id & OFF_TAG == 0 {
            self.retained_samples += n;
        } else {
            self.retained_off_ns += n;
        }
        *self.retained.entry(id).or_insert(0) += n;
        let b = match self.buckets.back_mut() {
            // A late sample (clock step) counts in the newest bucket.
            Some(b) if b.second >= second => b,
            _ => {
                self.bucket_bytes += BUCKET_OVERHEAD;
                self.buckets.push_back(Bucket {
                    second,
                    counts: FastHashMap::default(),
                });
                match self.buckets.back_mut() {
                    Some(b) => b,
                    None => return,
                }
            }
        };
        match b.counts.get_mut(&id) {
            Some(c) => *c += n,
            None => {
                b.counts.insert(id, n);
                self.bucket_bytes += BUCKET_ENTRY;
                self.table.retain(id & !OFF_TAG);
            }
        }
    }

    /// Drops the oldest bucket, releasing its stacks.
    fn pop_oldest(&mut self) -> Option<Evicted> {
        let b = self.buckets.pop_front()?;
        let before = self.bytes();
        let freed_bucket = BUCKET_OVERHEAD + BUCKET_ENTRY * b.counts.len();
        self.bucket_bytes = self.bucket_bytes.saturating_sub(freed_bucket);
        let mut ev = Evicted {
            samples: 0,
            off_ns: 0,
            stacks: 0,
            bytes: 0,
        };
        for (id, n) in b.counts {
            if id & OFF_TAG == 0 {
                ev.samples += n;
            } else {
                ev.off_ns += n;
            }
            if let Some(c) = self.retained.get_mut(&id) {
                *c = c.saturating_sub(n);
                if *c == 0 {
                    self.retained.remove(&id);
                }
            }
            if self.table.release(id & !OFF_TAG) {
                ev.stacks += 1;
            }
        }
        self.retained_samples = self.retained_samples.saturating_sub(ev.samples);
        self.retained_off_ns = self.retained_off_ns.saturating_sub(ev.off_ns);
        ev.bytes = before.saturating_sub(self.bytes());
        Some(ev)
    }

    /// Whether it has a second older than `second` to evict.
    fn can_evict_before(&self, second: u64) -> bool {
        self.buckets.front().is_some_and(|b| b.second < second)
    }

    /// Counts per stack over buckets with `second >= from` and `< until`.
    /// When the buckets outside the range hold fewer entries than those in
    /// it (a query of most of the retention), the running totals minus the
    /// outside buckets: a query of the whole retention costs O(stacks), not
    /// O(retention x stacks).
    fn counts(&self, from: u64, until: u64, sel: Sel) -> FastHashMap<StackId, u64> {
        let raw = self.raw_counts(from, until);
        if sel == Sel::All {
            return raw;
        }
        let mut out = FastHashMap::default();
        for (id, n) in raw {
            if let Some((stack, v)) = sel.pick(id, n) {
                *out.entry(stack).or_insert(0) += v;
            }
        }
        out
    }

    /// [`Entry::counts`] by tagged id.
    fn raw_counts(&self, from: u64, until: u64) -> FastHashMap<StackId, u64> {
        let inside = |b: &&Bucket| b.second >= from && b.second < until;
        let (mut in_entries, mut out_entries) = (0, 0);
        for b in &self.buckets {
            if inside(&b) {
                in_entries += b.counts.len();
            } else {
                out_entries += b.counts.len();
            }
        }
        if out_entries < in_entries {
            let mut out = self.retained.clone();
            for b in self.buckets.iter().filter(|b| !inside(b)) {
                for (id, c) in &b.counts {
                    if let Some(t) = out.get_mut(id) {
                        *t = t.saturating_sub(*c);
                        if *t == 0 {
                            out.remove(id);
                        }
                    }
                }
            }
            return out;
        }
        let mut out = FastHashMap::default();
        for b in self.buckets.iter().filter(inside) {
            for (id, c) in &b.counts {
                *out.entry(*id).or_insert(0) += c;
            }
        }
        out
    }

    /// Its samples over `[from, until)` by leaf frame only: one-frame
    /// stacks, for per-function metrics when no window is exported.
    fn leaves(&self, rate_hz: u32, from: u64, until: u64, sel: Sel) -> CompactProfile {
        let mut by_leaf: FastHashMap<stacks::FrameId, u64> = FastHashMap::default();
        for (id, n) in self.counts(from, until, sel) {
            if let Some(&leaf) = self.table.stack(id).and_then(|s| s.last()) {
                *by_leaf.entry(leaf).or_insert(0) += n;
            }
        }
        let mut leaves: Vec<_> = by_leaf.into_iter().collect();
        leaves.sort_unstable();
        let mut out = CompactProfile::new(rate_hz);
        for (leaf, n) in leaves {
            if let Some(f) = self.table.frame(leaf) {
                let i = out.push_frame(f.clone());
                out.push_stack(Arc::from(vec![i]), n);
            }
        }
        out
    }

    /// Its stacks over `[from, until)`, frames stored once, in stack id
    /// order. Costs O(stacks + frames held), under the store lock; nothing
    /// is spelled out.
    fn compact(&self, rate_hz: u32, from: u64, until: u64, sel: Sel) -> CompactProfile {
        let mut counts: Vec<(StackId, u64)> = self.counts(from, until, sel).into_iter().collect();
        counts.sort_unstable_by_key(|(id, _)| *id);
        let mut out = CompactProfile::new(rate_hz);
        // Frame id -> index in `out`, `u32::MAX` until first used.
        let mut index = vec![u32::MAX; self.table.frame_slots()];
        for (id, n) in counts {
            let Some(fids) = self.table.stack(id) else {
                continue;
            };
            let ids: Option<Arc<[u32]>> = fids
                .iter()
                .map(|&f| {
                    let slot = index.get_mut(f as usize)?;
                    if *slot == u32::MAX {
                        *slot = out.push_frame(self.table.frame(f)?.clone());
                    }
                    Some(*slot)
                })
                .collect();
            // Every id of a live stack is a live frame; a stack that is not
            // is left out rather than shown wrong.
            if let Some(ids) = ids.filter(|ids| !ids.is_empty()) {
                out.push_stack(ids, n);
            }
        }
        out
    }
}

/// Everything the daemon holds about profiled processes.
pub struct Store {
    limits: StoreLimits,
    rate_hz: u32,
    /// What its values measure: sample counts (CPU) or nanoseconds; the
    /// default type of a split store.
    kind: ProfileKind,
    /// The types it answers: `[kind]`, or with off-CPU sampling in the
    /// daemon any of cpu, wall, off-cpu.
    types: Vec<ProfileKind>,
    /// Holds CPU sample counts and off-CPU nanoseconds apart (off-CPU ones
    /// under [`OFF_TAG`] ids): cpu and off-cpu are read alone, wall is
    /// their sum with each CPU sample counted `1e9 / rate_hz` ns.
    split: bool,
    /// Symbols for kernel stacks (without them, kernel frames show their
    /// addresses).
    kernel: Option<Arc<KernelSymbols>>,
    /// Names each sample's native leaf when set (see [`Store::set_native`]).
    native: Option<Arc<NativeService>>,
    /// Keeps each thread's stacks apart, under a `thread` root frame.
    per_thread: bool,
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

/// Why a listed process is not profiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotProfiled {
    /// CPython of a version or build pyebpf does not support.
    Unsupported,
    /// Python (by its files or name), but discovery gave up reading it:
    /// unreadable or malformed ELF files, memory, thread state.
    Failed,
}

impl NotProfiled {
    /// Its `status` in `/processes`.
    pub fn status(self) -> &'static str {
        match self {
            NotProfiled::Unsupported => STATUS_UNSUPPORTED,
            NotProfiled::Failed => STATUS_FAILED,
        }
    }
}

/// A Python process discovery refused (its version or build) or gave up on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsupportedProcess {
    pub labels: ProcessLabels,
    pub start_time: u64,
    pub not_profiled: NotProfiled,
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
    /// Its GIL state's addresses, if known.
    pub gil: Option<std::ops::Range<u64>>,
}

impl Store {
    /// A store of CPU samples (values are sample counts).
    pub fn new(limits: StoreLimits, rate_hz: u32) -> Self {
        Store::of_kind(limits, rate_hz, ProfileKind::Cpu)
    }

    /// A store of `kind`'s profile: CPU sample counts, or the nanoseconds
    /// of wall or off-CPU time (CPU samples count `1e9 / rate_hz` each).
    pub fn of_kind(limits: StoreLimits, rate_hz: u32, kind: ProfileKind) -> Self {
        Store {
            limits,
            rate_hz,
            kind,
            types: vec![kind],
            split: false,
            kernel: None,
            native: None,
            per_thread: false,
            entries: HashMap::new(),
            stats: StoreStats::default(),
            retired_symbols: SymbolStats::default(),
            next_generation: 0,
            unsupported: VecDeque::new(),
        }
    }

    /// A daemon's store answering every type of `types` (in this order of
    /// preference for the default): with only cpu, [`Store::new`]'s;
    /// otherwise CPU samples and off-CPU nanoseconds are held apart, once,
    /// and wall is their sum at query time. Empty `types` means cpu.
    pub fn with_types(limits: StoreLimits, rate_hz: u32, types: &[ProfileKind]) -> Self {
        let mut s = Store::new(limits, rate_hz);
        if types.iter().any(|k| *k != ProfileKind::Cpu) {
            s.split = true;
            s.types = types.to_vec();
            s.kind = if types.contains(&ProfileKind::Cpu) {
                ProfileKind::Cpu
            } else {
                types[0]
            };
        }
        s
    }

    /// The types it answers.
    pub fn types(&self) -> &[ProfileKind] {
        &self.types
    }

    /// How a query of `kind` reads the counts; an error naming the types
    /// held if it holds none of `kind`.
    fn sel(&self, kind: ProfileKind) -> Result<Sel, QueryError> {
        if !self.types.contains(&kind) {
            let names: Vec<&str> = self.types.iter().map(|k| k.name()).collect();
            return Err(QueryError::BadRequest(format!(
                "profile type {} is not enabled; enabled: {} (sampling.types)",
                kind.name(),
                names.join(", ")
            )));
        }
        Ok(if !self.split {
            Sel::All
        } else {
            match kind {
                ProfileKind::Cpu => Sel::Cpu,
                ProfileKind::OffCpu => Sel::Off,
                ProfileKind::Wall => Sel::Wall(ProfileKind::Cpu.ns_per_value(self.rate_hz)),
            }
        })
    }

    /// New limits; lower byte budgets are enforced at the next
    /// [`Store::expire`].
    pub fn set_limits(&mut self, limits: StoreLimits) {
        self.limits = limits;
    }

    pub fn limits(&self) -> StoreLimits {
        self.limits
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
        let mut labels = p.labels;
        labels.python_version.clone_from(&p.python_version);
        if let Some(old) = self.entries.remove(&pid) {
            self.retire(old);
        }
        // Whatever ran under this pid before is not what runs now.
        self.unsupported.retain(|(u, _)| u.labels.pid != pid);
        if self.entries.len() >= self.limits.max_processes {
            self.stats.processes_refused += 1;
            return false;
        }
        let symbol_bytes = self.limits.cache_bytes(self.entries.len() + 1);
        self.entries.insert(
            pid,
            Entry {
                symbols: Arc::new(Mutex::new(Symbolizer::with_max_bytes(
                    mem,
                    p.code_format,
                    symbol_bytes,
                ))),
                symbol_stats: SymbolStats::default(),
                symbol_bytes: 0,
                labels,
                start_time: p.start_time,
                generation: self.next_generation,
                python_version: p.python_version,
                gil: p.gil,
                free_threaded: false,
                since: now,
                exited_at: None,
                replaced_by: None,
                raw: LruCache::unbounded_with_hasher(foldhash::fast::RandomState::default()),
                raw_bytes: 0,
                table: StackTable::default(),
                buckets: VecDeque::new(),
                bucket_bytes: 0,
                retained_samples: 0,
                retained: FastHashMap::default(),
                evicted_samples: 0,
                retained_off_ns: 0,
                evicted_off_ns: 0,
                gil_wait_ns: 0,
                off_cpu_ns: 0,
                cpu_samples: 0,
            },
        );
        self.next_generation += 1;
        true
    }

    fn retire(&mut self, e: Entry) {
        self.retired_symbols += e.symbol_stats;
        if let Some(n) = &self.native {
            // A later process under this pid has other mappings.
            n.forget_pid(e.labels.pid);
        }
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

    /// Takes a process out of the store with every second it holds, as one
    /// profile (`None` if it is not held). `record` takes a program out when
    /// it ends, since the next program under its pid would replace it.
    pub fn take(&mut self, pid: u32) -> Option<(ProcessLabels, CompactProfile)> {
        let e = self.entries.remove(&pid)?;
        let mut p = e.compact(self.rate_hz, 0, u64::MAX, Sel::All);
        p.kind = self.kind;
        let labels = e.labels.clone();
        self.retire(e);
        Some((labels, p))
    }

    /// Marks a process exited; its data stays queryable until it expires.
    pub fn mark_exited(&mut self, pid: u32, now: SystemTime) {
        if let Some(e) = self.entries.get_mut(&pid) {
            e.exited_at.get_or_insert(unix_secs(now));
        }
        // An unsupported process that exits (or execs) is no longer listed.
        self.unsupported.retain(|(u, _)| u.labels.pid != pid);
    }

    /// Marks a process's Python program ended by an exec of `command`: like
    /// [`Store::mark_exited`], but listed as replaced, naming the new
    /// program. Should the new program be Python, profiling it replaces the
    /// entry.
    pub fn mark_replaced(&mut self, pid: u32, command: String, now: SystemTime) {
        if let Some(e) = self.entries.get_mut(&pid) {
            if e.exited_at.is_none() {
                e.replaced_by = Some(command);
            }
        }
        self.mark_exited(pid, now);
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

    pub fn kind(&self) -> ProfileKind {
        self.kind
    }

    /// Names kernel frames with `k` from now on.
    pub fn set_kernel_symbols(&mut self, k: Arc<KernelSymbols>) {
        self.kernel = Some(k);
    }

    /// From now on each sample with user registers ends its Python frames
    /// with its native leaf, named by `n`.
    pub fn set_native(&mut self, n: Arc<NativeService>) {
        self.native = Some(n);
    }

    /// From now on each thread's stacks are kept apart, rooted at a
    /// `thread TID (name)` frame (the OTLP export makes it the samples'
    /// `thread.id` and `thread.name`). A process's stacks grow with its
    /// threads, within the same bounds.
    pub fn set_per_thread(&mut self, on: bool) {
        self.per_thread = on;
    }

    /// What names (and unwinds) native frames, if anything does.
    pub fn native_service(&self) -> Option<Arc<NativeService>> {
        self.native.clone()
    }

    /// What sample `s` adds, in the store's unit; `None` for a sample of
    /// a kind it does not hold.
    fn value_of(&self, s: &RawSample) -> Option<u64> {
        if self.split {
            // CPU samples as counts, off-CPU intervals as nanoseconds, each
            // under its own ids.
            return Some(match s.kind {
                SampleKind::Cpu => 1,
                SampleKind::OffCpu => s.weight_ns,
            });
        }
        match (self.kind.unit(), s.kind) {
            (ValueUnit::Samples, SampleKind::Cpu) => Some(1),
            (ValueUnit::Samples, SampleKind::OffCpu) => None,
            // The perf event's own period for this sample (it drifts from
            // the nominal one in frequency mode); the nominal if absent.
            (ValueUnit::Nanoseconds, SampleKind::Cpu) if self.kind.on_cpu() => {
                Some(match s.weight_ns {
                    0 => 1_000_000_000 / u64::from(self.rate_hz.max(1)),
                    w => w,
                })
            }
            (ValueUnit::Nanoseconds, SampleKind::OffCpu) if self.kind.off_cpu() => {
                Some(s.weight_ns)
            }
            (ValueUnit::Nanoseconds, _) => None,
        }
    }

    /// Adds one sample, symbolising its stack if new: all three steps with
    /// the store at hand (see `Shared::add_samples` for the locked store).
    pub fn add_sample(&mut self, s: RawSample, now: SystemTime) {
        self.add_samples(std::iter::once(s), now);
    }

    /// [`Store::add_sample`] for a batch.
    pub fn add_samples(&mut self, samples: impl IntoIterator<Item = RawSample>, now: SystemTime) {
        let samples = NativeService::unwound(self.native.as_deref(), samples);
        let pending = self.begin_batch(samples, now);
        if !pending.is_empty() {
            self.insert(pending.resolve());
        }
    }

    /// Step one of adding samples (all counted at `now`): counts those whose
    /// raw stack is cached; returns the distinct others, with their counts,
    /// to resolve.
    pub fn begin_batch(
        &mut self,
        samples: impl IntoIterator<Item = RawSample>,
        now: SystemTime,
    ) -> Pending {
        let second = unix_secs(now);
        let symbol_bytes = self.limits.cache_bytes(self.entries.len());
        let mut procs: Vec<PendingProcess> = Vec::new();
        // Index in `procs` of each pid, and, for each of `procs`, where each
        // of its new stacks is in its `stacks`.
        let mut at_pid: HashMap<u32, usize> = HashMap::new();
        let mut seen: Vec<FastHashMap<RawKey, usize>> = Vec::new();
        for s in samples {
            let pid = s.pid;
            let Some(value) = self.value_of(&s) else {
                self.stats.other_kind_samples += 1;
                continue;
            };
            let Some(e) = self.entries.get_mut(&pid) else {
                self.stats.foreign_samples += 1;
                continue;
            };
            let key = RawKey::of(s, e.gil.as_ref(), self.native.is_some(), self.per_thread);
            let tag = if self.split { e.tally(&key, value) } else { 0 };
            if let Some(id) = e.cached(&key) {
                self.stats.samples += 1;
                e.add(second, id | tag, value);
                continue;
            }
            let at = match at_pid.get(&pid) {
                Some(&at) => at,
                None => {
                    procs.push(PendingProcess {
                        pid,
                        generation: e.generation,
                        symbols: e.symbols.clone(),
                        symbol_bytes,
                        stacks: Vec::new(),
                    });
                    seen.push(FastHashMap::default());
                    at_pid.insert(pid, procs.len() - 1);
                    procs.len() - 1
                }
            };
            match seen[at].get(&key) {
                Some(&k) => {
                    let s = &mut procs[at].stacks[k];
                    s.1 += 1;
                    s.2 += value;
                }
                None => {
                    seen[at].insert(key.clone(), procs[at].stacks.len());
                    procs[at].stacks.push((key, 1, value));
                }
            }
        }
        Pending {
            second,
            kernel: self.kernel.clone(),
            native: self.native.clone(),
            procs,
        }
    }

    /// Step three: interns and counts resolved stacks. Stacks of a process
    /// removed or replaced meanwhile are counted as foreign samples.
    pub fn insert(&mut self, r: Resolved) {
        let raw_bytes = self.limits.cache_bytes(self.entries.len());
        let mut total = self.bytes().total();
        for p in r.procs {
            let fresh = self
                .entries
                .get(&p.pid)
                .is_some_and(|e| e.generation == p.generation);
            if !fresh {
                self.stats.foreign_samples += p.stacks.iter().map(|s| s.2).sum::<u64>();
                self.retired_symbols += p.symbol_stats;
                continue;
            }
            if let Some(e) = self.entries.get_mut(&p.pid) {
                e.symbol_stats += p.symbol_stats;
                total = (total + p.symbol_bytes).saturating_sub(e.symbol_bytes);
                e.symbol_bytes = p.symbol_bytes;
            }
            for (key, frames, n, value) in p.stacks {
                self.stats.samples += n;
                let tag = if self.split && key.off_cpu() {
                    OFF_TAG
                } else {
                    0
                };
                let known = self.entries.get(&p.pid).and_then(|e| e.table.get(&frames));
                let id = match known {
                    Some(id) => Some(id),
                    None => self.intern_new(p.pid, &frames, r.second, &mut total),
                };
                let Some(e) = self.entries.get_mut(&p.pid) else {
                    break;
                };
                let before = e.bytes();
                match id {
                    Some(id) => {
                        self.stats.raw_cache_evictions += e.cache(key, id, raw_bytes);
                        e.add(r.second, id | tag, value);
                    }
                    None => {
                        // Not cached: once there is room, it gets its stack.
                        self.stats.stacks_overflowed += n;
                        let id = e.table.intern(&[Frame::Overflow]);
                        e.add(r.second, id | tag, value);
                    }
                }
                total = (total + e.bytes()).saturating_sub(before);
            }
        }
    }

    /// Interns a new stack of `pid`, evicting older seconds to make room;
    /// `None` if it cannot fit.
    fn intern_new(
        &mut self,
        pid: u32,
        frames: &[Frame],
        second: u64,
        total: &mut usize,
    ) -> Option<StackId> {
        let cost = {
            let e = self.entries.get(&pid)?;
            if e.table.len() >= self.limits.max_stacks_per_process {
                return None;
            }
            e.table.cost(frames) + BUCKET_ENTRY
        };
        loop {
            let own = self.entries.get(&pid)?.bytes();
            if own + cost > self.limits.max_bytes_per_process {
                // Its own budget: its own oldest second goes.
                if !self.evict_oldest(pid, second, total) {
                    return None;
                }
            } else if *total + cost > self.limits.max_bytes {
                // The total: the largest process's oldest second goes.
                let victim = self
                    .entries
                    .iter()
                    .filter(|(_, e)| e.can_evict_before(second))
                    .max_by_key(|(_, e)| e.bytes())
                    .map(|(pid, _)| *pid)?;
                self.evict_oldest(victim, second, total);
            } else {
                break;
            }
        }
        let e = self.entries.get_mut(&pid)?;
        let before = e.bytes();
        let id = e.table.intern(frames);
        *total = (*total + e.bytes()).saturating_sub(before);
        Some(id)
    }

    /// Evicts `pid`'s oldest second if older than `second`, counting it.
    fn evict_oldest(&mut self, pid: u32, second: u64, total: &mut usize) -> bool {
        let Some(e) = self.entries.get_mut(&pid) else {
            return false;
        };
        if !e.can_evict_before(second) {
            return false;
        }
        let Some(ev) = e.pop_oldest() else {
            return false;
        };
        e.evicted_samples += ev.samples;
        e.evicted_off_ns += ev.off_ns;
        self.stats.seconds_evicted += 1;
        self.stats.samples_evicted += ev.samples;
        self.stats.off_cpu_ns_evicted += ev.off_ns;
        self.stats.stacks_evicted += ev.stacks;
        *total = total.saturating_sub(ev.bytes);
        true
    }

    /// Drops data older than the retention, and exited processes with none
    /// left; then evicts the oldest seconds while the byte budgets (maybe
    /// lowered by a reload) are exceeded.
    pub fn expire(&mut self, now: SystemTime) {
        let now_s = unix_secs(now);
        let oldest = now_s.saturating_sub(u64::from(self.limits.retention_secs));
        let mut gone = Vec::new();
        for (pid, e) in &mut self.entries {
            while e.can_evict_before(oldest) {
                if let Some(ev) = e.pop_oldest() {
                    self.stats.stacks_collected += ev.stacks;
                }
            }
            if e.exited_at.is_some() && e.buckets.is_empty() {
                gone.push(*pid);
            }
        }
        for pid in gone {
            if let Some(e) = self.entries.remove(&pid) {
                self.retire(e);
            }
        }
        self.trim_caches();
        let mut total = self.bytes().total();
        let pids: Vec<u32> = self.entries.keys().copied().collect();
        for pid in pids {
            while self
                .entries
                .get(&pid)
                .is_some_and(|e| e.bytes() > self.limits.max_bytes_per_process)
                && self.evict_oldest(pid, now_s, &mut total)
            {}
        }
        while total > self.limits.max_bytes {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| e.can_evict_before(now_s))
                .max_by_key(|(_, e)| e.bytes())
                .map(|(pid, _)| *pid);
            match victim {
                Some(pid) if self.evict_oldest(pid, now_s, &mut total) => {}
                _ => break,
            }
        }
    }

    /// Shrinks the raw-stack and symbol caches to their current bounds
    /// (lower after a reload, or with more processes held). A symbol cache
    /// being used by a resolution is left for the next call.
    fn trim_caches(&mut self) {
        let cap = self.limits.cache_bytes(self.entries.len());
        for e in self.entries.values_mut() {
            while e.raw_bytes > cap {
                match e.raw.pop_lru() {
                    Some((k, _)) => {
                        e.raw_bytes = e.raw_bytes.saturating_sub(k.bytes());
                        self.stats.raw_cache_evictions += 1;
                    }
                    None => e.raw_bytes = 0,
                }
            }
            if e.symbol_bytes > cap {
                if let Ok(mut symbols) = e.symbols.try_lock() {
                    let before = symbols.stats;
                    symbols.set_max_bytes(cap);
                    e.symbol_stats += symbols.stats.since(&before);
                    e.symbol_bytes = symbols.bytes();
                }
            }
        }
    }

    /// The pids `selector` selects.
    pub fn selected(&self, selector: &Selector) -> Vec<u32> {
        self.select(selector).map(|e| e.labels.pid).collect()
    }

    pub fn rate_hz(&self) -> u32 {
        self.rate_hz
    }

    /// Samples counted in seconds `[from, until)`, over all processes.
    pub fn samples_between(&self, from: u64, until: u64) -> u64 {
        self.entries
            .values()
            .flat_map(|e| e.buckets.iter().rev().take_while(|b| b.second >= from))
            .filter(|b| b.second < until)
            .map(|b| {
                b.counts
                    .iter()
                    .filter(|(id, _)| **id & OFF_TAG == 0)
                    .map(|(_, n)| n)
                    .sum::<u64>()
            })
            .sum()
    }

    /// Bytes held now, by kind.
    pub fn bytes(&self) -> StoreBytes {
        let mut b = StoreBytes::default();
        for e in self.entries.values() {
            b.stacks += e.table.bytes();
            b.buckets += e.bucket_bytes + BUCKET_ENTRY * e.retained.len();
            b.raw_cache += e.raw_bytes;
            b.symbols += e.symbol_bytes;
        }
        b
    }

    /// Distinct stacks held, over all processes.
    pub fn stacks_held(&self) -> usize {
        self.entries.values().map(|e| e.table.len()).sum()
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
                status: match (&e.exited_at, &e.replaced_by) {
                    (None, _) => STATUS_PROFILED,
                    (Some(_), None) => STATUS_EXITED,
                    (Some(_), Some(_)) => STATUS_REPLACED,
                },
                since: unix_secs(e.since),
                samples: e.retained_samples,
                memory_bytes: e.bytes() as u64,
                evicted_samples: e.evicted_samples,
                reason: None,
                replaced_by: e.replaced_by.clone(),
                types: self.types.iter().map(|k| k.name()).collect(),
                gil_wait_seconds: self
                    .types
                    .iter()
                    .any(|k| k.off_cpu())
                    .then(|| e.gil_wait_ns as f64 / 1e9),
                wall_seconds: (self.split && self.types.iter().any(|k| *k != ProfileKind::OffCpu))
                    .then(|| e.wall_ns(self.rate_hz) as f64 / 1e9),
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
                status: u.not_profiled.status(),
                since: unix_secs(*at),
                samples: 0,
                memory_bytes: 0,
                evicted_samples: 0,
                reason: Some(u.reason.clone()),
                replaced_by: None,
                types: Vec::new(),
                gil_wait_seconds: None,
                wall_seconds: None,
            })
            .collect();
        unsupported.sort_by_key(|p| p.labels.pid);
        v.extend(unsupported);
        v
    }

    /// The last `seconds` seconds (the current, partial second included),
    /// every selected process's stacks side by side (a stack held by two
    /// processes appears twice: merge when spelling out).
    pub fn query(
        &self,
        selector: &Selector,
        seconds: u32,
        now: SystemTime,
    ) -> Result<CompactProfile, QueryError> {
        self.query_kind(selector, seconds, now, self.kind)
    }

    /// [`Store::query`] of profile type `kind`: a bad request if the store
    /// does not hold it.
    pub fn query_kind(
        &self,
        selector: &Selector,
        seconds: u32,
        now: SystemTime,
        kind: ProfileKind,
    ) -> Result<CompactProfile, QueryError> {
        let sel = self.sel(kind)?;
        if seconds == 0 || seconds > self.limits.retention_secs {
            return Err(QueryError::BadRequest(format!(
                "seconds must be between 1 and {} (the retention)",
                self.limits.retention_secs
            )));
        }
        let until = unix_secs(now) + 1;
        let from = until.saturating_sub(u64::from(seconds));
        let mut selected = self.select(selector).peekable();
        if selected.peek().is_none() {
            return Err(QueryError::NotFound(match selector {
                Selector::Pid(p) => format!("process {p} is not profiled"),
                Selector::Service(s) => format!("no profiled process has service {s:?}"),
            }));
        }
        let mut profile = CompactProfile::of_kind(kind, self.rate_hz);
        for e in selected {
            let mut p = e.compact(self.rate_hz, from, until, sel);
            p.kind = kind;
            profile.append(p);
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
    pub fn window(&self, from: u64, until: u64) -> Vec<(ProcessLabels, CompactProfile)> {
        self.window_kind(from, until, self.kind)
    }

    /// [`Store::window`] of profile type `kind` (none if not held).
    pub fn window_kind(
        &self,
        from: u64,
        until: u64,
        kind: ProfileKind,
    ) -> Vec<(ProcessLabels, CompactProfile)> {
        match self.sel(kind) {
            Ok(sel) => self.per_process(from, until, kind, |e, r, f, u| {
                Entry::compact(e, r, f, u, sel)
            }),
            Err(_) => Vec::new(),
        }
    }

    /// [`Store::window`] with only the leaf frame of every stack: what
    /// per-function metrics need, at a fraction of the memory.
    pub fn window_leaves(&self, from: u64, until: u64) -> Vec<(ProcessLabels, CompactProfile)> {
        let sel = self.sel(self.kind).unwrap_or(Sel::All);
        self.per_process(from, until, self.kind, |e, r, f, u| {
            Entry::leaves(e, r, f, u, sel)
        })
    }

    fn per_process(
        &self,
        from: u64,
        until: u64,
        kind: ProfileKind,
        build: impl Fn(&Entry, u32, u64, u64) -> CompactProfile,
    ) -> Vec<(ProcessLabels, CompactProfile)> {
        let mut out = Vec::new();
        for e in self.entries.values() {
            let mut p = build(e, self.rate_hz, from, until);
            p.kind = kind;
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

    fn limits(max_stacks: usize) -> StoreLimits {
        StoreLimits {
            retention_secs: 10,
            max_processes: 2,
            max_stacks_per_process: max_stacks,
            max_bytes: 64 << 20,
            max_bytes_per_process: 16 << 20,
        }
    }

    fn store(max_stacks: usize) -> Store {
        Store::new(limits(max_stacks), 100)
    }

    /// `n` readable code objects (see `test_code::fakes`).
    fn codes(n: u64) -> (TargetMemory, Vec<(u64, u32)>) {
        let (m, c) = crate::python::code::test_code::fakes(n);
        (TargetMemory::new(m), c)
    }

    /// A one-frame sample of fake code `c` at instruction `instr`.
    fn at(pid: u32, c: (u64, u32), instr: i32) -> RawSample {
        let mut s = RawSample::one_frame(pid, c.0, c.1);
        s.frames[0].instr = instr;
        s
    }

    /// A process reading `n` fake code objects.
    fn with_codes(s: &mut Store, pid: u32, n: u64, t: SystemTime) -> Vec<(u64, u32)> {
        let (mem, c) = codes(n);
        assert!(s.add_process_reading(new_proc(pid, "a"), t, mem));
        c
    }

    fn line_of(stack: &[Frame]) -> u32 {
        match stack.last() {
            Some(Frame::Python { line, .. }) => *line,
            f => panic!("not a Python frame: {f:?}"),
        }
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
            gil: None,
        }
    }

    /// An off-CPU sample of fake code `c` blocked in a futex at `futex`,
    /// with a two-frame kernel stack, weighing `ns`.
    fn off_cpu(pid: u32, c: (u64, u32), futex: u64, ns: u64) -> RawSample {
        RawSample {
            kind: SampleKind::OffCpu,
            weight_ns: ns,
            kernel: vec![0xffff_ffff_8100_1210, 0xffff_ffff_8100_1001],
            entry: Some(crate::bpf::events::KernelEntry {
                nr: 202,
                arg0: futex,
            }),
            ..at(pid, c, 0)
        }
    }

    fn kernel_table() -> Arc<KernelSymbols> {
        use std::io::Write as _;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(
            b"ffffffff81000000 T _stext\nffffffff81001000 T do_futex\n\
              ffffffff81001200 t futex_wait_queue\nffffffff81002000 T _etext\n",
        )
        .unwrap();
        Arc::new(KernelSymbols::from_kallsyms(f.path(), 1 << 20).unwrap())
    }

    /// A wall store counts time: a CPU sample its perf period (or the
    /// nominal one), an off-CPU sample its weight; GIL waits and kernel
    /// frames show in the stacks. A CPU store leaves off-CPU samples out.
    #[test]
    fn wall_and_off_cpu_stores_count_nanoseconds() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = Store::of_kind(limits(100), 100, ProfileKind::Wall);
        s.set_kernel_symbols(kernel_table());
        let (mem, c) = codes(1);
        let mut p = new_proc(1, "a");
        p.gil = Some(0x5000..0x5000 + 208);
        assert!(s.add_process_reading(p, t0, mem));
        let mut cpu = at(1, c[0], 0);
        cpu.weight_ns = 9_000_000;
        s.add_sample(cpu.clone(), t0);
        cpu.weight_ns = 0;
        s.add_sample(cpu, t0);
        s.add_sample(off_cpu(1, c[0], 0x5020, 3_000_000), t0);
        s.add_sample(off_cpu(1, c[0], 0x9000, 4_000_000), t0);
        let mut preempted = off_cpu(1, c[0], 0x5020, 1_000_000);
        preempted.preempted = true;
        s.add_sample(preempted, t0);
        assert_eq!(s.stats.samples, 5);
        let p = s.query(&Selector::Pid(1), 1, t0).unwrap().to_profile();
        assert_eq!(p.kind, ProfileKind::Wall);
        assert_eq!(p.total_samples(), 9_000_000 + 10_000_000 + 8_000_000);
        let kernel = |f: &str| Frame::Kernel { function: f.into() };
        let tail = |leaf: Option<Frame>| {
            let mut v = vec![kernel("do_futex"), kernel("futex_wait_queue")];
            v.extend(leaf);
            v
        };
        let by_tail: HashMap<Vec<Frame>, u64> = p
            .stacks
            .iter()
            .map(|(st, v)| (st[1..].to_vec(), *v))
            .collect();
        assert_eq!(by_tail.get(&tail(Some(Frame::GilWait))), Some(&3_000_000));
        assert_eq!(by_tail.get(&tail(None)), Some(&4_000_000));
        assert_eq!(by_tail.get(&tail(Some(Frame::Runnable))), Some(&1_000_000));
        assert_eq!(by_tail.get(&vec![]), Some(&19_000_000));

        // Off-CPU only: CPU samples are another kind.
        let mut s = Store::of_kind(limits(100), 100, ProfileKind::OffCpu);
        let (mem, c) = codes(1);
        assert!(s.add_process_reading(new_proc(1, "a"), t0, mem));
        s.add_sample(at(1, c[0], 0), t0);
        s.add_sample(off_cpu(1, c[0], 0x5020, 2_000_000), t0);
        assert_eq!((s.stats.samples, s.stats.other_kind_samples), (1, 1));
        let p = s.query(&Selector::Pid(1), 1, t0).unwrap().to_profile();
        assert_eq!(
            (p.kind, p.total_samples()),
            (ProfileKind::OffCpu, 2_000_000)
        );
        // Without kernel symbols, and no GIL known: addresses, no leaf.
        let st = p.stacks.keys().next().unwrap();
        assert_eq!(
            st[1..],
            [kernel("0xffffffff81001001"), kernel("0xffffffff81001210")]
        );

        // A CPU store counts samples and leaves off-CPU ones out.
        let mut s = store(100);
        let (mem, c) = codes(1);
        assert!(s.add_process_reading(new_proc(1, "a"), t0, mem));
        s.add_sample(at(1, c[0], 0), t0);
        s.add_sample(off_cpu(1, c[0], 0x5020, 2_000_000), t0);
        assert_eq!(s.stats.other_kind_samples, 1);
        let p = s.query(&Selector::Pid(1), 1, t0).unwrap().to_profile();
        assert_eq!((p.kind, p.total_samples()), (ProfileKind::Cpu, 1));
    }

    /// A daemon store of cpu, off-cpu and wall: CPU samples and off-CPU
    /// time held once each, apart; wall is their sum with CPU samples at
    /// 1e9 / rate_hz ns; a type not held is a bad request naming those held;
    /// the GIL and wall totals survive eviction.
    #[test]
    fn split_store_answers_every_type() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let kinds = [ProfileKind::Cpu, ProfileKind::OffCpu, ProfileKind::Wall];
        let mut s = Store::with_types(limits(100), 100, &kinds);
        assert_eq!(s.kind(), ProfileKind::Cpu);
        let (mem, c) = codes(1);
        let mut p = new_proc(1, "a");
        p.gil = Some(0x5000..0x5000 + 208);
        assert!(s.add_process_reading(p, t0, mem));
        for _ in 0..3 {
            s.add_sample(at(1, c[0], 0), t0);
        }
        s.add_sample(off_cpu(1, c[0], 0x5020, 3_000_000), t0);
        s.add_sample(off_cpu(1, c[0], 0x9000, 4_000_000), t0);
        let q = |k| {
            s.query_kind(&Selector::Pid(1), 1, t0, k)
                .unwrap()
                .to_profile()
        };
        let cpu = q(ProfileKind::Cpu);
        assert_eq!((cpu.kind, cpu.total_samples()), (ProfileKind::Cpu, 3));
        assert_eq!(cpu.stacks.len(), 1);
        let off = q(ProfileKind::OffCpu);
        assert_eq!(
            (off.kind, off.total_samples()),
            (ProfileKind::OffCpu, 7_000_000)
        );
        assert!(off.stacks.keys().all(|st| st.len() > 1));
        let wall = q(ProfileKind::Wall);
        assert_eq!(
            (wall.kind, wall.total_samples()),
            (ProfileKind::Wall, 30_000_000 + 7_000_000)
        );
        // The same Python stack on and off CPU: one stack in the table.
        assert_eq!(s.stacks_held(), 3);
        let v = &s.views()[0];
        assert_eq!(v.types, ["cpu", "off-cpu", "wall"]);
        assert_eq!(v.samples, 3);
        assert_eq!(v.gil_wait_seconds, Some(0.003));
        assert_eq!(v.wall_seconds, Some(0.037));
        // Windows of each type.
        let w = s.window_kind(1_000, 1_001, ProfileKind::OffCpu);
        assert_eq!(w[0].1.total_samples(), 7_000_000);
        assert_eq!(s.samples_between(1_000, 1_001), 3);
        // Eviction counts each kind in its unit; totals since start stay.
        s.set_limits(StoreLimits {
            retention_secs: 1,
            ..limits(100)
        });
        s.add_sample(at(1, c[0], 0), t0 + Duration::from_secs(5));
        s.expire(t0 + Duration::from_secs(5));
        let v = &s.views()[0];
        assert_eq!(v.samples, 1);
        assert_eq!(v.gil_wait_seconds, Some(0.003));

        // Only cpu: other types are refused, naming cpu.
        let s = Store::with_types(limits(100), 100, &[ProfileKind::Cpu]);
        let e = s
            .query_kind(&Selector::Pid(1), 1, t0, ProfileKind::Wall)
            .unwrap_err();
        assert!(e.to_string().contains("enabled: cpu"), "{e}");
        // Off-CPU only: the default type is off-cpu.
        let s = Store::with_types(limits(100), 100, &[ProfileKind::OffCpu]);
        assert_eq!(s.kind(), ProfileKind::OffCpu);
    }

    /// Cut and unreadable kernel stacks are marked, never dropped.
    #[test]
    fn kernel_stack_gaps_are_marked() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = Store::of_kind(limits(100), 100, ProfileKind::OffCpu);
        s.set_kernel_symbols(kernel_table());
        let (mem, c) = codes(1);
        assert!(s.add_process_reading(new_proc(1, "a"), t0, mem));
        let mut cut = off_cpu(1, c[0], 0, 1_000_000);
        cut.kernel_truncated = true;
        s.add_sample(cut, t0);
        let mut failed = off_cpu(1, c[0], 0, 2_000_000);
        failed.kernel = Vec::new();
        failed.kernel_error = true;
        s.add_sample(failed, t0);
        let p = s.query(&Selector::Pid(1), 1, t0).unwrap().to_profile();
        let tails: HashMap<Vec<String>, u64> = p
            .stacks
            .iter()
            .map(|(st, v)| (st[1..].iter().map(Frame::to_string).collect(), *v))
            .collect();
        let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            tails.get(&want(&[
                "[kernel stack truncated]",
                "[kernel] do_futex",
                "[kernel] futex_wait_queue"
            ])),
            Some(&1_000_000)
        );
        assert_eq!(
            tails.get(&want(&["[kernel stack unavailable]"])),
            Some(&2_000_000)
        );
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
            s.query(&Selector::Pid(1), 1, now)
                .unwrap()
                .to_profile()
                .total_samples(),
            1
        );
        assert_eq!(
            s.query(&Selector::Pid(1), 3, now)
                .unwrap()
                .to_profile()
                .total_samples(),
            3
        );
        assert_eq!(
            s.query(&Selector::Pid(1), 10, now)
                .unwrap()
                .to_profile()
                .total_samples(),
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
    fn window_leaves_count_every_sample_by_its_leaf() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(100);
        let c = with_codes(&mut s, 1, 3, t0);
        // Two callers of the same leaf, and another leaf.
        for (leaf, caller, n) in [(c[0], c[1], 3), (c[0], c[2], 2), (c[2], c[1], 4)] {
            for _ in 0..n {
                let mut sample = at(1, leaf, 0);
                sample.frames.push(at(1, caller, 0).frames[0]);
                s.add_sample(sample, t0);
            }
        }
        let full = &s.window(1_000, 1_001)[0].1;
        assert_eq!((full.stack_count(), full.total_samples()), (3, 9));
        let leaves = &s.window_leaves(1_000, 1_001)[0].1;
        assert_eq!(leaves.total_samples(), 9);
        let mut got: Vec<(u32, u64)> = leaves
            .stacks()
            .map(|(st, n)| {
                assert_eq!(st.len(), 1);
                (line_of(&st.iter().cloned().collect::<Vec<_>>()), n)
            })
            .collect();
        got.sort_unstable();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got.iter().map(|(_, n)| n).sum::<u64>(), 9);
        // 5 samples under c[0]'s leaf line, 4 under c[2]'s.
        let counts: Vec<u64> = got.iter().map(|&(_, n)| n).collect();
        assert!(counts.contains(&5) && counts.contains(&4), "{got:?}");
    }

    #[test]
    fn a_process_taken_out_keeps_its_samples_and_symbol_stats() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(100);
        let c = with_codes(&mut s, 1, 2, t0);
        s.add_sample(at(1, c[0], 0), t0);
        s.add_sample(at(1, c[1], 0), t0 + Duration::from_secs(5));
        let stats = s.symbol_stats();
        let (labels, p) = s.take(1).unwrap();
        assert_eq!((labels.pid, p.total_samples(), p.stack_count()), (1, 2, 2));
        assert!(s.take(1).is_none());
        assert_eq!(s.stacks_held(), 0);
        // Counted as before, and its samples from now on are foreign.
        assert_eq!(s.symbol_stats(), stats);
        s.add_sample(at(1, c[0], 0), t0);
        assert_eq!((s.stats.samples, s.stats.foreign_samples), (2, 1));
    }

    #[test]
    fn unreadable_code_becomes_an_explicit_unknown_frame() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(100);
        s.add_process(new_proc(std::process::id(), "a"), t0);
        s.add_sample(sample(std::process::id(), 8), t0);
        let p = s
            .query(&Selector::Pid(std::process::id()), 1, t0)
            .unwrap()
            .to_profile();
        let (stack, _) = p.stacks.iter().next().unwrap();
        assert!(matches!(stack[0], Frame::Unknown { .. }));
        assert_eq!(s.symbol_stats().unreadable, 1);
    }

    #[test]
    fn stack_table_is_capped_with_a_visible_overflow() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(3);
        let c = with_codes(&mut s, 1, 10, t0);
        for &code in &c {
            s.add_sample(at(1, code, 0), t0);
        }
        assert_eq!(s.stats.stacks_overflowed, 7);
        let p = s.query(&Selector::Pid(1), 1, t0).unwrap().to_profile();
        assert_eq!(p.total_samples(), 10);
        assert_eq!(p.stacks.get(&vec![Frame::Overflow]), Some(&7));
    }

    #[test]
    fn stacks_are_kept_by_line_not_by_instruction() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(100);
        let c = with_codes(&mut s, 1, 2, t0);
        // Instructions 1..8 of code 0 are all on its first line (10);
        // instruction 0 is on line 11.
        for instr in 0..8 {
            s.add_sample(at(1, c[0], instr), t0);
            s.add_sample(at(1, c[0], instr), t0);
        }
        s.add_sample(at(1, c[1], 3), t0);
        assert_eq!(s.stacks_held(), 3, "line 10, line 11, and code 1");
        let p = s.query(&Selector::Pid(1), 1, t0).unwrap().to_profile();
        let mut lines: Vec<(u32, u64)> = p.stacks.iter().map(|(k, n)| (line_of(k), *n)).collect();
        lines.sort();
        assert_eq!(lines, [(10, 14), (11, 2), (20, 1)]);
        // Each raw stack was symbolised once, then found in the raw cache.
        assert_eq!(s.symbol_stats().misses, 2);
        assert_eq!(s.stats.samples, 17);
    }

    #[test]
    fn a_batch_counts_as_samples_added_one_by_one() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        // New stacks repeated within the batch, a known one, a foreign pid,
        // and more new stacks than the cap leaves room for.
        let ks = [0, 1, 0, 2, 3, 1, 4, 5, 0, 6];
        let mut one = store(4);
        let mut batch = store(4);
        let mut c = Vec::new();
        for s in [&mut one, &mut batch] {
            c = with_codes(s, 1, 7, t0);
            s.add_sample(at(1, c[0], 0), t0);
        }
        for k in ks {
            one.add_sample(at(1, c[k], 0), t0);
        }
        one.add_sample(at(9, c[0], 0), t0);
        let samples = ks.map(|k| at(1, c[k], 0)).into_iter();
        let pending = batch.begin_batch(samples.chain([at(9, c[0], 0)]), t0);
        assert_eq!(pending.procs.len(), 1);
        assert_eq!(pending.procs[0].stacks.len(), 6, "1 to 6 are not cached");
        batch.insert(pending.resolve());
        assert_eq!(batch.stats, one.stats);
        assert_eq!(batch.stats.stacks_overflowed, 3, "4, 5, 6");
        assert_eq!(batch.symbol_stats(), one.symbol_stats());
        let q = |s: &Store| {
            s.query(&Selector::Pid(1), 1, t0)
                .unwrap()
                .to_profile()
                .stacks
        };
        assert_eq!(q(&batch), q(&one));
        assert_eq!(q(&batch).get(&vec![Frame::Overflow]), Some(&3));
    }

    #[test]
    fn a_process_over_its_budget_loses_its_oldest_seconds_counted() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut l = limits(1_000);
        l.max_bytes_per_process = 8 << 10;
        let mut s = Store::new(l, 100);
        let c = with_codes(&mut s, 1, 400, t0);
        // Ten new stacks a second, for the whole retention.
        let mut added = 0;
        let mut peak = 0;
        for sec in 0..10u64 {
            let now = t0 + Duration::from_secs(sec);
            for k in 0..10 {
                s.add_sample(at(1, c[(sec * 10 + k) as usize], 0), now);
                added += 1;
            }
            peak = peak.max(s.bytes().total());
        }
        assert!(peak <= 8 << 10, "{peak} bytes held");
        assert!(s.stats.seconds_evicted > 0);
        assert_eq!(s.stats.stacks_overflowed, 0, "older seconds could go");
        let now = t0 + Duration::from_secs(9);
        let kept = s
            .query(&Selector::Pid(1), 10, now)
            .unwrap()
            .to_profile()
            .total_samples();
        assert_eq!(
            kept + s.stats.samples_evicted,
            added,
            "evictions are counted"
        );
        assert_eq!(s.stats.stacks_evicted, s.stats.samples_evicted);
        // The newest second is whole.
        assert_eq!(
            s.query(&Selector::Pid(1), 1, now)
                .unwrap()
                .to_profile()
                .total_samples(),
            10
        );
        let v = &s.views()[0];
        assert_eq!(
            (v.samples, v.evicted_samples),
            (kept, s.stats.samples_evicted)
        );
        assert!(v.memory_bytes > 0 && v.memory_bytes <= 8 << 10);
    }

    #[test]
    fn the_total_budget_evicts_from_the_largest_process() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut l = limits(1_000);
        l.max_bytes_per_process = 1 << 20;
        let mut s = Store::new(l, 100);
        let big = with_codes(&mut s, 1, 300, t0);
        let small = with_codes(&mut s, 2, 10, t0);
        for &code in &big {
            s.add_sample(at(1, code, 0), t0);
        }
        s.add_sample(at(2, small[0], 0), t0);
        let held = s.bytes().total();
        // Shrink the total under what is held: the next second's new stack
        // of the small process takes room from the big one's oldest second.
        l.max_bytes = held;
        s.set_limits(l);
        let t1 = t0 + Duration::from_secs(1);
        s.add_sample(at(2, small[1], 0), t1);
        assert!(s.bytes().total() <= held);
        assert_eq!(s.stats.samples_evicted, 300, "the big process's second");
        assert_eq!(
            s.query(&Selector::Pid(2), 10, t1)
                .unwrap()
                .to_profile()
                .total_samples(),
            2
        );
        assert_eq!(s.stats.stacks_overflowed, 0);
    }

    #[test]
    fn a_lowered_budget_is_enforced_at_expiry() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut l = limits(1_000);
        let mut s = Store::new(l, 100);
        let c = with_codes(&mut s, 1, 50, t0);
        for sec in 0..5u64 {
            for k in 0..10 {
                let now = t0 + Duration::from_secs(sec);
                s.add_sample(at(1, c[(sec * 10 + k) as usize], 0), now);
            }
        }
        let held = s.bytes().total();
        l.max_bytes_per_process = held / 2;
        s.set_limits(l);
        s.expire(t0 + Duration::from_secs(5));
        assert!(s.bytes().total() <= held / 2);
        assert!(s.stats.samples_evicted >= 20);
    }

    #[test]
    fn expiry_is_incremental_and_returns_every_byte() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(1_000);
        let c = with_codes(&mut s, 1, 20, t0);
        for sec in 0..10u64 {
            let now = t0 + Duration::from_secs(sec);
            // A stack every second shares, and one of its own.
            s.add_sample(at(1, c[0], 0), now);
            s.add_sample(at(1, c[1 + sec as usize], 0), now);
        }
        assert_eq!(s.stacks_held(), 11);
        // Seconds 0..=4 expire: their own stacks go, the shared one stays.
        s.expire(t0 + Duration::from_secs(15));
        assert_eq!(s.stacks_held(), 6);
        assert_eq!(s.stats.stacks_collected, 5);
        let p = s
            .query(&Selector::Pid(1), 10, t0 + Duration::from_secs(14))
            .unwrap()
            .to_profile();
        assert_eq!(p.total_samples(), 10);
        s.expire(t0 + Duration::from_secs(30));
        let b = s.bytes();
        assert_eq!((b.stacks, b.buckets), (0, 0));
        assert_eq!(s.stacks_held(), 0);
        assert_eq!(s.stats.samples_evicted, 0, "expiry is not eviction");
    }

    #[test]
    fn any_range_counts_the_same_by_either_path() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(1_000);
        let c = with_codes(&mut s, 1, 30, t0);
        for sec in 0..10u64 {
            for k in 0..=sec {
                let now = t0 + Duration::from_secs(sec);
                s.add_sample(at(1, c[(k * 3 % 30) as usize], (sec % 2) as i32), now);
            }
        }
        let e = &s.entries[&1];
        for from in 995..1012 {
            for until in from..1013 {
                let mut direct: FastHashMap<StackId, u64> = FastHashMap::default();
                for b in e
                    .buckets
                    .iter()
                    .filter(|b| b.second >= from && b.second < until)
                {
                    for (id, n) in &b.counts {
                        *direct.entry(*id).or_insert(0) += n;
                    }
                }
                assert_eq!(e.counts(from, until, Sel::All), direct, "[{from}, {until})");
            }
        }
    }

    #[test]
    fn a_cached_raw_stack_never_names_a_reused_slot() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(1_000);
        let c = with_codes(&mut s, 1, 2, t0);
        s.add_sample(at(1, c[0], 0), t0);
        let t1 = t0 + Duration::from_secs(11);
        s.expire(t1);
        assert_eq!(s.stacks_held(), 0);
        // Code 1's stack takes the freed slot; code 0's raw stack is still
        // in the raw cache with the old id.
        s.add_sample(at(1, c[1], 0), t1);
        s.add_sample(at(1, c[0], 0), t1);
        let p = s.query(&Selector::Pid(1), 1, t1).unwrap().to_profile();
        let mut lines: Vec<u32> = p.stacks.keys().map(|k| line_of(k)).collect();
        lines.sort();
        assert_eq!(lines, [11, 21]);
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
            s.query(&Selector::Pid(1), 1, t0)
                .unwrap()
                .to_profile()
                .total_samples(),
            0
        );
        // Its symbol statistics are kept, as a removed process's are.
        assert_eq!(s.symbol_stats().misses, 1);
    }

    #[test]
    fn an_exec_lists_the_process_as_replaced_until_a_new_program_is_profiled() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = store(100);
        s.add_process(new_proc(1, "a"), t0);
        s.add_sample(sample(1, 8), t0);
        s.mark_replaced(1, "sh".into(), t0);
        let v = &s.views()[0];
        assert_eq!(
            (v.status, v.replaced_by.as_deref()),
            ("replaced", Some("sh"))
        );
        assert_eq!(v.samples, 1);
        let json = serde_json::to_value(v).unwrap();
        assert_eq!(json["replaced_by"], "sh");
        // An exit afterwards does not change what it was.
        s.mark_exited(1, t0);
        assert_eq!(s.views()[0].status, "replaced");
        // An exec after the exit (a reused pid's) does not either.
        s.mark_replaced(1, "bash".into(), t0);
        assert_eq!(s.views()[0].replaced_by.as_deref(), Some("sh"));
        // The pid exec'd Python again: profiled afresh.
        s.add_process(new_proc(1, "b"), t0);
        let v = &s.views()[0];
        assert_eq!((v.status, v.replaced_by.as_deref()), ("profiled", None));
        let json = serde_json::to_value(v).unwrap();
        assert!(json.get("replaced_by").is_none(), "{json}");
        // An exit is still an exit.
        s.add_process(new_proc(2, "c"), t0);
        s.mark_exited(2, t0);
        assert_eq!(s.views()[1].status, "exited");
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
            not_profiled: NotProfiled::Unsupported,
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
                max_bytes: 64 << 20,
                max_bytes_per_process: 16 << 20,
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
            s.query(&Selector::Pid(1), 1, t0)
                .unwrap()
                .to_profile()
                .total_samples(),
            0
        );
        assert!(s.query(&Selector::Service("new".into()), 1, t0).is_ok());
    }
}
