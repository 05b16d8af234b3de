//! `ringmoe-parallel`: the distributed forward. Today: context parallelism — a sequence sharded over
//! P ranks (zigzag or contiguous), every layer's attention computed exactly as a ring of K/V blocks
//! over a [`ringmoe_comm::Communicator`], each rank holding only its own tokens' K/V — and expert
//! parallelism: each rank hosts the experts a versioned [`Placement`] gives it, and routed tokens
//! move to them and back by all-to-all ([`moe_parallel`]).

pub mod decode;
pub mod error;
pub mod expert;
pub mod load;
pub mod placement;
pub mod prefill;
pub mod ring;
pub mod shard;
pub mod sparse;

pub use decode::{ShardedSequence, StopRule, generate_sharded, owner_of_next};
pub use error::{ParallelError, Result};
pub use expert::{DROPPED, ExpertParallel, MoeStats, assign_slots, check_version, moe_parallel};
pub use load::{LoadSnapshot, LoadTracker};
pub use placement::{Placement, Replica};
pub use prefill::{
    JobOptions, RankPrefill, prefill_shard, prefill_shard_observed, prefill_shard_with,
};
pub use ring::{RingStats, ring_attention, ring_attention_mode};
pub use shard::{ShardPlan, Sharding};
pub use sparse::AttentionMode;
