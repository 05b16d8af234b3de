//! Context-parallel prefill of a whole model: each rank runs its shard of the sequence through every
//! layer; attention is a ring over the communicator. The routed experts run either on the rank
//! itself (every rank holds every expert) or expert-parallel over the same ranks
//! ([`ExpertParallel`]); everything else (norms, projections, router, shared expert) is the
//! single-process layer on the rank's own tokens. Each rank keeps the K/V of its own tokens only.

use ringmoe_comm::{Kind, Tag};
use ringmoe_core::{Backend, Cpu};
use ringmoe_model::layers::{DecoderLayer, PIECE_ROWS, local_experts, pieces_for};
use ringmoe_model::moe::Routing;
use ringmoe_model::{KvCache, Model};

use crate::decode::{one_query_attention, share_row};

use crate::{
    AttentionMode, Collective, ExpertParallel, MoeStats, ParallelError, Result, RingStats,
    ShardPlan, moe_parallel_on, ring_attention_on,
};

/// What a rank holds after prefill.
#[derive(Debug)]
pub struct RankPrefill<B: Backend = Cpu> {
    /// Absolute positions of this rank's tokens.
    pub positions: Vec<usize>,
    /// Final hidden states of those tokens (before the final norm), `[tokens, hidden]`.
    pub hidden: B::Act,
    /// K/V of this rank's tokens only, per layer.
    pub cache: KvCache<B>,
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
    /// Rows per piece of the row-wise half of each layer (0: [`PIECE_ROWS`]). Every rank uses
    /// as many pieces as the largest shard needs, so the expert-parallel exchanges line up; a
    /// small value makes tests exercise the pieces on short sequences.
    pub piece_rows: usize,
}

impl JobOptions {
    /// Job `id` with dense attention.
    pub fn dense(id: u64) -> Self {
        Self {
            id,
            attention: AttentionMode::Dense,
            piece_rows: 0,
        }
    }

    /// The pieces every rank splits its rows into: enough for the largest shard of `plan`.
    pub fn pieces(&self, plan: &ShardPlan) -> usize {
        let max_rows = if self.piece_rows == 0 {
            PIECE_ROWS
        } else {
            self.piece_rows
        };
        let largest = (0..plan.world())
            .map(|r| plan.positions(r).len())
            .max()
            .unwrap_or(0);
        pieces_for(largest, max_rows)
    }
}

/// Runs this rank's shard (`tokens` = the tokens at `plan.positions(comm.rank())`) through the
/// model. Every rank of `comm` must call this with the same plan and job.
pub fn prefill_shard<B: Backend, C: Collective<B>>(
    model: &Model<B>,
    comm: &C,
    plan: &ShardPlan,
    tokens: &[u32],
    job: JobOptions,
) -> Result<RankPrefill<B>> {
    prefill_shard_with(model, comm, plan, tokens, job, None)
}

/// [`prefill_shard`] with the routed experts run expert-parallel when `experts` is given: then
/// this rank's model holds only the experts the placement puts on it.
pub fn prefill_shard_with<B: Backend, C: Collective<B>>(
    model: &Model<B>,
    comm: &C,
    plan: &ShardPlan,
    tokens: &[u32],
    job: JobOptions,
    experts: Option<&ExpertParallel>,
) -> Result<RankPrefill<B>> {
    prefill_shard_observed(model, comm, plan, tokens, job, experts, &mut |_, _| Ok(()))
}

