//! The sampler: a perf_event program on the CPU clock that, for profiled
//! processes only, finds the interrupted thread's `PyThreadState` through
//! thread-specific storage and walks its `_PyInterpreterFrame` chain from the
//! leaf, then ships the raw frames through a ring buffer. It knows no CPython
//! version: every offset it follows comes from the process's `ProcInfo`,
//! which userspace fills from its per-version layouts.
//!
//! Every read of target memory is `bpf_probe_read_user`, which fails with
//! -EFAULT on a bad pointer instead of faulting: the target is never at risk.
//! The walk is split into programs of `FRAMES_PER_PROG` frames chained by tail
//! calls, which keeps each program small for the verifier and covers
//! `MAX_FRAMES` within the kernel's 33 tail calls.
//!
//! Off-CPU time (`on_switch_out`, `on_switch_in`): the scheduler's
//! tracepoints time each switch-out of a profiled thread and, as it comes
//! back, sample the interval and walk the same way, in buffers of their own
//! (`OFF_LANE`). Records then also carry the kernel stack and the thread's
//! saved user registers.
#![no_std]
#![no_main]

mod task_storage;

use aya_ebpf::{
    bindings::task_struct,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_task_btf,
        bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_get_stack, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_buf, bpf_task_pt_regs,
    },
    macros::{btf_tracepoint, map, perf_event, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{BtfTracePointContext, PerfEventContext, RawTracePointContext},
    EbpfContext,
};
use profiler_common::{
    code_checksum, code_flags, code_size_units, instr_index, Counter, CycleCheck, FrameFields,
    FrameKind, OffCpuCounter, OffCpuStart, ProcCounter, ProcEvent, ProcInfo, RawFrame, ReadStep,
    SampleBuf, SeenKey, TlsKind, WalkState, CODE_CACHE_SLOTS, CODE_READ_START, COUNTERS_LEN,
    ENTRY_MARK_INSTR, FLAG_IN_KERNEL, FLAG_KSTACK_ERROR, FLAG_KSTACK_TRUNCATED, FLAG_PREEMPTED,
    FLAG_READ_ERROR, FLAG_TRUNCATED, FLAG_USER_REGS, FLAG_USER_STACK, FRAMES_PER_PROG, FRAME_BLOCK,
    FRAME_BLOCK_WORDS, FRAME_READ_LEN, FRAME_READ_WORDS, HEADER_LEN, KIND_CPU, KIND_OFF_CPU,
    KSTACK_MAX, KSTACK_SLOTS_MAX, MAX_FRAMES, NO_CFRAME, RAW_FRAME_LEN, READ_ERROR_BASE,
    SEEN_CODE_ENTRIES, USER_STACK_MAX, USER_STACK_MIN, WATCH_ENTRIES,
};
use task_storage::TaskStorage;

/// Offset of `task_struct.thread.fsbase`, from the kernel's BTF (set by
/// userspace before load).
#[no_mangle]
static FSBASE_OFFSET: u64 = 0;

/// Offset of `task_struct.mm` (0: unknown, not checked).
#[no_mangle]
static MM_OFFSET: u64 = 0;

/// Processes to profile, keyed by tgid as the root PID namespace sees it.
/// Userspace sets `max_entries` from its process limit.
#[map]
static PROCS: HashMap<u32, ProcInfo> = HashMap::with_max_entries(1024, 0);

/// Pids not sampled whose exit userspace wants to hear of (see `on_exit`).
#[map]
static WATCH: HashMap<u32, u8> = HashMap::with_max_entries(WATCH_ENTRIES, 0);

/// Offsets of `task_struct.signal` and `signal_struct.live.counter`, from
/// the kernel's BTF (set by userspace before load; 0: not found).
#[no_mangle]
static SIGNAL_OFFSET: u64 = 0;
#[no_mangle]
static LIVE_OFFSET: u64 = 0;

/// One scratch record per possible CPU (too big for a per-CPU value); userspace
/// sets `max_entries` to the number of possible CPUs.
#[map]
static SCRATCH: Array<SampleBuf> = Array::with_max_entries(1, 0);

#[map]
static STATE: PerCpuArray<WalkState> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU copy of a block of target memory holding consecutive frames.
#[map]
static BLOCK: PerCpuArray<[u64; FRAME_BLOCK_WORDS]> = PerCpuArray::with_max_entries(1, 0);

/// The same three for off-CPU samples. Their program runs with interrupts
/// on, so a CPU sample can interrupt it on the same CPU: sharing buffers
/// would let one overwrite the other's walk.
#[map]
static OFF_SCRATCH: Array<SampleBuf> = Array::with_max_entries(1, 0);
#[map]
static OFF_STATE: PerCpuArray<WalkState> = PerCpuArray::with_max_entries(1, 0);
#[map]
static OFF_BLOCK: PerCpuArray<[u64; FRAME_BLOCK_WORDS]> = PerCpuArray::with_max_entries(1, 0);

/// The per-CPU buffers one kind of sample walks in.
#[derive(Clone, Copy)]
struct Lane {
    scratch: &'static Array<SampleBuf>,
    state: &'static PerCpuArray<WalkState>,
    block: &'static PerCpuArray<[u64; FRAME_BLOCK_WORDS]>,
    /// Slot 0 holds the lane's walker program.
    walker: &'static ProgramArray,
    counters: &'static PerCpuArray<u64>,
}

