//! A profile whose frames are stored once, stacks being slices of frame
//! indices: about the size of the store's own copy, where a [`Profile`]
//! repeats every frame of every stack (a deep stack of 1,500 frames costs
//! 60 KB there, 6 KB here). Windows, `top` and pprof are built from it; it
//! is expanded into a [`Profile`] only where a format needs one.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Frame, Profile, ProfileKind};

/// Stacks over a table of distinct frames, with their values (sample counts
/// or nanoseconds, by `kind`).
#[derive(Clone, Debug, Default)]
pub struct CompactProfile {
    frames: Vec<Frame>,
    /// Indices into `frames`, root first; every index is in range (checked
    /// by [`CompactProfile::push_stack`]).
    stacks: Vec<(Arc<[u32]>, u64)>,
    pub kind: ProfileKind,
    /// CPU sampling frequency in Hz.
    pub rate_hz: u32,
    pub start: Option<SystemTime>,
    pub duration: Duration,
}

/// One stack of a [`CompactProfile`].
#[derive(Clone, Copy)]
pub struct StackRef<'a> {
    frames: &'a [Frame],
    ids: &'a [u32],
}

impl<'a> StackRef<'a> {
    /// Frames, root first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &'a Frame> + 'a {
        let frames = self.frames;
        self.ids.iter().filter_map(move |&i| frames.get(i as usize))
    }

    /// The leaf frame.
    pub fn last(&self) -> Option<&'a Frame> {
        self.ids.last().and_then(|&i| self.frames.get(i as usize))
    }

    /// Indices into [`CompactProfile::frames`], root first.
    pub fn ids(&self) -> &'a [u32] {
        self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Bytes a `Profile` entry costs beyond its frames: the `Vec` header, the
/// count and the map's slot and control bytes.
const EXPANDED_STACK_OVERHEAD: usize = 64;

impl CompactProfile {
    /// An empty CPU profile (values are sample counts).
    pub fn new(rate_hz: u32) -> Self {
        CompactProfile::of_kind(ProfileKind::Cpu, rate_hz)
    }

    pub fn of_kind(kind: ProfileKind, rate_hz: u32) -> Self {
        CompactProfile {
            kind,
            rate_hz,
            ..Default::default()
        }
    }

    /// Adds a distinct frame; its index for [`CompactProfile::push_stack`].
    pub fn push_frame(&mut self, f: Frame) -> u32 {
        self.frames.push(f);
        (self.frames.len() - 1) as u32
    }

    /// Adds a stack of frame indices (root first). `false`, and nothing
    /// added, if an index names no frame.
    pub fn push_stack(&mut self, ids: Arc<[u32]>, count: u64) -> bool {
        if ids.iter().any(|&i| i as usize >= self.frames.len()) {
            return false;
        }
        self.stacks.push((ids, count));
        true
    }

