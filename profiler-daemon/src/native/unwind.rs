//! Unwinding a copied user stack without frame pointers: each step follows
//! the CFI (`.eh_frame`, or `.debug_frame`) of the module the address is in,
//! executed by framehop, and the walk stops, saying why, where there is no
//! rule: never a frame-pointer or stack-scanning guess (see `cfi`).
//!
//! Unwind tables are cached per file, bounded in bytes (LRU, evictions
//! counted); rules per address likewise, bounded in entries.
use std::cell::Cell;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{FrameAddress, Unwinder as _};
use lru::LruCache;

use super::cfi::{CfaBase, CfiError, Context, LoadError, RbpRule, Rule, UnwindSections};
use super::maps::{Backing, ExecMapping, FileKey, ProcessMaps};
use crate::process::memory::{ProcessMemory, RemoteMemory};
use crate::FastHashMap;

/// An LRU hashed like [`FastHashMap`]: looked up for every frame.
type FastLru<K, V> = LruCache<K, V, foldhash::fast::RandomState>;

/// The registers of the sampled thread in user mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    /// rbp; `None` when unknown (then a function whose CFA is computed from
    /// rbp ends the walk, unless an inner frame restored rbp from its slot).
    pub bp: Option<u64>,
}

/// A sample's registers and the bytes copied from its stack, from `sp` up.
#[derive(Clone, Copy, Debug)]
pub struct UserStack<'a> {
    pub regs: UserRegs,
    pub stack: &'a [u8],
}

/// How a frame's address was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameSource {
    /// The instruction pointer of the sample (the leaf).
    Registers,
    /// A return address read at CFA - 8, the CFA given by the callee's CFI.
    Cfi,
}

/// One native frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativeFrame {
    pub address: u64,
    pub source: FrameSource,
    /// The stack pointer in this frame (the sample's sp for the leaf, the
    /// callee's CFA for the others): the frame's locals lie between it and
    /// the next frame's `sp`, so objects on the C stack (3.12+'s entry shim
    /// frames, 3.11's `_PyCFrame`s) can be matched to their activation.
    pub sp: u64,
}

impl NativeFrame {
    /// The address to symbolise: the leaf's instruction, or for a return
    /// address the call instruction before it (a call may be the last
    /// instruction of a function).
    pub fn lookup_address(&self) -> u64 {
        match self.source {
            FrameSource::Registers => self.address,
            FrameSource::Cfi => self.address.saturating_sub(1),
        }
    }
}

/// Why the walk ended. Only [`StopReason::Outermost`] means the stack is
/// complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The CFI of the last frame marks it outermost (`_start`, `clone3`).
    Outermost,
    /// The next step reads past the copied bytes: the copy should have held
    /// `needed` bytes from sp.
    StackCopyEnded { needed: u64 },
    /// `max_frames` frames were found.
    MaxDepth,
    /// The address is in no executable mapping.
    NotExecutable { address: u64 },
    /// The address is in executable memory without a file (JIT code).
    NoFile { address: u64, mapping: Arc<str> },
    /// The module's unwind tables could not be loaded.
    NoUnwindTables {
        address: u64,
        module: Arc<str>,
        reason: String,
    },
    /// The module's tables have no rule for the address (or one that
    /// framehop cannot execute, or a malformed one).
    NoRule {
        address: u64,
        module: Arc<str>,
        reason: CfiError,
    },
    /// The CFA is computed from rbp, whose value is not known.
    FramePointerUnknown { address: u64, module: Arc<str> },
    /// A return address of 0.
    NullReturnAddress,
    /// framehop failed or disagreed with the rule (a bug, or a corrupt stack).
    Unwinder(String),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Outermost => f.write_str("outermost frame"),
            StopReason::StackCopyEnded { needed } => {
                write!(f, "stack copy ended (needed {needed} bytes)")
            }
            StopReason::MaxDepth => f.write_str("maximum depth"),
            StopReason::NotExecutable { address } => {
                write!(f, "{address:#x} is not in executable memory")
            }
            StopReason::NoFile { address, mapping } => {
                write!(
                    f,
                    "{address:#x} is in {mapping}, which has no unwind tables"
                )
            }
            StopReason::NoUnwindTables {
                address,
                module,
                reason,
            } => write!(f, "{module} ({address:#x}): no unwind tables: {reason}"),
            StopReason::NoRule {
                address,
                module,
                reason,
            } => write!(f, "{module} ({address:#x}): {reason}"),
            StopReason::FramePointerUnknown { address, module } => write!(
                f,
                "{module} ({address:#x}): the CFA is computed from rbp, which is unknown"
            ),
            StopReason::NullReturnAddress => f.write_str("null return address"),
            StopReason::Unwinder(e) => write!(f, "unwinder: {e}"),
        }
    }
}

