//! CPython object layouts, per version, read from another process.
pub mod code;
pub mod layout;
pub mod linetable;
pub mod symbolizer;
#[cfg(test)]
pub(crate) mod test_python;
pub mod unicode;
