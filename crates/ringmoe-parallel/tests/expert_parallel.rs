//! Expert parallelism against the single-process engine: the MoE layer alone on random data
//! (every placement, replicas, capacity, overlap, malformed frames), and whole fixture models
//! with experts sharded over workers, alone and combined with ring attention, in-process and TCP.

mod common;

use common::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ringmoe_comm::local::{on_every_rank, tcp_group};
use ringmoe_comm::{Communicator, Data, Kind, Payload, Tag, TcpOptions, in_process};
use ringmoe_core::WeightPrecision;
use ringmoe_core::testing::rand_vec;
use ringmoe_model::moe::{ExpertSet, ExpertWeights, Routing, TopKNorm, experts_local, route};
use ringmoe_model::{Checkpoint, LoadOptions, LogitsFor, Model, ModelConfig};
use ringmoe_parallel::{
    ExpertParallel, JobOptions, MoeStats, Placement, ShardPlan, Sharding, moe_parallel,
    prefill_shard_with,
};

// ---- The MoE layer alone -------------------------------------------------------------------

const HIDDEN: usize = 24;

fn random_experts(n: usize, seed: u64) -> Result<Vec<ExpertWeights>> {
    (0..n as u64)
        .map(|e| {
            ExpertWeights::from_f32(
                HIDDEN,
                16,
                rand_vec(2 * 16 * HIDDEN, seed + 2 * e, 0.5),
                rand_vec(HIDDEN * 16, seed + 2 * e + 1, 0.5),
            )
            .map_err(anyhow::Error::from)
        })
        .collect()
}

/// The experts `worker` hosts under `placement` (layer 0), the others `None`.
fn hosted_set(all: &[ExpertWeights], placement: &Placement, worker: usize) -> ExpertSet {
    ExpertSet {
        layer: 0,
        experts: all
            .iter()
            .enumerate()
            .map(|(e, w)| placement.hosts(0, e, worker).then(|| w.clone()))
            .collect(),
    }
}

/// Per rank: its tokens and their routing (skewed toward low expert ids when `skew`).
fn rank_inputs(world: usize, n: usize, k: usize, seed: u64, skew: f32) -> Vec<(Vec<f32>, Routing)> {
    (0..world)
        .map(|r| {
            let tokens = 5 + 7 * r; // uneven shards, as zigzag gives
            let x = rand_vec(tokens * HIDDEN, seed + 100 * r as u64, 1.0);
            let mut logits = rand_vec(tokens * n, seed + 100 * r as u64 + 1, 2.0);
            for row in logits.chunks_mut(n) {
                for (e, l) in row.iter_mut().enumerate() {
                    *l -= skew * e as f32;
                }
            }
            (
                x,
                route(&logits, n, k, TopKNorm::Renormalize).unwrap_or_else(|e| panic!("{e}")),
            )
        })
        .collect()
}

/// Runs the MoE layer on every rank; returns each rank's output and stats.
fn run_layer(
    comms: &[Communicator],
    all: &[ExpertWeights],
    ep: &ExpertParallel,
    inputs: &[(Vec<f32>, Routing)],
) -> Result<Vec<(Vec<f32>, MoeStats)>> {
    all_ok(on_every_rank(comms, |c| -> Result<(Vec<f32>, MoeStats)> {
        let r = c.rank();
        let set = hosted_set(all, &ep.placement, r);
        let (x, routing) = &inputs[r];
        let tag = Tag::new(5, 0, 0, Kind::Dispatch);
        Ok(moe_parallel(c, ep, 0, &set, x, HIDDEN, routing, tag)?)
    }))
}

fn local_reference(all: &[ExpertWeights], x: &[f32], routing: &Routing) -> Result<Vec<f32>> {
    let set = ExpertSet {
        layer: 0,
        experts: all.iter().cloned().map(Some).collect(),
    };
    Ok(experts_local(x, HIDDEN, routing, &set)?)
}