const CPU_LANE: Lane = Lane {
    scratch: &SCRATCH,
    state: &STATE,
    block: &BLOCK,
    walker: &WALKER,
    counters: &COUNTERS,
};

const OFF_LANE: Lane = Lane {
    scratch: &OFF_SCRATCH,
    state: &OFF_STATE,
    block: &OFF_BLOCK,
    walker: &OFF_WALKER,
    counters: &OFF_COUNTERS,
};

/// Outcomes of CPU samples, and the exec and exit programs' counters.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// Outcomes of off-CPU samples (same slots), and the off-CPU counters.
#[map]
static OFF_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// Userspace sets the size (bytes, a power of two multiple of the page size).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Code objects already sent to userspace, with their checksum: a sample
/// holding one not in here wakes the reader at once (see `emit`).
#[map]
static SEEN_CODE: LruHashMap<SeenKey, u32> = LruHashMap::with_max_entries(SEEN_CODE_ENTRIES, 0);

/// Bytes waiting in `EVENTS` past which a sample wakes the reader anyway;
/// set by userspace before load (0: wake on every sample).
#[no_mangle]
static WAKEUP_BYTES: u64 = 0;

/// Slot 0 holds `walk`, so it can chain to itself.
#[map]
static WALKER: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Slot 0 holds `walk_off`: a tail call must stay within one program type
/// (and, for BTF-typed programs, one attach point), so off-CPU samples have
/// a walker of their own with the same body as `walk`.
#[map]
static OFF_WALKER: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Off-CPU intervals being timed, per thread: the switch-out of a thread of
/// a profiled process (`start_ns` 0: none under way). Task-local storage:
/// found through the task, with no hashing or lock on the scheduler's path,
/// and freed with the task.
#[link_section = ".maps"]
#[export_name = "OFF_CPU"]
static OFF_CPU: TaskStorage<OffCpuStart> = TaskStorage::new();

/// What one CPU sample stands for, in ns (1e9 / rate); set by userspace.
#[no_mangle]
static CPU_PERIOD_NS: u64 = 0;

/// Non-zero: CPU samples that interrupted the kernel carry its stack.
#[no_mangle]
static CPU_KSTACKS: u32 = 0;

/// T, the off-CPU sampling period: an interval of `d` ns is walked with
/// probability `min(1, d / T)` and then weighs `max(d, T)`. At most 2^32.
#[no_mangle]
static OFF_CPU_PERIOD_NS: u64 = 1_000_000;

/// Frames of the off-CPU program's own kernel stack (the BPF program and
/// its trampoline) that `bpf_get_stack` skips; set by userspace.
#[no_mangle]
static OFF_CPU_KSTACK_SKIP: u32 = 0;

/// Bytes of the thread's user stack each record carries, for native
/// unwinding in userspace (0: none, and no entry marks); set by userspace,
/// at most `USER_STACK_MAX`.
#[no_mangle]
static USER_STACK_BYTES: u32 = 0;

#[inline(always)]
fn user_stack_bytes() -> usize {
    // SAFETY: a plain global, set before the programs are loaded.
    unsafe { core::ptr::read_volatile(&USER_STACK_BYTES) as usize }
}

const WALK_SLOT: u32 = 0;

// `bpf_ringbuf_output` and `bpf_ringbuf_query` flags (uapi/linux/bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Adds `n` to slot `c` of `counters`.
#[inline(always)]
fn add_counter(counters: &PerCpuArray<u64>, c: u32, n: u64) {
    if let Some(p) = counters.get_ptr_mut(c) {
        // SAFETY: a per-CPU slot. Programs writing one array never nest on
        // a CPU: the perf_event programs run in hard interrupts, the
        // scheduler hooks with preemption off, and the one that can be
        // interrupted (`on_switch_in`, by a CPU sample) counts in its own.
        unsafe { *p += n };
    }
}

#[inline(always)]
fn count(c: u32) {
    add_counter(&COUNTERS, c, 1);
}

/// Counts an outcome of the lane's samples.
#[inline(always)]
fn count_lane(lane: Lane, c: Counter) {
    add_counter(lane.counters, c as u32, 1);
}

/// Adds `n` to an off-CPU counter.
#[inline(always)]
fn count_off(c: OffCpuCounter, n: u64) {
    add_counter(&OFF_COUNTERS, c.slot(), n);
}

#[inline(always)]
fn count_read_error(lane: Lane, step: ReadStep) {
    add_counter(lane.counters, READ_ERROR_BASE + step as u32, 1);
}

#[inline(always)]
fn read_u64(addr: u64) -> Result<u64, i32> {
    // SAFETY: bpf_probe_read_user never faults; a bad address is an error.
    unsafe { bpf_probe_read_user(addr as *const u64) }
}

