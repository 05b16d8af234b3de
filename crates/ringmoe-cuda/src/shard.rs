//! The distributed forward on GPUs: a rank's shard of the sequence through every layer with
//! ring attention over NCCL and, optionally, the routed experts expert-parallel over the same
//! group ([`CudaModel::prefill_shard`]); then decoding over the sharded K/V cache
//! ([`CudaShardedSequence`]). These mirror `ringmoe_parallel::prefill_shard_observed` and
//! `ringmoe_parallel::ShardedSequence` step by step — same sharding plan, same dispatch, same
//! merge order, same rule for where new K/V goes — so a GPU group reproduces a CPU group and the
//! single-process engine within the device tolerances.

use ringmoe_comm::nccl::NcclCommunicator;
use ringmoe_comm::{Kind, Tag};
use ringmoe_core::{AttentionParams, Backend, Partial};
use ringmoe_model::moe::Routing;
use ringmoe_parallel::{ExpertParallel, MoeStats, ShardPlan, merge_over_ranks};

use crate::device::{CudaBackend, DeviceKv, DeviceTensor};
use crate::model::{Attend, CudaKvCache, CudaModel, Group};
use crate::{CudaError, Result};

fn invalid(msg: String) -> CudaError {
    CudaError::Invalid {
        op: "prefill_shard",
        msg,
    }
}

/// What a rank holds after a GPU prefill.
#[derive(Debug)]
pub struct CudaRankPrefill {
    /// Absolute positions of this rank's tokens.
    pub positions: Vec<usize>,
    /// Final hidden states of those tokens (before the final norm), `[tokens, hidden]`.
    pub hidden: DeviceTensor,
    /// K/V of this rank's tokens only, per layer.
    pub cache: CudaKvCache,
    /// Routing of this rank's tokens in each sparse layer.
    pub routing: Vec<(usize, Routing)>,
    /// Expert-parallel figures summed over the sparse layers (zero when experts run locally).
    pub moe: MoeStats,
}

/// The partial attention of the queries at `q_pos` over this rank's cache, all-gathered over
/// the group and merged in rank order (`ringmoe_parallel::merge_over_ranks`, identical on every
/// rank). A rank with an empty cache contributes `(0, -inf)`, which the merge ignores.
pub(crate) fn sharded_attention(
    b: &CudaBackend,
    comm: &NcclCommunicator,
    p: &AttentionParams,
    q: &DeviceTensor,
    q_pos: &[usize],
    kv: &DeviceKv,
) -> Result<DeviceTensor> {
    let (rows, qw) = (q_pos.len(), p.n_heads * p.head_dim);
    let part = if kv.is_empty() {
        Partial {
            out: b.zeros(vec![rows, qw])?,
            lse: Backend::filled(b, rows, p.n_heads, f32::NEG_INFINITY)?,
        }
    } else {
        let (out, lse) = b.attention_cached(p, q, q_pos, kv)?;
        Partial {
            out: out.reshape(vec![rows, qw])?,
            lse: lse.reshape(vec![rows, p.n_heads])?,
        }
    };
    let tag = Tag::new(0, 0, 0, Kind::AllGather);
    Ok(merge_over_ranks(b, comm, tag, part)?)
}

