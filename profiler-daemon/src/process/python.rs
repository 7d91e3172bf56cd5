//! Recognising a CPython process and gathering what the sampler needs: its
//! version and layout, the address of `_PyRuntime` and of `PyCode_Type`,
//! and a verified way from each thread to its `PyThreadState`.
//!
//! `_PyRuntime` is exported in `.dynsym` of libpython (shared builds) or of
//! the executable (static builds linked with `-export-dynamic`), and from
//! 3.13 on sits in its own `.PyRuntime` section, found even without symbols.
//! The version comes from `Py_Version` (3.11+) or, failing that, from the
//! `_Py_DebugOffsets` at the start of `_PyRuntime` (3.13+); the layout from
//! the version's module and what the interpreter publishes about itself.
use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use profiler_common::{ProcInfo, PyLayout, TlsLayout};

use super::elf::{self, ElfError, ElfFile, LoadLayout};
use super::elf_cache::{ElfCache, FileId, DEFAULT_CAPACITY};
use super::gilstate::{self, GilstateError};
use super::maps::{self, MapEntry};
use super::memory::{MemoryError, ProcessMemory, RemoteMemory};
use super::tls::{self, TlsDetection, TlsError};
use super::tls_access::{self, TlsAccess};
use crate::python::code::CodeFormat;
use crate::python::layout::debug_offsets::{self, Moved};
use crate::python::layout::{Layout, Minor};

/// The section CPython 3.13+ puts `_PyRuntime` in.
pub const RUNTIME_SECTION: &str = ".PyRuntime";
/// The function that reads the gilstate binding (decoded for 3.15+).
pub const GILSTATE_GETTER: &str = "PyGILState_GetThisThreadState";
/// Longest `PyGILState_GetThisThreadState` decoded.
const GILSTATE_GETTER_MAX: u64 = 256;

/// A CPython version, from `PY_VERSION_HEX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyVersion {
    pub major: u8,
    pub minor: u8,
    pub micro: u8,
    /// The whole `PY_VERSION_HEX` (`0x030b07f0` for 3.11.7 final).
    pub hex: u32,
}

impl PyVersion {
    pub fn from_hex(hex: u32) -> PyVersion {
        PyVersion {
            major: (hex >> 24) as u8,
            minor: (hex >> 16) as u8,
            micro: (hex >> 8) as u8,
            hex,
        }
    }
}

impl fmt::Display for PyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        let serial = self.hex & 0xf;
        match (self.hex >> 4) & 0xf {
            0xa => write!(f, "a{serial}"),
            0xb => write!(f, "b{serial}"),
            0xc => write!(f, "rc{serial}"),
            _ => Ok(()),
        }
    }
}

impl PyVersion {
    /// The layout module of this version, if pyebpf has one.
    pub fn layout_minor(&self) -> Option<Minor> {
        (self.major == 3)
            .then(|| Minor::from_minor(self.minor))
            .flatten()
    }
}

/// Where a process's layout came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayoutSource {
    /// The version's headers (3.11, 3.12: nothing is published).
    Headers,
    /// The interpreter's `_Py_DebugOffsets`; the fields listed differ from
    /// the headers pyebpf was built with.
    Published { moved: Vec<Moved> },
}

/// A CPython process, ready to be sampled.
#[derive(Clone, Debug)]
pub struct PythonProcess {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat` (clock ticks after boot): with `pid`,
    /// identifies this process even after its pid is reused.
    pub start_time: u64,
    /// `/proc/PID/comm`.
    pub command: String,
    /// Target of `/proc/PID/exe`.
    pub exe: PathBuf,
    pub version: PyVersion,
    /// Address of `_PyRuntime` in the target.
    pub runtime_addr: u64,
    /// Address of `PyCode_Type` in the target.
    pub pycode_type: u64,
    /// The ELF file holding `_PyRuntime`, as the target sees it: the
    /// executable for static builds, libpython for shared ones.
    pub interp_binary: PathBuf,
    /// Everything pyebpf reads in this interpreter.
    pub layout: Layout,
    pub layout_source: LayoutSource,
    /// The offsets the BPF walker follows (checked to fit what it reads).
    pub walker: PyLayout,
    /// How the BPF side finds a thread's `PyThreadState` from its FS base.
    pub tls: TlsLayout,
    /// The evidence for `tls`: threads walked and threads it found.
    pub tls_check: TlsDetection,
    /// Where its GIL state is (`None` if it could not be found: GIL waits
    /// are then not told from other waits).
    pub gil: Option<std::ops::Range<u64>>,
}

impl PythonProcess {
    /// What the BPF sampler needs for this process.
    pub fn proc_info(&self) -> ProcInfo {
        ProcInfo::new(self.tls, self.walker)
    }

    /// How this process's code objects are read.
    pub fn code_format(&self) -> CodeFormat {
        CodeFormat::new(self.pycode_type, &self.layout)
    }
}

/// Why a process cannot be profiled; each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("process {0} does not exist")]
    NoSuchProcess(u32),
    #[error("process {0} ({1}) is not a Python process: no mapped ELF file defines _PyRuntime")]
    NotPython(u32, String),
    #[error("process {pid} runs Python {version}; pyebpf supports CPython 3.11 to 3.15")]
    UnsupportedVersion { pid: u32, version: String },
    #[error(
        "process {pid} runs a free-threaded CPython ({version}t), which pyebpf does not support \
         yet: its objects have another header and per-thread bytecode"
    )]
    FreeThreaded { pid: u32, version: String },
    #[error("process {pid}: the Python runtime is not initialized yet ({detail}); retry later")]
    NotInitialized { pid: u32, detail: String },
    #[error(
        "no permission to inspect process {pid} ({what}): needs CAP_SYS_PTRACE (or root), and no \
         security module (SELinux, AppArmor, Landlock, Yama) denying it"
    )]
    Permission { pid: u32, what: String },
    #[error("process {pid}: {file} defines _PyRuntime but not {symbol}")]
    MissingSymbol {
        pid: u32,
        file: PathBuf,
        symbol: &'static str,
    },
    #[error("process {pid}: unexpected CPython {version} layout: {reason}")]
    Incompatible {
        pid: u32,
        version: String,
        reason: String,
    },
    #[error("process {pid}: cannot find the thread-local PyThreadState: {source}")]
    Tls { pid: u32, source: TlsError },
    #[error(transparent)]
    Memory(MemoryError),
    #[error(transparent)]
    Elf(ElfError),
    #[error("cannot read {path}: {source}")]
    Proc { path: PathBuf, source: io::Error },
}

impl From<MemoryError> for InspectError {
    fn from(e: MemoryError) -> Self {
        match e {
            MemoryError::Gone { pid } => InspectError::NoSuchProcess(pid),
            MemoryError::Permission { pid } => InspectError::Permission {
                pid,
                what: "reading its memory".into(),
            },
            e => InspectError::Memory(e),
        }
    }
}

/// Map an error on a `/proc/PID/...` file to the variant it means.
fn proc_error(pid: u32, path: &Path, e: io::Error) -> InspectError {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::NotFound, _) | (_, Some(libc::ESRCH)) => InspectError::NoSuchProcess(pid),
        (io::ErrorKind::PermissionDenied, _) => InspectError::Permission {
            pid,
            what: format!("reading {}", path.display()),
        },
        _ => InspectError::Proc {
            path: path.to_owned(),
            source: e,
        },
    }
}

fn read_proc(pid: u32, name: &str) -> Result<String, InspectError> {
    let path = PathBuf::from(format!("/proc/{pid}/{name}"));
    std::fs::read(&path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|e| proc_error(pid, &path, e))
}

/// Field 22 (`starttime`) of a `/proc/PID/stat` line. The command (field 2)
/// may contain spaces and parentheses, so fields are counted after the last
/// `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the ')'.
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod alive_tests {
    use super::*;

    #[test]
    fn zombie_and_reused_pids_are_not_alive() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = start_time(pid).unwrap();
        assert!(is_alive(pid, start));
        assert!(
            !is_alive(pid, start + 1),
            "another start time is another process"
        );
        child.kill().unwrap();
        // Not reaped yet: a zombie until wait().
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!is_alive(pid, start));
        child.wait().unwrap();
        assert!(!is_alive(pid, start));
    }
}