/// The thread's `PyThreadState*` from its FS base: a pthread key's slot in
/// the libc's thread-specific data, or a thread-local variable.
#[inline(always)]
fn thread_state(fsbase: u64, info: &ProcInfo) -> Result<u64, i32> {
    let tls = &info.tls;
    if tls.kind == TlsKind::Static as u32 {
        return read_u64(fsbase.wrapping_add(tls.tp_offset as u64));
    }
    let key = u64::from(tls.key);
    if tls.kind == TlsKind::Musl as u32 {
        let tsd = read_u64(fsbase + u64::from(tls.first_block))?;
        if tsd == 0 {
            return Ok(0);
        }
        return read_u64(tsd + key * 8);
    }
    if key < 32 {
        read_u64(fsbase + u64::from(tls.first_block) + key * 16 + 8)
    } else {
        let blk = read_u64(fsbase + u64::from(tls.second_level) + (key >> 5) * 8)?;
        // A thread that never set a key of this block (one just started, or
        // ending: glibc frees the blocks at exit) has none: no Python state,
        // not a failed read.
        if blk == 0 {
            return Ok(0);
        }
        read_u64(blk + (key & 31) * 16 + 8)
    }
}

#[perf_event]
pub fn sample(ctx: PerfEventContext) -> u32 {
    count(Counter::Events as u32);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // SAFETY: the map value is plain data, copied out before use.
    let info = match unsafe { PROCS.get(&tgid) } {
        Some(i) => *i,
        None => {
            count(Counter::NotProfiled as u32);
            return 0;
        }
    };
    // What this sample stands for: the perf event's period (ns of the CPU
    // clock) as the kernel set it for this overflow. In frequency mode it
    // drifts from 1e9 / rate, so the nominal period would bias CPU time.
    // SAFETY: `struct bpf_perf_event_data` is the regs, then `sample_period`.
    let period = unsafe { *(ctx.as_ptr() as *const u64).add(PT_REGS_WORDS) };
    let weight = if period != 0 {
        period
    } else {
        unsafe { core::ptr::read_volatile(&CPU_PERIOD_NS) }
    };
    let Some((buf, state)) = begin(CPU_LANE, tgid, tid, &info, KIND_CPU, weight) else {
        return 0;
    };
    cpu_context(&ctx, buf, state);
    // SAFETY: tail_call only returns on failure.
    unsafe { WALKER.tail_call(&ctx, WALK_SLOT) };
    count(Counter::TailCallFailed as u32);
    0
}

/// [`start_walk`] with its outcome counted: the scratch record and walk
/// state of a sample whose walk can start, or `None` (counted).
#[inline(always)]
fn begin(
    lane: Lane,
    tgid: u32,
    tid: u32,
    info: &ProcInfo,
    kind: u32,
    weight_ns: u64,
) -> Option<(&'static mut SampleBuf, &'static mut WalkState)> {
    match start_walk(lane, tgid, tid, info, kind, weight_ns) {
        Ok(Some(s)) => Some(s),
        Ok(None) => {
            count_lane(lane, Counter::NoThreadState);
            None
        }
        Err(step) => {
            count_lane(lane, Counter::ReadFailed);
            count_read_error(lane, step);
            None
        }
    }
}

/// `struct pt_regs` (x86-64) in words, and the words of it a sample keeps.
const PT_REGS_WORDS: usize = 21;
const REG_BP: usize = 4;
const REG_DI: usize = 14;
const REG_ORIG_AX: usize = 15;
const REG_IP: usize = 16;
const REG_CS: usize = 17;
const REG_SP: usize = 19;

/// Copies the registers a sample keeps from a `pt_regs` image.
#[inline(always)]
fn keep_regs(h: &mut profiler_common::SampleHeader, r: &[u64; PT_REGS_WORDS], in_kernel: bool) {
    h.user_ip = r[REG_IP];
    h.user_sp = r[REG_SP];
    h.user_bp = r[REG_BP];
    h.syscall_nr = r[REG_ORIG_AX];
    h.syscall_arg0 = r[REG_DI];
    h.flags |= FLAG_USER_REGS;
    if in_kernel {
        h.flags |= FLAG_IN_KERNEL;
    }
}

/// The current thread's saved user registers (the `pt_regs` at the top of
/// its kernel stack: where it entered the kernel), into the header.
#[inline(always)]
fn task_regs(lane: Lane, h: &mut profiler_common::SampleHeader) {
    // SAFETY: the helper returns the current task's BTF pointer; the
    // registers are read with bpf_probe_read_kernel, which cannot fault.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf() as *mut task_struct) };
    match unsafe { bpf_probe_read_kernel(regs as *const [u64; PT_REGS_WORDS]) } {
        Ok(r) => keep_regs(h, &r, true),
        Err(_) => add_counter(lane.counters, OffCpuCounter::RegsFailed.slot(), 1),
    }
}

/// The kernel stack of `ctx`'s task into the record's body, innermost
/// first, skipping `skip` frames; sets `nkernel` and the walker's frame
/// offset past it.
#[inline(always)]
fn kernel_stack<C: EbpfContext>(
    lane: Lane,
    ctx: &C,
    buf: &mut SampleBuf,
    state: &mut WalkState,
    skip: u32,
) {
    const WANT: usize = (KSTACK_MAX + 1) * 8;
    // SAFETY: the body holds far more than WANT bytes.
    let got = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            buf.frames.as_mut_ptr().cast(),
            WANT as u32,
            u64::from(skip & 0xff),
        )
    };
    if got < 0 {
        buf.header.flags |= FLAG_KSTACK_ERROR;
        add_counter(lane.counters, OffCpuCounter::KstackFailed.slot(), 1);
        return;
    }
    let mut n = got as usize / 8;
    if n > KSTACK_MAX {
        n = KSTACK_MAX;
        buf.header.flags |= FLAG_KSTACK_TRUNCATED;
    }
    buf.header.nkernel = n as u32;
    state.kslots = n.div_ceil(2) as u32;
    // The pad word after an odd count is zero, not stale.
    if n % 2 == 1 {
        buf.frames[(n / 2) & (KSTACK_SLOTS_MAX - 1)].code = 0;
    }
}

