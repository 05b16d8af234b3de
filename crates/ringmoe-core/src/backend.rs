//! The operations the distributed forward is written against once, whatever holds the
//! activations: [`Cpu`] (host memory, this crate's kernels), [`Sim`] (the CPU behind opaque
//! buffers, so tests exercise the orchestration a device backend runs, every transfer through an
//! explicit upload or download), and the CUDA backend in `ringmoe-cuda`.
//!
//! Activations are row-major `[rows, width]` f32 matrices. Host-side bookkeeping (routing,
//! dispatch plans, headers) stays on the host; only rows move through these operations.

use crate::{Error, Result, Tensor, ops};

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
}

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
