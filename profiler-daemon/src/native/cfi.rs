//! A module's unwind tables (`.eh_frame` with its `.eh_frame_hdr` index, or
//! `.debug_frame`), and the CFI rule they give for one address.
//!
//! framehop executes the unwinding, but where it has no rule for an address
//! (no module, no FDE, a rule it cannot translate, an expression it cannot
//! evaluate) it silently falls back to frame-pointer unwinding, which on
//! CPython and extensions built without frame pointers returns garbage.
//! [`UnwindSections::rule_for`] therefore looks the rule up first and names
//! every case framehop would guess on; the unwinder stops there instead.
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use gimli::{
    BaseAddresses, CfaRule, DebugFrame, DebugFrameOffset, EhFrame, EhFrameHdr, EhFrameOffset,
    EndianSlice, LittleEndian, RegisterRule, UnwindContext, UnwindSection, UnwindTableRow, X86_64,
};
use object::{Object, ObjectSection, ObjectSegment, ReadRef};

use crate::process::elf::{LoadLayout, LoadSegment};

type Slice<'a> = EndianSlice<'a, LittleEndian>;

/// Why a module's unwind tables could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the file: {0}")]
    Io(String),
    #[error("not an x86-64 ELF file: {0}")]
    NotElf(String),
    #[error("no .eh_frame or .debug_frame section")]
    NoUnwindTables,
    #[error("only a compressed .debug_frame, which is not supported")]
    CompressedDebugFrame,
    #[error("malformed unwind tables: {0}")]
    Malformed(String),
    #[error("its unwind tables ({bytes} bytes) exceed the cache's {budget} bytes")]
    TooBig { bytes: usize, budget: usize },
}

impl LoadError {
    /// About the file's contents (the same for every process mapping it),
    /// not about reaching it from one process.
    pub fn is_about_the_file(&self) -> bool {
        !matches!(self, LoadError::Io(_))
    }
}

/// Which table the rules come from, and how an address finds its FDE.
#[derive(Clone, Debug)]
enum Lookup {
    /// `.eh_frame_hdr`'s binary search table.
    EhFrameHdr,
    /// `.eh_frame` without a table: our own index of its FDEs.
    EhFrameIndexed(FdeIndex),
    /// `.debug_frame` (no `.eh_frame`): our own index of its FDEs.
    DebugFrame(FdeIndex),
}

/// FDEs sorted by start address: `(start, end, offset in the section)`.
#[derive(Clone, Debug, Default)]
struct FdeIndex(Vec<(u64, u64, usize)>);

impl FdeIndex {
    fn find(&self, svma: u64) -> Option<usize> {
        let i = self.0.partition_point(|&(start, _, _)| start <= svma);
        let &(_, end, offset) = self.0.get(i.checked_sub(1)?)?;
        (svma < end).then_some(offset)
    }

    fn build<'a, S: UnwindSection<Slice<'a>>>(
        section: &S,
        bases: &BaseAddresses,
    ) -> Result<FdeIndex, gimli::Error> {
        let mut out = Vec::new();
        let mut entries = section.entries(bases);
        while let Some(entry) = entries.next()? {
            if let gimli::CieOrFde::Fde(partial) = entry {
                let fde = partial.parse(S::cie_from_offset)?;
                let start = fde.initial_address();
                out.push((start, start.saturating_add(fde.len()), fde.offset()));
            }
        }
        out.sort_unstable_by_key(|&(start, _, _)| start);
        Ok(FdeIndex(out))
    }
}

/// A section's link-time address range and bytes.
#[derive(Clone, Debug)]
struct Section {
    svma: Range<u64>,
    data: Arc<[u8]>,
}

/// The unwind tables of one file, shared by every process that maps it.
#[derive(Clone, Debug)]
pub struct UnwindSections {
    /// Where the file's segments go, for the load bias of a mapping.
    pub layout: LoadLayout,
    eh_frame: Option<Section>,
    eh_frame_hdr: Option<Section>,
    debug_frame: Option<Arc<[u8]>>,
    text_svma: Option<Range<u64>>,
    got_svma: Option<Range<u64>>,
    lookup: Lookup,
}

/// Where the CFA (the caller's stack pointer) is computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CfaBase {
    Rsp,
    Rbp,
}

/// What becomes of rbp in the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RbpRule {
    /// Not changed by this function (or not mentioned).
    Unchanged,
    /// Saved on the stack at CFA + this offset.
    SavedAt(i64),
    /// Undefined: the caller's rbp cannot be known.
    Lost,
}

/// The CFI rule for one address: everything one unwinding step needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The return address is undefined: the outermost frame (`_start`, a
    /// thread's `clone3`), the stack is complete.
    Outermost,
    /// CFA = `base` + `offset`; the return address is at CFA - 8.
    Step {
        base: CfaBase,
        offset: i64,
        rbp: RbpRule,
    },
}

