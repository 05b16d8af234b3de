//! Fuzz target `shard_header`: hostile bytes into `ringmoe_fuzz::shard_header` (see that crate for what it covers).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringmoe_fuzz::shard_header(data));
