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
//! Faults: NCCL kernels never finish when a peer dies, so every operation is enqueued and then
//! waited for by polling a CUDA event up to the communicator's timeout. On expiry the communicator is
//! poisoned and the NCCL communicator aborted (`ncclCommAbort`, through cudarc's `Drop`), which
//! releases the stuck kernels; later calls return the poison error. NCCL's asynchronous error query
//! is not used (cudarc keeps the raw handle private), so a failure surfaces at the timeout.
//!
//! Status: compile-checked in CI (`cargo clippy -p ringmoe-comm --features cuda`); not yet run on a
//! GPU. See docs/performance.md for the GPU checks still owed.

#[cfg(not(feature = "cuda"))]
use crate::{CommError, Result};

/// The 128-byte NCCL unique id, as plain bytes for any rendezvous to carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclId(pub Vec<u8>);

#[cfg(feature = "cuda")]
pub use imp::{NcclCommunicator, Pending, available, bench_threads, unique_id};

/// Forms an NCCL group over the ranks of an existing communicator (TCP or in-process): rank 0
/// creates the unique id and every rank receives it through `comm`, then initialises NCCL on
/// `device`. Ranks without CUDA support fail together: rank 0 sends an empty id instead.
pub fn join(
    comm: &crate::Communicator,
    device: usize,
    timeout: std::time::Duration,
) -> crate::Result<NcclCommunicator> {
    let id = exchange_id(comm)?;
    NcclCommunicator::new(comm.rank(), comm.world_size(), &id, device, timeout)
}

/// The rendezvous half of [`join`]: rank 0's fresh unique id, received by every rank of `comm`
/// (for callers that initialise NCCL on a context of their own with `on_context`).
pub fn exchange_id(comm: &crate::Communicator) -> crate::Result<NcclId> {
    use crate::{Data, Kind, Payload, Tag};
    let tag = Tag::new(0, 0, 0, Kind::AllGather);
    let mine = match comm.rank() {
        0 => unique_id().map(|id| id.0).unwrap_or_default(),
        _ => Vec::new(),
    };
    let all = comm.all_gather(
        tag,
        Payload {
            shape: vec![mine.len()],
            data: Data::U8(mine),
        },
    )?;
    match all.into_iter().next().map(|p| p.data) {
        Some(Data::U8(bytes)) if bytes.len() == 128 => Ok(NcclId(bytes)),
        _ => Err(crate::CommError::NcclUnavailable(
            "rank 0 could not create an NCCL unique id (no CUDA/NCCL there)".into(),
        )),
    }
}

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

/// `world` NCCL ranks as threads, rank `r` on GPU `r`: seconds per `all_to_all_v` and per ring
/// step for each size in bytes per rank (f32 device buffers), after one warm-up call.
#[cfg(not(feature = "cuda"))]
pub fn bench_threads(_world: usize, _sizes: &[usize], _iters: u32) -> Result<Vec<Vec<(f64, f64)>>> {
    Err(not_compiled())
}

/// Without CUDA support this type cannot be constructed.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub struct NcclCommunicator(());

#[cfg(not(feature = "cuda"))]
impl NcclCommunicator {
    pub fn new(
        _rank: usize,
        _world: usize,
        _id: &NcclId,
        _device: usize,
        _timeout: std::time::Duration,
    ) -> Result<Self> {
        Err(not_compiled())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream};
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

    /// Work enqueued on the NCCL stream, to be waited for with [`NcclCommunicator::finish`].
    #[derive(Debug)]
    #[must_use = "enqueued NCCL work must be finished"]
    pub struct Pending {
        what: &'static str,
        event: CudaEvent,
    }

