//! Fuzz target `upload`: hostile bytes into `ringmoe_fuzz::upload` (see that crate for what it covers).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringmoe_fuzz::upload(data));
