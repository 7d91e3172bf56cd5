//! The sampler's per-CPU outcome counters, summed over CPUs.
use profiler_common::{Counter, ProcCounter, ReadStep, READ_ERROR_BASE};

/// A snapshot of every outcome counter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Indexed by `Counter as usize`.
    pub outcomes: [u64; Counter::ALL.len()],
    /// Indexed by `ReadStep as usize`.
    pub read_errors: [u64; ReadStep::ALL.len()],
    /// The exec and exit programs' counters, in `ProcCounter::ALL` order.
    pub process: [u64; ProcCounter::ALL.len()],
}

impl Counters {
    /// Builds a snapshot from the summed counter slots.
    pub fn from_slots(slots: &[u64]) -> Self {
        let mut c = Counters::default();
        for k in Counter::ALL {
            c.outcomes[k as usize] = slots.get(k as usize).copied().unwrap_or(0);
        }
        for s in ReadStep::ALL {
            let i = (READ_ERROR_BASE + s as u32) as usize;
            c.read_errors[s as usize] = slots.get(i).copied().unwrap_or(0);
        }
        for (n, k) in ProcCounter::ALL.into_iter().enumerate() {
            c.process[n] = slots.get(k as usize).copied().unwrap_or(0);
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
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
