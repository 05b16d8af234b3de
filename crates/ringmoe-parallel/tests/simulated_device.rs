//! The one model and the one distributed forward on the simulated device backend
//! (`ringmoe_core::Sim`: the CPU's arithmetic behind opaque buffers, every transfer an explicit
//! upload or download): what the CUDA path runs, exercised without a GPU. A model on the
//! simulated device computes the host model's logits exactly; ring attention with expert
//! parallelism on it (every rank loading only its experts) and decoding over its sharded cache
//! equal the single-process host engine.

mod common;

use common::*;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, ensure};
use ringmoe_comm::in_process;
use ringmoe_comm::local::on_every_rank;
use ringmoe_core::{Backend, Sim};
use ringmoe_model::{LoadOptions, LogitsFor, Model};
use ringmoe_parallel::{
    ExpertParallel, JobOptions, Placement, ShardPlan, ShardedSequence, Sharding, prefill_shard_with,
};

fn on_sim(name: &str, opts: &LoadOptions) -> Result<Model<Sim>> {
    Ok(Model::load_on(Arc::new(Sim), &fixture(name), opts)?)
}

#[test]
fn the_model_on_the_simulated_device_equals_the_host_model() -> Result<()> {
    for name in ARCH_FIXTURES {
        let host = Model::load(&fixture(name), &LoadOptions::default())?;
        let sim = on_sim(name, &LoadOptions::default())?;
        let tokens = reference_ids(name, "input_ids_L64")?;
        let want = host.forward(&tokens, &mut host.new_cache(), LogitsFor::All)?;
        let got = sim.forward(&tokens, &mut sim.try_new_cache()?, LogitsFor::All)?;
        ensure!(want.logits == got.logits, "{name}: prefill logits differ");
        ensure!(want.routing == got.routing, "{name}: routing differs");
        // Prefill 40, then decode through the cache.
        let (mut hc, mut sc) = (host.new_cache(), sim.try_new_cache()?);
        host.forward(&tokens[..40], &mut hc, LogitsFor::Last)?;
        sim.forward(&tokens[..40], &mut sc, LogitsFor::Last)?;
        for &t in &tokens[40..48] {
            let a = host.forward(&[t], &mut hc, LogitsFor::Last)?.logits;
            let b = sim.forward(&[t], &mut sc, LogitsFor::Last)?.logits;
            ensure!(a == b, "{name}: decode logits differ");
        }
        ensure!(
            host.weight_bytes() == sim.weight_bytes(),
            "{name}: weight bytes differ"
        );
    }
    Ok(())
}

#[test]
fn ring_and_expert_parallelism_on_the_simulated_device_equal_one_process() -> Result<()> {
    for name in ARCH_FIXTURES {
        let host = Model::load(&fixture(name), &LoadOptions::default())?;
        let tokens = reference_ids(name, "input_ids_L64")?;
        let want = host
            .forward(&tokens, &mut host.new_cache(), LogitsFor::All)?
            .logits;
        let mut decoded_want = Vec::new();
        let mut cache = host.new_cache();
        decoded_want.extend(
            host.forward(&tokens[..40], &mut cache, LogitsFor::Last)?
                .logits
                .into_vec(),
        );
        for &t in &tokens[40..46] {
            decoded_want.extend(
                host.forward(&[t], &mut cache, LogitsFor::Last)?
                    .logits
                    .into_vec(),
            );
        }
        let c = &host.config;
        for world in [2, 3] {
            let placement = Placement::round_robin(c.num_layers, c.moe.num_experts, world)?;
            for overlap in [false, true] {
                let ep = ExpertParallel {
                    overlap,
                    ..ExpertParallel::new(placement.clone())
                };
                let plan = ShardPlan::new(tokens.len(), world, Sharding::Zigzag)?;
                let job = JobOptions {
                    piece_rows: 5,
                    ..JobOptions::dense(3)
                };
                let per_rank = all_ok(on_every_rank(
                    &in_process(world, Duration::from_secs(30)),
                    |comm| -> Result<(Vec<f32>, Vec<f32>)> {
                        let r = comm.rank();
                        let opts = LoadOptions {
                            experts: placement.selection(r),
                            ..LoadOptions::default()
                        };
                        let model = on_sim(name, &opts)?;
                        let mine = plan.tokens_for(r, &tokens)?;
                        let out = prefill_shard_with(&model, comm, &plan, &mine, job, Some(&ep))?;
                        let logits = model.logits(&out.hidden)?.into_vec();
                        let p40 = ShardPlan::new(40, world, Sharding::Zigzag)?;
                        let (mut seq, mut decoded) = ShardedSequence::prefill_with(
                            &model,
                            comm,
                            &p40,
                            &tokens[..40],
                            JobOptions::dense(4),
                            Some(&ep),
                        )?;
                        for &t in &tokens[40..46] {
                            decoded.extend(seq.decode(t)?);
                        }
                        // Every activation stayed on the device: the backend's own type.
                        let _: &<Sim as Backend>::Act = &out.hidden;
                        Ok((logits, decoded))
                    },
                ))?;
                let vocab = c.vocab_size;
                let shards: Vec<Vec<f32>> = per_rank.iter().map(|p| p.0.clone()).collect();
                let got = plan.unshard_rows(&shards, vocab)?;
                let d = max_abs_diff(&got, want.as_slice());
                ensure!(
                    d <= 1e-4,
                    "{name} W={world} overlap={overlap}: prefill max |Δ| {d}"
                );
                for (r, (_, decoded)) in per_rank.iter().enumerate() {
                    let d = max_abs_diff(decoded, &decoded_want);
                    ensure!(
                        d <= 1e-4,
                        "{name} W={world} rank {r}: sharded decode max |Δ| {d}"
                    );
                }
            }
        }
    }
    Ok(())
}
