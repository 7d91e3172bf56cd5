//! Raw stacks counted as they arrive, symbolised on first sight.
//!
//! Code objects are read as soon as a new stack shows them, while they are
//! most likely still alive; repeated stacks only cost a hash lookup.
use std::collections::HashMap;
use std::sync::Arc;

use profiler_common::RawFrame;

use crate::bpf::events::RawSample;
use crate::process::memory::ProcessMemory;
use crate::profile::{Frame, Profile};
use crate::python::code::CodeFormat;
use crate::python::symbolizer::{SymbolStats, Symbolizer};
use crate::FastHashMap;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct StackKey {
    pid: u32,
    truncated: bool,
    partial: bool,
    /// Leaf first, as sampled.
    frames: Vec<RawFrame>,
}

/// A process whose stacks are aggregated.
pub struct Target {
    pub command: Arc<str>,
    symbols: Symbolizer<ProcessMemory>,
}

/// Counts of raw stacks per process.
#[derive(Default)]
pub struct Aggregator {
    stacks: FastHashMap<StackKey, u64>,
    targets: HashMap<u32, Target>,
    /// Samples from a pid that is not a target (counted, not kept).
    pub foreign: u64,
    pub samples: u64,
    pub truncated: u64,
    pub partial: u64,
}

impl Aggregator {
    pub fn add_target(&mut self, pid: u32, command: &str, format: CodeFormat) {
        self.targets.insert(
            pid,
            Target {
                command: command.into(),
                symbols: Symbolizer::new(ProcessMemory::new(pid), format),
            },
        );
    }

    pub fn add(&mut self, s: RawSample) {
        let Some(target) = self.targets.get_mut(&s.pid) else {
            self.foreign += 1;
            return;
        };
        self.samples += 1;
        self.truncated += u64::from(s.truncated);
        self.partial += u64::from(s.read_error.is_some());
        let key = StackKey {
            pid: s.pid,
            truncated: s.truncated,
            partial: s.read_error.is_some(),
            frames: s.frames,
        };
        if let Some(c) = self.stacks.get_mut(&key) {
            *c += 1;
            return;
        }
        for f in &key.frames {
            let _ = target.symbols.code(f);
        }
        self.stacks.insert(key, 1);
    }

    /// Symbolisation statistics summed over processes.
    pub fn symbol_stats(&self) -> SymbolStats {
        let mut t = SymbolStats::default();
        for s in self.targets.values().map(|t| t.symbols.stats) {
            t += s;
        }
        t
    }

    /// Number of distinct raw stacks counted.
    pub fn distinct_stacks(&self) -> usize {
        self.stacks.len()
    }

    /// Builds the symbolised profile, root first. With `process_roots`, each
    /// stack starts with a `process PID (command)` frame.
    pub fn to_profile(&mut self, rate_hz: u32, process_roots: bool) -> (Profile, u64) {
        let mut profile = Profile::new(rate_hz);
        let mut unknown_frames = 0u64;
        for (key, count) in &self.stacks {
            let Some(target) = self.targets.get_mut(&key.pid) else {
                continue;
            };
            let mut stack = Vec::with_capacity(key.frames.len() + 3);
            if process_roots {
                stack.push(Frame::Process {
                    pid: key.pid,
                    command: target.command.clone(),
                });
            }
            if key.truncated {
                stack.push(Frame::Truncated);
            } else if key.partial {
                stack.push(Frame::Partial);
            }
            for raw in key.frames.iter().rev() {
                let f = target.symbols.frame(raw);
                if matches!(f, Frame::Unknown { .. }) {
                    unknown_frames += count;
                }
                stack.push(f);
            }
            profile.add(stack, *count);
        }
        (profile, unknown_frames)
    }
}
