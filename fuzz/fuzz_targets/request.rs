//! One request line, any bytes: see `cacheward::fuzzing::request`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cacheward::fuzzing::request(data));
