//! Helpers shared by the integration tests of this crate (each test binary uses some of them).
#![allow(dead_code, unused_imports)]

use anyhow::Result;
use ringmoe_model::Checkpoint;
pub use ringmoe_testkit::{ARCH_FIXTURES, fixture, max_abs_diff};

/// Token ids `name` from a fixture's `reference.safetensors` (computed by transformers).
pub fn reference_ids(model: &str, name: &str) -> Result<Vec<u32>> {
    let dir = fixture(model);
    let r = Checkpoint::open_files(&dir, &[dir.join("reference.safetensors")])?;
    Ok(r.load_i64(name)?.0.into_iter().map(|x| x as u32).collect())
}

/// Collects one `Result` per rank into one.
pub fn all_ok<T>(per_rank: Vec<Result<T>>) -> Result<Vec<T>> {
    per_rank.into_iter().collect()
}