#[test]
fn every_placement_computes_the_local_moe_layer() -> Result<()> {
    let (n, k) = (8, 2);
    let all = random_experts(n, 11)?;
    for world in [1, 2, 3, 4] {
        let inputs = rank_inputs(world, n, k, 40 + world as u64, 0.0);
        let uneven: Vec<Vec<usize>> = (0..n)
            .map(|e| vec![if e == 0 { 0 } else { world - 1 }])
            .collect();
        let mut replicated: Vec<Vec<usize>> = (0..n).map(|e| vec![e % world]).collect();
        replicated[0] = (0..world).collect();
        replicated[1] = (0..world).rev().collect();
        let placements = [
            ("contiguous", Placement::contiguous(1, n, world)?),
            ("round-robin", Placement::round_robin(1, n, world)?),
            ("uneven", Placement::from_hosts(1, world, &[uneven])?),
            (
                "replicated",
                Placement::from_hosts(1, world, &[replicated])?,
            ),
        ];
        for (name, placement) in placements {
            for overlap in [false, true] {
                for tcp in [false, true] {
                    if tcp && (world == 1 || overlap) {
                        continue;
                    }
                    let comms = if tcp {
                        tcp_group(world, &TcpOptions::default(), Duration::from_secs(20))?
                    } else {
                        in_process(world, Duration::from_secs(20))
                    };
                    let ep = with_overlap(&placement, overlap);
                    let load = ep.load.clone();
                    let outs = run_layer(&comms, &all, &ep, &inputs)?;
                    let mut computed = 0;
                    for (r, ((got, stats), (x, routing))) in outs.iter().zip(&inputs).enumerate() {
                        let want = local_reference(&all, x, routing)?;
                        let d = max_abs_diff(got, &want);
                        ensure!(
                            d <= 1e-5,
                            "{name} W={world} overlap={overlap} tcp={tcp} rank {r}: max |Δ| {d}"
                        );
                        ensure!(
                            stats.dropped == 0 && stats.slots == routing.expert_ids.len() as u64
                        );
                        computed += stats.rows_computed;
                    }
                    // Dropless: every slot computed exactly once, and the load statistics saw it.
                    let slots: usize = inputs.iter().map(|i| i.1.expert_ids.len()).sum();
                    ensure!(computed as usize == slots);
                    let snap = load.snapshot();
                    ensure!(snap.per_expert(1, n)[0].iter().sum::<u64>() as usize == slots);
                    for &(_, e, w) in snap.counts.keys() {
                        ensure!(
                            placement.hosts(0, e as usize, w as usize),
                            "{name}: load on a non-host"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn replicas_of_hot_experts_cut_the_imbalance() -> Result<()> {
    let (n, k, world) = (8, 2, 4);
    let all = random_experts(n, 3)?;
    let inputs = rank_inputs(world, n, k, 9, 0.6);
    let base = Placement::contiguous(1, n, world)?;
    let measure = |placement: &Placement| -> Result<(f64, Vec<Vec<u64>>)> {
        let ep = ExpertParallel::new(placement.clone());
        let outs = run_layer(
            &in_process(world, Duration::from_secs(20)),
            &all,
            &ep,
            &inputs,
        )?;
        for ((got, _), (x, routing)) in outs.iter().zip(&inputs) {
            ensure!(max_abs_diff(got, &local_reference(&all, x, routing)?) <= 1e-5);
        }
        let snap = ep.load.snapshot();
        Ok((snap.imbalance(world), snap.per_expert(1, n)))
    };
    let (before, per_expert) = measure(&base)?;
    let hot = base.replicate_hot(&per_expert, 2)?;
    ensure!(hot.version == base.version + 1);
    let (after, _) = measure(&hot)?;
    ensure!(
        before > 1.5,
        "the skewed router should overload worker 0: {before}"
    );
    ensure!(
        after < before,
        "replicas: imbalance {before:.2} → {after:.2}"
    );
    Ok(())
}

#[test]
fn capacity_drops_late_rows_and_counts_them() -> Result<()> {
    let (n, k, world) = (8, 2, 2);
    let all = random_experts(n, 5)?;
    let inputs = rank_inputs(world, n, k, 77, 0.8);
    let factor = 0.5f32;
    let ep = ExpertParallel {
        capacity_factor: Some(factor),
        ..ExpertParallel::new(Placement::round_robin(1, n, world)?)
    };
    let outs = run_layer(
        &in_process(world, Duration::from_secs(20)),
        &all,
        &ep,
        &inputs,
    )?;
    let mut dropped = 0;
    for ((got, stats), (x, routing)) in outs.iter().zip(&inputs) {
        // Reference: the first ⌈f·slots/E⌉ slots of each expert in token order survive; the rest
        // get gate weight 0.
        let cap = (factor as f64 * routing.expert_ids.len() as f64 / n as f64).ceil() as usize;
        let mut seen = vec![0usize; n];
        let mut masked = routing.clone();
        let mut want_dropped = 0;
        for (s, &e) in routing.expert_ids.iter().enumerate() {
            if seen[e as usize] >= cap {
                masked.weights[s] = 0.0;
                want_dropped += 1;
            } else {
                seen[e as usize] += 1;
            }
        }
        ensure!(
            stats.dropped == want_dropped,
            "{} vs {want_dropped}",
            stats.dropped
        );
        ensure!(max_abs_diff(got, &local_reference(&all, x, &masked)?) <= 1e-5);
        dropped += stats.dropped;
    }
    ensure!(
        dropped > 0,
        "a factor of 0.5 with a skewed router must drop rows"
    );
    Ok(())
}

/// The expert-parallel layer on the simulated device backend (every row through an explicit
/// upload or download, as on a GPU) equals the host backend bit for bit: the orchestration the
/// CUDA path runs, exercised without a GPU.
#[test]
fn the_simulated_device_dispatches_exactly_like_the_host() -> Result<()> {
    use ringmoe_core::{Backend, Sim, Tensor};
    use ringmoe_model::moe::expert_compute;
    use ringmoe_parallel::moe_parallel_on;

    let (n, k) = (6, 2);
    let all = random_experts(n, 21)?;
    for world in [1, 2, 3] {
        let inputs = rank_inputs(world, n, k, 60 + world as u64, 0.7);
        let base = Placement::round_robin(1, n, world)?;
        let hot = base.replicate_hot(&[vec![50, 9, 1, 1, 1, 1]], 2)?;
        for placement in [base, hot] {
            for (overlap, capacity) in [(false, None), (true, None), (true, Some(0.6))] {
                let ep = ExpertParallel {
                    overlap,
                    capacity_factor: capacity,
                    ..ExpertParallel::new(placement.clone())
                };
                let comms = in_process(world, Duration::from_secs(20));
                let host = run_layer(&comms, &all, &ep, &inputs)?;
                let comms = in_process(world, Duration::from_secs(20));
                let sim = all_ok(on_every_rank(&comms, |c| -> Result<(Vec<f32>, MoeStats)> {
                    let r = c.rank();
                    let set = hosted_set(&all, &ep.placement, r);
                    let (x, routing) = &inputs[r];
                    let x =
                        Sim.upload(&Tensor::from_vec(x.clone(), [routing.tokens(), HIDDEN])?)?;
                    let mut compute = |rows: &<Sim as Backend>::Act,
                                       groups: &[(usize, usize)]|
                     -> ringmoe_parallel::Result<<Sim as Backend>::Act> {
                        let h = Sim.download(rows)?;
                        let y = expert_compute(h.as_slice(), HIDDEN, groups, &set)?;
                        Ok(Sim.upload(&Tensor::from_vec(y, h.shape().to_vec())?)?)
                    };
                    let loaded = |e: usize| set.get(e).is_ok();
                    let tag = Tag::new(5, 0, 0, Kind::Dispatch);
                    let (y, stats) = moe_parallel_on(
                        &Sim,
                        c,
                        &ep,
                        (0, n),
                        &loaded,
                        &x,
                        routing,
                        tag,
                        &mut compute,
                    )?;
                    Ok((Sim.download(&y)?.into_vec(), stats))
                }))?;
                for (r, ((h, hs), (d, ds))) in host.iter().zip(&sim).enumerate() {
                    ensure!(
                        h == d,
                        "W={world} overlap={overlap} capacity={capacity:?} rank {r}: the \
                         simulated device differs from the host"
                    );
                    ensure!(
                        (
                            hs.slots,
                            hs.rows_remote,
                            hs.dropped,
                            hs.rows_computed,
                            hs.bytes_sent
                        ) == (
                            ds.slots,
                            ds.rows_remote,
                            ds.dropped,
                            ds.rows_computed,
                            ds.bytes_sent
                        ),
                        "rank {r}: figures differ: {hs:?} vs {ds:?}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Rank 1 sends rank 0 a hand-made header (`[version lo, version hi, experts, rows per
/// expert]`, the dispatch protocol's words) and then `rows`; rank 0 must refuse them with
/// `expect` in the message.
fn refused_frame(header: Vec<u32>, rows: Vec<f32>, version0: u64, expect: &str) -> Result<()> {
    let (n, world) = (4, 2);
    let all = random_experts(n, 1)?;
    let placement = Placement {
        version: version0,
        ..Placement::contiguous(1, n, world)?
    };
    let comms = in_process(world, Duration::from_secs(5));
    let inputs = rank_inputs(world, n, 1, 3, 0.0);
    let results = on_every_rank(&comms, |c| -> Result<()> {
        let tag = Tag::new(5, 0, 0, Kind::Dispatch);
        if c.rank() == 0 {
            let ep = ExpertParallel::new(placement.clone());
            let set = hosted_set(&all, &placement, 0);
            let (x, routing) = &inputs[0];
            let err = moe_parallel(c, &ep, 0, &set, x, HIDDEN, routing, tag)
                .err()
                .context("rank 0 accepted a bad frame")?
                .to_string();
            ensure!(err.contains(expect), "{err}");
        } else {
            let words = |w: Vec<u32>| Payload {
                shape: vec![w.len()],
                data: Data::I32(w.into_iter().map(|x| x as i32).collect()),
            };
            let own = words([1, 0, n as u32].into_iter().chain([0; 4]).collect());
            c.all_to_all_v(tag, vec![words(header.clone()), own])?;
            // The rows go out unawaited: rank 0 may refuse before it sends its own.
            let rows = vec![
                Payload {
                    shape: vec![rows.len()],
                    data: Data::F32(rows.clone()),
                },
                Payload {
                    shape: vec![0],
                    data: Data::F32(Vec::new()),
                },
            ];
            let _ = c.start_all_to_all_v(Tag { step: 1, ..tag }, rows);
        }
        Ok(())
    });
    all_ok(results).map(|_| ())
}

#[test]
fn malformed_frames_and_stale_placements_are_refused() -> Result<()> {
    let row = |v: f32| vec![v; HIDDEN];
    // Expert 0 is worker 0's, expert 3 worker 1's: a row for expert 3 is not rank 0's to compute.
    refused_frame(
        vec![1, 0, 4, 0, 0, 0, 1],
        row(0.5),
        1,
        "rows for expert 3, which this worker does not host",
    )?;
    // A header sent with another placement version.
    refused_frame(
        vec![1, 0, 4, 1, 0, 0, 0],
        row(0.5),
        2,
        "placement version 2 but rank 1 dispatched with version 1",
    )?;
    // A header for a layer of 99 experts.
    refused_frame(
        vec![1, 0, 99, 0, 0, 0, 0],
        Vec::new(),
        1,
        "header names 99 experts",
    )?;
    // A header of the wrong length.
    refused_frame(vec![1, 0, 4], Vec::new(), 1, "expected I32[7]")?;
    // Counts that promise more rows than the frame carries.
    refused_frame(
        vec![1, 0, 4, 2, 0, 0, 0],
        row(0.5),
        1,
        "header counts 2 rows",
    )?;
    Ok(())
}

// ---- Whole models --------------------------------------------------------------------------

/// Logits of a forward with experts placed by `ep.placement` over `comms.len()` workers and the
/// sequence over the first `seq_shards` of them. Each worker loads only its own experts; all
/// record into `ep.load`.
fn ep_logits(
    dir: &Path,
    comms: &[Communicator],
    tokens: &[u32],
    seq_shards: usize,
    ep: &ExpertParallel,
) -> Result<(Vec<f32>, Vec<MoeStats>)> {
    let job = JobOptions::dense(4);
    ep_logits_in(
        dir,
        comms,
        tokens,
        seq_shards,
        ep,
        WeightPrecision::Native,
        job,
    )
}

/// [`ep_logits`] with every worker holding its matrices as `weights`.
fn ep_logits_in(
    dir: &Path,
    comms: &[Communicator],
    tokens: &[u32],
    seq_shards: usize,
    ep: &ExpertParallel,
    weights: WeightPrecision,
    job: JobOptions,
) -> Result<(Vec<f32>, Vec<MoeStats>)> {
    let world = comms.len();
    let plan = ShardPlan::with_active(tokens.len(), world, seq_shards, Sharding::Zigzag)?;
    let models: Vec<Model> = (0..world)
        .map(|w| {
            let opts = LoadOptions {
                experts: ep.placement.selection(w),
                weights,
            };
            Model::load(dir, &opts)
        })
        .collect::<std::result::Result<_, _>>()?;
    let vocab = models[0].config.vocab_size;
    let outs = all_ok(on_every_rank(comms, |c| -> Result<(Vec<f32>, MoeStats)> {
        let r = c.rank();
        let mine = plan.tokens_for(r, tokens)?;
        let out = prefill_shard_with(&models[r], c, &plan, &mine, job, Some(ep))?;
        Ok((models[r].logits(&out.hidden)?.into_vec(), out.moe))
    }))?;
    let (rows, stats): (Vec<_>, Vec<_>) = outs.into_iter().unzip();
    Ok((plan.unshard_rows(&rows, vocab)?, stats))
}

/// Fixture `name`'s directory and config, its reference prompt `input`, and the single-process
/// logits of every position of it (what every distributed run here must reproduce).
fn single_process(name: &str, input: &str) -> Result<(PathBuf, ModelConfig, Vec<u32>, Vec<f32>)> {
    let dir = fixture(name);
    let cfg = ModelConfig::from_dir(&dir)?;
    let model = Model::load(&dir, &LoadOptions::default())?;
    let ids = reference_ids(name, input)?;
    let want = model
        .forward(&ids, &mut model.new_cache(), LogitsFor::All)?
        .logits
        .into_vec();
    Ok((dir, cfg, ids, want))
}

/// `placement` with two-batch overlap on or off.
fn with_overlap(placement: &Placement, overlap: bool) -> ExpertParallel {
    ExpertParallel {
        overlap,
        ..ExpertParallel::new(placement.clone())
    }
}

#[test]
fn expert_parallel_forward_equals_single_process_on_every_fixture() -> Result<()> {
    for name in [
        "mixtral-tiny",
        "mixtral-tiny-bf16",
        "qwen3-moe-tiny",
        "qwen2-moe-tiny",
        "qwen2-moe-window",
        "mixtral-window",
    ] {
        let (dir, cfg, ids, want) = single_process(name, "input_ids_L64")?;
        let (layers, n) = (cfg.num_layers, cfg.moe.num_experts);
        let mut cases: Vec<(String, usize, Placement, bool)> = vec![(
            "all experts on one worker".into(),
            1,
            Placement::contiguous(layers, n, 1)?,
            false,
        )];
        for w in [2, 3, 4] {
            cases.push((
                format!("contiguous W={w}"),
                w,
                Placement::contiguous(layers, n, w)?,
                false,
            ));
            cases.push((
                format!("round-robin W={w}"),
                w,
                Placement::round_robin(layers, n, w)?,
                false,
            ));
        }
        // Uneven: worker 0 hosts one expert per layer, worker 2 the rest, worker 1 none.
        let uneven: Vec<Vec<usize>> = (0..n).map(|e| vec![if e == 0 { 0 } else { 2 }]).collect();
        cases.push((
            "uneven".into(),
            3,
            Placement::from_hosts(1, 3, &vec![uneven; layers])?,
            false,
        ));
        // Hot experts replicated, by measured load.
        let base = Placement::round_robin(layers, n, 3)?;
        let calibration = ExpertParallel::new(base.clone());
        ep_logits(
            &dir,
            &in_process(3, Duration::from_secs(20)),
            &ids,
            3,
            &calibration,
        )?;
        let load = calibration.load.snapshot().per_expert(layers, n);
        cases.push((
            "hot replicas".into(),
            3,
            base.replicate_hot(&load, 2)?,
            false,
        ));
        cases.push((
            "round-robin W=4, overlap".into(),
            4,
            Placement::round_robin(layers, n, 4)?,
            true,
        ));
        for (case, world, placement, overlap) in &cases {
            // Every worker does both (P = W), and experts alone (P = 1).
            for seq in [*world, 1] {
                let comms = in_process(*world, Duration::from_secs(20));
                let (got, stats) =
                    ep_logits(&dir, &comms, &ids, seq, &with_overlap(placement, *overlap))?;
                let d = max_abs_diff(&got, &want);
                ensure!(d <= 1e-4, "{name} {case} P={seq}: max |Δ| {d}");
                let dropped: u64 = stats.iter().map(|s| s.dropped).sum();
                ensure!(dropped == 0);
            }
        }
    }
    Ok(())
}

/// The row-wise half of each layer in pieces (a long sequence's bounded temporaries) on short
/// sequences: pieces of 5 rows, so every shard takes several, and with P = 1 the ranks holding
/// no tokens still make every piece's exchange. Same logits as one piece and as one process.
#[test]
fn layers_in_pieces_equal_one_piece_sharded_and_expert_parallel() -> Result<()> {
    for name in ["mixtral-tiny", "qwen2-moe-window"] {
        let (dir, cfg, ids, want) = single_process(name, "input_ids_L64")?;
        let placement = Placement::round_robin(cfg.num_layers, cfg.moe.num_experts, 3)?;
        for overlap in [false, true] {
            let ep = with_overlap(&placement, overlap);
            for seq in [3, 1] {
                let run = |piece_rows| {
                    let job = JobOptions {
                        piece_rows,
                        ..JobOptions::dense(4)
                    };
                    let comms = in_process(3, Duration::from_secs(20));
                    ep_logits_in(&dir, &comms, &ids, seq, &ep, WeightPrecision::Native, job)
                };
                let (whole, _) = run(0)?;
                let (pieces, stats) = run(5)?;
                let d = max_abs_diff(&pieces, &whole);
                ensure!(
                    d <= 1e-5,
                    "{name} P={seq} overlap={overlap}: pieces vs one: {d}"
                );
                let d = max_abs_diff(&pieces, &want);
                ensure!(
                    d <= 1e-4,
                    "{name} P={seq} overlap={overlap}: vs one process: {d}"
                );
                let slots: u64 = stats.iter().map(|s| s.slots).sum();
                let sparse = cfg.sparse_layers.iter().filter(|&&s| s).count() as u64;
                ensure!(
                    slots == sparse * (ids.len() * cfg.moe.top_k) as u64,
                    "{name}: {slots} routing slots"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn ring_and_expert_parallelism_with_bf16_and_q8_weights_equal_single_process() -> Result<()> {
    for name in ["mixtral-tiny", "qwen2-moe-tiny"] {
        let dir = fixture(name);
        let cfg = ModelConfig::from_dir(&dir)?;
        let ids = reference_ids(name, "input_ids_L64")?;
        for weights in [WeightPrecision::BF16, WeightPrecision::Q8] {
            let opts = LoadOptions {
                weights,
                ..LoadOptions::default()
            };
            let model = Model::load(&dir, &opts)?;
            let want = model
                .forward(&ids, &mut model.new_cache(), LogitsFor::All)?
                .logits
                .into_vec();
            for world in [2, 4] {
                let placement = Placement::round_robin(cfg.num_layers, cfg.moe.num_experts, world)?;
                for seq in [world, 1] {
                    let comms = in_process(world, Duration::from_secs(20));
                    let ep = with_overlap(&placement, world == 4);
                    let job = JobOptions::dense(4);
                    let (got, _) = ep_logits_in(&dir, &comms, &ids, seq, &ep, weights, job)?;
                    let d = max_abs_diff(&got, &want);
                    // q8 quantises activations per block of 32: an input that differs in its
                    // last bits (ring attention's merge order) can round to the neighbouring
                    // quantum, so q8 gets a looser bound than the float formats.
                    let tol = if weights == WeightPrecision::Q8 {
                        2e-2
                    } else {
                        1e-4
                    };
                    eprintln!("{name} {weights} W={world} P={seq}: max |Δ| {d:e}");
                    ensure!(d <= tol, "{name} {weights} W={world} P={seq}: max |Δ| {d}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn ring_attention_and_expert_parallelism_over_tcp() -> Result<()> {
    for name in ["mixtral-tiny", "qwen3-moe-tiny"] {
        let (dir, cfg, ids, want) = single_process(name, "input_ids_L300")?;
        for world in [2, 4] {
            let placement = Placement::round_robin(cfg.num_layers, cfg.moe.num_experts, world)?;
            let comms = tcp_group(world, &TcpOptions::default(), Duration::from_secs(20))?;
            let (got, stats) = ep_logits(
                &dir,
                &comms,
                &ids,
                world,
                &with_overlap(&placement, world == 4),
            )?;
            let d = max_abs_diff(&got, &want);
            ensure!(d <= 1e-4, "{name} TCP P=W={world}: max |Δ| {d}");
            ensure!(stats.iter().all(|s| s.rows_remote > 0 && s.bytes_sent > 0));
        }
    }
    Ok(())
}

#[test]
fn a_worker_with_a_quarter_of_the_experts_reads_a_quarter_of_their_bytes() -> Result<()> {
    let dir = fixture("qwen3-moe-tiny");
    let cfg = ModelConfig::from_dir(&dir)?;
    let placement = Placement::contiguous(cfg.num_layers, cfg.moe.num_experts, 4)?;
    let ckpt = Checkpoint::open(&dir)?;
    let expert_bytes: u64 = ckpt
        .tensor_names()
        .filter(|n| n.contains(".experts."))
        .map(|n| {
            ckpt.meta(n)
                .map(|m| (m.shape.iter().product::<usize>() * m.dtype.size_in_bytes()) as u64)
        })
        .sum::<std::result::Result<u64, _>>()?;
    let dense_bytes = ckpt.total_tensor_bytes() - expert_bytes;
    let opts = LoadOptions {
        experts: placement.selection(1),
        ..Default::default()
    };
    let model = Model::from_checkpoint(cfg.clone(), &ckpt, &opts)?;
    let read_experts = ckpt.bytes_read().saturating_sub(dense_bytes);
    ensure!(
        read_experts * 4 == expert_bytes,
        "read {read_experts} of {expert_bytes} expert bytes"
    );
    for (l, loaded) in model.loaded_experts() {
        ensure!(loaded == placement.hosted(l, 1));
    }
    // The placement check catches a worker loaded for another placement.
    let comms = in_process(4, Duration::from_secs(5));
    let other = ExpertParallel::new(Placement::round_robin(
        cfg.num_layers,
        cfg.moe.num_experts,
        4,
    )?);
    let err = other.check(&model, &comms[1]).unwrap_err().to_string();
    ensure!(err.contains("did not load it"), "{err}");
    Ok(())
}

/// Greedy generation with the experts spread over workers (prefill and every decode step) gives
/// transformers' tokens on every rank.
#[test]
fn generation_with_expert_parallelism_matches_transformers() -> Result<()> {
    use ringmoe_model::{GenerationConfig, Sampler, SamplingParams};
    use ringmoe_parallel::{StopRule, generate_sharded};
    for name in ARCH_FIXTURES {
        let dir = fixture(name);
        let cfg = ModelConfig::from_dir(&dir)?;
        let (prompt, want) = (
            reference_ids(name, "gen_prompt_ids")?,
            reference_ids(name, "gen_output_ids")?,
        );
        let eos = GenerationConfig::from_dir(&dir)?
            .map(|g| g.eos_token_ids)
            .unwrap_or_default();
        let world = 3;
        let placement = Placement::round_robin(cfg.num_layers, cfg.moe.num_experts, world)?;
        let models: Vec<Model> = (0..world)
            .map(|w| {
                Model::load(
                    &dir,
                    &LoadOptions {
                        experts: placement.selection(w),
                        ..Default::default()
                    },
                )
            })
            .collect::<std::result::Result<_, _>>()?;
        let plan = ShardPlan::new(prompt.len(), world, Sharding::Zigzag)?;
        let outs = all_ok(on_every_rank(
            &in_process(world, Duration::from_secs(20)),
            |c| -> Result<Vec<u32>> {
                let ep = ExpertParallel {
                    overlap: true,
                    ..ExpertParallel::new(placement.clone())
                };
                let mut sampler = Sampler::new(SamplingParams::default())?;
                let stop = StopRule {
                    max_new_tokens: 16,
                    eos: &eos,
                };
                Ok(generate_sharded(
                    &models[c.rank()],
                    c,
                    &plan,
                    &prompt,
                    stop,
                    &mut sampler,
                    JobOptions::dense(6),
                    Some(&ep),
                )?)
            },
        ))?;
        for (rank, got) in outs.iter().enumerate() {
            ensure!(
                got == &want,
                "{name} rank {rank}: {got:?} vs transformers {want:?}"
            );
        }
    }
    Ok(())
}
