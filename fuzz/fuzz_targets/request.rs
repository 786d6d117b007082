//! One request line, any bytes: see `cacheward::rpc::fuzzing::request`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cacheward::rpc::fuzzing::request(data));
