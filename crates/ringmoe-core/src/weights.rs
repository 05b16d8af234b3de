//! Weight matrices kept in their storage precision: f32, bf16, f16 (as the checkpoint holds them)
//! or q8 (per-block int8, quantised at load). Activations stay f32 and every product accumulates
//! in f32.
//!
//! [`Weights::matmul_nt`] is the one linear-layer entry point:
//! * up to [`GEMV_MAX_ROWS`] activation rows (decode) go through the [`crate::gemv`] kernels,
//!   which read each weight once in its stored form;
//! * more rows (prefill) run a GEMM: f32, bf16 and f16 weights the f32 GEMM over panels of output
//!   rows, each decoded to f32 and transposed into the layout the GEMM packs without gathering
//!   (the temporary is 1 MiB whatever the matrix size); q8 the integer GEMM of [`crate::q8`],
//!   which computes each product exactly as the decode kernel does.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::gemm::{MatRef, Par, gemm_into};
use crate::gemv::{self, Isa};
use crate::q8::{self, Q8_BLOCK, Q8Ref, Q8Rows};
use crate::{DType, Error, Result};

/// Activation rows up to which a product runs as GEMV (weights streamed once for all rows).
pub const GEMV_MAX_ROWS: usize = 4;

/// f32 elements a decoded panel holds at most (1 MiB): enough rows to keep the GEMM efficient.
const PANEL_ELEMS: usize = 256 * 1024;

/// How a matrix is stored in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    BF16,
    F16,
    /// Blocks of 32 int8 along the input dimension with one f16 scale each (GGUF's Q8_0):
    /// 34 bytes per 32 weights.
    Q8,
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::BF16 => "bf16",
            WeightFormat::F16 => "f16",
            WeightFormat::Q8 => "q8",
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a model load keeps its matrices in: the `--weights` flag. Norms, biases and routers are
/// f32 whatever this says (they are small, and routing is sensitive to them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WeightPrecision {
    /// Everything decoded to f32 (4 bytes per parameter; the reference path).
    F32,
    /// As the checkpoint stores it: bf16 stays bf16, f16 stays f16, f32 stays f32.
    #[default]
    Native,
    /// bf16 (f32 and f16 checkpoints are rounded to nearest-even).
    BF16,
    /// Per-block int8, quantised at load.
    Q8,
}

impl WeightPrecision {
    /// The in-memory format of a matrix stored as `stored`.
    pub fn format_for(self, stored: DType) -> WeightFormat {
        match self {
            WeightPrecision::F32 => WeightFormat::F32,
            WeightPrecision::BF16 => WeightFormat::BF16,
            WeightPrecision::Q8 => WeightFormat::Q8,
            WeightPrecision::Native => match stored {
                DType::BF16 => WeightFormat::BF16,
                DType::F16 => WeightFormat::F16,
                _ => WeightFormat::F32,
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightPrecision::F32 => "f32",
            WeightPrecision::Native => "native",
            WeightPrecision::BF16 => "bf16",
            WeightPrecision::Q8 => "q8",
        }
    }
}

impl fmt::Display for WeightPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightPrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "f32" => WeightPrecision::F32,
            "native" => WeightPrecision::Native,
            "bf16" => WeightPrecision::BF16,
            "q8" => WeightPrecision::Q8,
            other => {
                return Err(format!(
                    "unknown weight precision {other:?}: expected f32, native, bf16 or q8"
                ));
            }
        })
    }
}

#[derive(Clone, PartialEq)]
enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    Q8 {
        /// `rows · blocks · 32`, each row's last block zero-padded; `q + 128` as u8, interleaved
        /// as [`crate::q8`] describes.
        quants: Vec<u8>,
        /// `rows · blocks`.
        scales: Vec<f16>,
    },
}

/// A `[rows, cols]` row-major matrix (HF's `[out_features, in_features]`) in one of the
/// [`WeightFormat`]s.
#[derive(Clone, PartialEq)]
///
/// Cloning is cheap: the values are shared (a model version that differs from another only in
/// some experts shares every other matrix with it).
pub struct Weights {
    rows: usize,
    cols: usize,
    data: Arc<Storage>,
}

impl fmt::Debug for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Weights({}x{} {})", self.rows, self.cols, self.format())
    }
}

