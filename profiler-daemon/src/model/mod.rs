//! The types every frontend shares: `record`, `top`, the daemon and its
//! HTTP API all depend on this module, and none of them on another.
//!
//! - [`labels`]: who a profiled process is ([`labels::ProcessLabels`]).
//! - [`query`]: selectors, process listings and query errors.
//! - [`top`]: what `pyebpf top` shows, computed from per-process profiles.
//! - [`api`]: what a running sampling loop answers (the HTTP API's source,
//!   and `top`'s local mode).
//!
//! Frames and profiles themselves are in [`crate::profile`].
pub mod api;
pub mod labels;
pub mod query;
pub mod top;
