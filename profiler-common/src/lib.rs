//! Types shared by the BPF sampler and the userspace daemon.
//!
//! Every type here is `#[repr(C)]` and plain old data: the BPF side writes
//! them into maps and the ring buffer, and userspace reads the same bytes.
#![no_std]

mod layout;
mod walk;

pub use layout::*;
pub use walk::*;

/// Hard capacity of the per-CPU scratch stack, in frames. `--max-depth` may
/// not exceed it.
pub const MAX_FRAMES: usize = 4096;
/// Frames walked by one BPF program before it tail-calls itself. 33 tail
/// calls (the kernel's limit) of 128 frames cover `MAX_FRAMES`.
pub const FRAMES_PER_PROG: usize = 128;
/// Default `--max-depth`.
pub const DEFAULT_MAX_DEPTH: u32 = 2048;

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
/// Off-CPU: the thread was switched out still runnable (preempted, or it
/// yielded), so the interval was spent waiting for a CPU, not blocked.
pub const FLAG_PREEMPTED: u32 = 4;
/// The kernel stack was deeper than [`KSTACK_MAX`]: its root end is cut.
pub const FLAG_KSTACK_TRUNCATED: u32 = 8;
/// `user_ip`, `user_sp` and `user_bp` hold the thread's user registers.
pub const FLAG_USER_REGS: u32 = 16;
/// The thread was in the kernel: the user registers are where it entered
/// it (a system call or an interrupt), and `syscall_nr`/`syscall_arg0` are
/// its `orig_ax`/`di`.
pub const FLAG_IN_KERNEL: u32 = 32;
/// Getting the kernel stack failed (`bpf_get_stack` returned an error).
pub const FLAG_KSTACK_ERROR: u32 = 64;
/// The record ends with a copy of the thread's user stack from `user_sp`
/// up (all the bytes after the frames), for native unwinding.
pub const FLAG_USER_STACK: u32 = 128;

/// [`RawFrame::instr`] of an entry mark, written only when user stacks are
/// copied: the Python frame before it (leaf first) is the first one its
/// eval-loop activation runs (3.11's `is_entry`; 3.12+'s frame above a
/// boundary frame). Its `code` is the boundary frame's address, 0 on 3.11.
pub const ENTRY_MARK_INSTR: i32 = i32::MIN;
/// Most bytes of user stack a record carries (a power of two).
pub const USER_STACK_MAX: usize = 16384;
/// Fewest bytes of user stack asked for.
pub const USER_STACK_MIN: usize = 512;

/// [`SampleHeader::kind`] of a thread sampled while on a CPU.
pub const KIND_CPU: u32 = 0;
/// [`SampleHeader::kind`] of an off-CPU interval, at its end.
pub const KIND_OFF_CPU: u32 = 1;

/// Kernel return addresses kept per sample; a deeper stack is cut at its
/// root end and flagged [`FLAG_KSTACK_TRUNCATED`].
pub const KSTACK_MAX: usize = 64;
/// [`RawFrame`] slots the kernel stack may take at the start of a record's
/// body: room for `KSTACK_MAX + 1` addresses (the extra one tells a cut
/// stack from one of exactly `KSTACK_MAX`), rounded up.
pub const KSTACK_SLOTS: usize = (KSTACK_MAX + 2) / 2;

/// Head of every ring-buffer record. The body follows: `nkernel` kernel
/// return addresses (u64, innermost first), padded with one zero word to a
/// multiple of 16 bytes when `nkernel` is odd, then `nframes` [`RawFrame`]s,
/// leaf first.
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
    /// [`KIND_CPU`] or [`KIND_OFF_CPU`].
    pub kind: u32,
    /// Kernel return addresses in the body.
    pub nkernel: u32,
    /// Time this sample stands for: the perf event's period for this
    /// sample (ns of CPU clock), or the off-CPU interval's Horvitz-Thompson
    /// weight `max(d, T)`.
    pub weight_ns: u64,
    /// User-mode registers (valid with [`FLAG_USER_REGS`]).
    pub user_ip: u64,
    pub user_sp: u64,
    pub user_bp: u64,
    /// `orig_ax` and `di` of the thread's saved user registers (valid with
    /// [`FLAG_IN_KERNEL`]): the system call it is in and its first argument
    /// (`orig_ax` is negative for an interrupt).
    pub syscall_nr: u64,
    pub syscall_arg0: u64,
}