/// A CPU sample's registers and, with `CPU_KSTACKS`, kernel stack: from the
/// interrupted state if it was user code, else from where the thread
/// entered the kernel (and then the kernel stack is the interrupted one).
#[inline(always)]
fn cpu_context(ctx: &PerfEventContext, buf: &mut SampleBuf, state: &mut WalkState) {
    // SAFETY: a perf_event program's context starts with the interrupted
    // `pt_regs`, readable whole.
    let regs = unsafe { &*(ctx.as_ptr() as *const [u64; PT_REGS_WORDS]) };
    if regs[REG_CS] & 3 == 3 {
        keep_regs(&mut buf.header, regs, false);
        return;
    }
    task_regs(CPU_LANE, &mut buf.header);
    if unsafe { core::ptr::read_volatile(&CPU_KSTACKS) } != 0 {
        kernel_stack(CPU_LANE, ctx, buf, state, 0);
    }
}

/// Finds the leaf frame and fills the per-CPU walk state and record header.
/// `Ok(None)`: the thread has no Python state or no frame (not yet
/// started, finalising).
#[inline(always)]
fn start_walk(
    lane: Lane,
    tgid: u32,
    tid: u32,
    info: &ProcInfo,
    kind: u32,
    weight_ns: u64,
) -> Result<Option<(&'static mut SampleBuf, &'static mut WalkState)>, ReadStep> {
    let off = unsafe { core::ptr::read_volatile(&FSBASE_OFFSET) };
    // SAFETY: bpf_get_current_task returns the current task_struct; the read
    // is bounded by the kernel helper.
    let task = unsafe { bpf_get_current_task() };
    let fsbase: u64 = unsafe { bpf_probe_read_kernel((task + (off & 0xffff)) as *const u64) }
        .map_err(|_| ReadStep::FsBase)?;
    if fsbase == 0 {
        return Ok(None);
    }
    // A thread in its last moments (do_exit after exit_mm) has left the
    // address space: no user memory to read, and no Python state left.
    let mm_off = unsafe { core::ptr::read_volatile(&MM_OFFSET) };
    if mm_off != 0 {
        // SAFETY: as above.
        let mm: u64 = unsafe { bpf_probe_read_kernel((task + (mm_off & 0xffff)) as *const u64) }
            .map_err(|_| ReadStep::FsBase)?;
        if mm == 0 {
            return Ok(None);
        }
    }
    let tstate = thread_state(fsbase, info).map_err(|_| ReadStep::Tls)?;
    if tstate == 0 {
        return Ok(None);
    }
    // The TSD slot must point back at this thread: `thread_id` is its
    // pthread_t, which is its FS base on glibc and musl.
    let py = &info.py;
    let thread_id =
        read_u64(tstate + u64::from(py.tstate_thread_id)).map_err(|_| ReadStep::ThreadState)?;
    if thread_id != fsbase {
        return Err(ReadStep::ThreadState);
    }
    // 3.11 and 3.12 reach the frame through the C frame (`cframe`), later
    // versions hold it in the thread state (`current_frame`).
    let mut frame =
        read_u64(tstate + u64::from(py.tstate_frame)).map_err(|_| ReadStep::ThreadState)?;
    if frame != 0 && py.cframe_frame != NO_CFRAME {
        frame = read_u64(frame + u64::from(py.cframe_frame)).map_err(|_| ReadStep::CFrame)?;
    }
    if frame == 0 {
        return Ok(None);
    }
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let buf = lane.scratch.get_ptr_mut(cpu).ok_or(ReadStep::FsBase)?;
    let state = lane.state.get_ptr_mut(0).ok_or(ReadStep::FsBase)?;
    // SAFETY: both pointers are map values owned by this CPU for the sample.
    unsafe {
        let h = &mut (*buf).header;
        h.ktime_ns = bpf_ktime_get_ns();
        h.pid = tgid;
        h.tid = tid;
        h.cpu = cpu;
        h.nframes = 0;
        h.flags = 0;
        h.error_step = 0;
        h.kind = kind;
        h.nkernel = 0;
        h.weight_ns = weight_ns;
        h.user_ip = 0;
        h.user_sp = 0;
        h.user_bp = 0;
        h.syscall_nr = 0;
        h.syscall_arg0 = 0;
        let s = &mut *state;
        s.frame = frame;
        s.info = *info;
        s.seq = s.seq.wrapping_add(1);
        s.block_len = 0;
        s.novel = 0;
        s.tgid = tgid;
        s.kslots = 0;
        s.cycle = CycleCheck::new();
        let max = core::ptr::read_volatile(&MAX_DEPTH);
        s.max_depth = if max == 0 || max > MAX_FRAMES as u32 {
            MAX_FRAMES as u32
        } else {
            max
        };
        Ok(Some((&mut *buf, &mut *state)))
    }
}

/// `--max-depth`, set by userspace before load.
#[no_mangle]
static MAX_DEPTH: u32 = 0;

