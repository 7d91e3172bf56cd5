//! Decoding the sampler's ring-buffer records.
use aya::maps::{MapData, RingBuf};
use profiler_common::{
    ProcEvent, RawFrame, ReadStep, SampleHeader, FLAG_READ_ERROR, FLAG_TRUNCATED, HEADER_LEN,
    MAX_FRAMES, RAW_FRAME_LEN,
};

/// One stack as BPF saw it: frames leaf first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSample {
    pub pid: u32,
    pub tid: u32,
    pub cpu: u32,
    pub ktime_ns: u64,
    pub truncated: bool,
    /// Where the walk stopped early, if it did.
    pub read_error: Option<ReadStep>,
    pub frames: Vec<RawFrame>,
}

#[cfg(test)]
impl RawSample {
    /// A whole one-frame stack of `pid`'s main thread, at instruction 0.
    pub fn one_frame(pid: u32, code: u64, checksum: u32) -> RawSample {
        RawSample {
            pid,
            tid: pid,
            cpu: 0,
            ktime_ns: 0,
            truncated: false,
            read_error: None,
            frames: vec![RawFrame {
                code,
                instr: 0,
                checksum,
            }],
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring-buffer record of {0} bytes is shorter than a sample header")]
    Short(usize),
    #[error("record claims {claimed} frames but carries {len} bytes")]
    Length { claimed: u32, len: usize },
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

/// Decodes one record. The layout is [`SampleHeader`] then `nframes` [`RawFrame`]s.
pub fn decode(bytes: &[u8]) -> Result<RawSample, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Short(bytes.len()));
    }
    let h = SampleHeader {
        ktime_ns: u64_at(bytes, 0),
        pid: u32_at(bytes, 8),
        tid: u32_at(bytes, 12),
        cpu: u32_at(bytes, 16),
        nframes: u32_at(bytes, 20),
        flags: u32_at(bytes, 24),
        error_step: u32_at(bytes, 28),
    };
    let n = h.nframes as usize;
    if n > MAX_FRAMES || bytes.len() != HEADER_LEN + n * RAW_FRAME_LEN {
        return Err(DecodeError::Length {
            claimed: h.nframes,
            len: bytes.len(),
        });
    }
    let frames = bytes[HEADER_LEN..]
        .chunks_exact(RAW_FRAME_LEN)
        .map(|c| RawFrame {
            code: u64_at(c, 0),
            instr: u32_at(c, 8) as i32,
            checksum: u32_at(c, 12),
        })
        .collect();
    Ok(RawSample {
        pid: h.pid,
        tid: h.tid,
        cpu: h.cpu,
        ktime_ns: h.ktime_ns,
        truncated: h.flags & FLAG_TRUNCATED != 0,
        read_error: if h.flags & FLAG_READ_ERROR != 0 {
            Some(ReadStep::from_u32(h.error_step).unwrap_or(ReadStep::BadFrame))
        } else {
            None
        },
        frames,
    })
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

    fn record(nframes: u32, flags: u32, frames: &[RawFrame]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&7u64.to_le_bytes());
        for x in [42u32, 43, 1, nframes, flags, ReadStep::Code as u32] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        for f in frames {
            v.extend_from_slice(&f.code.to_le_bytes());
            v.extend_from_slice(&f.instr.to_le_bytes());
            v.extend_from_slice(&f.checksum.to_le_bytes());
        }
        v
    }

    #[test]
    fn round_trip() {
        let frames = [
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
        ];
        let s = decode(&record(2, FLAG_TRUNCATED | FLAG_READ_ERROR, &frames)).unwrap();
        assert_eq!(s.pid, 42);
        assert_eq!(s.tid, 43);
        assert!(s.truncated);
        assert_eq!(s.read_error, Some(ReadStep::Code));
        assert_eq!(s.frames, frames);
    }

    #[test]
    fn rejects_inconsistent_lengths() {
        assert_eq!(decode(&[0u8; 4]), Err(DecodeError::Short(4)));
        let r = record(3, 0, &[RawFrame::default()]);
        assert!(matches!(
            decode(&r),
            Err(DecodeError::Length { claimed: 3, .. })
        ));
        let r = record(u32::MAX, 0, &[]);
        assert!(decode(&r).is_err());
    }
}
