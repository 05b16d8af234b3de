//! The CUDA backend under the generic distributed code: [`CudaBackend`] as a
//! [`ringmoe_core::Backend`] (activations are [`DeviceTensor`]s) and the NCCL group as a
//! [`ringmoe_parallel::Collective`] on them, so `ringmoe_parallel::moe_parallel_on` — the one
//! expert dispatch — runs on GPUs as it does on the host.

use cudarc::driver::CudaSlice;
use ringmoe_comm::Tag;
use ringmoe_comm::nccl::{NcclCommunicator, Pending};
use ringmoe_core::attention::AttentionParams;
use ringmoe_core::sparse::Sparsity;
use ringmoe_core::{Backend, KvRef, Partial, Tensor};
use ringmoe_parallel::{Collective, ParallelError};

use crate::device::{CudaBackend, DeviceTensor};
use crate::{CudaError, Result};

impl Backend for CudaBackend {
    type Act = DeviceTensor;
    type Error = CudaError;

    fn dims(&self, a: &DeviceTensor) -> Result<(usize, usize)> {
        a.dims2("dims")
    }

    fn upload(&self, t: &Tensor) -> Result<DeviceTensor> {
        t.dims2("upload")?;
        CudaBackend::upload(self, t)
    }

    fn download(&self, a: &DeviceTensor) -> Result<Tensor> {
        CudaBackend::download(self, a)
    }

    fn reshape(&self, a: DeviceTensor, rows: usize, width: usize) -> Result<DeviceTensor> {
        a.reshape(vec![rows, width])
    }

    fn zeros(&self, rows: usize, width: usize) -> Result<DeviceTensor> {
        CudaBackend::zeros(self, vec![rows, width])
    }

    fn gather_rows(&self, a: &DeviceTensor, idx: &[usize]) -> Result<DeviceTensor> {
        CudaBackend::gather_rows(self, a, idx)
    }

    fn rows(&self, a: &DeviceTensor, start: usize, end: usize) -> Result<DeviceTensor> {
        CudaBackend::rows(self, a, start, end)
    }

    fn concat_rows(&self, parts: &[DeviceTensor]) -> Result<DeviceTensor> {
        CudaBackend::concat_rows(self, parts)
    }

    /// The combine kernel reads every index; dropped slots (index = rows) read a zero row
    /// appended for them.
    fn combine(
        &self,
        src: &DeviceTensor,
        rows: &[usize],
        weights: &[f32],
        k: usize,
    ) -> Result<DeviceTensor> {
        let (n, width) = src.dims2("combine")?;
        if rows.contains(&n) {
            let padded = self.concat_rows(&[self.rows(src, 0, n)?, self.zeros(vec![1, width])?])?;
            CudaBackend::combine(self, &padded, rows, weights, k)
        } else {
            CudaBackend::combine(self, src, rows, weights, k)
        }
    }

    fn filled(&self, rows: usize, width: usize, value: f32) -> Result<DeviceTensor> {
        let t = Tensor::from_vec(vec![value; rows * width], [rows, width])?;
        CudaBackend::upload(self, &t)
    }

    /// Dense causal attention only: the sparse prefill patterns run on the host backend.
    fn attend(
        &self,
        p: &AttentionParams,
        mask: &Sparsity<'_>,
        q: &DeviceTensor,
        q_pos: &[usize],
        kv: KvRef<'_, DeviceTensor>,
        k_pos: &[usize],
    ) -> Result<(Partial<DeviceTensor>, u64)> {
        if !matches!(mask, Sparsity::Dense) {
            return Err(CudaError::Invalid {
                op: "attention",
                msg: "sparse attention patterns are not implemented on the CUDA path (the CPU \
                      engine runs them)"
                    .into(),
            });
        }
        let (out, lse) = match kv {
            KvRef::Split(k, v) => self.attention(p, q, q_pos, k, v, k_pos)?,
            KvRef::Packed(kv) => self.attention_packed(p, q, q_pos, kv, k_pos)?,
        };
        let rows = q_pos.len();
        let out = out.reshape(vec![rows, p.n_heads * p.head_dim])?;
        let lse = lse.reshape(vec![rows, p.n_heads])?;
        Ok((Partial { out, lse }, scored_pairs(p, q_pos, k_pos)))
    }

    /// Whole accumulators only (this backend attends in one piece).
    fn merge_rows(
        &self,
        acc: &mut Partial<DeviceTensor>,
        r0: usize,
        part: &Partial<DeviceTensor>,
    ) -> Result<()> {
        if r0 != 0 || part.lse.len() != acc.lse.len() {
            return Err(CudaError::Invalid {
                op: "merge_attention",
                msg: format!(
                    "a piece at row {r0} of {:?} rows into {:?}: the CUDA backend merges whole \
                     results",
                    part.lse.shape(),
                    acc.lse.shape()
                ),
            });
        }
        self.merge_attention(&mut acc.out, &mut acc.lse, &part.out, &part.lse)
    }
}

