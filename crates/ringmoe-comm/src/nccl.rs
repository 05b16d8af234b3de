//! The NCCL transport for device buffers (feature `cuda`), through cudarc's dynamically loaded
//! `nccl` module: the binary links no CUDA library and builds without CUDA installed.
//!
//! * cudarc 0.19's `CudaContext::new` panics when no driver is present, so [`available`] checks the
//!   driver and NCCL libraries first and returns an error instead.
//! * cudarc looks for `libnccl.so` (and `libnccl.so.<cuda major>`), while NCCL's Python wheel
//!   (`nvidia-nccl-cu12/13`) ships `libnccl.so.2`. Point it there with a symlink on the library path:
//!   `mkdir -p ~/.local/nccl && ln -sf $SITE/nvidia/nccl/lib/libnccl.so.2 ~/.local/nccl/libnccl.so &&
//!   export LD_LIBRARY_PATH=~/.local/nccl:$LD_LIBRARY_PATH`.
//! * The NCCL unique id ([`NcclId`], 128 bytes) travels to the other ranks through whatever
//!   rendezvous started them (the control plane, or the TCP communicator's `all_gather`).
//!
//! `all_to_all_v` is a grouped set of `ncclSend`/`ncclRecv` (NCCL has no native all-to-all-v).
//! Without the feature, the same entry points exist and return "not compiled with CUDA support".
//!
//! Status: compile-checked in CI; not yet run on a GPU (see docs/performance.md for what is owed).
//! NCCL calls block inside the library when a peer dies; the fail-fast watchdog
//! (`ncclCommGetAsyncError` + `ncclCommAbort`) is not implemented yet.

#[cfg(not(feature = "cuda"))]
use crate::{CommError, Result};

/// The 128-byte NCCL unique id, as plain bytes for any rendezvous to carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclId(pub Vec<u8>);

#[cfg(feature = "cuda")]
pub use imp::NcclCommunicator;
#[cfg(feature = "cuda")]
pub use imp::{available, unique_id};

#[cfg(not(feature = "cuda"))]
fn not_compiled() -> CommError {
    CommError::NcclUnavailable(
        "ringmoe was not compiled with CUDA support (build with `--features cuda`)".into(),
    )
}

/// Checks that the CUDA driver and NCCL can be loaded.
#[cfg(not(feature = "cuda"))]
pub fn available() -> Result<()> {
    Err(not_compiled())
}

/// A fresh NCCL unique id (on the rank that creates the group).
#[cfg(not(feature = "cuda"))]
pub fn unique_id() -> Result<NcclId> {
    Err(not_compiled())
}

/// Without CUDA support this type cannot be constructed.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub struct NcclCommunicator(());

