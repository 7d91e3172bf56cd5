//! Access to a target process: its memory, mappings and ELF files, and the
//! detection of a CPython 3.11 interpreter inside it.
pub mod elf;
pub mod elf_cache;
pub mod maps;
pub mod memory;
pub mod python;
pub mod tls;
