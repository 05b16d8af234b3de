//! Context-parallel prefill of a whole model: each rank runs its shard of the sequence through every
//! layer; attention is a ring over the communicator, everything else (norms, projections, MoE) is
//! the single-process layer on the rank's own tokens. Each rank keeps the K/V of its own tokens only.

use ringmoe_comm::{Communicator, Kind, Tag};
use ringmoe_core::Tensor;
use ringmoe_model::moe::Routing;
use ringmoe_model::{KvCache, Model};

use crate::{ParallelError, Result, ShardPlan, ring_attention};

/// What a rank holds after prefill.
#[derive(Debug)]
pub struct RankPrefill {
    /// Absolute positions of this rank's tokens.
    pub positions: Vec<usize>,
    /// Final hidden states of those tokens (before the final norm), `[tokens, hidden]`.
    pub hidden: Tensor,
    /// K/V of this rank's tokens only, per layer.
    pub cache: KvCache,
    /// Routing of this rank's tokens in each sparse layer.
    pub routing: Vec<(usize, Routing)>,
}

/// Runs this rank's shard (`tokens` = the tokens at `plan.positions(comm.rank())`) through the
/// model. Every rank of `comm` must call this with the same plan and job.
pub fn prefill_shard(
    model: &Model,
    comm: &Communicator,
    plan: &ShardPlan,
    tokens: &[u32],
    job: u64,
) -> Result<RankPrefill> {
    let positions = plan.positions(comm.rank()).to_vec();
    if tokens.len() != positions.len() {
        return Err(ParallelError::Plan(format!(
            "rank {} got {} tokens for {} positions",
            comm.rank(),
            tokens.len(),
            positions.len()
        )));
    }
    let first = model
        .layers()
        .first()
        .ok_or_else(|| ParallelError::Plan("model has no layers".into()))?;
    let rope = first.attn.rope.table(&positions);
    let mut x = model.embed(tokens)?;
    let mut cache = model.new_cache();
    let mut routing = Vec::new();
    for (l, (layer, kv)) in model
        .layers()
        .iter()
        .zip(cache.layers.iter_mut())
        .enumerate()
    {
        let params = layer.attn.params;
        let r = layer.forward_with(&mut x, &rope, |qkv| -> Result<Vec<f32>> {
            kv.append(&qkv.k, &qkv.v, &positions);
            let tag = Tag::new(job, l as u32, 0, Kind::Ring);
            Ok(ring_attention(comm, plan, &params, &qkv.q, qkv.k, qkv.v, tag)?.out)
        })?;
        if let Some(r) = r {
            routing.push((l, r));
        }
    }
    Ok(RankPrefill {
        positions,
        hidden: x,
        cache,
        routing,
    })
}
