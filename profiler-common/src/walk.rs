//! The walker's decisions on one frame, as pure functions of the words it
//! read and the process's [`PyLayout`]. The BPF walker calls them on what it
//! copied from the target; userspace tests call them on memory images, so
//! both sides decide every frame the same way.
//!
//! Everything is read as whole 8-byte words: frames and code objects are
//! 8-aligned, so each field is one load, where assembling it from bytes costs
//! the BPF walker some twenty instructions per field per frame.
use crate::layout::{PyLayout, CODE_READ_LEN, CODE_READ_WORDS, FRAME_READ_LEN};

/// Words of a frame read per frame.
pub const FRAME_READ_WORDS: usize = FRAME_READ_LEN / 8;

/// The fields of one `_PyInterpreterFrame` the walker uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameFields {
    /// The code object, tag bits cleared (0 if the field was 0).
    pub code: u64,
    pub previous: u64,
    /// Address of the current (3.13+) or last started (3.11, 3.12)
    /// instruction.
    pub instr: u64,
    pub owner: u8,
    /// 3.11: the frame's `is_entry` (always false where the layout has
    /// no such flag).
    pub entry: bool,
}

/// What the walker does with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A Python function's frame: recorded.
    Python,
    /// An interpreter boundary (the C-stack entry frame of 3.12+): skipped,
    /// the walk goes on to its `previous`.
    Boundary,
    /// Not a frame (garbage, or memory reused): the walk ends in an error.
    Bad,
}

/// The word at byte offset `off`, which must be 8-aligned.
#[inline(always)]
fn word_at<const N: usize>(words: &[u64; N], off: u8) -> Option<u64> {
    if off & 7 != 0 {
        return None;
    }
    // Indexed in words, through black_box: folded into a byte offset, the
    // verifier could not see that it stays inside the copy.
    words
        .get(core::hint::black_box(usize::from(off >> 3)))
        .copied()
}

/// The byte at byte offset `off` (words are little-endian, as on x86-64).
#[inline(always)]
fn byte_at<const N: usize>(words: &[u64; N], off: u8) -> Option<u8> {
    let w = words.get(core::hint::black_box(usize::from(off >> 3)))?;
    Some((w >> ((off & 7) * 8)) as u8)
}

/// The words of `bytes` (little-endian), for userspace callers that read
/// target memory into bytes.
pub fn words_of<const N: usize>(bytes: &[u8]) -> [u64; N] {
    let mut w = [0u64; N];
    for (dst, b) in w.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        *dst = u64::from_le_bytes(a);
    }
    w
}

impl FrameFields {
    /// The fields of the frame whose first [`FRAME_READ_LEN`] bytes are
    /// `words`; `None` only for a layout that [`PyLayout::check`] rejects.
    #[inline(always)]
    pub fn parse(words: &[u64; FRAME_READ_WORDS], l: &PyLayout) -> Option<FrameFields> {
        let code = word_at(words, l.frame_code)? & !u64::from(l.code_tag_bits);
        Some(FrameFields {
            code,
            previous: word_at(words, l.frame_previous)?,
            instr: word_at(words, l.frame_instr)?,
            owner: byte_at(words, l.frame_owner)?,
            // Out of the words read for NO_ENTRY_FLAG: false.
            entry: byte_at(words, l.frame_is_entry).is_some_and(|b| b != 0),
        })
    }

    /// What this frame, found at `addr`, is.
    #[inline(always)]
    pub fn kind(&self, addr: u64, l: &PyLayout) -> FrameKind {
        if self.owner > l.owner_max || self.previous == addr {
            FrameKind::Bad
        } else if self.owner >= l.owner_boundary {
            FrameKind::Boundary
        } else if self.code == 0 {
            FrameKind::Bad
        } else {
            FrameKind::Python
        }
    }
}

