//! Decoding after a context-parallel prefill.
//!
//! The K/V cache stays sharded. With expert parallelism every rank runs the new token's dense
//! parts and dispatches its copy of the token to the experts' hosts, so every rank gets the same
//! result without a broadcast (the duplicate expert rows cost little for one token).
//! Each new token's query attends to every rank's shard: each rank
//! computes the partial `(out, lse)` against its own K/V, the partials are all-gathered and merged in
//! rank order, so every rank gets bit-identical attention output. The dense parts of the layer run
//! redundantly on every rank for the one new token (cheap next to attention over a long context).
//!
//! Placement of new K/V: the rank with the fewest cached tokens takes it (lowest rank on ties).
//! Every rank evaluates the same rule on the same shard sizes, so they agree without messages, and
//! shards never differ by more than one token more than they did after prefill.

use ringmoe_comm::{Kind, Tag};
use ringmoe_core::KvStore;
use ringmoe_core::{Backend, Cpu, Partial};
use ringmoe_model::generate::Sampler;
use ringmoe_model::layers::{Attention, local_experts};
use ringmoe_model::{KvCache, Model};

use crate::prefill::{expert_layer, prefill_layers};
use crate::{Collective, ExpertParallel, JobOptions, ParallelError, Result, ShardPlan};

/// A sequence whose K/V cache is sharded over the ranks of a group, on backend `B` over
/// collective `C` (the host: the CPU over a [`ringmoe_comm::Communicator`]).
pub struct ShardedSequence<'a, B: Backend = Cpu, C: Collective<B> = ringmoe_comm::Communicator> {
    model: &'a Model<B>,
    comm: &'a C,
    /// This rank's K/V (its own tokens only).
    pub cache: KvCache<B>,
    /// Cached tokens per rank, identical on every rank.
    pub shard_sizes: Vec<usize>,
    next_position: usize,
    job: u64,
    steps: u32,
    experts: Option<&'a ExpertParallel>,
}

impl<B: Backend, C: Collective<B>> std::fmt::Debug for ShardedSequence<'_, B, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedSequence")
            .field("shard_sizes", &self.shard_sizes)
            .field("next_position", &self.next_position)
            .finish()
    }
}

/// The rank that stores a new token's K/V given every rank's cached tokens: the fewest, lowest
/// rank on ties. Every rank evaluates this on the same sizes, so they agree without messages.
pub fn owner_of_next(shard_sizes: &[usize]) -> usize {
    let min = shard_sizes.iter().copied().min().unwrap_or(0);
    shard_sizes.iter().position(|&s| s == min).unwrap_or(0)
}

/// Rank `holder`'s `row` (`[width, 1]`; `None` on every other rank), on every rank: each rank
/// contributes a row (zeros unless it holds it) to one all-gather and takes the holder's.
pub(crate) fn share_row<B: Backend, C: Collective<B>>(
    b: &B,
    comm: &C,
    tag: Tag,
    holder: usize,
    row: Option<B::Act>,
    width: usize,
) -> Result<B::Act> {
    let mine = match row {
        Some(r) => r,
        None => b.zeros(width, 1)?,
    };
    if b.dims(&mine)? != (width, 1) {
        return Err(ParallelError::Invalid(format!(
            "a shared row of {:?}, expected [{width}, 1]",
            b.dims(&mine)?
        )));
    }
    let all = comm.all_gather(b, tag, &mine)?;
    Ok(b.rows(&all, holder * width, (holder + 1) * width)?)
}

/// One query at `pos` (`q`: `[1, n_heads·head_dim]`, the same on every rank) against the K/V
/// sharded over the ranks: each rank's partial `(out, lse)` over its own keys, merged over the
/// ranks in rank order ([`merge_over_ranks`]), so every rank gets the same output. Decode steps
/// and the last-layer shortcut of a prefill.
pub(crate) fn one_query_attention<B: Backend, C: Collective<B>>(
    b: &B,
    comm: &C,
    tag: Tag,
    attn: &Attention<B>,
    q: &B::Act,
    pos: usize,
    kv: &B::Kv,
) -> Result<B::Act> {
    let (hq, d) = (attn.params.n_heads, attn.params.head_dim);
    let part = if kv.positions().is_empty() {
        Partial {
            out: b.zeros(1, hq * d)?,
            lse: b.filled(1, hq, f32::NEG_INFINITY)?,
        }
    } else {
        attn.attend(b, q, &[pos], kv)?
    };
    merge_over_ranks(b, comm, tag, part)
}

