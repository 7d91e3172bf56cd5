//! Loads the BPF sampler, attaches it to the CPU clock on every online CPU,
//! and gives access to its maps.
use std::os::fd::OwnedFd;
use std::time::Duration;

use aya::maps::{HashMap, MapData, PerCpuArray, ProgramArray, RingBuf};
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::programs::{BtfTracePoint, PerfEvent, RawTracePoint};
use aya::{Btf, Ebpf, EbpfLoader};
use profiler_common::{
    kstack_bytes, ProcInfo, COUNTERS_LEN, HEADER_LEN, KSTACK_MAX, MAX_FRAMES, MAX_PROCS_ENTRIES,
    RAW_FRAME_LEN,
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
    #[error("the off-CPU sampling period must be between {min} and {max} ns, got {got}")]
    OffCpuPeriod { got: u64, min: u64, max: u64 },
    #[error("nothing to sample: neither on-CPU nor off-CPU sampling is on")]
    NothingToSample,
    #[error("cannot read the kernel's BTF for the scheduler hooks: {0}")]
    KernelBtf(#[from] aya::BtfError),
    #[error(
        "off-CPU profiling needs the kernel tracepoint {0}, which this kernel lacks \
         (it came with Linux 6.16)"
    )]
    NoTracepoint(String),
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
    /// Sample threads on CPU with the perf clock at `rate_hz`.
    pub on_cpu: bool,
    /// Trace off-CPU intervals, sampled with this period T in ns (see the
    /// BPF `on_switch_in`); `None`: off.
    pub off_cpu_period_ns: Option<u64>,
    /// Kernel stacks of CPU samples that interrupted the kernel (off-CPU
    /// samples always carry theirs).
    pub kernel_stacks: bool,
    /// Bytes of each sampled thread's user stack copied into its record
    /// for native unwinding, and entry marks among its Python frames; 0:
    /// neither. Clamped to `USER_STACK_MIN..=USER_STACK_MAX`.
    pub user_stack_bytes: u32,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            rate_hz: 99,
            max_depth: profiler_common::DEFAULT_MAX_DEPTH,
            ring_bytes: 8 << 20,
            process_events: false,
            max_processes: 1024,
            on_cpu: true,
            off_cpu_period_ns: None,
            kernel_stacks: false,
            user_stack_bytes: 0,
        }
    }
}

impl SamplerConfig {
    /// Nanoseconds one CPU sample stands for.
    pub fn cpu_period_ns(&self) -> u64 {
        1_000_000_000 / self.rate_hz.max(1)
    }
}

/// Bounds of the off-CPU sampling period T: below 1 us every interval is
/// walked anyway; the BPF side needs `T * 2^32` to fit 64 bits.
pub const OFF_CPU_PERIOD_NS: std::ops::RangeInclusive<u64> = 1_000..=1_000_000_000;

/// Kernel frames of `on_switch_in`'s own stack that `bpf_get_stack` skips:
/// the BPF program and `bpf_trace_run1`, so an off-CPU stack starts at
/// `__schedule`. Measured on 6.18 (x86-64, ORC unwinder); the off-CPU
/// end-to-end tests check the first frame.
const OFF_CPU_KSTACK_SKIP: u32 = 2;

/// Kernel-measured run time and runs of one program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub run_time: Duration,
    pub runs: u64,
}

impl ProgramStats {
    /// Mean nanoseconds per run (0 without runs).
    pub fn ns_per_run(&self) -> f64 {
        if self.runs == 0 {
            0.0
        } else {
            self.run_time.as_secs_f64() * 1e9 / self.runs as f64
        }
    }
}

/// Kernel-measured run time of the sampler's programs.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunStats {
    /// Of every program.
    pub run_time: Duration,
    /// Invocations of the entry program (one per perf event).
    pub samples: u64,
    /// Invocations of the walker program (one per `FRAMES_PER_PROG` frames).
    pub walks: u64,
    /// `sched_switch`: every context switch on the host.
    pub switch_out: ProgramStats,
    /// `sched_exit_tp`: every return from `__schedule()` on the host.
    pub switch_in: ProgramStats,
    /// The off-CPU walker (one run per `FRAMES_PER_PROG` frames).
    pub off_walk: ProgramStats,
}

