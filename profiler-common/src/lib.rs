//! Types shared by the BPF sampler and the userspace daemon.
//!
//! Every type here is `#[repr(C)]` and plain old data: the BPF side writes
//! them into maps and the ring buffer, and userspace reads the same bytes.
#![no_std]

/// Hard capacity of the per-CPU scratch stack, in frames. `--max-depth` may
/// not exceed it.
pub const MAX_FRAMES: usize = 4096;
/// Frames walked by one BPF program before it tail-calls itself. 33 tail
/// calls (the kernel's limit) of 128 frames cover `MAX_FRAMES`.
pub const FRAMES_PER_PROG: usize = 128;
/// Default `--max-depth`.
pub const DEFAULT_MAX_DEPTH: u32 = 2048;

/// Bytes of a `_PyInterpreterFrame` read per frame (up to and including
/// `owner` at +69).
pub const FRAME_READ_LEN: usize = core::mem::size_of::<Frame311>();
/// Bytes of a `PyCodeObject` read per frame for the checksum and the
/// instruction bound: `[CODE_READ_START, CODE_READ_START + CODE_READ_LEN)`.
pub const CODE_READ_START: u64 = 16;
pub const CODE_READ_LEN: usize = 64;

/// How the interpreted thread's `PyThreadState*` is found from its FS base.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsKind {
    /// glibc `struct pthread.specific_1stblock` and `specific[]` blocks.
    Glibc = 0,
    /// musl: `*(*(fsbase + tsd_offset) + key * 8)`.
    Musl = 1,
}

/// Where thread-specific data lives relative to the thread pointer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsLayout {
    /// A [`TlsKind`] as u32 (an enum read from a map must stay a plain int).
    pub kind: u32,
    /// glibc: offset of `specific_1stblock`; musl: offset of the `tsd` pointer.
    pub first_block: u32,
    /// glibc: offset of the `specific[]` pointer array (second level).
    pub second_level: u32,
    /// The `pthread_key_t` that CPython's `autoTSSkey` holds.
    pub key: u32,
}

/// Offsets the walker follows from the thread state to the first frame and
/// from a code object to its bytecode. Sent per process, so that another
/// patch-level layout needs only a new table in userspace. The frame record
/// itself is read whole as a [`Frame311`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyOffsets {
    pub tstate_cframe: u32,
    pub tstate_thread_id: u32,
    pub cframe_current_frame: u32,
    pub code_adaptive: u32,
}

impl PyOffsets {
    /// CPython 3.11.0 - 3.11.x on 64-bit Linux.
    pub const PY311: PyOffsets = PyOffsets {
        tstate_cframe: 56,
        tstate_thread_id: 152,
        cframe_current_frame: 8,
        code_adaptive: 184,
    };
}

/// The first 72 bytes of a CPython 3.11 `_PyInterpreterFrame`, read with a
/// single `bpf_probe_read_user` per frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Frame311 {
    pub f_func: u64,
    pub f_globals: u64,
    pub f_builtins: u64,
    pub f_locals: u64,
    pub f_code: u64,
    pub frame_obj: u64,
    pub previous: u64,
    pub prev_instr: u64,
    pub stacktop: i32,
    pub is_entry: u8,
    /// 0 thread, 1 generator, 2 frame object; anything else is a bad read.
    pub owner: u8,
    pub _pad: [u8; 2],
}

/// Offsets of the `Frame311` fields the walker uses.
pub const FRAME_CODE_OFF: usize = 32;
pub const FRAME_PREVIOUS_OFF: usize = 48;
pub const FRAME_PREV_INSTR_OFF: usize = 56;
pub const FRAME_OWNER_OFF: usize = 69;

/// Largest valid `Frame311::owner`.
pub const MAX_FRAME_OWNER: u8 = 2;

/// Value of the per-process map, keyed by tgid (pid in the root namespace).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcInfo {
    pub tls: TlsLayout,
    pub py: PyOffsets,
    /// Distinguishes successive processes under one pid (set by the loader
    /// per insertion), so code addresses seen in an earlier program are not
    /// taken as known in the next.
    pub generation: u32,
    pub _pad: u32,
}

impl ProcInfo {
    pub fn new(tls: TlsLayout, py: PyOffsets) -> Self {
        ProcInfo {
            tls,
            py,
            generation: 0,
            _pad: 0,
        }
    }
}

/// Key of the map of code objects already sent to userspace. A sample with
/// a code object not in it wakes the reader at once, so userspace reads the
/// object while it surely exists; other samples wait for the next batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SeenKey {
    pub code: u64,
    pub tgid: u32,
    pub generation: u32,
}

/// Entries of the seen-code LRU map (about 80 bytes of kernel memory each).
pub const SEEN_CODE_ENTRIES: u32 = 65536;

/// Sample flags.
pub const FLAG_TRUNCATED: u32 = 1;
/// The walk stopped on a failed read; the frames before it are valid.
pub const FLAG_READ_ERROR: u32 = 2;

/// Head of every ring-buffer record; `nframes` [`RawFrame`]s follow, leaf
/// first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleHeader {
    pub ktime_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub cpu: u32,
    pub nframes: u32,
    pub flags: u32,
    /// A [`ReadStep`] when `FLAG_READ_ERROR` is set.
    pub error_step: u32,
}

