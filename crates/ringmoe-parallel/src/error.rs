//! Errors of the distributed forward: the communicator's, the model's, or a bad plan.

#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    #[error(transparent)]
    Comm(#[from] ringmoe_comm::CommError),

    #[error(transparent)]
    Model(#[from] ringmoe_model::Error),

    #[error(transparent)]
    Core(#[from] ringmoe_core::Error),

    #[error("invalid shard plan: {0}")]
    Plan(String),
}

pub type Result<T> = std::result::Result<T, ParallelError>;
