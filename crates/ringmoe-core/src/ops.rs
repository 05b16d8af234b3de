//! Row-wise kernels of a transformer layer on the CPU: RMSNorm, SwiGLU, softmax, top-k, residuals.
//!
//! Each mirrors the precision choices of Hugging Face transformers (statistics in f32, weights
//! applied after normalisation) so that logits agree to ~1e-6.

use rayon::prelude::*;

use crate::{Error, Result, Tensor};

/// Rows processed per rayon task; small rows are cheap, so tasks batch many.
const ROWS_PER_TASK: usize = 16;

/// The MoE combine: `out[t] = Σ_j weights[t·k + j] · src[rows[t·k + j]]` over `[rows, width]`
/// rows `src`, the terms added in the order given (the caller decides it: increasing expert id,
/// see `ringmoe_model::moe::combine_plan`). A row index equal to the row count of `src` is a
/// dropped slot and contributes nothing. Returns `[rows.len() / k, width]` values.
pub fn weighted_row_sum(
    src: &[f32],
    width: usize,
    rows: &[usize],
    weights: &[f32],
    k: usize,
) -> Result<Vec<f32>> {
    if rows.is_empty() && weights.is_empty() {
        return Ok(Vec::new());
    }
    let n = src.len() / width.max(1);
    if k == 0
        || width == 0
        || src.len() != n * width
        || rows.len() != weights.len()
        || !rows.len().is_multiple_of(k)
        || rows.iter().any(|&r| r > n)
    {
        return Err(Error::InvalidArgument {
            op: "weighted_row_sum",
            msg: format!(
                "{} row indices and {} weights (top-{k}) into {n} rows of width {width} \
                 ({} values)",
                rows.len(),
                weights.len(),
                src.len()
            ),
        });
    }
    let mut out = vec![0f32; rows.len() / k * width];
    out.par_chunks_mut(width).enumerate().for_each(|(t, acc)| {
        for (&row, &w) in rows[t * k..(t + 1) * k]
            .iter()
            .zip(&weights[t * k..(t + 1) * k])
        {
            if row == n {
                continue;
            }
            for (a, y) in acc.iter_mut().zip(&src[row * width..(row + 1) * width]) {
                *a += y * w;
            }
        }
    });
    Ok(out)
}

/// `y = w ⊙ x / sqrt(mean(x²) + eps)` over the last dimension of a `[rows, dim]` tensor.
pub fn rms_norm(x: &Tensor, weight: &[f32], eps: f32) -> Result<Tensor> {
    let dim = *x.shape().last().unwrap_or(&0);
    if weight.len() != dim {
        return Err(Error::ShapeMismatch {
            op: "rms_norm",
            expected: vec![dim],
            got: vec![weight.len()],
        });
    }
    let mut out = vec![0.0f32; x.elem_count()];
    if dim > 0 {
        out.par_chunks_mut(dim * ROWS_PER_TASK)
            .zip(x.as_slice().par_chunks(dim * ROWS_PER_TASK))
            .for_each(|(o, xs)| {
                for (orow, xrow) in o.chunks_mut(dim).zip(xs.chunks(dim)) {
                    rms_norm_row(xrow, weight, eps, orow);
                }
            });
    }
    Tensor::from_vec(out, x.shape().to_vec())
}

/// RMSNorm of one row into `out`.
pub fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
    }
}

/// In-place RMSNorm of each `dim`-sized chunk (used for Qwen3's per-head q/k norms).
pub fn rms_norm_chunks_inplace(x: &mut [f32], weight: &[f32], eps: f32) -> Result<()> {
    let dim = weight.len();
    if dim == 0 || !x.len().is_multiple_of(dim) {
        return Err(Error::ShapeMismatch {
            op: "rms_norm_chunks",
            expected: vec![dim],
            got: vec![x.len()],
        });
    }
    x.par_chunks_mut(dim * ROWS_PER_TASK).for_each(|c| {
        let mut tmp = vec![0.0f32; dim];
        for row in c.chunks_mut(dim) {
            rms_norm_row(row, weight, eps, &mut tmp);
            row.copy_from_slice(&tmp);
        }
    });
    Ok(())
}

/// `sigmoid(x)`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SwiGLU on a fused `[rows, 2·inter]` buffer laid out as `[gate | up]` per row: returns
/// `silu(gate) ⊙ up` as `[rows, inter]`.
pub fn swiglu_fused(gate_up: &[f32], rows: usize, inter: usize) -> Result<Vec<f32>> {
    if gate_up.len() != rows * 2 * inter {
        return Err(Error::ShapeMismatch {
            op: "swiglu",
            expected: vec![rows, 2 * inter],
            got: vec![gate_up.len()],
        });
    }
    let mut out = vec![0.0f32; rows * inter];
    if inter == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(inter)
        .zip(gate_up.par_chunks(2 * inter))
        .for_each(|(o, gu)| {
            let (g, u) = gu.split_at(inter);
            crate::simd::swiglu(g, u, o);
        });
    Ok(out)
}

/// Numerically stable softmax of one row, in place.
pub fn softmax_inplace(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index (as `torch.topk`
/// does on CPU for the sizes used by routers).
pub fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// `acc += x`, elementwise.
pub fn add_inplace(acc: &mut Tensor, x: &Tensor) -> Result<()> {
    if acc.shape() != x.shape() {
        return Err(Error::ShapeMismatch {
            op: "add",
            expected: acc.shape().to_vec(),
            got: x.shape().to_vec(),
        });
    }
    acc.as_mut_slice()
        .par_chunks_mut(1 << 14)
        .zip(x.as_slice().par_chunks(1 << 14))
        .for_each(|(a, b)| {
            for (a, b) in a.iter_mut().zip(b) {
                *a += b;
            }
        });
    Ok(())
}

/// Adds a bias vector to every row of a `[rows, n]` buffer.
pub fn add_bias_rows(x: &mut [f32], bias: &[f32]) -> Result<()> {
    let n = bias.len();
    if n == 0 || !x.len().is_multiple_of(n) {
        return Err(Error::ShapeMismatch {
            op: "add_bias",
            expected: vec![n],
            got: vec![x.len()],
        });
    }
    for row in x.chunks_mut(n) {
        for (a, b) in row.iter_mut().zip(bias) {
            *a += b;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_weight_gives_unit_rms() {
        let x = Tensor::from_vec(vec![1.0, -2.0, 3.0, 0.5, 4.0, -1.0], [2, 3]).unwrap();
        let y = rms_norm(&x, &[1.0; 3], 0.0).unwrap();
        for row in y.as_slice().chunks(3) {
            let ms: f32 = row.iter().map(|v| v * v).sum::<f32>() / 3.0;
            assert!((ms - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn softmax_handles_extremes() {
        let mut r = [1e30f32, 0.0, -1e30];
        softmax_inplace(&mut r);
        assert_eq!(r, [1.0, 0.0, 0.0]);
        let mut all_masked = [f32::NEG_INFINITY; 3];
        softmax_inplace(&mut all_masked);
        assert_eq!(all_masked, [0.0; 3]);
    }

    #[test]
    fn top_k_orders_and_breaks_ties_low_index_first() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.9, -1.0], 3), vec![3, 1, 2]);
    }
}
