//! Context-parallel prefill and decode against the single-process engine (and so transformers) on
//! the fixture models: any number of sequence shards, zigzag or contiguous, in-process or over TCP.

mod common;

use common::*;

use std::time::Duration;

use anyhow::{Result, ensure};
use ringmoe_comm::local::{on_every_rank, tcp_group};
use ringmoe_comm::{Communicator, Kind, Tag, TcpOptions, in_process};
use ringmoe_core::attention::{AttentionParams, naive_attention};
use ringmoe_core::testing::rand_vec;
use ringmoe_model::{GenerationConfig, LoadOptions, LogitsFor, Model, Sampler, SamplingParams};
use ringmoe_parallel::{
    JobOptions, ShardPlan, ShardedSequence, Sharding, StopRule, generate_sharded, prefill_shard,
    ring_attention,
};

/// Logits `[L, vocab]` from a prefill sharded over `comms`, gathered back into sequence order.
/// Also checks that every rank's KV cache holds exactly its own tokens: all of them in a full
/// attention layer; in a sliding-window layer all of them while the rank holds at most twice the
/// window, else those the next queries can still see (positions past `L − window`).
fn distributed_logits(
    model: &Model,
    comms: &[Communicator],
    tokens: &[u32],
    kind: Sharding,
) -> Result<Vec<f32>> {
    let plan = ShardPlan::new(tokens.len(), comms.len(), kind)?;
    let kv_width = model.config.num_kv_heads * model.config.head_dim;
    let per_rank = all_ok(on_every_rank(comms, |c| -> Result<Vec<f32>> {
        let r = c.rank();
        let mine = plan.tokens_for(r, tokens)?;
        let out = prefill_shard(model, c, &plan, &mine, JobOptions::dense(9))?;
        for (l, layer) in out.cache.layers.iter().enumerate() {
            let own = plan.positions(r);
            let want: Vec<usize> = match model.layers()[l].attn.window {
                Some(w) if own.len() > 2 * w => own
                    .iter()
                    .copied()
                    .filter(|&p| p + w > tokens.len())
                    .collect(),
                _ => own.to_vec(),
            };
            ensure!(
                layer.positions == want,
                "rank {r} layer {l} cached {:?}, expected {want:?}",
                layer.positions
            );
            ensure!(
                layer.k.len() == want.len() * kv_width && layer.v.len() == layer.k.len(),
                "rank {r} holds {} K values",
                layer.k.len()
            );
        }
        Ok(model.logits(&out.hidden)?.into_vec())
    }))?;
    Ok(plan.unshard_rows(&per_rank, model.config.vocab_size)?)
}

#[test]
fn sharded_prefill_equals_single_process_on_every_fixture() -> Result<()> {
    for name in ARCH_FIXTURES {
        let model = Model::load(&fixture(name), &LoadOptions::default())?;
        for len in [64, 300] {
            let ids = reference_ids(name, &format!("input_ids_L{len}"))?;
            let want = model
                .forward(&ids, &mut model.new_cache(), LogitsFor::All)?
                .logits
                .into_vec();
            for world in 1..=4 {
                for kind in [Sharding::Zigzag, Sharding::Contiguous] {
                    let got = distributed_logits(
                        &model,
                        &in_process(world, Duration::from_secs(20)),
                        &ids,
                        kind,
                    )?;
                    let d = max_abs_diff(&got, &want);
                    ensure!(
                        d <= 1e-4,
                        "{name} L={len} P={world} {kind:?}: max |Δ| {d:e}"
                    );
                }
            }
        }
        // Fewer tokens than zigzag chunks: some ranks hold nothing and still take part.
        let ids = reference_ids(name, "input_ids_L7")?;
        let want = model
            .forward(&ids[..3], &mut model.new_cache(), LogitsFor::All)?
            .logits
            .into_vec();
        let got = distributed_logits(
            &model,
            &in_process(4, Duration::from_secs(20)),
            &ids[..3],
            Sharding::Zigzag,
        )?;
        ensure!(
            max_abs_diff(&got, &want) <= 1e-4,
            "{name}: L=3 over 4 ranks"
        );
    }
    Ok(())
}

#[test]
fn sharded_prefill_over_tcp_equals_single_process() -> Result<()> {
    let model = Model::load(&fixture("qwen3-moe-tiny"), &LoadOptions::default())?;
    let ids = reference_ids("qwen3-moe-tiny", "input_ids_L300")?;
    let want = model
        .forward(&ids, &mut model.new_cache(), LogitsFor::All)?
        .logits
        .into_vec();
    for world in [2, 4] {
        let comms = tcp_group(world, &TcpOptions::default(), Duration::from_secs(20))?;
        let got = distributed_logits(&model, &comms, &ids, Sharding::Zigzag)?;
        let d = max_abs_diff(&got, &want);
        ensure!(d <= 1e-4, "TCP P={world}: max |Δ| {d:e}");
    }
    Ok(())
}

