//! Fuzz target `wire`: hostile bytes into `ringmoe_fuzz::wire` (see that crate for what it covers).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringmoe_fuzz::wire(data));
