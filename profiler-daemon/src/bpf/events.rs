//! Decoding the sampler's ring-buffer records.
use aya::maps::{MapData, RingBuf};
use profiler_common::{
    kstack_bytes, ProcEvent, RawFrame, ReadStep, SampleHeader, FLAG_IN_KERNEL, FLAG_KSTACK_ERROR,
    FLAG_KSTACK_TRUNCATED, FLAG_PREEMPTED, FLAG_READ_ERROR, FLAG_TRUNCATED, FLAG_USER_REGS,
    FLAG_USER_STACK, HEADER_LEN, KIND_CPU, KIND_OFF_CPU, KSTACK_MAX, MAX_FRAMES, RAW_FRAME_LEN,
    USER_STACK_MAX, USER_STACK_MIN,
};

/// What a sample measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SampleKind {
    /// The thread was on a CPU (the perf clock interrupted it).
    #[default]
    Cpu,
    /// The thread was off CPU for an interval that has just ended.
    OffCpu,
}

/// A thread's user-mode registers at the sample: where it was interrupted,
/// or, for a thread in the kernel, where it entered it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// What a thread in the kernel entered it for: `orig_ax` and `di` of its
/// saved registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KernelEntry {
    /// The system call number; negative for an interrupt or exception.
    pub nr: i64,
    /// The system call's first argument.
    pub arg0: u64,
}

/// One stack as BPF saw it: frames leaf first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawSample {
    pub pid: u32,
    pub tid: u32,
    pub cpu: u32,
    pub ktime_ns: u64,
    pub kind: SampleKind,
    /// Nanoseconds this sample stands for.
    pub weight_ns: u64,
    /// Off-CPU: the thread was runnable all along (waiting for a CPU).
    pub preempted: bool,
    pub truncated: bool,
    /// Where the walk stopped early, if it did.
    pub read_error: Option<ReadStep>,
    pub frames: Vec<RawFrame>,
    /// Kernel return addresses, innermost first (empty when the sample has
    /// no kernel stack).
    pub kernel: Vec<u64>,
    /// The kernel stack was deeper than [`KSTACK_MAX`] and is cut.
    pub kernel_truncated: bool,
    /// The kernel stack was wanted but could not be read.
    pub kernel_error: bool,
    pub regs: Option<UserRegs>,
    /// Set when the thread was in the kernel.
    pub entry: Option<KernelEntry>,
    /// The thread's user stack from `regs.sp` up, when copied.
    pub user_stack: Option<Vec<u8>>,
    /// That stack unwound (see `NativeService::unwind_samples`).
    pub native: Option<crate::native::service::NativeWalk>,
}