/// The frames of one stack, leaf first, and why the walk ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unwound {
    pub frames: Vec<NativeFrame>,
    pub stop: StopReason,
    /// Bytes from sp that the walk read (the deepest slot read, plus 8).
    pub stack_bytes_used: u64,
}

/// Bounds of an [`Unwinder`].
#[derive(Clone, Copy, Debug)]
pub struct UnwindLimits {
    /// Unwind tables kept, in bytes (`.eh_frame` and its index are about
    /// 0.5 MB for Debian's python3.11, 0.3 MB for libpython, 0.2 MB for libc).
    pub module_bytes: usize,
    /// Rules kept, by address (about 64 bytes each).
    pub rules: usize,
    /// Frames per stack.
    pub max_frames: usize,
}

impl Default for UnwindLimits {
    fn default() -> Self {
        UnwindLimits {
            module_bytes: 64 << 20,
            rules: 1 << 16,
            max_frames: 128,
        }
    }
}

/// Counters of an [`Unwinder`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindStats {
    pub modules_loaded: u64,
    pub module_load_failures: u64,
    pub module_evictions: u64,
    /// Bytes of unwind tables held now.
    pub module_bytes: usize,
    pub rule_hits: u64,
    pub rule_misses: u64,
    pub rule_evictions: u64,
}

/// The vDSO's cache key: one kernel, one vDSO image for every 64-bit process.
const VDSO_KEY: FileKey = FileKey {
    dev: (0, 0),
    inode: 0,
};

type Tables = Arc<Result<UnwindSections, LoadError>>;

/// A module as one process maps it.
enum PidModule {
    Ready {
        key: FileKey,
        bias: u64,
        tables: Arc<Result<UnwindSections, LoadError>>,
    },
    Failed(String),
}

/// framehop's view of one process: its modules, added as the walk meets them.
struct PidState {
    maps_read_at: Instant,
    unwinder: UnwinderX86_64<Arc<[u8]>>,
    /// By mapping start.
    modules: FastHashMap<u64, PidModule>,
}

/// Unwinds user stacks of any number of processes.
pub struct Unwinder {
    limits: UnwindLimits,
    tables: FastLru<FileKey, Tables>,
    rules: FastLru<(FileKey, u64), Result<Rule, CfiError>>,
    ctx: Box<Context>,
    cache: Box<CacheX86_64>,
    pids: FastHashMap<u32, PidState>,
    stats: UnwindStats,
}

impl Unwinder {
    pub fn new(limits: UnwindLimits) -> Unwinder {
        Unwinder {
            limits,
            tables: LruCache::unbounded_with_hasher(Default::default()),
            rules: LruCache::with_hasher(
                NonZeroUsize::new(limits.rules).unwrap_or(NonZeroUsize::MIN),
                Default::default(),
            ),
            ctx: Box::new(Context::new()),
            cache: Box::new(CacheX86_64::new()),
            pids: FastHashMap::default(),
            stats: UnwindStats::default(),
        }
    }

    pub fn stats(&self) -> UnwindStats {
        self.stats
    }

    /// Drop what is kept for `pid` (call when it exits); its files' tables
    /// stay cached for other processes until evicted.
    pub fn forget_pid(&mut self, pid: u32) {
        self.pids.remove(&pid);
    }