/// The command (field 2) of a `/proc/PID/stat` line: what `/proc/PID/comm`
/// holds.
pub fn parse_command(stat: &str) -> Option<&str> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    stat.get(open + 1..close)
}

/// The start time and command of `pid`, from one read of `/proc/PID/stat`.
pub fn start_time_and_command(pid: u32) -> Result<(u64, String), InspectError> {
    let stat = read_proc(pid, "stat")?;
    match (parse_start_time(&stat), parse_command(&stat)) {
        (Some(start), Some(comm)) => Ok((start, comm.to_owned())),
        _ => Err(InspectError::Proc {
            path: format!("/proc/{pid}/stat").into(),
            source: io::Error::new(io::ErrorKind::InvalidData, "no command or start time field"),
        }),
    }
}

/// The start time of `pid`, see [`PythonProcess::start_time`].
pub fn start_time(pid: u32) -> Result<u64, InspectError> {
    let stat = read_proc(pid, "stat")?;
    parse_start_time(&stat).ok_or_else(|| InspectError::Proc {
        path: format!("/proc/{pid}/stat").into(),
        source: io::Error::new(io::ErrorKind::InvalidData, "no start time field"),
    })
}

/// Whether `pid` is still the process that started at `start_time` and has
/// not exited: a zombie (exited, not yet reaped) or a reused pid is not.
pub fn is_alive(pid: u32, start_time: u64) -> bool {
    let Ok(stat) = read_proc(pid, "stat") else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_ascii_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X") | Some("x"))
        && parse_start_time(&stat) == Some(start_time)
}

/// `/proc/PID/comm` without its newline.
pub fn command(pid: u32) -> Result<String, InspectError> {
    Ok(read_proc(pid, "comm")?.trim_end_matches('\n').to_owned())
}

/// `/proc/PID/cmdline` with arguments joined by spaces; `None` if the process
/// is gone or has no command line (kernel threads, zombies).
pub fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<_> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect();
    (!args.is_empty()).then(|| args.join(" "))
}

/// One file mapped into the target, with its lowest-offset mapping.
#[derive(Clone, Debug)]
struct MappedFile {
    first: MapEntry,
    is_exe: bool,
    executable: bool,
}

impl MappedFile {
    fn path(&self) -> &str {
        self.first.path.as_deref().unwrap_or_default()
    }

    fn looks_like_python(&self) -> bool {
        self.first
            .file_name()
            .is_some_and(|n| n.to_ascii_lowercase().contains("python"))
    }
}

/// Group the file mappings by file, keeping the first (lowest-offset)
/// mapping of each, in order of appearance.
fn mapped_files(maps: &[MapEntry], exe: &Path, exe_id: Option<(u64, u64)>) -> Vec<MappedFile> {
    let mut out: Vec<MappedFile> = Vec::new();
    for m in maps.iter().filter(|m| m.is_file()) {
        if let Some(f) = out
            .iter_mut()
            .find(|f| f.first.dev == m.dev && f.first.inode == m.inode && f.first.path == m.path)
        {
            f.executable |= m.perms.exec;
            if (m.offset, m.start) < (f.first.offset, f.first.start) {
                f.first = m.clone();
            }
            continue;
        }
        let same_id = exe_id.is_some_and(|(dev, ino)| {
            ino == m.inode
                && (u64::from(m.dev.0), u64::from(m.dev.1))
                    == (u64::from(libc::major(dev)), u64::from(libc::minor(dev)))
        });
        let same_path = m.path.as_deref().map(Path::new) == Some(exe);
        out.push(MappedFile {
            first: m.clone(),
            is_exe: same_id || same_path,
            executable: m.perms.exec,
        });
    }
    out
}

/// Paths to a mapped file valid in any mount namespace: the one to use, and
/// the one to fall back on if it cannot be opened.
fn mapped_paths(pid: u32, f: &MappedFile) -> (PathBuf, Option<PathBuf>) {
    let by_map = || elf::map_files_path(pid, f.first.start, f.first.end);
    if f.is_exe {
        (elf::exe_path(pid), None)
    } else if f.first.deleted {
        (by_map(), None)
    } else {
        (elf::root_path(pid, f.path()), Some(by_map()))
    }
}

/// Open a mapped file, with the metadata of what was opened.
fn open_mapped(pid: u32, f: &MappedFile) -> Result<(ElfFile, std::fs::Metadata), ElfError> {
    let (path, fallback) = mapped_paths(pid, f);
    match (ElfFile::open_with_metadata(&path), fallback) {
        (Err(e), Some(fallback)) => ElfFile::open_with_metadata(&fallback).map_err(|_| e),
        (r, _) => r,
    }
}

/// What one ELF file says about Python; cached per file (see
/// [`VerdictCache`]) since most processes map the same few files.
#[derive(Clone, Debug)]
pub enum FileVerdict {
    /// Defines no `_PyRuntime` (or its symbol tables are unreadable).
    NoPython,
    /// Defines `_PyRuntime`: an interpreter binary.
    Python(Arc<PySymbols>),
}

/// The link-time values of an interpreter binary's symbols, and what its
/// load bias is computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PySymbols {
    pub runtime: u64,
    /// `None` before 3.11.
    pub py_version: Option<u64>,
    pub pycode_type: Option<u64>,
    /// How `PyGILState_GetThisThreadState` reads the gilstate binding, when
    /// it reads a thread-local (3.15+).
    pub gilstate_access: Option<TlsAccess>,
    pub layout: LoadLayout,
}

/// [`FileVerdict`]s by file identity.
pub type VerdictCache = ElfCache<FileVerdict>;

/// The cache [`inspect`] uses, shared by every thread of the process.
pub fn shared_cache() -> &'static VerdictCache {
    static SHARED: LazyLock<VerdictCache> = LazyLock::new(|| ElfCache::new(DEFAULT_CAPACITY));
    &SHARED
}

/// Read the Python symbols of `file`. An unreadable `_PyRuntime` look-up
/// makes the file "not Python" (it is skipped, as any other file) unless
/// the file is named like an interpreter (`pythonish`): then, as an
/// unreadable look-up of the others once `_PyRuntime` is found, it is an
/// error (not cached), which discovery retries and then reports.
fn analyze(pid: u32, file: &ElfFile, pythonish: bool) -> Result<FileVerdict, ElfError> {
    let by_symbol = file.symbol("_PyRuntime").map(|s| s.map(|s| s.value));
    // 3.13+ keeps `_PyRuntime` in its own section, named even without symbols.
    let runtime = match by_symbol {
        Ok(Some(v)) => v,
        Ok(None) | Err(_) => match file.section_address(RUNTIME_SECTION) {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(FileVerdict::NoPython),
            Err(e) if pythonish => return Err(e),
            Err(e) => {
                tracing::debug!(pid, file = %file.path().display(), "skipping: {e}");
                return Ok(FileVerdict::NoPython);
            }
        },
    };
    let gilstate_access = match file.symbol(GILSTATE_GETTER)? {
        Some(f) => file
            .read_vaddr(f.value, f.size.clamp(1, GILSTATE_GETTER_MAX) as usize)
            .ok()
            .and_then(|code| tls_access::decode(&code, f.value)),
        None => None,
    };
    Ok(FileVerdict::Python(Arc::new(PySymbols {
        runtime,
        py_version: file.symbol("Py_Version")?.map(|s| s.value),
        pycode_type: file.symbol("PyCode_Type")?.map(|s| s.value),
        gilstate_access,
        layout: file.layout(),
    })))
}