/// [`prefill_shard_with`] calling `on_layer(layers_done, layers)` after every layer. An error
/// from `on_layer` (a cancelled job, say) stops the prefill and is returned; the other ranks
/// then fail on their next collective with this rank.
pub fn prefill_shard_observed<B: Backend, C: Collective<B>>(
    model: &Model<B>,
    comm: &C,
    plan: &ShardPlan,
    tokens: &[u32],
    job: JobOptions,
    experts: Option<&ExpertParallel>,
    on_layer: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<RankPrefill<B>> {
    prefill_layers(model, comm, plan, tokens, job, experts, on_layer, false)
}

/// Steps (in `Kind::AllGather` tags of the last layer) of the last-layer shortcut's two
/// collectives, apart from every step a decode or a sparse-pattern estimate uses.
const SHORTCUT_SHARE_STEP: u32 = u32::MAX - 1;
const SHORTCUT_MERGE_STEP: u32 = u32::MAX;

/// [`prefill_shard_observed`]; with `last_only`, the exact last-layer shortcut for generation:
/// the last layer computes and caches K/V for every token of this rank, but the final position's
/// query (and hidden row) goes from the rank holding it to every rank, each rank attends it to
/// its own keys, the partials are merged as in a decode step, and every rank finishes the layer
/// for that one row. The result's `hidden` is then that row (the same on every rank), and the
/// last sparse layer's routing covers only it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn prefill_layers<B: Backend, C: Collective<B>>(
    model: &Model<B>,
    comm: &C,
    plan: &ShardPlan,
    tokens: &[u32],
    job: JobOptions,
    experts: Option<&ExpertParallel>,
    on_layer: &mut dyn FnMut(usize, usize) -> Result<()>,
    last_only: bool,
) -> Result<RankPrefill<B>> {
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
    let b = &**model.backend();
    let first = model
        .layers()
        .first()
        .ok_or_else(|| ParallelError::Invalid("model has no layers".into()))?;
    let rope = b.rope_table(first.attn.rope.table(&positions))?;
    let mut x = model.embed(tokens)?;
    let mut cache = model.try_new_cache()?;
    let mut routing = Vec::new();
    let mut attention = RingStats::default();
    let mut moe = MoeStats::default();
    let n_layers = model.layers().len();
    let pieces = job.pieces(plan);
    if last_only && plan.len == 0 {
        return Err(ParallelError::Invalid("the prompt has no tokens".into()));
    }
    for (l, (layer, kv)) in model
        .layers()
        .iter()
        .zip(cache.layers.iter_mut())
        .enumerate()
    {
        let _layer = tracing::debug_span!("layer", job = job.id, layer = l).entered();
        if last_only && l + 1 == n_layers {
            let (r, row) = finish_last_position(
                model, layer, l, comm, plan, &positions, &x, &rope, kv, job, experts, &mut moe,
            )?;
            x = row;
            layer.attn.trim_cache(b, kv, plan.len)?;
            if let Some(r) = r {
                routing.push((l, r));
            }
            on_layer(l + 1, n_layers)?;
            continue;
        }
        let params = layer.attn.params;
        // A sliding-window layer attends within its window whatever the job asks: the window
        // is the model's exact rule, the job's sparse modes approximate full attention.
        let mode = match layer.attn.window_rule() {
            Some(a) => AttentionMode::AShape(a),
            None => job.attention,
        };
        let mut attend = |qkv: ringmoe_model::layers::Qkv<B::Act>| -> Result<B::Act> {
            let _s = tracing::trace_span!("ring_attention").entered();
            // The K/V move into the ring and back out into the cache: held once.
            let tag = Tag::new(job.id, l as u32, 0, Kind::Ring);
            let own = (qkv.k, qkv.v);
            let ring = ring_attention_on(b, comm, plan, &params, &mode, &qkv.q, own, tag)?;
            drop(qkv.q);
            let (k, v) = ring.own;
            b.kv_append(kv, k, v, &positions)?;
            attention.add(&ring.stats);
            Ok(ring.part.out)
        };
        let out = attend(layer.qkv(b, &x, &rope)?)?;
        let r = match experts {
            None => layer.finish_in(b, &mut x, &out, pieces, &mut |m, xs, r| {
                local_experts::<B, ParallelError>(b, m, xs, r)
            })?,
            Some(ep) => layer.finish_in(
                b,
                &mut x,
                &out,
                pieces,
                &mut parallel_experts(b, comm, ep, job, l, &mut moe),
            )?,
        };
        drop(out);
        // A sliding-window layer keeps only the keys later tokens (decode) can see.
        layer.attn.trim_cache(b, kv, plan.len)?;
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

/// The last layer under the shortcut (see [`prefill_layers`]): returns the routing of the final
/// position (a sparse layer) and its hidden row, `[1, hidden]`, the same on every rank.
#[allow(clippy::too_many_arguments)]
fn finish_last_position<B: Backend, C: Collective<B>>(
    model: &Model<B>,
    layer: &DecoderLayer<B>,
    l: usize,
    comm: &C,
    plan: &ShardPlan,
    positions: &[usize],
    x: &B::Act,
    rope: &B::Rope,
    kv: &mut B::Kv,
    job: JobOptions,
    experts: Option<&ExpertParallel>,
    moe: &mut MoeStats,
) -> Result<(Option<Routing>, B::Act)> {
    let b = &**model.backend();
    let ringmoe_model::layers::Qkv { q, k, v } = layer.qkv(b, x, rope)?;
    b.kv_append(kv, k, v, positions)?;
    let last = plan.len - 1;
    let w = layer.attn.params.n_heads * layer.attn.params.head_dim;
    let h = model.config.hidden_size;
    let holder = holder_of(plan, last)?;
    let mine = match positions.iter().position(|&p| p == last) {
        Some(i) => Some(b.concat_rows_owned(vec![
            b.reshape(b.rows(&q, i, i + 1)?, w, 1)?,
            b.reshape(b.rows(x, i, i + 1)?, h, 1)?,
        ])?),
        None => None,
    };
    drop(q);
    let tag = |step| Tag::new(job.id, l as u32, step, Kind::AllGather);
    let row = share_row(b, comm, tag(SHORTCUT_SHARE_STEP), holder, mine, w + h)?;
    let q = b.reshape(b.rows(&row, 0, w)?, 1, w)?;
    let mut x = b.reshape(b.rows(&row, w, w + h)?, 1, h)?;
    let out = one_query_attention(b, comm, tag(SHORTCUT_MERGE_STEP), &layer.attn, &q, last, kv)?;
    let r = match experts {
        None => layer.finish(b, &mut x, &out, &mut |m, xs, r| {
            local_experts::<B, ParallelError>(b, m, xs, r)
        })?,
        Some(ep) => layer.finish(
            b,
            &mut x,
            &out,
            &mut parallel_experts(b, comm, ep, job, l, moe),
        )?,
    };
    Ok((r, x))
}

/// Layer `l`'s routed experts over the group (`moe_parallel_on`), its figures added to `moe`.
/// Each call (one per piece of the layer's rows) exchanges under its own tag step.
fn parallel_experts<'a, B: Backend, C: Collective<B>>(
    b: &'a B,
    comm: &'a C,
    ep: &'a ExpertParallel,
    job: JobOptions,
    l: usize,
    moe: &'a mut MoeStats,
) -> impl FnMut(&ringmoe_model::layers::SparseMoe<B>, &B::Act, &Routing) -> Result<B::Act> + 'a {
    let mut piece = 0u32;
    move |m, xs, routing| {
        let _s = tracing::trace_span!("expert_all_to_all").entered();
        let tag = Tag::new(job.id, l as u32, piece, Kind::Dispatch);
        piece += 1;
        let (y, s) = expert_layer(b, comm, ep, l, m, xs, routing, tag)?;
        moe.add(&s);
        Ok(y)
    }
}

/// One sparse layer's routed experts over the group with this rank's experts of `m`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn expert_layer<B: Backend, C: Collective<B>>(
    b: &B,
    comm: &C,
    ep: &ExpertParallel,
    l: usize,
    m: &ringmoe_model::layers::SparseMoe<B>,
    xs: &B::Act,
    routing: &Routing,
    tag: Tag,
) -> Result<(B::Act, MoeStats)> {
    let loaded = |e: usize| m.experts.get(e).is_ok();
    let mut compute = |rows: &B::Act, groups: &[(usize, usize)]| -> Result<B::Act> {
        Ok(b.grouped_mlp(rows, &m.experts.groups(groups)?)?)
    };
    moe_parallel_on(
        b,
        comm,
        ep,
        (l, m.experts.experts.len()),
        &loaded,
        xs,
        routing,
        tag,
        &mut compute,
    )
}

/// The rank of `plan` holding position `pos`.
pub(crate) fn holder_of(plan: &ShardPlan, pos: usize) -> Result<usize> {
    (0..plan.world())
        .find(|&r| plan.positions(r).contains(&pos))
        .ok_or_else(|| ParallelError::Invalid(format!("no rank holds position {pos}")))
}