    /// Adds `other`'s stacks after ours (its frames too: a frame both hold
    /// is stored twice, and a stack both hold listed twice).
    pub fn append(&mut self, other: CompactProfile) {
        if self.frames.is_empty() {
            self.frames = other.frames;
            self.stacks = other.stacks;
            return;
        }
        let base = self.frames.len() as u32;
        self.frames.extend(other.frames);
        self.stacks.extend(
            other
                .stacks
                .into_iter()
                .map(|(ids, c)| (ids.iter().map(|i| i + base).collect(), c)),
        );
    }

    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// Stacks with their counts, in the order they were added.
    pub fn stacks(&self) -> impl Iterator<Item = (StackRef<'_>, u64)> + '_ {
        self.stacks.iter().map(|(ids, c)| {
            (
                StackRef {
                    frames: &self.frames,
                    ids,
                },
                *c,
            )
        })
    }

    pub fn stack_count(&self) -> usize {
        self.stacks.len()
    }

    /// The sum of the values (samples or nanoseconds, by `kind`).
    pub fn total_samples(&self) -> u64 {
        self.stacks.iter().map(|(_, c)| c).sum()
    }

    /// Nanoseconds one unit of value stands for.
    pub fn ns_per_value(&self) -> u64 {
        self.kind.ns_per_value(self.rate_hz)
    }

    /// Bytes it holds (the frames' strings are shared with the store and
    /// counted there).
    pub fn bytes(&self) -> usize {
        self.frames.len() * std::mem::size_of::<Frame>()
            + self
                .stacks
                .iter()
                .map(|(ids, _)| 32 + std::mem::size_of_val(&**ids))
                .sum::<usize>()
    }

    /// An estimate of the bytes [`CompactProfile::to_profile`] allocates,
    /// and a bound on the text formats written from it (a frame's name and
    /// file once per occurrence): what a query's byte budget is held to.
    pub fn expanded_bytes(&self) -> usize {
        let per_frame: Vec<usize> = self
            .frames
            .iter()
            .map(|f| {
                std::mem::size_of::<Frame>()
                    + match f {
                        Frame::Python {
                            qualname, filename, ..
                        } => qualname.len() + filename.len() + 16,
                        Frame::Kernel { function } => function.len() + 16,
                        Frame::Thread { name, .. } => name.len() + 24,
                        Frame::Native {
                            function,
                            module,
                            source,
                        } => {
                            function.as_deref().map_or(2, str::len)
                                + module.len()
                                + source.as_ref().map_or(0, |s| s.file.len() + 12)
                                + 24
                        }
                        _ => 32,
                    }
            })
            .collect();
        self.stacks
            .iter()
            .map(|(ids, _)| {
                EXPANDED_STACK_OVERHEAD
                    + ids
                        .iter()
                        .map(|&i| per_frame.get(i as usize).copied().unwrap_or(0))
                        .sum::<usize>()
            })
            .sum()
    }

    /// Every stack spelled out.
    pub fn to_profile(&self) -> Profile {
        let mut p = Profile::of_kind(self.kind, self.rate_hz);
        p.start = self.start;
        p.duration = self.duration;
        p.stacks.reserve(self.stacks.len());
        for (stack, c) in self.stacks() {
            p.add(stack.iter().cloned().collect(), c);
        }
        p
    }
}

impl From<&Profile> for CompactProfile {
    /// Stacks in [`Profile::sorted_stacks`] order, frames interned.
    fn from(p: &Profile) -> Self {
        let mut c = CompactProfile::of_kind(p.kind, p.rate_hz);
        c.start = p.start;
        c.duration = p.duration;
        let mut index: HashMap<&Frame, u32> = HashMap::new();
        for (stack, n) in p.sorted_stacks() {
            let ids: Arc<[u32]> = stack
                .iter()
                .map(|f| match index.get(f) {
                    Some(&i) => i,
                    None => {
                        let i = c.push_frame(f.clone());
                        index.insert(f, i);
                        i
                    }
                })
                .collect();
            c.push_stack(ids, n);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::folded::tests::sample_profile;

    #[test]
    fn round_trips_through_a_profile() {
        let p = sample_profile();
        let c = CompactProfile::from(&p);
        assert_eq!(c.total_samples(), p.total_samples());
        assert_eq!(c.stack_count(), p.stacks.len());
        let back = c.to_profile();
        assert_eq!(back.stacks, p.stacks);
        assert_eq!(
            (back.kind, back.rate_hz, back.start, back.duration),
            (p.kind, p.rate_hz, p.start, p.duration)
        );
        let mut wall = p.clone();
        wall.kind = ProfileKind::Wall;
        assert_eq!(
            CompactProfile::from(&wall).to_profile().kind,
            ProfileKind::Wall
        );
        // Shared frames are stored once.
        let occurrences: usize = p.stacks.keys().map(Vec::len).sum();
        assert!(c.frames().len() < occurrences);
    }

    #[test]
    fn a_deep_stack_is_far_smaller_than_spelled_out() {
        let mut p = Profile::new(100);
        for leaf in 0..20u32 {
            let mut stack: Vec<Frame> = (0..1_000u32)
                .map(|i| Frame::Python {
                    qualname: format!("f{}", i % 3).into(),
                    filename: "/srv/app/module.py".into(),
                    line: i % 3 + 1,
                    first_line: 1,
                })
                .collect();
            stack.push(Frame::Python {
                qualname: "leaf".into(),
                filename: "/srv/app/module.py".into(),
                line: leaf + 10,
                first_line: 9,
            });
            p.add(stack, 1);
        }
        let c = CompactProfile::from(&p);
        let spelled_out = 20 * 1_001 * std::mem::size_of::<Frame>();
        assert!(
            c.bytes() * 8 < spelled_out,
            "{} vs {spelled_out}",
            c.bytes()
        );
        assert!(c.expanded_bytes() >= spelled_out);
    }

    #[test]
    fn appended_profiles_spell_out_merged() {
        let p = sample_profile();
        let mut c = CompactProfile::from(&p);
        c.append(CompactProfile::from(&p));
        let merged = c.to_profile();
        assert_eq!(merged.total_samples(), 2 * p.total_samples());
        for (stack, n) in &p.stacks {
            assert_eq!(merged.stacks.get(stack), Some(&(2 * n)));
        }
        let mut empty = CompactProfile::new(100);
        empty.append(CompactProfile::from(&p));
        assert_eq!(empty.to_profile().stacks, p.stacks);
    }

    #[test]
    fn an_index_past_the_frames_is_refused() {
        let mut c = CompactProfile::new(100);
        let f = c.push_frame(Frame::Truncated);
        assert!(c.push_stack(Arc::from(vec![f]), 2));
        assert!(!c.push_stack(Arc::from(vec![f, 7]), 3));
        assert_eq!((c.stack_count(), c.total_samples()), (1, 2));
    }
}