/// The cached verdict on a mapped file: costs a `stat` of the path
/// [`open_mapped`] would open (its fallback if that one does not resolve);
/// `exe_meta` is that of `/proc/PID/exe`, already read.
fn cached_verdict(
    pid: u32,
    f: &MappedFile,
    cache: &VerdictCache,
    exe_meta: Option<&std::fs::Metadata>,
) -> Option<FileVerdict> {
    if let (true, Some(meta)) = (f.is_exe, exe_meta) {
        return cache.get(&FileId::of(meta));
    }
    let (path, fallback) = mapped_paths(pid, f);
    let meta = std::fs::metadata(&path)
        .or_else(|e| match &fallback {
            Some(p) => std::fs::metadata(p),
            None => Err(e),
        })
        .ok()?;
    cache.get(&FileId::of(&meta))
}

/// The ELF file that defines `_PyRuntime`, and where it is loaded.
struct Interpreter {
    symbols: Arc<PySymbols>,
    mapped: MappedFile,
    bias: u64,
    runtime_addr: u64,
}

/// Look for `_PyRuntime` in the mapped files, python-named ones first.
/// Files already in `cache` are not opened.
fn find_interpreter(
    pid: u32,
    comm: &str,
    maps: &[MapEntry],
    exe: &Path,
    cache: &VerdictCache,
) -> Result<Interpreter, InspectError> {
    let exe_meta = std::fs::metadata(elf::exe_path(pid)).ok();
    let exe_id = exe_meta.as_ref().map(|m| (m.dev(), m.ino()));
    let mut files: Vec<MappedFile> = mapped_files(maps, exe, exe_id)
        .into_iter()
        .filter(|f| f.executable)
        .collect();
    files.sort_by_key(|f| (!f.looks_like_python(), !f.is_exe));

    let mut first_error: Option<InspectError> = None;
    for f in files {
        if let Some(verdict) = cached_verdict(pid, &f, cache, exe_meta.as_ref()) {
            match verdict {
                FileVerdict::NoPython => continue,
                FileVerdict::Python(symbols) => return interpreter(pid, f, symbols),
            }
        }
        let (file, meta) = match open_mapped(pid, &f) {
            Ok(opened) => opened,
            Err(e) => {
                tracing::debug!(pid, file = f.path(), "skipping: {e}");
                if f.looks_like_python() && first_error.is_none() {
                    first_error = Some(match e.io_kind() {
                        Some(io::ErrorKind::PermissionDenied) => InspectError::Permission {
                            pid,
                            what: format!("opening {}", f.path()),
                        },
                        Some(io::ErrorKind::NotFound)
                            if !Path::new(&format!("/proc/{pid}")).exists() =>
                        {
                            InspectError::NoSuchProcess(pid)
                        }
                        _ => InspectError::Elf(e),
                    });
                }
                continue;
            }
        };
        let verdict = analyze(pid, &file, f.looks_like_python()).map_err(InspectError::Elf)?;
        cache.insert(FileId::of(&meta), verdict.clone());
        if let FileVerdict::Python(symbols) = verdict {
            return interpreter(pid, f, symbols);
        }
    }
    Err(first_error.unwrap_or_else(|| InspectError::NotPython(pid, comm.to_owned())))
}

/// Where the interpreter binary `f` is loaded in `pid`.
fn interpreter(
    pid: u32,
    f: MappedFile,
    symbols: Arc<PySymbols>,
) -> Result<Interpreter, InspectError> {
    let (path, _) = mapped_paths(pid, &f);
    let bias = symbols
        .layout
        .load_bias(&path, f.first.start, f.first.offset)
        .map_err(InspectError::Elf)?;
    Ok(Interpreter {
        runtime_addr: bias.wrapping_add(symbols.runtime),
        symbols,
        mapped: f,
        bias,
    })
}

