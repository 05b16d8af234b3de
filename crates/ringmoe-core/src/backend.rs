//! The operations the distributed forward is written against once, whatever holds the
//! activations: [`Cpu`] (host memory, this crate's kernels), [`Sim`] (the CPU behind opaque
//! buffers, so tests exercise the orchestration a device backend runs, every transfer through an
//! explicit upload or download), and the CUDA backend in `ringmoe-cuda`.
//!
//! Activations are row-major `[rows, width]` f32 matrices. Host-side bookkeeping (routing,
//! dispatch plans, headers) stays on the host; only rows move through these operations.

use rayon::prelude::*;

use crate::attention::{AttentionParams, PartialAttention, merge_slices};
use crate::gemm::Par;
use crate::kv::LayerKv;
use crate::rope::{RopeTable, apply_rope};
use crate::sparse::{Sparsity, attention_sparse};
use crate::{Error, Result, Tensor, WeightPrecision, Weights, ops};

/// What a backend holds that has a size in memory (weights, vectors).
pub trait Stored {
    /// Bytes held, in the stored precision.
    fn bytes(&self) -> usize;
}

impl Stored for Weights {
    fn bytes(&self) -> usize {
        Weights::bytes(self)
    }
}

impl Stored for Vec<f32> {
    fn bytes(&self) -> usize {
        4 * self.len()
    }
}

/// One expert's rows in a grouped expert pass: `(rows, (gate_up, down))`.
pub type ExpertGroup<'a, W> = (usize, (&'a W, &'a W));

/// A layer's K/V store on a backend: what the host needs to know about it.
pub trait KvStore {
    /// Absolute positions of the keys held, in the order held.
    fn positions(&self) -> &[usize];
    /// Bytes of keys and values held.
    fn bytes(&self) -> usize;
}

/// A K/V block for attention: K and V `[n, width]` apart, or packed one after the other
/// (`[2n, width]`, K first), as blocks travel between ranks.
#[derive(Debug)]
pub enum KvRef<'a, A> {
    Split(&'a A, &'a A),
    Packed(&'a A),
}

/// A partial attention result on a backend: `out` `[rows, n_heads·head_dim]` and `lse`
/// `[rows, n_heads]` (see [`crate::PartialAttention`]).
#[derive(Debug)]
pub struct Partial<A> {
    pub out: A,
    pub lse: A,
}

/// A place activations and weights live, and every operation the model's forward pass and the
/// distributed forward need on them. The model (`ringmoe_model::Model<B>`), ring attention,
/// sharded decode and expert parallelism are written once over this trait.
pub trait Backend: Send + Sync {
    /// A `[rows, width]` f32 matrix on the backend.
    type Act: std::fmt::Debug + Send + Sync;
    /// A `[out, in]` weight matrix (HF layout) in the backend's storage precision.
    type Weight: Stored + Clone + std::fmt::Debug + Send + Sync;
    /// An f32 vector (norm weights, biases).
    type Vector: Stored + Clone + std::fmt::Debug + Send + Sync;
    /// One layer's K/V cache.
    type Kv: KvStore + std::fmt::Debug + Send;
    /// A RoPE cos/sin table for a batch's positions.
    type Rope;