    fn group<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
        result::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        let r = f();
        result::group_end().map_err(|e| nccl_err("ncclGroupEnd", e))?;
        r
    }

    /// One rank of an NCCL group, bound to one GPU and a stream of its own (not the compute
    /// stream), so transfers overlap with kernels; cudarc's per-buffer events order each buffer's
    /// uses across the two streams.
    pub struct NcclCommunicator {
        /// `None` once aborted after a failure.
        comm: Mutex<Option<Comm>>,
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        timeout: Duration,
        poisoned: Mutex<Option<String>>,
    }

    impl std::fmt::Debug for NcclCommunicator {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("NcclCommunicator")
                .field("rank", &self.rank)
                .field("world", &self.world)
                .finish()
        }
    }

    impl NcclCommunicator {
        pub fn new(
            rank: usize,
            world: usize,
            id: &NcclId,
            device: usize,
            timeout: Duration,
        ) -> Result<Self> {
            available()?;
            let ctx = CudaContext::new(device).map_err(|e| nccl_err("cuda context", e))?;
            Self::on_context(rank, world, id, &ctx, timeout)
        }

        /// A rank on an existing context (the compute backend's, so that buffers are shared and
        /// cross-stream ordering is tracked), with a new non-blocking stream for NCCL.
        pub fn on_context(
            rank: usize,
            world: usize,
            id: &NcclId,
            ctx: &Arc<CudaContext>,
            timeout: Duration,
        ) -> Result<Self> {
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
            let stream = ctx.new_stream().map_err(|e| nccl_err("cuda stream", e))?;
            let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
                .map_err(|e| nccl_err("ncclCommInitRank", e))?;
            Ok(Self {
                comm: Mutex::new(Some(comm)),
                stream,
                rank,
                world,
                timeout,
                poisoned: Mutex::new(None),
            })
        }

        pub fn rank(&self) -> usize {
            self.rank
        }

        pub fn world_size(&self) -> usize {
            self.world
        }

        pub fn stream(&self) -> &Arc<CudaStream> {
            &self.stream
        }

        /// Enqueues `f` on the live communicator, then waits for the stream up to the timeout.
        fn run(&self, what: &'static str, f: impl FnOnce(&Comm) -> Result<()>) -> Result<()> {
            let pending = self.enqueue(what, f)?;
            self.finish(pending)
        }

        /// Enqueues `f` on the live communicator and returns at once with an event recorded
        /// after it.
        fn enqueue(
            &self,
            what: &'static str,
            f: impl FnOnce(&Comm) -> Result<()>,
        ) -> Result<Pending> {
            if let Some(cause) = self
                .poisoned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return Err(CommError::Poisoned {
                    rank: self.rank,
                    cause,
                });
            }
            let enqueued = {
                let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
                match comm.as_ref() {
                    Some(c) => f(c),
                    None => Err(CommError::Poisoned {
                        rank: self.rank,
                        cause: "NCCL communicator was aborted".into(),
                    }),
                }
            };
            enqueued.map_err(|e| self.poison(e))?;
            let event = self
                .stream
                .record_event(None)
                .map_err(|e| self.poison(nccl_err("record event", e)))?;
            Ok(Pending { what, event })
        }

        fn poison(&self, e: CommError) -> CommError {
            let mut p = self.poisoned.lock().unwrap_or_else(|p| p.into_inner());
            if p.is_none() {
                *p = Some(e.to_string());
            }
            drop(p);
            // Dropping cudarc's Comm calls ncclCommAbort, which frees kernels stuck on a dead peer.
            self.comm.lock().unwrap_or_else(|p| p.into_inner()).take();
            e
        }

        /// Waits for enqueued work by polling its event until it completes or the timeout passes.
        pub fn finish(&self, pending: Pending) -> Result<()> {
            let Pending { what, event } = pending;
            let deadline = Instant::now() + self.timeout;
            loop {
                match event.try_is_complete() {
                    Ok(true) => return Ok(()),
                    Ok(false) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_micros(50))
                    }
                    Ok(false) => {
                        return Err(self.poison(CommError::NcclUnavailable(format!(
                            "rank {}: {what} did not complete within {:?}; a peer is gone or stuck (communicator aborted)",
                            self.rank, self.timeout
                        ))));
                    }
                    Err(e) => return Err(self.poison(nccl_err(what, e))),
                }
            }
        }

        /// One ring step on device buffers.
        pub fn sendrecv<T: NcclType>(
            &self,
            to: usize,
            send: &CudaSlice<T>,
            from: usize,
            recv: &mut CudaSlice<T>,
        ) -> Result<()> {
            let pending = self.start_sendrecv(to, send, from, recv)?;
            self.finish(pending)
        }

        /// [`Self::sendrecv`] enqueued on the NCCL stream without waiting: the caller launches
        /// compute on its own stream, then [`Self::finish`]es. Kernels that later read `recv` on
        /// another stream of the same context wait for the transfer through cudarc's buffer
        /// events; `send` and `recv` must live until `finish` returns.
        pub fn start_sendrecv<T: NcclType>(
            &self,
            to: usize,
            send: &CudaSlice<T>,
            from: usize,
            recv: &mut CudaSlice<T>,
        ) -> Result<Pending> {
            self.enqueue("sendrecv", |c| {
                group(|| {
                    c.send(send, to as i32)
                        .map_err(|e| nccl_err("ncclSend", e))?;
                    c.recv(recv, from as i32)
                        .map_err(|e| nccl_err("ncclRecv", e))?;
                    Ok(())
                })
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
            let pending = self.start_all_to_all_v(send, send_counts, recv, recv_counts)?;
            self.finish(pending)
        }

        /// [`Self::all_to_all_v`] enqueued on the NCCL stream without waiting (the expert
        /// dispatch of one micro-batch in flight while another computes); [`Self::finish`] it.
        pub fn start_all_to_all_v<T: NcclType>(
            &self,
            send: &CudaSlice<T>,
            send_counts: &[usize],
            recv: &mut CudaSlice<T>,
            recv_counts: &[usize],
        ) -> Result<Pending> {
            let n = self.world;
            if send_counts.len() != n || recv_counts.len() != n {
                return Err(CommError::InvalidArgument {
                    rank: self.rank,
                    op: "all_to_all_v",
                    msg: format!("counts for {n} ranks expected"),
                });
            }
            let (st, rt): (usize, usize) = (send_counts.iter().sum(), recv_counts.iter().sum());
            if st > send.len() || rt > recv.len() {
                return Err(CommError::InvalidArgument {
                    rank: self.rank,
                    op: "all_to_all_v",
                    msg: format!(
                        "counts need {st}/{rt} elements, buffers hold {}/{}",
                        send.len(),
                        recv.len()
                    ),
                });
            }
            self.enqueue("all_to_all_v", |comm| {
                group(|| {
                    let mut off = 0;
                    for (j, &c) in send_counts.iter().enumerate() {
                        if c > 0 {
                            comm.send(&send.slice(off..off + c), j as i32)
                                .map_err(|e| nccl_err("ncclSend", e))?;
                        }
                        off += c;
                    }
                    let mut off = 0;
                    for (j, &c) in recv_counts.iter().enumerate() {
                        if c > 0 {
                            comm.recv(&mut recv.slice_mut(off..off + c), j as i32)
                                .map_err(|e| nccl_err("ncclRecv", e))?;
                        }
                        off += c;
                    }
                    Ok(())
                })
            })
        }

        pub fn all_gather<T: NcclType>(
            &self,
            send: &CudaSlice<T>,
            recv: &mut CudaSlice<T>,
        ) -> Result<()> {
            self.run("all_gather", |c| {
                c.all_gather(send, recv)
                    .map(|_| ())
                    .map_err(|e| nccl_err("ncclAllGather", e))
            })
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
            self.run("all_reduce", |c| {
                c.all_reduce(send, recv, &op)
                    .map(|_| ())
                    .map_err(|e| nccl_err("ncclAllReduce", e))
            })
        }
    }

    pub fn bench_threads(
        world: usize,
        sizes: &[usize],
        iters: u32,
    ) -> Result<Vec<Vec<(f64, f64)>>> {
        available()?;
        let id = unique_id()?;
        let alloc = |c: &NcclCommunicator, n: usize| {
            c.stream
                .alloc_zeros::<f32>(n.max(1))
                .map_err(|e| nccl_err("alloc", e))
        };
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|r| {
                    let id = &id;
                    s.spawn(move || -> Result<Vec<(f64, f64)>> {
                        let c = NcclCommunicator::new(r, world, id, r, Duration::from_secs(60))?;
                        let mut out = Vec::new();
                        for &bytes in sizes {
                            let chunk = bytes / 4 / world;
                            let counts = vec![chunk; world];
                            let send = alloc(&c, chunk * world)?;
                            let mut recv = alloc(&c, chunk * world)?;
                            c.all_to_all_v(&send, &counts, &mut recv, &counts)?;
                            let t = Instant::now();
                            for _ in 0..iters {
                                c.all_to_all_v(&send, &counts, &mut recv, &counts)?;
                            }
                            let a2a = t.elapsed().as_secs_f64() / iters.max(1) as f64;
                            let block = alloc(&c, bytes / 4)?;
                            let mut incoming = alloc(&c, bytes / 4)?;
                            let (next, prev) = ((r + 1) % world, (r + world - 1) % world);
                            c.sendrecv(next, &block, prev, &mut incoming)?;
                            let t = Instant::now();
                            for _ in 0..iters {
                                c.sendrecv(next, &block, prev, &mut incoming)?;
                            }
                            out.push((a2a, t.elapsed().as_secs_f64() / iters.max(1) as f64));
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().map_err(|_| {
                        CommError::NcclUnavailable("a benchmark rank panicked".into())
                    })?
                })
                .collect()
        })
    }
}
