//! `ringmoe bench rebalance`: what a worker pays when a rebalance moves experts — reading only
//! the experts its new placement adds (`Model::with_experts`, what a worker does) against
//! reloading the model with the new placement's experts, on the same checkpoint in one run,
//! alternating. The placements are those the coordinator would make: contiguous, then
//! `plan_balanced` for a Zipf load whose hot experts differ per layer.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ringmoe_model::{Checkpoint, LoadOptions, Model, ModelConfig};
use ringmoe_plan::{Placement, plan_balanced, planned_imbalance};
use serde_json::json;

use crate::decode_bench::rss_bytes;

#[derive(Args, Debug)]
pub struct RebalanceArgs {
    /// Checkpoint directory (`ringmoe bench make-model` writes the bench model).
    #[arg(long)]
    model: PathBuf,
    /// Workers the experts are placed over.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// The worker whose loads are timed.
    #[arg(long, default_value_t = 0)]
    worker: usize,
    /// Zipf exponent of the expert load the new placement balances.
    #[arg(long, default_value_t = 1.2)]
    zipf: f64,
    /// Expert slots per worker and layer (0: ⌈experts / workers⌉ + 1, the coordinator's default).
    #[arg(long, default_value_t = 0)]
    slots: usize,
    #[command(flatten)]
    weights: crate::WeightsOpts,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn run(a: RebalanceArgs) -> Result<()> {
    let cfg = ModelConfig::from_dir(&a.model)?;
    let (layers, experts, w) = (cfg.num_layers, cfg.moe.num_experts, a.workers.max(1));
    anyhow::ensure!(a.worker < w, "--worker {} of {w} workers", a.worker);
    let slots = if a.slots > 0 {
        a.slots
    } else {
        experts.div_ceil(w) + 1
    };
    let load: Vec<Vec<f64>> = (0..layers)
        .map(|l| {
            (0..experts)
                .map(|e| 1000.0 / (((e + 3 * l) % experts + 1) as f64).powf(a.zipf))
                .collect()
        })
        .collect();
    let old = Placement::contiguous(layers, experts, w)?;
    let new = plan_balanced(2, w, experts, slots, &load)?;
    let (sel_old, sel_new) = (old.selection(a.worker), new.selection(a.worker));
    let opts = |experts| LoadOptions {
        experts,
        weights: a.weights.weights,
    };
    // The file cache warm for both ways, read through a small buffer (no heap the loads below
    // could reuse, so the RSS figures are the weights').
    for e in std::fs::read_dir(&a.model)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let mut f = std::fs::File::open(&p)?;
            let mut buf = vec![0u8; 1 << 20];
            while std::io::Read::read(&mut f, &mut buf)? > 0 {}
        }
    }
    let rss_start = rss_bytes().unwrap_or(0);
    let base = Model::load(&a.model, &opts(sel_old.clone()))?;
    let rss_old = rss_bytes().unwrap_or(0);
    let (mut full_secs, mut incr_secs) = (Vec::new(), Vec::new());
    let (mut full_bytes, mut incr_bytes) = (0u64, 0u64);
    let mut rss_both = 0u64;
    let mut moved = ringmoe_model::ExpertDelta::default();
    for i in 0..a.repeat.max(1) {
        // Incremental: what a worker does (the old version keeps serving meanwhile).
        let ckpt = Checkpoint::open(&a.model)?;
        let t = Instant::now();
        let (next, delta) = base.with_experts(&ckpt, &sel_new, a.weights.weights)?;
        incr_secs.push(t.elapsed().as_secs_f64());
        incr_bytes = ckpt.bytes_read();
        moved = delta;
        // The checkpoint's mapped pages are not the weights': unmapped first.
        drop(ckpt);
        // Only the first round's: later ones reuse the heap the previous rounds freed.
        if i == 0 {
            rss_both = rss_bytes().unwrap_or(0);
        }
        drop(next);
        // A full reload with the new placement's experts.
        let ckpt = Checkpoint::open(&a.model)?;
        let t = Instant::now();
        let m = Model::from_checkpoint(cfg.clone(), &ckpt, &opts(sel_new.clone()))?;
        full_secs.push(t.elapsed().as_secs_f64());
        full_bytes = ckpt.bytes_read();
        drop(m);
    }
    let (full, incr) = (median(full_secs), median(incr_secs));
    let held = base.weight_bytes() as u64;
    let report = json!({
        "model": a.model.display().to_string(),
        "workers": w,
        "worker": a.worker,
        "slots_per_worker": slots,
        "weights": a.weights.weights.to_string(),
        "planned_imbalance_before": planned_imbalance(&old, &load),
        "planned_imbalance_after": planned_imbalance(&new, &load),
        "experts_loaded": moved.loaded,
        "experts_kept": moved.kept,
        "experts_dropped": moved.dropped,
        "full_reload_bytes_read": full_bytes,
        "full_reload_secs": full,
        "incremental_bytes_read": incr_bytes,
        "incremental_secs": incr,
        "weight_bytes_held": held,
        "rss_before_load": rss_start,
        "rss_old_version": rss_old,
        "rss_both_versions": rss_both,
        "repeat": a.repeat.max(1),
    });
    if a.json {
        println!("{report}");
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "rebalance of worker {} of {w} ({slots} slots per layer, Zipf {}): planned imbalance \
         {:.3} → {:.3}",
        a.worker,
        a.zipf,
        report["planned_imbalance_before"]
            .as_f64()
            .context("number")?,
        report["planned_imbalance_after"]
            .as_f64()
            .context("number")?,
    );
    println!(
        "experts: {} read, {} kept, {} dropped",
        moved.loaded, moved.kept, moved.dropped
    );
    println!(
        "incremental: {:.3} GiB read in {incr:.3} s; full reload: {:.3} GiB read in {full:.3} s \
         ({:.1}× the bytes, {:.1}× the time)",
        gib(incr_bytes),
        gib(full_bytes),
        full_bytes as f64 / incr_bytes.max(1) as f64,
        full / incr.max(1e-9),
    );
    println!(
        "RSS growth: {:.3} GiB with the old version loaded, {:.3} GiB with both versions alive \
         ({:.3} GiB of weights in the old one)",
        gib(rss_old.saturating_sub(rss_start)),
        gib(rss_both.saturating_sub(rss_start)),
        gib(held)
    );
    Ok(())
}