    /// A host weight matrix (held as the host load made it, in `precision`) onto the backend;
    /// `exact`: keep it in f32 (routers and gates, whose outputs pick experts).
    fn weight(&self, w: Weights, precision: WeightPrecision, exact: bool) -> Result<Self::Weight>;
    /// A host vector onto the backend.
    fn vector(&self, v: Vec<f32>) -> Result<Self::Vector>;
    /// `x · wᵀ (+ bias)`: `[rows, in]` → `[rows, out]`.
    fn linear(
        &self,
        x: &Self::Act,
        w: &Self::Weight,
        bias: Option<&Self::Vector>,
    ) -> Result<Self::Act>;
    /// Rows `ids` of a weight matrix, in f32 (embedding lookups).
    fn weight_rows(&self, w: &Self::Weight, ids: &[usize]) -> Result<Self::Act>;
    /// RMSNorm of every row.
    fn rms_norm(&self, x: &Self::Act, w: &Self::Vector, eps: f32) -> Result<Self::Act>;
    /// RMSNorm of every `w.len()`-wide chunk in place (Qwen3's per-head q/k norms).
    fn rms_norm_chunks(&self, x: &mut Self::Act, w: &Self::Vector, eps: f32) -> Result<()>;
    /// A fused `[rows, q + 2·kv]` projection split into q `[rows, q]`, k and v `[rows, kv]`.
    fn split_qkv(
        &self,
        fused: &Self::Act,
        q: usize,
        kv: usize,
    ) -> Result<(Self::Act, Self::Act, Self::Act)>;
    /// A RoPE table onto the backend.
    fn rope_table(&self, t: RopeTable) -> Result<Self::Rope>;
    /// Rotates `x` (`[rows, heads·head_dim]`, one table position per row) in place.
    fn rope(&self, x: &mut Self::Act, heads: usize, head_dim: usize, t: &Self::Rope) -> Result<()>;
    /// SwiGLU of a fused `[rows, 2·inter]` (`[gate | up]`) → `[rows, inter]`.
    fn swiglu(&self, gate_up: &Self::Act) -> Result<Self::Act>;
    /// `x += y`.
    fn add_inplace(&self, x: &mut Self::Act, y: &Self::Act) -> Result<()>;
    /// `y += sigmoid(gate) · s` per row (`gate`: `[rows, 1]`; Qwen2-MoE's shared expert).
    fn add_gated(&self, y: &mut Self::Act, s: &Self::Act, gate: &Self::Act) -> Result<()>;
    /// Rows `r0..` of `x` overwritten by `part`.
    fn set_rows(&self, x: &mut Self::Act, r0: usize, part: &Self::Act) -> Result<()>;
    /// SwiGLU experts over rows grouped per expert: `groups[i] = (rows, (gate_up, down))` in
    /// row order; the results in the same order.
    fn grouped_mlp(
        &self,
        x: &Self::Act,
        groups: &[ExpertGroup<'_, Self::Weight>],
    ) -> Result<Self::Act>;
    /// An empty K/V store for rows of `width`.
    fn new_kv(&self, width: usize) -> Result<Self::Kv>;
    /// Appends K and V (`[rows, width]`) at `positions` (moved in where the backend can).
    fn kv_append(
        &self,
        kv: &mut Self::Kv,
        k: Self::Act,
        v: Self::Act,
        positions: &[usize],
    ) -> Result<()>;
    /// Drops the keys no query at `next` or later sees through a window of `window` keys, once
    /// more than twice the window are held ([`LayerKv::trim_to_window`]).
    fn kv_trim(&self, kv: &mut Self::Kv, next: usize, window: usize) -> Result<()>;
    /// Attention of `q` at `q_pos` over everything in `kv`, under the causal mask and `mask`.
    fn attend_cached(
        &self,
        p: &AttentionParams,
        mask: &Sparsity<'_>,
        q: &Self::Act,
        q_pos: &[usize],
        kv: &Self::Kv,
    ) -> Result<Partial<Self::Act>>;

    /// `[rows, width]` of `a`.
    fn dims(&self, a: &Self::Act) -> Result<(usize, usize)>;
    /// Runs one forward step `f` (the decoder stack, or the lm_head) where this backend's
    /// kernels run best. The CPU backend moves it onto a worker of the rayon pool: forked from a
    /// worker, a step's parallel kernels are shared by stealing, where forked from any other
    /// thread each kernel is handed to the pool while the caller sleeps, two thread switches per
    /// kernel (a decode step of the bench model has about a dozen). Other backends run `f` in
    /// place.
    fn step<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }
    /// A host matrix onto the backend.
    fn upload(&self, t: &Tensor) -> Result<Self::Act>;
    /// A backend matrix to the host.
    fn download(&self, a: &Self::Act) -> Result<Tensor>;
    /// [`Self::upload`] taking the host matrix (the host backend moves it).
    fn upload_owned(&self, t: Tensor) -> Result<Self::Act> {
        self.upload(&t)
    }
    /// [`Self::download`] taking the backend matrix (the host backend moves it).
    fn download_owned(&self, a: Self::Act) -> Result<Tensor> {
        self.download(&a)
    }
    /// The same values as `[rows, width]` (the element count must match).
    fn reshape(&self, a: Self::Act, rows: usize, width: usize) -> Result<Self::Act>;
    /// `[rows, width]` zeros.
    fn zeros(&self, rows: usize, width: usize) -> Result<Self::Act>;
    /// Rows `idx` of `a`, in that order (indices may repeat).
    fn gather_rows(&self, a: &Self::Act, idx: &[usize]) -> Result<Self::Act>;
    /// Rows `start..end` of `a`.
    fn rows(&self, a: &Self::Act, start: usize, end: usize) -> Result<Self::Act>;
    /// The parts' rows one after another (all of one width).
    fn concat_rows(&self, parts: &[Self::Act]) -> Result<Self::Act>;
    /// [`Self::concat_rows`] consuming the parts (the host backend drops each once copied, so
    /// the whole and the parts are not all held at once).
    fn concat_rows_owned(&self, parts: Vec<Self::Act>) -> Result<Self::Act> {
        self.concat_rows(&parts)
    }
    /// The MoE combine ([`ops::weighted_row_sum`]): token `t`'s output is
    /// `Σ_j weights[t·k + j] · src[rows[t·k + j]]`, added in the order given; a row index equal
    /// to `src`'s row count is a dropped slot and adds nothing.
    fn combine(
        &self,
        src: &Self::Act,
        rows: &[usize],
        weights: &[f32],
        k: usize,
    ) -> Result<Self::Act>;

