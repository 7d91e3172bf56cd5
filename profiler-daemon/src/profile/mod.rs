//! Aggregated, symbolised stacks and the formats they are written in.
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub mod compact;
pub mod folded;
pub mod pprof;
pub mod speedscope;
pub mod svg;

pub use compact::{CompactProfile, StackRef};

/// One frame of a symbolised stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Frame {
    /// A Python function at the line it was executing.
    Python {
        qualname: Arc<str>,
        filename: Arc<str>,
        /// Line being executed (or called from, for non-leaf frames).
        line: u32,
        /// `co_firstlineno`: where the function starts.
        first_line: u32,
    },
    /// Synthetic root naming the process, when a profile covers several.
    Process { pid: u32, command: Arc<str> },
    /// A frame whose code object could not be read or was replaced between
    /// the sample and symbolisation. Kept so the stack keeps its shape.
    Unknown { reason: UnknownReason },
    /// Synthetic root of a stack cut at `--max-depth`: the frames nearer the
    /// root were not walked.
    Truncated,
    /// Synthetic root of a stack whose walk stopped on a failed read: the
    /// frames nearer the root are missing.
    Partial,
    /// Stands for samples whose stack was new while the daemon's per-process
    /// stack table was full (counted in `pyebpf_stacks_overflowed_total`).
    Overflow,
}

/// Why a frame is shown as unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnknownReason {
    /// Reading the code object failed (freed, unmapped, process gone).
    Unreadable,
    /// The address now holds something else than the code object sampled.
    Stale,
    /// The object is not a code object or its fields are inconsistent.
    Invalid,
}

impl UnknownReason {
    pub fn as_str(self) -> &'static str {
        match self {
            UnknownReason::Unreadable => "unreadable",
            UnknownReason::Stale => "stale",
            UnknownReason::Invalid => "invalid",
        }
    }
}

impl Frame {
    /// Function name as shown in flamegraphs and pprof (no line).
    pub fn function_name(&self) -> String {
        match self {
            Frame::Python { qualname, .. } => qualname.to_string(),
            _ => self.to_string(),
        }
    }

    pub fn filename(&self) -> Option<&str> {
        match self {
            Frame::Python { filename, .. } => Some(filename),
            _ => None,
        }
    }
}

impl fmt::Display for Frame {
    /// py-spy's raw shape: `qualname (filename:line)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Python {
                qualname,
                filename,
                line,
                ..
            } => write!(f, "{qualname} ({filename}:{line})"),
            Frame::Process { pid, command } => write!(f, "process {pid} ({command})"),
            Frame::Unknown { reason } => write!(f, "[unknown code object: {}]", reason.as_str()),
            Frame::Truncated => f.write_str("[truncated]"),
            Frame::Partial => f.write_str("[partial stack: read failed]"),
            Frame::Overflow => f.write_str("[stack table full]"),
        }
    }
}

/// Symbolised stacks with their sample counts, root first.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub stacks: HashMap<Vec<Frame>, u64>,
    /// Sampling frequency in Hz: one sample stands for `1e9 / rate_hz` ns of CPU.
    pub rate_hz: u32,
    /// Wall-clock start of the recording.
    pub start: Option<SystemTime>,
    /// Length of the recording.
    pub duration: Duration,
}

impl Profile {
    pub fn new(rate_hz: u32) -> Self {
        Profile {
            rate_hz,
            ..Default::default()
        }
    }

    pub fn add(&mut self, stack: Vec<Frame>, count: u64) {
        *self.stacks.entry(stack).or_insert(0) += count;
    }

    pub fn total_samples(&self) -> u64 {
        self.stacks.values().sum()
    }

    /// Nanoseconds of CPU one sample stands for.
    pub fn period_ns(&self) -> u64 {
        1_000_000_000 / u64::from(self.rate_hz.max(1))
    }

    /// Stacks sorted by frames, for deterministic output.
    pub fn sorted_stacks(&self) -> Vec<(&Vec<Frame>, u64)> {
        let mut v: Vec<_> = self.stacks.iter().map(|(k, c)| (k, *c)).collect();
        v.sort();
        v
    }
}

/// Output formats of `pyebpf record`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Folded,
    Svg,
    Pprof,
    Speedscope,
}

impl Format {
    /// Write `profile` in this format to `out`.
    pub fn write(
        self,
        profile: &Profile,
        title: &str,
        out: &mut dyn std::io::Write,
    ) -> anyhow::Result<()> {
        match self {
            Format::Folded => folded::write(profile, out),
            Format::Svg => svg::write(profile, title, out),
            Format::Pprof => pprof::write(profile, out),
            Format::Speedscope => speedscope::write(profile, title, out),
        }
    }
}
