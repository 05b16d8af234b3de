//! The operations the distributed forward is written against once, whatever holds the
//! activations: [`Cpu`] (host memory, this crate's kernels), [`Sim`] (the CPU behind opaque
//! buffers, so tests exercise the orchestration a device backend runs, every transfer through an
//! explicit upload or download), and the CUDA backend in `ringmoe-cuda`.
//!
//! Activations are row-major `[rows, width]` f32 matrices. Host-side bookkeeping (routing,
//! dispatch plans, headers) stays on the host; only rows move through these operations.

use crate::attention::{AttentionParams, PartialAttention, merge_slices};
use crate::sparse::{Sparsity, attention_sparse};
use crate::{Error, Result, Tensor, ops};

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

/// A place activations live and the row operations on them.
pub trait Backend {
    /// A `[rows, width]` f32 matrix on the backend.
    type Act;
    /// What the backend's operations fail with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// `[rows, width]` of `a`.
    fn dims(&self, a: &Self::Act) -> std::result::Result<(usize, usize), Self::Error>;
    /// A host matrix onto the backend.
    fn upload(&self, t: &Tensor) -> std::result::Result<Self::Act, Self::Error>;
    /// A backend matrix to the host.
    fn download(&self, a: &Self::Act) -> std::result::Result<Tensor, Self::Error>;
    /// [`Self::upload`] taking the host matrix (the host backend moves it).
    fn upload_owned(&self, t: Tensor) -> std::result::Result<Self::Act, Self::Error> {
        self.upload(&t)
    }
    /// [`Self::download`] taking the backend matrix (the host backend moves it).
    fn download_owned(&self, a: Self::Act) -> std::result::Result<Tensor, Self::Error> {
        self.download(&a)
    }
    /// The same values as `[rows, width]` (the element count must match).
    fn reshape(
        &self,
        a: Self::Act,
        rows: usize,
        width: usize,
    ) -> std::result::Result<Self::Act, Self::Error>;
    /// `[rows, width]` zeros.
    fn zeros(&self, rows: usize, width: usize) -> std::result::Result<Self::Act, Self::Error>;
    /// Rows `idx` of `a`, in that order (indices may repeat).
    fn gather_rows(
        &self,
        a: &Self::Act,
        idx: &[usize],
    ) -> std::result::Result<Self::Act, Self::Error>;
    /// Rows `start..end` of `a`.
    fn rows(
        &self,
        a: &Self::Act,
        start: usize,
        end: usize,
    ) -> std::result::Result<Self::Act, Self::Error>;
    /// The parts' rows one after another (all of one width).
    fn concat_rows(&self, parts: &[Self::Act]) -> std::result::Result<Self::Act, Self::Error>;
    /// The MoE combine ([`ops::weighted_row_sum`]): token `t`'s output is
    /// `Σ_j weights[t·k + j] · src[rows[t·k + j]]`, added in the order given; a row index equal
    /// to `src`'s row count is a dropped slot and adds nothing.
    fn combine(
        &self,
        src: &Self::Act,
        rows: &[usize],
        weights: &[f32],
        k: usize,
    ) -> std::result::Result<Self::Act, Self::Error>;

    /// `[rows, width]` filled with `value`.
    fn filled(
        &self,
        rows: usize,
        width: usize,
        value: f32,
    ) -> std::result::Result<Self::Act, Self::Error> {
        let mut t = Tensor::zeros([rows, width]);
        t.as_mut_slice().fill(value);
        self.upload(&t)
    }

    /// The rows `idx` of a K/V block, packed (`[2·idx.len(), width]`, K first): what a rank
    /// passes on in a ring step.
    fn pack_kv_rows(
        &self,
        kv: KvRef<'_, Self::Act>,
        idx: &[usize],
    ) -> std::result::Result<Self::Act, Self::Error> {
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
    ) -> std::result::Result<(Partial<Self::Act>, u64), Self::Error>;

    /// Merges `part` exactly into rows `r0..` of `acc` (the same queries over other keys).
    fn merge_rows(
        &self,
        acc: &mut Partial<Self::Act>,
        r0: usize,
        part: &Partial<Self::Act>,
    ) -> std::result::Result<(), Self::Error>;

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

/// The host: activations are [`Tensor`]s, the operations this crate's kernels.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

fn width_of(t: &Tensor, op: &'static str) -> Result<(usize, usize)> {
    t.dims2(op)
}

impl Backend for Cpu {
    type Act = Tensor;
    type Error = Error;

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
        let mut out = Vec::with_capacity(idx.len() * w);
        for &i in idx {
            out.extend_from_slice(&src[i * w..(i + 1) * w]);
        }
        Tensor::from_vec(out, [idx.len(), w])
    }

    fn rows(&self, a: &Tensor, start: usize, end: usize) -> Result<Tensor> {
        width_of(a, "rows")?;
        a.rows(start, end)
    }

    fn concat_rows(&self, parts: &[Tensor]) -> Result<Tensor> {
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

impl Backend for Sim {
    type Act = SimBuffer;
    type Error = Error;

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