/// Why there is no rule framehop can execute for an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CfiError {
    /// No FDE covers the address.
    NoFde,
    /// The CFI uses something framehop does not execute (it would guess).
    Unsupported(&'static str),
    /// The tables do not parse.
    Malformed(gimli::Error),
}

impl std::fmt::Display for CfiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CfiError::NoFde => f.write_str("no FDE covers the address"),
            CfiError::Unsupported(what) => f.write_str(what),
            CfiError::Malformed(e) => write!(f, "malformed CFI: {e}"),
        }
    }
}

/// A reused gimli unwind context (its buffers outlive one lookup).
pub type Context = UnwindContext<usize>;

impl UnwindSections {
    /// Read the unwind tables of the ELF file at `path`.
    pub fn open(path: &Path) -> Result<UnwindSections, LoadError> {
        let file = std::fs::File::open(path).map_err(|e| LoadError::Io(e.to_string()))?;
        let cache = object::ReadCache::new(file);
        UnwindSections::parse(&cache)
    }

    /// Parse the unwind tables of an ELF image (a file, or the vDSO's bytes).
    pub fn parse<'d, R: ReadRef<'d>>(data: R) -> Result<UnwindSections, LoadError> {
        let obj = object::File::parse(data).map_err(|e| LoadError::NotElf(e.to_string()))?;
        if obj.architecture() != object::Architecture::X86_64 || !obj.is_64() {
            return Err(LoadError::NotElf(format!("{:?}", obj.architecture())));
        }
        let loads = obj
            .segments()
            .map(|s| {
                let (offset, filesz) = s.file_range();
                LoadSegment {
                    vaddr: s.address(),
                    offset,
                    filesz,
                    memsz: s.size(),
                    flags: match s.flags() {
                        object::SegmentFlags::Elf { p_flags } => p_flags,
                        _ => 0,
                    },
                }
            })
            .collect();
        let layout = LoadLayout {
            fixed_address: obj.kind() == object::ObjectKind::Executable,
            loads,
        };
        let range =
            |s: &object::Section<'d, '_, R>| s.address()..s.address().saturating_add(s.size());
        let read = |name: &str| -> Result<Option<Section>, LoadError> {
            let Some(s) = obj.section_by_name(name) else {
                return Ok(None);
            };
            let data = s
                .data()
                .map_err(|e| LoadError::Malformed(format!("{name}: {e}")))?;
            Ok(Some(Section {
                svma: range(&s),
                data: Arc::from(data),
            }))
        };
        let eh_frame = read(".eh_frame")?.filter(|s| !s.data.is_empty());
        let eh_frame_hdr = read(".eh_frame_hdr")?.filter(|s| !s.data.is_empty());
        let debug_frame = match obj.section_by_name(".debug_frame") {
            Some(s) if eh_frame.is_none() => {
                let compressed = s
                    .compressed_file_range()
                    .map_err(|e| LoadError::Malformed(format!(".debug_frame: {e}")))?;
                if compressed.format != object::CompressionFormat::None {
                    return Err(LoadError::CompressedDebugFrame);
                }
                Some(read(".debug_frame")?.map(|s| s.data))
            }
            _ => None,
        }
        .flatten();
        let mut sections = UnwindSections {
            layout,
            text_svma: obj.section_by_name(".text").map(|s| range(&s)),
            got_svma: obj.section_by_name(".got").map(|s| range(&s)),
            eh_frame,
            eh_frame_hdr,
            debug_frame,
            lookup: Lookup::EhFrameHdr,
        };
        let bases = sections.bases();
        let malformed = |e: gimli::Error| LoadError::Malformed(e.to_string());
        sections.lookup = match (
            &sections.eh_frame,
            &sections.eh_frame_hdr,
            &sections.debug_frame,
        ) {
            (Some(_), Some(_), _) => Lookup::EhFrameHdr,
            (Some(eh), None, _) => {
                let eh = eh_frame_of(&eh.data);
                Lookup::EhFrameIndexed(FdeIndex::build(&eh, &bases).map_err(malformed)?)
            }
            (None, _, Some(df)) => {
                let df = debug_frame_of(df);
                Lookup::DebugFrame(FdeIndex::build(&df, &bases).map_err(malformed)?)
            }
            (None, _, None) => return Err(LoadError::NoUnwindTables),
        };
        Ok(sections)
    }

