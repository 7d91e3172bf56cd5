//! ELF files mapped into a target: symbol look-up, load bias and build-id.
//!
//! Files are read lazily through a cache (only headers, symbol and string
//! tables and notes are read), so a process that maps a gigabyte-sized
//! library costs no more than one that maps libc. Every read is bounds
//! checked by `object`; a malformed file gives an [`ElfError`], never a panic.
//!
//! Open files through paths that work across mount namespaces: the main
//! executable with [`exe_path`], other mapped files with [`root_path`] (or
//! [`map_files_path`] for a file that has been deleted or replaced).
use std::fs::{File, Metadata};
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{Dyn, FileHeader, ProgramHeader, SectionHeader, SectionTable, Sym};
use object::read::{ReadCache, StringTable};
use object::{Endianness, SectionIndex};

type Header = elf::FileHeader64<Endianness>;
type Data = ReadCache<Box<dyn Source>>;
type Sections<'a> = SectionTable<'a, Header, &'a Data>;

/// Why an ELF file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot open ELF file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("malformed ELF file {path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path}: no PT_LOAD segment covers file offset {offset:#x}")]
    NoSegment { path: PathBuf, offset: u64 },
}

impl ElfError {
    /// The OS error behind an [`ElfError::Io`], for callers that map
    /// permission or not-found errors to their own variants.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            ElfError::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

/// A symbol's value (its link-time virtual address) and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub value: u64,
    pub size: u64,
}

/// One `PT_LOAD` program header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    pub vaddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub memsz: u64,
    /// `PF_X | PF_W | PF_R` bits.
    pub flags: u32,
}

/// Where a file's `PT_LOAD` segments go: all [`ElfFile::load_bias`] needs,
/// small enough to keep after the file is closed (see `elf_cache`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadLayout {
    /// `ET_EXEC`: loaded at its link addresses.
    pub fixed_address: bool,
    pub loads: Vec<LoadSegment>,
}

impl LoadLayout {
    /// See [`ElfFile::load_bias`]; `path` names the file in errors.
    pub fn load_bias(&self, path: &Path, map_start: u64, map_offset: u64) -> Result<u64, ElfError> {
        load_bias(self.fixed_address, &self.loads, path, map_start, map_offset)
    }
}

fn load_bias(
    fixed_address: bool,
    loads: &[LoadSegment],
    path: &Path,
    map_start: u64,
    map_offset: u64,
) -> Result<u64, ElfError> {
    if fixed_address {
        return Ok(0);
    }
    let page = page_size();
    let seg = loads
        .iter()
        .find(|s| {
            s.offset & !(page - 1) <= map_offset
                && map_offset < s.offset.saturating_add(s.filesz.max(1))
        })
        .ok_or_else(|| ElfError::NoSegment {
            path: path.to_owned(),
            offset: map_offset,
        })?;
    Ok(map_start.wrapping_sub(seg.vaddr.wrapping_sub(seg.offset).wrapping_add(map_offset)))
}

/// Anything an ELF file can be read from.
pub trait Source: Read + Seek + Send {}
impl<T: Read + Seek + Send> Source for T {}

/// An open 64-bit ELF file.
pub struct ElfFile {
    path: PathBuf,
    data: Data,
    e_type: u16,
    loads: Vec<LoadSegment>,
    build_id: Option<Vec<u8>>,
}

impl std::fmt::Debug for ElfFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElfFile")
            .field("path", &self.path)
            .field("e_type", &self.e_type)
            .field("loads", &self.loads)
            .finish_non_exhaustive()
    }
}

/// `/proc/PID/exe`: the main executable, from any mount namespace.
pub fn exe_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/exe"))
}

/// `/proc/PID/root/<path>`: a path from the target's maps, resolved in the
/// target's mount namespace.
pub fn root_path(pid: u32, path: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root/{}", path.trim_start_matches('/')))
}

/// `/proc/PID/map_files/START-END`: the very file behind a mapping, even if
/// it was deleted or replaced on disk (needs CAP_SYS_ADMIN).
pub fn map_files_path(pid: u32, start: u64, end: u64) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"))
}

