//! `ringmoe bench moe`: one MoE layer's routed experts on W ranks (expert parallelism) against one
//! rank holding every expert, on random weights and tokens: tokens/s with two-batch overlap off
//! and on, bytes moved per token against the minimum, and the load imbalance of a skewed router
//! with and without replicas of the hottest experts.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, ensure};
use clap::{Args, ValueEnum};
use ringmoe_comm::local::{on_every_rank, tcp_group};
use ringmoe_comm::{Communicator, Kind, Tag, TcpOptions, in_process};
use ringmoe_core::testing::rand_vec;
use ringmoe_model::moe::{ExpertSet, ExpertWeights, Routing, TopKNorm, experts_local, route};
use ringmoe_parallel::{ExpertParallel, LoadTracker, MoeStats, Placement, moe_parallel};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Inproc,
    /// TCP on 127.0.0.1, ranks as threads of this process.
    Tcp,
}

#[derive(Args)]
pub struct MoeArgs {
    #[arg(long, default_value_t = 16)]
    experts: usize,
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    #[arg(long, default_value_t = 704)]
    intermediate: usize,
    /// Tokens in the layer, split evenly over the ranks.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    #[arg(long, value_enum, default_value = "inproc")]
    transport: Transport,
    /// Router bias against higher expert ids (logit −skew·e) for the imbalance measurement.
    #[arg(long, default_value_t = 0.1)]
    skew: f32,
    /// Timed runs per configuration (the fastest is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long)]
    json: bool,
}

fn routing(tokens: usize, n: usize, k: usize, seed: u64, skew: f32) -> Result<Routing> {
    let mut logits = rand_vec(tokens * n, seed, 1.0);
    for row in logits.chunks_mut(n) {
        for (e, l) in row.iter_mut().enumerate() {
            *l -= skew * e as f32;
        }
    }
    Ok(route(&logits, n, k, TopKNorm::Renormalize)?)
}

struct Setup {
    hidden: usize,
    experts: Vec<ExpertWeights>,
    /// Per rank: tokens and routing.
    inputs: Vec<(Vec<f32>, Routing)>,
}

impl Setup {
    fn set_for(&self, placement: Option<&Placement>, worker: usize) -> ExpertSet {
        ExpertSet {
            layer: 0,
            experts: self
                .experts
                .iter()
                .enumerate()
                .map(|(e, w)| {
                    placement
                        .is_none_or(|p| p.hosts(0, e, worker))
                        .then(|| w.clone())
                })
                .collect(),
        }
    }
}

