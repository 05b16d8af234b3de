//! Sparse prefill through the ring: every shard count computes what one process computes with the
//! same pattern, the keep-everything settings equal dense, and the sparse modes move and score
//! less than dense.

mod common;

use common::*;

use std::time::Duration;

use anyhow::{Result, ensure};
use ringmoe_comm::local::{on_every_rank, tcp_group};
use ringmoe_comm::{Kind, Tag, TcpOptions, in_process};
use ringmoe_core::attention::AttentionParams;
use ringmoe_core::sparse::{AShape, Sparsity, VsConfig, attention_sparse, estimate_vs};
use ringmoe_core::testing::rand_vec;
use ringmoe_model::{Checkpoint, LoadOptions, LogitsFor, Model};
use ringmoe_parallel::{
    AttentionMode, JobOptions, RingStats, ShardPlan, Sharding, prefill_shard, ring_attention_mode,
};

const PARAMS: AttentionParams = AttentionParams {
    n_heads: 4,
    n_kv_heads: 2,
    head_dim: 16,
    scale: 0.25,
    causal: true,
};

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
}

/// Random q/k/v with a few strong columns and a strong lag, so vertical-slash has something to
/// find.
fn inputs(len: usize, seed: u64) -> Inputs {
    let (hq, hkv, d) = (PARAMS.n_heads, PARAMS.n_kv_heads, PARAMS.head_dim);
    let mut q = rand_vec(len * hq * d, seed, 1.0);
    let mut k = rand_vec(len * hkv * d, seed + 1, 1.0);
    let v = rand_vec(len * hkv * d, seed + 2, 1.0);
    for t in 0..len {
        for h in 0..hq {
            q[(t * hq + h) * d] = 4.0;
        }
        if t % 97 == 13 {
            for h in 0..hkv {
                k[(t * hkv + h) * d] = 4.0;
            }
        }
    }
    Inputs { q, k, v, len }
}

/// Ring attention under `mode` over `world` in-process ranks: the output in sequence order and
/// each rank's figures.
fn ring(
    x: &Inputs,
    world: usize,
    kind: Sharding,
    mode: AttentionMode,
) -> Result<(Vec<f32>, Vec<RingStats>)> {
    let plan = ShardPlan::new(x.len, world, kind)?;
    let (wq, wk) = (
        PARAMS.n_heads * PARAMS.head_dim,
        PARAMS.n_kv_heads * PARAMS.head_dim,
    );
    let per_rank = on_every_rank(
        &in_process(world, Duration::from_secs(30)),
        |c| -> Result<(Vec<f32>, RingStats)> {
            let pick = |src: &[f32], w: usize| -> Vec<f32> {
                plan.positions(c.rank())
                    .iter()
                    .flat_map(|&p| src[p * w..(p + 1) * w].to_vec())
                    .collect()
            };
            let (out, stats) = ring_attention_mode(
                c,
                &plan,
                &PARAMS,
                &mode,
                &pick(&x.q, wq),
                &pick(&x.k, wk),
                &pick(&x.v, wk),
                Tag::new(5, 0, 0, Kind::Ring),
            )?;
            Ok((out.out, stats))
        },
    )
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let (outs, stats): (Vec<_>, Vec<_>) = per_rank.into_iter().unzip();
    Ok((plan.unshard_rows(&outs, wq)?, stats))
}

fn vs_small() -> VsConfig {
    VsConfig {
        last_q: 32,
        vertical: 24,
        slash: 40,
        sink: 4,
        local: 16,
    }
}

#[test]
fn every_shard_count_computes_the_single_process_sparse_attention() -> Result<()> {
    let x = inputs(1500, 3);
    let pos: Vec<usize> = (0..x.len).collect();
    let a = AShape {
        sink: 8,
        local: 100,
    };
    let cfg = vs_small();
    let pattern = estimate_vs(&PARAMS, &cfg, &x.q, &x.k, &pos)?;
    let modes = [
        (
            AttentionMode::AShape(a),
            attention_sparse(&PARAMS, &Sparsity::AShape(a), &x.q, &pos, &x.k, &x.v, &pos)?,
        ),
        (
            AttentionMode::VerticalSlash(cfg),
            attention_sparse(
                &PARAMS,
                &Sparsity::VerticalSlash(&pattern),
                &x.q,
                &pos,
                &x.k,
                &x.v,
                &pos,
            )?,
        ),
    ];
    for (mode, (want, _)) in &modes {
        for world in 1..=4 {
            for kind in [Sharding::Zigzag, Sharding::Contiguous] {
                let (got, _) = ring(&x, world, kind, *mode)?;
                let d = max_abs_diff(&got, &want.out);
                ensure!(d <= 1e-5, "{mode:?} P={world} {kind:?}: max |Δ| {d:e}");
            }
        }
    }
    Ok(())
}

