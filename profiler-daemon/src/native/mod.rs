//! Native frames: the kernel's ([`kernel`], from kallsyms) and the target's
//! user stack, unwound from CFI ([`unwind`], [`cfi`]), symbolised with
//! blazesym ([`user`]) and merged with the Python frames ([`merge`]);
//! [`stacks::NativeStacks`] owns them per process, over [`maps`], the
//! process's executable mappings.
pub mod cfi;
pub mod kernel;
pub mod maps;
pub mod merge;
pub mod service;
pub mod stacks;
#[cfg(test)]
mod tests;
pub mod unwind;
pub mod user;
