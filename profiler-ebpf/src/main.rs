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
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_buf,
    },
    macros::{map, perf_event, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{PerfEventContext, RawTracePointContext},
};
use profiler_common::{
    code_checksum, code_flags, code_size_units, instr_index, Counter, CycleCheck, FrameFields,
    FrameKind, ProcCounter, ProcEvent, ProcInfo, RawFrame, ReadStep, SampleBuf, SeenKey, TlsKind,
    WalkState, CODE_CACHE_SLOTS, CODE_READ_START, COUNTERS_LEN, FLAG_READ_ERROR, FLAG_TRUNCATED,
    FRAMES_PER_PROG, FRAME_BLOCK, FRAME_BLOCK_WORDS, FRAME_READ_LEN, FRAME_READ_WORDS, HEADER_LEN,
    MAX_FRAMES, NO_CFRAME, RAW_FRAME_LEN, READ_ERROR_BASE, SEEN_CODE_ENTRIES, WATCH_ENTRIES,
};

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

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

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

const WALK_SLOT: u32 = 0;

// `bpf_ringbuf_output` and `bpf_ringbuf_query` flags (uapi/linux/bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

#[inline(always)]
fn count(c: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(c) {
        // SAFETY: a per-CPU slot; perf_event programs do not nest on a CPU,
        // and the tracepoint programs' slots are theirs alone.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn count_read_error(step: ReadStep) {
    count(READ_ERROR_BASE + step as u32);
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
    match start_walk(tgid, tid, &info) {
        Ok(true) => {}
        Ok(false) => {
            count(Counter::NoThreadState as u32);
            return 0;
        }
        Err(step) => {
            count(Counter::ReadFailed as u32);
            count_read_error(step);
            return 0;
        }
    }
    // SAFETY: tail_call only returns on failure.
    unsafe { WALKER.tail_call(&ctx, WALK_SLOT) };
    count(Counter::TailCallFailed as u32);
    0
}

/// Finds the leaf frame and fills the per-CPU walk state. `Ok(false)`: the
/// thread has no Python state or no frame (not yet started, finalising).
#[inline(always)]
fn start_walk(tgid: u32, tid: u32, info: &ProcInfo) -> Result<bool, ReadStep> {
    let off = unsafe { core::ptr::read_volatile(&FSBASE_OFFSET) };
    // SAFETY: bpf_get_current_task returns the current task_struct; the read
    // is bounded by the kernel helper.
    let task = unsafe { bpf_get_current_task() };
    let fsbase: u64 = unsafe { bpf_probe_read_kernel((task + (off & 0xffff)) as *const u64) }
        .map_err(|_| ReadStep::FsBase)?;
    if fsbase == 0 {
        return Ok(false);
    }
    // A thread in its last moments (do_exit after exit_mm) has left the
    // address space: no user memory to read, and no Python state left.
    let mm_off = unsafe { core::ptr::read_volatile(&MM_OFFSET) };
    if mm_off != 0 {
        // SAFETY: as above.
        let mm: u64 = unsafe { bpf_probe_read_kernel((task + (mm_off & 0xffff)) as *const u64) }
            .map_err(|_| ReadStep::FsBase)?;
        if mm == 0 {
            return Ok(false);
        }
    }
    let tstate = thread_state(fsbase, info).map_err(|_| ReadStep::Tls)?;
    if tstate == 0 {
        return Ok(false);
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
        return Ok(false);
    }
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let buf = SCRATCH.get_ptr_mut(cpu).ok_or(ReadStep::FsBase)?;
    let state = STATE.get_ptr_mut(0).ok_or(ReadStep::FsBase)?;
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
        let s = &mut *state;
        s.frame = frame;
        s.info = *info;
        s.seq = s.seq.wrapping_add(1);
        s.block_len = 0;
        s.novel = 0;
        s.tgid = tgid;
        s.cycle = CycleCheck::new();
        let max = core::ptr::read_volatile(&MAX_DEPTH);
        s.max_depth = if max == 0 || max > MAX_FRAMES as u32 {
            MAX_FRAMES as u32
        } else {
            max
        };
    }
    Ok(true)
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
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let (Some(buf), Some(state), Some(block)) = (
        SCRATCH.get_ptr_mut(cpu),
        STATE.get_ptr_mut(0),
        BLOCK.get_ptr_mut(0),
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
            unsafe { WALKER.tail_call(&ctx, WALK_SLOT) };
            count(Counter::TailCallFailed as u32);
            buf.header.flags |= FLAG_TRUNCATED;
        }
        Step::Done => {}
        Step::Truncated => {
            buf.header.flags |= FLAG_TRUNCATED;
            count(Counter::Truncated as u32);
        }
        Step::Failed(step) => {
            buf.header.flags |= FLAG_READ_ERROR;
            buf.header.error_step = step as u32;
            count(Counter::ReadFailed as u32);
            count_read_error(step);
        }
    }
    emit(buf, state.novel != 0);
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
    // Interpreter boundaries and shims are not Python frames: skipped.
    if kind == FrameKind::Boundary {
        return Step::Next;
    }
    let Some(code) = code_info(frame.code, state) else {
        return Step::Failed(ReadStep::Code);
    };
    if code.shim {
        return Step::Next;
    }
    let instr = instr_index(frame.instr, frame.code, code.units, &state.info.py);
    // The mask through black_box keeps LLVM from dropping it: the verifier
    // needs to see the store bounded.
    let slot = core::hint::black_box(n as usize) & (MAX_FRAMES - 1);
    buf.frames[slot] = RawFrame {
        code: frame.code,
        instr,
        checksum: code.checksum,
    };
    buf.header.nframes = n + 1;
    Step::Next
}

/// Sends the sample. Waking the reader (an irq_work and a context switch)
/// costs more than the walk itself, so most samples are only queued and the
/// reader drains them in batches on a timer. A sample wakes it at once when
/// it holds a code object userspace has not seen: that object may be freed
/// soon (a finished import, an exiting process) and must be read while it
/// exists. A ring filling up wakes it too.
#[inline(always)]
fn emit(buf: &SampleBuf, novel: bool) {
    let mut n = buf.header.nframes as usize;
    if n > MAX_FRAMES {
        n = MAX_FRAMES;
    }
    let len = HEADER_LEN + n * RAW_FRAME_LEN;
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
            count(Counter::Sampled as u32);
            if wake {
                count(Counter::Wakeups as u32);
            }
        }
        Err(_) => count(Counter::RingBufFull as u32),
    }
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