    /// `[rows, width]` filled with `value`.
    fn filled(&self, rows: usize, width: usize, value: f32) -> Result<Self::Act> {
        let mut t = Tensor::zeros([rows, width]);
        t.as_mut_slice().fill(value);
        self.upload(&t)
    }

    /// The rows `idx` of a K/V block, packed (`[2·idx.len(), width]`, K first): what a rank
    /// passes on in a ring step.
    fn pack_kv_rows(&self, kv: KvRef<'_, Self::Act>, idx: &[usize]) -> Result<Self::Act> {
        match kv {
            KvRef::Split(k, v) => {
                self.concat_rows(&[self.gather_rows(k, idx)?, self.gather_rows(v, idx)?])
            }
            KvRef::Packed(kv) => {
                let n = self.dims(kv)?.0 / 2;
                let both: Vec<usize> = idx
                    .iter()
                    .copied()
                    .chain(idx.iter().map(|i| i + n))
                    .collect();
                self.gather_rows(kv, &both)
            }
        }
    }

    /// Blockwise attention of `q` (`[rows, n_heads·head_dim]` at `q_pos`) over a K/V block at
    /// `k_pos` under the causal mask by position and `mask`: the partial `(out, lse)` and the
    /// (query, key) pairs scored, summed over heads.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        p: &AttentionParams,
        mask: &Sparsity<'_>,
        q: &Self::Act,
        q_pos: &[usize],
        kv: KvRef<'_, Self::Act>,
        k_pos: &[usize],
    ) -> Result<(Partial<Self::Act>, u64)>;

    /// Merges `part` exactly into rows `r0..` of `acc` (the same queries over other keys).
    fn merge_rows(
        &self,
        acc: &mut Partial<Self::Act>,
        r0: usize,
        part: &Partial<Self::Act>,
    ) -> Result<()>;

    /// How many query rows one attention call against `keys` keys should take, so that a long
    /// call can be interrupted between pieces; `usize::MAX`: one call for all.
    fn attention_rows_per_piece(&self, _keys: usize) -> usize {
        usize::MAX
    }

    /// The values of `a` when they are in host memory already (the host backend), else `None`.
    fn host_slice<'a>(&self, _a: &'a Self::Act) -> Option<&'a [f32]> {
        None
    }
}

/// The K and V halves of a block as host slices.
fn host_halves<'a>(kv: &KvRef<'a, Tensor>) -> (&'a [f32], &'a [f32]) {
    match kv {
        KvRef::Split(k, v) => (k.as_slice(), v.as_slice()),
        KvRef::Packed(kv) => kv.as_slice().split_at(kv.elem_count() / 2),
    }
}

fn host_partial(
    p: &AttentionParams,
    rows: usize,
    part: PartialAttention,
) -> Result<Partial<Tensor>> {
    Ok(Partial {
        out: Tensor::from_vec(part.out, [rows, p.n_heads * p.head_dim])?,
        lse: Tensor::from_vec(part.lse, [rows, p.n_heads])?,
    })
}

/// Query-key pairs one piece of a ring step may score on the host: about a second of one
/// core's work on a small model, far more than the per-piece overhead.
const PAIRS_PER_PIECE: usize = 1 << 26;

/// `[Σ rows, width]` of host matrices to stack, all of one width.
fn concat_shape(parts: &[Tensor]) -> Result<(usize, usize)> {
    let Some(first) = parts.first() else {
        return Err(Error::InvalidArgument {
            op: "concat_rows",
            msg: "no parts".into(),
        });
    };
    let w = width_of(first, "concat_rows")?.1;
    let mut rows = 0;
    for p in parts {
        let (r, pw) = width_of(p, "concat_rows")?;
        if pw != w {
            return Err(Error::ShapeMismatch {
                op: "concat_rows",
                expected: vec![r, w],
                got: p.shape().to_vec(),
            });
        }
        rows += r;
    }
    Ok((rows, w))
}

