//! Where closed windows go: pprof files on disk and Pyroscope's ingest API.
pub mod pprof_dir;
pub mod pyroscope;
