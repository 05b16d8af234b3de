//! Ring attention: exact causal attention of this rank's queries over every rank's keys.
//!
//! P steps. At each step the rank posts the K/V block in hand to the next rank
//! (`start_sendrecv`), attends its queries to that block while the transfer runs, merges the partial
//! `(out, lse)`, then takes the block arriving from the previous rank. Only KV heads travel
//! (grouped-query attention), and positions never do: every rank knows the shard plan and the
//! attention pattern, so it can work out which positions a block it receives holds.
//!
//! Before passing a block on, the holder drops the keys that none of the block's remaining
//! recipients will score (under the causal mask and the sparse pattern, if any): with contiguous
//! sharding the causal mask alone trims blocks, with A-shape most keys never travel. A rank skips
//! a block none of its queries scores without computing.

use ringmoe_comm::{Communicator, Kind, Tag};
use ringmoe_core::attention::{AttentionParams, PartialAttention};
use ringmoe_core::sparse::Sparsity;
use ringmoe_core::{Backend, Cpu, KvRef, Partial, Tensor};

use crate::sparse::{AttentionMode, estimate_vs};
use crate::{Collective, ParallelError, Result, ShardPlan};

/// Where one rank's ring attention spent its time, and what it moved and computed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RingStats {
    /// Attending to blocks and merging.
    pub compute_secs: f64,
    /// Blocked waiting for the next block (communication not hidden behind compute).
    pub wait_secs: f64,
    /// Estimating the vertical-slash pattern (its collectives included).
    pub estimate_secs: f64,
    /// Blocks attended to / skipped because no query of this rank scores any key in them.
    pub blocks_computed: usize,
    pub blocks_skipped: usize,
    /// (query, key) pairs the kernel scored, summed over heads: the attention work.
    pub pairs_scored: u64,
    /// K/V bytes this rank sent to the next one.
    pub bytes_sent: u64,
    /// The most K/V bytes this rank held at once: the block in hand, the copy being sent and the
    /// block arriving.
    pub peak_block_bytes: u64,
}

impl RingStats {
    /// Adds another call's figures (peaks take the max).
    pub fn add(&mut self, o: &RingStats) {
        self.compute_secs += o.compute_secs;
        self.wait_secs += o.wait_secs;
        self.estimate_secs += o.estimate_secs;
        self.blocks_computed += o.blocks_computed;
        self.blocks_skipped += o.blocks_skipped;
        self.pairs_scored += o.pairs_scored;
        self.bytes_sent += o.bytes_sent;
        self.peak_block_bytes = self.peak_block_bytes.max(o.peak_block_bytes);
    }
}

fn filter_positions(pos: &[usize], keep: &[bool]) -> Vec<usize> {
    pos.iter()
        .zip(keep)
        .filter(|&(_, &k)| k)
        .map(|(&p, _)| p)
        .collect()
}

/// The positions of every rank that sees the block of `origin` after step `step`.
fn later_recipients(plan: &ShardPlan, origin: usize, step: usize) -> Vec<usize> {
    let world = plan.world();
    (step + 1..world)
        .flat_map(|j| plan.positions((origin + j) % world).iter().copied())
        .collect()
}

/// `q` is this rank's `[tokens, n_heads, head_dim]`, `k`/`v` its `[tokens, n_kv_heads, head_dim]`,
/// all at the positions `plan` gives this rank. `tag` names the job and layer; steps are set here.
pub fn ring_attention(
    comm: &Communicator,
    plan: &ShardPlan,
    params: &AttentionParams,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tag: Tag,
) -> Result<PartialAttention> {
    Ok(ring_attention_mode(comm, plan, params, &AttentionMode::Dense, q, k, v, tag)?.0)
}