/// Ring attention alone against materialised attention over the whole sequence, for random q/k/v,
/// GQA, and world sizes up to 8.
#[test]
fn ring_attention_equals_naive_attention() -> Result<()> {
    let params = AttentionParams {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        scale: 0.35,
        causal: true,
    };
    for (world, len) in [(1, 50), (2, 33), (3, 100), (5, 257), (8, 300), (8, 5)] {
        let q = rand_vec(len * 32, world as u64, 2.0);
        let k = rand_vec(len * 16, 100 + world as u64, 2.0);
        let v = rand_vec(len * 16, 200 + world as u64, 1.0);
        let all: Vec<usize> = (0..len).collect();
        let want = naive_attention(&params, &q, &all, &k, &v, &all)?;
        let plan = ShardPlan::new(len, world, Sharding::Zigzag)?;
        let outs = all_ok(on_every_rank(
            &in_process(world, Duration::from_secs(10)),
            |c| -> Result<Vec<f32>> {
                let pick = |src: &[f32], w: usize| -> Vec<f32> {
                    plan.positions(c.rank())
                        .iter()
                        .flat_map(|&p| src[p * w..(p + 1) * w].to_vec())
                        .collect()
                };
                let tag = Tag::new(1, 0, 0, Kind::Ring);
                Ok(ring_attention(
                    c,
                    &plan,
                    &params,
                    &pick(&q, 32),
                    &pick(&k, 16),
                    &pick(&v, 16),
                    tag,
                )?
                .out)
            },
        ))?;
        let got = plan.unshard_rows(&outs, 32)?;
        let d = max_abs_diff(&got, &want.out);
        ensure!(d <= 1e-5, "P={world} L={len}: max |Δ| {d:e}");
    }
    Ok(())
}

