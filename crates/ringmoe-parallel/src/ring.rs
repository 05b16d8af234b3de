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

use ringmoe_comm::{Communicator, Data, Kind, Payload, Tag};
use ringmoe_core::attention::{AttentionParams, PartialAttention, merge_into_rows};
use ringmoe_core::sparse::{Sparsity, attention_sparse};

use crate::sparse::{AttentionMode, estimate_vs};
use crate::{ParallelError, Result, ShardPlan};

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

/// The rows of a K/V block (`k` and `v`: `[tokens, width]` each) that `keep` selects, as a new
/// `[2, n, width]` block.
fn select_rows(k: &[f32], v: &[f32], width: usize, keep: &[bool]) -> Payload {
    let n = keep.iter().filter(|&&x| x).count();
    let mut out = Vec::with_capacity(2 * n * width);
    for half in [k, v] {
        for (t, _) in keep.iter().enumerate().filter(|&(_, &x)| x) {
            out.extend_from_slice(&half[t * width..(t + 1) * width]);
        }
    }
    Payload {
        shape: vec![2, n, width],
        data: Data::F32(out),
    }
}

/// The K/V block in hand: this rank's own (borrowed from the caller, never copied whole) or one
/// received, `[2, tokens, width]`.
enum Block<'a> {
    Own(&'a [f32], &'a [f32]),
    Received(Vec<f32>),
}

impl Block<'_> {
    fn halves(&self) -> (&[f32], &[f32]) {
        match self {
            Block::Own(k, v) => (k, v),
            Block::Received(kv) => kv.split_at(kv.len() / 2),
        }
    }

    fn values(&self) -> usize {
        let (k, v) = self.halves();
        k.len() + v.len()
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
/// Query-key pairs one piece of a ring step may score: about a second of one core's work on a
/// small model, and far more work than the per-piece overhead.
const PAIRS_PER_PIECE: usize = 1 << 26;

/// Queries per piece against a block of `keys` keys: all of them for ordinary blocks, fewer
/// (never under 256, so each piece still feeds every core) when the block is huge.
fn query_rows_per_piece(keys: usize) -> usize {
    (PAIRS_PER_PIECE / keys.max(1)).max(256)
}

/// all-gathers; see [`crate::sparse`]).
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
            let p = estimate_vs(comm, plan, params, cfg, q, k, tag)?;
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
    let kv_bytes = |p: &Payload| p.byte_len() as u64;
    let mut acc = PartialAttention::empty(q_pos.len(), params.n_heads, params.head_dim);
    let (next, prev) = ((me + 1) % world, (me + world - 1) % world);
    let mut block_pos = q_pos.to_vec();
    let mut kv = Block::Own(k, v);
    for step in 0..world {
        let origin = (me + world - step) % world;
        let step_tag = Tag {
            step: step as u32,
            kind: Kind::Ring,
            ..tag
        };
        // Post what the later recipients need before computing, so the transfer overlaps.
        let mut held = 4 * kv.values() as u64;
        let pending = if step + 1 < world {
            let keep = mask.needed_keys(
                params.causal,
                &later_recipients(plan, origin, step),
                &block_pos,
            );
            let (k, v) = kv.halves();
            let onward = select_rows(k, v, width, &keep);
            stats.bytes_sent += kv_bytes(&onward);
            held += kv_bytes(&onward);
            Some(comm.start_sendrecv(next, onward, prev, step_tag)?)
        } else {
            None
        };
        let t = std::time::Instant::now();
        let mine = mask.needed_keys(params.causal, q_pos, &block_pos);
        if mine.iter().any(|&x| x) {
            stats.blocks_computed += 1;
            let (kb, vb) = kv.halves();
            // Dense attention (quadratic in the block) in pieces of queries bounded by the pairs
            // they may score, checking between pieces that the group still stands (a cancelled
            // job aborts its communicator): a huge block then stops within one piece's time, not
            // one block's. Sparse patterns score a bounded number of keys per query and gather
            // their columns per call, so they run as one piece.
            let rows = match mask {
                Sparsity::Dense => query_rows_per_piece(block_pos.len()),
                _ => q_pos.len().max(1),
            };
            let (qw, hw) = (params.n_heads * params.head_dim, params.n_heads);
            for r0 in (0..q_pos.len()).step_by(rows) {
                comm.ensure_live()?;
                let r1 = (r0 + rows).min(q_pos.len());
                let (part, pairs) = attention_sparse(
                    params,
                    &mask,
                    &q[r0 * qw..r1 * qw],
                    &q_pos[r0..r1],
                    kb,
                    vb,
                    &block_pos,
                )?;
                stats.pairs_scored += pairs;
                if stats.blocks_computed == 1 && r0 == 0 && r1 == q_pos.len() {
                    // The first block, in one piece: nothing to merge with yet, and a long
                    // sequence's output is not held twice.
                    acc = part;
                    continue;
                }
                merge_into_rows(
                    &mut acc.out[r0 * qw..r1 * qw],
                    &mut acc.lse[r0 * hw..r1 * hw],
                    &part,
                )?;
            }
        } else {
            stats.blocks_skipped += 1;
        }
        stats.compute_secs += t.elapsed().as_secs_f64();
        if let Some(p) = pending {
            let from = (origin + world - 1) % world;
            let full = plan.positions(from);
            let keep = mask.needed_keys(params.causal, &later_recipients(plan, from, step), full);
            let want_pos = filter_positions(full, &keep);
            let want = [2, want_pos.len(), width];
            let t = std::time::Instant::now();
            let block = comm.wait(p)?;
            stats.wait_secs += t.elapsed().as_secs_f64();
            held += kv_bytes(&block);
            stats.peak_block_bytes = stats.peak_block_bytes.max(held);
            if block.shape != want || block.dtype() != ringmoe_core::DType::F32 {
                return Err(ParallelError::Invalid(format!(
                    "rank {me}: K/V block from rank {from} is {}, expected F32{want:?}",
                    block.describe()
                )));
            }
            kv = Block::Received(block.into_f32().unwrap_or_default());
            block_pos = want_pos;
        } else {
            stats.peak_block_bytes = stats.peak_block_bytes.max(held);
        }
    }
    Ok((acc, stats))
}