/// The host: activations are [`Tensor`]s, the operations this crate's kernels.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

fn width_of(t: &Tensor, op: &'static str) -> Result<(usize, usize)> {
    t.dims2(op)
}

impl Backend for Cpu {
    type Act = Tensor;
    type Weight = Weights;
    type Vector = Vec<f32>;
    type Kv = LayerKv;
    type Rope = RopeTable;

    /// The host load already made the matrix in its precision: kept as it is.
    fn weight(&self, w: Weights, _precision: WeightPrecision, _exact: bool) -> Result<Weights> {
        Ok(w)
    }

    fn vector(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        Ok(v)
    }

    fn linear(&self, x: &Tensor, w: &Weights, bias: Option<&Vec<f32>>) -> Result<Tensor> {
        let (rows, _) = width_of(x, "linear")?;
        let mut y = w.matmul_nt(x.as_slice(), rows, Par::Rayon)?;
        if let Some(b) = bias {
            ops::add_bias_rows(&mut y, b)?;
        }
        Tensor::from_vec(y, [rows, w.rows()])
    }

    fn weight_rows(&self, w: &Weights, ids: &[usize]) -> Result<Tensor> {
        let h = w.cols();
        let mut data = vec![0f32; ids.len() * h];
        for (row, &t) in data.chunks_mut(h.max(1)).zip(ids) {
            w.decode_rows(t, t + 1, row)?;
        }
        Tensor::from_vec(data, [ids.len(), h])
    }

    fn rms_norm(&self, x: &Tensor, w: &Vec<f32>, eps: f32) -> Result<Tensor> {
        ops::rms_norm(x, w, eps)
    }

    fn rms_norm_chunks(&self, x: &mut Tensor, w: &Vec<f32>, eps: f32) -> Result<()> {
        ops::rms_norm_chunks_inplace(x.as_mut_slice(), w, eps)
    }

    fn split_qkv(&self, fused: &Tensor, q: usize, kv: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (rows, width) = width_of(fused, "split_qkv")?;
        if width != q + 2 * kv {
            return Err(Error::InvalidArgument {
                op: "split_qkv",
                msg: format!("rows of {width} for q {q} and k/v {kv}"),
            });
        }
        let (mut qs, mut ks, mut vs) = (
            Vec::with_capacity(rows * q),
            Vec::with_capacity(rows * kv),
            Vec::with_capacity(rows * kv),
        );
        for row in fused.as_slice().chunks(width.max(1)) {
            qs.extend_from_slice(&row[..q]);
            ks.extend_from_slice(&row[q..q + kv]);
            vs.extend_from_slice(&row[q + kv..]);
        }
        Ok((
            Tensor::from_vec(qs, [rows, q])?,
            Tensor::from_vec(ks, [rows, kv])?,
            Tensor::from_vec(vs, [rows, kv])?,
        ))
    }

    fn rope_table(&self, t: RopeTable) -> Result<RopeTable> {
        Ok(t)
    }

    fn rope(&self, x: &mut Tensor, heads: usize, head_dim: usize, t: &RopeTable) -> Result<()> {
        apply_rope(x.as_mut_slice(), heads, head_dim, t)
    }

    fn swiglu(&self, gate_up: &Tensor) -> Result<Tensor> {
        let (rows, w) = width_of(gate_up, "swiglu")?;
        let inter = w / 2;
        Tensor::from_vec(
            ops::swiglu_fused(gate_up.as_slice(), rows, inter)?,
            [rows, inter],
        )
    }

    fn add_inplace(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        ops::add_inplace(x, y)
    }

    fn add_gated(&self, y: &mut Tensor, s: &Tensor, gate: &Tensor) -> Result<()> {
        let (rows, h) = width_of(y, "add_gated")?;
        if s.shape() != y.shape() || gate.elem_count() != rows {
            return Err(Error::ShapeMismatch {
                op: "add_gated",
                expected: vec![rows, h],
                got: s.shape().to_vec(),
            });
        }
        for ((yr, sr), &gv) in y
            .as_mut_slice()
            .chunks_mut(h.max(1))
            .zip(s.as_slice().chunks(h.max(1)))
            .zip(gate.as_slice())
        {
            let gv = ops::sigmoid(gv);
            for (a, b) in yr.iter_mut().zip(sr) {
                *a += gv * b;
            }
        }
        Ok(())
    }