/// Cycle detection on the chain of frame addresses, for a chain that loops
/// back on itself (a corrupt or reused `previous`): Brent's algorithm (one
/// compare per frame against a checkpoint moved at power-of-two steps),
/// plus a compare with the leaf, which finds a loop back to the leaf at the
/// first repeat. A loop entered after `mu` frames, of `lambda` frames, is
/// found within `3 * (mu + lambda)` frames, long before the depth bound.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CycleCheck {
    /// The first frame of the walk (0: none yet).
    pub leaf: u64,
    /// A frame address reached earlier in this walk (0: none yet).
    pub saved: u64,
    /// Frames stepped through since `saved`.
    pub steps: u32,
    /// `steps` at which the checkpoint moves on.
    pub power: u32,
}

impl CycleCheck {
    /// A check for a new walk.
    pub const fn new() -> CycleCheck {
        CycleCheck {
            leaf: 0,
            saved: 0,
            steps: 0,
            power: 1,
        }
    }

    /// Notes that the walk reached the frame at `addr` (non-zero); true if
    /// it was reached before: the chain is a cycle, and the walk must end
    /// (every frame of it has been recorded at least once by then).
    #[inline(always)]
    pub fn step(&mut self, addr: u64) -> bool {
        if addr == self.saved || addr == self.leaf {
            return true;
        }
        if self.leaf == 0 {
            self.leaf = addr;
        }
        self.steps += 1;
        if self.steps >= self.power {
            self.saved = addr;
            self.steps = 0;
            // Saturates: past 2^31 frames the checkpoint stays put, which
            // still finds any cycle through it.
            self.power = self.power.saturating_mul(2);
        }
        false
    }
}

/// A small checksum of a code object's immutable header fields, computed by
/// BPF at sample time and again by userspace when symbolising, so that a code
/// object freed and replaced at the same address is never given the old name.
///
/// `hdr` is the [`CODE_READ_LEN`] bytes at `code + CODE_READ_START`
/// (`ob_size`, `co_consts`, `co_names`, `co_exceptiontable`, `co_flags` and
/// the counts up to `co_firstlineno` in every supported version); `masks`
/// clear the bits of fields the interpreter changes at run time.
#[inline(always)]
pub fn code_checksum(hdr: &[u64; CODE_READ_WORDS], masks: &[u64; CODE_READ_WORDS]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < CODE_READ_WORDS {
        h ^= hdr[i] & masks[i];
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
        i += 1;
    }
    (h ^ (h >> 32)) as u32
}

/// `ob_size`: the code object's length in code units (the walker's bound on
/// instruction indexes).
#[inline(always)]
pub fn code_size_units(hdr: &[u64; CODE_READ_WORDS]) -> i64 {
    hdr[0] as i64
}

/// `co_flags` of the code header, at `l.code_flags` (4-aligned).
#[inline(always)]
pub fn code_flags(hdr: &[u64; CODE_READ_WORDS], l: &PyLayout) -> u32 {
    match hdr.get(usize::from(l.code_flags >> 3)) {
        Some(w) => (w >> ((l.code_flags & 4) * 8)) as u32,
        None => 0,
    }
}

const _: () = assert!(CODE_READ_LEN == CODE_READ_WORDS * 8 && FRAME_READ_LEN.is_multiple_of(8));

