//! `/metrics` of ingest and the store: what the store holds in bytes and
//! what it had to evict, refuse or drop (from its absolute counters), and
//! records that could not be decoded.
use std::sync::Mutex;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::store::{StoreBytes, StoreLimits, StoreStats};

/// The store's series, registered in the daemon's registry.
pub struct StoreMetrics {
    last: Mutex<StoreStats>,
    bytes: IntGaugeVec,
    budget: IntGaugeVec,
    stacks: IntGauge,
    overflowed: IntCounter,
    evicted_samples: IntCounter,
    evicted_seconds: IntCounter,
    collected: IntCounter,
    raw_cache_evictions: IntCounter,
    foreign: IntCounter,
    refused: IntCounterVec,
    decode_errors: IntCounter,
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are static and distinct");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    reg(r, IntCounter::new(name, help).expect("valid metric"))
}

/// Advances `c` by what `now` adds to `last` (store counters only grow).
fn advance(c: &IntCounter, last: u64, now: u64) {
    c.inc_by(now.saturating_sub(last));
}

impl StoreMetrics {
    pub fn register(r: &Registry) -> Self {
        let bytes = reg(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "pyebpf_store_bytes",
                    "Memory the profiles hold, by kind: interned frames and stacks, per-second \
                     counts, raw-stack caches and symbol caches.",
                ),
                &["kind"],
            )
            .expect("valid metric"),
        );
        for k in ["stacks", "buckets", "raw_cache", "symbols"] {
            bytes.with_label_values(&[k]);
        }
        let budget = reg(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "pyebpf_store_budget_bytes",
                    "Configured memory budgets of the profiles: in total and per process.",
                ),
                &["scope"],
            )
            .expect("valid metric"),
        );
        let refused = reg(
            r,
            IntCounterVec::new(
                Opts::new(
                    "pyebpf_store_processes_refused_total",
                    "Processes not held by the store, by reason: max_processes (the cap was \
                     reached), unsupported_list_full (an unsupported process dropped from \
                     /processes?all=1 beyond its 256 entries).",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        for k in ["max_processes", "unsupported_list_full"] {
            refused.with_label_values(&[k]);
        }
        StoreMetrics {
            last: Mutex::new(StoreStats::default()),
            bytes,
            budget,
            stacks: reg(
                r,
                IntGauge::new(
                    "pyebpf_store_stacks",
                    "Distinct (line-level) stacks held, over all processes.",
                )
                .expect("valid metric"),
            ),
            overflowed: counter(
                r,
                "pyebpf_stacks_overflowed_total",
                "Samples counted under [stack table full]: their stack was new while the \
                 process's stack cap or memory budget was reached with nothing older to evict.",
            ),
            evicted_samples: counter(
                r,
                "pyebpf_store_evicted_samples_total",
                "Samples dropped before the end of the retention, with the oldest seconds of a \
                 process evicted to fit the memory budgets.",
            ),
            evicted_seconds: counter(
                r,
                "pyebpf_store_evicted_seconds_total",
                "One-second buckets (of one process each) evicted before the end of the \
                 retention to fit the memory budgets.",
            ),
            collected: counter(
                r,
                "pyebpf_stacks_collected_total",
                "Distinct stacks freed because every second that counted them expired.",
            ),
            raw_cache_evictions: counter(
                r,
                "pyebpf_raw_stack_cache_evictions_total",
                "Raw stacks evicted from the per-process raw-stack caches (least recently used \
                 first); their next sample is symbolised again.",
            ),
            foreign: counter(
                r,
                "pyebpf_samples_foreign_total",
                "Samples of a pid the store does not hold (not profiled, exited or replaced \
                 while its samples were in flight).",
            ),
            refused,
            decode_errors: counter(
                r,
                "pyebpf_sample_decode_errors_total",
                "Ring-buffer records that could not be decoded as samples (dropped).",
            ),
        }
    }

    /// One ring-buffer record could not be decoded.
    pub fn inc_decode_errors(&self) {
        self.decode_errors.inc();
    }

    /// Updates every series from the store's current state.
    pub fn set(&self, stats: &StoreStats, bytes: &StoreBytes, limits: &StoreLimits, stacks: usize) {
        let g = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        for (k, v) in [
            ("stacks", bytes.stacks),
            ("buckets", bytes.buckets),
            ("raw_cache", bytes.raw_cache),
            ("symbols", bytes.symbols),
        ] {
            self.bytes.with_label_values(&[k]).set(g(v));
        }
        self.budget
            .with_label_values(&["total"])
            .set(g(limits.max_bytes));
        self.budget
            .with_label_values(&["process"])
            .set(g(limits.max_bytes_per_process));
        self.stacks.set(g(stacks));
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        advance(
            &self.overflowed,
            last.stacks_overflowed,
            stats.stacks_overflowed,
        );
        advance(
            &self.evicted_samples,
            last.samples_evicted,
            stats.samples_evicted,
        );
        advance(
            &self.evicted_seconds,
            last.seconds_evicted,
            stats.seconds_evicted,
        );
        advance(
            &self.collected,
            last.stacks_collected,
            stats.stacks_collected,
        );
        advance(
            &self.raw_cache_evictions,
            last.raw_cache_evictions,
            stats.raw_cache_evictions,
        );
        advance(&self.foreign, last.foreign_samples, stats.foreign_samples);
        let refused = |k: &str| self.refused.with_label_values(&[k]);
        advance(
            &refused("max_processes"),
            last.processes_refused,
            stats.processes_refused,
        );
        advance(
            &refused("unsupported_list_full"),
            last.unsupported_evicted,
            stats.unsupported_evicted,
        );
        *last = *stats;
    }
}
