//! pyebpf: sample CPython 3.11-3.15 stacks from BPF and symbolise them in userspace.
//!
//! Crate layout (one job per module):
//! - [`native`]: native frames of the target: unwinding, symbols, and
//!   their merge with the Python frames.
//! - [`process`]: access to a target process (maps, memory, ELF files) and
//!   detection of its Python interpreter.
//! - [`python`]: CPython object layouts, one module per version: strings, code objects, line
//!   tables, and the symbol cache.
//! - [`bpf`]: loading the sampler, reading its ring buffer and counters.
//! - [`native`]: native frames: kernel stacks' symbols.
//! - [`profile`]: aggregated stacks and the output formats.
//! - [`model`]: the types every frontend (`record`, `top`, the daemon and
//!   its HTTP API) shares, so that none of them imports another.
//! - [`store`]: per-process stacks in one-second buckets, bounded in bytes,
//!   behind every frontend.
//! - [`record`]: the `pyebpf record` command.
//! - [`top`]: the `pyebpf top` command.
//! - `fuzz_harness`: the fuzz targets' checks (`fuzz/`), replayed by `cargo test`.
pub mod bpf;
pub mod caps;
pub mod daemon;
#[doc(hidden)]
pub mod fuzz_harness;
pub mod model;
pub mod native;
pub mod process;
pub mod profile;
pub mod python;
pub mod record;
pub mod seccomp;
pub mod store;
pub mod top;

/// The map for raw stacks and code addresses, hashed on every sample:
/// foldhash is several times faster than std's SipHash there (SipHash was
/// half of the daemon's CPU in `cargo xtask bench --self-profile`), and its
/// per-process random seed still keeps keys a target can choose from
/// colliding on purpose; the maps are also capped in size.
pub(crate) type FastHashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