/// A loaded and attached sampler. Dropping it detaches everything.
pub struct Sampler {
    ebpf: Ebpf,
    procs: HashMap<MapData, u32, ProcInfo>,
    counters: PerCpuArray<MapData, u64>,
    /// Present when off-CPU intervals are traced.
    off_counters: Option<PerCpuArray<MapData, u64>>,
    /// Kept open: the kernel empties a program array when its last user fd closes.
    _walker: ProgramArray<MapData>,
    _off_walker: Option<ProgramArray<MapData>>,
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

fn program_error(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> SamplerError {
    move |source| SamplerError::Program { name, source }
}

/// Puts the loaded walker program `name` (its `fd`) into slot 0 of the
/// program array `array`, so it can chain to itself.
fn install_walker(
    ebpf: &mut Ebpf,
    name: &'static str,
    fd: aya::programs::ProgramFd,
    array: &'static str,
) -> Result<ProgramArray<MapData>, SamplerError> {
    let mut walker =
        ProgramArray::try_from(map(ebpf, array)?).map_err(|source| SamplerError::Map {
            name: array,
            source,
        })?;
    walker.set(0, &fd, 0).map_err(|source| SamplerError::Map {
        name: array,
        source,
    })?;
    tracing::trace!(program = name, "walker installed");
    Ok(walker)
}

/// The tracepoint at the end of `__schedule()` (Linux 6.16+), which runs
/// in the context of the thread switched in.
const SWITCH_IN_TRACEPOINT: &str = "sched_exit_tp";

/// Loads one of the scheduler programs as a BTF tracepoint on `tracepoint`.
fn load_btf_tracepoint<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    tracepoint: &str,
    btf: &Btf,
) -> Result<&'a mut BtfTracePoint, SamplerError> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(SamplerError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name))?;
    prog.load(tracepoint, btf).map_err(|source| match source {
        aya::programs::ProgramError::Btf(_) => SamplerError::NoTracepoint(tracepoint.to_string()),
        source => SamplerError::Program { name, source },
    })?;
    Ok(prog)
}