/// Every rank's partial attention of the same queries over its own keys (`part`: `out`
/// `[rows, n_heads·head_dim]`, `lse` `[rows, n_heads]`), all-gathered and merged in rank order,
/// so every rank gets bit-identical output: attention over a sharded cache, on any backend.
pub fn merge_over_ranks<B, C>(b: &B, comm: &C, tag: Tag, part: Partial<B::Act>) -> Result<B::Act>
where
    B: Backend,
    C: Collective<B>,
{
    let (rows, qw) = b.dims(&part.out)?;
    let (lse_rows, hq) = b.dims(&part.lse)?;
    if lse_rows != rows {
        return Err(ParallelError::Invalid(format!(
            "partial attention of {rows} output rows with {lse_rows} lse rows"
        )));
    }
    let packed = b.concat_rows(&[
        b.reshape(part.out, rows * qw, 1)?,
        b.reshape(part.lse, rows * hq, 1)?,
    ])?;
    let all = comm.all_gather(b, tag, &packed)?;
    let width = rows * (qw + hq);
    let mut acc: Option<Partial<B::Act>> = None;
    for r in 0..comm.world_size() {
        let at = r * width;
        let p = Partial {
            out: b.reshape(b.rows(&all, at, at + rows * qw)?, rows, qw)?,
            lse: b.reshape(b.rows(&all, at + rows * qw, at + width)?, rows, hq)?,
        };
        match &mut acc {
            None => acc = Some(p),
            Some(a) => b.merge_rows(a, 0, &p)?,
        }
    }
    acc.map(|a| a.out)
        .ok_or_else(|| ParallelError::Invalid("a group of no ranks".into()))
}

impl<'a, B: Backend, C: Collective<B>> ShardedSequence<'a, B, C> {
    /// Prefills `tokens` (the whole prompt, known to every rank) sharded by `plan`; returns the
    /// sequence and the logits of the last prompt position, on every rank.
    pub fn prefill(
        model: &'a Model<B>,
        comm: &'a C,
        plan: &ShardPlan,
        tokens: &[u32],
        job: JobOptions,
    ) -> Result<(Self, Vec<f32>)> {
        Self::prefill_with(model, comm, plan, tokens, job, None)
    }

    /// [`Self::prefill`] with the routed experts expert-parallel (prefill and every decode step).
    pub fn prefill_with(
        model: &'a Model<B>,
        comm: &'a C,
        plan: &ShardPlan,
        tokens: &[u32],
        job: JobOptions,
        experts: Option<&'a ExpertParallel>,
    ) -> Result<(Self, Vec<f32>)> {
        let mine = plan.tokens_for(comm.rank(), tokens)?;
        Self::prefill_shard(model, comm, plan, &mine, job, experts, &mut |_, _| Ok(()))
    }

