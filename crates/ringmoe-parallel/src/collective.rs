//! The collectives the distributed forward needs, over a backend's own buffers: the host
//! [`Communicator`] (TCP or in-process; buffers cross it as host payloads) and, in
//! `ringmoe-cuda`, NCCL on device buffers implement [`Collective`], so expert parallelism is
//! written once ([`crate::moe_parallel_on`]).
//!
//! Tags name each exchange for the host transports (which match messages by tag); NCCL orders
//! them by call order on every rank instead and ignores them.

use ringmoe_comm::{Communicator, Data, Payload, Tag};
use ringmoe_core::{Backend, Tensor};

use crate::{ParallelError, Result};

/// All-to-all exchanges among the ranks of a group, on `B`'s buffers. Every rank makes the same
/// calls in the same order.
pub trait Collective<B: Backend> {
    /// An all-to-all of rows in flight.
    type Rows;

    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// A blocking all-to-all of `width` words per peer: `words[w·width..(w+1)·width]` goes to
    /// rank `w`; returns what every source sent here, source `s` at `s·width`.
    fn exchange_words(&self, b: &B, tag: Tag, words: &[u32], width: usize) -> Result<Vec<u32>>;

    /// Starts an all-to-all of rows: `send` holds `send_rows[w]` rows for each rank `w`, back to
    /// back; `recv_rows[s]` rows are expected from each source `s` (both known to both sides,
    /// from the words exchanged before).
    fn start_rows(
        &self,
        b: &B,
        tag: Tag,
        send: B::Act,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Self::Rows>;

    /// Waits for [`Self::start_rows`]: every source's rows back to back, in rank order. A source
    /// that sent another number of rows than expected is an error naming it.
    fn finish_rows(&self, b: &B, rows: Self::Rows) -> Result<B::Act>;

    /// A ring step in flight.
    type Step;

    /// Starts one ring step: `send` (`[rows, width]`) to rank `to`, `recv_rows` rows of the
    /// same width expected from rank `from`.
    fn start_sendrecv(
        &self,
        b: &B,
        tag: Tag,
        to: usize,
        send: B::Act,
        from: usize,
        recv_rows: usize,
    ) -> Result<Self::Step>;

    /// Waits for [`Self::start_sendrecv`]: the rows from `from`.
    fn finish_sendrecv(&self, b: &B, step: Self::Step) -> Result<B::Act>;

    /// A blocking all-gather: every rank's `send` (`[rows, width]`, the same shape on every
    /// rank), in rank order, `[world·rows, width]`.
    fn all_gather(&self, b: &B, tag: Tag, send: &B::Act) -> Result<B::Act>;

    /// Fails once the group is broken or aborted (a cancelled job), so long computations can stop
    /// between pieces.
    fn ensure_live(&self) -> Result<()> {
        Ok(())
    }

    /// The host communicator under this group, when there is one (collectives on small host
    /// data, such as the vertical-slash estimate).
    fn host(&self) -> Option<&Communicator> {
        None
    }
}

/// [`Collective::Step`] of the host communicator.
#[derive(Debug)]
pub struct HostStep {
    pending: ringmoe_comm::PendingRecv,
    from: usize,
    rows: usize,
    width: usize,
}

/// [`Collective::Rows`] of the host communicator.
#[derive(Debug)]
pub struct HostRows {
    pending: ringmoe_comm::PendingAllToAll,
    recv_rows: Vec<usize>,
    width: usize,
    tag: Tag,
}

/// The values of a payload of `rows` f32 rows of `width`, or what it was instead.
fn f32_rows(p: Payload, rows: usize, width: usize) -> std::result::Result<Vec<f32>, String> {
    let desc = p.describe();
    match p.into_f32() {
        Some(v) if v.len() == rows * width => Ok(v),
        Some(v) => Err(format!("{} values", v.len())),
        None => Err(desc),
    }
}

fn counts_for(world: usize, what: &str, counts: &[usize]) -> Result<()> {
    if counts.len() != world {
        return Err(ParallelError::Invalid(format!(
            "{} {what} counts for a group of {world}",
            counts.len()
        )));
    }
    Ok(())
}

/// Over the host transports a backend's buffers travel as host payloads: downloaded before
/// they are sent and uploaded when they arrive (moves, for the [`ringmoe_core::Cpu`] backend).
impl<B: Backend> Collective<B> for Communicator {
    type Rows = HostRows;

    fn rank(&self) -> usize {
        Communicator::rank(self)
    }

    fn world_size(&self) -> usize {
        Communicator::world_size(self)
    }

