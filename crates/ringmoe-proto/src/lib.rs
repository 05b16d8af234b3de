//! `ringmoe-proto`: the cluster's wire protocol and what every end of it shares.
//!
//! * [`proto`] — the generated `ringmoe.v1` gRPC messages and services;
//! * [`server`] — message size limits, `grpc.health.v1` and reflection every server has;
//! * [`client`] — what `ringmoe submit` and the tests use: upload, watch, fetch results;
//! * [`secret`] — the shared cluster secret between the coordinator and its workers;
//! * [`tls`] — TLS and mTLS settings for servers and clients.
//!
//! No engine code: the coordinator, the workers and clients all build on this.

pub mod client;
pub mod proto;
pub mod secret;
pub mod server;
pub mod tls;

pub use server::ServerOptions;

/// The metadata key on a worker's failed `RunJob` naming the rank (of that job) whose data
/// link failed: the coordinator leaves that worker out of the re-run when every worker still
/// answers (a link cut between two workers, not a dead one).
pub const LOST_PEER_HEADER: &str = "x-ringmoe-lost-peer";

/// A gRPC server that could not be set up or stopped serving.
#[derive(Debug, thiserror::Error)]
#[error("gRPC server: {0}")]
pub struct ServeError(pub String);

/// `e` and every error under it, joined by `: ` (a transport error's own text rarely says why:
/// a refused connection, a certificate the peer would not take).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out = format!("{out}: {s}");
        src = s.source();
    }
    out
}
