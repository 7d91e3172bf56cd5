//! Loading the BPF sampler, feeding it processes, reading what it sends.