    fn exchange_words(&self, _b: &B, tag: Tag, words: &[u32], width: usize) -> Result<Vec<u32>> {
        let world = Communicator::world_size(self);
        if words.len() != world * width {
            return Err(ParallelError::Invalid(format!(
                "{} words for {world} ranks of {width}",
                words.len()
            )));
        }
        let sends = words
            .chunks(width.max(1))
            .map(|w| Payload {
                shape: vec![w.len()],
                data: Data::I32(w.iter().map(|&x| x as i32).collect()),
            })
            .chain(std::iter::repeat_with(|| Payload {
                shape: vec![0],
                data: Data::I32(Vec::new()),
            }))
            .take(world)
            .collect();
        let got = self.all_to_all_v(tag, sends)?;
        let mut out = Vec::with_capacity(world * width);
        for (from, p) in got.into_iter().enumerate() {
            let desc = p.describe();
            match p.data {
                Data::I32(v) if v.len() == width => out.extend(v.into_iter().map(|x| x as u32)),
                _ => {
                    return Err(ParallelError::Dispatch(format!(
                        "rank {}: {tag}: header from rank {from} is {desc}, expected I32[{width}]",
                        Communicator::rank(self)
                    )));
                }
            }
        }
        Ok(out)
    }

    fn start_rows(
        &self,
        b: &B,
        tag: Tag,
        send: B::Act,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<HostRows> {
        let world = Communicator::world_size(self);
        counts_for(world, "send", send_rows)?;
        counts_for(world, "receive", recv_rows)?;
        let (rows, width) = b.dims(&send)?;
        if send_rows.iter().sum::<usize>() != rows {
            return Err(ParallelError::Invalid(format!(
                "{rows} rows to send, counts for {}",
                send_rows.iter().sum::<usize>()
            )));
        }
        let host = b.download_owned(send)?.into_vec();
        let mut sends = Vec::with_capacity(world);
        let mut at = 0;
        for &n in send_rows {
            sends.push(Payload {
                shape: vec![n, width],
                data: Data::F32(host[at * width..(at + n) * width].to_vec()),
            });
            at += n;
        }
        Ok(HostRows {
            pending: self.start_all_to_all_v(tag, sends)?,
            recv_rows: recv_rows.to_vec(),
            width,
            tag,
        })
    }

    fn finish_rows(&self, b: &B, rows: HostRows) -> Result<B::Act> {
        let HostRows {
            pending,
            recv_rows,
            width,
            tag,
        } = rows;
        let frames = self.wait_all_to_all_v(pending)?;
        let total: usize = recv_rows.iter().sum();
        let mut out = Vec::with_capacity(total * width);
        for (from, (p, &n)) in frames.into_iter().zip(&recv_rows).enumerate() {
            let v = f32_rows(p, n, width).map_err(|got| {
                ParallelError::Dispatch(format!(
                    "rank {}: {tag}: frame from rank {from}: header counts {n} rows of {width}, \
                     the frame carries {got}",
                    Communicator::rank(self)
                ))
            })?;
            out.extend_from_slice(&v);
        }
        Ok(b.upload_owned(Tensor::from_vec(out, [total, width])?)?)
    }

    type Step = HostStep;

    fn start_sendrecv(
        &self,
        b: &B,
        tag: Tag,
        to: usize,
        send: B::Act,
        from: usize,
        recv_rows: usize,
    ) -> Result<HostStep> {
        let (rows, width) = b.dims(&send)?;
        let payload = Payload {
            shape: vec![rows, width],
            data: Data::F32(b.download_owned(send)?.into_vec()),
        };
        Ok(HostStep {
            pending: Communicator::start_sendrecv(self, to, payload, from, tag)?,
            from,
            rows: recv_rows,
            width,
        })
    }

    fn finish_sendrecv(&self, b: &B, step: HostStep) -> Result<B::Act> {
        let HostStep {
            pending,
            from,
            rows,
            width,
        } = step;
        let v = f32_rows(self.wait(pending)?, rows, width).map_err(|got| {
            ParallelError::Invalid(format!(
                "rank {}: block from rank {from} is {got}, expected F32[{rows}, {width}]",
                Communicator::rank(self)
            ))
        })?;
        Ok(b.upload_owned(Tensor::from_vec(v, [rows, width])?)?)
    }

    fn all_gather(&self, b: &B, tag: Tag, send: &B::Act) -> Result<B::Act> {
        let (rows, width) = b.dims(send)?;
        let payload = Payload {
            shape: vec![rows, width],
            data: Data::F32(b.download(send)?.into_vec()),
        };
        let parts = Communicator::all_gather(self, tag, payload)?;
        let world = parts.len();
        let mut all = Vec::with_capacity(world * rows * width);
        for (from, p) in parts.into_iter().enumerate() {
            let desc = p.describe();
            match p.into_f32() {
                Some(v) if v.len() == rows * width => all.extend_from_slice(&v),
                _ => {
                    return Err(ParallelError::Invalid(format!(
                        "rank {}: {tag}: rank {from} contributed {desc}, expected F32[{rows}, \
                         {width}]",
                        Communicator::rank(self)
                    )));
                }
            }
        }
        Ok(b.upload_owned(Tensor::from_vec(all, [world * rows, width])?)?)
    }

    fn ensure_live(&self) -> Result<()> {
        Ok(Communicator::ensure_live(self)?)
    }

    fn host(&self) -> Option<&Communicator> {
        Some(self)
    }
}
