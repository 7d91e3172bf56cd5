//! What the walker needs to know about one process: how a thread finds its
//! `PyThreadState`, and where the fields it follows sit in that CPython
//! version's structures. Userspace fills both per process (from its
//! per-version layout modules and, from 3.13 on, the interpreter's own
//! `_Py_DebugOffsets`); the BPF side has no version knowledge of its own.

/// How a thread's `PyThreadState*` is found from its thread pointer (FS base).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsKind {
    /// A pthread key (CPython's `autoTSSkey`, 3.11-3.14) in glibc's
    /// `struct pthread.specific_1stblock` and `specific[]` blocks.
    Glibc = 0,
    /// A pthread key in musl: `*(*(fsbase + tsd_offset) + key * 8)`.
    Musl = 1,
    /// A thread-local variable in the static TLS area (CPython 3.15's
    /// `_Py_tss_gilstate`): `*(fsbase + tp_offset)`.
    Static = 2,
}

/// Where the thread's state pointer lives relative to the thread pointer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsLayout {
    /// A [`TlsKind`] as u32 (an enum read from a map must stay a plain int).
    pub kind: u32,
    /// glibc: offset of `specific_1stblock`; musl: offset of the `tsd` pointer.
    pub first_block: u32,
    /// glibc: offset of the `specific[]` pointer array (second level).
    pub second_level: u32,
    /// The pthread key (glibc, musl).
    pub key: u32,
    /// [`TlsKind::Static`]: offset of the variable from the thread pointer
    /// (negative on x86-64, where TLS blocks sit below it).
    pub tp_offset: i64,
}

impl TlsLayout {
    pub const fn static_tls(tp_offset: i64) -> TlsLayout {
        TlsLayout {
            kind: TlsKind::Static as u32,
            first_block: 0,
            second_level: 0,
            key: 0,
            tp_offset,
        }
    }
}

/// `PyLayout::cframe_frame` when the thread state points at the frame itself.
pub const NO_CFRAME: u16 = u16::MAX;
/// `PyLayout::owner_boundary` when no frame owner marks a boundary frame.
pub const NO_BOUNDARY_OWNER: u8 = u8::MAX;
/// `PyLayout::frame_is_entry` when frames have no entry flag (3.12+, whose
/// activations start with a boundary frame instead).
pub const NO_ENTRY_FLAG: u8 = u8::MAX;

/// Bytes of a `_PyInterpreterFrame` read per frame: enough for the fields of
/// every supported version (3.14 keeps `owner` at +74).
pub const FRAME_READ_LEN: usize = 80;
/// Bytes of a `PyCodeObject` read per frame for the checksum, the size bound
/// and the flags: `[CODE_READ_START, CODE_READ_START + CODE_READ_LEN)`.
pub const CODE_READ_START: u64 = 16;
pub const CODE_READ_LEN: usize = 64;
/// Words of that header, each with its own checksum mask.
pub const CODE_READ_WORDS: usize = CODE_READ_LEN / 8;

/// Offsets the walker follows, for one CPython version (and build).
///
/// Frame offsets are within the [`FRAME_READ_LEN`] bytes read per frame;
/// code offsets are relative to [`CODE_READ_START`]. Userspace checks both
/// before it hands a layout to BPF ([`PyLayout::check`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyLayout {
    /// `PyThreadState.thread_id` (the thread's `pthread_t`, i.e. its FS base).
    pub tstate_thread_id: u16,
    /// `PyThreadState.cframe` (3.11, 3.12) or `.current_frame` (3.13+).
    pub tstate_frame: u16,
    /// `_PyCFrame.current_frame`, or [`NO_CFRAME`] when `tstate_frame`
    /// already points at the frame.
    pub cframe_frame: u16,
    /// `co_code_adaptive`: where instruction index 0 starts.
    pub code_adaptive: u16,
    /// `f_code` / `f_executable`.
    pub frame_code: u8,
    pub frame_previous: u8,
    /// `prev_instr` (3.11, 3.12) or `instr_ptr` (3.13+).
    pub frame_instr: u8,
    pub frame_owner: u8,
    /// Frames whose owner is at least this are interpreter boundaries (the
    /// C-stack entry frame of 3.12+), never shown; [`NO_BOUNDARY_OWNER`]
    /// when every valid owner is a Python frame (3.11).
    pub owner_boundary: u8,
    /// Owners above this are not a frame at all (a bad read).
    pub owner_max: u8,
    /// `co_flags`, relative to [`CODE_READ_START`].
    pub code_flags: u8,
    /// 3.11's `_PyInterpreterFrame.is_entry` (the first frame an eval-loop
    /// activation runs), or [`NO_ENTRY_FLAG`].
    pub frame_is_entry: u8,
    /// Code objects with any of these `co_flags` are interpreter shims
    /// (3.13+'s `__init__` cleanup frame), never shown.
    pub shim_flags: u32,
    /// `_PyStackRef` tag bits of the code pointer (3.14+), cleared before
    /// use; 0 where it is a plain pointer.
    pub code_tag_bits: u32,
    /// Per header word, the bits the checksum covers: fields the interpreter
    /// writes at run time (3.11's warm-up counter) are masked out.
    pub checksum_masks: [u64; CODE_READ_WORDS],
}

/// Why a layout cannot be given to the walker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// A frame field does not fit in the bytes read per frame.
    FrameField(&'static str),
    /// A code field does not fit in the code header read.
    CodeField(&'static str),
}

impl PyLayout {
    /// Every field is inside what the walker reads, and the word fields
    /// are whole words.
    pub fn check(&self) -> Result<(), LayoutError> {
        let word_fits = |off: u8| off.is_multiple_of(8) && usize::from(off) + 8 <= FRAME_READ_LEN;
        for (name, off) in [
            ("code", self.frame_code),
            ("previous", self.frame_previous),
            ("instruction pointer", self.frame_instr),
        ] {
            if !word_fits(off) {
                return Err(LayoutError::FrameField(name));
            }
        }
        if usize::from(self.frame_owner) >= FRAME_READ_LEN {
            return Err(LayoutError::FrameField("owner"));
        }
        if !self.code_flags.is_multiple_of(4) || usize::from(self.code_flags) + 4 > CODE_READ_LEN {
            return Err(LayoutError::CodeField("co_flags"));
        }
        Ok(())
    }
}

/// Value of the per-process map, keyed by tgid (pid in the root namespace).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcInfo {
    pub tls: TlsLayout,
    pub py: PyLayout,
    /// Distinguishes successive processes under one pid (set by the loader
    /// per insertion), so code addresses seen in an earlier program are not
    /// taken as known in the next.
    pub generation: u32,
    pub _pad: u32,
}

impl ProcInfo {
    pub fn new(tls: TlsLayout, py: PyLayout) -> Self {
        ProcInfo {
            tls,
            py,
            generation: 0,
            _pad: 0,
        }
    }
}

impl Default for ProcInfo {
    fn default() -> Self {
        ProcInfo {
            tls: TlsLayout::static_tls(0),
            py: PyLayout {
                tstate_thread_id: 0,
                tstate_frame: 0,
                cframe_frame: NO_CFRAME,
                code_adaptive: 0,
                frame_code: 0,
                frame_previous: 0,
                frame_instr: 0,
                frame_owner: 0,
                owner_boundary: NO_BOUNDARY_OWNER,
                owner_max: 0,
                code_flags: 0,
                frame_is_entry: NO_ENTRY_FLAG,
                shim_flags: 0,
                code_tag_bits: 0,
                checksum_masks: [0; CODE_READ_WORDS],
            },
            generation: 0,
            _pad: 0,
        }
    }
}