/// Bytes the kernel stack of `nkernel` addresses takes in a record.
pub const fn kstack_bytes(nkernel: usize) -> usize {
    nkernel.div_ceil(2) * 16
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

/// Per-CPU scratch record: the header, then the kernel stack in the first
/// `kstack_bytes(nkernel) / 16` slots and the Python frames after it.
#[repr(C)]
pub struct SampleBuf {
    pub header: SampleHeader,
    pub frames: [RawFrame; MAX_FRAMES + KSTACK_SLOTS_MAX],
    /// Room for the user stack copied after the last frame.
    pub user_stack: [u8; USER_STACK_MAX],
}

/// Slots the walker may offset its frames by: a power of two at least
/// [`KSTACK_SLOTS`], so the offset can be masked for the verifier.
pub const KSTACK_SLOTS_MAX: usize = 64;

/// Bytes of target memory copied at once when frames lie next to each other
/// (CPython keeps most frames contiguous in the thread's data stack): one
/// read then serves every frame inside it.
pub const FRAME_BLOCK: usize = 2048;
/// The block in words (frames are 8-aligned, so are their offsets in it).
pub const FRAME_BLOCK_WORDS: usize = FRAME_BLOCK / 8;
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
    /// Non-zero for an interpreter shim (its frames are skipped).
    pub shim: u32,
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
    /// Bytes of this sample's copy at `block_base` in the block buffer; 0
    /// when it holds nothing valid for this sample.
    pub block_len: u32,
    /// Non-zero when the sample holds a code object not sent before.
    pub novel: u32,
    pub tgid: u32,
    /// [`RawFrame`] slots the kernel stack takes before the Python frames.
    pub kslots: u32,
    pub cycle: CycleCheck,
    pub cache: [CodeSlot; CODE_CACHE_SLOTS],
    /// Scratch for one code-object header (kept off the 512-byte BPF stack).
    pub code_hdr: [u64; CODE_READ_WORDS],
}

impl Default for WalkState {
    fn default() -> Self {
        WalkState {
            frame: 0,
            max_depth: 0,
            seq: 0,
            info: ProcInfo::default(),
            block_base: 0,
            block_len: 0,
            novel: 0,
            tgid: 0,
            kslots: 0,
            cycle: CycleCheck::new(),
            cache: [CodeSlot::default(); CODE_CACHE_SLOTS],
            code_hdr: [0; CODE_READ_WORDS],
        }
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

/// Most entries `PROCS` (the processes sampled) may be given: the largest
/// `aggregation.max_processes` the daemon accepts. The kernel preallocates a
/// hash map's entries (about 200 bytes each here), so this bounds the locked
/// kernel memory to about 13 MiB.
pub const MAX_PROCS_ENTRIES: u32 = 65_536;
/// Entries of `WATCH`: pids not sampled whose exit userspace wants to hear
/// of (being inspected, listed as unsupported, followed by `record`). A pid
/// that does not fit is only seen gone by the next `/proc` scan.
pub const WATCH_ENTRIES: u32 = 16_384;

/// Counters of the exec and exit programs, in slots of `COUNTERS` the
/// sampler's outcomes leave free (they are not perf-event outcomes).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcCounter {
    /// Exec or exit events lost to a full `PROC_EVENTS` ring.
    EventsLost = 9,
    /// Exits of a tracked pid's threads where `signal->live` could not be
    /// read: the leader's exit was taken as the process's, as a fallback.
    LiveUnreadable = 10,
}

impl ProcCounter {
    pub const ALL: [ProcCounter; 2] = [ProcCounter::EventsLost, ProcCounter::LiveUnreadable];
}

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
    /// The chain of frames loops back on itself (see [`CycleCheck`]).
    Cycle = 7,
}

impl ReadStep {
    pub const ALL: [ReadStep; 8] = [
        ReadStep::FsBase,
        ReadStep::Tls,
        ReadStep::ThreadState,
        ReadStep::CFrame,
        ReadStep::Frame,
        ReadStep::Code,
        ReadStep::BadFrame,
        ReadStep::Cycle,
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
            ReadStep::Cycle => "cycle",
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
/// Off-CPU and kernel-stack counters, after the read errors.
pub const OFF_CPU_BASE: u32 = READ_ERROR_BASE + 8;
pub const COUNTERS_LEN: u32 = OFF_CPU_BASE + OffCpuCounter::ALL.len() as u32;

/// Counters of the off-CPU programs, in `OFF_COUNTERS` slots of their own
/// (`OFF_CPU_BASE + n`; the slots before are the off-CPU samples'
/// [`Counter`]s and read errors). `KstackFailed` and `RegsFailed` are
/// counted in each lane's array, for its own samples.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffCpuCounter {
    /// A thread of a profiled process switched out; its start was recorded.
    SwitchOuts = 0,
    /// A switch-out not timed: the thread's storage could not be created
    /// (kernel memory).
    MapFull = 1,
    /// Off-CPU intervals that ended (their thread switched back in).
    Intervals = 2,
    /// Their summed length, in nanoseconds.
    IntervalNs = 3,
    /// Intervals chosen to be walked (probability `min(1, d / T)`).
    Chosen = 4,
    /// The chosen intervals' summed weights `max(d, T)`, in nanoseconds: in
    /// expectation equal to `IntervalNs` (the estimate is unbiased).
    WeightNs = 5,
    /// Intervals of a process no longer profiled when they ended: dropped.
    Gone = 6,
    /// `bpf_get_stack` failed on a sample that wanted its kernel stack.
    KstackFailed = 7,
    /// The thread's saved user registers could not be read.
    RegsFailed = 8,
}

impl OffCpuCounter {
    pub const ALL: [OffCpuCounter; 9] = [
        OffCpuCounter::SwitchOuts,
        OffCpuCounter::MapFull,
        OffCpuCounter::Intervals,
        OffCpuCounter::IntervalNs,
        OffCpuCounter::Chosen,
        OffCpuCounter::WeightNs,
        OffCpuCounter::Gone,
        OffCpuCounter::KstackFailed,
        OffCpuCounter::RegsFailed,
    ];