    fn set_rows(&self, x: &mut Tensor, r0: usize, part: &Tensor) -> Result<()> {
        let (rows, w) = width_of(x, "set_rows")?;
        let (n, pw) = width_of(part, "set_rows")?;
        if pw != w || r0 + n > rows {
            return Err(Error::InvalidArgument {
                op: "set_rows",
                msg: format!("{n} rows of {pw} at row {r0} of [{rows}, {w}]"),
            });
        }
        x.as_mut_slice()[r0 * w..(r0 + n) * w].copy_from_slice(part.as_slice());
        Ok(())
    }

    /// Experts run side by side on the rayon pool, each GEMM single-threaded: with several busy
    /// experts this keeps every core on its own packed weights instead of splitting each GEMM.
    /// A lone busy expert (decode, or a skewed batch) gets the whole pool inside its GEMMs.
    fn grouped_mlp(&self, x: &Tensor, groups: &[ExpertGroup<'_, Weights>]) -> Result<Tensor> {
        let (total, hidden) = width_of(x, "grouped_mlp")?;
        if groups.iter().map(|g| g.0).sum::<usize>() != total {
            return Err(Error::InvalidArgument {
                op: "grouped_mlp",
                msg: format!(
                    "groups of {} rows for {total}",
                    groups.iter().map(|g| g.0).sum::<usize>()
                ),
            });
        }
        let out_w = groups.first().map_or(hidden, |g| g.1.1.rows());
        let busy = groups.iter().filter(|g| g.0 > 0).count();
        let par = if busy >= rayon::current_num_threads() {
            Par::Serial
        } else {
            Par::Rayon
        };
        let mut out = vec![0f32; total * out_w];
        let mut chunks: Vec<(usize, &Weights, &Weights, &mut [f32])> =
            Vec::with_capacity(groups.len());
        let mut rest = out.as_mut_slice();
        let mut start = 0;
        for &(n, (gu, down)) in groups {
            let (head, tail) = rest.split_at_mut(n * out_w);
            chunks.push((start, gu, down, head));
            rest = tail;
            start += n;
        }
        let xs = x.as_slice();
        chunks
            .into_par_iter()
            .try_for_each(|(start, gu, down, dst)| -> Result<()> {
                let n = dst.len() / out_w.max(1);
                let rows = &xs[start * hidden..(start + n) * hidden];
                let inter = gu.rows() / 2;
                let g = gu.matmul_nt(rows, n, par)?;
                let act = ops::swiglu_fused(&g, n, inter)?;
                dst.copy_from_slice(&down.matmul_nt(&act, n, par)?);
                Ok(())
            })?;
        Tensor::from_vec(out, [total, out_w])
    }

    fn new_kv(&self, _width: usize) -> Result<LayerKv> {
        Ok(LayerKv::default())
    }

    fn kv_append(&self, kv: &mut LayerKv, k: Tensor, v: Tensor, positions: &[usize]) -> Result<()> {
        kv.append_owned(k.into_vec(), v.into_vec(), positions);
        Ok(())
    }

    fn kv_trim(&self, kv: &mut LayerKv, next: usize, window: usize) -> Result<()> {
        kv.trim_to_window(next, window);
        Ok(())
    }

    fn attend_cached(
        &self,
        p: &AttentionParams,
        mask: &Sparsity<'_>,
        q: &Tensor,
        q_pos: &[usize],
        kv: &LayerKv,
    ) -> Result<Partial<Tensor>> {
        let part = match mask {
            Sparsity::Dense => crate::attention::attention_block(
                p,
                q.as_slice(),
                q_pos,
                &kv.k,
                &kv.v,
                &kv.positions,
            )?,
            m => attention_sparse(p, m, q.as_slice(), q_pos, &kv.k, &kv.v, &kv.positions)?.0,
        };
        host_partial(p, q_pos.len(), part)
    }

    fn step<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if rayon::current_thread_index().is_some() {
            f()
        } else {
            // From outside the pool, `scope` runs its body on a pool worker and waits for it.
            rayon::scope(|_| f())
        }
    }

    fn dims(&self, a: &Tensor) -> Result<(usize, usize)> {
        width_of(a, "dims")
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        width_of(t, "upload")?;
        Ok(t.clone())
    }

    fn download(&self, a: &Tensor) -> Result<Tensor> {
        Ok(a.clone())
    }

    fn upload_owned(&self, t: Tensor) -> Result<Tensor> {
        width_of(&t, "upload")?;
        Ok(t)
    }

    fn download_owned(&self, a: Tensor) -> Result<Tensor> {
        Ok(a)
    }

    fn reshape(&self, a: Tensor, rows: usize, width: usize) -> Result<Tensor> {
        a.reshape([rows, width])
    }