#[test]
fn keep_everything_settings_equal_dense() -> Result<()> {
    let x = inputs(700, 8);
    let everything = [
        AttentionMode::AShape(AShape {
            sink: 0,
            local: x.len,
        }),
        AttentionMode::VerticalSlash(VsConfig {
            slash: x.len,
            ..vs_small()
        }),
    ];
    for world in [1, 3] {
        let (dense, _) = ring(&x, world, Sharding::Zigzag, AttentionMode::Dense)?;
        for mode in everything {
            let (got, _) = ring(&x, world, Sharding::Zigzag, mode)?;
            let d = max_abs_diff(&got, &dense);
            ensure!(d <= 1e-6, "{mode:?} P={world}: max |Δ| {d:e} from dense");
        }
    }
    Ok(())
}

#[test]
fn sparse_modes_send_and_score_less() -> Result<()> {
    let x = inputs(4096, 21);
    let total = |s: &[RingStats]| {
        (
            s.iter().map(|r| r.bytes_sent).sum::<u64>(),
            s.iter().map(|r| r.pairs_scored).sum::<u64>(),
        )
    };
    let (_, dense) = ring(&x, 4, Sharding::Zigzag, AttentionMode::Dense)?;
    let (dense_bytes, dense_pairs) = total(&dense);
    let a = AttentionMode::AShape(AShape {
        sink: 64,
        local: 256,
    });
    let (_, ashape) = ring(&x, 4, Sharding::Zigzag, a)?;
    let (a_bytes, a_pairs) = total(&ashape);
    // Each rank needs the sink and its neighbours' window edges, not whole blocks. (In a
    // one-way ring the edge of a rank's late chunk still travels P − 1 hops to the rank before
    // it, so about a third of dense's bytes move at this size.)
    ensure!(
        a_bytes * 2 < dense_bytes,
        "A-shape sent {a_bytes} B, dense {dense_bytes} B"
    );
    ensure!(
        a_pairs * 3 < dense_pairs,
        "A-shape scored {a_pairs}, dense {dense_pairs}"
    );
    let (_, vs) = ring(
        &x,
        4,
        Sharding::Zigzag,
        AttentionMode::VerticalSlash(vs_small()),
    )?;
    let (_, vs_pairs) = total(&vs);
    ensure!(
        vs_pairs * 2 < dense_pairs,
        "vertical-slash scored {vs_pairs}, dense {dense_pairs}"
    );
    // Contiguous sharding: the causal mask alone keeps later ranks' keys from travelling forward.
    let (_, contiguous) = ring(&x, 4, Sharding::Contiguous, AttentionMode::Dense)?;
    ensure!(
        total(&contiguous).0 < dense_bytes,
        "causal trimming sent nothing less"
    );
    Ok(())
}

fn logits(
    model: &Model,
    comms: &[ringmoe_comm::Communicator],
    ids: &[u32],
    mode: AttentionMode,
) -> Result<Vec<f32>> {
    let plan = ShardPlan::new(ids.len(), comms.len(), Sharding::Zigzag)?;
    let job = JobOptions {
        id: 2,
        attention: mode,
        piece_rows: 0,
    };
    let per_rank = on_every_rank(comms, |c| -> Result<Vec<f32>> {
        let out = prefill_shard(model, c, &plan, &plan.tokens_for(c.rank(), ids)?, job)?;
        Ok(model.logits(&out.hidden)?.into_vec())
    })
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    Ok(plan.unshard_rows(&per_rank, model.config.vocab_size)?)
}

