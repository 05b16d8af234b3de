//! `ringmoe-comm`: the communicator that ring attention and expert parallelism run over.
//!
//! [`Communicator`] offers `send`/`recv`, the ring step `sendrecv` (also split into
//! `start_sendrecv` + `wait` for overlap), `all_to_all_v`, `all_gather`, `all_reduce` (f32 sum/max)
//! and `barrier`, on typed, shaped payloads ([`Payload`]) with tags ([`Tag`]) that every receiver
//! checks. Transports: [`in_process`] (threads; tests and the embedded mode), [`tcp`] (one
//! connection per pair of ranks) and, with feature `cuda`, NCCL on device buffers ([`nccl`]).
//! A lost, silent or misbehaving peer turns every pending operation into an error within the
//! timeout, and poisons the communicator; nothing hangs.

#[cfg(not(target_endian = "little"))]
compile_error!(
    "ringmoe-comm writes payloads as their in-memory bytes and assumes a little-endian host"
);

pub mod bench;
pub mod communicator;
pub mod error;
pub mod inproc;
pub mod launch;
pub mod local;
pub mod nccl;
pub mod payload;
pub mod tag;
pub mod tcp;
pub mod testkit;
pub mod transport;
pub mod wire;

pub use communicator::{
    CommTotals, Communicator, DEFAULT_TIMEOUT, OpTotals, PendingAllToAll, PendingRecv, ReduceOp,
};
pub use error::{CommError, Result};
pub use inproc::in_process;
pub use payload::{Data, Payload};
pub use tag::{Kind, Tag};
pub use tcp::{DataTls, TcpOptions, tcp};
pub use transport::{Message, Transport};