/// (query, key) pairs the causal mask lets `q_pos` score against `k_pos`, times the heads.
fn scored_pairs(p: &AttentionParams, q_pos: &[usize], k_pos: &[usize]) -> u64 {
    if !p.causal {
        return (q_pos.len() * k_pos.len() * p.n_heads) as u64;
    }
    let mut keys = k_pos.to_vec();
    keys.sort_unstable();
    let seen: usize = q_pos
        .iter()
        .map(|&q| keys.partition_point(|&k| k <= q))
        .sum();
    (seen * p.n_heads) as u64
}

/// Rows in flight on the NCCL stream: the send buffer must live until the transfer is done.
#[derive(Debug)]
pub struct NcclRows {
    _send: DeviceTensor,
    incoming: DeviceTensor,
    pending: Pending,
}

fn counts(
    comm: &NcclCommunicator,
    what: &str,
    c: &[usize],
) -> std::result::Result<(), ParallelError> {
    if c.len() != comm.world_size() {
        return Err(ParallelError::Invalid(format!(
            "{} {what} counts for an NCCL group of {}",
            c.len(),
            comm.world_size()
        )));
    }
    Ok(())
}

/// A ring step in flight on the NCCL stream.
#[derive(Debug)]
pub struct NcclStep {
    _send: DeviceTensor,
    incoming: DeviceTensor,
    pending: Pending,
}

/// NCCL orders exchanges by call order on every rank; tags are not needed.
impl Collective<CudaBackend> for NcclCommunicator {
    type Rows = NcclRows;

    fn rank(&self) -> usize {
        NcclCommunicator::rank(self)
    }

    fn world_size(&self) -> usize {
        NcclCommunicator::world_size(self)
    }

    fn exchange_words(
        &self,
        b: &CudaBackend,
        _tag: Tag,
        words: &[u32],
        width: usize,
    ) -> std::result::Result<Vec<u32>, ParallelError> {
        let world = NcclCommunicator::world_size(self);
        if words.len() != world * width {
            return Err(ParallelError::Invalid(format!(
                "{} words for {world} ranks of {width}",
                words.len()
            )));
        }
        let sent: CudaSlice<u32> = b.upload_words(words)?;
        let mut got = b.zero_words(world * width)?;
        let equal = vec![width; world];
        let pending = self.start_all_to_all_v(&sent, &equal, &mut got, &equal)?;
        self.finish(pending)?;
        let mut got = b.download_words(&got)?;
        got.truncate(world * width);
        Ok(got)
    }

    fn start_rows(
        &self,
        b: &CudaBackend,
        _tag: Tag,
        send: DeviceTensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> std::result::Result<NcclRows, ParallelError> {
        counts(self, "send", send_rows)?;
        counts(self, "receive", recv_rows)?;
        let (rows, width) = send.dims2("all_to_all rows")?;
        if send_rows.iter().sum::<usize>() != rows {
            return Err(ParallelError::Invalid(format!(
                "{rows} rows to send, counts for {}",
                send_rows.iter().sum::<usize>()
            )));
        }
        let mut incoming = b.zeros(vec![recv_rows.iter().sum(), width])?;
        let send_counts: Vec<usize> = send_rows.iter().map(|r| r * width).collect();
        let recv_counts: Vec<usize> = recv_rows.iter().map(|r| r * width).collect();
        let pending = self.start_all_to_all_v(
            send.buffer(),
            &send_counts,
            incoming.buffer_mut(),
            &recv_counts,
        )?;
        Ok(NcclRows {
            _send: send,
            incoming,
            pending,
        })
    }

    fn finish_rows(
        &self,
        _b: &CudaBackend,
        rows: NcclRows,
    ) -> std::result::Result<DeviceTensor, ParallelError> {
        let NcclRows {
            _send,
            incoming,
            pending,
        } = rows;
        self.finish(pending)?;
        Ok(incoming)
    }

    type Step = NcclStep;

    fn all_gather(
        &self,
        b: &CudaBackend,
        _tag: Tag,
        send: &DeviceTensor,
    ) -> std::result::Result<DeviceTensor, ParallelError> {
        let (rows, width) = send.dims2("all_gather")?;
        let mut all = b.zeros(vec![NcclCommunicator::world_size(self) * rows, width])?;
        NcclCommunicator::all_gather(self, send.buffer(), all.buffer_mut())?;
        Ok(all)
    }

    fn start_sendrecv(
        &self,
        b: &CudaBackend,
        _tag: Tag,
        to: usize,
        send: DeviceTensor,
        from: usize,
        recv_rows: usize,
    ) -> std::result::Result<NcclStep, ParallelError> {
        let width = send.dims2("sendrecv")?.1;
        let mut incoming = b.zeros(vec![recv_rows, width])?;
        let pending =
            NcclCommunicator::start_sendrecv(self, to, send.buffer(), from, incoming.buffer_mut())?;
        Ok(NcclStep {
            _send: send,
            incoming,
            pending,
        })
    }

    fn finish_sendrecv(
        &self,
        _b: &CudaBackend,
        step: NcclStep,
    ) -> std::result::Result<DeviceTensor, ParallelError> {
        let NcclStep {
            _send,
            incoming,
            pending,
        } = step;
        self.finish(pending)?;
        Ok(incoming)
    }
}