impl CudaModel {
    /// Runs this rank's shard (`tokens` = the tokens at `plan.positions(comm.rank())`) through
    /// the model: ring attention over `comm` in every layer, the routed experts
    /// expert-parallel when `ep` is given (then this GPU holds only the experts the placement
    /// puts on it). `on_layer(done, layers)` runs after every layer; its error stops the
    /// prefill (the other ranks then fail at their next collective, by the NCCL timeout).
    /// Every rank of `comm` calls this with the same plan.
    pub fn prefill_shard(
        &self,
        comm: &NcclCommunicator,
        plan: &ShardPlan,
        tokens: &[u32],
        ep: Option<&ExpertParallel>,
        on_layer: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<CudaRankPrefill> {
        if let Some(ep) = ep {
            ep.check_loaded(
                (self.config.num_layers, self.config.moe.num_experts),
                comm.world_size(),
                comm.rank(),
                &self.loaded_experts(),
            )?;
        }
        if plan.world() != comm.world_size() {
            return Err(invalid(format!(
                "the plan has {} ranks, the NCCL group {}",
                plan.world(),
                comm.world_size()
            )));
        }
        let blocks: Vec<Vec<usize>> = (0..plan.world())
            .map(|r| plan.positions(r).to_vec())
            .collect();
        if let Some(r) = blocks.iter().position(Vec::is_empty) {
            return Err(invalid(format!(
                "rank {r} holds no tokens of the {}-token sequence; the GPU ring needs every \
                 rank to hold at least one (use fewer ranks)",
                plan.len
            )));
        }
        let positions = blocks[comm.rank()].clone();
        if tokens.len() != positions.len() {
            return Err(invalid(format!(
                "rank {} got {} tokens for {} positions",
                comm.rank(),
                tokens.len(),
                positions.len()
            )));
        }
        // Checked on the whole plan, not only this rank's positions, so every rank refuses
        // together instead of leaving the others waiting in NCCL.
        if let Some(w) = self.config.min_window()
            && plan.len > w
        {
            return Err(invalid(format!(
                "sequence of {} tokens exceeds a layer's sliding window of {w}; sliding-window \
                 attention is not implemented on the CUDA path (the CPU engine runs it)",
                plan.len
            )));
        }
        let mut cache = self.new_cache()?;
        let group = Group { comm, ep };
        let (hidden, routing, moe) = self.run_layers(
            tokens,
            &positions,
            &mut cache,
            &Attend::Ring(plan),
            Some(&group),
            on_layer,
        )?;
        Ok(CudaRankPrefill {
            positions,
            hidden,
            cache,
            routing,
            moe,
        })
    }
}

/// A sequence whose K/V cache is sharded over the GPUs of an NCCL group: the device
/// counterpart of `ringmoe_parallel::ShardedSequence`. The dense parts of each decode step run
/// on every rank for the one new token; its attention is every rank's partial over its own
/// cache, all-gathered and merged in rank order; with expert parallelism every rank dispatches
/// its copy of the token, so all ranks get the same logits without a broadcast. New K/V goes to
/// the rank with the fewest cached tokens (lowest on ties).
pub struct CudaShardedSequence<'a> {
    model: &'a CudaModel,
    comm: &'a NcclCommunicator,
    cache: CudaKvCache,
    /// Cached tokens per rank, identical on every rank.
    pub shard_sizes: Vec<usize>,
    next_position: usize,
    ep: Option<&'a ExpertParallel>,
}

impl std::fmt::Debug for CudaShardedSequence<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaShardedSequence")
            .field("shard_sizes", &self.shard_sizes)
            .field("next_position", &self.next_position)
            .finish()
    }
}

impl<'a> CudaShardedSequence<'a> {
    /// [`CudaModel::prefill_shard`] of this rank's shard `mine`, then the logits of the last
    /// prompt position shared with every rank.
    pub fn prefill_shard(
        model: &'a CudaModel,
        comm: &'a NcclCommunicator,
        plan: &ShardPlan,
        mine: &[u32],
        ep: Option<&'a ExpertParallel>,
        on_layer: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<(Self, Vec<f32>)> {
        if plan.len == 0 {
            return Err(invalid("the prompt has no tokens".into()));
        }
        let out = model.prefill_shard(comm, plan, mine, ep, on_layer)?;
        let last = plan.len - 1;
        let b = model.backend();
        let vocab = model.config.vocab_size;
        // Every rank sends a row; the rank holding the last position sends its logits.
        let row = match out.positions.iter().position(|&p| p == last) {
            Some(i) => model.last_logits(&b.rows(&out.hidden, i, i + 1)?)?,
            None => b.zeros(vec![1, vocab])?,
        };
        let holder = (0..plan.world())
            .find(|&r| plan.positions(r).contains(&last))
            .ok_or_else(|| invalid(format!("no rank holds position {last}")))?;
        let mut all = b.zeros(vec![plan.world(), vocab])?;
        comm.all_gather(row.buffer(), all.buffer_mut())?;
        let logits = b.download(&b.rows(&all, holder, holder + 1)?)?.into_vec();
        let shard_sizes = (0..plan.world()).map(|r| plan.positions(r).len()).collect();
        Ok((
            Self {
                model,
                comm,
                cache: out.cache,
                shard_sizes,
                next_position: plan.len,
                ep,
            },
            logits,
        ))
    }

    /// The rank that stores the next token's K/V (the host path's rule).
    pub fn owner_of_next(&self) -> usize {
        ringmoe_parallel::owner_of_next(&self.shard_sizes)
    }

    /// Feeds one token (the same on every rank) and returns the next logits, on every rank.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>> {
        let owner = self.owner_of_next();
        let pos = self.next_position;
        let group = Group {
            comm: self.comm,
            ep: self.ep,
        };
        let (x, _, _) = self.model.run_layers(
            &[token],
            &[pos],
            &mut self.cache,
            &Attend::Sharded {
                own: self.comm.rank() == owner,
            },
            Some(&group),
            &mut |_, _| Ok(()),
        )?;
        self.shard_sizes[owner] += 1;
        self.next_position += 1;
        let logits = self.model.last_logits(&x)?;
        Ok(self.model.backend().download(&logits)?.into_vec())
    }
}