/// One Python frame as seen by BPF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RawFrame {
    /// Address of the `PyCodeObject`.
    pub code: u64,
    /// Instruction index in code units; -1 if the frame has not started.
    pub instr: i32,
    /// [`code_checksum`] of the code object's header at sample time.
    pub checksum: u32,
}

pub const HEADER_LEN: usize = core::mem::size_of::<SampleHeader>();
pub const RAW_FRAME_LEN: usize = core::mem::size_of::<RawFrame>();

/// Per-CPU scratch record: the header and room for the deepest stack.
#[repr(C)]
pub struct SampleBuf {
    pub header: SampleHeader,
    pub frames: [RawFrame; MAX_FRAMES],
}

/// Bytes of target memory copied at once when frames lie next to each other
/// (CPython 3.11 keeps most frames contiguous in the thread's data stack):
/// one read then serves every frame inside it.
pub const FRAME_BLOCK: usize = 2048;
/// Slots of the per-sample code-object cache (a power of two).
pub const CODE_CACHE_SLOTS: usize = 64;

/// A code object already read during this sample. The frames of a stopped
/// thread hold strong references to their code objects, so within one sample
/// an address always means the same object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CodeSlot {
    pub addr: u64,
    pub checksum: u32,
    /// `ob_size`: code units.
    pub units: i32,
    /// The sample (`WalkState::seq`) this slot was filled in.
    pub seq: u32,
    pub _pad: u32,
}

/// Walk state kept between tail calls.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WalkState {
    pub frame: u64,
    pub max_depth: u32,
    /// Sample number on this CPU; cache slots of other samples are invalid.
    pub seq: u32,
    pub info: ProcInfo,
    /// Target address of the block copied in the per-CPU block buffer.
    pub block_base: u64,
    /// 0 when the block buffer holds nothing valid for this sample.
    pub block_valid: u32,
    /// Non-zero when the sample holds a code object not sent before.
    pub novel: u32,
    pub tgid: u32,
    pub _pad: u32,
    pub cache: [CodeSlot; CODE_CACHE_SLOTS],
    /// Scratch for one code-object header (kept off the 512-byte BPF stack).
    pub code_hdr: [u8; CODE_READ_LEN],
}

impl Default for WalkState {
    fn default() -> Self {
        WalkState {
            frame: 0,
            max_depth: 0,
            seq: 0,
            info: ProcInfo::default(),
            block_base: 0,
            block_valid: 0,
            novel: 0,
            tgid: 0,
            _pad: 0,
            cache: [CodeSlot::default(); CODE_CACHE_SLOTS],
            code_hdr: [0; CODE_READ_LEN],
        }
    }
}

impl Default for ProcInfo {
    fn default() -> Self {
        ProcInfo::new(
            TlsLayout {
                kind: 0,
                first_block: 0,
                second_level: 0,
                key: 0,
            },
            PyOffsets::PY311,
        )
    }
}

/// A process lifecycle event from the exec/exit tracepoints.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcEvent {
    /// [`PROC_EVENT_EXEC`] or [`PROC_EVENT_EXIT`].
    pub kind: u32,
    /// tgid in the root PID namespace.
    pub pid: u32,
}

pub const PROC_EVENT_EXEC: u32 = 1;
pub const PROC_EVENT_EXIT: u32 = 2;

/// Where a sample's walk failed. Index into the `READ_ERRORS` counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadStep {
    FsBase = 0,
    Tls = 1,
    ThreadState = 2,
    CFrame = 3,
    Frame = 4,
    Code = 5,
    BadFrame = 6,
}

impl ReadStep {
    pub const ALL: [ReadStep; 7] = [
        ReadStep::FsBase,
        ReadStep::Tls,
        ReadStep::ThreadState,
        ReadStep::CFrame,
        ReadStep::Frame,
        ReadStep::Code,
        ReadStep::BadFrame,
    ];

    pub fn from_u32(v: u32) -> Option<ReadStep> {
        ReadStep::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            ReadStep::FsBase => "fsbase",
            ReadStep::Tls => "tls",
            ReadStep::ThreadState => "thread_state",
            ReadStep::CFrame => "cframe",
            ReadStep::Frame => "frame",
            ReadStep::Code => "code_object",
            ReadStep::BadFrame => "bad_frame",
        }
    }
}

/// Outcome counters, one slot each in the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// perf events that ran the program at all.
    Events = 0,
    /// The interrupted task is not in a profiled process.
    NotProfiled = 1,
    /// Profiled process, but the thread has no PyThreadState (or no frame).
    NoThreadState = 2,
    /// Stacks sent to userspace (including partial ones).
    Sampled = 3,
    /// Stacks cut at max depth.
    Truncated = 4,
    /// Ring buffer had no room; sample lost.
    RingBufFull = 5,
    /// A tail call failed; the sample was sent with what was walked.
    TailCallFailed = 6,
    /// Walk ended by a failed read (see the read-error counters for the step).
    ReadFailed = 7,
    /// Samples that woke the reader at once (a code object not sent before,
    /// or the ring buffer filling up); the rest wait for the next batch.
    Wakeups = 8,
}

