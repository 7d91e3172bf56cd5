//! The daemon's loop run inside another command (`pyebpf top --local`):
//! no HTTP, and stopped by its owner.
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use tokio::runtime::Runtime;

use super::config::Config;
use super::run::{self, DaemonOptions, Handle, Prepared};
use crate::model::api::{ApiSource, LocalSampling, PreparedLocal};

/// Loads the sampler for a loop at `rate_hz`, keeping `retention_secs` of
/// stacks (a [`crate::model::api::PrepareLocal`]), with `off_cpu` the
/// cpu, off-cpu and wall types; starts no thread. The caller checks
/// privileges.
pub fn prepare(
    rate_hz: u64,
    retention_secs: u64,
    off_cpu: bool,
) -> anyhow::Result<Box<dyn PreparedLocal>> {
    use crate::profile::ProfileKind;
    let mut config = Config::default();
    config.sampling.rate_hz = rate_hz;
    if off_cpu {
        config.sampling.types = vec![ProfileKind::Cpu, ProfileKind::OffCpu, ProfileKind::Wall];
    }
    config.aggregation.retention_secs = retention_secs;
    config.aggregation.window_secs = config.aggregation.window_secs.min(retention_secs);
    let prepared = run::prepare(DaemonOptions {
        config,
        config_path: None,
        serve_http: false,
    })?;
    Ok(Box::new(Loaded(prepared)))
}

struct Loaded(Prepared);

impl PreparedLocal for Loaded {
    fn start(self: Box<Self>, rt: &Arc<Runtime>) -> anyhow::Result<Box<dyn LocalSampling>> {
        let handle = rt.block_on(run::start(self.0))?;
        Ok(Box::new(Local { handle }))
    }
}

struct Local {
    handle: Handle,
}

impl LocalSampling for Local {
    fn api(&self) -> &dyn ApiSource {
        &*self.handle.shared
    }

    fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    fn stop(self: Box<Self>, rt: &Runtime, timeout: Duration) -> anyhow::Result<()> {
        // The timer must be made inside the runtime.
        match rt.block_on(async { tokio::time::timeout(timeout, self.handle.stop()).await }) {
            Ok(r) => r,
            Err(_) => Err(anyhow!(
                "the sampling loop did not stop within {} s",
                timeout.as_secs()
            )),
        }
    }
}
