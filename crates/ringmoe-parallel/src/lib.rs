//! `ringmoe-parallel`: the distributed forward. Today: context parallelism — a sequence sharded over
//! P ranks (zigzag or contiguous), every layer's attention computed exactly as a ring of K/V blocks
//! over a [`ringmoe_comm::Communicator`], each rank holding only its own tokens' K/V — and expert
//! parallelism: each rank hosts the experts a versioned [`Placement`] gives it, and routed tokens
//! move to them and back by all-to-all ([`moe_parallel`]).

pub mod collective;
pub mod decode;
pub mod dispatch;
pub use ringmoe_plan::{
    LoadSnapshot, LoadTracker, Placement, PlanError, Replica, ShardPlan, Sharding,
};
/// The plan types live in `ringmoe-plan` (plain data the control plane shares); these paths
/// stay for the engine's callers.
pub use ringmoe_plan::{load, placement, shard};
pub mod error;
pub mod expert;
pub mod prefill;
pub mod ring;
pub mod sparse;

pub use collective::{Collective, HostRows, HostStep};
pub use decode::{ShardedSequence, StopRule, generate_sharded, merge_over_ranks, owner_of_next};
pub use error::{ParallelError, Result};
pub use expert::{
    DROPPED, ExpertCompute, ExpertParallel, MoeStats, assign_slots, check_version, moe_parallel,
    moe_parallel_on,
};
pub use prefill::{
    JobOptions, RankPrefill, prefill_shard, prefill_shard_observed, prefill_shard_with,
};
pub use ring::{RingOutput, RingStats, ring_attention, ring_attention_mode, ring_attention_on};
pub use sparse::AttentionMode;