    fn zeros(&self, rows: usize, width: usize) -> Result<Tensor> {
        Ok(Tensor::zeros([rows, width]))
    }

    fn gather_rows(&self, a: &Tensor, idx: &[usize]) -> Result<Tensor> {
        let (n, w) = width_of(a, "gather_rows")?;
        if let Some(&bad) = idx.iter().find(|&&i| i >= n) {
            return Err(Error::InvalidArgument {
                op: "gather_rows",
                msg: format!("row {bad} of a matrix of {n} rows"),
            });
        }
        let src = a.as_slice();
        let mut out = vec![0f32; idx.len() * w];
        if w > 0 {
            out.par_chunks_mut(w)
                .zip(idx.par_iter())
                .for_each(|(row, &i)| row.copy_from_slice(&src[i * w..(i + 1) * w]));
        }
        Tensor::from_vec(out, [idx.len(), w])
    }

    fn rows(&self, a: &Tensor, start: usize, end: usize) -> Result<Tensor> {
        width_of(a, "rows")?;
        a.rows(start, end)
    }

    fn concat_rows(&self, parts: &[Tensor]) -> Result<Tensor> {
        let (rows, w) = concat_shape(parts)?;
        let mut out = Vec::with_capacity(rows * w);
        for p in parts {
            out.extend_from_slice(p.as_slice());
        }
        Tensor::from_vec(out, [rows, w])
    }

    /// Each part is dropped once copied.
    fn concat_rows_owned(&self, parts: Vec<Tensor>) -> Result<Tensor> {
        let (rows, w) = concat_shape(&parts)?;
        let mut out = Vec::with_capacity(rows * w);
        for p in parts {
            out.extend_from_slice(p.as_slice());
        }
        Tensor::from_vec(out, [rows, w])
    }

    fn combine(&self, src: &Tensor, rows: &[usize], weights: &[f32], k: usize) -> Result<Tensor> {
        let w = width_of(src, "combine")?.1;
        let out = ops::weighted_row_sum(src.as_slice(), w, rows, weights, k)?;
        let tokens = out.len() / w.max(1);
        Tensor::from_vec(out, [tokens, w])
    }

    fn filled(&self, rows: usize, width: usize, value: f32) -> Result<Tensor> {
        Tensor::from_vec(vec![value; rows * width], [rows, width])
    }

    fn attend(
        &self,
        p: &AttentionParams,
        mask: &Sparsity<'_>,
        q: &Tensor,
        q_pos: &[usize],
        kv: KvRef<'_, Tensor>,
        k_pos: &[usize],
    ) -> Result<(Partial<Tensor>, u64)> {
        let (k, v) = host_halves(&kv);
        let (part, pairs) = attention_sparse(p, mask, q.as_slice(), q_pos, k, v, k_pos)?;
        Ok((host_partial(p, q_pos.len(), part)?, pairs))
    }

    fn merge_rows(
        &self,
        acc: &mut Partial<Tensor>,
        r0: usize,
        part: &Partial<Tensor>,
    ) -> Result<()> {
        let (rows, hq) = width_of(&part.lse, "merge_rows")?;
        let qw = width_of(&part.out, "merge_rows")?.1;
        let (acc_rows, _) = width_of(&acc.lse, "merge_rows")?;
        if r0 + rows > acc_rows {
            return Err(Error::InvalidArgument {
                op: "merge_rows",
                msg: format!("rows {r0}..{} of {acc_rows}", r0 + rows),
            });
        }
        merge_slices(
            &mut acc.out.as_mut_slice()[r0 * qw..(r0 + rows) * qw],
            &mut acc.lse.as_mut_slice()[r0 * hq..(r0 + rows) * hq],
            part.out.as_slice(),
            part.lse.as_slice(),
        )
    }

    fn attention_rows_per_piece(&self, keys: usize) -> usize {
        (PAIRS_PER_PIECE / keys.max(1)).max(256)
    }

    fn host_slice<'a>(&self, a: &'a Tensor) -> Option<&'a [f32]> {
        Some(a.as_slice())
    }
}

/// A simulated device: the CPU's arithmetic behind an opaque buffer that only [`Backend::upload`]
/// and [`Backend::download`] convert to and from host tensors. Code generic over [`Backend`] that
/// runs correctly on `Sim` moves every row it needs explicitly, as it must on a GPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sim;

/// An activation on the [`Sim`] device.
#[derive(Debug, Clone, PartialEq)]
pub struct SimBuffer(Tensor);

/// A layer's K/V on the [`Sim`] device.
#[derive(Debug, Clone, Default)]
pub struct SimKv(LayerKv);