/// `3.10` from `libpython3.10.so.1.0`, `python3.10d`, ...
fn version_from_file_name(name: &str) -> Option<String> {
    let at = name.find("python")? + "python".len();
    let digits: String = name[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let digits = digits.trim_end_matches('.');
    let mut parts = digits.split('.');
    let (major, minor) = (parts.next()?, parts.next()?);
    (!major.is_empty() && !minor.is_empty()).then(|| format!("{major}.{minor}"))
}

/// `Py_Version`, read from the target's memory (or from the file if the
/// page cannot be read: it is constant data); without the symbol, the
/// version `_Py_DebugOffsets` publishes (`head`: the start of `_PyRuntime`).
fn read_version<M: RemoteMemory>(
    pid: u32,
    mem: &M,
    interp: &Interpreter,
    head: Option<&[u8]>,
) -> Result<PyVersion, InspectError> {
    let Some(py_version) = interp.symbols.py_version else {
        if let Some(h) = head.and_then(|h| debug_offsets::header(h).ok()) {
            return Ok(PyVersion::from_hex(h.version));
        }
        // Before 3.11: say which version if the file name tells.
        let version = interp
            .mapped
            .first
            .file_name()
            .and_then(version_from_file_name)
            .filter(|v| v != "3.11")
            .unwrap_or_else(|| "older than 3.11 (no Py_Version symbol)".into());
        return Err(InspectError::UnsupportedVersion { pid, version });
    };
    let addr = interp.bias.wrapping_add(py_version);
    let hex = match mem.read_u64(addr) {
        Ok(v) => v,
        Err(e @ (MemoryError::Gone { .. } | MemoryError::Permission { .. })) => {
            return Err(e.into())
        }
        Err(e) => {
            tracing::debug!(
                pid,
                "Py_Version unreadable in memory ({e}); reading the file"
            );
            // Rare: open the file again rather than keep it open.
            let (file, _) = open_mapped(pid, &interp.mapped).map_err(InspectError::Elf)?;
            let b = file.read_vaddr(py_version, 8).map_err(InspectError::Elf)?;
            let mut w = [0u8; 8];
            w.copy_from_slice(&b);
            u64::from_le_bytes(w)
        }
    };
    Ok(PyVersion::from_hex(hex as u32))
}

/// The layout of `minor` in this process: its headers', with what the
/// interpreter publishes in `_Py_DebugOffsets` (3.13+) taking precedence.
fn resolve_layout(
    minor: Minor,
    version: &PyVersion,
    head: Option<&[u8]>,
) -> Result<(Layout, LayoutSource), String> {
    let Some(fields) = minor.debug_fields() else {
        return Ok((minor.header_layout(), LayoutSource::Headers));
    };
    let raw = head.ok_or("the start of _PyRuntime (_Py_DebugOffsets) is unreadable")?;
    let published = debug_offsets::header(raw).map_err(|e| e.to_string())?;
    if published.version >> 16 != version.hex >> 16 {
        return Err(format!(
            "_Py_DebugOffsets says version {}, Py_Version says {version}",
            PyVersion::from_hex(published.version)
        ));
    }
    let (layout, moved) =
        debug_offsets::apply(&minor.header_layout(), fields, raw).map_err(|e| e.to_string())?;
    Ok((layout, LayoutSource::Published { moved }))
}

/// Recognise `pid` as a CPython process pyebpf supports and gather what
/// sampling it needs, verifying how threads reach their state on its live
/// threads. What its ELF files say is kept in (and taken from) the
/// [`shared_cache`].
pub fn inspect(pid: u32) -> Result<PythonProcess, InspectError> {
    inspect_cached(pid, shared_cache())
}

/// [`inspect`] with the verdicts on ELF files kept in `cache`.
pub fn inspect_cached(pid: u32, cache: &VerdictCache) -> Result<PythonProcess, InspectError> {
    let start_time = start_time(pid)?;
    let command = command(pid)?;
    let exe_link = elf::exe_path(pid);
    let exe = match std::fs::read_link(&exe_link) {
        Ok(p) => p,
        // Kernel threads have no executable.
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                && Path::new(&format!("/proc/{pid}")).exists() =>
        {
            return Err(InspectError::NotPython(pid, command));
        }
        Err(e) => return Err(proc_error(pid, &exe_link, e)),
    };
    let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
    let maps = maps::read(pid).map_err(|e| proc_error(pid, &maps_path, e))?;
    let interp = find_interpreter(pid, &command, &maps, &exe, cache)?;
    let mem = ProcessMemory::new(pid);
    let runtime_addr = interp.runtime_addr;

    let head = match mem.read_vec(runtime_addr, debug_offsets::MAX_SLOTS * 8) {
        Ok(h) => Some(h),
        Err(e @ (MemoryError::Gone { .. } | MemoryError::Permission { .. })) => {
            return Err(e.into())
        }
        Err(_) => None,
    };
    let version = read_version(pid, &mem, &interp, head.as_deref())?;
    let free_threaded = head
        .as_deref()
        .and_then(|h| debug_offsets::header(h).ok())
        .is_some_and(|h| h.free_threaded);
    if free_threaded {
        return Err(InspectError::FreeThreaded {
            pid,
            version: version.to_string(),
        });
    }
    let minor = version
        .layout_minor()
        .ok_or_else(|| InspectError::UnsupportedVersion {
            pid,
            version: version.to_string(),
        })?;
    let incompatible = |reason: String| InspectError::Incompatible {
        pid,
        version: version.to_string(),
        reason,
    };
    let (layout, layout_source) =
        resolve_layout(minor, &version, head.as_deref()).map_err(incompatible)?;
    if let LayoutSource::Published { moved } = &layout_source {
        if !moved.is_empty() {
            tracing::info!(
                pid,
                version = %version,
                headers = minor.headers(),
                moved = ?moved,
                "the interpreter publishes offsets that differ from its version's headers; using them"
            );
        }
    }
    let walker = layout.walker().map_err(|e| incompatible(e.to_string()))?;

    let interp_binary = if interp.mapped.is_exe {
        exe.clone()
    } else {
        PathBuf::from(interp.mapped.path())
    };
    let pycode_type = interp
        .symbols
        .pycode_type
        .ok_or_else(|| InspectError::MissingSymbol {
            pid,
            file: interp_binary.clone(),
            symbol: "PyCode_Type",
        })?;
    let pycode_type = interp.bias.wrapping_add(pycode_type);

    let basicsize = mem.read_u64(pycode_type.wrapping_add(layout.type_basicsize))?;
    if basicsize != layout.code.adaptive {
        return Err(incompatible(format!(
            "PyCode_Type.tp_basicsize is {basicsize}, expected {} (a debug or trace-refs build?)",
            layout.code.adaptive
        )));
    }

    let threads = tls::thread_states(&mem, runtime_addr, &layout.threads)?;
    let binary = gilstate::Binary {
        access: interp.symbols.gilstate_access,
        bias: interp.bias,
    };
    let hint = tls::libc_hint(&maps);
    let tls_check = gilstate::locate(&mem, runtime_addr, layout.gilstate, &threads, hint, &binary)
        .map_err(|e| match e {
            GilstateError::NotReady(detail) => InspectError::NotInitialized { pid, detail },
            GilstateError::Tls(TlsError::Memory(
                e @ (MemoryError::Gone { .. } | MemoryError::Permission { .. }),
            )) => e.into(),
            GilstateError::Tls(source) => InspectError::Tls { pid, source },
        })?;
    tracing::debug!(
        pid,
        version = %version,
        layout = tls::describe(&tls_check.layout),
        threads = tls_check.threads,
        matched = tls_check.matched,
        "thread-state binding verified"
    );

    let gil = match super::gil::locate(&mem, runtime_addr, &layout) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(pid, version = %version, "GIL state not found ({e}): GIL waits will not be told apart");
            None
        }
    };

    Ok(PythonProcess {
        pid,
        start_time,
        command,
        exe,
        version,
        runtime_addr,
        pycode_type,
        interp_binary,
        layout,
        layout_source,
        walker,
        tls: tls_check.layout,
        tls_check,
        gil,
    })
}

/// Helpers for tests that run real interpreters.
#[cfg(test)]
pub(crate) mod test_support {
    use std::io::{BufRead, BufReader, Read};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::sync::OnceLock;
    use std::time::Duration;

    /// A child process killed and reaped on drop.
    pub struct ChildGuard(pub Child);

    impl ChildGuard {
        pub fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for ChildGuard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Spawn `cmd` and wait (at most 30 s) for its first stdout line, which
    /// must start with "ready"; returns the guard and the words after it.
    pub fn spawn_ready(cmd: &mut Command) -> (ChildGuard, Vec<String>) {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A file a test just wrote may still be open for writing in a child
        // that another test thread forked meanwhile (until that child's
        // exec closes it): exec then fails with ETXTBSY for a moment.
        let mut tries = 0;
        let spawned = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => break r,
            }
        };
        let mut child = ChildGuard(spawned.unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}")));
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let mut words = line.split_whitespace().map(str::to_owned);
        if words.next().as_deref() != Some("ready") {
            let _ = child.0.kill();
            let mut err = String::new();
            let _ = child.0.stderr.take().unwrap().read_to_string(&mut err);
            panic!("{cmd:?} did not get ready: stdout {line:?}, stderr {err}");
        }
        (child, words.collect())
    }

    /// `sys.executable` of the `python3` on PATH (pyenv's shared-library
    /// build here), so that we run the real binary, not a shim.
    pub fn path_python() -> &'static Path {
        static EXE: OnceLock<PathBuf> = OnceLock::new();
        EXE.get_or_init(|| {
            let out = Command::new("python3")
                .args(["-c", "import sys; print(sys.executable)"])
                .output()
                .expect("python3 on PATH is needed for these tests");
            let exe = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            assert!(
                out.status.success() && !exe.is_empty(),
                "python3 failed: {out:?}"
            );
            PathBuf::from(exe)
        })
    }

    /// Prints, after "ready": major minor micro hexversion, the addresses of
    /// _PyRuntime, PyCode_Type and Py_Version, then the `threading.get_ident()`
    /// of the main thread and of two waiting threads.
    pub const THREADS_SCRIPT: &str = r#"
import ctypes, sys, threading, time, types
ev = threading.Event()
ts = [threading.Thread(target=ev.wait, daemon=True) for _ in range(2)]
for t in ts:
    t.start()
