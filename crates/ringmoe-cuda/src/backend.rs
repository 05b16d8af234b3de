//! The CUDA backend under the generic distributed code: [`CudaBackend`] as a
//! [`ringmoe_core::Backend`] (activations are [`DeviceTensor`]s) and the NCCL group as a
//! [`ringmoe_parallel::Collective`] on them, so `ringmoe_parallel::moe_parallel_on` — the one
//! expert dispatch — runs on GPUs as it does on the host.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use ringmoe_comm::Tag;
use ringmoe_comm::nccl::{NcclCommunicator, Pending};
use ringmoe_core::attention::AttentionParams;
use ringmoe_core::rope::RopeTable;
use ringmoe_core::sparse::Sparsity;
use ringmoe_core::{
    Backend, ExpertGroup, KvRef, KvStore, Partial, Stored, Tensor, WeightPrecision, Weights,
};
use ringmoe_parallel::{Collective, ParallelError};

use crate::device::{CudaBackend, DeviceKv, DeviceRope, DeviceTensor, DeviceWeight};
use crate::{CudaError, Precision};

/// This backend's operations report their errors as the generic code's: the CUDA error, boxed.
type Result<T> = ringmoe_core::Result<T>;

fn dev(e: CudaError) -> ringmoe_core::Error {
    match e {
        CudaError::Core(c) => c,
        other => ringmoe_core::Error::Device(Box::new(other)),
    }
}

trait Dev<T> {
    fn dev(self) -> Result<T>;
}

impl<T> Dev<T> for crate::Result<T> {
    fn dev(self) -> Result<T> {
        self.map_err(dev)
    }
}

/// A weight matrix on the GPU, shared by the models that hold it.
#[derive(Debug, Clone)]
pub struct CudaWeight(pub Arc<DeviceWeight>);

impl Stored for CudaWeight {
    fn bytes(&self) -> usize {
        self.0.bytes()
    }
}

/// An f32 vector on the GPU (norm weights, biases).
#[derive(Debug, Clone)]
pub struct CudaVector(pub Arc<DeviceTensor>);

impl Stored for CudaVector {
    fn bytes(&self) -> usize {
        4 * self.0.len()
    }
}

impl KvStore for DeviceKv {
    fn positions(&self) -> &[usize] {
        DeviceKv::positions(self)
    }

    fn bytes(&self) -> usize {
        DeviceKv::bytes(self)
    }
}

/// The device precision of a matrix loaded with the host's `--weights` choice: f32 stays f32
/// (the parity path), everything else is served in bf16; q8 is a CPU format.
pub fn device_precision(w: WeightPrecision) -> crate::Result<Precision> {
    match w {
        WeightPrecision::F32 => Ok(Precision::F32),
        WeightPrecision::Native | WeightPrecision::BF16 => Ok(Precision::Bf16),
        WeightPrecision::Q8 => Err(CudaError::Invalid {
            op: "load",
            msg: "q8 weights are a CPU format; load GPU models as bf16 or f32".into(),
        }),
    }
}

/// The `--weights` choice that loads a model in device precision `p`.
pub fn host_precision(p: Precision) -> WeightPrecision {
    match p {
        Precision::F32 => WeightPrecision::F32,
        Precision::Bf16 => WeightPrecision::BF16,
    }
}

/// Whether `mask` changes nothing for queries at `q_pos`: dense, or a sliding window (no sinks)
/// longer than every query's position, so every earlier key is inside it. Such a window runs as
/// dense attention here; anything else is refused.
fn as_dense(mask: &Sparsity<'_>, q_pos: &[usize]) -> bool {
    match mask {
        Sparsity::Dense => true,
        Sparsity::AShape(a) => a.sink == 0 && q_pos.iter().all(|&q| q < a.local),
        Sparsity::VerticalSlash(_) => false,
    }
}

fn no_window() -> ringmoe_core::Error {
    dev(CudaError::Invalid {
        op: "attention",
        msg: "sliding-window and sparse attention are not implemented on the CUDA path (the CPU \
              engine runs them)"
            .into(),
    })
}

impl Backend for CudaBackend {
    type Act = DeviceTensor;
    type Weight = CudaWeight;
    type Vector = CudaVector;
    type Kv = DeviceKv;
    type Rope = DeviceRope;

