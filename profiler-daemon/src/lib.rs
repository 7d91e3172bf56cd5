//! pyebpf: sample Python 3.11 stacks from BPF and symbolise them in userspace.
//!
//! Crate layout (one job per module):
//! - [`process`]: access to a target process (maps, memory, ELF files) and
//!   detection of its Python interpreter.
//! - [`python`]: CPython 3.11 object layouts: strings, code objects, line
//!   tables, and the symbol cache.
//! - [`bpf`]: loading the sampler, reading its ring buffer and counters.
//! - [`profile`]: aggregated stacks and the output formats.
//! - [`record`]: the `pyebpf record` command.
//! - [`top`]: the `pyebpf top` command.
pub mod aggregate;
pub mod bpf;
pub mod caps;
pub mod daemon;
pub mod process;
pub mod profile;
pub mod python;
pub mod record;
pub mod top;
