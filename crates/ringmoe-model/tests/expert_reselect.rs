//! `Model::with_experts`: a new expert selection reads only the experts it adds, drops the ones
//! it no longer names, and gives the same logits as a model loaded with that selection from
//! scratch (what a worker does when a rebalanced placement moves experts).

use anyhow::{Result, ensure};
use ringmoe_core::WeightPrecision;
use ringmoe_model::{Checkpoint, ExpertSelection, LoadOptions, LogitsFor, Model};
use ringmoe_testkit::fixture;

use ringmoe_testkit::MODEL_FIXTURES as FIXTURES;

fn load(name: &str, experts: ExpertSelection) -> Result<Model> {
    let opts = LoadOptions {
        experts,
        ..LoadOptions::default()
    };
    Ok(Model::load(&fixture(name), &opts)?)
}

#[test]
fn reselecting_reads_only_the_new_experts_and_matches_a_fresh_load() -> Result<()> {
    for name in FIXTURES {
        let full = load(name, ExpertSelection::All)?;
        let n = full.config.moe.num_experts;
        let layers = full.config.num_layers;
        let some = ExpertSelection::PerLayer(
            (0..layers)
                .map(|l| (0..n).filter(|e| (e + l) % 3 != 0).collect())
                .collect(),
        );
        let partial = load(name, some.clone())?;
        let ckpt = Checkpoint::open(&fixture(name))?;
        let (grown, delta) =
            partial.with_experts(&ckpt, &ExpertSelection::All, WeightPrecision::Native)?;
        // Dense layers (Qwen3's `mlp_only_layers`) have no experts to move.
        let sparse: Vec<usize> = (0..layers)
            .filter(|&l| matches!(full.layers()[l].mlp, ringmoe_model::layers::Mlp::Sparse(_)))
            .collect();
        ensure!(!sparse.is_empty(), "{name}");
        let added: usize = sparse
            .iter()
            .map(|l| (0..n).filter(|e| (e + l) % 3 == 0).count())
            .sum();
        ensure!(
            delta.loaded == added && delta.dropped == 0,
            "{name}: {delta:?}"
        );
        ensure!(delta.kept == sparse.len() * n - added, "{name}: {delta:?}");
        // Only the added experts were read from the file: native precision holds them as
        // stored, so the bytes read are exactly the bytes they occupy.
        ensure!(
            ckpt.bytes_read() as usize == delta.loaded_bytes,
            "{name}: read {} for {} bytes of experts",
            ckpt.bytes_read(),
            delta.loaded_bytes
        );
        ensure!(
            grown.weight_bytes() == full.weight_bytes(),
            "{name}: {} vs {}",
            grown.weight_bytes(),
            full.weight_bytes()
        );
        let ids: Vec<u32> = (0..24)
            .map(|i| (i * 7 + 3) % full.config.vocab_size as u32)
            .collect();
        let a = full.forward(&ids, &mut full.new_cache(), LogitsFor::All)?;
        let b = grown.forward(&ids, &mut grown.new_cache(), LogitsFor::All)?;
        ensure!(
            a.logits.as_slice() == b.logits.as_slice(),
            "{name}: logits differ"
        );
        // And back: dropping experts frees them and reads nothing.
        let ckpt = Checkpoint::open(&fixture(name))?;
        let (shrunk, back) = grown.with_experts(&ckpt, &some, WeightPrecision::Native)?;
        ensure!(
            back.loaded == 0 && back.dropped == added,
            "{name}: {back:?}"
        );
        ensure!(ckpt.bytes_read() == 0, "{name}: read {}", ckpt.bytes_read());
        ensure!(shrunk.weight_bytes() == partial.weight_bytes(), "{name}");
        ensure!(
            back.dropped_bytes == full.weight_bytes() - partial.weight_bytes(),
            "{name}"
        );
    }
    Ok(())
}
