//! Context-parallel prefill of a whole model: each rank runs its shard of the sequence through every
//! layer; attention is a ring over the communicator. The routed experts run either on the rank
//! itself (every rank holds every expert) or expert-parallel over the same ranks
//! ([`ExpertParallel`]); everything else (norms, projections, router, shared expert) is the
//! single-process layer on the rank's own tokens. Each rank keeps the K/V of its own tokens only.

use ringmoe_comm::{Communicator, Kind, Tag};
use ringmoe_core::Tensor;
use ringmoe_model::moe::Routing;
use ringmoe_model::{KvCache, Model};

use crate::{
    AttentionMode, ExpertParallel, MoeStats, ParallelError, Result, RingStats, ShardPlan,
    moe_parallel, ring_attention_mode,
};

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
    /// Expert-parallel figures summed over the sparse layers (zero when experts run locally).
    pub moe: MoeStats,
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
    prefill_shard_with(model, comm, plan, tokens, job, None)
}

/// [`prefill_shard`] with the routed experts run expert-parallel when `experts` is given: then
/// this rank's model holds only the experts the placement puts on it.
pub fn prefill_shard_with(
    model: &Model,
    comm: &Communicator,
    plan: &ShardPlan,
    tokens: &[u32],
    job: JobOptions,
    experts: Option<&ExpertParallel>,
) -> Result<RankPrefill> {
    prefill_shard_observed(model, comm, plan, tokens, job, experts, &mut |_, _| Ok(()))
}

/// [`prefill_shard_with`] calling `on_layer(layers_done, layers)` after every layer. An error
/// from `on_layer` (a cancelled job, say) stops the prefill and is returned; the other ranks
/// then fail on their next collective with this rank.
pub fn prefill_shard_observed(
    model: &Model,
    comm: &Communicator,
    plan: &ShardPlan,
    tokens: &[u32],
    job: JobOptions,
    experts: Option<&ExpertParallel>,
    on_layer: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<RankPrefill> {
    if let Some(ep) = experts {
        ep.check(model, comm)?;
    }
    if plan.world() != comm.world_size() {
        return Err(ParallelError::Invalid(format!(
            "the plan has {} ranks, the group {}",
            plan.world(),
            comm.world_size()
        )));
    }
    let positions = plan.positions(comm.rank()).to_vec();
    if tokens.len() != positions.len() {
        return Err(ParallelError::Invalid(format!(
            "rank {} got {} tokens for {} positions",
            comm.rank(),
            tokens.len(),
            positions.len()
        )));
    }
    let first = model
        .layers()
        .first()
        .ok_or_else(|| ParallelError::Invalid("model has no layers".into()))?;
    let rope = first.attn.rope.table(&positions);
    let mut x = model.embed(tokens)?;
    let mut cache = model.new_cache();
    let mut routing = Vec::new();
    let mut attention = RingStats::default();
    let mut moe = MoeStats::default();
    for (l, (layer, kv)) in model
        .layers()
        .iter()
        .zip(cache.layers.iter_mut())
        .enumerate()
    {
        let _layer = tracing::debug_span!("layer", job = job.id, layer = l).entered();
        let params = layer.attn.params;
        // A sliding-window layer attends within its window whatever the job asks: the window
        // is the model's exact rule, the job's sparse modes approximate full attention.
        let mode = match layer.attn.window_rule() {
            Some(a) => AttentionMode::AShape(a),
            None => job.attention,
        };
        let attend = |qkv: ringmoe_model::layers::Qkv| -> Result<Vec<f32>> {
            let _s = tracing::trace_span!("ring_attention").entered();
            kv.append(&qkv.k, &qkv.v, &positions);
            let tag = Tag::new(job.id, l as u32, 0, Kind::Ring);
            let (out, stats) =
                ring_attention_mode(comm, plan, &params, &mode, &qkv.q, qkv.k, qkv.v, tag)?;
            attention.add(&stats);
            Ok(out.out)
        };
        let r = match experts {
            None => layer.forward_with(&mut x, &rope, attend)?,
            Some(ep) => layer.forward_parts(&mut x, &rope, attend, |m, xs, routing| {
                let _s = tracing::trace_span!("expert_all_to_all").entered();
                let tag = Tag::new(job.id, l as u32, 0, Kind::Dispatch);
                let hidden = m.router.in_features;
                let (y, s) = moe_parallel(comm, ep, l, &m.experts, xs, hidden, routing, tag)?;
                moe.add(&s);
                Ok(y)
            })?,
        };
        if let Some(r) = r {
            routing.push((l, r));
        }
        on_layer(l + 1, model.layers().len())?;
    }
    Ok(RankPrefill {
        positions,
        hidden: x,
        cache,
        routing,
        attention,
        moe,
    })
}
