//! Native frames of the target: its user stack unwound from CFI
//! ([`unwind`], [`cfi`]), symbolised with blazesym ([`user`]) and merged
//! with the Python frames ([`merge`]); [`stacks::NativeStacks`] owns them
//! per process, over [`maps`], the process's executable mappings.
pub mod cfi;
pub mod maps;
pub mod merge;
pub mod stacks;
#[cfg(test)]
mod tests;
pub mod unwind;
pub mod user;
