//! Ring attention: exact causal attention of this rank's queries over every rank's keys.
//!
//! P steps. At each step the rank posts the K/V block in hand to the next rank
//! (`start_sendrecv`), attends its queries to that block while the transfer runs, merges the partial
//! `(out, lse)`, then takes the block arriving from the previous rank. Only KV heads travel
//! (grouped-query attention), and positions never do: every rank knows the shard plan, so the block
//! received at step s came from rank `(me − s) mod P` and holds that rank's positions. A block that
//! the causal mask removes entirely is skipped without compute.

use ringmoe_comm::{Communicator, Data, Kind, Payload, Tag};
use ringmoe_core::attention::{AttentionParams, PartialAttention, attention_block, merge_into};

use crate::{ParallelError, Result, ShardPlan};

fn kv_payload(k: Vec<f32>, v: Vec<f32>, tokens: usize, width: usize) -> Payload {
    let mut kv = k;
    kv.extend_from_slice(&v);
    Payload {
        shape: vec![2, tokens, width],
        data: Data::F32(kv),
    }
}

/// Where one rank's ring attention spent its time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RingStats {
    /// Attending to blocks and merging.
    pub compute_secs: f64,
    /// Blocked waiting for the next block (communication not hidden behind compute).
    pub wait_secs: f64,
    /// Blocks attended to / skipped because the causal mask removed them entirely.
    pub blocks_computed: usize,
    pub blocks_skipped: usize,
}

/// `q` is this rank's `[tokens, n_heads, head_dim]`, `k`/`v` its `[tokens, n_kv_heads, head_dim]`,
/// all at the positions `plan` gives this rank. `tag` names the job and layer; steps are set here.
pub fn ring_attention(
    comm: &Communicator,
    plan: &ShardPlan,
    params: &AttentionParams,
    q: &[f32],
    k: Vec<f32>,
    v: Vec<f32>,
    tag: Tag,
) -> Result<PartialAttention> {
    Ok(ring_attention_with_stats(comm, plan, params, q, k, v, tag)?.0)
}

/// [`ring_attention`] that also reports where the time went.
pub fn ring_attention_with_stats(
    comm: &Communicator,
    plan: &ShardPlan,
    params: &AttentionParams,
    q: &[f32],
    k: Vec<f32>,
    v: Vec<f32>,
    tag: Tag,
) -> Result<(PartialAttention, RingStats)> {
    let mut stats = RingStats::default();
    let (me, world) = (comm.rank(), comm.world_size());
    if plan.world() != world {
        return Err(ParallelError::Plan(format!(
            "plan for {} ranks on a communicator of {world}",
            plan.world()
        )));
    }
    let q_pos = plan.positions(me);
    let width = params.n_kv_heads * params.head_dim;
    let mut acc = PartialAttention::empty(q_pos.len(), params.n_heads, params.head_dim);
    let q_max = q_pos.iter().copied().max();
    let (next, prev) = ((me + 1) % world, (me + world - 1) % world);
    let mut block = kv_payload(k, v, q_pos.len(), width);
    for step in 0..world {
        let origin = (me + world - step) % world;
        let step_tag = Tag {
            step: step as u32,
            kind: Kind::Ring,
            ..tag
        };
        // Post the block in hand before computing on it, so the transfer overlaps the compute.
        let pending = if step + 1 < world {
            Some(comm.start_sendrecv(next, block.clone(), prev, step_tag)?)
        } else {
            None
        };
        let k_pos = plan.positions(origin);
        let masked = match (q_max, k_pos.first()) {
            (Some(qm), Some(&k0)) => params.causal && k0 > qm,
            _ => true, // no queries or no keys
        };
        let t = std::time::Instant::now();
        if masked {
            stats.blocks_skipped += 1;
        } else {
            stats.blocks_computed += 1;
            let Data::F32(kv) = &block.data else {
                return Err(ParallelError::Plan(format!(
                    "block from rank {origin} is not f32"
                )));
            };
            let (kb, vb) = kv.split_at(k_pos.len() * width);
            let part = attention_block(params, q, q_pos, kb, vb, k_pos)?;
            merge_into(&mut acc, &part)?;
        }
        stats.compute_secs += t.elapsed().as_secs_f64();
        if let Some(p) = pending {
            let from = (origin + world - 1) % world;
            let want = [2, plan.positions(from).len(), width];
            let t = std::time::Instant::now();
            block = comm.wait(p)?;
            stats.wait_secs += t.elapsed().as_secs_f64();
            if block.shape != want || block.dtype() != ringmoe_core::DType::F32 {
                return Err(ParallelError::Plan(format!(
                    "rank {me}: K/V block from rank {from} is {}, expected F32{want:?}",
                    block.describe()
                )));
            }
        }
    }
    Ok((acc, stats))
}