/// Loads the off-CPU programs and attaches them to the scheduler: the
/// walker first (it must be in its array before an interval can end), then
/// the end of intervals, then their start.
fn attach_off_cpu(ebpf: &mut Ebpf) -> Result<ProgramArray<MapData>, SamplerError> {
    let btf = Btf::from_sys_fs()?;
    let walk = load_btf_tracepoint(ebpf, "walk_off", SWITCH_IN_TRACEPOINT, &btf)?;
    let fd = walk
        .fd()
        .map_err(program_error("walk_off"))?
        .try_clone()
        .map_err(|e| SamplerError::Program {
            name: "walk_off",
            source: aya::programs::ProgramError::IOError(e),
        })?;
    let walker = install_walker(ebpf, "walk_off", fd, "OFF_WALKER")?;
    load_btf_tracepoint(ebpf, "on_switch_in", SWITCH_IN_TRACEPOINT, &btf)?
        .attach()
        .map_err(program_error("on_switch_in"))?;
    load_btf_tracepoint(ebpf, "on_switch_out", "sched_switch", &btf)?
        .attach()
        .map_err(program_error("on_switch_out"))?;
    Ok(walker)
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
        if let Some(t) = config.off_cpu_period_ns {
            if !OFF_CPU_PERIOD_NS.contains(&t) {
                return Err(SamplerError::OffCpuPeriod {
                    got: t,
                    min: *OFF_CPU_PERIOD_NS.start(),
                    max: *OFF_CPU_PERIOD_NS.end(),
                });
            }
        }
        if !config.on_cpu && config.off_cpu_period_ns.is_none() {
            return Err(SamplerError::NothingToSample);
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
        let cpu_period = config.cpu_period_ns();
        let cpu_kstacks = u32::from(config.kernel_stacks);
        let user_stack_bytes = match config.user_stack_bytes {
            0 => 0,
            n => n.clamp(
                profiler_common::USER_STACK_MIN as u32,
                profiler_common::USER_STACK_MAX as u32,
            ),
        };
        let off_cpu_period = config.off_cpu_period_ns.unwrap_or(*OFF_CPU_PERIOD_NS.end());
        let mut ebpf = EbpfLoader::new()
            // OFF_CPU is task storage, which aya has no wrapper for: only
            // the BPF side uses it.
            .allow_unsupported_maps()
            .override_global("CPU_PERIOD_NS", &cpu_period, true)
            .override_global("CPU_KSTACKS", &cpu_kstacks, true)
            .override_global("USER_STACK_BYTES", &user_stack_bytes, true)
            .override_global("OFF_CPU_PERIOD_NS", &off_cpu_period, true)
            .override_global("OFF_CPU_KSTACK_SKIP", &OFF_CPU_KSTACK_SKIP, true)
            .override_global("FSBASE_OFFSET", &fsbase, true)
            .override_global("MM_OFFSET", &mm_off, true)
            .override_global("MAX_DEPTH", &config.max_depth, true)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .override_global("SIGNAL_OFFSET", &signal_off, true)
            .override_global("LIVE_OFFSET", &live_off, true)
            .map_max_entries("SCRATCH", ncpus as u32)
            .map_max_entries("OFF_SCRATCH", ncpus as u32)
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
        let walker = install_walker(&mut ebpf, "walk", walk_fd, "WALKER")?;

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

        let (off_walker, off_counters) = match config.off_cpu_period_ns {
            Some(_) => {
                let walker = attach_off_cpu(&mut ebpf)?;
                let counters =
                    PerCpuArray::try_from(map(&mut ebpf, "OFF_COUNTERS")?).map_err(|source| {
                        SamplerError::Map {
                            name: "OFF_COUNTERS",
                            source,
                        }
                    })?;
                (Some(walker), Some(counters))
            }
            None => (None, None),
        };
        if config.on_cpu {
            let sample = perf_program(&mut ebpf, "sample")?;
            sample.load().map_err(|source| SamplerError::Program {
                name: "sample",
                source,
            })?;
            let cpus = aya::util::online_cpus()
                .map_err(|(m, e)| SamplerError::Cpus(format!("{m}: {e}")))?;
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
        }
        Ok(Sampler {
            ebpf,
            procs,
            counters,
            off_counters,
            _walker: walker,
            _off_walker: off_walker,
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
        let cpu = sum_slots(&self.counters, "COUNTERS")?;
        let off = match &self.off_counters {
            Some(c) => sum_slots(c, "OFF_COUNTERS")?,
            None => Vec::new(),
        };
        Ok(Counters::from_lanes(&cpu, &off))
    }

    /// Kernel BPF statistics of every program (zero if stats are off, or
    /// for a program not loaded).
    pub fn run_stats(&self) -> RunStats {
        let info = |name: &str| {
            self.ebpf
                .program(name)
                .and_then(|p| p.info().ok())
                .map(|i| ProgramStats {
                    run_time: i.run_time(),
                    runs: i.run_count(),
                })
                .unwrap_or_default()
        };
        let (sample, walk) = (info("sample"), info("walk"));
        let (switch_out, switch_in, off_walk) = (
            info("on_switch_out"),
            info("on_switch_in"),
            info("walk_off"),
        );
        RunStats {
            run_time: sample.run_time
                + walk.run_time
                + switch_out.run_time
                + switch_in.run_time
                + off_walk.run_time,
            samples: sample.runs,
            walks: walk.runs,
            switch_out,
            switch_in,
            off_walk,
        }
    }

    /// Size of the largest record the sampler can send.
    pub fn max_record_len(&self) -> usize {
        HEADER_LEN + kstack_bytes(KSTACK_MAX) + self.config.max_depth as usize * RAW_FRAME_LEN
    }
}

/// Every slot of a per-CPU counter array, summed over CPUs.
fn sum_slots(
    counters: &PerCpuArray<MapData, u64>,
    name: &'static str,
) -> Result<Vec<u64>, SamplerError> {
    let mut slots = vec![0u64; COUNTERS_LEN as usize];
    for (i, slot) in slots.iter_mut().enumerate() {
        let per_cpu = counters
            .get(&(i as u32), 0)
            .map_err(|source| SamplerError::Map { name, source })?;
        *slot = per_cpu.iter().sum();
    }
    Ok(slots)
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
