//! Communicator errors. Every variant names the peer and, for bad frames, what was expected and
//! what arrived; after any of them the communicator is poisoned.

use std::time::Duration;

use crate::Tag;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: peer {peer} is out of range for world size {world}")]
    BadPeer {
        rank: usize,
        peer: usize,
        world: usize,
    },

    #[error("rank {rank}: timed out after {timeout:?} waiting for {tag} from peer {peer}")]
    Timeout {
        rank: usize,
        peer: usize,
        tag: Tag,
        timeout: Duration,
    },

    #[error("rank {rank}: lost peer {peer}: {reason}")]
    PeerLost {
        rank: usize,
        peer: usize,
        reason: String,
    },

    #[error("rank {rank}: from peer {peer} expected {expected} but {arrived} arrived")]
    UnexpectedTag {
        rank: usize,
        peer: usize,
        expected: Tag,
        arrived: Tag,
    },

    #[error("rank {rank}: {tag} from peer {peer}: expected {expected} but {arrived} arrived")]
    UnexpectedPayload {
        rank: usize,
        peer: usize,
        tag: Tag,
        expected: String,
        arrived: String,
    },

    #[error("rank {rank}: corrupt or foreign frame from peer {peer}: {reason}")]
    BadFrame {
        rank: usize,
        peer: usize,
        reason: String,
    },

    #[error("rank {rank}: rendezvous failed: {reason}")]
    Rendezvous { rank: usize, reason: String },

    #[error("rank {rank}: invalid argument to {op}: {msg}")]
    InvalidArgument {
        rank: usize,
        op: &'static str,
        msg: String,
    },

    #[error("rank {rank}: communicator is poisoned by an earlier error: {cause}")]
    Poisoned { rank: usize, cause: String },

    #[error("NCCL transport unavailable: {0}")]
    NcclUnavailable(String),
}

impl CommError {
    /// The peer whose link failed, where this error is one: it went away or fell silent (from
    /// this rank's side). Garbage from a peer (a wrong tag, shape or frame) is a bug, not a
    /// link failure, and names no one here.
    pub fn lost_peer(&self) -> Option<usize> {
        match self {
            Self::Timeout { peer, .. } | Self::PeerLost { peer, .. } => Some(*peer),
            Self::BadPeer { .. }
            | Self::UnexpectedTag { .. }
            | Self::UnexpectedPayload { .. }
            | Self::BadFrame { .. }
            | Self::Rendezvous { .. }
            | Self::InvalidArgument { .. }
            | Self::Poisoned { .. }
            | Self::NcclUnavailable(_) => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, CommError>;
