//! A byte stream cut into arbitrary reads: see `cacheward::fuzzing::framer`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cacheward::fuzzing::framer(data));
