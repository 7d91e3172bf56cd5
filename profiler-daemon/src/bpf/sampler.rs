//! Loads the BPF sampler, attaches it to the CPU clock on every online CPU,
//! and gives access to its maps.
use std::os::fd::OwnedFd;
use std::time::Duration;

use aya::maps::{HashMap, MapData, PerCpuArray, ProgramArray, RingBuf};
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::programs::{PerfEvent, RawTracePoint};
use aya::{Ebpf, EbpfLoader};
use profiler_common::{
    ProcInfo, COUNTERS_LEN, HEADER_LEN, MAX_FRAMES, MAX_PROCS_ENTRIES, RAW_FRAME_LEN,
};

use super::btf;
use super::counters::Counters;
use super::pidns;

/// The compiled BPF object, built by `build.rs` with the pinned nightly.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    #[error("this pyebpf was built without its BPF programs (AYA_BUILD_SKIP was set)")]
    NotBuilt,
    #[error("cannot find task_struct.thread.fsbase in kernel BTF: {0}")]
    Btf(#[from] btf::BtfError),
    #[error("loading the BPF sampler failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("BPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("BPF program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("cannot list CPUs: {0}")]
    Cpus(String),
    #[error("--max-depth must be between 1 and {max}, got {got}")]
    MaxDepth { got: u32, max: usize },
    #[error("--rate must be between 1 and 10000 Hz, got {0}")]
    Rate(u64),
    #[error("at most {max} processes can be sampled at once, {got} were asked for")]
    MaxProcesses { got: u32, max: u32 },
    #[error(transparent)]
    PidNamespace(#[from] pidns::PidNsError),
}

/// What to sample and how often.
#[derive(Clone, Copy, Debug)]
pub struct SamplerConfig {
    pub rate_hz: u64,
    pub max_depth: u32,
    /// Ring-buffer size in bytes (rounded up to a power of two).
    pub ring_bytes: u32,
    /// Also report process exec/exit (for the daemon's discovery).
    pub process_events: bool,
    /// Processes that can be sampled at once (`PROCS` entries), at most
    /// [`MAX_PROCS_ENTRIES`].
    pub max_processes: u32,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            rate_hz: 99,
            max_depth: profiler_common::DEFAULT_MAX_DEPTH,
            ring_bytes: 8 << 20,
            process_events: false,
            max_processes: 1024,
        }
    }
}

/// Kernel-measured run time of the sampler's programs.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunStats {
    pub run_time: Duration,
    /// Invocations of the entry program (one per perf event).
    pub samples: u64,
    /// Invocations of the walker program (one per `FRAMES_PER_PROG` frames).
    pub walks: u64,
}

/// A loaded and attached sampler. Dropping it detaches everything.
pub struct Sampler {
    ebpf: Ebpf,
    procs: HashMap<MapData, u32, ProcInfo>,
    counters: PerCpuArray<MapData, u64>,
    /// Kept open: the kernel empties a program array when its last user fd closes.
    _walker: ProgramArray<MapData>,
    ring: Option<RingBuf<MapData>>,
    proc_events: Option<RingBuf<MapData>>,
    /// Pids whose exit is reported though they are not sampled; present
    /// with `process_events`.
    watch: Option<HashMap<MapData, u32, u8>>,
    _stats: Option<OwnedFd>,
    config: SamplerConfig,
    /// Last `ProcInfo::generation` handed out.
    generation: u32,
}

/// A sample wakes the reader once the ring holds more than this share of
/// its size; below that, samples wait for [`DRAIN_INTERVAL`].
const WAKEUP_FRACTION: u32 = 8;

/// How often readers drain the ring buffer. Samples with code objects not
/// sent before wake the reader at once (see the BPF `emit`), so only samples
/// of code already symbolised wait this long. Each wakeup costs the reader
/// about 80 us on the benchmark VM (context switches there are dear), so
/// at 99 Hz a 50 ms interval cost four times the CPU of this one.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(200);

fn map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, SamplerError> {
    ebpf.take_map(name).ok_or(SamplerError::MissingMap(name))
}

fn perf_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut PerfEvent, SamplerError> {
    ebpf.program_mut(name)
        .ok_or(SamplerError::MissingProgram(name))?
        .try_into()
        .map_err(|source| SamplerError::Program { name, source })
}

/// Attaches the exec and exit raw tracepoints.
fn attach_process_events(ebpf: &mut Ebpf) -> Result<(), SamplerError> {
    for (name, tp) in [
        ("on_exec", "sched_process_exec"),
        ("on_exit", "sched_process_exit"),
    ] {
        let prog: &mut RawTracePoint = ebpf
            .program_mut(name)
            .ok_or(SamplerError::MissingProgram(name))?
            .try_into()
            .map_err(|source| SamplerError::Program { name, source })?;
        prog.load()
            .map_err(|source| SamplerError::Program { name, source })?;
        prog.attach(tp)
            .map_err(|source| SamplerError::Program { name, source })?;
    }
    Ok(())
}

