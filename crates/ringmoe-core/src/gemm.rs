//! Safe, bounds-checked wrappers over the `gemm` crate's f32 kernel. This is the only place in the
//! crate that calls into `gemm`, and so the only `unsafe` on the GEMM path.

use crate::{Error, Result};

/// Whether a GEMM may split its work over the rayon pool. Kernels that already run inside a
/// parallel loop (attention tiles, per-expert GEMMs) pass `Serial` to avoid nested oversubscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Par {
    Serial,
    Rayon,
}

impl Par {
    fn to_gemm(self, work: usize) -> gemm::Parallelism {
        // Below ~1 MFLOP the fork/join costs more than it saves.
        if self == Par::Rayon && work >= 1 << 20 {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        } else {
            gemm::Parallelism::None
        }
    }
}

/// A read-only strided view of a `rows × cols` matrix inside a slice.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    /// Distance between consecutive rows, in elements.
    pub row_stride: usize,
    /// Distance between consecutive columns, in elements.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view (no data moves).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    pub(crate) fn check(&self, what: &'static str) -> Result<()> {
        if self.rows == 0 || self.cols == 0 {
            return Ok(());
        }
        let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
        if last >= self.data.len() {
            return Err(Error::InvalidArgument {
                op: "gemm",
                msg: format!(
                    "{what} view {}x{} with strides ({}, {}) reaches element {last} of a {}-element buffer",
                    self.rows,
                    self.cols,
                    self.row_stride,
                    self.col_stride,
                    self.data.len()
                ),
            });
        }
        Ok(())
    }
}

/// `dst[rows × cols] (row stride dst_rs) = alpha·dst + scale · lhs · rhs`, where `alpha` is 0 when
/// `accumulate` is false (dst is then write-only) and 1 otherwise.
pub fn gemm_into(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    scale: f32,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k {
        return Err(Error::ShapeMismatch {
            op: "gemm",
            expected: vec![k, n],
            got: vec![rhs.rows, rhs.cols],
        });
    }
    lhs.check("lhs")?;
    rhs.check("rhs")?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if dst_row_stride < n || (m - 1) * dst_row_stride + n > dst.len() {
        return Err(Error::InvalidArgument {
            op: "gemm",
            msg: format!(
                "dst of {} elements cannot hold {m}x{n} with row stride {dst_row_stride}",
                dst.len()
            ),
        });
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_row_stride..r * dst_row_stride + n].fill(0.0);
            }
        }
        return Ok(());
    }
    // SAFETY: every operand's largest reachable offset was checked against its slice length above
    // (lhs/rhs by `check`, dst by the row-stride test); `dst` is a unique borrow so it cannot alias
    // `lhs` or `rhs`; strides fit in isize because they index existing allocations.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par.to_gemm(m * n * k),
        );
    }
    Ok(())
}

/// `x[m × k] · w[n × k]ᵀ → [m × n]`: a linear layer with HF's `[out_features, in_features]` weights.
pub fn matmul_nt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, par: Par) -> Result<Vec<f32>> {
    if x.len() != m * k || w.len() != n * k {
        return Err(Error::ShapeMismatch {
            op: "matmul_nt",
            expected: vec![m * k, n * k],
            got: vec![x.len(), w.len()],
        });
    }
    let mut out = vec![0.0f32; m * n];
    gemm_into(
        &mut out,
        n,
        MatRef::row_major(x, m, k),
        MatRef::row_major(w, n, k).t(),
        1.0,
        false,
        par,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
            }
        }
        out
    }

    #[test]
    fn matmul_nt_matches_naive() {
        let (m, k, n) = (37, 65, 29);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let got = matmul_nt(&x, m, k, &w, n, Par::Rayon).unwrap();
        let want = naive(&x, m, k, &w, n);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn out_of_bounds_view_is_rejected() {
        let x = vec![0.0f32; 10];
        let y = vec![0.0f32; 16];
        let bad = MatRef {
            data: &x,
            rows: 4,
            cols: 4,
            row_stride: 4,
            col_stride: 1,
        };
        let mut dst = vec![0.0; 16];
        let err = gemm_into(
            &mut dst,
            4,
            bad,
            MatRef::row_major(&y, 4, 4),
            1.0,
            false,
            Par::Serial,
        );
        assert!(err.unwrap_err().to_string().contains("lhs view"));
    }
}