#[cfg(not(feature = "cuda"))]
impl NcclCommunicator {
    pub fn new(_rank: usize, _world: usize, _id: &NcclId, _device: usize) -> Result<Self> {
        Err(not_compiled())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::Arc;

    use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
    use cudarc::nccl::{Comm, Id, NcclType, result};

    use super::NcclId;
    use crate::{CommError, ReduceOp, Result};

    fn nccl_err(what: &str, e: impl std::fmt::Debug) -> CommError {
        CommError::NcclUnavailable(format!("{what}: {e:?}"))
    }

    pub fn available() -> Result<()> {
        // SAFETY: `is_culib_present` only tries to dlopen the library by its candidate names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CommError::NcclUnavailable(
                "no CUDA driver (libcuda.so) could be loaded".into(),
            ));
        }
        // SAFETY: as above, for libnccl.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(CommError::NcclUnavailable(
                "libnccl.so could not be loaded; NCCL's Python wheel ships libnccl.so.2: symlink it as libnccl.so on LD_LIBRARY_PATH".into(),
            ));
        }
        Ok(())
    }

    pub fn unique_id() -> Result<NcclId> {
        available()?;
        let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        Ok(NcclId(id.internal().iter().map(|&c| c as u8).collect()))
    }

    /// One rank of an NCCL group, bound to one GPU and its default stream.
    pub struct NcclCommunicator {
        comm: Comm,
        stream: Arc<CudaStream>,
    }

    impl std::fmt::Debug for NcclCommunicator {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("NcclCommunicator")
                .field("rank", &self.comm.rank())
                .field("world", &self.comm.world_size())
                .finish()
        }
    }

    fn group<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
        result::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        let r = f();
        result::group_end().map_err(|e| nccl_err("ncclGroupEnd", e))?;
        r
    }

    impl NcclCommunicator {
        pub fn new(rank: usize, world: usize, id: &NcclId, device: usize) -> Result<Self> {
            available()?;
            if id.0.len() != 128 {
                return Err(CommError::NcclUnavailable(format!(
                    "NCCL unique id has {} bytes, expected 128",
                    id.0.len()
                )));
            }
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, s) in internal.iter_mut().zip(&id.0) {
                *d = *s as std::ffi::c_char;
            }
            let ctx = CudaContext::new(device).map_err(|e| nccl_err("cuda context", e))?;
            let stream = ctx.default_stream();
            let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
                .map_err(|e| nccl_err("ncclCommInitRank", e))?;
            Ok(Self { comm, stream })
        }

        pub fn rank(&self) -> usize {
            self.comm.rank()
        }

        pub fn world_size(&self) -> usize {
            self.comm.world_size()
        }

        pub fn stream(&self) -> &Arc<CudaStream> {
            &self.stream
        }

        /// One ring step on device buffers, enqueued on the communicator's stream.
        pub fn sendrecv<T: NcclType>(
            &self,
            to: usize,
            send: &CudaSlice<T>,
            from: usize,
            recv: &mut CudaSlice<T>,
        ) -> Result<()> {
            group(|| {
                self.comm
                    .send(send, to as i32)
                    .map_err(|e| nccl_err("ncclSend", e))?;
                self.comm
                    .recv(recv, from as i32)
                    .map_err(|e| nccl_err("ncclRecv", e))?;
                Ok(())
            })
        }

        /// `send` holds the blocks for ranks 0..n back to back (`send_counts` elements each),
        /// `recv` receives from ranks 0..n back to back (`recv_counts`).
        pub fn all_to_all_v<T: NcclType>(
            &self,
            send: &CudaSlice<T>,
            send_counts: &[usize],
            recv: &mut CudaSlice<T>,
            recv_counts: &[usize],
        ) -> Result<()> {
            let n = self.world_size();
            if send_counts.len() != n || recv_counts.len() != n {
                return Err(CommError::InvalidArgument {
                    rank: self.rank(),
                    op: "all_to_all_v",
                    msg: format!("counts for {n} ranks expected"),
                });
            }
            let (st, rt): (usize, usize) = (send_counts.iter().sum(), recv_counts.iter().sum());
            if st > send.len() || rt > recv.len() {
                return Err(CommError::InvalidArgument {
                    rank: self.rank(),
                    op: "all_to_all_v",
                    msg: format!(
                        "counts need {st}/{rt} elements, buffers hold {}/{}",
                        send.len(),
                        recv.len()
                    ),
                });
            }
            group(|| {
                let mut off = 0;
                for (j, &c) in send_counts.iter().enumerate() {
                    if c > 0 {
                        self.comm
                            .send(&send.slice(off..off + c), j as i32)
                            .map_err(|e| nccl_err("ncclSend", e))?;
                    }
                    off += c;
                }
                let mut off = 0;
                for (j, &c) in recv_counts.iter().enumerate() {
                    if c > 0 {
                        self.comm
                            .recv(&mut recv.slice_mut(off..off + c), j as i32)
                            .map_err(|e| nccl_err("ncclRecv", e))?;
                    }
                    off += c;
                }
                Ok(())
            })
        }

        pub fn all_gather<T: NcclType>(
            &self,
            send: &CudaSlice<T>,
            recv: &mut CudaSlice<T>,
        ) -> Result<()> {
            self.comm
                .all_gather(send, recv)
                .map(|_| ())
                .map_err(|e| nccl_err("ncclAllGather", e))
        }

        pub fn all_reduce(
            &self,
            send: &CudaSlice<f32>,
            recv: &mut CudaSlice<f32>,
            op: ReduceOp,
        ) -> Result<()> {
            let op = match op {
                ReduceOp::Sum => cudarc::nccl::ReduceOp::Sum,
                ReduceOp::Max => cudarc::nccl::ReduceOp::Max,
            };
            self.comm
                .all_reduce(send, recv, &op)
                .map(|_| ())
                .map_err(|e| nccl_err("ncclAllReduce", e))
        }

        /// Waits for everything enqueued on the stream.
        pub fn synchronize(&self) -> Result<()> {
            self.stream
                .synchronize()
                .map_err(|e| nccl_err("stream synchronize", e))
        }
    }
}