/// The instruction index (in code units) of `instr` in the code object at
/// `code` of `units` code units: -1 before the first instruction (a frame
/// that has not started, in 3.11 and 3.12), clamped to the last unit.
#[inline(always)]
pub fn instr_index(instr: u64, code: u64, units: i64, l: &PyLayout) -> i32 {
    let base = code.wrapping_add(u64::from(l.code_adaptive));
    if instr < base || units <= 0 {
        return -1;
    }
    let idx = ((instr - base) >> 1) as i64;
    let idx = if idx >= units { units - 1 } else { idx };
    if idx > i64::from(i32::MAX) {
        i32::MAX
    } else {
        idx as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{NO_BOUNDARY_OWNER, NO_CFRAME};

    fn layout() -> PyLayout {
        PyLayout {
            tstate_thread_id: 152,
            tstate_frame: 72,
            cframe_frame: NO_CFRAME,
            code_adaptive: 208,
            frame_code: 0,
            frame_previous: 8,
            frame_instr: 56,
            frame_owner: 74,
            owner_boundary: 3,
            owner_max: 4,
            code_flags: 32,
            frame_is_entry: crate::layout::NO_ENTRY_FLAG,
            shim_flags: 0x0200_0000,
            code_tag_bits: 3,
            checksum_masks: [u64::MAX; CODE_READ_WORDS],
        }
    }

    fn frame(code: u64, previous: u64, instr: u64, owner: u8) -> [u64; FRAME_READ_WORDS] {
        let mut b = [0u8; FRAME_READ_LEN];
        b[0..8].copy_from_slice(&code.to_le_bytes());
        b[8..16].copy_from_slice(&previous.to_le_bytes());
        b[56..64].copy_from_slice(&instr.to_le_bytes());
        b[74] = owner;
        words_of(&b)
    }

    #[test]
    fn parses_and_untags() {
        let l = layout();
        let f = FrameFields::parse(&frame(0x1001, 0x2000, 0x1100, 1), &l).unwrap();
        assert_eq!(
            f,
            FrameFields {
                code: 0x1000,
                previous: 0x2000,
                instr: 0x1100,
                owner: 1,
                entry: false,
            }
        );
        assert_eq!(f.kind(0x3000, &l), FrameKind::Python);
    }

    /// 3.11's `is_entry` byte, where the layout has one.
    #[test]
    fn reads_the_entry_flag() {
        let mut l = layout();
        let mut words = frame(0x1000, 0x2000, 0x1100, 1);
        assert!(!FrameFields::parse(&words, &l).unwrap().entry);
        l.frame_is_entry = 68;
        assert!(!FrameFields::parse(&words, &l).unwrap().entry);
        words[68 / 8] |= 1 << ((68 % 8) * 8);
        assert!(FrameFields::parse(&words, &l).unwrap().entry);
        l.frame_is_entry = crate::layout::NO_ENTRY_FLAG;
        assert!(!FrameFields::parse(&words, &l).unwrap().entry);
    }

    #[test]
    fn classifies() {
        let l = layout();
        let kind = |code, prev, owner| {
            FrameFields::parse(&frame(code, prev, 0, owner), &l)
                .unwrap()
                .kind(0x3000, &l)
        };
        assert_eq!(kind(0x1000, 0x2000, 0), FrameKind::Python);
        assert_eq!(kind(0x1000, 0x2000, 2), FrameKind::Python);
        // Entry frames (3.14: INTERPRETER 3, CSTACK 4), even with no code.
        assert_eq!(kind(0x1000, 0x2000, 3), FrameKind::Boundary);
        assert_eq!(kind(0, 0x2000, 4), FrameKind::Boundary);
        assert_eq!(kind(0x1000, 0x2000, 5), FrameKind::Bad);
        assert_eq!(kind(0, 0x2000, 0), FrameKind::Bad);
        // A tagged NULL is NULL.
        assert_eq!(kind(3, 0x2000, 0), FrameKind::Bad);
        assert_eq!(kind(0x1000, 0x3000, 0), FrameKind::Bad, "self-loop");
        // 3.11: no owner is a boundary.
        let l311 = PyLayout {
            owner_boundary: NO_BOUNDARY_OWNER,
            owner_max: 2,
            ..l
        };
        let f = FrameFields::parse(&frame(0x1000, 0x2000, 0, 2), &l311).unwrap();
        assert_eq!(f.kind(0x3000, &l311), FrameKind::Python);
    }

    #[test]
    fn rejects_fields_outside_the_read() {
        let l = PyLayout {
            frame_instr: 73,
            ..layout()
        };
        assert!(FrameFields::parse(&[0; FRAME_READ_WORDS], &l).is_none());
        assert!(l.check().is_err());
        assert!(layout().check().is_ok());
        // In reach, but not a whole word.
        let l = PyLayout {
            frame_previous: 12,
            ..layout()
        };
        assert!(FrameFields::parse(&[0; FRAME_READ_WORDS], &l).is_none());
        assert!(l.check().is_err());
        let l = PyLayout {
            frame_owner: 80,
            ..layout()
        };
        assert!(FrameFields::parse(&[0; FRAME_READ_WORDS], &l).is_none());
    }

    /// Walks `next` from `start` as the BPF walker does (every frame
    /// recorded) until the end or a cycle: (frames recorded, cycle found).
    fn walk_chain(start: u64, next: impl Fn(u64) -> u64, bound: u32) -> (u32, bool) {
        let mut c = CycleCheck::new();
        let (mut addr, mut n) = (start, 0u32);
        while addr != 0 && n < bound {
            if c.step(addr) {
                return (n, true);
            }
            n += 1;
            addr = next(addr);
        }
        (n, false)
    }

    #[test]
    fn cycles_are_found_early() {
        // Frames at 8, 16, ..: `mu` frames lead into a loop of `lambda`.
        for mu in 0..70u64 {
            for lambda in 1..70u64 {
                let next = |a: u64| {
                    if a / 8 < mu + lambda {
                        a + 8
                    } else {
                        (mu + 1) * 8
                    }
                };
                let (n, cycle) = walk_chain(8, next, 4096);
                assert!(cycle, "mu {mu} lambda {lambda}");
                // Every frame is recorded, and at most a few laps.
                let n = u64::from(n);
                assert!(n >= mu + lambda, "mu {mu} lambda {lambda}: {n} frames");
                assert!(
                    n <= 3 * (mu + lambda),
                    "mu {mu} lambda {lambda}: {n} frames"
                );
                if mu == 0 {
                    assert_eq!(n, lambda, "a loop back to the leaf ends at once");
                }
            }
        }
        // A chain without a cycle is walked to its end, whatever its length.
        let long = |a: u64| if a < 8 * 3000 { a + 8 } else { 0 };
        assert_eq!(walk_chain(8, long, 4096), (3000, false));
    }

    #[test]
    fn instruction_index() {
        let l = layout();
        let code = 0x10_000;
        let base = code + 208;
        assert_eq!(instr_index(base, code, 10, &l), 0);
        assert_eq!(
            instr_index(base + u64::MAX / 2, code, i64::MAX, &l),
            i32::MAX
        );
        assert_eq!(instr_index(base, code, -5, &l), -1);
        assert_eq!(instr_index(base + 6, code, 10, &l), 3);
        assert_eq!(instr_index(base - 2, code, 10, &l), -1);
        assert_eq!(instr_index(base + 100, code, 10, &l), 9);
        assert_eq!(instr_index(base, code, 0, &l), -1);
    }

    #[test]
    fn checksum_masks_and_fields() {
        let mut bytes = [0u8; CODE_READ_LEN];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8;
        }
        let hdr: [u64; CODE_READ_WORDS] = words_of(&bytes);
        let all = [u64::MAX; CODE_READ_WORDS];
        let mut warm_mask = all;
        warm_mask[4] = 0xffff_ffff;
        let base = code_checksum(&hdr, &warm_mask);
        let changed = |at: usize, f: fn(u8) -> u8| {
            let mut b = bytes;
            b[at] = f(b[at]);
            words_of::<CODE_READ_WORDS>(&b)
        };
        // 3.11's co_warmup (absolute +52) and _co_linearray_entry_size (+54).
        let warm = changed(36, |_| 0xff);
        assert_eq!(code_checksum(&warm, &warm_mask), base);
        assert_eq!(code_checksum(&changed(39, |_| 0xff), &warm_mask), base);
        assert_ne!(code_checksum(&warm, &all), code_checksum(&hdr, &all));
        // 3.11's co_firstlineno (+72), the co_consts pointer.
        assert_ne!(code_checksum(&changed(56, |b| b ^ 1), &warm_mask), base);
        assert_ne!(code_checksum(&changed(8, |b| b ^ 0x10), &warm_mask), base);
        assert_eq!(code_size_units(&hdr), 0x0706_0504_0302_0100);
        assert_eq!(code_flags(&hdr, &layout()), 0x2322_2120);
    }
}