/// How one step of the walk ended.
enum Step {
    Next,
    Done,
    Truncated,
    Failed(ReadStep),
}

#[perf_event]
pub fn walk(ctx: PerfEventContext) -> u32 {
    walk_body(&ctx, CPU_LANE)
}

/// The walker of off-CPU samples: see `OFF_WALKER`.
#[btf_tracepoint(function = "sched_exit_tp")]
pub fn walk_off(ctx: BtfTracePointContext) -> u32 {
    walk_body(&ctx, OFF_LANE)
}

/// Walks up to `FRAMES_PER_PROG` frames, then chains to the lane's walker
/// (the program running this) or sends the sample.
#[inline(always)]
fn walk_body<C: EbpfContext>(ctx: &C, lane: Lane) -> u32 {
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let (Some(buf), Some(state), Some(block)) = (
        lane.scratch.get_ptr_mut(cpu),
        lane.state.get_ptr_mut(0),
        lane.block.get_ptr_mut(0),
    ) else {
        return 0;
    };
    // SAFETY: map values owned by this CPU for the duration of the sample.
    let (buf, state, block) = unsafe { (&mut *buf, &mut *state, &mut *block) };
    let mut end = Step::Next;
    for _ in 0..FRAMES_PER_PROG {
        end = walk_one(buf, state, block);
        if !matches!(end, Step::Next) {
            break;
        }
    }
    match end {
        Step::Next => {
            // More frames: continue in a fresh program invocation.
            unsafe { lane.walker.tail_call(ctx, WALK_SLOT) };
            count_lane(lane, Counter::TailCallFailed);
            buf.header.flags |= FLAG_TRUNCATED;
        }
        Step::Done => {}
        Step::Truncated => {
            buf.header.flags |= FLAG_TRUNCATED;
            count_lane(lane, Counter::Truncated);
        }
        Step::Failed(step) => {
            buf.header.flags |= FLAG_READ_ERROR;
            buf.header.error_step = step as u32;
            count_lane(lane, Counter::ReadFailed);
            count_read_error(lane, step);
        }
    }
    emit(lane, buf, state.kslots, state.novel != 0);
    0
}

/// The per-CPU copy of target memory frames are parsed from.
type Block = [u64; FRAME_BLOCK_WORDS];

/// `words` as the bytes a read fills.
#[inline(always)]
fn bytes_of<const N: usize>(words: &mut [u64; N]) -> &mut [u8] {
    // SAFETY: the same memory, seen as bytes; any bytes make valid words.
    unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), N * 8) }
}

/// Target pages: where a block copy may have to start when the memory below
/// a frame is not mapped.
const PAGE: u64 = 4096;

/// Reads the frame at `addr` (8-aligned) into the block buffer and returns
/// its fields. A frame inside the block copied last costs no read: CPython
/// keeps most frames next to each other in the thread's data stack (callers
/// below callees), so the block copied is the `FRAME_BLOCK` bytes that end
/// with this frame. Where that copy fails (the data stack's chunks are
/// mappings of their own, so frames near a chunk's start have nothing mapped
/// below them), the copy starts at the frame's own page instead.
#[inline(always)]
fn read_frame(addr: u64, state: &mut WalkState, block: &mut Block) -> Option<FrameFields> {
    const LAST: u64 = (FRAME_BLOCK - FRAME_READ_LEN) as u64;
    let held = addr >= state.block_base
        && addr - state.block_base + FRAME_READ_LEN as u64 <= u64::from(state.block_len);
    if !held {
        state.block_len = 0;
        let base = addr.saturating_sub(LAST);
        // SAFETY: bpf_probe_read_user never faults.
        if unsafe { bpf_probe_read_user_buf(base as *const u8, bytes_of(block)) }.is_ok() {
            state.block_base = base;
            state.block_len = FRAME_BLOCK as u32;
        } else {
            let page = addr & !(PAGE - 1);
            let base = if page > base { page } else { addr };
            // At most LAST + FRAME_READ_LEN = FRAME_BLOCK bytes: the mask
            // shows the verifier what the branch above proves.
            let len = core::hint::black_box((addr - base) as usize + FRAME_READ_LEN)
                & (2 * FRAME_BLOCK - 1);
            if len > FRAME_BLOCK {
                return None;
            }
            // SAFETY: as above.
            unsafe { bpf_probe_read_user_buf(base as *const u8, &mut bytes_of(block)[..len]) }
                .ok()?;
            state.block_base = base;
            state.block_len = len as u32;
        }
    }
    // Both `addr` and the block's base are 8-aligned, so is the offset.
    let off = core::hint::black_box((addr - state.block_base) as usize) & (FRAME_BLOCK - 8);
    if off > LAST as usize {
        return None;
    }
    // SAFETY: `off + FRAME_READ_LEN <= FRAME_BLOCK`; the copy is plain data.
    let words = unsafe {
        &*block
            .as_ptr()
            .add(off / 8)
            .cast::<[u64; FRAME_READ_WORDS]>()
    };
    FrameFields::parse(words, &state.info.py)
}

/// What the walker needs of a code object, read once per sample.
struct CodeInfo {
    checksum: u32,
    /// `ob_size`.
    units: i64,
    /// An interpreter shim (3.13+'s `__init__` cleanup): its frames are skipped.
    shim: bool,
}