    /// Unwind `stack` of a thread of the process whose mappings are `maps`.
    pub fn unwind(&mut self, maps: &ProcessMaps, stack: &UserStack<'_>) -> Unwound {
        let sp0 = stack.regs.sp;
        let used = Cell::new(0u64);
        let mut read = |addr: u64| -> Result<u64, ()> {
            let off = usize::try_from(addr.checked_sub(sp0).ok_or(())?).map_err(|_| ())?;
            let bytes = stack
                .stack
                .get(off..off.checked_add(8).ok_or(())?)
                .ok_or(())?;
            used.set(used.get().max(off as u64 + 8));
            Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
        };
        let mut regs = UnwindRegsX86_64::new(stack.regs.ip, sp0, stack.regs.bp.unwrap_or(0));
        let mut bp_known = stack.regs.bp.is_some();
        let mut frames = vec![NativeFrame {
            address: stack.regs.ip,
            source: FrameSource::Registers,
            sp: sp0,
        }];
        let mut at = FrameAddress::from_instruction_pointer(stack.regs.ip);
        let stop = loop {
            if frames.len() >= self.limits.max_frames {
                break StopReason::MaxDepth;
            }
            let lookup = at.address_for_lookup();
            let Some(mapping) = maps.find(lookup) else {
                break StopReason::NotExecutable { address: lookup };
            };
            let (key, bias, tables) = match self.module(maps, mapping) {
                Ok(m) => m,
                Err(stop) => break stop.at(lookup),
            };
            let Ok(sections) = tables.as_ref() else {
                // `module` only returns loaded tables.
                break StopReason::Unwinder("module without tables".into());
            };
            let svma = lookup.wrapping_sub(bias);
            let rule = match self.rule(key, sections, svma) {
                Ok(rule) => rule,
                Err(reason) => {
                    break StopReason::NoRule {
                        address: lookup,
                        module: mapping.name.clone(),
                        reason,
                    }
                }
            };
            let Rule::Step { base, offset, rbp } = rule else {
                break StopReason::Outermost;
            };
            let base_value = match base {
                CfaBase::Rsp => regs.sp(),
                CfaBase::Rbp if bp_known => regs.bp(),
                CfaBase::Rbp => {
                    break StopReason::FramePointerUnknown {
                        address: lookup,
                        module: mapping.name.clone(),
                    }
                }
            };
            let Some(cfa) = base_value.checked_add_signed(offset) else {
                break StopReason::Unwinder(format!("the CFA overflows at {lookup:#x}"));
            };
            // The slots the rule reads must be in the copy: framehop would
            // fall back to frame pointers if one is not.
            let rbp_slot = match rbp {
                RbpRule::SavedAt(n) => cfa.checked_add_signed(n),
                RbpRule::Unchanged | RbpRule::Lost => None,
            };
            if let Some(slot) = [cfa.checked_sub(8), rbp_slot]
                .into_iter()
                .flatten()
                .find(|&slot| read(slot).is_err())
            {
                break match slot.checked_sub(sp0) {
                    Some(off) => StopReason::StackCopyEnded { needed: off + 8 },
                    None => StopReason::Unwinder(format!(
                        "the rule at {lookup:#x} reads below the stack pointer"
                    )),
                };
            }
            let old_sp = regs.sp();
            let Some(state) = self.pids.get(&maps.pid) else {
                break StopReason::Unwinder("process state dropped".into());
            };
            match state
                .unwinder
                .unwind_frame(at, &mut regs, &mut self.cache, &mut read)
            {
                Ok(Some(ra)) => {
                    if regs.sp() != cfa || regs.sp() <= old_sp {
                        break StopReason::Unwinder(format!(
                            "framehop's CFA {:#x} is not the rule's {cfa:#x} at {lookup:#x}",
                            regs.sp()
                        ));
                    }
                    match rbp {
                        RbpRule::SavedAt(_) => bp_known = true,
                        RbpRule::Lost => bp_known = false,
                        RbpRule::Unchanged => {}
                    }
                    let Some(next) = FrameAddress::from_return_address(ra) else {
                        break StopReason::NullReturnAddress;
                    };
                    frames.push(NativeFrame {
                        address: ra,
                        source: FrameSource::Cfi,
                        sp: cfa,
                    });
                    at = next;
                }
                Ok(None) => break StopReason::Outermost,
                Err(framehop::Error::CouldNotReadStack(addr)) if addr >= sp0 => {
                    break StopReason::StackCopyEnded {
                        needed: addr - sp0 + 8,
                    }
                }
                Err(e) => break StopReason::Unwinder(e.to_string()),
            }
        };
        Unwound {
            frames,
            stop,
            stack_bytes_used: used.get(),
        }
    }

    /// The rule for `svma` in the file `key`, cached.
    fn rule(
        &mut self,
        key: FileKey,
        sections: &UnwindSections,
        svma: u64,
    ) -> Result<Rule, CfiError> {
        if let Some(r) = self.rules.get(&(key, svma)) {
            self.stats.rule_hits += 1;
            return *r;
        }
        self.stats.rule_misses += 1;
        // framehop addresses modules by a 32-bit offset from the load bias.
        let r = if u32::try_from(svma).is_err() {
            Err(CfiError::Unsupported(
                "the address is 4 GiB or more past the load bias",
            ))
        } else {
            sections.rule_for(&mut self.ctx, svma)
        };
        if self
            .rules
            .push((key, svma), r)
            .is_some_and(|(k, _)| k != (key, svma))
        {
            self.stats.rule_evictions += 1;
        }
        r
    }