impl ElfFile {
    /// Open and validate the file at `path`.
    pub fn open(path: &Path) -> Result<ElfFile, ElfError> {
        let file = File::open(path).map_err(|source| ElfError::Io {
            path: path.to_owned(),
            source,
        })?;
        ElfFile::from_source(path.to_owned(), Box::new(file))
    }

    /// Like [`ElfFile::open`], with the metadata of the file actually opened
    /// (`fstat` of the open descriptor, so it describes the bytes parsed
    /// even if the path is replaced meanwhile).
    pub fn open_with_metadata(path: &Path) -> Result<(ElfFile, Metadata), ElfError> {
        let io_err = |source| ElfError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        Ok((ElfFile::from_source(path.to_owned(), Box::new(file))?, meta))
    }

    /// Parse an ELF image held in memory; `label` names it in errors.
    pub fn from_bytes(label: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<ElfFile, ElfError> {
        ElfFile::from_source(label.into(), Box::new(io::Cursor::new(bytes)))
    }

    fn from_source(path: PathBuf, source: Box<dyn Source>) -> Result<ElfFile, ElfError> {
        let mut file = ElfFile {
            path,
            data: ReadCache::new(source),
            e_type: 0,
            loads: Vec::new(),
            build_id: None,
        };
        let (e_type, loads) = {
            let (header, endian) = file.header()?;
            let phdrs = header
                .program_headers(endian, &file.data)
                .map_err(|e| file.malformed(format!("program headers: {e}")))?;
            let loads: Vec<LoadSegment> = phdrs
                .iter()
                .filter(|p| p.p_type(endian) == elf::PT_LOAD)
                .map(|p| LoadSegment {
                    vaddr: p.p_vaddr(endian),
                    offset: p.p_offset(endian),
                    filesz: p.p_filesz(endian),
                    memsz: p.p_memsz(endian),
                    flags: p.p_flags(endian),
                })
                .collect();
            (header.e_type(endian), loads)
        };
        file.e_type = e_type;
        file.loads = loads;
        // A missing or unreadable build-id is not fatal: it is only a cache key.
        file.build_id = file.find_build_id().ok().flatten();
        Ok(file)
    }

    fn malformed(&self, reason: impl Into<String>) -> ElfError {
        ElfError::Malformed {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn header(&self) -> Result<(&Header, Endianness), ElfError> {
        let header = Header::parse(&self.data)
            .map_err(|e| self.malformed(format!("not a 64-bit ELF file ({e})")))?;
        let endian = header
            .endian()
            .map_err(|e| self.malformed(format!("header: {e}")))?;
        Ok((header, endian))
    }

    fn sections(&self) -> Result<(Sections<'_>, Endianness), ElfError> {
        let (header, endian) = self.header()?;
        let sections = header
            .sections(endian, &self.data)
            .map_err(|e| self.malformed(format!("section headers: {e}")))?;
        Ok((sections, endian))
    }

    fn find_build_id(&self) -> Result<Option<Vec<u8>>, ElfError> {
        let (header, endian) = self.header()?;
        let bad = |e: object::read::Error| self.malformed(format!("notes: {e}"));
        let is_build_id =
            |name: &[u8], n_type: u32| name == elf::ELF_NOTE_GNU && n_type == elf::NT_GNU_BUILD_ID;
        // Program headers first: they survive `strip --strip-section-headers`.
        for phdr in header.program_headers(endian, &self.data).map_err(bad)? {
            if let Some(mut notes) = phdr.notes(endian, &self.data).map_err(bad)? {
                while let Some(note) = notes.next().map_err(bad)? {
                    if is_build_id(note.name(), note.n_type(endian)) {
                        return Ok(Some(note.desc().to_vec()));
                    }
                }
            }
        }
        let (sections, _) = self.sections()?;
        for section in sections.iter() {
            if let Some(mut notes) = section.notes(endian, &self.data).map_err(bad)? {
                while let Some(note) = notes.next().map_err(bad)? {
                    if is_build_id(note.name(), note.n_type(endian)) {
                        return Ok(Some(note.desc().to_vec()));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The path this file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `ET_EXEC` (a non-PIE executable, loaded at its link addresses).
    pub fn is_fixed_address(&self) -> bool {
        self.e_type == elf::ET_EXEC
    }

    /// The `PT_LOAD` segments, in program-header order.
    pub fn load_segments(&self) -> &[LoadSegment] {
        &self.loads
    }

    /// The GNU build-id note, if present.
    pub fn build_id(&self) -> Option<&[u8]> {
        self.build_id.as_deref()
    }

    /// The build-id as lowercase hex.
    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id()
            .map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
    }

    /// Look a defined symbol up by name, in `.dynsym` first, then `.symtab`.
    pub fn symbol(&self, name: &str) -> Result<Option<Symbol>, ElfError> {
        for kind in [elf::SHT_DYNSYM, elf::SHT_SYMTAB] {
            if let Some(sym) = self.symbol_in(kind, name)? {
                return Ok(Some(sym));
            }
        }
        Ok(None)
    }

    /// Look a defined symbol up in `.dynsym` only (what the dynamic linker
    /// exports; present even in stripped files).
    pub fn dynamic_symbol(&self, name: &str) -> Result<Option<Symbol>, ElfError> {
        self.symbol_in(elf::SHT_DYNSYM, name)
    }

    fn symbol_in(&self, sh_type: u32, name: &str) -> Result<Option<Symbol>, ElfError> {
        let (sections, endian) = self.sections()?;
        let data = &self.data;
        let bad = |what: &str, e: object::read::Error| self.malformed(format!("{what}: {e}"));
        for section in sections.iter().filter(|s| s.sh_type(endian) == sh_type) {
            let syms: &[elf::Sym64<Endianness>] = section
                .data_as_array(endian, data)
                .map_err(|e| bad("symbol table", e))?;
            let strtab = sections
                .section(SectionIndex(section.sh_link(endian) as usize))
                .map_err(|e| bad("symbol string table link", e))?;
            // Read the string table in one piece rather than name by name.
            let strings = strtab
                .data(endian, data)
                .map_err(|e| bad("symbol string table", e))?;
            let strings = StringTable::new(strings, 0, strings.len() as u64);
            for sym in syms {
                if sym.st_shndx(endian) == elf::SHN_UNDEF {
                    continue;
                }
                if sym.name(endian, strings).ok() == Some(name.as_bytes()) {
                    return Ok(Some(Symbol {
                        value: sym.st_value(endian),
                        size: sym.st_size(endian),
                    }));
                }
            }
        }
        Ok(None)
    }

    /// The shared libraries the file names as needed (`DT_NEEDED`), from
    /// its section headers; empty for a static or stripped-of-sections file.
    pub fn needed(&self) -> Result<Vec<String>, ElfError> {
        let (sections, endian) = self.sections()?;
        let data = &self.data;
        let bad = |what: &str, e: object::read::Error| self.malformed(format!("{what}: {e}"));
        let mut out = Vec::new();
        for section in sections
            .iter()
            .filter(|s| s.sh_type(endian) == elf::SHT_DYNAMIC)
        {
            let entries: &[elf::Dyn64<Endianness>] = section
                .data_as_array(endian, data)
                .map_err(|e| bad("dynamic section", e))?;
            let strtab = sections
                .section(SectionIndex(section.sh_link(endian) as usize))
                .map_err(|e| bad("dynamic string table link", e))?;
            let strings = strtab
                .data(endian, data)
                .map_err(|e| bad("dynamic string table", e))?;
            for d in entries {
                if d.d_tag(endian) != u64::from(elf::DT_NEEDED) {
                    continue;
                }
                let rest = usize::try_from(d.d_val(endian))
                    .ok()
                    .and_then(|at| strings.get(at..))
                    .unwrap_or_default();
                let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
                out.push(String::from_utf8_lossy(&rest[..end]).into_owned());
            }
        }
        Ok(out)
    }

    /// The link-time address of the section called `name`, if the file has
    /// section headers and one by that name.
    pub fn section_address(&self, name: &str) -> Result<Option<u64>, ElfError> {
        let (sections, endian) = self.sections()?;
        Ok(sections
            .iter()
            .find(|s| sections.section_name(endian, s).ok() == Some(name.as_bytes()))
            .map(|s| s.sh_addr(endian)))
    }

    /// Load bias of a mapping of this file at `map_start` with file offset
    /// `map_offset`: `map_start - (p_vaddr - p_offset + map_offset)` for the
    /// first `PT_LOAD` covering `map_offset`; 0 for a non-PIE `ET_EXEC`.
    ///
    /// Segments of a small file can share a page; pass the file's first
    /// (lowest-offset) mapping to get the first segment.
    pub fn load_bias(&self, map_start: u64, map_offset: u64) -> Result<u64, ElfError> {
        load_bias(
            self.is_fixed_address(),
            &self.loads,
            &self.path,
            map_start,
            map_offset,
        )
    }

    /// The load segments and file type, to compute load biases later
    /// without the file.
    pub fn layout(&self) -> LoadLayout {
        LoadLayout {
            fixed_address: self.is_fixed_address(),
            loads: self.loads.clone(),
        }
    }

    /// The file bytes at link-time address `vaddr`, if a `PT_LOAD` segment
    /// holds all of them in the file (not in its zero-filled tail).
    pub fn read_vaddr(&self, vaddr: u64, len: usize) -> Result<Vec<u8>, ElfError> {
        let len64 = len as u64;
        let seg = self
            .loads
            .iter()
            .find(|s| {
                vaddr >= s.vaddr
                    && vaddr
                        .checked_add(len64)
                        .is_some_and(|end| end <= s.vaddr.saturating_add(s.filesz))
            })
            .ok_or_else(|| self.malformed(format!("no file bytes at address {vaddr:#x}")))?;
        let offset = seg.offset.saturating_add(vaddr - seg.vaddr);
        object::ReadRef::read_bytes_at(&self.data, offset, len64)
            .map(<[u8]>::to_vec)
            .map_err(|()| self.malformed(format!("address {vaddr:#x} is past the end of the file")))
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 && (n as u64).is_power_of_two() {
        n as u64
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::maps;

    fn own_exe() -> ElfFile {
        ElfFile::open(&exe_path(std::process::id())).unwrap()
    }

    #[test]
    fn finds_dynamic_symbols_in_libc_and_bias_matches_dlsym() {
        let pid = std::process::id();
        let maps = maps::read(pid).unwrap();
        // Found by one of its functions: tests of native stacks map other
        // libc.so.6 files (chroots') into this process while they run.
        let in_libc = libc::getpid as *const () as u64;
        let libc_map = maps
            .iter()
            .find(|m| m.is_file() && m.contains(in_libc))
            .expect("libc mapped");
        assert!(libc_map
            .file_name()
            .is_some_and(|n| n.starts_with("libc.so") || n.starts_with("libc-")));
        let of_libc = |m: &&maps::MapEntry| m.inode == libc_map.inode && m.dev == libc_map.dev;
        // The loader's mappings: its executable segment and the offset-0
        // one right below it. (Other tests running in this process can map
        // the same file elsewhere for a moment, which once failed this test.)
        let text = maps
            .iter()
            .filter(of_libc)
            .find(|m| m.perms.exec)
            .expect("libc's executable segment");
        let first = maps
            .iter()
            .filter(of_libc)
            .filter(|m| m.offset == 0 && m.start <= text.start)
            .max_by_key(|m| m.start)
            .unwrap();
        let file = ElfFile::open(&root_path(pid, libc_map.path.as_deref().unwrap())).unwrap();
        assert!(!file.is_fixed_address());
        let bias = file.load_bias(first.start, first.offset).unwrap();
        let sym = file
            .dynamic_symbol("getpid")
            .unwrap()
            .expect("getpid in libc");
        assert!(sym.size > 0);
        // Every mapping of the loaded file (up to another mapping of its
        // start) must give the same bias.
        let next = maps
            .iter()
            .filter(of_libc)
            .filter(|m| m.offset == 0 && m.start > first.start)
            .map(|m| m.start)
            .min()
            .unwrap_or(u64::MAX);
        for m in maps
            .iter()
            .filter(of_libc)
            .filter(|m| m.start >= first.start && m.start < next)
        {
            assert_eq!(file.load_bias(m.start, m.offset).unwrap(), bias, "{m:?}");
        }
        // SAFETY: dlsym with a NUL-terminated name is sound.
        let real = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"getpid".as_ptr()) } as u64;
        assert_eq!(bias + sym.value, real);
        assert!(file.build_id().is_some_and(|b| !b.is_empty()));
        assert_eq!(file.symbol("no_such_symbol_here").unwrap(), None);
    }

    #[test]
    fn build_id_matches_file_command_format() {
        let exe = own_exe();
        if let Some(hex) = exe.build_id_hex() {
            assert!(hex.len() >= 16 && hex.chars().all(|c| c.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn read_vaddr_reads_file_bytes() {
        let exe = own_exe();
        let seg = exe.load_segments()[0];
        // The first PT_LOAD starts with the ELF header.
        assert_eq!(seg.offset, 0);
        assert_eq!(exe.read_vaddr(seg.vaddr, 4).unwrap(), b"\x7fELF");
        assert!(exe.read_vaddr(u64::MAX - 2, 8).is_err());
    }

    #[test]
    fn missing_file_is_io_error() {
        let err = ElfFile::open(Path::new("/nonexistent/lib.so")).unwrap_err();
        assert_eq!(err.io_kind(), Some(io::ErrorKind::NotFound));
        assert!(err.to_string().contains("/nonexistent/lib.so"));
    }

    #[test]
    fn garbage_is_an_error() {
        for bytes in [
            Vec::new(),
            b"\x7fELF".to_vec(),
            vec![0u8; 4096],
            b"#!/bin/sh\necho hi\n".to_vec(),
        ] {
            let err = ElfFile::from_bytes("garbage", bytes).unwrap_err();
            assert!(matches!(err, ElfError::Malformed { .. }), "{err}");
        }
    }

    /// Truncated and corrupted copies of a real ELF must only ever give
    /// errors or answers, never a panic.
    #[test]
    fn corrupted_files_never_panic() {
        let bytes = std::fs::read(exe_path(std::process::id())).unwrap();
        let len = bytes.len();
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for cut in [1, 16, 63, 64, 65, 100, 512, 4096, len / 3, len / 2, len - 1] {
            cases.push(bytes[..cut.min(len)].to_vec());
        }
        // Overwrite header fields (phoff, shoff, counts, shstrndx) with junk.
        for (at, junk) in [
            (0x20, 0xffu8),
            (0x28, 0xff),
            (0x36, 0xff),
            (0x3c, 0xff),
            (0x3e, 0xff),
            (0x3c, 0),
        ] {
            for w in [1usize, 2, 8] {
                let mut b = bytes[..len.min(1 << 20)].to_vec();
                for x in b.iter_mut().skip(at).take(w) {
                    *x = junk;
                }
                cases.push(b);
            }
        }
        // Scribble over the section header table.
        let mut b = bytes;
        let shoff = u64::from_le_bytes(b[0x28..0x30].try_into().unwrap()) as usize;
        for (i, x) in b.iter_mut().skip(shoff).enumerate() {
            *x = (i as u8).wrapping_mul(37);
        }
        cases.push(b);
        for case in cases {
            if let Ok(f) = ElfFile::from_bytes("corrupt", case) {
                let _ = f.symbol("main");
                let _ = f.symbol("_PyRuntime");
                let _ = f.load_bias(0x1000, 0);
                let _ = f.read_vaddr(0, 8);
            }
        }
    }
}
