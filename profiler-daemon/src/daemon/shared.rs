//! State the sampling loop shares with the HTTP API.
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use super::metrics::Metrics;
use super::store::Store;
use super::{ApiSource, ProcessView, QueryError, Selector};
use crate::profile::Profile;

/// The store, the metrics and readiness, behind one `Arc`.
pub struct Shared {
    store: Mutex<Store>,
    pub metrics: Metrics,
    ready: Mutex<Result<(), String>>,
}

impl Shared {
    pub fn new(store: Store, metrics: Metrics) -> Self {
        Shared {
            store: Mutex::new(store),
            metrics,
            ready: Mutex::new(Err("starting: first process scan not done".into())),
        }
    }

    /// The store; a panic while it was held cannot leave it half-updated in a
    /// way that matters more than stopping the daemon would, so poisoning is
    /// ignored.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_ready(&self, r: Result<(), String>) {
        *self.ready.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }
}

impl ApiSource for Shared {
    fn processes(&self) -> Vec<ProcessView> {
        self.store().views()
    }

    fn profile(&self, selector: &Selector, seconds: u32) -> Result<Profile, QueryError> {
        self.store().query(selector, seconds, SystemTime::now())
    }

    fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    fn ready(&self) -> Result<(), String> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn retention_secs(&self) -> u32 {
        self.store().retention_secs()
    }
}