#[cfg(test)]
impl RawSample {
    /// A whole one-frame stack of `pid`'s main thread, at instruction 0.
    pub fn one_frame(pid: u32, code: u64, checksum: u32) -> RawSample {
        RawSample {
            pid,
            tid: pid,
            frames: vec![RawFrame {
                code,
                instr: 0,
                checksum,
            }],
            ..RawSample::default()
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring-buffer record of {0} bytes is shorter than a sample header")]
    Short(usize),
    #[error(
        "record claims {claimed} frames and {kernel} kernel addresses but carries {len} bytes"
    )]
    Length {
        claimed: u32,
        kernel: u32,
        len: usize,
    },
    #[error("record of unknown kind {0}")]
    Kind(u32),
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// The header at the start of `bytes` (at least [`HEADER_LEN`] long).
fn header(bytes: &[u8]) -> SampleHeader {
    SampleHeader {
        ktime_ns: u64_at(bytes, 0),
        pid: u32_at(bytes, 8),
        tid: u32_at(bytes, 12),
        cpu: u32_at(bytes, 16),
        nframes: u32_at(bytes, 20),
        flags: u32_at(bytes, 24),
        error_step: u32_at(bytes, 28),
        kind: u32_at(bytes, 32),
        nkernel: u32_at(bytes, 36),
        weight_ns: u64_at(bytes, 40),
        user_ip: u64_at(bytes, 48),
        user_sp: u64_at(bytes, 56),
        user_bp: u64_at(bytes, 64),
        syscall_nr: u64_at(bytes, 72),
        syscall_arg0: u64_at(bytes, 80),
    }
}

/// Decodes one record: a [`SampleHeader`], `nkernel` kernel addresses
/// (padded to 16 bytes), `nframes` [`RawFrame`]s, then with
/// [`FLAG_USER_STACK`] the user stack copy (between [`USER_STACK_MIN`] and
/// [`USER_STACK_MAX`] bytes).
pub fn decode(bytes: &[u8]) -> Result<RawSample, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Short(bytes.len()));
    }
    let h = header(bytes);
    let kind = match h.kind {
        KIND_CPU => SampleKind::Cpu,
        KIND_OFF_CPU => SampleKind::OffCpu,
        k => return Err(DecodeError::Kind(k)),
    };
    let (n, k) = (h.nframes as usize, h.nkernel as usize);
    let kbytes = kstack_bytes(k);
    let body_end = HEADER_LEN + kbytes + n * RAW_FRAME_LEN;
    let copied = bytes.len().saturating_sub(body_end);
    let has_stack = h.flags & FLAG_USER_STACK != 0 && h.flags & FLAG_USER_REGS != 0;
    let stack_fits = if has_stack {
        (USER_STACK_MIN..=USER_STACK_MAX).contains(&copied)
    } else {
        copied == 0
    };
    if n > MAX_FRAMES || k > KSTACK_MAX || bytes.len() < body_end || !stack_fits {
        return Err(DecodeError::Length {
            claimed: h.nframes,
            kernel: h.nkernel,
            len: bytes.len(),
        });
    }
    let body = &bytes[HEADER_LEN..];
    let mut kernel: Vec<u64> = body[..k * 8]
        .chunks_exact(8)
        .map(|c| u64_at(c, 0))
        .collect();
    // The unwinder can end a stack with a zero entry (no frame): not an
    // address. A zero anywhere else stays, and shows as 0x0.
    while kernel.last() == Some(&0) {
        kernel.pop();
    }
    let frames = body[kbytes..body_end - HEADER_LEN]
        .chunks_exact(RAW_FRAME_LEN)
        .map(|c| RawFrame {
            code: u64_at(c, 0),
            instr: u32_at(c, 8) as i32,
            checksum: u32_at(c, 12),
        })
        .collect();
    let flag = |f: u32| h.flags & f != 0;
    Ok(RawSample {
        pid: h.pid,
        tid: h.tid,
        cpu: h.cpu,
        ktime_ns: h.ktime_ns,
        kind,
        weight_ns: h.weight_ns,
        preempted: flag(FLAG_PREEMPTED),
        truncated: flag(FLAG_TRUNCATED),
        read_error: if flag(FLAG_READ_ERROR) {
            Some(ReadStep::from_u32(h.error_step).unwrap_or(ReadStep::BadFrame))
        } else {
            None
        },
        frames,
        kernel,
        kernel_truncated: flag(FLAG_KSTACK_TRUNCATED),
        kernel_error: flag(FLAG_KSTACK_ERROR),
        regs: flag(FLAG_USER_REGS).then_some(UserRegs {
            ip: h.user_ip,
            sp: h.user_sp,
            bp: h.user_bp,
        }),
        entry: flag(FLAG_IN_KERNEL).then_some(KernelEntry {
            nr: h.syscall_nr as i64,
            arg0: h.syscall_arg0,
        }),
        user_stack: has_stack.then(|| bytes[body_end..].to_vec()),
        native: None,
    })
}

/// A record's bytes (the layout [`decode`] reads), for tests and seeds.
#[cfg(test)]
pub fn encode(h: &SampleHeader, kernel: &[u64], frames: &[RawFrame]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&h.ktime_ns.to_le_bytes());
    for x in [
        h.pid,
        h.tid,
        h.cpu,
        h.nframes,
        h.flags,
        h.error_step,
        h.kind,
        h.nkernel,
    ] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    for x in [
        h.weight_ns,
        h.user_ip,
        h.user_sp,
        h.user_bp,
        h.syscall_nr,
        h.syscall_arg0,
    ] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    for a in kernel {
        v.extend_from_slice(&a.to_le_bytes());
    }
    if kernel.len() % 2 == 1 {
        v.extend_from_slice(&0u64.to_le_bytes());
    }
    for f in frames {
        v.extend_from_slice(&f.code.to_le_bytes());
        v.extend_from_slice(&f.instr.to_le_bytes());
        v.extend_from_slice(&f.checksum.to_le_bytes());
    }
    v
}