/// The sharded prefill of a generation (the exact last-layer shortcut: the final query attends
/// to every rank's keys, merged as in decode, and only that row finishes the last layer) gives
/// the full sharded computation's last logits, on every rank, and the same K/V caches.
#[test]
fn last_layer_shortcut_equals_the_full_sharded_computation() -> Result<()> {
    for name in ARCH_FIXTURES {
        let model = Model::load(&fixture(name), &LoadOptions::default())?;
        let vocab = model.config.vocab_size;
        for len in [7, 64, 300] {
            let ids = reference_ids(name, &format!("input_ids_L{len}"))?;
            for world in 1..=4 {
                let plan = ShardPlan::new(ids.len(), world, Sharding::Zigzag)?;
                let outs = all_ok(on_every_rank(
                    &in_process(world, Duration::from_secs(20)),
                    |c| -> Result<(Vec<f32>, Option<Vec<f32>>)> {
                        let mine = plan.tokens_for(c.rank(), &ids)?;
                        let full = prefill_shard(&model, c, &plan, &mine, JobOptions::dense(5))?;
                        let (seq, logits) =
                            ShardedSequence::prefill(&model, c, &plan, &ids, JobOptions::dense(6))?;
                        for (a, b) in full.cache.layers.iter().zip(&seq.cache.layers) {
                            ensure!(a.positions == b.positions && a.k == b.k && a.v == b.v);
                        }
                        let last = match full.positions.iter().position(|&p| p == len - 1) {
                            Some(i) => Some(model.logits(&full.hidden.rows(i, i + 1)?)?.into_vec()),
                            None => None,
                        };
                        Ok((logits, last))
                    },
                ))?;
                let want = outs
                    .iter()
                    .find_map(|(_, l)| l.clone())
                    .ok_or_else(|| anyhow::anyhow!("no rank holds the last position"))?;
                ensure!(want.len() == vocab);
                for (rank, (got, _)) in outs.iter().enumerate() {
                    let d = max_abs_diff(got, &want);
                    ensure!(
                        d <= 1e-5,
                        "{name} L={len} P={world} rank {rank}: shortcut off by {d:e}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// The trained needle model (a 32-token window on layer 0) sharded over 1–4 ranks against
/// transformers' logits, as the single process is (`hf_parity`), and the generation prefill
/// (last-layer shortcut) answers each needle.
#[test]
fn needle_model_sharded_matches_transformers() -> Result<()> {
    let name = "needle-moe";
    let dir = fixture(name);
    let model = Model::load(&dir, &LoadOptions::default())?;
    let r = ringmoe_model::Checkpoint::open_files(&dir, &[dir.join("reference.safetensors")])?;
    // The bound of the single-process test (hf_parity's NEEDLE_TOL: logits span ±15).
    for (len, tol) in [(300, 2.5e-4), (1000, 2.5e-4)] {
        let ids = reference_ids(name, &format!("input_ids_L{len}"))?;
        let want = r.load(&format!("logits_L{len}"), &[len, 256])?.into_vec();
        let answer = reference_ids(name, &format!("answer_L{len}"))?;
        for world in 1..=4 {
            let comms = in_process(world, Duration::from_secs(20));
            let got = distributed_logits(&model, &comms, &ids, Sharding::Zigzag)?;
            let d = max_abs_diff(&got, &want);
            ensure!(d <= tol, "needle L={len} P={world}: max |Δ| {d:e}");
            let plan = ShardPlan::new(len, world, Sharding::Zigzag)?;
            let firsts = all_ok(on_every_rank(&comms, |c| -> Result<u32> {
                let (_, logits) =
                    ShardedSequence::prefill(&model, c, &plan, &ids, JobOptions::dense(8))?;
                Ok(
                    (0..logits.len()).fold(0, |b, i| if logits[i] > logits[b] { i } else { b })
                        as u32,
                )
            }))?;
            ensure!(
                firsts.iter().all(|f| [*f] == answer[..]),
                "needle L={len} P={world}: answered {firsts:?}, the needle holds {answer:?}"
            );
        }
    }
    Ok(())
}

/// Sharded decode on the sliding-window fixtures for longer than twice the window: every step's
/// logits equal the single-process decode's, and each rank's windowed layers stay trimmed.
#[test]
fn sharded_decode_past_the_window_keeps_the_windowed_cache_small() -> Result<()> {
    for name in ["qwen2-moe-window", "mixtral-window"] {
        let model = Model::load(&fixture(name), &LoadOptions::default())?;
        let ids = reference_ids(name, "input_ids_L300")?;
        let (prompt, steps) = (&ids[..64], &ids[64..164]);
        let mut cache = model.new_cache();
        model.forward(prompt, &mut cache, LogitsFor::Last)?;
        let mut want = Vec::with_capacity(steps.len());
        for &t in steps {
            want.push(
                model
                    .forward(&[t], &mut cache, LogitsFor::Last)?
                    .logits
                    .into_vec(),
            );
        }
        for world in [2, 3] {
            let plan = ShardPlan::new(prompt.len(), world, Sharding::Zigzag)?;
            all_ok(on_every_rank(
                &in_process(world, Duration::from_secs(20)),
                |c| -> Result<()> {
                    let (mut seq, _) =
                        ShardedSequence::prefill(&model, c, &plan, prompt, JobOptions::dense(7))?;
                    for (i, (&t, w)) in steps.iter().zip(&want).enumerate() {
                        let d = max_abs_diff(&seq.decode(t)?, w);
                        ensure!(d <= 1e-4, "{name} P={world} step {i}: max |Δ| {d}");
                        for (l, kv) in seq.cache.layers.iter().enumerate() {
                            if let Some(win) = model.layers()[l].attn.window {
                                ensure!(
                                    kv.len() <= 2 * win,
                                    "{name} P={world} step {i} layer {l}: {} keys held",
                                    kv.len()
                                );
                            }
                        }
                    }
                    Ok(())
                },
            ))?;
        }
    }
    Ok(())
}

/// Greedy generation from a sharded prefill equals transformers' (and so the single-process
/// engine's) tokens, on every rank.
#[test]
fn generation_after_sharded_prefill_matches_transformers() -> Result<()> {
    for name in ARCH_FIXTURES {
        let dir = fixture(name);
        let model = Model::load(&dir, &LoadOptions::default())?;
        let (prompt, want) = (
            reference_ids(name, "gen_prompt_ids")?,
            reference_ids(name, "gen_output_ids")?,
        );
        let eos = GenerationConfig::from_dir(&dir)?
            .map(|g| g.eos_token_ids)
            .unwrap_or_default();
        for world in [2, 3] {
            let plan = ShardPlan::new(prompt.len(), world, Sharding::Zigzag)?;
            let outs = all_ok(on_every_rank(
                &in_process(world, Duration::from_secs(20)),
                |c| -> Result<Vec<u32>> {
                    let mut sampler = Sampler::new(SamplingParams::default())?;
                    let stop = StopRule {
                        max_new_tokens: 16,
                        eos: &eos,
                    };
                    Ok(generate_sharded(
                        &model,
                        c,
                        &plan,
                        &prompt,
                        stop,
                        &mut sampler,
                        JobOptions::dense(3),
                        None,
                    )?)
                },
            ))?;
            for (rank, got) in outs.iter().enumerate() {
                ensure!(
                    got == &want,
                    "{name} P={world} rank {rank}: {got:?} vs transformers {want:?}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn decode_appends_new_kv_to_the_least_loaded_rank() -> Result<()> {
    let model = Model::load(&fixture("mixtral-tiny"), &LoadOptions::default())?;
    let prompt = reference_ids("mixtral-tiny", "input_ids_L7")?;
    let plan = ShardPlan::new(prompt.len(), 3, Sharding::Zigzag)?;
    let sizes = all_ok(on_every_rank(
        &in_process(3, Duration::from_secs(20)),
        |c| -> Result<Vec<usize>> {
            let (mut seq, _) =
                ShardedSequence::prefill(&model, c, &plan, &prompt, JobOptions::dense(4))?;
            for t in [5u32, 6, 7, 8, 9] {
                seq.decode(t)?;
            }
            ensure!(seq.cache.layers[0].len() == seq.shard_sizes[c.rank()]);
            Ok(seq.shard_sizes.clone())
        },
    ))?;
    // 7 prompt tokens over 3 ranks (zigzag: 3, 2, 2), then 5 more, always to the smallest shard.
    ensure!(sizes.iter().all(|s| s == &vec![4, 4, 4]), "{sizes:?}");
    Ok(())
}
