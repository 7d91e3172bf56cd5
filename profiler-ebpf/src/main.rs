//! The sampler: a perf_event program on the CPU clock that, for profiled
//! processes only, finds the interrupted thread's `PyThreadState` through
//! thread-specific storage and walks its `_PyInterpreterFrame` chain from the
//! leaf, then ships the raw frames through a ring buffer.
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
        bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::{map, perf_event, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{PerfEventContext, RawTracePointContext},
};
use profiler_common::{
    code_checksum, code_size_units, Counter, Frame311, ProcEvent, ProcInfo, RawFrame, ReadStep,
    SampleBuf, TlsKind, WalkState, CODE_READ_LEN, CODE_READ_START, COUNTERS_LEN, FLAG_READ_ERROR,
    FLAG_TRUNCATED, FRAMES_PER_PROG, HEADER_LEN, MAX_FRAMES, MAX_FRAME_OWNER, RAW_FRAME_LEN,
    READ_ERROR_BASE,
};

/// Offset of `task_struct.thread.fsbase`, from the kernel's BTF (set by
/// userspace before load).
#[no_mangle]
static FSBASE_OFFSET: u64 = 0;

/// Processes to profile, keyed by tgid as the root PID namespace sees it.
#[map]
static PROCS: HashMap<u32, ProcInfo> = HashMap::with_max_entries(8192, 0);

/// One scratch record per possible CPU (too big for a per-CPU value); userspace
/// sets `max_entries` to the number of possible CPUs.
#[map]
static SCRATCH: Array<SampleBuf> = Array::with_max_entries(1, 0);

#[map]
static STATE: PerCpuArray<WalkState> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// Userspace sets the size (bytes, a power of two multiple of the page size).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Slot 0 holds `walk`, so it can chain to itself.
#[map]
static WALKER: ProgramArray = ProgramArray::with_max_entries(1, 0);

const WALK_SLOT: u32 = 0;

#[inline(always)]
fn count(c: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(c) {
        // SAFETY: a per-CPU slot; perf_event programs do not nest on a CPU.
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

/// The thread's `PyThreadState*` from its FS base, per the libc's TSD layout.
#[inline(always)]
fn thread_state(fsbase: u64, info: &ProcInfo) -> Result<u64, i32> {
    let tls = &info.tls;
    let key = u64::from(tls.key);
    if tls.kind == TlsKind::Musl as u32 {
        let tsd = read_u64(fsbase + u64::from(tls.first_block))?;
        return read_u64(tsd + key * 8);
    }
    if key < 32 {
        read_u64(fsbase + u64::from(tls.first_block) + key * 16 + 8)
    } else {
        let blk = read_u64(fsbase + u64::from(tls.second_level) + (key >> 5) * 8)?;
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
    let tstate = thread_state(fsbase, info).map_err(|_| ReadStep::Tls)?;
    if tstate == 0 {
        return Ok(false);
    }
    // The TSD slot must point back at this thread: `thread_id` is its
    // pthread_t, which is its FS base on glibc and musl.
    let thread_id = read_u64(tstate + u64::from(info.py.tstate_thread_id))
        .map_err(|_| ReadStep::ThreadState)?;
    if thread_id != fsbase {
        return Err(ReadStep::ThreadState);
    }
    let cframe =
        read_u64(tstate + u64::from(info.py.tstate_cframe)).map_err(|_| ReadStep::ThreadState)?;
    if cframe == 0 {
        return Ok(false);
    }
    let frame =
        read_u64(cframe + u64::from(info.py.cframe_current_frame)).map_err(|_| ReadStep::CFrame)?;
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
    let (Some(buf), Some(state)) = (SCRATCH.get_ptr_mut(cpu), STATE.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: map values owned by this CPU for the duration of the sample.
    let (buf, state) = unsafe { (&mut *buf, &mut *state) };
    let mut end = Step::Next;
    for _ in 0..FRAMES_PER_PROG {
        end = walk_one(buf, state);
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
    emit(buf);
    0
}

#[inline(always)]
fn walk_one(buf: &mut SampleBuf, state: &mut WalkState) -> Step {
    let addr = state.frame;
    if addr == 0 {
        return Step::Done;
    }
    let n = buf.header.nframes;
    if n >= state.max_depth {
        return Step::Truncated;
    }
    // SAFETY: bpf_probe_read_user never faults.
    let Ok(frame) = (unsafe { bpf_probe_read_user(addr as *const Frame311) }) else {
        return Step::Failed(ReadStep::Frame);
    };
    if frame.owner > MAX_FRAME_OWNER || frame.f_code == 0 || frame.previous == addr {
        return Step::Failed(ReadStep::BadFrame);
    }
    let Ok(hdr) = (unsafe {
        bpf_probe_read_user((frame.f_code + CODE_READ_START) as *const [u8; CODE_READ_LEN])
    }) else {
        return Step::Failed(ReadStep::Code);
    };
    let units = code_size_units(&hdr);
    let base = frame.f_code + u64::from(state.info.py.code_adaptive);
    let instr = if frame.prev_instr < base || units <= 0 {
        -1
    } else {
        let idx = ((frame.prev_instr - base) >> 1) as i64;
        if idx >= units {
            units - 1
        } else {
            idx
        }
    };
    // The mask through black_box keeps LLVM from dropping it: the verifier
    // needs to see the store bounded.
    let slot = core::hint::black_box(n as usize) & (MAX_FRAMES - 1);
    buf.frames[slot] = RawFrame {
        code: frame.f_code,
        instr: instr as i32,
        checksum: code_checksum(&hdr),
    };
    buf.header.nframes = n + 1;
    state.frame = frame.previous;
    Step::Next
}

#[inline(always)]
fn emit(buf: &SampleBuf) {
    let mut n = buf.header.nframes as usize;
    if n > MAX_FRAMES {
        n = MAX_FRAMES;
    }
    let len = HEADER_LEN + n * RAW_FRAME_LEN;
    // SAFETY: `len` never exceeds the size of `SampleBuf`.
    let bytes = unsafe { core::slice::from_raw_parts((buf as *const SampleBuf).cast::<u8>(), len) };
    match EVENTS.output::<[u8]>(bytes, 0) {
        Ok(()) => count(Counter::Sampled as u32),
        Err(_) => count(Counter::RingBufFull as u32),
    }
}

/// Exec and exit of processes, for the daemon's discovery.
#[map]
static PROC_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 16, 0);

#[inline(always)]
fn proc_event(kind: u32, pid: u32) {
    // A full buffer loses the event; the daemon's /proc rescan catches up.
    let _ = PROC_EVENTS.output::<ProcEvent>(&ProcEvent { kind, pid }, 0);
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn on_exec(_ctx: RawTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // The pid now runs another program: its old layout must not be used.
    let _ = PROCS.remove(&tgid);
    proc_event(profiler_common::PROC_EVENT_EXEC, tgid);
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn on_exit(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // Threads other than the leader exiting do not end the process.
    if tgid == tid {
        // Forget it at once, so a reused pid never inherits this layout.
        let _ = PROCS.remove(&tgid);
        proc_event(profiler_common::PROC_EVENT_EXIT, tgid);
    }
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
