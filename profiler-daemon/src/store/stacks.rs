//! A process's distinct stacks at line level, with their size in bytes.
//!
//! Frames (function, file, line) are interned once; a stack is a slice of
//! frame ids. Both are reference-counted: a stack by the one-second buckets
//! that count it, a frame by the stacks that hold it. Expiring a bucket
//! releases its stacks, so memory is returned as it ages out, at a cost
//! proportional to what expires (not to what is kept).
use std::sync::Arc;

use crate::profile::Frame;
use crate::FastHashMap;

pub type StackId = u32;
pub type FrameId = u32;

/// Bytes a frame costs beyond its strings: its slot, its key in the map
/// and the map's control bytes.
const FRAME_OVERHEAD: usize = 2 * std::mem::size_of::<Frame>() + 32;
/// Bytes a stack costs beyond its frame ids: its slot, the `Arc`'s
/// counters and its map entry.
const STACK_OVERHEAD: usize = 80;

struct FrameSlot {
    frame: Frame,
    /// Live stacks holding it (once per occurrence).
    refs: u32,
}

struct StackSlot {
    frames: Arc<[FrameId]>,
    /// Buckets counting it.
    refs: u32,
    /// Tells this stack from an earlier one freed from the same slot, for
    /// caches that remember ids.
    serial: u64,
}

/// Interned frames and stacks of one process.
#[derive(Default)]
pub struct StackTable {
    frame_ids: FastHashMap<Frame, FrameId>,
    frames: Vec<Option<FrameSlot>>,
    free_frames: Vec<FrameId>,
    stack_ids: FastHashMap<Arc<[FrameId]>, StackId>,
    stacks: Vec<Option<StackSlot>>,
    free_stacks: Vec<StackId>,
    next_serial: u64,
    bytes: usize,
}

/// What [`frame_bytes`] counts of a frame's strings.
fn frame_bytes(f: &Frame) -> usize {
    FRAME_OVERHEAD
        + match f {
            Frame::Python {
                qualname, filename, ..
            } => qualname.len() + filename.len(),
            Frame::Process { command, .. } => command.len(),
            Frame::Thread { name, .. } => name.len(),
            Frame::Kernel { function } => function.len(),
            Frame::Native {
                function,
                module,
                source,
            } => {
                function.as_deref().map_or(0, str::len)
                    + module.len()
                    + source.as_ref().map_or(0, |s| s.file.len())
            }
            _ => 0,
        }
}

impl StackTable {
    /// Bytes held by the frames and stacks.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Live stacks.
    pub fn len(&self) -> usize {
        self.stacks.len() - self.free_stacks.len()
    }

    #[cfg(test)]
    pub fn frames_len(&self) -> usize {
        self.frames.len() - self.free_frames.len()
    }

    /// The id of `frames` if interned.
    pub fn get(&self, frames: &[Frame]) -> Option<StackId> {
        let ids: Option<Vec<FrameId>> = frames
            .iter()
            .map(|f| self.frame_ids.get(f).copied())
            .collect();
        self.stack_ids.get(ids?.as_slice()).copied()
    }

    /// Bytes interning `frames` would add (an upper bound: frames already
    /// interned are counted once only if they are not).
    pub fn cost(&self, frames: &[Frame]) -> usize {
        STACK_OVERHEAD
            + frames.len() * std::mem::size_of::<FrameId>()
            + frames
                .iter()
                .filter(|f| !self.frame_ids.contains_key(*f))
                .map(frame_bytes)
                .sum::<usize>()
    }

    /// Interns `frames` (root first); a new stack starts with no reference.
    pub fn intern(&mut self, frames: &[Frame]) -> StackId {
        if let Some(id) = self.get(frames) {
            return id;
        }
        let ids: Arc<[FrameId]> = frames.iter().map(|f| self.intern_frame(f)).collect();
        self.bytes += STACK_OVERHEAD + ids.len() * std::mem::size_of::<FrameId>();
        let slot = StackSlot {
            frames: ids.clone(),
            refs: 0,
            serial: self.next_serial,
        };
        self.next_serial += 1;
        let id = match self.free_stacks.pop() {
            Some(id) => {
                self.stacks[id as usize] = Some(slot);
                id
            }
            None => {
                self.stacks.push(Some(slot));
                (self.stacks.len() - 1) as StackId
            }
        };
        self.stack_ids.insert(ids, id);
        id
    }

    fn intern_frame(&mut self, f: &Frame) -> FrameId {
        let id = match self.frame_ids.get(f) {
            Some(&id) => id,
            None => {
                self.bytes += frame_bytes(f);
                let slot = Some(FrameSlot {
                    frame: f.clone(),
                    refs: 0,
                });
                let id = match self.free_frames.pop() {
                    Some(id) => {
                        self.frames[id as usize] = slot;
                        id
                    }
                    None => {
                        self.frames.push(slot);
                        (self.frames.len() - 1) as FrameId
                    }
                };
                self.frame_ids.insert(f.clone(), id);
                id
            }
        };
        if let Some(Some(s)) = self.frames.get_mut(id as usize) {
            s.refs += 1;
        }
        id
    }