    /// Load bias (the address of link-time address 0) of an executable
    /// mapping of this file at `start` with file offset `offset`, from the
    /// executable segment holding that offset: segments may share a page
    /// (lld's layout), so the first segment covering it can be the
    /// read-only one before, whose bias is a page off.
    pub fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        if self.layout.fixed_address {
            return Some(0);
        }
        // SAFETY: sysconf has no preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 && (n as u64).is_power_of_two() => n as u64,
            _ => 4096,
        };
        let seg = self.layout.loads.iter().find(|s| {
            s.flags & object::elf::PF_X != 0
                && s.offset & !(page - 1) <= offset
                && offset < s.offset.saturating_add(s.filesz)
        })?;
        Some(start.wrapping_sub(seg.vaddr.wrapping_sub(seg.offset).wrapping_add(offset)))
    }

    fn bases(&self) -> BaseAddresses {
        let start = |s: &Option<Section>| s.as_ref().map_or(0, |s| s.svma.start);
        BaseAddresses::default()
            .set_eh_frame_hdr(start(&self.eh_frame_hdr))
            .set_eh_frame(start(&self.eh_frame))
            .set_text(self.text_svma.as_ref().map_or(0, |r| r.start))
            .set_got(self.got_svma.as_ref().map_or(0, |r| r.start))
    }

    /// Bytes held: the sections and the FDE index.
    pub fn bytes(&self) -> usize {
        let len = |s: &Option<Section>| s.as_ref().map_or(0, |s| s.data.len());
        let index = match &self.lookup {
            Lookup::EhFrameHdr => 0,
            Lookup::EhFrameIndexed(i) | Lookup::DebugFrame(i) => {
                i.0.len() * std::mem::size_of::<(u64, u64, usize)>()
            }
        };
        std::mem::size_of::<Self>()
            + len(&self.eh_frame)
            + len(&self.eh_frame_hdr)
            + self.debug_frame.as_ref().map_or(0, |d| d.len())
            + index
            + self.layout.loads.len() * std::mem::size_of::<LoadSegment>()
    }

    /// The table the rules come from, for messages.
    pub fn source(&self) -> &'static str {
        match self.lookup {
            Lookup::EhFrameHdr => ".eh_frame (.eh_frame_hdr index)",
            Lookup::EhFrameIndexed(_) => ".eh_frame",
            Lookup::DebugFrame(_) => ".debug_frame",
        }
    }

    /// This file as a framehop module mapped at `avma` with load bias `bias`.
    pub fn framehop_module(
        &self,
        name: String,
        avma: Range<u64>,
        bias: u64,
    ) -> framehop::Module<Arc<[u8]>> {
        let info = framehop::ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: self.text_svma.clone(),
            got_svma: self.got_svma.clone(),
            eh_frame_svma: self.eh_frame.as_ref().map(|s| s.svma.clone()),
            eh_frame: self.eh_frame.as_ref().map(|s| s.data.clone()),
            eh_frame_hdr_svma: self.eh_frame_hdr.as_ref().map(|s| s.svma.clone()),
            eh_frame_hdr: self.eh_frame_hdr.as_ref().map(|s| s.data.clone()),
            debug_frame: self.debug_frame.clone(),
            ..Default::default()
        };
        framehop::Module::new(name, avma, bias, info)
    }

    /// The rule for the code at link-time address `svma` (for a return
    /// address, the call instruction: the return address minus one).
    pub fn rule_for(&self, ctx: &mut Context, svma: u64) -> Result<Rule, CfiError> {
        let bases = self.bases();
        let row = match (&self.lookup, &self.eh_frame, &self.eh_frame_hdr) {
            (Lookup::EhFrameHdr, Some(eh), Some(hdr)) => {
                let eh = eh_frame_of(&eh.data);
                let hdr = EhFrameHdr::new(&hdr.data, LittleEndian)
                    .parse(&bases, 8)
                    .map_err(CfiError::Malformed)?;
                let table = hdr
                    .table()
                    .ok_or(CfiError::Unsupported(".eh_frame_hdr has no search table"))?;
                let fde = table
                    .fde_for_address(&eh, &bases, svma, EhFrame::cie_from_offset)
                    .map_err(no_fde)?;
                fde.unwind_info_for_address(&eh, &bases, ctx, svma)
                    .map_err(no_fde)?
            }
            (Lookup::EhFrameIndexed(index), Some(eh), _) => {
                let eh = eh_frame_of(&eh.data);
                let offset = index.find(svma).ok_or(CfiError::NoFde)?;
                let fde = eh
                    .fde_from_offset(&bases, EhFrameOffset(offset), EhFrame::cie_from_offset)
                    .map_err(CfiError::Malformed)?;
                fde.unwind_info_for_address(&eh, &bases, ctx, svma)
                    .map_err(no_fde)?
            }
            (Lookup::DebugFrame(index), _, _) => {
                let df = debug_frame_of(self.debug_frame.as_deref().unwrap_or_default());
                let offset = index.find(svma).ok_or(CfiError::NoFde)?;
                let fde = df
                    .fde_from_offset(
                        &bases,
                        DebugFrameOffset(offset),
                        DebugFrame::cie_from_offset,
                    )
                    .map_err(CfiError::Malformed)?;
                fde.unwind_info_for_address(&df, &bases, ctx, svma)
                    .map_err(no_fde)?
            }
            // `parse` only builds lookups whose sections are present.
            _ => return Err(CfiError::NoFde),
        };
        classify(row)
    }
}

