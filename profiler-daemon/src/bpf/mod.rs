//! Loading the BPF sampler, feeding it processes, reading what it sends.
pub mod btf;
pub mod counters;
pub mod events;
pub mod pidns;
pub mod sampler;