/// The process events (exec, exit) queued in `ring`, oldest first; records
/// too short to be one are skipped.
pub fn drain_proc_events(ring: &mut RingBuf<MapData>) -> Vec<ProcEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<ProcEvent>() {
            // SAFETY: ProcEvent is plain data and the length is checked.
            events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ProcEvent>()) });
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(nframes: u32, nkernel: u32, flags: u32) -> SampleHeader {
        SampleHeader {
            ktime_ns: 7,
            pid: 42,
            tid: 43,
            cpu: 1,
            nframes,
            flags,
            error_step: ReadStep::Code as u32,
            kind: KIND_OFF_CPU,
            nkernel,
            weight_ns: 1_500_000,
            user_ip: 0x7f00_0000_1234,
            user_sp: 0x7ffc_0000_0000,
            user_bp: 0x7ffc_0000_0100,
            syscall_nr: 202,
            syscall_arg0: 0x5555_0000_0040,
        }
    }

    fn frames() -> [RawFrame; 2] {
        [
            RawFrame {
                code: 0x1000,
                instr: -1,
                checksum: 9,
            },
            RawFrame {
                code: 0x2000,
                instr: 17,
                checksum: 10,
            },
        ]
    }

    /// A user stack copy follows the frames, whole, only where flagged.
    #[test]
    fn user_stack_copy() {
        let flags = FLAG_USER_REGS | FLAG_USER_STACK;
        let mut bytes = encode(&header(2, 1, flags), &[0xffff_ffff_8100_0000], &frames());
        let plain = bytes.len();
        let stack: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
        bytes.extend_from_slice(&stack);
        let s = decode(&bytes).unwrap();
        assert_eq!(s.user_stack.as_deref(), Some(&stack[..]));
        assert_eq!(s.frames, frames());
        // Too short, too long, missing, or there without the flag (or
        // without registers to start from): a bad record.
        let bad = |b: &[u8]| matches!(decode(b), Err(DecodeError::Length { .. }));
        assert!(bad(&bytes[..plain + USER_STACK_MIN - 1]));
        assert!(bad(&bytes[..plain]));
        let mut long = bytes.clone();
        long.resize(plain + USER_STACK_MAX + 1, 0);
        assert!(bad(&long));
        let mut unflagged = encode(&header(2, 1, FLAG_USER_REGS), &[1], &frames());
        unflagged.extend_from_slice(&stack);
        assert!(bad(&unflagged));
        let mut no_regs = encode(&header(2, 1, FLAG_USER_STACK), &[1], &frames());
        no_regs.extend_from_slice(&stack);
        assert!(bad(&no_regs));
    }

    #[test]
    fn round_trip() {
        let all = FLAG_TRUNCATED
            | FLAG_READ_ERROR
            | FLAG_PREEMPTED
            | FLAG_KSTACK_TRUNCATED
            | FLAG_USER_REGS
            | FLAG_IN_KERNEL;
        let kernel = [
            0xffff_ffff_8100_0000u64,
            0xffff_ffff_8100_0100,
            0xffff_ffff_8200_0000,
        ];
        let s = decode(&encode(&header(2, 3, all), &kernel, &frames())).unwrap();
        assert_eq!((s.pid, s.tid, s.cpu, s.ktime_ns), (42, 43, 1, 7));
        assert_eq!((s.kind, s.weight_ns), (SampleKind::OffCpu, 1_500_000));
        assert!(s.truncated && s.preempted && s.kernel_truncated && !s.kernel_error);
        assert_eq!(s.read_error, Some(ReadStep::Code));
        assert_eq!(s.frames, frames());
        assert_eq!(s.kernel, kernel);
        assert_eq!(
            s.regs,
            Some(UserRegs {
                ip: 0x7f00_0000_1234,
                sp: 0x7ffc_0000_0000,
                bp: 0x7ffc_0000_0100
            })
        );
        assert_eq!(
            s.entry,
            Some(KernelEntry {
                nr: 202,
                arg0: 0x5555_0000_0040
            })
        );
        // An even count has no pad; flags not set leave their fields out.
        let mut h = header(2, 2, 0);
        h.kind = KIND_CPU;
        let s = decode(&encode(&h, &kernel[..2], &frames())).unwrap();
        assert_eq!(s.kernel, kernel[..2]);
        // A zero at the root end is the unwinder's end, not a frame.
        let with_end = [kernel[0], 0, kernel[1], 0, 0];
        let h5 = SampleHeader { nkernel: 5, ..h };
        let s = decode(&encode(&h5, &with_end, &frames())).unwrap();
        assert_eq!(s.kernel, [kernel[0], 0, kernel[1]]);
        assert_eq!(
            (s.kind, s.regs, s.entry, s.preempted),
            (SampleKind::Cpu, None, None, false)
        );
        assert_eq!(s.frames, frames());
    }

    #[test]
    fn rejects_inconsistent_lengths() {
        assert_eq!(decode(&[0u8; 4]), Err(DecodeError::Short(4)));
        let r = encode(&header(3, 0, 0), &[], &[RawFrame::default()]);
        assert!(matches!(
            decode(&r),
            Err(DecodeError::Length { claimed: 3, .. })
        ));
        assert!(decode(&encode(&header(u32::MAX, 0, 0), &[], &[])).is_err());
        // The kernel stack's padding is part of the length.
        let mut r = encode(&header(0, 1, 0), &[1], &[]);
        assert!(decode(&r).is_ok());
        r.truncate(r.len() - 8);
        assert!(decode(&r).is_err());
        let too_deep = vec![1u64; KSTACK_MAX + 1];
        let h = header(0, too_deep.len() as u32, 0);
        assert!(decode(&encode(&h, &too_deep, &[])).is_err());
        let mut h = header(0, 0, 0);
        h.kind = 9;
        assert_eq!(decode(&encode(&h, &[], &[])), Err(DecodeError::Kind(9)));
    }
}
