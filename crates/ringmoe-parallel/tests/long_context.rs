//! Ring prefill at long context on a random model with the bench model's attention shape: the
//! logits of a 32K-token sequence sharded over 4 ranks equal the single-process engine's.

use std::time::Duration;

use anyhow::{Result, ensure};
use ringmoe_comm::in_process;
use ringmoe_comm::local::on_every_rank;
use ringmoe_model::{LoadOptions, LogitsFor, Model, ModelConfig, RandomWeights};
use ringmoe_parallel::{JobOptions, ShardPlan, Sharding, prefill_shard};
use serde_json::json;

/// One Mixtral layer with `bench ring`'s attention (4 heads, 2 KV heads, head_dim 64) and a
/// long-context RoPE base; narrow elsewhere so the test spends its time in attention.
fn config() -> Result<ModelConfig> {
    Ok(ModelConfig::from_json(&json!({
        "architectures": ["MixtralForCausalLM"], "vocab_size": 512, "hidden_size": 256,
        "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 65536, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
    }))?)
}

#[test]
fn ring_prefill_of_32k_tokens_equals_single_process() -> Result<()> {
    let model = Model::from_checkpoint(
        config()?,
        &RandomWeights { seed: 11 },
        &LoadOptions::default(),
    )?;
    let len = 32 * 1024;
    let ids: Vec<u32> = (0..len as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 512)
        .collect();
    let want = model
        .forward(&ids, &mut model.new_cache(), LogitsFor::All)?
        .logits
        .into_vec();
    let plan = ShardPlan::new(len, 4, Sharding::Zigzag)?;
    let per_rank = on_every_rank(
        &in_process(4, Duration::from_secs(120)),
        |c| -> Result<Vec<f32>> {
            let mine = plan.tokens_for(c.rank(), &ids)?;
            let out = prefill_shard(&model, c, &plan, &mine, JobOptions::dense(1))?;
            Ok(model.logits(&out.hidden)?.into_vec())
        },
    )
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let got = plan.unshard_rows(&per_rank, 512)?;
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    ensure!(d <= 1e-4, "L = {len}, P = 4: max |Δ| {d:e}");
    Ok(())
}
