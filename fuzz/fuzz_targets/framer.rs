//! A byte stream cut into arbitrary reads: see `cacheward::rpc::fuzzing::framer`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cacheward::rpc::fuzzing::framer(data));