/// Ring attention under an attention mode: dense, or one of the sparse prefill patterns. Every
/// rank must pass the same mode. With vertical-slash the pattern is estimated first (three small
/// all-gathers; see [`crate::sparse`]). The host form of [`ring_attention_on`]: `q`, `k`, `v` as
/// slices (copied into the CPU backend's tensors; the prefill hands its buffers over instead).
#[allow(clippy::too_many_arguments)]
pub fn ring_attention_mode(
    comm: &Communicator,
    plan: &ShardPlan,
    params: &AttentionParams,
    mode: &AttentionMode,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tag: Tag,
) -> Result<(PartialAttention, RingStats)> {
    let rows = plan.positions(comm.rank()).len();
    let width = params.n_kv_heads * params.head_dim;
    let qw = params.n_heads * params.head_dim;
    let shaped = |x: &[f32], w: usize, what: &str| -> Result<Tensor> {
        if x.len() != rows * w {
            return Err(ParallelError::Invalid(format!(
                "rank {}: {what} holds {} values for {rows} positions of width {w}",
                comm.rank(),
                x.len()
            )));
        }
        Ok(Tensor::from_vec(x.to_vec(), [rows, w])?)
    };
    let q = shaped(q, qw, "q")?;
    let own = (shaped(k, width, "k")?, shaped(v, width, "v")?);
    let RingOutput { part, stats, .. } =
        ring_attention_on(&Cpu, comm, plan, params, mode, &q, own, tag)?;
    Ok((
        PartialAttention {
            out: part.out.into_vec(),
            lse: part.lse.into_vec(),
        },
        stats,
    ))
}

/// What [`ring_attention_on`] returns: this rank's `(out, lse)`, its own K/V handed back, and
/// the figures.
#[derive(Debug)]
pub struct RingOutput<A> {
    pub part: Partial<A>,
    pub own: (A, A),
    pub stats: RingStats,
}

/// The K/V block in hand: this rank's own (`own`, handed back at the end) or one received,
/// packed `[2·tokens, width]`.
enum Held<A> {
    Own,
    Received(A),
}

/// The block in hand as attention reads it.
fn kv<'a, A>(h: &'a Held<A>, own: &'a (A, A)) -> KvRef<'a, A> {
    match h {
        Held::Own => KvRef::Split(&own.0, &own.1),
        Held::Received(a) => KvRef::Packed(a),
    }
}