    /// The loaded module of `mapping` in this process, added to its framehop
    /// unwinder on first use.
    fn module(
        &mut self,
        maps: &ProcessMaps,
        mapping: &ExecMapping,
    ) -> Result<(FileKey, u64, Tables), ModuleStop> {
        let pid = maps.pid;
        if let Some(state) = self.pids.get(&pid) {
            if state.maps_read_at != maps.read_at {
                // New mappings: start over (tables stay cached).
                self.pids.remove(&pid);
            }
        }
        if let Some(m) = self
            .pids
            .get(&pid)
            .and_then(|s| s.modules.get(&mapping.start))
        {
            return match m {
                PidModule::Ready { key, bias, tables } => Ok((*key, *bias, tables.clone())),
                PidModule::Failed(reason) => Err(ModuleStop::failed(mapping, reason)),
            };
        }
        let key = match &mapping.backing {
            Backing::File { key, .. } => *key,
            Backing::Vdso => VDSO_KEY,
            Backing::Anonymous => {
                return Err(ModuleStop::NoFile(mapping.name.clone()));
            }
        };
        let tables = self.tables_for(pid, key, mapping);
        let entry = match tables.as_ref() {
            Err(e) => PidModule::Failed(e.to_string()),
            Ok(s) => match s.bias(mapping.start, mapping.offset) {
                None => PidModule::Failed(format!(
                    "no executable segment covers file offset {:#x}",
                    mapping.offset
                )),
                Some(bias) => PidModule::Ready {
                    key,
                    bias,
                    tables: tables.clone(),
                },
            },
        };
        // Loading may have evicted tables, and with them this process's
        // state: create it after.
        let state = self.pids.entry(pid).or_insert_with(|| PidState {
            maps_read_at: maps.read_at,
            unwinder: UnwinderX86_64::new(),
            modules: FastHashMap::default(),
        });
        if let (PidModule::Ready { bias, .. }, Ok(s)) = (&entry, tables.as_ref()) {
            state.unwinder.add_module(s.framehop_module(
                mapping.name.to_string(),
                mapping.start..mapping.end,
                *bias,
            ));
        }
        let out = match &entry {
            PidModule::Ready { key, bias, tables } => Ok((*key, *bias, tables.clone())),
            PidModule::Failed(reason) => Err(ModuleStop::failed(mapping, reason)),
        };
        state.modules.insert(mapping.start, entry);
        out
    }

    /// The unwind tables of file `key`, from the cache or loaded.
    fn tables_for(&mut self, pid: u32, key: FileKey, mapping: &ExecMapping) -> Tables {
        if let Some(t) = self.tables.get(&key) {
            return t.clone();
        }
        let loaded = match mapping.backing {
            Backing::Vdso => ProcessMemory::new(pid)
                .read_vec(mapping.start, (mapping.end - mapping.start) as usize)
                .map_err(|e| LoadError::Io(e.to_string()))
                .and_then(|bytes| UnwindSections::parse(bytes.as_slice())),
            _ => match mapping.resolve_path(pid) {
                Some(path) => UnwindSections::open(&path),
                None => Err(LoadError::Io("no path".into())),
            },
        };
        let loaded = match loaded {
            Ok(s) if s.bytes() > self.limits.module_bytes => Err(LoadError::TooBig {
                bytes: s.bytes(),
                budget: self.limits.module_bytes,
            }),
            r => r,
        };
        match &loaded {
            Ok(_) => self.stats.modules_loaded += 1,
            Err(_) => self.stats.module_load_failures += 1,
        }
        let tables: Tables = Arc::new(loaded);
        if let Err(e) = tables.as_ref() {
            if !e.is_about_the_file() {
                // This process could not reach the file (it may be exiting):
                // others may, so nothing is cached for the file.
                return tables;
            }
        }
        self.stats.module_bytes += tables_bytes(&tables);
        self.tables.push(key, tables.clone());
        while self.stats.module_bytes > self.limits.module_bytes {
            let Some((old, t)) = self.tables.pop_lru() else {
                break;
            };
            self.stats.module_bytes -= tables_bytes(&t);
            self.stats.module_evictions += 1;
            // Processes holding the evicted tables let go of them too, so
            // that the bound holds; they reload on their next stack.
            self.pids.retain(|_, s| {
                !s.modules
                    .values()
                    .any(|m| matches!(m, PidModule::Ready { key, .. } if *key == old))
            });
        }
        tables
    }
}

fn tables_bytes(t: &Tables) -> usize {
    match t.as_ref() {
        Ok(s) => s.bytes(),
        Err(e) => std::mem::size_of::<LoadError>() + e.to_string().len(),
    }
}

/// Why [`Unwinder::module`] has no tables, before the address is known.
enum ModuleStop {
    NoFile(Arc<str>),
    Failed(Arc<str>, String),
}

impl ModuleStop {
    fn failed(mapping: &ExecMapping, reason: &str) -> ModuleStop {
        ModuleStop::Failed(mapping.name.clone(), reason.to_owned())
    }

    fn at(self, address: u64) -> StopReason {
        match self {
            ModuleStop::NoFile(mapping) => StopReason::NoFile { address, mapping },
            ModuleStop::Failed(module, reason) => StopReason::NoUnwindTables {
                address,
                module,
                reason,
            },
        }
    }
}
