//! CPython 3.11 object layouts read from another process.
pub mod code;
pub mod linetable;
pub mod symbolizer;
pub mod unicode;
