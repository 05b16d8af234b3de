//! Errors of the distributed forward: the communicator's, the model's, or a bad plan.

#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    #[error(transparent)]
    Comm(#[from] ringmoe_comm::CommError),

    #[error(transparent)]
    Model(#[from] ringmoe_model::Error),

    #[error(transparent)]
    Core(#[from] ringmoe_core::Error),

    /// A shard plan or placement that does not fit (see [`ringmoe_plan::PlanError`]).
    #[error(transparent)]
    Plan(#[from] ringmoe_plan::PlanError),

    /// A request the distributed forward cannot run as given (empty prompt, shapes that do not
    /// match the plan, an unsupported mode); the message names what.
    #[error("invalid shard plan: {0}")]
    Invalid(String),

    #[error("job {0} was cancelled")]
    Cancelled(u64),

    #[error("expert dispatch: {0}")]
    Dispatch(String),

    /// The GPU backend failed (its own error type lives in `ringmoe-cuda`, which builds on this
    /// crate).
    #[error("GPU: {0}")]
    Device(Box<dyn std::error::Error + Send + Sync>),

    #[error(
        "worker {worker} has placement version {mine} but rank {peer} dispatched with version {theirs}: \
         every worker must switch placements together"
    )]
    StalePlacement {
        worker: usize,
        peer: usize,
        mine: u64,
        theirs: u64,
    },
}

pub type Result<T> = std::result::Result<T, ParallelError>;
