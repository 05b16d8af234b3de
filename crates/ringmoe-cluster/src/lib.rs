//! `ringmoe-cluster`: the control plane of the cluster. Today: the durable job store the
//! coordinator writes every job to before acknowledging it, and reloads after a restart.

pub mod store;

pub use store::{JobId, JobMode, JobSpec, JobState, JobStore, Recovered, StoreError, StoredJob};