fn no_fde(e: gimli::Error) -> CfiError {
    match e {
        gimli::Error::NoUnwindInfoForAddress => CfiError::NoFde,
        e => CfiError::Malformed(e),
    }
}

fn eh_frame_of(data: &[u8]) -> EhFrame<Slice<'_>> {
    let mut s = EhFrame::new(data, LittleEndian);
    s.set_address_size(8);
    s
}

fn debug_frame_of(data: &[u8]) -> DebugFrame<Slice<'_>> {
    let mut s = DebugFrame::new(data, LittleEndian);
    s.set_address_size(8);
    s
}

/// The rule of a CFI row, if framehop executes it without guessing.
fn classify(row: &UnwindTableRow<usize>) -> Result<Rule, CfiError> {
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => return Ok(Rule::Outermost),
        Some(RegisterRule::Offset(-8)) => {}
        None => {
            return Err(CfiError::Unsupported(
                "the CFI does not say where the return address is",
            ))
        }
        Some(_) => return Err(CfiError::Unsupported("the return address is not at CFA-8")),
    }
    let (base, offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => {
            (CfaBase::Rsp, *offset)
        }
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RBP => {
            (CfaBase::Rbp, *offset)
        }
        CfaRule::RegisterAndOffset { .. } => {
            return Err(CfiError::Unsupported(
                "the CFA is based on a register other than rsp and rbp",
            ))
        }
        CfaRule::Expression(_) => {
            return Err(CfiError::Unsupported(
                "the CFA is a DWARF expression (a PLT stub or a signal frame)",
            ))
        }
    };
    // framehop stores rsp-based offsets in units of 8 (u16), and rbp's slot
    // relative to rsp in units of 8 (i16).
    let fits = |v: i64, lo: i64, hi: i64| v % 8 == 0 && (lo..=hi).contains(&(v / 8));
    if base == CfaBase::Rsp && !fits(offset, 1, i64::from(u16::MAX)) {
        return Err(CfiError::Unsupported(
            "the CFA offset from rsp is out of range",
        ));
    }
    if base == CfaBase::Rbp && offset % 8 != 0 {
        return Err(CfiError::Unsupported(
            "the CFA offset from rbp is not a multiple of 8",
        ));
    }
    let rbp = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue) => RbpRule::Unchanged,
        Some(RegisterRule::Undefined) => RbpRule::Lost,
        Some(RegisterRule::Offset(n)) => {
            if base == CfaBase::Rsp
                && !fits(
                    offset.saturating_add(n),
                    i64::from(i16::MIN),
                    i64::from(i16::MAX),
                )
            {
                return Err(CfiError::Unsupported("rbp's save slot is out of range"));
            }
            RbpRule::SavedAt(n)
        }
        Some(_) => {
            return Err(CfiError::Unsupported(
                "rbp is restored by a rule other than a stack slot",
            ))
        }
    };
    Ok(Rule::Step { base, offset, rbp })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::elf::exe_path;

    /// Our own test binary (Rust, built with unwind tables): every function
    /// we can name has a rule, a step from rsp, like the compiler says.
    #[test]
    fn own_executable_has_rules_for_its_functions() {
        let sections = UnwindSections::open(&exe_path(std::process::id())).unwrap();
        assert_eq!(sections.source(), ".eh_frame (.eh_frame_hdr index)");
        assert!(sections.bytes() > 1000);
        let maps = crate::native::maps::ProcessMaps::read(std::process::id()).unwrap();
        let here = own_executable_has_rules_for_its_functions as fn() as usize as u64;
        let m = maps.find(here).expect("mapped");
        let bias = sections.bias(m.start, m.offset).unwrap();
        let mut ctx = Context::new();
        // The first instruction of a function: the CFA is rsp + 8 and the
        // return address was just pushed.
        assert_eq!(
            sections.rule_for(&mut ctx, here - bias),
            Ok(Rule::Step {
                base: CfaBase::Rsp,
                offset: 8,
                rbp: RbpRule::Unchanged
            })
        );
        // Below the first FDE of the file there is none.
        assert_eq!(sections.rule_for(&mut ctx, 0), Err(CfiError::NoFde));
    }

    #[test]
    fn files_without_unwind_tables_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("t.txt");
        std::fs::write(&text, b"not an ELF file").unwrap();
        assert!(matches!(
            UnwindSections::open(&text),
            Err(LoadError::NotElf(_))
        ));
        assert!(matches!(
            UnwindSections::open(&dir.path().join("missing")),
            Err(LoadError::Io(_))
        ));
    }
}