pub const COUNTER_SLOTS: u32 = 9;
/// Read-error counters live after the outcome counters, one per [`ReadStep`].
pub const READ_ERROR_BASE: u32 = 16;
pub const COUNTERS_LEN: u32 = READ_ERROR_BASE + 8;

impl Counter {
    pub const ALL: [Counter; 9] = [
        Counter::Events,
        Counter::NotProfiled,
        Counter::NoThreadState,
        Counter::Sampled,
        Counter::Truncated,
        Counter::RingBufFull,
        Counter::TailCallFailed,
        Counter::ReadFailed,
        Counter::Wakeups,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::Events => "events",
            Counter::NotProfiled => "not_profiled",
            Counter::NoThreadState => "no_thread_state",
            Counter::Sampled => "sampled",
            Counter::Truncated => "truncated",
            Counter::RingBufFull => "ringbuf_full",
            Counter::TailCallFailed => "tail_call_failed",
            Counter::ReadFailed => "read_failed",
            Counter::Wakeups => "wakeups",
        }
    }
}

/// A small checksum of a code object's immutable header fields, computed by
/// BPF at sample time and again by userspace when symbolising, so that a code
/// object freed and replaced at the same address is never given the old name.
///
/// `hdr` is the `CODE_READ_LEN` bytes at `code + CODE_READ_START`: `ob_size`,
/// `co_consts`, `co_names`, `co_exceptiontable`, `co_flags`, (skipped:
/// `co_warmup` and `_co_linearray_entry_size`, which change at run time),
/// `co_argcount` .. `co_firstlineno`, `co_nlocalsplus`.
#[inline(always)]
pub fn code_checksum(hdr: &[u8; CODE_READ_LEN]) -> u32 {
    let w = |i: usize| -> u64 {
        u64::from_le_bytes([
            hdr[i],
            hdr[i + 1],
            hdr[i + 2],
            hdr[i + 3],
            hdr[i + 4],
            hdr[i + 5],
            hdr[i + 6],
            hdr[i + 7],
        ])
    };
    // Offsets relative to CODE_READ_START (16).
    let size = w(0);
    let consts = w(8);
    let names = w(16);
    let exc = w(24);
    let flags = w(32) & 0xffff_ffff;
    let args = w(40);
    let kw_stack = w(48);
    let first_nlocals = w(56);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in [
        size,
        consts,
        names,
        exc,
        flags,
        args,
        kw_stack,
        first_nlocals,
    ] {
        h ^= v;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
    }
    (h ^ (h >> 32)) as u32
}

/// Ground truth: the instruction-size bound the walker enforces.
#[inline(always)]
pub fn code_size_units(hdr: &[u8; CODE_READ_LEN]) -> i64 {
    i64::from_le_bytes([
        hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6], hdr[7],
    ])
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for ProcInfo {}
    unsafe impl aya::Pod for TlsLayout {}
    unsafe impl aya::Pod for PyOffsets {}
    unsafe impl aya::Pod for SampleHeader {}
    unsafe impl aya::Pod for RawFrame {}
    unsafe impl aya::Pod for ProcEvent {}
    unsafe impl aya::Pod for SeenKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sizes() {
        assert_eq!(HEADER_LEN, 32);
        assert_eq!(RAW_FRAME_LEN, 16);
        assert_eq!(core::mem::size_of::<ProcInfo>(), 40);
        assert_eq!(core::mem::size_of::<SeenKey>(), 16);
        assert_eq!(FRAME_READ_LEN, 72);
        assert_eq!(core::mem::offset_of!(Frame311, f_code), FRAME_CODE_OFF);
        assert_eq!(
            core::mem::offset_of!(Frame311, previous),
            FRAME_PREVIOUS_OFF
        );
        assert_eq!(
            core::mem::offset_of!(Frame311, prev_instr),
            FRAME_PREV_INSTR_OFF
        );
        assert_eq!(core::mem::offset_of!(Frame311, owner), FRAME_OWNER_OFF);
        const { assert!(MAX_FRAMES.is_multiple_of(FRAMES_PER_PROG)) };
        // The entry program's tail call plus 32 more reach every frame.
        const { assert!(MAX_FRAMES / FRAMES_PER_PROG <= 33) };
    }

    #[test]
    fn checksum_ignores_warmup_and_sees_fields() {
        let mut hdr = [0u8; CODE_READ_LEN];
        for (i, b) in hdr.iter_mut().enumerate() {
            *b = i as u8;
        }
        let base = code_checksum(&hdr);
        let mut warm = hdr;
        warm[36] = 0xff; // co_warmup (absolute +52)
        warm[39] = 0xff; // _co_linearray_entry_size (+54..56)
        assert_eq!(code_checksum(&warm), base);
        let mut other = hdr;
        other[56] ^= 1; // co_firstlineno (+72)
        assert_ne!(code_checksum(&other), base);
        let mut consts = hdr;
        consts[8] ^= 0x10; // co_consts pointer
        assert_ne!(code_checksum(&consts), base);
    }
}