/// Whole-model sparse prefill on the fixtures: one rank and four (in-process and TCP) agree, and
/// the keep-everything settings give the dense engine's logits.
#[test]
fn sparse_prefill_of_the_fixture_models_is_shard_count_independent() -> Result<()> {
    for name in ["mixtral-tiny", "qwen3-moe-tiny"] {
        let dir = fixture(name);
        let model = Model::load(&dir, &LoadOptions::default())?;
        let r = Checkpoint::open_files(&dir, &[dir.join("reference.safetensors")])?;
        let ids: Vec<u32> = r
            .load_i64("input_ids_L300")?
            .0
            .into_iter()
            .map(|x| x as u32)
            .collect();
        let dense = model
            .forward(&ids, &mut model.new_cache(), LogitsFor::All)?
            .logits
            .into_vec();
        let modes = [
            AttentionMode::AShape(AShape { sink: 4, local: 64 }),
            AttentionMode::VerticalSlash(vs_small()),
        ];
        for mode in modes {
            let one = logits(&model, &in_process(1, Duration::from_secs(30)), &ids, mode)?;
            let four = logits(&model, &in_process(4, Duration::from_secs(30)), &ids, mode)?;
            let d = max_abs_diff(&one, &four);
            ensure!(d <= 1e-4, "{name} {mode:?}: P=4 vs P=1 max |Δ| {d:e}");
            ensure!(
                max_abs_diff(&one, &dense) > 1e-3,
                "{name} {mode:?}: a sparse pattern changed nothing at L=300"
            );
        }
        let tcp = tcp_group(3, &TcpOptions::default(), Duration::from_secs(30))?;
        let mode = AttentionMode::VerticalSlash(vs_small());
        let one = logits(&model, &in_process(1, Duration::from_secs(30)), &ids, mode)?;
        let d = max_abs_diff(&logits(&model, &tcp, &ids, mode)?, &one);
        ensure!(
            d <= 1e-4,
            "{name} vertical-slash over TCP P=3: max |Δ| {d:e}"
        );
        let all = AttentionMode::AShape(AShape {
            sink: 0,
            local: ids.len(),
        });
        let d = max_abs_diff(
            &logits(&model, &in_process(2, Duration::from_secs(30)), &ids, all)?,
            &dense,
        );
        ensure!(
            d <= 1e-4,
            "{name} keep-everything A-shape vs dense: max |Δ| {d:e}"
        );
    }
    Ok(())
}

