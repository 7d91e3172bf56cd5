//! What frontends ask of a profile store and what it answers: selectors,
//! process listings, errors, and the window of a `top` query.
use serde::Serialize;

use super::labels::ProcessLabels;

/// Which process(es) a query is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Pid(u32),
    /// Every process with this service label, merged.
    Service(String),
}

/// [`ProcessView::status`] of a process being profiled.
pub const STATUS_PROFILED: &str = "profiled";
/// [`ProcessView::status`] of a profiled process that exited (listed until
/// its data expires).
pub const STATUS_EXITED: &str = "exited";
/// [`ProcessView::status`] of a profiled process that exec'd a program
/// pyebpf does not profile: its Python program is over though the pid lives
/// on ([`ProcessView::replaced_by`] names the new program). Listed until its
/// data expires.
pub const STATUS_REPLACED: &str = "replaced";
/// [`ProcessView::status`] of a CPython process refused for its version or
/// build (listed by `/processes?all=1` only).
pub const STATUS_UNSUPPORTED: &str = "unsupported";
/// Python, but discovery gave up reading it (the reason says why).
pub const STATUS_FAILED: &str = "failed";

/// A process as listed by `/processes`: profiled, exited (while its data is
/// retained), or, with `?all=1`, a CPython process refused for its version
/// or build.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessView {
    pub labels: ProcessLabels,
    /// e.g. "3.11.7" (a free-threaded build has no `t` here; see `python`).
    pub python_version: String,
    /// Major.minor, with `t` for a free-threaded build: "3.11", "3.14t"
    /// (the `python` label of the metrics).
    pub python: String,
    /// [`STATUS_PROFILED`], [`STATUS_EXITED`], [`STATUS_REPLACED`] or
    /// [`STATUS_UNSUPPORTED`].
    pub status: &'static str,
    /// Unix seconds when profiling started (when it was refused, for an
    /// unsupported process).
    pub since: u64,
    /// Samples held for this process (within retention).
    pub samples: u64,
    /// Memory its profile holds now (stacks, counts, caches).
    pub memory_bytes: u64,
    /// Samples dropped before the end of the retention (its oldest
    /// seconds evicted) to fit the memory budgets.
    pub evicted_samples: u64,
    /// Why an unsupported process is not profiled (absent for the others).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The command (`comm`) the pid runs since an exec ended its Python
    /// program (status [`STATUS_REPLACED`]; absent for the others).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
    /// Profile types that can be queried (`cpu`, `wall`, `off-cpu`);
    /// none for a process not profiled.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<&'static str>,
    /// Seconds its threads spent waiting for the GIL since profiling
    /// started (off-CPU sampling only; absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gil_wait_seconds: Option<f64>,
    /// Wall seconds of its threads (on CPU plus off CPU) since profiling
    /// started (with both on- and off-CPU sampling; absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wall_seconds: Option<f64>,
}

/// Why a query could not be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("not ready: {0}")]
    NotReady(String),
    /// The answer would take more memory than one request may use.
    #[error("{0}")]
    TooLarge(String),
}

/// What a `top` query for the last `seconds` asks of the store: those many
/// complete seconds and the current, partial one (so that the last second
/// is never empty), within the retention.
pub fn top_span(seconds: u32, retention: u32) -> u32 {
    seconds.saturating_add(1).min(retention.max(1))
}

/// The window of a `top` query: `seconds` checked against the retention,
/// `None` meaning the whole retention.
pub fn checked_top_seconds(seconds: Option<u32>, retention: u32) -> Result<u32, QueryError> {
    match seconds {
        None => Ok(retention.max(1)),
        Some(s) if (1..=retention).contains(&s) => Ok(s),
        Some(s) => Err(QueryError::BadRequest(format!(
            "bad seconds {s}: expected a whole number from 1 to {retention} (the retention)"
        ))),
    }
}