impl KvStore for SimKv {
    fn positions(&self) -> &[usize] {
        &self.0.positions
    }

    fn bytes(&self) -> usize {
        KvStore::bytes(&self.0)
    }
}

impl Backend for Sim {
    type Act = SimBuffer;
    type Weight = Weights;
    type Vector = Vec<f32>;
    type Kv = SimKv;
    type Rope = RopeTable;

    fn weight(&self, w: Weights, precision: WeightPrecision, exact: bool) -> Result<Weights> {
        Cpu.weight(w, precision, exact)
    }

    fn vector(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        Ok(v)
    }

    fn linear(&self, x: &SimBuffer, w: &Weights, bias: Option<&Vec<f32>>) -> Result<SimBuffer> {
        Cpu.linear(&x.0, w, bias).map(SimBuffer)
    }

    fn weight_rows(&self, w: &Weights, ids: &[usize]) -> Result<SimBuffer> {
        Cpu.weight_rows(w, ids).map(SimBuffer)
    }

    fn rms_norm(&self, x: &SimBuffer, w: &Vec<f32>, eps: f32) -> Result<SimBuffer> {
        Cpu.rms_norm(&x.0, w, eps).map(SimBuffer)
    }

    fn rms_norm_chunks(&self, x: &mut SimBuffer, w: &Vec<f32>, eps: f32) -> Result<()> {
        Cpu.rms_norm_chunks(&mut x.0, w, eps)
    }

    fn split_qkv(
        &self,
        fused: &SimBuffer,
        q: usize,
        kv: usize,
    ) -> Result<(SimBuffer, SimBuffer, SimBuffer)> {
        let (a, b, c) = Cpu.split_qkv(&fused.0, q, kv)?;
        Ok((SimBuffer(a), SimBuffer(b), SimBuffer(c)))
    }

    fn rope_table(&self, t: RopeTable) -> Result<RopeTable> {
        Ok(t)
    }

    fn rope(&self, x: &mut SimBuffer, heads: usize, head_dim: usize, t: &RopeTable) -> Result<()> {
        Cpu.rope(&mut x.0, heads, head_dim, t)
    }

    fn swiglu(&self, gate_up: &SimBuffer) -> Result<SimBuffer> {
        Cpu.swiglu(&gate_up.0).map(SimBuffer)
    }

    fn add_inplace(&self, x: &mut SimBuffer, y: &SimBuffer) -> Result<()> {
        Cpu.add_inplace(&mut x.0, &y.0)
    }

    fn add_gated(&self, y: &mut SimBuffer, s: &SimBuffer, gate: &SimBuffer) -> Result<()> {
        Cpu.add_gated(&mut y.0, &s.0, &gate.0)
    }

    fn set_rows(&self, x: &mut SimBuffer, r0: usize, part: &SimBuffer) -> Result<()> {
        Cpu.set_rows(&mut x.0, r0, &part.0)
    }

