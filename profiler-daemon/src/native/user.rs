//! Symbolisation of user addresses with blazesym: module, function
//! (demangled) and, where DWARF exists (in the file or a debug file found
//! by build-id or debug link), file and line. An address that cannot be
//! named gives an explicit [`Symbol::Unsymbolised`] with its module and
//! offset, never nothing.
//!
//! Files are opened through `/proc/PID/root` (or `/proc/PID/map_files` when
//! deleted), so targets in other mount namespaces work. Results are cached
//! per (file, file offset), the same key in every process mapping the file,
//! in an LRU bounded in bytes with counted evictions.
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use blazesym::symbolize::source::{Elf, Process, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer};
use lru::LruCache;

use super::maps::{Backing, FileKey, ProcessMaps};

/// The eval loop's function: each of its activations on the native stack
/// runs a run of Python frames (3.11-3.14).
pub const EVAL_LOOP: &str = "_PyEval_EvalFrameDefault";

/// Where a function's instruction is in its source.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceLine {
    /// The path as the DWARF names it (often relative to the build directory).
    pub file: Arc<str>,
    pub line: Option<u32>,
}

/// Why an address has no name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unsymbolised {
    /// In no executable mapping.
    NotMapped,
    /// Executable memory without a file (JIT code).
    NoFile,
    /// The file has no symbol covering the address (e.g. a static function
    /// of a stripped binary); blazesym's reason.
    NoSymbol(String),
    /// The file could not be read (gone, no permission, malformed).
    Unreadable(String),
}

/// What an address is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Symbol {
    Function {
        name: Arc<str>,
        /// Bytes from the function's start.
        offset: u64,
        source: Option<SourceLine>,
    },
    Unsymbolised(Unsymbolised),
}

/// A symbolised address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeSymbol {
    /// File name of the mapping (`libc.so.6`), `[vdso]`, `[anon]`, or
    /// `[unmapped]`.
    pub module: Arc<str>,
    /// Offset of the address in the file (in the mapping for files-less
    /// memory; the address itself when unmapped).
    pub module_offset: u64,
    pub symbol: Symbol,
}

impl NativeSymbol {
    pub fn function(&self) -> Option<&str> {
        match &self.symbol {
            Symbol::Function { name, .. } => Some(name),
            Symbol::Unsymbolised(_) => None,
        }
    }

    /// An activation of CPython's eval loop.
    pub fn is_eval_loop(&self) -> bool {
        self.function() == Some(EVAL_LOOP)
    }

    fn bytes(&self) -> usize {
        let strings = match &self.symbol {
            Symbol::Function { name, source, .. } => {
                name.len() + source.as_ref().map_or(0, |s| s.file.len())
            }
            Symbol::Unsymbolised(Unsymbolised::NoSymbol(s) | Unsymbolised::Unreadable(s)) => {
                s.len()
            }
            Symbol::Unsymbolised(_) => 0,
        };
        std::mem::size_of::<Self>() + self.module.len() + strings
    }
}

impl fmt::Display for NativeSymbol {
    /// `time_sleep (timemodule.c:383, libpython3.11.so.1.0)`, or
    /// `python3.11+0x1d64b3` when it has no name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.symbol {
            Symbol::Function { name, source, .. } => {
                write!(f, "{name} (")?;
                if let Some(s) = source {
                    let file = s.file.rsplit('/').next().unwrap_or(&s.file);
                    match s.line {
                        Some(line) => write!(f, "{file}:{line}, ")?,
                        None => write!(f, "{file}, ")?,
                    }
                }
                write!(f, "{})", self.module)
            }
            Symbol::Unsymbolised(_) => write!(f, "{}+{:#x}", self.module, self.module_offset),
        }
    }
}

/// Bound of a [`UserSymbolizer`].
#[derive(Clone, Copy, Debug)]
pub struct SymbolLimits {
    /// Bytes of cached results (each about 150 bytes plus its strings).
    pub bytes: usize,
}

impl Default for SymbolLimits {
    fn default() -> Self {
        SymbolLimits { bytes: 16 << 20 }
    }
}

/// Counters of a [`UserSymbolizer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub bytes: usize,
    pub entries: usize,
    /// Symbolisations of a whole file that failed (not cached).
    pub file_errors: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SymKey {
    file: FileKey,
    offset: u64,
}

/// The vDSO: one image per kernel.
const VDSO_KEY: FileKey = FileKey {
    dev: (0, 0),
    inode: 0,
};

/// LRU node and hash table overhead per cached entry, counted in the bound.
const ENTRY_OVERHEAD: usize = 64;

/// Symbolises user addresses of any number of processes.
///
/// Not `Send`: blazesym's symbolizer keeps `Rc`s; own one per thread.
pub struct UserSymbolizer {
    blaze: Symbolizer,
    cache: LruCache<SymKey, Arc<NativeSymbol>, foldhash::fast::RandomState>,
    limits: SymbolLimits,
    stats: SymbolStats,
    /// Paths blazesym opened per process: it caches per path (and shares
    /// the parsed file between paths to the same file), evicted with the
    /// process.
    paths: HashMap<u32, HashSet<PathBuf>>,
}

impl UserSymbolizer {
    pub fn new(limits: SymbolLimits) -> UserSymbolizer {
        UserSymbolizer {
            blaze: Symbolizer::builder()
                .enable_code_info(true)
                .enable_inlined_fns(false)
                .enable_demangling(true)
                .build(),
            cache: LruCache::unbounded_with_hasher(Default::default()),
            limits,
            stats: SymbolStats::default(),
            paths: HashMap::new(),
        }
    }

    pub fn stats(&self) -> SymbolStats {
        SymbolStats {
            entries: self.cache.len(),
            ..self.stats
        }
    }