    /// Its slot in `COUNTERS`.
    pub const fn slot(self) -> u32 {
        OFF_CPU_BASE + self as u32
    }

    pub const fn name(self) -> &'static str {
        match self {
            OffCpuCounter::SwitchOuts => "switch_outs",
            OffCpuCounter::MapFull => "map_full",
            OffCpuCounter::Intervals => "intervals",
            OffCpuCounter::IntervalNs => "interval_ns",
            OffCpuCounter::Chosen => "chosen",
            OffCpuCounter::WeightNs => "weight_ns",
            OffCpuCounter::Gone => "process_gone",
            OffCpuCounter::KstackFailed => "kernel_stack_failed",
            OffCpuCounter::RegsFailed => "user_regs_failed",
        }
    }
}

/// One off-CPU interval being timed: a thread's value in the task storage
/// `OFF_CPU` (`start_ns` 0 when none is under way).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuStart {
    /// `bpf_ktime_get_ns` at the switch-out.
    pub start_ns: u64,
    /// The thread's process when it switched out.
    pub tgid: u32,
    /// Non-zero if the thread was still runnable when switched out.
    pub preempted: u32,
}

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

    pub const fn name(self) -> &'static str {
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

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for ProcInfo {}
    unsafe impl aya::Pod for TlsLayout {}
    unsafe impl aya::Pod for PyLayout {}
    unsafe impl aya::Pod for SampleHeader {}
    unsafe impl aya::Pod for RawFrame {}
    unsafe impl aya::Pod for ProcEvent {}
    unsafe impl aya::Pod for SeenKey {}
    unsafe impl aya::Pod for OffCpuStart {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sizes() {
        assert_eq!(HEADER_LEN, 88);
        assert_eq!(core::mem::size_of::<OffCpuStart>(), 16);
        // The kernel stack plus the deepest walk fit the scratch body, and
        // the kernel stack's slots fit the walker's offset mask.
        const { assert!(KSTACK_SLOTS <= KSTACK_SLOTS_MAX && KSTACK_SLOTS_MAX.is_power_of_two()) };
        assert_eq!(kstack_bytes(KSTACK_MAX + 1), KSTACK_SLOTS * RAW_FRAME_LEN);
        assert_eq!(
            (kstack_bytes(0), kstack_bytes(1), kstack_bytes(2)),
            (0, 16, 16)
        );
        assert_eq!(RAW_FRAME_LEN, 16);
        assert_eq!(core::mem::size_of::<TlsLayout>(), 24);
        assert_eq!(core::mem::size_of::<PyLayout>(), 88);
        assert_eq!(core::mem::size_of::<ProcInfo>(), 120);
        assert_eq!(core::mem::size_of::<SeenKey>(), 16);
        const { assert!(MAX_FRAMES.is_multiple_of(FRAMES_PER_PROG)) };
        // The entry program's tail call plus 32 more reach every frame.
        const { assert!(MAX_FRAMES / FRAMES_PER_PROG <= 33) };
        // A frame read always fits in the block buffer, and the block
        // offset mask covers it.
        const { assert!(FRAME_READ_LEN <= FRAME_BLOCK && FRAME_BLOCK.is_power_of_two()) };
        // Process counters sit between the outcomes and the read errors.
        // Every step has its read-error slot.
        const { assert!(READ_ERROR_BASE as usize + ReadStep::ALL.len() <= COUNTERS_LEN as usize) };
        for c in ProcCounter::ALL {
            assert!(c as u32 >= COUNTER_SLOTS && (c as u32) < READ_ERROR_BASE);
        }
        for (i, c) in OffCpuCounter::ALL.into_iter().enumerate() {
            assert_eq!(c as usize, i);
            assert!(c.slot() >= READ_ERROR_BASE + ReadStep::ALL.len() as u32);
            assert!(c.slot() < COUNTERS_LEN);
        }
    }
}