/// Ring attention on any backend over any collective: this rank's queries `q` (`[tokens,
/// n_heads·head_dim]` at its positions in `plan`) over every rank's keys, `own` being this
/// rank's K and V (`[tokens, n_kv_heads·head_dim]` each; handed back with the result, never
/// copied whole). Returns this rank's `(out, lse)`, `own`, and the figures. Every rank must pass
/// the same plan and mode.
#[allow(clippy::too_many_arguments)]
pub fn ring_attention_on<B, C>(
    b: &B,
    comm: &C,
    plan: &ShardPlan,
    params: &AttentionParams,
    mode: &AttentionMode,
    q: &B::Act,
    own: (B::Act, B::Act),
    tag: Tag,
) -> Result<RingOutput<B::Act>>
where
    B: Backend,
    C: Collective<B>,
{
    let mut stats = RingStats::default();
    let (me, world) = (comm.rank(), comm.world_size());
    if plan.world() != world {
        return Err(ParallelError::Invalid(format!(
            "plan for {} ranks on a communicator of {world}",
            plan.world()
        )));
    }
    let q_pos = plan.positions(me);
    let pattern = match mode {
        AttentionMode::VerticalSlash(cfg) => {
            let t = std::time::Instant::now();
            let host = comm.host().ok_or_else(|| {
                ParallelError::Invalid(
                    "vertical-slash sparse attention estimates its pattern over the host \
                     communicator, which this group does not have"
                        .into(),
                )
            })?;
            let (qd, kd);
            let qs = match b.host_slice(q) {
                Some(s) => s,
                None => {
                    qd = b.download(q)?;
                    qd.as_slice()
                }
            };
            let ks = match b.host_slice(&own.0) {
                Some(s) => s,
                None => {
                    kd = b.download(&own.0)?;
                    kd.as_slice()
                }
            };
            let p = estimate_vs(host, plan, params, cfg, qs, ks, tag)?;
            stats.estimate_secs = t.elapsed().as_secs_f64();
            Some(p)
        }
        _ => None,
    };
    let mask = match (mode, &pattern) {
        (AttentionMode::AShape(a), _) => Sparsity::AShape(*a),
        (_, Some(p)) => Sparsity::VerticalSlash(p),
        _ => Sparsity::Dense,
    };
    let width = params.n_kv_heads * params.head_dim;
    let rows_of = |a: &B::Act| -> Result<usize> { Ok(b.dims(a)?.0) };
    let mut acc: Option<Partial<B::Act>> = None;
    let (next, prev) = ((me + 1) % world, (me + world - 1) % world);
    let mut block_pos = q_pos.to_vec();
    let mut held_block = Held::Own;
    for step in 0..world {
        let origin = (me + world - step) % world;
        let step_tag = Tag {
            step: step as u32,
            kind: Kind::Ring,
            ..tag
        };
        let mut held = 4 * match &held_block {
            Held::Own => (rows_of(&own.0)? + rows_of(&own.1)?) * width,
            Held::Received(a) => rows_of(a)? * width,
        } as u64;
        // Post what the later recipients need before computing, so the transfer overlaps.
        let pending = if step + 1 < world {
            let keep = mask.needed_keys(
                params.causal,
                &later_recipients(plan, origin, step),
                &block_pos,
            );
            let idx: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
            let onward = b.pack_kv_rows(kv(&held_block, &own), &idx)?;
            let bytes = (4 * 2 * idx.len() * width) as u64;
            stats.bytes_sent += bytes;
            held += bytes;
            // What arrives: the keys of the previous rank's block its later recipients need.
            let from = (origin + world - 1) % world;
            let full = plan.positions(from);
            let keep = mask.needed_keys(params.causal, &later_recipients(plan, from, step), full);
            let want_pos = filter_positions(full, &keep);
            let rows = 2 * want_pos.len();
            Some((
                comm.start_sendrecv(b, step_tag, next, onward, prev, rows)?,
                want_pos,
            ))
        } else {
            None
        };
        let t = std::time::Instant::now();
        let mine = mask.needed_keys(params.causal, q_pos, &block_pos);
        if mine.iter().any(|&x| x) {
            stats.blocks_computed += 1;
            // Dense attention (quadratic in the block) in pieces of queries bounded by the pairs
            // they may score, checking between pieces that the group still stands (a cancelled
            // job aborts its communicator): a huge block then stops within one piece's time, not
            // one block's. Sparse patterns score a bounded number of keys per query and gather
            // their columns per call, so they run as one piece.
            let rows = match mask {
                Sparsity::Dense => b.attention_rows_per_piece(block_pos.len()),
                _ => q_pos.len().max(1),
            }
            .max(1);
            for r0 in (0..q_pos.len()).step_by(rows) {
                comm.ensure_live()?;
                let r1 = (r0 + rows).min(q_pos.len());
                let whole = r0 == 0 && r1 == q_pos.len();
                let piece;
                let qp = if whole {
                    q
                } else {
                    piece = b.rows(q, r0, r1)?;
                    &piece
                };
                let (part, pairs) = b.attend(
                    params,
                    &mask,
                    qp,
                    &q_pos[r0..r1],
                    kv(&held_block, &own),
                    &block_pos,
                )?;
                stats.pairs_scored += pairs;
                match &mut acc {
                    // The first block, in one piece: nothing to merge with yet, and a long
                    // sequence's output is not held twice.
                    None if whole => acc = Some(part),
                    Some(a) => b.merge_rows(a, r0, &part)?,
                    None => {
                        let mut a = empty_partial(b, params, q_pos.len())?;
                        b.merge_rows(&mut a, r0, &part)?;
                        acc = Some(a);
                    }
                }
            }
        } else {
            stats.blocks_skipped += 1;
        }
        stats.compute_secs += t.elapsed().as_secs_f64();
        if let Some((p, want_pos)) = pending {
            let t = std::time::Instant::now();
            let block = comm.finish_sendrecv(b, p)?;
            stats.wait_secs += t.elapsed().as_secs_f64();
            held += (4 * rows_of(&block)? * width) as u64;
            stats.peak_block_bytes = stats.peak_block_bytes.max(held);
            held_block = Held::Received(block);
            block_pos = want_pos;
        } else {
            stats.peak_block_bytes = stats.peak_block_bytes.max(held);
        }
    }
    let acc = match acc {
        Some(a) => a,
        None => empty_partial(b, params, q_pos.len())?,
    };
    Ok(RingOutput {
        part: acc,
        own,
        stats,
    })
}

/// The neutral element of the merge for `rows` queries: no keys seen (`out` 0, `lse` −∞).
fn empty_partial<B: Backend>(
    b: &B,
    params: &AttentionParams,
    rows: usize,
) -> ringmoe_core::Result<Partial<B::Act>> {
    Ok(Partial {
        out: b.zeros(rows, params.n_heads * params.head_dim)?,
        lse: b.filled(rows, params.n_heads, f32::NEG_INFINITY)?,
    })
}