    /// Drop what blazesym keeps for `pid` (call when it exits); cached
    /// results stay, keyed by file.
    pub fn forget_pid(&mut self, pid: u32) {
        for path in self.paths.remove(&pid).unwrap_or_default() {
            let evict = blazesym::symbolize::evict::Elf::new(path);
            // Evicting is best effort and never fails for a path.
            let _ = self.blaze.evict(&evict.into());
        }
    }

    /// One symbol per address of `lookups` (addresses to look up: for a
    /// return address, the call instruction, see
    /// [`super::unwind::NativeFrame::lookup_address`]).
    pub fn symbolise(&mut self, maps: &ProcessMaps, lookups: &[u64]) -> Vec<Arc<NativeSymbol>> {
        let mut out: Vec<Option<Arc<NativeSymbol>>> = vec![None; lookups.len()];
        // Misses, by mapping start: (index in `out`, key, address).
        let mut pending: HashMap<u64, Vec<(usize, SymKey, u64)>> = HashMap::new();
        for (i, &addr) in lookups.iter().enumerate() {
            let Some(m) = maps.find(addr) else {
                out[i] = Some(Arc::new(NativeSymbol {
                    module: Arc::from("[unmapped]"),
                    module_offset: addr,
                    symbol: Symbol::Unsymbolised(Unsymbolised::NotMapped),
                }));
                continue;
            };
            let file = match &m.backing {
                Backing::File { key, .. } => *key,
                Backing::Vdso => VDSO_KEY,
                Backing::Anonymous => {
                    out[i] = Some(Arc::new(NativeSymbol {
                        module: m.name.clone(),
                        module_offset: m.file_offset(addr),
                        symbol: Symbol::Unsymbolised(Unsymbolised::NoFile),
                    }));
                    continue;
                }
            };
            let key = SymKey {
                file,
                offset: m.file_offset(addr),
            };
            if let Some(s) = self.cache.get(&key) {
                self.stats.hits += 1;
                out[i] = Some(s.clone());
            } else {
                self.stats.misses += 1;
                pending.entry(m.start).or_default().push((i, key, addr));
            }
        }
        for (start, misses) in pending {
            let Some(m) = maps.find(start) else { continue };
            let (source, input): (Source<'_>, Vec<u64>) = match &m.backing {
                Backing::Vdso => {
                    let mut p = Process::new(maps.pid.into());
                    p.debug_syms = false;
                    p.perf_map = false;
                    p.map_files = false;
                    (p.into(), misses.iter().map(|&(_, _, a)| a).collect())
                }
                _ => {
                    let Some(path) = m.resolve_path(maps.pid) else {
                        continue;
                    };
                    self.paths.entry(maps.pid).or_default().insert(path.clone());
                    let elf = Elf::new(path);
                    (
                        elf.into(),
                        misses.iter().map(|&(_, k, _)| k.offset).collect(),
                    )
                }
            };
            let input = match m.backing {
                Backing::Vdso => Input::AbsAddr(input.as_slice()),
                _ => Input::FileOffset(input.as_slice()),
            };
            match self.blaze.symbolize(&source, input) {
                Ok(results) => {
                    let symbols: Vec<Arc<NativeSymbol>> = results
                        .into_iter()
                        .zip(&misses)
                        .map(|(r, &(_, key, _))| {
                            Arc::new(NativeSymbol {
                                module: m.name.clone(),
                                module_offset: key.offset,
                                symbol: convert(r),
                            })
                        })
                        .collect();
                    for (s, &(i, key, _)) in symbols.into_iter().zip(&misses) {
                        out[i] = Some(s.clone());
                        self.insert(key, s);
                    }
                }
                Err(e) => {
                    self.stats.file_errors += 1;
                    let reason = e.to_string();
                    for &(i, key, _) in &misses {
                        out[i] = Some(Arc::new(NativeSymbol {
                            module: m.name.clone(),
                            module_offset: key.offset,
                            symbol: Symbol::Unsymbolised(Unsymbolised::Unreadable(reason.clone())),
                        }));
                    }
                }
            }
        }
        out.into_iter()
            .zip(lookups)
            .map(|(s, &addr)| {
                // Every index was filled above, but say so rather than panic.
                s.unwrap_or_else(|| {
                    Arc::new(NativeSymbol {
                        module: Arc::from("[unmapped]"),
                        module_offset: addr,
                        symbol: Symbol::Unsymbolised(Unsymbolised::NotMapped),
                    })
                })
            })
            .collect()
    }

    fn insert(&mut self, key: SymKey, s: Arc<NativeSymbol>) {
        let cost = |s: &NativeSymbol| s.bytes() + std::mem::size_of::<SymKey>() + ENTRY_OVERHEAD;
        let new = cost(&s);
        if new > self.limits.bytes {
            return;
        }
        if let Some(old) = self.cache.put(key, s) {
            self.stats.bytes -= cost(&old);
        }
        self.stats.bytes += new;
        while self.stats.bytes > self.limits.bytes {
            let Some((_, old)) = self.cache.pop_lru() else {
                break;
            };
            self.stats.bytes -= cost(&old);
            self.stats.evictions += 1;
        }
    }
}

fn convert(r: Symbolized<'_>) -> Symbol {
    match r {
        Symbolized::Sym(sym) => Symbol::Function {
            name: Arc::from(&*sym.name),
            offset: sym.offset as u64,
            source: sym.code_info.map(|ci| SourceLine {
                file: Arc::from(ci.to_path().to_string_lossy().as_ref()),
                line: ci.line,
            }),
        },
        Symbolized::Unknown(reason) => {
            Symbol::Unsymbolised(Unsymbolised::NoSymbol(reason.to_string()))
        }
    }
}