    fn grouped_mlp(&self, x: &SimBuffer, groups: &[ExpertGroup<'_, Weights>]) -> Result<SimBuffer> {
        Cpu.grouped_mlp(&x.0, groups).map(SimBuffer)
    }

    fn new_kv(&self, width: usize) -> Result<SimKv> {
        Cpu.new_kv(width).map(SimKv)
    }

    fn kv_append(
        &self,
        kv: &mut SimKv,
        k: SimBuffer,
        v: SimBuffer,
        positions: &[usize],
    ) -> Result<()> {
        Cpu.kv_append(&mut kv.0, k.0, v.0, positions)
    }

    fn kv_trim(&self, kv: &mut SimKv, next: usize, window: usize) -> Result<()> {
        Cpu.kv_trim(&mut kv.0, next, window)
    }

    fn attend_cached(
        &self,
        p: &AttentionParams,
        mask: &Sparsity<'_>,
        q: &SimBuffer,
        q_pos: &[usize],
        kv: &SimKv,
    ) -> Result<Partial<SimBuffer>> {
        let part = Cpu.attend_cached(p, mask, &q.0, q_pos, &kv.0)?;
        Ok(Partial {
            out: SimBuffer(part.out),
            lse: SimBuffer(part.lse),
        })
    }

    fn dims(&self, a: &SimBuffer) -> Result<(usize, usize)> {
        Cpu.dims(&a.0)
    }

    fn upload(&self, t: &Tensor) -> Result<SimBuffer> {
        Cpu.upload(t).map(SimBuffer)
    }

    fn download(&self, a: &SimBuffer) -> Result<Tensor> {
        Ok(a.0.clone())
    }

    fn reshape(&self, a: SimBuffer, rows: usize, width: usize) -> Result<SimBuffer> {
        Cpu.reshape(a.0, rows, width).map(SimBuffer)
    }

    fn zeros(&self, rows: usize, width: usize) -> Result<SimBuffer> {
        Cpu.zeros(rows, width).map(SimBuffer)
    }

    fn gather_rows(&self, a: &SimBuffer, idx: &[usize]) -> Result<SimBuffer> {
        Cpu.gather_rows(&a.0, idx).map(SimBuffer)
    }

    fn rows(&self, a: &SimBuffer, start: usize, end: usize) -> Result<SimBuffer> {
        Cpu.rows(&a.0, start, end).map(SimBuffer)
    }

    fn concat_rows(&self, parts: &[SimBuffer]) -> Result<SimBuffer> {
        let parts: Vec<Tensor> = parts.iter().map(|p| p.0.clone()).collect();
        Cpu.concat_rows(&parts).map(SimBuffer)
    }

    fn combine(
        &self,
        src: &SimBuffer,
        rows: &[usize],
        weights: &[f32],
        k: usize,
    ) -> Result<SimBuffer> {
        Cpu.combine(&src.0, rows, weights, k).map(SimBuffer)
    }

    fn attend(
        &self,
        p: &AttentionParams,
        mask: &Sparsity<'_>,
        q: &SimBuffer,
        q_pos: &[usize],
        kv: KvRef<'_, SimBuffer>,
        k_pos: &[usize],
    ) -> Result<(Partial<SimBuffer>, u64)> {
        let kv = match kv {
            KvRef::Split(k, v) => KvRef::Split(&k.0, &v.0),
            KvRef::Packed(kv) => KvRef::Packed(&kv.0),
        };
        let (part, pairs) = Cpu.attend(p, mask, &q.0, q_pos, kv, k_pos)?;
        Ok((
            Partial {
                out: SimBuffer(part.out),
                lse: SimBuffer(part.lse),
            },
            pairs,
        ))
    }

    fn merge_rows(
        &self,
        acc: &mut Partial<SimBuffer>,
        r0: usize,
        part: &Partial<SimBuffer>,
    ) -> Result<()> {
        let mut host = Partial {
            out: std::mem::replace(&mut acc.out.0, Tensor::zeros([0])),
            lse: std::mem::replace(&mut acc.lse.0, Tensor::zeros([0])),
        };
        let part = Partial {
            out: part.out.0.clone(),
            lse: part.lse.0.clone(),
        };
        let r = Cpu.merge_rows(&mut host, r0, &part);
        acc.out.0 = host.out;
        acc.lse.0 = host.lse;
        r
    }

    /// Small pieces, so tests of the generic ring on the simulated device merge piece by piece.
    fn attention_rows_per_piece(&self, _keys: usize) -> usize {
        3
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::rand_vec;

    #[test]
    fn combine_skips_dropped_rows_and_sums_in_the_given_order() {
        let src = Tensor::from_vec(rand_vec(3 * 4, 1, 1.0), [3, 4]).unwrap();
        // Two tokens, top-2: token 0 reads rows 2 then 0, token 1 row 1 and a dropped slot.
        let out = Cpu
            .combine(&src, &[2, 0, 1, 3], &[0.25, 0.75, 0.5, 9.0], 2)
            .unwrap();
        let s = src.as_slice();
        for c in 0..4 {
            let mut want = 0f32;
            want += s[8 + c] * 0.25;
            want += s[c] * 0.75;
            assert_eq!(out.as_slice()[c], want);
            assert_eq!(out.as_slice()[4 + c], 0.0 + s[4 + c] * 0.5);
        }
        assert!(Cpu.combine(&src, &[4, 0], &[1.0, 1.0], 2).is_err());
    }

    #[test]
    fn the_simulated_device_computes_what_the_host_does() {
        let t = Tensor::from_vec(rand_vec(5 * 3, 2, 1.0), [5, 3]).unwrap();
        let d = Sim.upload(&t).unwrap();
        let g = Sim.gather_rows(&d, &[4, 0, 4]).unwrap();
        assert_eq!(
            Sim.download(&g).unwrap(),
            Cpu.gather_rows(&t, &[4, 0, 4]).unwrap()
        );
        let c = Sim.concat_rows(&[g, Sim.zeros(2, 3).unwrap()]).unwrap();
        assert_eq!(Sim.dims(&c).unwrap(), (5, 3));
        assert!(Sim.gather_rows(&d, &[5]).is_err());
        assert!(Sim.concat_rows(&[]).is_err());
    }
}
