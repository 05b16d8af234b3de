//! Context-parallel prefill of a whole model: each rank runs its shard of the sequence through every
//! layer; attention is a ring over the communicator, everything else (norms, projections, MoE) is
//! the single-process layer on the rank's own tokens. Each rank keeps the K/V of its own tokens only.

use ringmoe_comm::{Communicator, Kind, Tag};
use ringmoe_core::Tensor;
use ringmoe_model::moe::Routing;
use ringmoe_model::{KvCache, Model};

use crate::{AttentionMode, ParallelError, Result, RingStats, ShardPlan, ring_attention_mode};

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
    /// Ring attention figures summed over the layers.
    pub attention: RingStats,
}

/// What identifies a job on the wire and how its prefill attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JobOptions {
    /// Goes into every message tag of the job.
    pub id: u64,
    pub attention: AttentionMode,
}

impl JobOptions {
    /// Job `id` with dense attention.
    pub fn dense(id: u64) -> Self {
        Self {
            id,
            attention: AttentionMode::Dense,
        }
    }
}

/// Runs this rank's shard (`tokens` = the tokens at `plan.positions(comm.rank())`) through the
/// model. Every rank of `comm` must call this with the same plan and job.
pub fn prefill_shard(
    model: &Model,
    comm: &Communicator,
    plan: &ShardPlan,
    tokens: &[u32],
    job: JobOptions,
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
    let mut attention = RingStats::default();
    for (l, (layer, kv)) in model
        .layers()
        .iter()
        .zip(cache.layers.iter_mut())
        .enumerate()
    {
        let params = layer.attn.params;
        let r = layer.forward_with(&mut x, &rope, |qkv| -> Result<Vec<f32>> {
            kv.append(&qkv.k, &qkv.v, &positions);
            let tag = Tag::new(job.id, l as u32, 0, Kind::Ring);
            let (out, stats) = ring_attention_mode(
                comm,
                plan,
                &params,
                &job.attention,
                &qkv.q,
                qkv.k,
                qkv.v,
                tag,
            )?;
            attention.add(&stats);
            Ok(out.out)
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
        attention,
    })
}