    /// The stack's serial, if `id` is live.
    pub fn serial(&self, id: StackId) -> Option<u64> {
        match self.stacks.get(id as usize) {
            Some(Some(s)) => Some(s.serial),
            _ => None,
        }
    }

    /// One more bucket counts `id`.
    pub fn retain(&mut self, id: StackId) {
        if let Some(Some(s)) = self.stacks.get_mut(id as usize) {
            s.refs += 1;
        }
    }

    /// One bucket less counts `id`; frees it (and frames only it held) at
    /// none. True if it was freed.
    pub fn release(&mut self, id: StackId) -> bool {
        let Some(Some(s)) = self.stacks.get_mut(id as usize) else {
            return false;
        };
        s.refs = s.refs.saturating_sub(1);
        if s.refs > 0 {
            return false;
        }
        let Some(s) = self.stacks[id as usize].take() else {
            return false;
        };
        self.free_stacks.push(id);
        self.stack_ids.remove(&s.frames);
        self.bytes = self
            .bytes
            .saturating_sub(STACK_OVERHEAD + s.frames.len() * std::mem::size_of::<FrameId>());
        for &f in s.frames.iter() {
            self.release_frame(f);
        }
        true
    }

    fn release_frame(&mut self, id: FrameId) {
        let Some(Some(s)) = self.frames.get_mut(id as usize) else {
            return;
        };
        s.refs = s.refs.saturating_sub(1);
        if s.refs > 0 {
            return;
        }
        if let Some(s) = self.frames[id as usize].take() {
            self.bytes = self.bytes.saturating_sub(frame_bytes(&s.frame));
            self.frame_ids.remove(&s.frame);
            self.free_frames.push(id);
        }
    }

    /// The frames of stack `id`, root first (empty if not live).
    #[cfg(test)]
    pub fn frames(&self, id: StackId) -> Vec<Frame> {
        self.stack(id)
            .map(|ids| ids.iter().filter_map(|&f| self.frame(f).cloned()).collect())
            .unwrap_or_default()
    }

    /// The frame ids of stack `id`, root first, if it is live.
    pub fn stack(&self, id: StackId) -> Option<&[FrameId]> {
        match self.stacks.get(id as usize) {
            Some(Some(s)) => Some(&s.frames),
            _ => None,
        }
    }

    /// Frame `id`, if it is live.
    pub fn frame(&self, id: FrameId) -> Option<&Frame> {
        match self.frames.get(id as usize) {
            Some(Some(slot)) => Some(&slot.frame),
            _ => None,
        }
    }

    /// One more than the largest frame id in use (or freed): the size of a
    /// table indexed by frame id.
    pub fn frame_slots(&self) -> usize {
        self.frames.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn py(name: &str, line: u32) -> Frame {
        Frame::Python {
            qualname: name.into(),
            filename: "app.py".into(),
            line,
            first_line: 1,
        }
    }

    #[test]
    fn frames_are_shared_and_freed_with_their_last_stack() {
        let mut t = StackTable::default();
        let a = t.intern(&[py("main", 3), py("f", 7)]);
        let b = t.intern(&[py("main", 3), py("g", 9)]);
        assert_ne!(a, b);
        assert_eq!(t.intern(&[py("main", 3), py("f", 7)]), a);
        assert_eq!((t.len(), t.frames_len()), (2, 3));
        let cost_of_new = t.cost(&[py("main", 3), py("h", 1)]);
        let cost_of_known = t.cost(&[py("main", 3), py("f", 7)]);
        assert!(cost_of_new > cost_of_known);

        t.retain(a);
        t.retain(a);
        t.retain(b);
        let full = t.bytes();
        assert!(!t.release(a));
        assert!(t.release(a));
        assert_eq!(t.get(&[py("main", 3), py("f", 7)]), None);
        assert_eq!((t.len(), t.frames_len()), (1, 2), "main is still held by b");
        assert!(t.bytes() < full);
        assert_eq!(t.frames(b), vec![py("main", 3), py("g", 9)]);
        assert!(t.release(b));
        assert_eq!((t.len(), t.frames_len(), t.bytes()), (0, 0, 0));
    }

    #[test]
    fn a_reused_slot_gets_a_new_serial() {
        let mut t = StackTable::default();
        let a = t.intern(&[py("f", 1)]);
        let serial = t.serial(a);
        t.retain(a);
        t.release(a);
        assert_eq!(t.serial(a), None);
        let b = t.intern(&[py("g", 2)]);
        assert_eq!(a, b, "the slot is reused");
        assert_ne!(t.serial(b), serial);
    }

    #[test]
    fn a_frame_twice_in_a_stack_is_counted_twice() {
        let mut t = StackTable::default();
        let rec = t.intern(&[py("r", 2), py("r", 2), py("r", 2)]);
        let other = t.intern(&[py("r", 2)]);
        t.retain(rec);
        t.retain(other);
        t.release(rec);
        assert_eq!(t.frames(other), vec![py("r", 2)]);
        t.release(other);
        assert_eq!((t.len(), t.frames_len(), t.bytes()), (0, 0, 0));
    }
}
