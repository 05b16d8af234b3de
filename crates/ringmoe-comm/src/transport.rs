//! The point-to-point layer under the communicator: ordered, reliable, tagged messages between
//! ranks. Collectives are built on top of it in `communicator.rs`, once for every transport.

use std::time::Duration;

use crate::{Payload, Result, Tag};

/// One message: a tag and a payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub tag: Tag,
    pub payload: Payload,
}

/// A reliable, per-peer FIFO link to every other rank.
///
/// `post` never blocks on the peer (the transport buffers or hands the message to an I/O thread),
/// so a rank may post to every peer before receiving from any without deadlock. `next` blocks for
/// the next message from one peer, at most `timeout`, and reports a lost peer as soon as the
/// transport knows.
pub trait Transport: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn post(&self, peer: usize, msg: Message) -> Result<()>;
    fn next(&self, peer: usize, timeout: Duration) -> Result<Message>;
    /// Closes every link so that peers blocked on this rank learn of the failure at once instead
    /// of waiting for their timeout. Idempotent.
    fn shutdown(&self);
    /// A short name for reports ("inproc", "tcp").
    fn name(&self) -> &'static str;
}