impl Sampler {
    /// Loads the programs and attaches them on every online CPU.
    pub fn start(config: SamplerConfig) -> Result<Sampler, SamplerError> {
        if OBJECT.is_empty() {
            return Err(SamplerError::NotBuilt);
        }
        if config.max_depth == 0 || config.max_depth as usize > MAX_FRAMES {
            return Err(SamplerError::MaxDepth {
                got: config.max_depth,
                max: MAX_FRAMES,
            });
        }
        if !(1..=10_000).contains(&config.rate_hz) {
            return Err(SamplerError::Rate(config.rate_hz));
        }
        if !(1..=MAX_PROCS_ENTRIES).contains(&config.max_processes) {
            return Err(SamplerError::MaxProcesses {
                got: config.max_processes,
                max: MAX_PROCS_ENTRIES,
            });
        }
        // Pids in the maps are the host's: they must be /proc's too.
        pidns::check()?;
        // Parsed once: the kernel's BTF is megabytes.
        let kernel = btf::Btf::from_sys_fs()?;
        let fsbase = btf::task_fsbase_offset(&kernel)?;
        // Not fatal: without it a sample of a thread in its last moments
        // (after it left the address space) counts as a failed TLS read.
        let mm_off = btf::task_mm_offset(&kernel).unwrap_or_else(|e| {
            tracing::warn!("kernel BTF lacks task_struct.mm ({e})");
            0
        });
        // Not fatal: without them the exit program falls back to taking
        // the leader thread's exit for the process's.
        let (signal_off, live_off) = btf::group_live_offsets(&kernel).unwrap_or_else(|e| {
            tracing::warn!(
                "kernel BTF lacks task_struct.signal or signal_struct.live ({e}): a process \
                 whose main thread exits before its others will be taken for gone"
            );
            (0, 0)
        });
        let ncpus =
            aya::util::nr_cpus().map_err(|(m, e)| SamplerError::Cpus(format!("{m}: {e}")))?;
        let ring_bytes = config.ring_bytes.max(1 << 16).next_power_of_two();
        // Run-time statistics feed the cost metrics; not fatal if refused.
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let wakeup_bytes = u64::from(ring_bytes / WAKEUP_FRACTION);
        let mut ebpf = EbpfLoader::new()
            .override_global("FSBASE_OFFSET", &fsbase, true)
            .override_global("MM_OFFSET", &mm_off, true)
            .override_global("MAX_DEPTH", &config.max_depth, true)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .override_global("SIGNAL_OFFSET", &signal_off, true)
            .override_global("LIVE_OFFSET", &live_off, true)
            .map_max_entries("SCRATCH", ncpus as u32)
            .map_max_entries("PROCS", config.max_processes)
            .map_max_entries("EVENTS", ring_bytes)
            .load(OBJECT)?;

        let walk = perf_program(&mut ebpf, "walk")?;
        let loading = std::time::Instant::now();
        walk.load().map_err(|source| SamplerError::Program {
            name: "walk",
            source,
        })?;
        // The walker is the program the verifier works hardest on: its
        // figures tell how close it is to the kernel's limits.
        tracing::debug!(
            took = ?loading.elapsed(),
            verified_insns = walk.info().ok().and_then(|i| i.verified_instruction_count()),
            "walker loaded"
        );
        let walk_fd = walk
            .fd()
            .map_err(|source| SamplerError::Program {
                name: "walk",
                source,
            })?
            .try_clone()
            .map_err(|e| SamplerError::Program {
                name: "walk",
                source: aya::programs::ProgramError::IOError(e),
            })?;
        let mut walker = ProgramArray::try_from(map(&mut ebpf, "WALKER")?).map_err(|source| {
            SamplerError::Map {
                name: "WALKER",
                source,
            }
        })?;
        walker
            .set(0, &walk_fd, 0)
            .map_err(|source| SamplerError::Map {
                name: "WALKER",
                source,
            })?;

        let procs =
            HashMap::try_from(map(&mut ebpf, "PROCS")?).map_err(|source| SamplerError::Map {
                name: "PROCS",
                source,
            })?;
        let counters = PerCpuArray::try_from(map(&mut ebpf, "COUNTERS")?).map_err(|source| {
            SamplerError::Map {
                name: "COUNTERS",
                source,
            }
        })?;
        let ring =
            RingBuf::try_from(map(&mut ebpf, "EVENTS")?).map_err(|source| SamplerError::Map {
                name: "EVENTS",
                source,
            })?;

        let (proc_events, watch) = if config.process_events {
            attach_process_events(&mut ebpf)?;
            let ring = RingBuf::try_from(map(&mut ebpf, "PROC_EVENTS")?).map_err(|source| {
                SamplerError::Map {
                    name: "PROC_EVENTS",
                    source,
                }
            })?;
            let watch = HashMap::try_from(map(&mut ebpf, "WATCH")?).map_err(|source| {
                SamplerError::Map {
                    name: "WATCH",
                    source,
                }
            })?;
            (Some(ring), Some(watch))
        } else {
            (None, None)
        };

        let sample = perf_program(&mut ebpf, "sample")?;
        sample.load().map_err(|source| SamplerError::Program {
            name: "sample",
            source,
        })?;
        let cpus =
            aya::util::online_cpus().map_err(|(m, e)| SamplerError::Cpus(format!("{m}: {e}")))?;
        for cpu in cpus {
            sample
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(config.rate_hz),
                    false,
                )
                .map_err(|source| SamplerError::Program {
                    name: "sample",
                    source,
                })?;
        }
        Ok(Sampler {
            ebpf,
            procs,
            counters,
            _walker: walker,
            ring: Some(ring),
            proc_events,
            watch,
            _stats: stats,
            config,
            generation: 0,
        })
    }

    pub fn config(&self) -> SamplerConfig {
        self.config
    }

    /// Starts sampling process `pid` (root-namespace tgid). Each call starts
    /// a new generation, so the BPF side treats every code object of the
    /// (possibly new) program under this pid as not yet seen.
    pub fn add_process(&mut self, pid: u32, mut info: ProcInfo) -> Result<(), SamplerError> {
        self.generation = self.generation.wrapping_add(1);
        info.generation = self.generation;
        self.procs
            .insert(pid, info, 0)
            .map_err(|source| SamplerError::Map {
                name: "PROCS",
                source,
            })
    }

    /// Stops sampling `pid`; not an error if it was not there.
    pub fn remove_process(&mut self, pid: u32) {
        let _ = self.procs.remove(&pid);
    }

    /// Reports the exit of `pid`, which is not sampled (being inspected,
    /// listed, followed): `false` if the watch list is full or process
    /// events are off (its end is then only seen by a `/proc` scan).
    pub fn watch(&mut self, pid: u32) -> bool {
        match &mut self.watch {
            Some(w) => w.insert(pid, 1u8, 0).is_ok(),
            None => false,
        }
    }

    /// Stops reporting the exit of `pid`; not an error if it was not there.
    pub fn unwatch(&mut self, pid: u32) {
        if let Some(w) = &mut self.watch {
            let _ = w.remove(&pid);
        }
    }

    /// The ring buffer, taken once by the reader task.
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    /// Process exec/exit events ([`profiler_common::ProcEvent`]), taken once;
    /// `None` unless `process_events` was set.
    pub fn take_proc_events(&mut self) -> Option<RingBuf<MapData>> {
        self.proc_events.take()
    }

    /// Sum of every counter over all CPUs.
    pub fn counters(&self) -> Result<Counters, SamplerError> {
        let mut slots = vec![0u64; COUNTERS_LEN as usize];
        for (i, slot) in slots.iter_mut().enumerate() {
            let per_cpu =
                self.counters
                    .get(&(i as u32), 0)
                    .map_err(|source| SamplerError::Map {
                        name: "COUNTERS",
                        source,
                    })?;
            *slot = per_cpu.iter().sum();
        }
        Ok(Counters::from_slots(&slots))
    }

    /// Kernel BPF statistics for both programs (zero if stats are off).
    pub fn run_stats(&self) -> RunStats {
        let info = |name: &str| {
            self.ebpf
                .program(name)
                .and_then(|p| p.info().ok())
                .map(|i| (i.run_time(), i.run_count()))
                .unwrap_or_default()
        };
        let (t1, n1) = info("sample");
        let (t2, n2) = info("walk");
        RunStats {
            run_time: t1 + t2,
            samples: n1,
            walks: n2,
        }
    }

    /// Size of the largest record the sampler can send.
    pub fn max_record_len(&self) -> usize {
        HEADER_LEN + self.config.max_depth as usize * RAW_FRAME_LEN
    }
}

/// Ticks every [`DRAIN_INTERVAL`]; a late tick is not made up for.
pub fn drain_timer() -> tokio::time::Interval {
    let mut t = tokio::time::interval(DRAIN_INTERVAL);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// Registers a ring buffer with the tokio reactor, for `readable()`.
pub fn poll_ring(
    ring: RingBuf<MapData>,
) -> anyhow::Result<tokio::io::unix::AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged
    // for as long as the AsyncFd owns the RingBuf.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot poll a BPF ring buffer: {e}"))
}