/// Checksum, size and shim flag of the code object at `code`, read once per
/// sample.
#[inline(always)]
fn code_info(code: u64, state: &mut WalkState) -> Option<CodeInfo> {
    let i = core::hint::black_box((code >> 4) as usize) & (CODE_CACHE_SLOTS - 1);
    let seq = state.seq;
    if state.cache[i].seq == seq && state.cache[i].addr == code {
        let slot = &state.cache[i];
        return Some(CodeInfo {
            checksum: slot.checksum,
            units: i64::from(slot.units),
            shim: slot.shim != 0,
        });
    }
    // SAFETY: bpf_probe_read_user never faults.
    unsafe {
        bpf_probe_read_user_buf(
            (code + CODE_READ_START) as *const u8,
            bytes_of(&mut state.code_hdr),
        )
    }
    .ok()?;
    let py = &state.info.py;
    let units = code_size_units(&state.code_hdr);
    let checksum = code_checksum(&state.code_hdr, &py.checksum_masks);
    let shim = code_flags(&state.code_hdr, py) & py.shim_flags != 0;
    if !shim {
        let key = SeenKey {
            code,
            tgid: state.tgid,
            generation: state.info.generation,
        };
        // SAFETY: the value is a plain u32, read at once.
        if unsafe { SEEN_CODE.get(&key) }.copied() != Some(checksum) {
            state.novel = 1;
            let _ = SEEN_CODE.insert(&key, &checksum, 0);
        }
    }
    let slot = &mut state.cache[i];
    slot.addr = code;
    slot.checksum = checksum;
    // Truncated, not clamped (a clamp is two more verifier paths per frame):
    // a real code object has far fewer than 2^31 units, and any value only
    // bounds the instruction index, which userspace clamps again.
    slot.units = units as i32;
    slot.seq = seq;
    slot.shim = u32::from(shim);
    Some(CodeInfo {
        checksum,
        units,
        shim,
    })
}

#[inline(always)]
fn walk_one(buf: &mut SampleBuf, state: &mut WalkState, block: &mut Block) -> Step {
    let addr = state.frame;
    if addr == 0 {
        return Step::Done;
    }
    let n = buf.header.nframes;
    if n >= state.max_depth {
        return Step::Truncated;
    }
    // A chain that loops back would be walked to the depth bound and shown
    // as a deep stack: it ends as a failed walk instead.
    if state.cycle.step(addr) {
        return Step::Failed(ReadStep::Cycle);
    }
    // Frames are 8-aligned: anything else is not a frame pointer.
    if addr & 7 != 0 {
        return Step::Failed(ReadStep::BadFrame);
    }
    let Some(frame) = read_frame(addr, state, block) else {
        return Step::Failed(ReadStep::Frame);
    };
    let kind = frame.kind(addr, &state.info.py);
    if kind == FrameKind::Bad {
        return Step::Failed(ReadStep::BadFrame);
    }
    state.frame = frame.previous;
    // Interpreter boundaries and shims are not Python frames: skipped. A
    // boundary starts an eval-loop activation: marked where native stacks
    // are merged with the Python frames.
    if kind == FrameKind::Boundary {
        if user_stack_bytes() != 0 {
            return push(buf, state, entry_mark(addr));
        }
        return Step::Next;
    }
    let Some(code) = code_info(frame.code, state) else {
        return Step::Failed(ReadStep::Code);
    };
    if code.shim {
        return Step::Next;
    }
    let instr = instr_index(frame.instr, frame.code, code.units, &state.info.py);
    let step = push(
        buf,
        state,
        RawFrame {
            code: frame.code,
            instr,
            checksum: code.checksum,
        },
    );
    // 3.11: the first frame of its activation (no boundary frame follows).
    if frame.entry && user_stack_bytes() != 0 && matches!(step, Step::Next) {
        return push(buf, state, entry_mark(0));
    }
    step
}

/// The mark after the first frame of an eval-loop activation.
#[inline(always)]
fn entry_mark(boundary: u64) -> RawFrame {
    RawFrame {
        code: boundary,
        instr: ENTRY_MARK_INSTR,
        checksum: 0,
    }
}

/// Appends `f` to the record, unless the stack is at its depth bound.
#[inline(always)]
fn push(buf: &mut SampleBuf, state: &WalkState, f: RawFrame) -> Step {
    let n = buf.header.nframes;
    if n >= state.max_depth {
        return Step::Truncated;
    }
    // The masks through black_box keep LLVM from dropping them: the
    // verifier needs to see the store bounded. Frames follow the kernel
    // stack's slots.
    let slot = (core::hint::black_box(state.kslots as usize) & (KSTACK_SLOTS_MAX - 1))
        + (core::hint::black_box(n as usize) & (MAX_FRAMES - 1));
    buf.frames[slot] = f;
    buf.header.nframes = n + 1;
    Step::Next
}

/// Where the body may end at most: the user stack copy starts there.
const BODY_END_MAX: usize = HEADER_LEN + (KSTACK_SLOTS_MAX + MAX_FRAMES) * RAW_FRAME_LEN;