/// The generic ring on the simulated device (every block through explicit uploads and
/// downloads, queries in pieces of 3 rows merged piece by piece) computes what the host ring
/// computes, moves the same bytes and skips the same blocks: the orchestration the CUDA path
/// runs, exercised without a GPU.
#[test]
fn the_ring_on_the_simulated_device_equals_the_host_ring() -> Result<()> {
    use ringmoe_core::{Backend, Sim, Tensor};
    use ringmoe_parallel::ring_attention_on;

    let x = inputs(300, 9);
    let (wq, wk) = (
        PARAMS.n_heads * PARAMS.head_dim,
        PARAMS.n_kv_heads * PARAMS.head_dim,
    );
    let modes = [
        AttentionMode::Dense,
        AttentionMode::AShape(AShape { sink: 4, local: 40 }),
        AttentionMode::VerticalSlash(vs_small()),
    ];
    for world in [1, 2, 3, 4] {
        for kind in [Sharding::Zigzag, Sharding::Contiguous] {
            for mode in modes {
                let (host, host_stats) = ring(&x, world, kind, mode)?;
                let plan = ShardPlan::new(x.len, world, kind)?;
                let per_rank = on_every_rank(
                    &in_process(world, Duration::from_secs(30)),
                    |c| -> Result<(Vec<f32>, RingStats)> {
                        let rows = plan.positions(c.rank()).len();
                        let pick = |src: &[f32], w: usize| -> Result<_> {
                            let v: Vec<f32> = plan
                                .positions(c.rank())
                                .iter()
                                .flat_map(|&p| src[p * w..(p + 1) * w].to_vec())
                                .collect();
                            Ok(Sim.upload(&Tensor::from_vec(v, [rows, w])?)?)
                        };
                        let own = (pick(&x.k, wk)?, pick(&x.v, wk)?);
                        let ringmoe_parallel::RingOutput {
                            part,
                            own: back,
                            stats,
                        } = ring_attention_on(
                            &Sim,
                            c,
                            &plan,
                            &PARAMS,
                            &mode,
                            &pick(&x.q, wq)?,
                            own,
                            Tag::new(5, 0, 0, Kind::Ring),
                        )?;
                        ensure!(back.0 == pick(&x.k, wk)?, "the own K came back changed");
                        Ok((Sim.download(&part.out)?.into_vec(), stats))
                    },
                )
                .into_iter()
                .collect::<Result<Vec<_>>>()?;
                let (outs, stats): (Vec<_>, Vec<_>) = per_rank.into_iter().unzip();
                let sim = plan.unshard_rows(&outs, wq)?;
                let d = max_abs_diff(&sim, &host);
                ensure!(
                    d <= 1e-5,
                    "W={world} {kind:?} {mode:?}: the simulated device differs by {d}"
                );
                for (h, s) in host_stats.iter().zip(&stats) {
                    ensure!(
                        (
                            h.bytes_sent,
                            h.blocks_computed,
                            h.blocks_skipped,
                            h.peak_block_bytes
                        ) == (
                            s.bytes_sent,
                            s.blocks_computed,
                            s.blocks_skipped,
                            s.peak_block_bytes
                        ),
                        "W={world} {kind:?} {mode:?}: figures differ: {h:?} vs {s:?}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Attention over a sharded cache (what decode steps and the last-layer shortcut do): each
/// rank's partial over its own keys, merged over the ranks by `merge_over_ranks`, on the host
/// and on the simulated device, equals attention over the whole sequence, on every rank.
#[test]
fn merging_a_sharded_cache_on_the_simulated_device_equals_one_attention() -> Result<()> {
    use ringmoe_core::{Backend, Cpu, Partial, Sim, Tensor};
    use ringmoe_parallel::merge_over_ranks;

    let x = inputs(200, 17);
    let (wq, wk) = (
        PARAMS.n_heads * PARAMS.head_dim,
        PARAMS.n_kv_heads * PARAMS.head_dim,
    );
    // Three queries after the sequence, the same on every rank.
    let q = rand_vec(3 * wq, 18, 1.0);
    let q_pos = [200, 201, 202];
    let all: Vec<usize> = (0..x.len).collect();
    let want = attention_sparse(&PARAMS, &Sparsity::Dense, &q, &q_pos, &x.k, &x.v, &all)?.0;
    for world in [1, 2, 3, 5] {
        let plan = ShardPlan::new(x.len, world, Sharding::Zigzag)?;
        let outs = on_every_rank(
            &in_process(world, Duration::from_secs(30)),
            |c| -> Result<(Vec<f32>, Vec<f32>)> {
                let pos = plan.positions(c.rank());
                let pick = |src: &[f32]| -> Vec<f32> {
                    pos.iter()
                        .flat_map(|&p| src[p * wk..(p + 1) * wk].to_vec())
                        .collect()
                };
                let (k, v) = (pick(&x.k), pick(&x.v));
                let part = attention_sparse(&PARAMS, &Sparsity::Dense, &q, &q_pos, &k, &v, pos)?.0;
                let shaped = |o: &[f32], l: &[f32]| -> Result<Partial<Tensor>> {
                    Ok(Partial {
                        out: Tensor::from_vec(o.to_vec(), [3, wq])?,
                        lse: Tensor::from_vec(l.to_vec(), [3, PARAMS.n_heads])?,
                    })
                };
                let tag = |step| Tag::new(6, 0, step, Kind::AllGather);
                let host = merge_over_ranks(&Cpu, c, tag(0), shaped(&part.out, &part.lse)?)?;
                let h = shaped(&part.out, &part.lse)?;
                let on_sim = Partial {
                    out: Sim.upload(&h.out)?,
                    lse: Sim.upload(&h.lse)?,
                };
                let sim = merge_over_ranks(&Sim, c, tag(1), on_sim)?;
                Ok((host.into_vec(), Sim.download(&sim)?.into_vec()))
            },
        )
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
        for (r, (host, sim)) in outs.iter().enumerate() {
            ensure!(
                host == sim,
                "W={world} rank {r}: the simulated device differs"
            );
            ensure!(
                host == &outs[0].0,
                "W={world}: rank {r} differs from rank 0"
            );
            let d = max_abs_diff(host, &want.out);
            ensure!(d <= 1e-5, "W={world} rank {r}: {d} from one attention");
        }
    }
    Ok(())
}