/// Runs the layer `repeat` times on every rank; the fastest wall time and the last stats.
fn run_ep(
    comms: &[Communicator],
    s: &Setup,
    ep: &ExpertParallel,
    repeat: usize,
) -> Result<(f64, Vec<MoeStats>)> {
    let sets: Vec<ExpertSet> = (0..comms.len())
        .map(|w| s.set_for(Some(&ep.placement), w))
        .collect();
    let mut best = f64::INFINITY;
    let mut stats = Vec::new();
    for i in 0..repeat.max(1) {
        let t = Instant::now();
        stats = on_every_rank(comms, |c| -> Result<MoeStats> {
            let (x, r) = &s.inputs[c.rank()];
            let tag = Tag::new(7, 0, i as u32, Kind::Dispatch);
            Ok(moe_parallel(c, ep, 0, &sets[c.rank()], x, s.hidden, r, tag)?.1)
        })
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok((best, stats))
}

pub fn run(a: MoeArgs) -> Result<()> {
    ensure!(
        a.workers >= 1 && a.experts >= 1 && a.top_k >= 1 && a.top_k <= a.experts,
        "need workers ≥ 1 and 1 ≤ top-k ≤ experts"
    );
    let (h, n, k, w) = (a.hidden, a.experts, a.top_k, a.workers);
    let experts: Vec<ExpertWeights> = (0..n as u64)
        .map(|e| {
            ExpertWeights::from_f32(
                h,
                a.intermediate,
                rand_vec(2 * a.intermediate * h, 10 + 2 * e, 0.05),
                rand_vec(h * a.intermediate, 11 + 2 * e, 0.05),
            )
        })
        .collect::<Result<_, _>>()?;
    let per_rank = a.tokens / w;
    let make = |skew: f32| -> Result<Setup> {
        Ok(Setup {
            hidden: h,
            experts: experts.clone(),
            inputs: (0..w)
                .map(|r| -> Result<(Vec<f32>, Routing)> {
                    let x = rand_vec(per_rank * h, 100 + r as u64, 1.0);
                    Ok((x, routing(per_rank, n, k, 200 + r as u64, skew)?))
                })
                .collect::<Result<_>>()?,
        })
    };
    let uniform = make(0.0)?;
    let tokens = per_rank * w;

    // One rank, every expert, every token (the same rows as the W ranks together).
    let all_x: Vec<f32> = uniform.inputs.iter().flat_map(|i| i.0.clone()).collect();
    let all_r = Routing {
        top_k: k,
        expert_ids: uniform
            .inputs
            .iter()
            .flat_map(|i| i.1.expert_ids.clone())
            .collect(),
        weights: uniform
            .inputs
            .iter()
            .flat_map(|i| i.1.weights.clone())
            .collect(),
    };
    let full = uniform.set_for(None, 0);
    let mut single = f64::INFINITY;
    for _ in 0..a.repeat.max(1) {
        let t = Instant::now();
        experts_local(&all_x, h, &all_r, &full)?;
        single = single.min(t.elapsed().as_secs_f64());
    }

    let comms = match a.transport {
        Transport::Inproc => in_process(w, std::time::Duration::from_secs(600)),
        Transport::Tcp => tcp_group(
            w,
            &TcpOptions::default(),
            std::time::Duration::from_secs(600),
        )?,
    };
    let base = Placement::contiguous(1, n, w)?;
    let mut timings = Vec::new();
    let (mut bytes, mut remote) = (0u64, 0u64);
    for overlap in [false, true] {
        let ep = ExpertParallel {
            overlap,
            ..ExpertParallel::new(base.clone())
        };
        let (secs, stats) = run_ep(&comms, &uniform, &ep, a.repeat)?;
        bytes = stats.iter().map(|s| s.bytes_sent).sum();
        remote = stats.iter().map(|s| s.rows_remote).sum();
        let wait: f64 = stats.iter().map(|s| s.wait_secs).sum::<f64>() / w as f64;
        timings.push((overlap, secs, wait));
    }
    let min_bytes_per_token = (k * h * 4 * 2) as f64;
    let bytes_per_token = bytes as f64 / tokens as f64;
    // What the remote rows alone need (rows out and results back, f32): the frame overhead.
    let remote_min = (remote as usize * h * 4 * 2) as f64;

    // Skewed router: imbalance with the base placement, then with the two hottest replicated.
    let skewed = make(a.skew)?;
    let imbalance = |placement: &Placement| -> Result<(f64, Vec<u64>, Vec<Vec<u64>>)> {
        let load = Arc::new(LoadTracker::default());
        let ep = ExpertParallel {
            load: load.clone(),
            ..ExpertParallel::new(placement.clone())
        };
        run_ep(&comms, &skewed, &ep, 1)?;
        let snap = load.snapshot();
        Ok((snap.imbalance(w), snap.per_worker(w), snap.per_expert(1, n)))
    };
    let (before, rows_before, per_expert) = imbalance(&base)?;
    let hot = base.replicate_hot(&per_expert, 2)?;
    let (after, rows_after, _) = imbalance(&hot)?;

    let tps = |secs: f64| tokens as f64 / secs;
    if a.json {
        println!(
            "{}",
            json!({
                "experts": n, "top_k": k, "hidden": h, "intermediate": a.intermediate,
                "tokens": tokens, "workers": w, "transport": format!("{:?}", a.transport),
                "single_rank_tokens_per_s": tps(single),
                "ep_tokens_per_s": tps(timings[0].1),
                "ep_overlap_tokens_per_s": tps(timings[1].1),
                "ep_wait_s": timings[0].2, "ep_overlap_wait_s": timings[1].2,
                "bytes_per_token": bytes_per_token,
                "min_bytes_per_token": min_bytes_per_token,
                "remote_rows": remote, "bytes_over_remote_rows_minimum": bytes as f64 / remote_min,
                "skew": a.skew,
                "imbalance": before, "imbalance_with_2_hot_replicas": after,
                "rows_per_worker": rows_before, "rows_per_worker_with_replicas": rows_after,
            })
        );
    } else {
        println!(
            "MoE layer: {n} experts, top-{k}, hidden {h}, intermediate {}, {tokens} tokens",
            a.intermediate
        );
        println!(
            "  1 rank, all experts        {:>10.0} tokens/s",
            tps(single)
        );
        for (overlap, secs, wait) in &timings {
            println!(
                "  {w} ranks {:?}, overlap {:<5} {:>10.0} tokens/s ({:.2}× of 1 rank), mean wait {:.3} s",
                a.transport,
                overlap,
                tps(*secs),
                single / secs,
                wait
            );
        }
        println!(
            "  bytes moved per token {bytes_per_token:.0} vs minimum top-k·hidden·4·2 = \
             {min_bytes_per_token:.0} (ratio {:.3}; rows for a rank's own experts stay home); \
             {remote} rows crossed ranks, bytes / (those rows · hidden · 4 · 2) = {:.4}",
            bytes_per_token / min_bytes_per_token,
            bytes as f64 / remote_min
        );
        println!(
            "  skew {}: rows per worker {rows_before:?} max/mean {before:.2}; with the 2 hottest \
             experts replicated {rows_after:?} max/mean {after:.2}",
            a.skew
        );
    }
    Ok(())
}