    fn weight(&self, w: Weights, precision: WeightPrecision, exact: bool) -> Result<CudaWeight> {
        let p = if exact {
            Precision::F32
        } else {
            device_precision(precision).dev()?
        };
        let d = self
            .upload_weight(&w.to_f32(), w.rows(), w.cols(), p)
            .dev()?;
        Ok(CudaWeight(Arc::new(d)))
    }

    fn vector(&self, v: Vec<f32>) -> Result<CudaVector> {
        Ok(CudaVector(Arc::new(self.upload_vec(&v).dev()?)))
    }

    fn linear(
        &self,
        x: &DeviceTensor,
        w: &CudaWeight,
        bias: Option<&CudaVector>,
    ) -> Result<DeviceTensor> {
        let mut y = CudaBackend::linear(self, x, &w.0).dev()?;
        if let Some(b) = bias {
            self.add_bias(&mut y, &b.0).dev()?;
        }
        Ok(y)
    }

    fn weight_rows(&self, w: &CudaWeight, ids: &[usize]) -> Result<DeviceTensor> {
        self.gather_weight_rows(&w.0, ids).dev()
    }

    fn rms_norm(&self, x: &DeviceTensor, w: &CudaVector, eps: f32) -> Result<DeviceTensor> {
        CudaBackend::rms_norm(self, x, &w.0, eps).dev()
    }

    fn rms_norm_chunks(&self, x: &mut DeviceTensor, w: &CudaVector, eps: f32) -> Result<()> {
        let d = w.0.len();
        let (rows, width) = x.dims2("rms_norm_chunks").dev()?;
        if d == 0 || width % d != 0 {
            return Err(dev(CudaError::Invalid {
                op: "rms_norm_chunks",
                msg: format!("rows of {width} in chunks of {d}"),
            }));
        }
        let flat = std::mem::replace(x, self.zeros(vec![0, width]).dev()?)
            .reshape(vec![rows * width / d, d])
            .dev()?;
        *x = CudaBackend::rms_norm(self, &flat, &w.0, eps)
            .dev()?
            .reshape(vec![rows, width])
            .dev()?;
        Ok(())
    }

