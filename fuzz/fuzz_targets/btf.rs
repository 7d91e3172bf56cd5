#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pyebpf::fuzz_harness::btf(data));