fn count_error(op: &'static str, rows: usize, cols: usize, got: usize) -> Error {
    Error::InvalidArgument {
        op,
        msg: format!(
            "a {rows}x{cols} matrix needs {} elements, got {got}",
            rows * cols
        ),
    }
}

impl Weights {
    /// An f32 matrix.
    pub fn from_f32(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(count_error("weights", rows, cols, data.len()));
        }
        Ok(Self {
            rows,
            cols,
            data: Arc::new(Storage::F32(data)),
        })
    }

    /// f32 values stored as `format` (rounding to bf16/f16 nearest-even, or quantising to q8).
    pub fn from_f32_as(
        data: Vec<f32>,
        rows: usize,
        cols: usize,
        format: WeightFormat,
    ) -> Result<Self> {
        Self::from_f32(data, rows, cols)?.into_format(format)
    }

    /// A matrix from little-endian checkpoint bytes of `dtype`, kept as `format`. bf16 → bf16
    /// and f16 → f16 copy the bits and never go through f32.
    pub fn from_le_bytes(
        dtype: DType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
        format: WeightFormat,
    ) -> Result<Self> {
        let n = rows * cols;
        if bytes.len() != n * dtype.size_in_bytes() {
            return Err(count_error(
                "weights",
                rows,
                cols,
                bytes.len() / dtype.size_in_bytes().max(1),
            ));
        }
        let bits = || -> Vec<u16> {
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        let data = match (dtype, format) {
            (DType::BF16, WeightFormat::BF16) => {
                Storage::BF16(bits().into_iter().map(bf16::from_bits).collect())
            }
            (DType::F16, WeightFormat::F16) => {
                Storage::F16(bits().into_iter().map(f16::from_bits).collect())
            }
            _ => {
                let mut f = Vec::new();
                crate::dtype::extend_f32_from_le_bytes(dtype, bytes, &mut f)?;
                return Self::from_f32_as(f, rows, cols, format);
            }
        };
        Ok(Self {
            rows,
            cols,
            data: Arc::new(data),
        })
    }

    fn shared(rows: usize, cols: usize, data: Arc<Storage>) -> Self {
        Self { rows, cols, data }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> WeightFormat {
        match *self.data {
            Storage::F32(_) => WeightFormat::F32,
            Storage::BF16(_) => WeightFormat::BF16,
            Storage::F16(_) => WeightFormat::F16,
            Storage::Q8 { .. } => WeightFormat::Q8,
        }
    }

    fn blocks(&self) -> usize {
        self.cols.div_ceil(Q8_BLOCK)
    }

    /// Bytes this matrix occupies in memory.
    pub fn bytes(&self) -> usize {
        match &*self.data {
            Storage::F32(v) => v.len() * 4,
            Storage::BF16(v) => v.len() * 2,
            Storage::F16(v) => v.len() * 2,
            Storage::Q8 { quants, scales } => quants.len() + scales.len() * 2,
        }
    }

    /// The same matrix stored as `format`.
    pub fn into_format(self, format: WeightFormat) -> Result<Self> {
        if self.format() == format {
            return Ok(self);
        }
        let (rows, cols) = (self.rows, self.cols);
        let f = match Arc::try_unwrap(self.data) {
            Ok(Storage::F32(v)) => v,
            Ok(other) => Self::shared(rows, cols, Arc::new(other))
                .to_f32()
                .into_owned(),
            Err(shared) => Self::shared(rows, cols, shared).to_f32().into_owned(),
        };
        let data = match format {
            WeightFormat::F32 => Storage::F32(f),
            WeightFormat::BF16 => Storage::BF16(f.iter().map(|&x| bf16::from_f32(x)).collect()),
            WeightFormat::F16 => Storage::F16(f.iter().map(|&x| f16::from_f32(x)).collect()),
            WeightFormat::Q8 => {
                let (quants, scales) = q8::quantize_weights(&f, rows, cols);
                Storage::Q8 { quants, scales }
            }
        };
        Ok(Self {
            rows,
            cols,
            data: Arc::new(data),
        })
    }

    /// Decodes rows `start..end` into `out` (`(end − start) · cols` values).
    pub fn decode_rows(&self, start: usize, end: usize, out: &mut [f32]) -> Result<()> {
        if start > end || end > self.rows || out.len() != (end - start) * self.cols {
            return Err(Error::InvalidArgument {
                op: "decode_rows",
                msg: format!(
                    "rows {start}..{end} of {} into {} values (row width {})",
                    self.rows,
                    out.len(),
                    self.cols
                ),
            });
        }
        let (a, b) = (start * self.cols, end * self.cols);
        match &*self.data {
            Storage::F32(v) => out.copy_from_slice(&v[a..b]),
            Storage::BF16(v) => crate::simd::bf16_to_f32(&v[a..b], out),
            Storage::F16(v) => {
                for (o, &x) in out.iter_mut().zip(&v[a..b]) {
                    *o = x.to_f32();
                }
            }
            Storage::Q8 { quants, scales } => {
                let blocks = self.blocks();
                let width = blocks * Q8_BLOCK;
                for (i, orow) in out.chunks_mut(self.cols.max(1)).enumerate() {
                    let r = start + i;
                    let q = &quants[r * width..(r + 1) * width];
                    let d = &scales[r * blocks..(r + 1) * blocks];
                    for (c, o) in orow.iter_mut().enumerate() {
                        let v = q8::unbias(q[q8::packed_index(blocks, c)]);
                        *o = v as f32 * d[c / Q8_BLOCK].to_f32();
                    }
                }
            }
        }
        Ok(())
    }

    /// The whole matrix as f32 (borrowed when it is stored as f32).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match &*self.data {
            Storage::F32(v) => Cow::Borrowed(v),
            _ => {
                let mut out = vec![0f32; self.rows * self.cols];
                // The full range is always valid.
                let _ = self.decode_rows(0, self.rows, &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Matrices with the same column count and format stacked row-wise (fused QKV, gate/up).
    pub fn concat_rows(parts: Vec<Weights>) -> Result<Weights> {
        let Some(first) = parts.first() else {
            return Err(Error::InvalidArgument {
                op: "concat_rows",
                msg: "no matrices".into(),
            });
        };
        let (cols, format) = (first.cols, first.format());
        if let Some(bad) = parts
            .iter()
            .find(|p| p.cols != cols || p.format() != format)
        {
            return Err(Error::InvalidArgument {
                op: "concat_rows",
                msg: format!("{bad:?} cannot be stacked under {first:?}"),
            });
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut it = parts.into_iter();
        let Some(Weights { data: acc, .. }) = it.next() else {
            unreachable!("checked non-empty above")
        };
        let mut acc = Arc::unwrap_or_clone(acc);
        for p in it {
            match (&mut acc, Arc::unwrap_or_clone(p.data)) {
                (Storage::F32(a), Storage::F32(b)) => a.extend(b),
                (Storage::BF16(a), Storage::BF16(b)) => a.extend(b),
                (Storage::F16(a), Storage::F16(b)) => a.extend(b),
                (
                    Storage::Q8 { quants, scales },
                    Storage::Q8 {
                        quants: q,
                        scales: s,
                    },
                ) => {
                    quants.extend(q);
                    scales.extend(s);
                }
                _ => unreachable!("formats checked equal above"),
            }
        }
        Ok(Weights {
            rows,
            cols,
            data: Arc::new(acc),
        })
    }

    /// `x[m × cols] · selfᵀ → [m × rows]`: a linear layer without bias.
    pub fn matmul_nt(&self, x: &[f32], m: usize, par: Par) -> Result<Vec<f32>> {
        self.matmul_nt_isa(x, m, par, Isa::detect())
    }

    /// [`Self::matmul_nt`] with the GEMV kernels' instruction set given (tests, benchmarks).
    pub fn matmul_nt_isa(&self, x: &[f32], m: usize, par: Par, isa: Isa) -> Result<Vec<f32>> {
        let (n, k) = (self.rows, self.cols);
        if x.len() != m * k {
            return Err(Error::ShapeMismatch {
                op: "matmul_nt",
                expected: vec![m, k],
                got: vec![x.len()],
            });
        }
        if m == 0 || n == 0 {
            return Ok(vec![0.0; m * n]);
        }
        if m <= GEMV_MAX_ROWS && k > 0 {
            return Ok(self.gemv(x, m, par, isa));
        }
        match &*self.data {
            Storage::Q8 { quants, scales } => {
                let w = Q8Ref {
                    quants,
                    scales,
                    rows: n,
                    blocks: self.blocks(),
                };
                Ok(q8_gemm(isa, w, &Q8Rows::quantize(x, m, k), par))
            }
            _ => {
                let mut out = vec![0f32; m * n];
                let threads = rayon::current_num_threads();
                if par == Par::Rayon && threads > 1 && m >= 16 * threads {
                    // Activation rows split between threads, each decoding its own panels: one
                    // panel's GEMM is too narrow for the GEMM to split well over threads (bf16
                    // prefill ran at 0.63x of f32), and the decode is cheap next to the GEMM.
                    let per = m.div_ceil(threads);
                    out.par_chunks_mut(per * n)
                        .enumerate()
                        .try_for_each(|(c, o)| {
                            let rows = o.len() / n;
                            let xs = &x[c * per * k..(c * per + rows) * k];
                            self.panels_into(xs, rows, o, Par::Serial)
                        })?;
                } else {
                    self.panels_into(x, m, &mut out, par)?;
                }
                Ok(out)
            }
        }
    }

    /// `out[m × rows] = x · selfᵀ` for an f32/bf16/f16 matrix: the f32 GEMM over panels of
    /// weight rows, decoded and transposed one at a time.
    fn panels_into(&self, x: &[f32], m: usize, out: &mut [f32], par: Par) -> Result<()> {
        let (n, k) = (self.rows, self.cols);
        let panel = (PANEL_ELEMS / k.max(1)).clamp(16, n.max(16));
        let mut buf = vec![0f32; panel.min(n) * k];
        let mut start = 0;
        while start < n {
            let end = (start + panel).min(n);
            let wt = &mut buf[..(end - start) * k];
            self.decode_rows_t(start, end, wt);
            gemm_into(
                &mut out[start..],
                n,
                MatRef::row_major(x, m, k),
                MatRef::row_major(wt, k, end - start),
                1.0,
                false,
                par,
            )?;
            start = end;
        }
        Ok(())
    }

    /// Rows `start..end` (checked by the caller) decoded to f32 and transposed: `out[c·p + r]`
    /// is element `(start + r, c)`, `p = end − start`. The GEMM's kernel reads weights along
    /// output rows; handed the row-major panel it gathered them one strided element at a time
    /// when packing (43% of a bf16 prefill profile).
    fn decode_rows_t(&self, start: usize, end: usize, out: &mut [f32]) {
        let (k, p) = (self.cols, end - start);
        let w = start * k..end * k;
        match &*self.data {
            Storage::F32(v) => crate::simd::transpose_to_f32(&v[w], p, k, out),
            Storage::BF16(v) => crate::simd::transpose_to_f32(&v[w], p, k, out),
            Storage::F16(v) => crate::simd::transpose_to_f32(&v[w], p, k, out),
            Storage::Q8 { .. } => {
                let mut rows = vec![0f32; p * k];
                // The range is the caller's, checked.
                let _ = self.decode_rows(start, end, &mut rows);
                crate::simd::transpose_to_f32(&rows, p, k, out);
            }
        }
    }

    /// The GEMV path: output rows split into chunks over the rayon pool when `par` allows and the
    /// matrix is big enough to pay for the fork.
    fn gemv(&self, x: &[f32], m: usize, par: Par, isa: Isa) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        let mut t = vec![0f32; n * m]; // [n, m] column-major blocks
        // Quantised activations for q8, once per call.
        let xq = match &*self.data {
            Storage::Q8 { .. } => Some(Q8Rows::quantize(x, m, k)),
            _ => None,
        };
        let run = |r0: usize, out: &mut [f32]| {
            let r1 = r0 + out.len() / m;
            match &*self.data {
                Storage::F32(w) => gemv::gemv_f32(isa, &w[r0 * k..r1 * k], k, x, m, out),
                Storage::BF16(w) => gemv::gemv_bf16(isa, &w[r0 * k..r1 * k], k, x, m, out),
                Storage::F16(w) => gemv::gemv_f16(isa, &w[r0 * k..r1 * k], k, x, m, out),
                Storage::Q8 { quants, scales } => {
                    let blocks = self.blocks();
                    let width = blocks * Q8_BLOCK;
                    if let Some(a) = &xq {
                        let w = Q8Ref {
                            quants: &quants[r0 * width..r1 * width],
                            scales: &scales[r0 * blocks..r1 * blocks],
                            rows: r1 - r0,
                            blocks,
                        };
                        q8::gemv(isa, w, a, out);
                    }
                }
            }
        };
        let threads = rayon::current_num_threads();
        if par == Par::Rayon && threads > 1 && self.bytes() >= 256 * 1024 {
            // A few chunks per thread for balance; each at least 8 rows.
            let rows_per = n.div_ceil(threads * 4).max(8);
            t.par_chunks_mut(rows_per * m)
                .enumerate()
                .for_each(|(c, out)| run(c * rows_per, out));
        } else {
            run(0, &mut t);
        }
        if m == 1 {
            return t;
        }
        let mut y = vec![0f32; m * n];
        for r in 0..n {
            for i in 0..m {
                y[i * n + r] = t[r * m + i];
            }
        }
        y
    }
}

/// The q8 GEMM `[m, n]` over the rayon pool when `par` allows: activation rows split between
/// threads when there are enough of them, weight rows otherwise (each part into its own buffer).
fn q8_gemm(isa: Isa, w: Q8Ref<'_>, a: &Q8Rows, par: Par) -> Vec<f32> {
    let (m, n) = (a.rows(), w.rows);
    let mut out = vec![0f32; m * n];
    let threads = rayon::current_num_threads();
    let work = m * n * w.blocks * Q8_BLOCK;
    if par == Par::Serial || threads == 1 || work < 1 << 22 {
        q8::gemm(isa, w, a, (0, m), &mut out, n);
    } else if m >= 8 * threads {
        // Chunks of whole 4-row tiles, a few per thread for balance.
        let per = m.div_ceil(threads * 4).next_multiple_of(4);
        out.par_chunks_mut(per * n).enumerate().for_each(|(c, o)| {
            let i0 = c * per;
            q8::gemm(isa, w, a, (i0, i0 + o.len() / n), o, n);
        });
    } else {
        let per = n.div_ceil(threads * 2).max(8);
        let width = w.blocks * Q8_BLOCK;
        let parts: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(per))
            .into_par_iter()
            .map(|c| {
                let (r0, r1) = (c * per, ((c + 1) * per).min(n));
                let part = Q8Ref {
                    quants: &w.quants[r0 * width..r1 * width],
                    scales: &w.scales[r0 * w.blocks..r1 * w.blocks],
                    rows: r1 - r0,
                    blocks: w.blocks,
                };
                let mut o = vec![0f32; m * (r1 - r0)];
                q8::gemm(isa, part, a, (0, m), &mut o, r1 - r0);
                (r0, o)
            })
            .collect();
        for (r0, o) in parts {
            let cols = o.len() / m;
            for i in 0..m {
                out[i * n + r0..i * n + r0 + cols].copy_from_slice(&o[i * cols..(i + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::matmul_nt;
    use crate::testing::XorShift;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = XorShift::new(seed);
        (0..n).map(|_| r.next_signed_unit()).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn every_format_and_row_count_matches_the_f32_product_of_its_decoded_weights() {
        let (n, k) = (300, 1000);
        let w = rand(n * k, 5);
        for format in [
            WeightFormat::F32,
            WeightFormat::BF16,
            WeightFormat::F16,
            WeightFormat::Q8,
        ] {
            let wt = Weights::from_f32_as(w.clone(), n, k, format).unwrap();
            let dec = wt.to_f32().into_owned();
            for m in [1, 2, 4, 5, 33] {
                let x = rand(m * k, 9 + m as u64);
                let want = matmul_nt(&x, m, k, &dec, n, Par::Serial).unwrap();
                for par in [Par::Serial, Par::Rayon] {
                    let got = wt.matmul_nt(&x, m, par).unwrap();
                    let d = max_diff(&got, &want);
                    // q8 also quantises the activations: a quality loss, bounded loosely.
                    let tol = if format == WeightFormat::Q8 {
                        0.5
                    } else {
                        1e-3
                    };
                    assert!(d < tol, "{format} m={m} {par:?}: max diff {d}");
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_product_whatever_the_batch_size() {
        // Decode (GEMV) and prefill (GEMM) paths must agree, or a distributed run that splits a
        // batch differently would not reproduce the single-process one.
        let (n, k) = (70, 200);
        let w = rand(n * k, 8);
        let x = rand(9 * k, 4);
        for format in [
            WeightFormat::F32,
            WeightFormat::BF16,
            WeightFormat::F16,
            WeightFormat::Q8,
        ] {
            let wt = Weights::from_f32_as(w.clone(), n, k, format).unwrap();
            let batch = wt.matmul_nt(&x, 9, Par::Serial).unwrap();
            for r in 0..9 {
                let one = wt
                    .matmul_nt(&x[r * k..(r + 1) * k], 1, Par::Serial)
                    .unwrap();
                let d = max_diff(&one, &batch[r * n..(r + 1) * n]);
                assert!(d < 1e-4, "{format} row {r}: {d}");
                if format == WeightFormat::Q8 {
                    // The q8 GEMM computes each product exactly as the decode kernel does.
                    assert_eq!(one, batch[r * n..(r + 1) * n], "q8 row {r}");
                }
            }
        }
    }

    #[test]
    fn q8_gemm_splits_give_the_serial_product() {
        // Enough work to go parallel: few rows split the weight rows between threads, many rows
        // split the activation rows. Either way every product is the serial one, bit for bit.
        let pool = crate::testing::thread_pool(2);
        let (n, k) = (1000, 1024);
        let wt = Weights::from_f32_as(rand(n * k, 3), n, k, WeightFormat::Q8).unwrap();
        for m in [9, 40] {
            let x = rand(m * k, 4 + m as u64);
            let serial = wt.matmul_nt(&x, m, Par::Serial).unwrap();
            let par = pool.install(|| wt.matmul_nt(&x, m, Par::Rayon)).unwrap();
            assert_eq!(serial, par, "m={m}");
        }
    }

    #[test]
    fn storage_bytes_per_parameter() {
        let (n, k) = (64, 1024);
        let w = rand(n * k, 1);
        let per =
            |f| Weights::from_f32_as(w.clone(), n, k, f).unwrap().bytes() as f64 / (n * k) as f64;
        assert_eq!(per(WeightFormat::F32), 4.0);
        assert_eq!(per(WeightFormat::BF16), 2.0);
        assert_eq!(per(WeightFormat::F16), 2.0);
        assert_eq!(per(WeightFormat::Q8), 34.0 / 32.0);
    }

    #[test]
    fn bf16_bytes_are_kept_bit_for_bit() {
        let vals: Vec<f32> = rand(6, 2);
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let w = Weights::from_le_bytes(DType::BF16, &bytes, 2, 3, WeightFormat::BF16).unwrap();
        assert_eq!(w.format(), WeightFormat::BF16);
        let up = Weights::from_le_bytes(DType::BF16, &bytes, 2, 3, WeightFormat::F32).unwrap();
        assert_eq!(w.to_f32(), up.to_f32());
        assert!(
            Weights::from_le_bytes(DType::BF16, &bytes[1..], 2, 3, WeightFormat::BF16).is_err()
        );
    }

    #[test]
    fn concat_keeps_rows_and_refuses_mixed_formats() {
        let a = Weights::from_f32_as(rand(2 * 40, 1), 2, 40, WeightFormat::Q8).unwrap();
        let b = Weights::from_f32_as(rand(3 * 40, 2), 3, 40, WeightFormat::Q8).unwrap();
        let c = Weights::concat_rows(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!((c.rows(), c.cols()), (5, 40));
        let dc = c.to_f32();
        assert_eq!(&dc[..80], &a.to_f32()[..]);
        assert_eq!(&dc[80..], &b.to_f32()[..]);
        let f = Weights::from_f32(rand(40, 3), 1, 40).unwrap();
        assert!(Weights::concat_rows(vec![a, f]).is_err());
    }

    #[test]
    fn precision_names_round_trip() {
        for p in [
            WeightPrecision::F32,
            WeightPrecision::Native,
            WeightPrecision::BF16,
            WeightPrecision::Q8,
        ] {
            assert_eq!(p.name().parse::<WeightPrecision>().unwrap(), p);
        }
        assert!(
            "int4"
                .parse::<WeightPrecision>()
                .unwrap_err()
                .contains("int4")
        );
        assert_eq!(
            WeightPrecision::Native.format_for(DType::BF16),
            WeightFormat::BF16
        );
        assert_eq!(
            WeightPrecision::Native.format_for(DType::F32),
            WeightFormat::F32
        );
    }
}
