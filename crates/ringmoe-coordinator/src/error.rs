//! Why a job (or one run of it) failed, classified where it happens: [`JobError::retryable`]
//! says whether losing a worker may explain it, from the kind alone.

use std::time::Duration;

use ringmoe_plan::PlanError;

use crate::store::JobId;

/// What the coordinator was asking a worker to do when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerStep {
    LoadModel,
    Prepare,
    SendShard,
    /// The job's `RunJob` event stream (the compute itself).
    Run,
}

impl WorkerStep {
    fn doing(self) -> &'static str {
        match self {
            Self::LoadModel => " loading the model",
            Self::Prepare => " preparing",
            Self::SendShard => " receiving its shard",
            Self::Run => "",
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    #[error("connecting to worker {addr}: {message}")]
    Connect { addr: String, message: String },

    #[error("worker {rank}{}: {message}", step.doing())]
    Worker {
        rank: usize,
        step: WorkerStep,
        message: String,
    },

    /// Worker `rank`'s data link to worker `peer` (ranks of the run) failed while both
    /// processes may live on: a network fault between the two.
    #[error("worker {rank} lost its data link to worker {peer}: {message}")]
    Link {
        rank: usize,
        peer: usize,
        message: String,
    },

    /// The connection to worker `rank` broke under a call (reset, dropped, unreachable): the
    /// network's failure, not the worker's answer; the worker itself may be fine.
    #[error("the connection to worker {rank} broke{}: {message}", step.doing())]
    Connection {
        rank: usize,
        step: WorkerStep,
        message: String,
    },

    #[error("worker {rank} sent {what}")]
    BadResult { rank: usize, what: String },

    #[error("the workers returned {got} of {want} scores")]
    MissingScores { got: usize, want: usize },

    #[error("rank 0 returned no generated tokens")]
    NoTokens,

    #[error(
        "worker {worker} left the membership during the run (its lease ended: it died or was \
         cut off); the run was stopped"
    )]
    LeftDuringRun { worker: String },

    #[error("worker {worker} left while loading placement version {version} of '{model}'")]
    LeftWhileLoading {
        worker: String,
        model: String,
        version: u64,
    },

    #[error("worker {worker} cannot load placement version {version} of '{model}': {message}")]
    LoadRefused {
        worker: String,
        model: String,
        version: u64,
        message: String,
    },

    #[error(
        "worker(s) {} did not acknowledge placement version {version} of '{model}' within {timeout:?}",
        workers.join(", ")
    )]
    AckTimeout {
        workers: Vec<String>,
        model: String,
        version: u64,
        timeout: Duration,
    },

    #[error("membership: {0}")]
    Membership(String),

    #[error("the job needs K/V for {need} tokens but the {workers} live workers hold {capacity}")]
    Capacity {
        need: u64,
        capacity: u64,
        workers: usize,
    },

    #[error("the coordinator no longer serves model '{0}'")]
    UnknownModel(String),

    #[error("placing {experts} experts on {workers} workers: {source}")]
    Placement {
        experts: usize,
        workers: usize,
        source: PlanError,
    },

    #[error("sharding the sequence: {0}")]
    Shard(PlanError),

    #[error("job {id}'s stored input: {message}")]
    Input { id: JobId, message: String },

    #[error("job {id} was cancelled")]
    Cancelled { id: JobId },

    /// The coordinator's own bookkeeping failed (a task panicked, a table lost an entry).
    #[error("internal: {0}")]
    Internal(String),

    /// A retryable failure that the probe then explained by lost workers, with attempts left
    /// no more.
    #[error("{source} (gave up after {retries} retries)")]
    GaveUp { source: Box<JobError>, retries: u32 },
}

impl JobError {
    /// Whether a lost worker may explain the failure, so that re-running the job on the
    /// workers left could succeed. A failure the job itself causes (its size, its model, a
    /// placement a worker refuses to load, a cancel) would only fail again.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::Worker { .. }
            | Self::Link { .. }
            | Self::Connection { .. }
            | Self::BadResult { .. }
            | Self::MissingScores { .. }
            | Self::NoTokens
            | Self::LeftWhileLoading { .. }
            | Self::LeftDuringRun { .. }
            | Self::AckTimeout { .. }
            | Self::Membership(_) => true,
            Self::LoadRefused { .. }
            | Self::Capacity { .. }
            | Self::UnknownModel(_)
            | Self::Placement { .. }
            | Self::Shard(_)
            | Self::Input { .. }
            | Self::Cancelled { .. }
            | Self::Internal(_)
            | Self::GaveUp { .. } => false,
        }
    }
}

/// Errors that stop the coordinator process itself.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),

    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },

    #[error(transparent)]
    Serve(#[from] ringmoe_proto::ServeError),

    #[error("lost coordinator leadership; exiting so that no job runs twice")]
    LostLeadership,

    #[error("model {name}: {source}")]
    Model {
        name: String,
        source: ringmoe_hf::Error,
    },

    #[error("internal: {0}")]
    Internal(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_worker_and_the_step() {
        let e = JobError::Worker {
            rank: 2,
            step: WorkerStep::SendShard,
            message: "boom".into(),
        };
        assert_eq!(e.to_string(), "worker 2 receiving its shard: boom");
        let run = JobError::Worker {
            rank: 1,
            step: WorkerStep::Run,
            message: "lost peer".into(),
        };
        assert_eq!(run.to_string(), "worker 1: lost peer");
        assert!(run.retryable());
        let gave_up = JobError::GaveUp {
            source: Box::new(run),
            retries: 3,
        };
        assert_eq!(
            gave_up.to_string(),
            "worker 1: lost peer (gave up after 3 retries)"
        );
        assert!(!gave_up.retryable());
        assert!(!JobError::Cancelled { id: 4 }.retryable());
    }
}
