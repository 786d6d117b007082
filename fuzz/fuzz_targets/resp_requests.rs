//! A RESP request stream cut into arbitrary reads: see `cacheward::resp::fuzzing::requests`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cacheward::resp::fuzzing::requests(data));
