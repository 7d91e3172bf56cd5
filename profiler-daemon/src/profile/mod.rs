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
    /// Synthetic root naming the thread (its id as the host sees it and
    /// its name, `/proc/PID/task/TID/comm`), when stacks are kept per
    /// thread.
    Thread { tid: u32, name: Arc<str> },
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
    /// A kernel function: its name, or its address (`0xffff...`) when no
    /// kernel symbol holds it.
    Kernel { function: Arc<str> },
    /// Between the Python and kernel frames: the kernel stack was deeper
    /// than the sampler keeps, and its frames nearest the root are cut.
    KernelTruncated,
    /// In place of the kernel frames: they were wanted but could not be read.
    KernelUnavailable,
    /// A native function of the target, after the Python frames: where the
    /// CPU was (C code called from the Python leaf), or for a thread in the
    /// kernel the function that made the system call. `function` is `None`
    /// when the module has no symbol for the address (a static function of
    /// a stripped library): shown as such, never guessed.
    Native {
        function: Option<Arc<str>>,
        module: Arc<str>,
        /// File and line, where the module has debug information.
        source: Option<crate::native::user::SourceLine>,
    },
    /// Where native and Python frames could not be merged, or some are
    /// missing (see [`crate::native::merge::Marker`]).
    NativeMarker(crate::native::merge::Marker),
    /// Synthetic leaf: the thread was off CPU waiting for the GIL (blocked
    /// on the interpreter's GIL state).
    GilWait,
    /// Synthetic leaf: the thread was off CPU while runnable (preempted, or
    /// it yielded): it waited for a CPU, not for an event.
    Runnable,
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
            Frame::Native {
                source: Some(s), ..
            } => Some(&s.file),
            Frame::Native { module, .. } => Some(module),
            _ => None,
        }
    }

    /// The line a frame is at, where it has one (Python frames; native
    /// ones with debug information).
    pub fn line(&self) -> Option<u32> {
        match self {
            Frame::Python { line, .. } => Some(*line),
            Frame::Native {
                source: Some(s), ..
            } => s.line,
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
            Frame::Thread { tid, name } => write!(f, "thread {tid} ({name})"),
            Frame::Unknown { reason } => write!(f, "[unknown code object: {}]", reason.as_str()),
            Frame::Truncated => f.write_str("[truncated]"),
            Frame::Partial => f.write_str("[partial stack: read failed]"),
            Frame::Overflow => f.write_str("[stack table full]"),
            Frame::Kernel { function } => write!(f, "[kernel] {function}"),
            Frame::Native {
                function,
                module,
                source,
            } => {
                write!(f, "[native] {} (", function.as_deref().unwrap_or("??"))?;
                if let Some(s) = source {
                    let file = s.file.rsplit('/').next().unwrap_or(&s.file);
                    match s.line {
                        Some(line) => write!(f, "{file}:{line}, ")?,
                        None => write!(f, "{file}, ")?,
                    }
                }
                write!(f, "{module})")
            }
            Frame::KernelTruncated => f.write_str("[kernel stack truncated]"),
            Frame::KernelUnavailable => f.write_str("[kernel stack unavailable]"),
            Frame::NativeMarker(m) => write!(f, "{m}"),
            Frame::GilWait => f.write_str("[waiting for the GIL]"),
            Frame::Runnable => f.write_str("[runnable: waiting for a CPU]"),
        }
    }
}

/// Which time a profile measures; its values' unit follows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProfileKind {
    /// Threads on CPU: values are sample counts, each standing for
    /// `1e9 / rate_hz` ns of CPU.
    #[default]
    Cpu,
    /// Every thread's elapsed time, running or not: values are nanoseconds.
    Wall,
    /// Time threads spent off CPU (blocked, or runnable and waiting for a
    /// CPU): values are nanoseconds.
    OffCpu,
}

/// The unit of a profile's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueUnit {
    Samples,
    Nanoseconds,
}

impl ProfileKind {
    pub const ALL: [ProfileKind; 3] = [ProfileKind::Cpu, ProfileKind::Wall, ProfileKind::OffCpu];

    pub fn unit(self) -> ValueUnit {
        match self {
            ProfileKind::Cpu => ValueUnit::Samples,
            ProfileKind::Wall | ProfileKind::OffCpu => ValueUnit::Nanoseconds,
        }
    }

    /// `cpu`, `wall`, `off-cpu`: the `--mode` value and pprof sample type.
    pub fn name(self) -> &'static str {
        match self {
            ProfileKind::Cpu => "cpu",
            ProfileKind::Wall => "wall",
            ProfileKind::OffCpu => "off-cpu",
        }
    }

    /// What the time is, for titles: "CPU time", "wall time", "off-CPU time".
    pub fn describe(self) -> &'static str {
        match self {
            ProfileKind::Cpu => "CPU time",
            ProfileKind::Wall => "wall time",
            ProfileKind::OffCpu => "off-CPU time",
        }
    }

    /// Whether its samples include threads on CPU (perf clock samples).
    pub fn on_cpu(self) -> bool {
        matches!(self, ProfileKind::Cpu | ProfileKind::Wall)
    }

    /// Whether its samples include off-CPU intervals.
    pub fn off_cpu(self) -> bool {
        matches!(self, ProfileKind::Wall | ProfileKind::OffCpu)
    }

    /// Nanoseconds one unit of value stands for at `rate_hz`.
    pub fn ns_per_value(self, rate_hz: u32) -> u64 {
        match self.unit() {
            ValueUnit::Samples => 1_000_000_000 / u64::from(rate_hz.max(1)),
            ValueUnit::Nanoseconds => 1,
        }
    }
}

/// Symbolised stacks with their values, root first.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Values in `kind`'s unit: sample counts or nanoseconds.
    pub stacks: HashMap<Vec<Frame>, u64>,
    pub kind: ProfileKind,
    /// CPU sampling frequency in Hz: one CPU sample stands for
    /// `1e9 / rate_hz` ns.
    pub rate_hz: u32,
    /// Wall-clock start of the recording.
    pub start: Option<SystemTime>,
    /// Length of the recording.
    pub duration: Duration,
}

impl Profile {
    /// An empty CPU profile (values are sample counts).
    pub fn new(rate_hz: u32) -> Self {
        Profile::of_kind(ProfileKind::Cpu, rate_hz)
    }

    pub fn of_kind(kind: ProfileKind, rate_hz: u32) -> Self {
        Profile {
            kind,
            rate_hz,
            ..Default::default()
        }
    }

    pub fn add(&mut self, stack: Vec<Frame>, count: u64) {
        *self.stacks.entry(stack).or_insert(0) += count;
    }

    /// The sum of the values (samples or nanoseconds, by `kind`).
    pub fn total_samples(&self) -> u64 {
        self.stacks.values().sum()
    }

    /// Nanoseconds one unit of value stands for.
    pub fn ns_per_value(&self) -> u64 {
        self.kind.ns_per_value(self.rate_hz)
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