api = ctypes.pythonapi
addr = lambda name: ctypes.addressof(ctypes.c_char.in_dll(api, name))
print("ready", *sys.version_info[:3], sys.hexversion,
      addr("_PyRuntime"), id(types.CodeType), addr("Py_Version"),
      threading.get_ident(), *[t.ident for t in ts], flush=True)
time.sleep(120)
"#;

    /// Compile `tests/tools/<source>` (a C file) into `dir`, with `flags`;
    /// the executable is named after the source.
    pub fn build_tool(dir: &Path, source: &str, flags: &[&str]) -> PathBuf {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/tools")
            .join(source);
        let out = dir.join(source.trim_end_matches(".c"));
        let status = Command::new("cc")
            .args(["-O0", "-pthread"])
            .args(flags)
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .status()
            .expect("cc is needed for these tests");
        assert!(status.success(), "cc failed on {}", src.display());
        out
    }

    /// Compile `tests/tools/fake_python.c` into `dir`, exporting its symbols.
    pub fn build_fake_python(dir: &Path) -> PathBuf {
        build_tool(dir, "fake_python.c", &["-rdynamic"])
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::process::elf_cache::CacheStats;
    use crate::python::test_python::{self, TestPython};
    use profiler_common::TlsKind;
    use std::collections::BTreeSet;
    use std::process::Command;

    #[test]
    fn start_time_parsing() {
        let stat =
            "1234 (a) b) (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("1 (x) S 1 2"), None);
        assert_eq!(parse_start_time("garbage"), None);
        assert_eq!(parse_start_time(""), None);
        let own = start_time(std::process::id()).unwrap();
        assert!(own > 0);
        assert_eq!(parse_command(stat), Some("a) b) (c"));
        assert_eq!(parse_command("7 () S 1"), Some(""));
        assert_eq!(parse_command("garbage"), None);
        let (start, comm) = start_time_and_command(std::process::id()).unwrap();
        assert_eq!(start, own);
        assert_eq!(comm, command(std::process::id()).unwrap());
        assert!(matches!(
            start_time_and_command(0x3fff_ffff),
            Err(InspectError::NoSuchProcess(0x3fff_ffff))
        ));
    }

    #[test]
    fn version_display_and_names() {
        assert_eq!(PyVersion::from_hex(0x030b07f0).to_string(), "3.11.7");
        assert_eq!(PyVersion::from_hex(0x030c01f0).to_string(), "3.12.1");
        assert_eq!(PyVersion::from_hex(0x030b00c1).to_string(), "3.11.0rc1");
        assert_eq!(PyVersion::from_hex(0x030d00a3).to_string(), "3.13.0a3");
        assert_eq!(
            version_from_file_name("libpython3.10.so.1.0").as_deref(),
            Some("3.10")
        );
        assert_eq!(version_from_file_name("python3.9d").as_deref(), Some("3.9"));
        assert_eq!(version_from_file_name("python3").as_deref(), None);
        assert_eq!(version_from_file_name("uwsgi"), None);
    }

    #[test]
    fn command_line_of_self() {
        let cl = command_line(std::process::id()).unwrap();
        assert!(!cl.is_empty());
        assert_eq!(command_line(0x3fff_ffff), None);
    }

    fn check_real_python(python: &TestPython) -> PythonProcess {
        let (child, w) = spawn_ready(python.command().args(["-c", THREADS_SCRIPT]));
        let n = |i: usize| -> u64 { w[i].parse().unwrap() };
        let pid = child.pid();
        let what = &python.label;
        let p = inspect(pid).unwrap_or_else(|e| panic!("{what}: {e}"));

        assert_eq!(p.pid, pid);
        assert_eq!(
            (
                u64::from(p.version.major),
                u64::from(p.version.minor),
                u64::from(p.version.micro)
            ),
            (n(0), n(1), n(2)),
            "{what}"
        );
        assert_eq!(u64::from(p.version.hex), n(3), "{what}");
        assert_eq!(p.version.layout_minor(), Some(python.minor), "{what}");
        assert_eq!(p.layout.minor, python.minor, "{what}");
        assert_eq!(p.runtime_addr, n(4), "{what}: _PyRuntime");
        assert_eq!(p.pycode_type, n(5), "{what}: PyCode_Type");
        assert_eq!(p.start_time, start_time(pid).unwrap());
        assert_eq!(p.exe, std::fs::canonicalize(python.host_exe()).unwrap());
        // comm is the name exec'd (python3 may be a symlink), cut to 15 bytes.
        let exec_name = python
            .exe
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(p.command, exec_name.chars().take(15).collect::<String>());
        // The layout is the version's headers', confirmed by what 3.13+
        // publish about themselves.
        assert_eq!(p.layout, python.minor.header_layout(), "{what}");
        match &p.layout_source {
            LayoutSource::Headers => assert!(python.minor < Minor::V3_13, "{what}"),
            LayoutSource::Published { moved } => {
                assert!(python.minor >= Minor::V3_13, "{what}");
                assert!(moved.is_empty(), "{what}: {moved:?}");
            }
        }

        // Py_Version is readable in memory where ctypes says it is.
        let mem = ProcessMemory::new(pid);
        assert_eq!(
            mem.read_u64(n(6)).unwrap(),
            n(3),
            "{what}: Py_Version in memory"
        );
        // Structure sanity: an interpreter, and PyCode_Type's basic size.
        let l = &p.layout;
        assert_ne!(
            mem.read_u64(p.runtime_addr + l.threads.runtime_interpreters_head)
                .unwrap(),
            0
        );
        assert_eq!(
            mem.read_u64(p.pycode_type + l.type_basicsize).unwrap(),
            l.code.adaptive
        );

        // The GIL state: its first field is the switch interval in us (5 ms
        // by default), its third the `locked` flag (0 or 1 once created).
        let gil = p
            .gil
            .clone()
            .unwrap_or_else(|| panic!("{what}: no GIL state"));
        assert_eq!(gil.end - gil.start, crate::python::layout::GIL_STATE_SIZE);
        assert_eq!(
            mem.read_u64(gil.start).unwrap(),
            5000,
            "{what}: GIL interval"
        );
        let locked = mem.read_u64(gil.start + 16).unwrap() as u32;
        assert!(locked <= 1, "{what}: GIL locked flag {locked}");

        // The gilstate binding, proven on all three threads: the pthread key
        // in glibc's blocks up to 3.14, 3.15's thread-local after.
        let kind = if python.minor >= Minor::V3_15 {
            TlsKind::Static
        } else {
            TlsKind::Glibc
        };
        assert_eq!(p.tls.kind, kind as u32, "{what}: {}", tls::describe(&p.tls));
        assert_eq!((p.tls_check.threads, p.tls_check.matched), (3, 3), "{what}");
        assert!(!p.tls_check.scanned, "{what}");
        let walked: BTreeSet<u64> = tls::thread_states(&mem, p.runtime_addr, &l.threads)
            .unwrap()
            .iter()
            .map(|t| t.thread_id)
            .collect();
        let idents: BTreeSet<u64> = (7..10).map(n).collect();
        assert_eq!(
            walked, idents,
            "{what}: tstate thread_ids are the threading idents"
        );
        // libpython or the executable, as the build says.
        let lib = p
            .interp_binary
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if python.shared {
            assert!(lib.starts_with("libpython3."), "{what}: {lib}");
        } else {
            assert_eq!(
                std::fs::canonicalize(&p.interp_binary).ok(),
                std::fs::canonicalize(python.host_exe()).ok(),
                "{what}"
            );
        }
        println!(
            "{what}: Python {} _PyRuntime {:#x} in {} {}",
            p.version,
            p.runtime_addr,
            p.interp_binary.display(),
            tls::describe(&p.tls)
        );
        p
    }

    /// Every interpreter, static and shared: pyenv's 3.11, Debian's 3.11,
    /// and the roots' 3.13-3.15 (static, and libpython through a launcher).
    #[test]
    fn inspects_every_interpreter() {
        let mut minors = BTreeSet::new();
        for python in test_python::all_builds() {
            let p = check_real_python(&python);
            minors.insert((p.layout.minor, python.shared));
        }
        assert!(minors.contains(&(Minor::V3_11, true)));
    }

    #[test]
    fn missing_process() {
        let err = inspect(0x3fff_ffff).unwrap_err();
        assert!(
            matches!(err, InspectError::NoSuchProcess(0x3fff_ffff)),
            "{err}"
        );
        // A pid that existed and was reaped.
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        let err = inspect(pid).unwrap_err();
        assert!(
            matches!(err, InspectError::NoSuchProcess(p) if p == pid),
            "{err}"
        );
    }

    #[test]
    fn sleep_is_not_python() {
        let child = ChildGuard(Command::new("sleep").arg("30").spawn().unwrap());
        // Let exec finish so that maps and comm are sleep's.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while command(child.pid()).unwrap() != "sleep" && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let err = inspect(child.pid()).unwrap_err();
        assert!(
            matches!(&err, InspectError::NotPython(p, c) if *p == child.pid() && c == "sleep"),
            "{err}"
        );
        assert!(err.to_string().contains("not a Python process"));
    }

    #[test]
    fn kernel_thread_is_not_python() {
        // kthreadd is pid 2 in the root pid namespace; skip elsewhere.
        if command(2).ok().as_deref() != Some("kthreadd") {
            return;
        }
        assert!(matches!(inspect(2), Err(InspectError::NotPython(2, _))));
    }

    fn fake(args: &[&str]) -> (tempfile::TempDir, ChildGuard, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let exe = build_fake_python(dir.path());
        let (child, words) = spawn_ready(Command::new(exe).args(args));
        (dir, child, words)
    }

    #[test]
    fn python_316_is_unsupported() {
        let (_dir, child, _) = fake(&[]);
        let err = inspect(child.pid()).unwrap_err();
        assert!(
            matches!(&err, InspectError::UnsupportedVersion { pid, version } if *pid == child.pid() && version == "3.16.0"),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "process {} runs Python 3.16.0; pyebpf supports CPython 3.11 to 3.15",
                child.pid()
            )
        );
    }

    /// Without any symbol (stripped, nothing exported), `_PyRuntime` is
    /// found through its `.PyRuntime` section and the version through the
    /// `_Py_DebugOffsets` it starts with; offsets that say nothing sensible
    /// are refused with the reason.
    #[test]
    fn runtime_section_and_published_version_without_symbols() {
        let dir = tempfile::tempdir().unwrap();
        let exe = build_tool(dir.path(), "fake_python.c", &["-DRUNTIME_SECTION", "-s"]);
        let file = ElfFile::open(&exe).unwrap();
        assert!(file.symbol("_PyRuntime").unwrap().is_none(), "stripped");
        let section = file
            .section_address(RUNTIME_SECTION)
            .unwrap()
            .expect(".PyRuntime");
        match analyze(0, &file, true).unwrap() {
            FileVerdict::Python(s) => {
                assert_eq!(s.runtime, section);
                assert_eq!((s.py_version, s.pycode_type), (None, None));
            }
            FileVerdict::NoPython => panic!("the .PyRuntime section was not found"),
        }
        let (child, _) = spawn_ready(Command::new(&exe).args(["0x030e0af0", "published"]));
        let err = inspect(child.pid()).unwrap_err();
        assert!(
            matches!(&err, InspectError::Incompatible { version, reason, .. }
                if version == "3.14.10" && reason.contains("_Py_DebugOffsets")),
            "{err}"
        );
        assert!(!err.to_string().contains('\n'));
    }

    /// A real 3.14 whose `_Py_DebugOffsets` (patched in a copy of the
    /// binary) moves the thread state's `current_frame`: pyebpf follows what
    /// the process publishes at attach time, not its own headers. One that
    /// moves `co_argcount` (and so, unseen, `co_flags`) is refused.
    #[test]
    fn published_offsets_override_the_headers() {
        let Some(py) = test_python::all()
            .into_iter()
            .find(|p| p.minor == Minor::V3_14 && p.root.is_some())
        else {
            return; // reported skipped (or failed when required) by all()
        };
        let fields = Minor::V3_14.debug_fields().unwrap();
        let original = std::fs::read(py.host_exe()).unwrap();
        let file = ElfFile::open(&py.host_exe()).unwrap();
        let vaddr = file.section_address(RUNTIME_SECTION).unwrap().unwrap();
        let seg = file
            .load_segments()
            .iter()
            .find(|s| vaddr >= s.vaddr && vaddr < s.vaddr + s.filesz)
            .unwrap();
        let at = (seg.offset + vaddr - seg.vaddr) as usize;
        let patched = |slot: usize, value: u64| {
            let mut b = original.clone();
            b[at + slot * 8..at + slot * 8 + 8].copy_from_slice(&value.to_le_bytes());
            b
        };
        let run = |name: &str, bytes: Vec<u8>| {
            let path = py.share(name, &bytes);
            let host = py.root.as_ref().unwrap().join(path.trim_start_matches('/'));
            std::fs::set_permissions(&host, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            let mut cmd = Command::new("chroot");
            cmd.arg(py.root.as_ref().unwrap())
                .arg(&path)
                .args(["-c", THREADS_SCRIPT]);
            let (child, _) = spawn_ready(&mut cmd);
            let r = inspect(child.pid());
            drop(child);
            r
        };

        let p = run("python3.14-moved", patched(fields.tstate_current_frame, 80)).unwrap();
        assert_eq!(p.layout.threads.tstate_frame, 80);
        assert_eq!(p.walker.tstate_frame, 80);
        assert_eq!(
            p.layout_source,
            LayoutSource::Published {
                moved: vec![Moved {
                    field: "thread_state.current_frame",
                    headers: 72,
                    published: 80
                }]
            }
        );

        let err = run("python3.14-argcount", patched(fields.code_argcount, 60)).unwrap_err();
        assert!(
            matches!(&err, InspectError::Incompatible { version, reason, .. }
                if version.starts_with("3.14.") && reason.contains("moves code_object.argcount to 60")),
            "{err}"
        );
    }

    /// A free-threaded build says so in `_Py_DebugOffsets`: refused with
    /// the reason, before any offset is trusted.
    #[test]
    fn free_threaded_is_refused() {
        let (_dir, child, _) = fake(&["0x030e0af0", "freethreaded"]);
        let err = inspect(child.pid()).unwrap_err();
        assert!(
            matches!(&err, InspectError::FreeThreaded { pid, version } if *pid == child.pid() && version == "3.14.10"),
            "{err}"
        );
        assert!(
            err.to_string().contains("free-threaded CPython (3.14.10t)"),
            "{err}"
        );
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn python_310_is_unsupported() {
        let (_dir, child, _) = fake(&["0x030a0cf0"]);
        let err = inspect(child.pid()).unwrap_err();
        assert!(err.to_string().contains("3.10.12"), "{err}");
    }

    #[test]
    fn uninitialized_runtime() {
        let (_dir, child, _) = fake(&["0x030b07f0", "uninit"]);
        let err = inspect(child.pid()).unwrap_err();
        assert!(
            matches!(err, InspectError::NotInitialized { pid, .. } if pid == child.pid()),
            "{err}"
        );
    }

    /// A PIE executable exporting _PyRuntime, with CPython's key in glibc's
    /// second-level blocks (real interpreters get a small key).
    #[test]
    fn fake_interpreter_with_second_level_key() {
        let (_dir, child, w) = fake(&["0x030b07f0", "threads", "40"]);
        let key: u32 = w[0].parse().unwrap();
        let runtime: u64 = w[1].parse().unwrap();
        assert!(key >= 32);
        let p = inspect(child.pid()).unwrap();
        assert_eq!(p.runtime_addr, runtime);
        assert_eq!(p.version.to_string(), "3.11.7");
        assert_eq!(p.tls.key, key);
        assert_eq!(p.tls.kind, TlsKind::Glibc as u32);
        assert_eq!((p.tls.first_block, p.tls.second_level), (0x310, 0x510));
        assert_eq!((p.tls_check.threads, p.tls_check.matched), (2, 2));
        assert_eq!(p.interp_binary, p.exe);
        assert_eq!(p.command, "fake_python");
    }

    /// Verdicts are kept per version of a file: another process of the same
    /// binary is inspected without parsing it; a process of the binary
    /// replaced on disk, or touched, parses it again. Same answers.
    #[test]
    fn verdicts_are_cached_per_file_version() {
        let dir = tempfile::tempdir().unwrap();
        let exe = build_fake_python(dir.path());
        let cache = VerdictCache::new(64);
        let run = |cache: &VerdictCache| {
            let (child, w) = spawn_ready(Command::new(&exe).args(["0x030b07f0", "threads"]));
            let p = inspect_cached(child.pid(), cache).unwrap();
            assert_eq!(p.runtime_addr, w[1].parse::<u64>().unwrap());
            assert_eq!(p.version.to_string(), "3.11.7");
            assert_eq!(p.interp_binary, p.exe);
            (child, p)
        };
        let stats = |hits, misses, entries| CacheStats {
            hits,
            misses,
            entries,
        };
        let (first, p1) = run(&cache);
        assert_eq!(cache.stats(), stats(0, 1, 1));
        let (_second, p2) = run(&cache);
        assert_eq!(cache.stats(), stats(1, 1, 1));
        assert_eq!(
            p2.pycode_type - p2.runtime_addr,
            p1.pycode_type - p1.runtime_addr
        );

        // Replaced the way installers do it: a new inode renamed over it.
        let tmp = dir.path().join("new");
        std::fs::copy(&exe, &tmp).unwrap();
        std::fs::rename(&tmp, &exe).unwrap();
        let (_third, _) = run(&cache);
        assert_eq!(cache.stats(), stats(1, 2, 2));
        // The first process still runs the old file. Unlinking it changed
        // its ctime, so it is parsed once more, then known again.
        inspect_cached(first.pid(), &cache).unwrap();
        assert_eq!(cache.stats(), stats(1, 3, 3));
        inspect_cached(first.pid(), &cache).unwrap();
        assert_eq!(cache.stats(), stats(2, 3, 3));

        // Same inode, new modification time (it is running: no write open).
        let f = std::fs::File::open(&exe).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(60))
            .unwrap();
        drop(f);
        let (_fourth, _) = run(&cache);
        assert_eq!(cache.stats(), stats(2, 4, 4));
    }

    /// The process-wide cache keeps negative verdicts: `sleep` again is
    /// "not Python" without parsing anything.
    #[test]
    fn negative_verdicts_from_a_real_process() {
        let cache = VerdictCache::new(64);
        let child = ChildGuard(Command::new("sleep").arg("30").spawn().unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // Until the dynamic loader mapped libc, the maps still change.
        let started = || {
            command(child.pid()).unwrap() == "sleep"
                && std::fs::read_to_string(format!("/proc/{}/maps", child.pid()))
                    .unwrap()
                    .contains("libc")
        };
        while !started() {
            assert!(std::time::Instant::now() < deadline, "sleep did not start");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for round in 0..3 {
            let err = inspect_cached(child.pid(), &cache).unwrap_err();
            assert!(matches!(err, InspectError::NotPython(..)), "{err}");
            let s = cache.stats();
            assert!(s.misses > 0 && s.entries as u64 == s.misses, "{s:?}");
            assert_eq!(s.hits, round * s.misses, "{s:?}");
        }
    }

    #[test]
    fn unbound_thread_states_fail_clearly() {
        let (_dir, child, _) = fake(&["0x030b07f0", "unbound"]);
        let err = inspect(child.pid()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, InspectError::Tls { .. }), "{msg}");
        assert!(
            msg.contains("glibc(1stblock@0x310") && msg.contains("musl(tsd@0x80)"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    /// Run by `permission_denied_names_cap_sys_ptrace` in a child as an
    /// unprivileged user; does nothing otherwise.
    #[test]
    fn permission_probe() {
        let Ok(pid) = std::env::var("PYEBPF_PERMISSION_PROBE_PID") else {
            return;
        };
        match inspect(pid.parse().unwrap()) {
            Err(e @ InspectError::Permission { .. }) => println!("PROBE-PERMISSION {e}"),
            other => println!("PROBE-OTHER {other:?}"),
        }
    }

    #[test]
    fn permission_denied_names_cap_sys_ptrace() {
        use std::os::unix::process::CommandExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // Needs root to drop to another user.
        }
        let (child, _) = spawn_ready(Command::new(path_python()).args(["-c", THREADS_SCRIPT]));
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "process::python::tests::permission_probe",
                "--nocapture",
            ])
            .env("PYEBPF_PERMISSION_PROBE_PID", child.pid().to_string())
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() && text.is_empty() {
            println!("cannot run the test binary as nobody ({out:?}): skipped");
            return;
        }
        let line = text
            .lines()
            .find(|l| l.starts_with("PROBE-"))
            .unwrap_or_else(|| panic!("probe did not run: {text}"));
        println!("as nobody: {line}");
        assert!(line.starts_with("PROBE-PERMISSION"), "{line}");
        assert!(line.contains("CAP_SYS_PTRACE"), "{line}");
    }

    /// Compile `tests/tools/cpython312_image.c` into `dir`.
    fn build_cpython312_image(dir: &Path) -> PathBuf {
        build_tool(dir, "cpython312_image.c", &["-rdynamic"])
    }

    /// One frame of a CPython 3.12 image as the walker classifies it and the
    /// symboliser reads it: (kind, owner, qualname, filename, line, address).
    type Frame312 = (
        profiler_common::FrameKind,
        u8,
        String,
        String,
        Option<u32>,
        u64,
    );

    /// The frames of the thread state at `tstate`, leaf first, read with the
    /// walker's decisions and the symboliser's code reader.
    fn cpython312_frames(mem: &ProcessMemory, p: &PythonProcess, tstate: u64) -> Vec<Frame312> {
        use crate::python::code::read_code;
        use profiler_common::{instr_index, words_of, FrameFields, FRAME_READ_LEN};
        let (t, w) = (&p.layout.threads, &p.walker);
        let cframe = mem.read_u64(tstate + t.tstate_frame).unwrap();
        let mut addr = mem.read_u64(cframe + t.cframe_frame.unwrap()).unwrap();
        let mut out = Vec::new();
        while addr != 0 {
            assert!(out.len() < 16, "no end to the frame chain: {out:?}");
            let mut bytes = [0u8; FRAME_READ_LEN];
            mem.read(addr, &mut bytes).unwrap();
            let f = FrameFields::parse(&words_of(&bytes), w).unwrap();
            let code = read_code(mem, f.code, &p.code_format()).unwrap();
            let index = instr_index(f.instr, f.code, i64::from(code.n_units), w);
            out.push((
                f.kind(addr, w),
                f.owner,
                code.qualname.to_string(),
                code.filename.to_string(),
                code.line_for(index),
                addr,
            ));
            addr = f.previous;
        }
        out
    }

    /// CPython 3.12, which no Debian suite ships, against a live process
    /// whose memory holds the 3.12 header structures
    /// (tests/tools/cpython312_image.c): the layout is the offsets its
    /// compiler computed, `inspect` accepts it, and both threads' frames
    /// read back with the walker's decisions and the right names and lines.
    #[test]
    fn inspects_cpython312_image() {
        use profiler_common::FrameKind::{Boundary, Python};
        let dir = tempfile::tempdir().unwrap();
        let exe = build_cpython312_image(dir.path());

        // Every offset of the 3.12 layout is the compiler's, from the headers.
        let out = Command::new(&exe).arg("offsets").output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let offsets: std::collections::HashMap<&str, u64> = text
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k, v.parse().ok()?))
            })
            .collect();
        let c = |k: &str| offsets[k];
        let l = Minor::V3_12.header_layout();
        let (t, f, co, s) = (&l.threads, &l.frame, &l.code, &l.string);
        let crate::python::layout::Gilstate::TssKey { runtime_offset } = l.gilstate else {
            panic!("3.12 binds threads through autoTSSkey: {:?}", l.gilstate);
        };
        for (ours, key) in [
            (
                t.runtime_interpreters_head,
                "_PyRuntimeState.interpreters.head",
            ),
            (t.interp_next, "PyInterpreterState.next"),
            (t.interp_threads_head, "PyInterpreterState.threads.head"),
            (t.tstate_next, "PyThreadState.next"),
            (t.tstate_thread_id, "PyThreadState.thread_id"),
            (t.tstate_frame, "PyThreadState.cframe"),
            (t.cframe_frame.unwrap(), "_PyCFrame.current_frame"),
            (f.code, "_PyInterpreterFrame.f_code"),
            (f.previous, "_PyInterpreterFrame.previous"),
            (f.instr, "_PyInterpreterFrame.prev_instr"),
            (f.owner, "_PyInterpreterFrame.owner"),
            (f.owner_boundary.unwrap().into(), "FRAME_OWNED_BY_CSTACK"),
            (f.owner_max.into(), "FRAME_OWNED_BY_CSTACK"),
            (co.ob_type, "PyObject.ob_type"),
            (co.ob_size, "PyVarObject.ob_size"),
            (co.flags, "PyCodeObject.co_flags"),
            (co.firstlineno, "PyCodeObject.co_firstlineno"),
            (co.filename, "PyCodeObject.co_filename"),
            (co.qualname, "PyCodeObject.co_qualname"),
            (co.linetable, "PyCodeObject.co_linetable"),
            (co.adaptive, "PyCodeObject.co_code_adaptive"),
            (s.length, "PyASCIIObject.length"),
            (s.state, "PyASCIIObject.state"),
            (s.ascii_data, "PyASCIIObject.sizeof"),
            (s.compact_data, "PyCompactUnicodeObject.sizeof"),
            (l.bytes.ob_size, "PyBytesObject.ob_base.ob_size"),
            (l.bytes.ob_sval, "PyBytesObject.ob_sval"),
            (l.type_basicsize, "PyTypeObject.tp_basicsize"),
            (runtime_offset, "_PyRuntimeState.autoTSSkey"),
        ] {
            assert_eq!(ours, c(key), "{key}");
        }
        // The state bits python/unicode.rs decodes: kind (>> 2) & 7,
        // compact bit 5, ascii bit 6.
        assert_eq!(c("PyASCIIObject.state.kind_mask"), 0x1c);
        assert_eq!(c("PyASCIIObject.state.compact_mask"), 0x20);
        assert_eq!(c("PyASCIIObject.state.ascii_mask"), 0x40);
        assert_eq!((f.code_tag_bits, co.shim_flags), (0, 0));

        // The live image is recognised as 3.12 with its headers' layout.
        let (child, w) = spawn_ready(&mut Command::new(&exe));
        let (main_ts, worker_ts): (u64, u64) = (w[0].parse().unwrap(), w[1].parse().unwrap());
        let p = inspect(child.pid()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.version.to_string(), "3.12.4");
        assert_eq!(p.layout, Minor::V3_12.header_layout());
        assert_eq!(p.layout_source, LayoutSource::Headers);
        assert_eq!(
            p.tls.kind,
            TlsKind::Glibc as u32,
            "{}",
            tls::describe(&p.tls)
        );
        assert_eq!((p.tls_check.threads, p.tls_check.matched), (2, 2));
        assert_eq!(p.interp_binary, p.exe);
        let mem = ProcessMemory::new(child.pid());
        let walked: BTreeSet<u64> = tls::thread_states(&mem, p.runtime_addr, &p.layout.threads)
            .unwrap()
            .iter()
            .map(|t| t.addr)
            .collect();
        assert_eq!(walked, BTreeSet::from([main_ts, worker_ts]));

        // Both threads' frames, leaf first.
        let file = "/pyebpf-fake/app312.py";
        let shown = |frames: &[Frame312]| -> Vec<(profiler_common::FrameKind, u8, String, String, Option<u32>)> {
            frames
                .iter()
                .map(|(k, o, q, f, l, _)| (*k, *o, q.clone(), f.clone(), *l))
                .collect()
        };
        let expect = |v: &[(profiler_common::FrameKind, u8, &str, &str, Option<u32>)]| {
            v.iter()
                .map(|&(k, o, q, f, l)| (k, o, q.to_owned(), f.to_owned(), l))
                .collect::<Vec<_>>()
        };
        let main = cpython312_frames(&mem, &p, main_ts);
        assert_eq!(
            shown(&main),
            expect(&[
                (Python, 0, "hot", file, Some(17)),
                // The C-stack entry frame of the nested evaluation: skipped.
                (Boundary, 3, "<interpreter trampoline>", "<shim>", None),
                (Python, 0, "Worker.handle", file, Some(10)),
                (Python, 0, "main", file, Some(6)),
                (Python, 0, "<module>", file, Some(33)),
            ])
        );
        // One data stack: the walker reads the whole chain in one block.
        let addrs: Vec<u64> = main.iter().map(|fr| fr.5).collect();
        assert!(addrs.windows(2).all(|a| a[0] > a[1]), "{addrs:x?}");
        assert!(
            addrs[0] - addrs[4] < profiler_common::FRAME_BLOCK as u64,
            "{addrs:x?}"
        );

        let worker = cpython312_frames(&mem, &p, worker_ts);
        assert_eq!(
            shown(&worker),
            expect(&[
                (Python, 1, "gen_body", file, Some(23)),
                (Python, 0, "функция", file, Some(27)),
                (Python, 0, "<module>", file, Some(32)),
            ])
        );
        // The generator's frame is in its own block, far from the data stack.
        assert!(worker[0].5.abs_diff(worker[1].5) > 1 << 16, "{worker:x?}");

        // Without the key's slots, the binding cannot be proven.
        let (child, _) = spawn_ready(Command::new(&exe).arg("unbound"));
        let err = inspect(child.pid()).unwrap_err();
        assert!(matches!(err, InspectError::Tls { .. }), "{err}");
    }
}
