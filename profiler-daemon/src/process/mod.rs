//! Access to a target process: its memory, mappings and ELF files, and the
//! detection of a CPython interpreter inside it.
pub mod elf;
pub mod elf_cache;
pub mod exe_filter;
pub mod gil;
pub mod gilstate;
pub mod maps;
pub mod memory;
pub mod python;
pub mod tls;
pub mod tls_access;
