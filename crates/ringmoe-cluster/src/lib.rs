//! `ringmoe-cluster`: the cluster's processes and their protocol.
//!
//! * [`proto`] — the generated `ringmoe.v1` gRPC messages and services;
//! * [`store`] — the durable job store the coordinator writes every job to before acknowledging it;
//! * [`coordinator`] — accepts, persists, schedules and drives jobs over the workers;
//! * [`worker`] — holds a shard of a sequence and some experts and runs its part of jobs;
//! * [`client`] — what `ringmoe submit` uses: upload, watch, fetch results;
//! * [`membership`] — who is in the cluster (etcd or in-process) and coordinator leader election;
//! * [`server`] — health, reflection and size limits every server shares;
//! * [`convert`] — wire ↔ store ↔ engine types;
//! * [`testkit`] — a real etcd on free loopback ports, for tests.

pub mod client;
pub mod convert;
pub mod coordinator;
pub mod membership;
pub mod proto;
pub mod server;
pub mod store;
pub mod testkit;
pub mod worker;

pub use coordinator::{CoordinatorConfig, ModelEntry, run_coordinator};
pub use membership::{Membership, MemoryMembership, WorkerRecord};
pub use server::ServerOptions;
pub use store::{JobId, JobMode, JobSpec, JobState, JobStore, Recovered, StoreError, StoredJob};
pub use worker::{Registry, WorkerConfig, WorkerDevice, run_worker};

/// Errors of the cluster's processes (gRPC handlers answer with a `tonic::Status` instead).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] StoreError),

    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },

    #[error("gRPC server: {0}")]
    Server(String),

    #[error("model {name}: {msg}")]
    Model { name: String, msg: String },

    #[error("worker device {0}")]
    Device(String),
}

impl ClusterError {
    fn io(what: &str) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            what: what.to_string(),
            source,
        }
    }
}

/// Locks a mutex; a poisoned one (a panic elsewhere) becomes an internal error, not a panic here.
fn lock<T>(m: &std::sync::Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, tonic::Status> {
    m.lock()
        .map_err(|_| tonic::Status::internal("internal state poisoned by an earlier panic"))
}
