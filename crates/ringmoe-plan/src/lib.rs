//! `ringmoe-plan`: how a job is laid over workers, as plain data both the control plane and the
//! engine share — the versioned expert [`Placement`], the sequence [`ShardPlan`], which experts
//! a process loads ([`ExpertSelection`]) and expert load windows ([`LoadTracker`]).
//!
//! It depends on serde alone, so the coordinator can plan without linking the engine.

pub mod balance;
pub mod load;
pub mod placement;
pub mod selection;
pub mod shard;

pub use balance::{expected_per_layer, layered_imbalance, plan_balanced, planned_imbalance};
pub use load::{LoadSnapshot, LoadTracker, imbalance};
pub use placement::{Placement, Replica};
pub use selection::ExpertSelection;
pub use shard::{ShardPlan, Sharding};

/// A plan that cannot be built or does not fit what it is applied to.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid shard plan: a plan needs at least one rank")]
    NoRanks,

    #[error("invalid shard plan: {active} ranks holding tokens out of {world}: need 1..={world}")]
    ActiveRanks { active: usize, world: usize },

    #[error("invalid shard plan: {got} tokens for a plan of {len}")]
    TokenCount { got: usize, len: usize },

    #[error("invalid shard plan: {got} rank outputs for {world} ranks")]
    RankOutputs { got: usize, world: usize },

    #[error("invalid shard plan: rank {rank} returned {got} values for {rows} rows of {row}")]
    RankRows {
        rank: usize,
        got: usize,
        rows: usize,
        row: usize,
    },

    #[error("invalid shard plan: rank {rank} outside a world of {world}")]
    RankOutOfRange { rank: usize, world: usize },

    /// The placement map itself is malformed, or does not fit the model or the group.
    #[error("expert placement: {0}")]
    Placement(String),
}

pub type Result<T> = std::result::Result<T, PlanError>;
