//! The communicator: rank-level operations and collectives over any [`Transport`].
//!
//! The API is blocking, MPI-style, with a non-blocking ring step ([`Communicator::start_sendrecv`])
//! for overlap. The engine's compute is synchronous (rayon), so blocking calls fit it directly, while
//! each transport moves bytes on its own I/O threads: a posted send progresses while the caller
//! computes, which is all ring attention needs to hide transfers behind compute. (See
//! ARCHITECTURE.md for the reasoning.)
//!
//! Every receive names the tag it expects; any error — timeout, lost peer, unexpected tag, dtype or
//! size — poisons the communicator and shuts its links, so peers fail fast instead of hanging.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ringmoe_core::DType;

use crate::transport::{Message, Transport};
use crate::{CommError, Kind, Payload, Result, Tag};

/// Default time any single receive may wait.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Reduction of [`Communicator::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// A ring step in flight: the send is already posted; [`PendingRecv::wait`] receives.
#[must_use = "a posted ring step must be waited for"]
#[derive(Debug)]
pub struct PendingRecv {
    from: usize,
    tag: Tag,
}

/// An all-to-all whose sends are posted; [`Communicator::wait_all_to_all_v`] receives.
#[must_use = "a started all-to-all must be waited for"]
#[derive(Debug)]
pub struct PendingAllToAll {
    tag: Tag,
    own: Option<Payload>,
}

pub struct Communicator {
    transport: Box<dyn Transport>,
    timeout: Duration,
    poisoned: Mutex<Option<String>>,
    counters: [KindCounters; Kind::ALL.len()],
}

#[derive(Debug, Default)]
struct KindCounters {
    sent: AtomicU64,
    received: AtomicU64,
    wait_nanos: AtomicU64,
}

/// What one kind of traffic has cost this rank so far: payload bytes posted and received, and
/// the time receives spent blocked waiting for them (transfer not hidden behind compute).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpTotals {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub wait_secs: f64,
}

/// [`OpTotals`] by [`Kind`], as [`Communicator::totals`] reads them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommTotals(pub Vec<(Kind, OpTotals)>);

impl CommTotals {
    /// `self − earlier`, kind by kind (what happened in between).
    pub fn since(&self, earlier: &CommTotals) -> CommTotals {
        CommTotals(
            self.0
                .iter()
                .map(|(k, t)| {
                    let e = earlier
                        .0
                        .iter()
                        .find(|(ek, _)| ek == k)
                        .map(|(_, e)| *e)
                        .unwrap_or_default();
                    (
                        *k,
                        OpTotals {
                            bytes_sent: t.bytes_sent.saturating_sub(e.bytes_sent),
                            bytes_received: t.bytes_received.saturating_sub(e.bytes_received),
                            wait_secs: (t.wait_secs - e.wait_secs).max(0.0),
                        },
                    )
                })
                .collect(),
        )
    }

    pub fn get(&self, kind: Kind) -> OpTotals {
        self.0
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, t)| *t)
            .unwrap_or_default()
    }
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("transport", &self.transport.name())
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .finish()
    }
}

impl Communicator {
    pub fn new(transport: Box<dyn Transport>, timeout: Duration) -> Self {
        Self {
            transport,
            timeout,
            poisoned: Mutex::new(None),
            counters: Default::default(),
        }
    }

    fn counters(&self, kind: Kind) -> &KindCounters {
        // Kinds are numbered from 1 in `Kind::ALL`'s order.
        &self.counters[(kind as usize).saturating_sub(1).min(Kind::ALL.len() - 1)]
    }

    /// Bytes and wait time so far, by kind of traffic.
    pub fn totals(&self) -> CommTotals {
        CommTotals(
            Kind::ALL
                .iter()
                .map(|&k| {
                    let c = self.counters(k);
                    (
                        k,
                        OpTotals {
                            bytes_sent: c.sent.load(Ordering::Relaxed),
                            bytes_received: c.received.load(Ordering::Relaxed),
                            wait_secs: c.wait_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
                        },
                    )
                })
                .collect(),
        )
    }

    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    pub fn world_size(&self) -> usize {
        self.transport.world_size()
    }