/// Copies up to `want` bytes of the thread's user stack from its `sp` to
/// offset `off` of the record; returns the bytes copied (flagged
/// `FLAG_USER_STACK`). A copy that would run past the stack's mapping
/// fails whole, so shorter ones are tried (a quarter each time).
#[inline(always)]
fn copy_user_stack(buf: &mut SampleBuf, off: usize, want: usize) -> usize {
    let sp = buf.header.user_sp;
    let off = core::hint::black_box(off) & (2 * BODY_END_MAX.next_power_of_two() - 1);
    if off > BODY_END_MAX {
        return 0;
    }
    let base = (buf as *mut SampleBuf).cast::<u8>();
    let mut size = want;
    for _ in 0..4 {
        let s = core::hint::black_box(size) & (2 * USER_STACK_MAX - 1);
        if !(USER_STACK_MIN..=USER_STACK_MAX).contains(&s) {
            return 0;
        }
        // SAFETY: `off + s` is within the record (`user_stack` follows the
        // frames); bpf_probe_read_user never faults.
        let r = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                base.add(off).cast(),
                s as u32,
                sp as *const aya_ebpf::cty::c_void,
            )
        };
        if r == 0 {
            buf.header.flags |= FLAG_USER_STACK;
            return s;
        }
        size /= 4;
    }
    0
}

/// Sends the sample. Waking the reader (an irq_work and a context switch)
/// costs more than the walk itself, so most samples are only queued and the
/// reader drains them in batches on a timer. A sample wakes it at once when
/// it holds a code object userspace has not seen: that object may be freed
/// soon (a finished import, an exiting process) and must be read while it
/// exists. A ring filling up wakes it too.
#[inline(always)]
fn emit(lane: Lane, buf: &mut SampleBuf, kslots: u32, novel: bool) {
    let mut n = buf.header.nframes as usize;
    if n > MAX_FRAMES {
        n = MAX_FRAMES;
    }
    let k = kslots as usize & (KSTACK_SLOTS_MAX - 1);
    let mut len = HEADER_LEN + (k + n) * RAW_FRAME_LEN;
    let want = user_stack_bytes();
    if want != 0 && buf.header.flags & FLAG_USER_REGS != 0 {
        len += copy_user_stack(buf, len, want);
    }
    // SAFETY: `len` never exceeds the size of `SampleBuf`.
    let bytes = unsafe { core::slice::from_raw_parts((buf as *const SampleBuf).cast::<u8>(), len) };
    let limit = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    let wake = novel || limit == 0 || EVENTS.query(BPF_RB_AVAIL_DATA) >= limit;
    let flags = if wake {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    match EVENTS.output::<[u8]>(bytes, flags) {
        Ok(()) => {
            count_lane(lane, Counter::Sampled);
            if wake {
                count_lane(lane, Counter::Wakeups);
            }
        }
        Err(_) => count_lane(lane, Counter::RingBufFull),
    }
}

/// `TASK_DEAD` (`include/linux/sched.h`): the switch-out of an exiting
/// thread, which never switches back in.
const TASK_DEAD: u64 = 0x80;

/// A thread leaves the CPU. At this tracepoint `current` is still that
/// thread (`prev`). For a thread of a profiled process only, the time and
/// whether it is still runnable are kept until it switches back in; any
/// other thread costs one map lookup.
#[btf_tracepoint(function = "sched_switch")]
pub fn on_switch_out(ctx: BtfTracePointContext) -> u32 {
    // sched_switch(bool preempt, prev, next, unsigned int prev_state).
    let prev_state = ctx.arg::<u64>(3) & 0xffff_ffff;
    if prev_state & TASK_DEAD != 0 {
        return 0;
    }
    let prev: *mut task_struct = ctx.arg(1);
    // A thread timed before has its slot; any other costs one lookup of
    // its process.
    // SAFETY: `prev` is the tracepoint's trusted task pointer.
    let mut slot = unsafe { OFF_CPU.get(prev) };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if slot.is_null() {
        // SAFETY: only tested for presence.
        if unsafe { PROCS.get(&tgid) }.is_none() {
            return 0;
        }
        // SAFETY: as above.
        slot = unsafe { OFF_CPU.get_or_create(prev) };
        if slot.is_null() {
            count_off(OffCpuCounter::MapFull, 1);
            return 0;
        }
    }
    let preempt: u64 = ctx.arg(0);
    // SAFETY: the slot is this task's, and the task is switching out on
    // this CPU: nothing else touches it now.
    unsafe {
        *slot = OffCpuStart {
            start_ns: bpf_ktime_get_ns(),
            tgid,
            // Preempted, or yielding: it stays on the run queue.
            preempted: u32::from(preempt & 1 != 0 || prev_state == 0),
        }
    };
    count_off(OffCpuCounter::SwitchOuts, 1);
    0
}

/// The end of `__schedule()` (the `sched_exit_tp` tracepoint, Linux 6.16+):
/// it runs in the context of the thread now on the CPU, right after it was
/// switched in: its memory, its saved user registers, and its kernel stack
/// still where it blocked. So this is where an off-CPU interval ends and its
/// stacks are read. An interval of `d` ns is walked with probability
/// `min(1, d / T)` and then weighs `max(d, T)`: the sum of weights estimates
/// the off-CPU time without bias (Horvitz-Thompson), at no more than about
/// one walk per `T` of a thread's off-CPU time.
#[btf_tracepoint(function = "sched_exit_tp")]
pub fn on_switch_in(ctx: BtfTracePointContext) -> u32 {
    // sched_exit_tp(bool is_switch): `__schedule()` also returns without a
    // switch (several times per switch on an idle-polling host): nothing
    // ended then, and no map lookup is spent on it.
    let is_switch: u64 = ctx.arg(0);
    if is_switch & 1 == 0 {
        return 0;
    }
    // SAFETY: the current task, as a trusted pointer.
    let task = unsafe { bpf_get_current_task_btf() } as *mut task_struct;
    // SAFETY: as above.
    let slot = unsafe { OFF_CPU.get(task) };
    if slot.is_null() {
        return 0;
    }
    // SAFETY: this task's slot; the task runs here, nothing else touches it.
    let start = unsafe { *slot };
    if start.start_ns == 0 {
        return 0;
    }
    unsafe { (*slot).start_ns = 0 };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let now = unsafe { bpf_ktime_get_ns() };
    let d = now.saturating_sub(start.start_ns);
    count_off(OffCpuCounter::Intervals, 1);
    count_off(OffCpuCounter::IntervalNs, d);
    let tgid = (pid_tgid >> 32) as u32;
    let t = unsafe { core::ptr::read_volatile(&OFF_CPU_PERIOD_NS) };
    // r is uniform on [0, T): P(r < d) = d / T for d < T.
    let r = (u64::from(unsafe { bpf_get_prandom_u32() }) * t) >> 32;
    if d < t && r >= d {
        return 0;
    }
    let weight = if d > t { d } else { t };
    count_off(OffCpuCounter::Chosen, 1);
    count_off(OffCpuCounter::WeightNs, weight);
    // SAFETY: plain data, copied out.
    let info = match unsafe { PROCS.get(&tgid) } {
        Some(i) if start.tgid == tgid => *i,
        _ => {
            // No longer profiled (or it exec'd): its switch-outs go back
            // to the process lookup, which stops timing it.
            // SAFETY: as above.
            unsafe { OFF_CPU.delete(task) };
            count_off(OffCpuCounter::Gone, 1);
            return 0;
        }
    };
    let Some((buf, state)) = begin(OFF_LANE, tgid, tid, &info, KIND_OFF_CPU, weight) else {
        return 0;
    };
    if start.preempted != 0 {
        buf.header.flags |= FLAG_PREEMPTED;
    }
    task_regs(OFF_LANE, &mut buf.header);
    let skip = unsafe { core::ptr::read_volatile(&OFF_CPU_KSTACK_SKIP) };
    kernel_stack(OFF_LANE, &ctx, buf, state, skip);
    // SAFETY: tail_call only returns on failure.
    unsafe { OFF_WALKER.tail_call(&ctx, WALK_SLOT) };
    count_lane(OFF_LANE, Counter::TailCallFailed);
    0
}

/// Exec and exit of processes, for the daemon's discovery.
#[map]
static PROC_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 16, 0);