    /// [`Self::prefill_with`] when this rank knows only its own shard (`mine` = the tokens at
    /// `plan.positions(rank)`), as a cluster worker does; `on_layer` as in
    /// [`crate::prefill_shard_observed`].
    pub fn prefill_shard(
        model: &'a Model<B>,
        comm: &'a C,
        plan: &ShardPlan,
        mine: &[u32],
        job: JobOptions,
        experts: Option<&'a ExpertParallel>,
        on_layer: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<(Self, Vec<f32>)> {
        if plan.len == 0 {
            return Err(ParallelError::Invalid("the prompt has no tokens".into()));
        }
        // The exact last-layer shortcut: every rank ends with the final position's hidden row.
        let out = prefill_layers(model, comm, plan, mine, job, experts, on_layer, true)?;
        let logits = model.logits(&out.hidden)?.into_vec();
        let shard_sizes = (0..plan.world()).map(|r| plan.positions(r).len()).collect();
        Ok((
            Self {
                model,
                comm,
                cache: out.cache,
                shard_sizes,
                next_position: plan.len,
                job: job.id,
                steps: 0,
                experts,
            },
            logits,
        ))
    }

    /// The rank that stores the next token's K/V.
    pub fn owner_of_next(&self) -> usize {
        owner_of_next(&self.shard_sizes)
    }

    /// Feeds one token (the same on every rank) and returns the next logits, on every rank.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>> {
        let (me, model, comm) = (self.comm.rank(), self.model, self.comm);
        let b = &**model.backend();
        let owner = self.owner_of_next();
        let pos = self.next_position;
        self.steps += 1;
        let step = self.steps;
        let first = model
            .layers()
            .first()
            .ok_or_else(|| ParallelError::Invalid("model has no layers".into()))?;
        let rope = b.rope_table(first.attn.rope.table(&[pos]))?;
        let mut x = model.embed(&[token])?;
        for (l, (layer, kv)) in model
            .layers()
            .iter()
            .zip(self.cache.layers.iter_mut())
            .enumerate()
        {
            let attend = |qkv: ringmoe_model::layers::Qkv<B::Act>| -> Result<B::Act> {
                if me == owner {
                    b.kv_append(kv, qkv.k, qkv.v, &[pos])?;
                }
                let tag = Tag::new(self.job, l as u32, step, Kind::AllGather);
                one_query_attention(b, comm, tag, &layer.attn, &qkv.q, pos, kv)
            };
            match self.experts {
                None => layer.forward_parts(b, &mut x, &rope, attend, &mut |m, xs, r| {
                    local_experts::<B, ParallelError>(b, m, xs, r)
                })?,
                Some(ep) => {
                    layer.forward_parts(b, &mut x, &rope, attend, &mut |m, xs, routing| {
                        let tag = Tag::new(self.job, l as u32, step, Kind::Dispatch);
                        Ok(expert_layer(b, comm, ep, l, m, xs, routing, tag)?.0)
                    })?
                }
            };
        }
        self.shard_sizes[owner] += 1;
        self.next_position += 1;
        // A sliding-window layer keeps only the keys later steps can see (as after the prefill).
        for (layer, kv) in model.layers().iter().zip(self.cache.layers.iter_mut()) {
            layer.attn.trim_cache(b, kv, self.next_position)?;
        }
        Ok(model.logits(&x)?.into_vec())
    }
}

/// When generation stops: after `max_new_tokens`, or after emitting a token in `eos`.
#[derive(Debug, Clone, Copy)]
pub struct StopRule<'e> {
    pub max_new_tokens: usize,
    pub eos: &'e [u32],
}

/// Prefill sharded by `plan` (experts expert-parallel if `experts` is given), then decode until
/// `stop`. Every rank calls this with the same
/// arguments (and an identically seeded sampler) and gets the same tokens.
#[allow(clippy::too_many_arguments)]
pub fn generate_sharded<B: Backend, C: Collective<B>>(
    model: &Model<B>,
    comm: &C,
    plan: &ShardPlan,
    prompt: &[u32],
    stop: StopRule<'_>,
    sampler: &mut Sampler,
    job: JobOptions,
    experts: Option<&ExpertParallel>,
) -> Result<Vec<u32>> {
    let (max_new_tokens, eos) = (stop.max_new_tokens, stop.eos);
    let mut out = Vec::new();
    if max_new_tokens == 0 {
        return Ok(out);
    }
    let (mut seq, logits) =
        ShardedSequence::<B, C>::prefill_with(model, comm, plan, prompt, job, experts)?;
    let mut next = sampler.sample(&logits);
    loop {
        out.push(next);
        if eos.contains(&next) || out.len() >= max_new_tokens {
            return Ok(out);
        }
        next = sampler.sample(&seq.decode(next)?);
    }
}