    fn split_qkv(
        &self,
        fused: &DeviceTensor,
        q: usize,
        kv: usize,
    ) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
        Ok((
            self.columns(fused, 0, q).dev()?,
            self.columns(fused, q, kv).dev()?,
            self.columns(fused, q + kv, kv).dev()?,
        ))
    }

    fn rope_table(&self, t: RopeTable) -> Result<DeviceRope> {
        CudaBackend::rope_table(self, &t).dev()
    }

    fn rope(
        &self,
        x: &mut DeviceTensor,
        heads: usize,
        head_dim: usize,
        t: &DeviceRope,
    ) -> Result<()> {
        self.rope_with(x, heads, head_dim, t).dev()
    }

    fn swiglu(&self, gate_up: &DeviceTensor) -> Result<DeviceTensor> {
        CudaBackend::swiglu(self, gate_up).dev()
    }

    fn add_inplace(&self, x: &mut DeviceTensor, y: &DeviceTensor) -> Result<()> {
        CudaBackend::add_inplace(self, x, y).dev()
    }

    fn add_gated(&self, y: &mut DeviceTensor, s: &DeviceTensor, gate: &DeviceTensor) -> Result<()> {
        CudaBackend::add_gated(self, y, s, gate).dev()
    }

    fn set_rows(&self, x: &mut DeviceTensor, r0: usize, part: &DeviceTensor) -> Result<()> {
        self.copy_rows_into(x, r0, part).dev()
    }

    fn grouped_mlp(
        &self,
        x: &DeviceTensor,
        groups: &[ExpertGroup<'_, CudaWeight>],
    ) -> Result<DeviceTensor> {
        let counts: Vec<usize> = groups.iter().map(|g| g.0).collect();
        let gate_up: Vec<&DeviceWeight> = groups.iter().map(|g| &*g.1.0.0).collect();
        let down: Vec<&DeviceWeight> = groups.iter().map(|g| &*g.1.1.0).collect();
        let gu = self.grouped_linear(x, &counts, &gate_up).dev()?;
        let act = CudaBackend::swiglu(self, &gu).dev()?;
        self.grouped_linear(&act, &counts, &down).dev()
    }

    fn new_kv(&self, width: usize) -> Result<DeviceKv> {
        CudaBackend::new_kv(self, width).dev()
    }

    fn kv_append(
        &self,
        kv: &mut DeviceKv,
        k: DeviceTensor,
        v: DeviceTensor,
        positions: &[usize],
    ) -> Result<()> {
        CudaBackend::kv_append(self, kv, &k, &v, positions).dev()
    }

    /// A window holding everything it will ever need to is left alone (as the host's rule
    /// does below twice the window); trimming a longer one is not implemented here.
    fn kv_trim(&self, kv: &mut DeviceKv, _next: usize, window: usize) -> Result<()> {
        if kv.len() <= window.saturating_mul(2) {
            Ok(())
        } else {
            Err(no_window())
        }
    }

    fn attend_cached(
        &self,
        p: &AttentionParams,
        mask: &Sparsity<'_>,
        q: &DeviceTensor,
        q_pos: &[usize],
        kv: &DeviceKv,
    ) -> Result<Partial<DeviceTensor>> {
        if !as_dense(mask, q_pos) {
            return Err(no_window());
        }
        let (out, lse) = self.attention_cached(p, q, q_pos, kv).dev()?;
        let rows = q_pos.len();
        Ok(Partial {
            out: out.reshape(vec![rows, p.n_heads * p.head_dim]).dev()?,
            lse: lse.reshape(vec![rows, p.n_heads]).dev()?,
        })
    }

    fn dims(&self, a: &DeviceTensor) -> Result<(usize, usize)> {
        a.dims2("dims").dev()
    }

    fn upload(&self, t: &Tensor) -> Result<DeviceTensor> {
        t.dims2("upload")?;
        CudaBackend::upload(self, t).dev()
    }

    fn download(&self, a: &DeviceTensor) -> Result<Tensor> {
        CudaBackend::download(self, a).dev()
    }

    fn reshape(&self, a: DeviceTensor, rows: usize, width: usize) -> Result<DeviceTensor> {
        a.reshape(vec![rows, width]).dev()
    }

    fn zeros(&self, rows: usize, width: usize) -> Result<DeviceTensor> {
        CudaBackend::zeros(self, vec![rows, width]).dev()
    }

    fn gather_rows(&self, a: &DeviceTensor, idx: &[usize]) -> Result<DeviceTensor> {
        CudaBackend::gather_rows(self, a, idx).dev()
    }

    fn rows(&self, a: &DeviceTensor, start: usize, end: usize) -> Result<DeviceTensor> {
        CudaBackend::rows(self, a, start, end).dev()
    }

    fn concat_rows(&self, parts: &[DeviceTensor]) -> Result<DeviceTensor> {
        CudaBackend::concat_rows(self, parts).dev()
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
        let (n, width) = src.dims2("combine").dev()?;
        if rows.contains(&n) {
            let padded = CudaBackend::concat_rows(
                self,
                &[
                    CudaBackend::rows(self, src, 0, n).dev()?,
                    CudaBackend::zeros(self, vec![1, width]).dev()?,
                ],
            )
            .dev()?;
            CudaBackend::combine(self, &padded, rows, weights, k).dev()
        } else {
            CudaBackend::combine(self, src, rows, weights, k).dev()
        }
    }

    fn filled(&self, rows: usize, width: usize, value: f32) -> Result<DeviceTensor> {
        let t = Tensor::from_vec(vec![value; rows * width], [rows, width])?;
        CudaBackend::upload(self, &t).dev()
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
        if !as_dense(mask, q_pos) {
            return Err(no_window());
        }
        let (out, lse) = match kv {
            KvRef::Split(k, v) => self.attention(p, q, q_pos, k, v, k_pos).dev()?,
            KvRef::Packed(kv) => self.attention_packed(p, q, q_pos, kv, k_pos).dev()?,
        };
        let rows = q_pos.len();
        let out = out.reshape(vec![rows, p.n_heads * p.head_dim]).dev()?;
        let lse = lse.reshape(vec![rows, p.n_heads]).dev()?;
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
            return Err(dev(CudaError::Invalid {
                op: "merge_attention",
                msg: format!(
                    "a piece at row {r0} of {:?} rows into {:?}: the CUDA backend merges whole \
                     results",
                    part.lse.shape(),
                    acc.lse.shape()
                ),
            }));
        }
        self.merge_attention(&mut acc.out, &mut acc.lse, &part.out, &part.lse)
            .dev()
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
