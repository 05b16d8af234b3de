//! Helpers shared by the integration tests of this crate (each test binary uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use anyhow::Result;
use ringmoe_model::Checkpoint;

/// A fixture model directory under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// Token ids `name` from a fixture's `reference.safetensors` (computed by transformers).
pub fn reference_ids(model: &str, name: &str) -> Result<Vec<u32>> {
    let dir = fixture(model);
    let r = Checkpoint::open_files(&dir, &[dir.join("reference.safetensors")])?;
    Ok(r.load_i64(name)?.0.into_iter().map(|x| x as u32).collect())
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Collects one `Result` per rank into one.
pub fn all_ok<T>(per_rank: Vec<Result<T>>) -> Result<Vec<T>> {
    per_rank.into_iter().collect()
}