    pub fn transport_name(&self) -> &'static str {
        self.transport.name()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The error that poisoned this communicator, if any.
    pub fn poisoned(&self) -> Option<String> {
        self.poisoned
            .lock()
            .map(|p| p.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Fails once the communicator is poisoned (by an error, or by [`Communicator::abort`]):
    /// long computations between collectives call it to stop with their group.
    pub fn ensure_live(&self) -> Result<()> {
        self.check()
    }

    /// Poisons the communicator with `cause` and closes its links: this rank's operations fail
    /// from now on (one blocked in a receive wakes with the error), and its peers see their
    /// links drop and fail too. For stopping a job from outside (a cancel).
    pub fn abort(&self, cause: &str) {
        let mut p = self.poisoned.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none() {
            *p = Some(cause.to_string());
        }
        drop(p);
        self.transport.shutdown();
    }

    fn check(&self) -> Result<()> {
        match self.poisoned() {
            Some(cause) => Err(CommError::Poisoned {
                rank: self.rank(),
                cause,
            }),
            None => Ok(()),
        }
    }

    /// Runs `f`; on error, poisons the communicator and closes its links.
    fn guard<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check()?;
        let res = f();
        if let Err(e) = &res {
            let mut p = self.poisoned.lock().unwrap_or_else(|p| p.into_inner());
            if p.is_none() {
                *p = Some(e.to_string());
            }
            drop(p);
            self.transport.shutdown();
        }
        res
    }

    fn peer_ok(&self, peer: usize) -> Result<()> {
        if peer >= self.world_size() {
            return Err(CommError::BadPeer {
                rank: self.rank(),
                peer,
                world: self.world_size(),
            });
        }
        Ok(())
    }

    fn post(&self, peer: usize, tag: Tag, payload: Payload) -> Result<()> {
        self.peer_ok(peer)?;
        if peer == self.rank() {
            return Err(CommError::InvalidArgument {
                rank: self.rank(),
                op: "send",
                msg: "a rank cannot send to itself".into(),
            });
        }
        let bytes = payload.byte_len() as u64;
        self.transport.post(peer, Message { tag, payload })?;
        self.counters(tag.kind)
            .sent
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    fn take(&self, peer: usize, tag: Tag) -> Result<Payload> {
        self.peer_ok(peer)?;
        let waited = Instant::now();
        let next = self.transport.next(peer, self.timeout);
        let c = self.counters(tag.kind);
        c.wait_nanos
            .fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let msg = next.map_err(|e| match e {
            // The transport does not know which tag the receiver waits for; say it here.
            CommError::Timeout {
                rank,
                peer,
                timeout,
                ..
            } => CommError::Timeout {
                rank,
                peer,
                tag,
                timeout,
            },
            e => e,
        })?;
        if msg.tag != tag {
            return Err(CommError::UnexpectedTag {
                rank: self.rank(),
                peer,
                expected: tag,
                arrived: msg.tag,
            });
        }
        c.received
            .fetch_add(msg.payload.byte_len() as u64, Ordering::Relaxed);
        Ok(msg.payload)
    }

    /// Sends `payload` to `peer` (returns once the transport has it).
    pub fn send(&self, peer: usize, tag: Tag, payload: Payload) -> Result<()> {
        self.guard(|| self.post(peer, tag, payload))
    }

    /// Receives the next message from `peer`, which must carry `tag`.
    pub fn recv(&self, peer: usize, tag: Tag) -> Result<Payload> {
        self.guard(|| self.take(peer, tag))
    }

    /// [`Self::recv`] that also checks dtype and shape.
    pub fn recv_expect(
        &self,
        peer: usize,
        tag: Tag,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Payload> {
        self.guard(|| {
            let p = self.take(peer, tag)?;
            if p.dtype() != dtype || p.shape != shape {
                return Err(CommError::UnexpectedPayload {
                    rank: self.rank(),
                    peer,
                    tag,
                    expected: format!("{dtype:?}{shape:?}"),
                    arrived: p.describe(),
                });
            }
            Ok(p)
        })
    }

    /// One ring step: send to `to` while receiving from `from`, both in flight.
    pub fn sendrecv(&self, to: usize, payload: Payload, from: usize, tag: Tag) -> Result<Payload> {
        let pending = self.start_sendrecv(to, payload, from, tag)?;
        self.wait(pending)
    }

    /// Posts the send of a ring step and returns; the transfer progresses on the transport's I/O
    /// threads while the caller computes. Finish with [`Self::wait`].
    pub fn start_sendrecv(
        &self,
        to: usize,
        payload: Payload,
        from: usize,
        tag: Tag,
    ) -> Result<PendingRecv> {
        self.guard(|| {
            self.peer_ok(from)?;
            if to == self.rank() && from == self.rank() {
                // A ring of one: the block comes straight back.
                return Err(CommError::InvalidArgument {
                    rank: self.rank(),
                    op: "sendrecv",
                    msg: "world of one: use the local block".into(),
                });
            }
            self.post(to, tag, payload)?;
            Ok(PendingRecv { from, tag })
        })
    }

    pub fn wait(&self, pending: PendingRecv) -> Result<Payload> {
        self.guard(|| self.take(pending.from, pending.tag))
    }

    /// Every rank sends `sends[j]` (possibly empty) to rank `j` and gets back what each rank sent
    /// it, indexed by source. The own slot moves locally.
    pub fn all_to_all_v(&self, tag: Tag, sends: Vec<Payload>) -> Result<Vec<Payload>> {
        let pending = self.start_all_to_all_v(tag, sends)?;
        self.wait_all_to_all_v(pending)
    }

    /// Posts the sends of an [`Self::all_to_all_v`] and returns; the transfers progress on the
    /// transport's I/O threads while the caller computes. Finish with [`Self::wait_all_to_all_v`].
    /// Several may be in flight (two-batch overlap); they must be finished in the order they were
    /// started, on every rank, since each link delivers in order.
    pub fn start_all_to_all_v(&self, tag: Tag, sends: Vec<Payload>) -> Result<PendingAllToAll> {
        self.guard(|| {
            let (me, n) = (self.rank(), self.world_size());
            if sends.len() != n {
                return Err(CommError::InvalidArgument {
                    rank: me,
                    op: "all_to_all_v",
                    msg: format!("{} buffers for {n} ranks", sends.len()),
                });
            }
            let mut own = None;
            for (j, p) in sends.into_iter().enumerate() {
                if j == me {
                    own = Some(p);
                } else {
                    self.post(j, tag, p)?;
                }
            }
            Ok(PendingAllToAll { tag, own })
        })
    }

    /// Receives what every rank sent in a started [`Self::all_to_all_v`], indexed by source.
    pub fn wait_all_to_all_v(&self, pending: PendingAllToAll) -> Result<Vec<Payload>> {
        self.guard(|| {
            let (me, n) = (self.rank(), self.world_size());
            let PendingAllToAll { tag, mut own } = pending;
            let mut out = Vec::with_capacity(n);
            for j in 0..n {
                if j == me {
                    out.push(own.take().ok_or_else(|| CommError::InvalidArgument {
                        rank: me,
                        op: "all_to_all_v",
                        msg: "own slot missing".into(),
                    })?);
                } else {
                    out.push(self.take(j, tag)?);
                }
            }
            Ok(out)
        })
    }

    /// Every rank contributes one payload; all get every rank's, indexed by rank.
    pub fn all_gather(&self, tag: Tag, payload: Payload) -> Result<Vec<Payload>> {
        let n = self.world_size();
        let tag = tag.with_kind(Kind::AllGather);
        self.all_to_all_v(tag, vec![payload; n])
    }

    /// Element-wise sum or max of an f32 vector over all ranks, in place. Every rank reduces the
    /// gathered vectors in rank order, so all ranks get bit-identical results.
    pub fn all_reduce(&self, tag: Tag, data: &mut [f32], op: ReduceOp) -> Result<()> {
        let tag = tag.with_kind(Kind::AllReduce);
        let parts = self.all_gather(tag, Payload::f32(data.to_vec()))?;
        self.guard(|| {
            let mut acc: Option<Vec<f32>> = None;
            for (j, p) in parts.into_iter().enumerate() {
                let desc = p.describe();
                let v = p
                    .into_f32()
                    .filter(|v| v.len() == data.len())
                    .ok_or_else(|| CommError::UnexpectedPayload {
                        rank: self.rank(),
                        peer: j,
                        tag,
                        expected: format!("F32[{}]", data.len()),
                        arrived: desc,
                    })?;
                acc = Some(match acc {
                    None => v,
                    Some(mut a) => {
                        for (x, y) in a.iter_mut().zip(&v) {
                            *x = match op {
                                ReduceOp::Sum => *x + y,
                                ReduceOp::Max => x.max(*y),
                            };
                        }
                        a
                    }
                });
            }
            if let Some(a) = acc {
                data.copy_from_slice(&a);
            }
            Ok(())
        })
    }

    /// Returns once every rank has entered the barrier with the same tag.
    pub fn barrier(&self, tag: Tag) -> Result<()> {
        self.all_gather(tag.with_kind(Kind::Barrier), Payload::empty(DType::U8))
            .map(|_| ())
    }
}
