//! The sampler's per-CPU outcome counters, summed over CPUs.
use profiler_common::{Counter, OffCpuCounter, ProcCounter, ReadStep, READ_ERROR_BASE};

/// The outcomes of one kind of sample (on-CPU or off-CPU).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaneCounters {
    /// Indexed by `Counter as usize`.
    pub outcomes: [u64; Counter::ALL.len()],
    /// Indexed by `ReadStep as usize`.
    pub read_errors: [u64; ReadStep::ALL.len()],
    /// Indexed by `OffCpuCounter as usize`; an on-CPU lane only counts
    /// `KstackFailed` and `RegsFailed` here.
    pub off_cpu: [u64; OffCpuCounter::ALL.len()],
}

impl LaneCounters {
    fn from_slots(slots: &[u64]) -> Self {
        let at = |i: u32| slots.get(i as usize).copied().unwrap_or(0);
        let mut c = LaneCounters::default();
        for k in Counter::ALL {
            c.outcomes[k as usize] = at(k as u32);
        }
        for s in ReadStep::ALL {
            c.read_errors[s as usize] = at(READ_ERROR_BASE + s as u32);
        }
        for k in OffCpuCounter::ALL {
            c.off_cpu[k as usize] = at(k.slot());
        }
        c
    }

    pub fn get(&self, k: Counter) -> u64 {
        self.outcomes[k as usize]
    }

    pub fn read_error(&self, s: ReadStep) -> u64 {
        self.read_errors[s as usize]
    }

    pub fn off_cpu(&self, k: OffCpuCounter) -> u64 {
        self.off_cpu[k as usize]
    }

    fn since(&self, earlier: &LaneCounters) -> LaneCounters {
        let mut d = self.clone();
        for (a, b) in d.outcomes.iter_mut().zip(&earlier.outcomes) {
            *a = a.saturating_sub(*b);
        }
        for (a, b) in d.read_errors.iter_mut().zip(&earlier.read_errors) {
            *a = a.saturating_sub(*b);
        }
        for (a, b) in d.off_cpu.iter_mut().zip(&earlier.off_cpu) {
            *a = a.saturating_sub(*b);
        }
        d
    }
}

/// A snapshot of every outcome counter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Indexed by `Counter as usize`: on-CPU samples.
    pub outcomes: [u64; Counter::ALL.len()],
    /// Indexed by `ReadStep as usize`: on-CPU samples.
    pub read_errors: [u64; ReadStep::ALL.len()],
    /// The exec and exit programs' counters, in `ProcCounter::ALL` order.
    pub process: [u64; ProcCounter::ALL.len()],
    /// Kernel stacks and user registers of on-CPU samples that failed.
    pub cpu_extras: [u64; OffCpuCounter::ALL.len()],
    /// Off-CPU intervals and the outcomes of their samples.
    pub off_cpu: LaneCounters,
}

impl Counters {
    /// Builds a snapshot from the summed counter slots of on-CPU samples
    /// (`COUNTERS`).
    pub fn from_slots(slots: &[u64]) -> Self {
        Self::from_lanes(slots, &[])
    }

    /// Builds a snapshot from the summed slots of both lanes (`COUNTERS`,
    /// `OFF_COUNTERS`).
    pub fn from_lanes(cpu: &[u64], off: &[u64]) -> Self {
        let lane = LaneCounters::from_slots(cpu);
        let mut c = Counters {
            outcomes: lane.outcomes,
            read_errors: lane.read_errors,
            cpu_extras: lane.off_cpu,
            off_cpu: LaneCounters::from_slots(off),
            ..Counters::default()
        };
        for (n, k) in ProcCounter::ALL.into_iter().enumerate() {
            c.process[n] = cpu.get(k as usize).copied().unwrap_or(0);
        }
        c
    }

    pub fn process(&self, k: ProcCounter) -> u64 {
        ProcCounter::ALL
            .iter()
            .position(|x| *x == k)
            .map_or(0, |i| self.process[i])
    }

    pub fn get(&self, k: Counter) -> u64 {
        self.outcomes[k as usize]
    }

    pub fn read_error(&self, s: ReadStep) -> u64 {
        self.read_errors[s as usize]
    }

    /// Counts since `earlier`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut d = self.clone();
        for (a, b) in d.outcomes.iter_mut().zip(earlier.outcomes) {
            *a = a.saturating_sub(b);
        }
        for (a, b) in d.read_errors.iter_mut().zip(earlier.read_errors) {
            *a = a.saturating_sub(b);
        }
        for (a, b) in d.process.iter_mut().zip(earlier.process) {
            *a = a.saturating_sub(b);
        }
        for (a, b) in d.cpu_extras.iter_mut().zip(earlier.cpu_extras) {
            *a = a.saturating_sub(b);
        }
        d.off_cpu = self.off_cpu.since(&earlier.off_cpu);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::COUNTERS_LEN;

    #[test]
    fn slots_map_to_names() {
        let mut slots = vec![0u64; 24];
        slots[Counter::Sampled as usize] = 5;
        slots[(READ_ERROR_BASE + ReadStep::Code as u32) as usize] = 2;
        let c = Counters::from_slots(&slots);
        assert_eq!(c.get(Counter::Sampled), 5);
        assert_eq!(c.read_error(ReadStep::Code), 2);
        slots[ProcCounter::EventsLost as usize] = 3;
        let c = Counters::from_slots(&slots);
        assert_eq!(c.process(ProcCounter::EventsLost), 3);
        assert_eq!(c.process(ProcCounter::LiveUnreadable), 0);
        assert_eq!(c.since(&c).get(Counter::Sampled), 0);
    }

    #[test]
    fn lanes_are_kept_apart() {
        let mut cpu = vec![0u64; COUNTERS_LEN as usize];
        let mut off = vec![0u64; COUNTERS_LEN as usize];
        cpu[Counter::Sampled as usize] = 5;
        cpu[OffCpuCounter::KstackFailed.slot() as usize] = 1;
        off[Counter::Sampled as usize] = 7;
        off[(READ_ERROR_BASE + ReadStep::Frame as u32) as usize] = 2;
        off[OffCpuCounter::IntervalNs.slot() as usize] = 1_000_000;
        let c = Counters::from_lanes(&cpu, &off);
        assert_eq!(c.get(Counter::Sampled), 5);
        assert_eq!(c.cpu_extras[OffCpuCounter::KstackFailed as usize], 1);
        assert_eq!(c.off_cpu.get(Counter::Sampled), 7);
        assert_eq!(c.off_cpu.read_error(ReadStep::Frame), 2);
        assert_eq!(c.off_cpu.off_cpu(OffCpuCounter::IntervalNs), 1_000_000);
        let d = c.since(&Counters::from_lanes(&cpu, &[]));
        assert_eq!(
            (d.get(Counter::Sampled), d.off_cpu.get(Counter::Sampled)),
            (0, 7)
        );
    }
}