#[inline(always)]
fn proc_event(kind: u32, pid: u32) {
    // A full buffer loses the event; the daemon's /proc rescan catches up.
    if PROC_EVENTS
        .output::<ProcEvent>(&ProcEvent { kind, pid }, 0)
        .is_err()
    {
        count(ProcCounter::EventsLost as u32);
    }
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn on_exec(_ctx: RawTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // The pid now runs another program: its old layout must not be used.
    let _ = PROCS.remove(&tgid);
    proc_event(profiler_common::PROC_EVENT_EXEC, tgid);
    0
}

/// Whether the exiting thread is the last of its group. `do_exit`
/// decrements `signal->live` before this tracepoint fires, so 0 means no
/// thread of the process is left. If it cannot be read, the leader's exit
/// stands for the process's (the rule before this check): a stale entry
/// would outlive the process until the next rescan, and be inherited by a
/// reused pid meanwhile.
#[inline(always)]
fn group_dead(leader: bool) -> bool {
    let sig_off = unsafe { core::ptr::read_volatile(&SIGNAL_OFFSET) };
    let live_off = unsafe { core::ptr::read_volatile(&LIVE_OFFSET) };
    if sig_off == 0 {
        count(ProcCounter::LiveUnreadable as u32);
        return leader;
    }
    // SAFETY: bpf_get_current_task returns the current task_struct; reads
    // through it are bpf_probe_read_kernel, which fail instead of faulting.
    let task = unsafe { bpf_get_current_task() };
    let signal: Result<u64, i32> =
        unsafe { bpf_probe_read_kernel((task + (sig_off & 0xffff)) as *const u64) };
    let live: Result<i32, i32> = match signal {
        Ok(s) if s != 0 => unsafe {
            bpf_probe_read_kernel((s + (live_off & 0xffff)) as *const i32)
        },
        _ => Err(0),
    };
    match live {
        Ok(n) => n <= 0,
        Err(_) => {
            count(ProcCounter::LiveUnreadable as u32);
            leader
        }
    }
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn on_exit(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // Only pids userspace tracks: a busy host's exits must not flood the
    // ring (the /proc rescan catches any other).
    // SAFETY: the values are only tested for presence.
    let tracked = unsafe { PROCS.get(&tgid).is_some() || WATCH.get(&tgid).is_some() };
    if !tracked || !group_dead(tgid == tid) {
        return 0;
    }
    // Forget it at once, so a reused pid never inherits this layout.
    let _ = PROCS.remove(&tgid);
    let _ = WATCH.remove(&tgid);
    proc_event(profiler_common::PROC_EVENT_EXIT, tgid);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
