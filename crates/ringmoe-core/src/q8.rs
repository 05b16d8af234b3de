//! The q8 weight format and its kernels, shared by decode (a few activation rows) and prefill (a
//! GEMM): blocks of [`Q8_BLOCK`] int8 values with one f16 scale each (GGUF's Q8_0 values),
//! multiplied against activations quantised the same way per call. A product is the sum over
//! blocks of `(integer block dot) · d_w · d_x` (llama.cpp's `q8_0 · q8_0`).
//!
//! # Layout
//!
//! A row's blocks are taken [`GROUP`] (16) at a time. Inside a group of `len` blocks the bytes are
//! interleaved by 4-byte words: byte `e` of word `s` (0..8) of block `l` sits at
//! `s·len·4 + l·4 + e` of the group. One 64-byte load at step `s` then holds word `s` of all 16
//! blocks, and a 4-way byte dot product (`vpdpbusd`) adds each block's word into that block's own
//! 32-bit lane: after 8 steps lane `l` holds block `l`'s exact integer sum, with no horizontal
//! reduction per block. The 16 sums are then scaled together (a convert, a multiply, an FMA). A
//! 512-value group costs 8 dot-product instructions and 3 float ones per (activation row, weight
//! row) pair, where the f32 GEMM spends 32 FMAs.
//!
//! Weights are stored biased, `q + 128` as u8, because `vpdpbusd` multiplies unsigned by signed
//! bytes. The bias is removed exactly: each lane starts at `−128 · Σ x` of its activation block,
//! computed when the activations are quantised. The last group of a row may hold fewer than 16
//! blocks (its loads are masked), so no row is padded beyond its last block.
//!
//! # Exactness
//!
//! Every variant computes each (activation row, weight row) product with one fixed sequence of
//! operations, whatever the tile it is part of, so a decode step (one row) and a prefill (a GEMM
//! over many) give bit-identical products on the same instruction set. Across instruction sets the
//! integer block sums are identical and only the f32 summation order differs.
//!
//! # Variants
//!
//! AVX-512 VNNI (`vpdpbusd`), AVX-512 BW (the bias removed from the weights, then
//! `vpmaddubsw`/`vpmaddwd`), AVX2 (the same in two 256-bit halves) and a portable loop, chosen at
//! run time by [`Isa::detect`]; tests run every variant the machine has against an integer
//! reference.

use half::f16;
use rayon::prelude::*;

use crate::gemv::Isa;

/// Values per q8 block (and its one scale).
pub const Q8_BLOCK: usize = 32;

/// Blocks per interleaved group: one 32-bit lane each in a 512-bit vector.
pub const GROUP: usize = 16;

/// Activation rows per GEMM tile.
const MR: usize = 4;

/// Activation and weight rows per cache block of the GEMM.
const IB: usize = 64;
const JB: usize = 64;

/// Quantises one row to linear (not interleaved) q8 blocks: `q = round(v / d)` (to nearest, ties
/// to even) with `d = max|v| / 127` per block, as GGUF's Q8_0 (which rounds ties away from zero).
/// `q` gets `blocks · 32` values (the tail zero-padded), `d` one scale per block.
pub fn quantize_row_q8(v: &[f32], q: &mut [i8], d: &mut [f32]) {
    for (b, (qb, db)) in q.chunks_mut(Q8_BLOCK).zip(d.iter_mut()).enumerate() {
        let src = v.get(b * Q8_BLOCK..).unwrap_or(&[]);
        let src = &src[..src.len().min(Q8_BLOCK)];
        let amax = src.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        *db = scale;
        // Round to nearest (ties to even) by the 1.5·2^23 trick, which vectorises where libm's
        // `roundf` is a call per element; |x · inv| ≤ 127 keeps it exact.
        const MAGIC: f32 = 12_582_912.0;
        let (head, pad) = qb.split_at_mut(src.len());
        for (qv, &x) in head.iter_mut().zip(src) {
            *qv = ((x * inv + MAGIC) - MAGIC) as i8;
        }
        pad.fill(0);
    }
}

/// Where value `c` of a row of `blocks` blocks lives in the interleaved layout.
#[inline]
pub fn packed_index(blocks: usize, c: usize) -> usize {
    let b = c / Q8_BLOCK;
    let g0 = b / GROUP * GROUP;
    let len = (blocks - g0).min(GROUP);
    let w = c % Q8_BLOCK;
    g0 * Q8_BLOCK + (w / 4) * len * 4 + (b - g0) * 4 + w % 4
}

/// Interleaves one row of linear q8 values (`blocks · 32`) into `out`, mapping each value.
fn pack_row<T: Copy>(lin: &[i8], blocks: usize, out: &mut [T], map: impl Fn(i8) -> T) {
    for g0 in (0..blocks).step_by(GROUP) {
        let len = (blocks - g0).min(GROUP);
        let base = g0 * Q8_BLOCK;
        for l in 0..len {
            for s in 0..Q8_BLOCK / 4 {
                let src = &lin[base + l * Q8_BLOCK + s * 4..][..4];
                let dst = &mut out[base + s * len * 4 + l * 4..][..4];
                for (o, &v) in dst.iter_mut().zip(src) {
                    *o = map(v);
                }
            }
        }
    }
}

/// A biased, interleaved weight value back to its int8.
#[inline]
pub fn unbias(u: u8) -> i8 {
    (u ^ 0x80) as i8
}

/// Quantises a `[rows, cols]` f32 matrix to stored q8: `quants` (`rows · blocks · 32` biased
/// bytes, interleaved) and `scales` (`rows · blocks` f16).
pub fn quantize_weights(f: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<f16>) {
    let blocks = cols.div_ceil(Q8_BLOCK);
    let width = blocks * Q8_BLOCK;
    let mut quants = vec![0u8; rows * width];
    let mut scales = vec![f16::ZERO; rows * blocks];
    quants
        .par_chunks_mut(width.max(1))
        .zip(scales.par_chunks_mut(blocks.max(1)))
        .enumerate()
        .for_each_init(
            || (vec![0i8; width], vec![0f32; blocks]),
            |(lin, d), (r, (qrow, srow))| {
                quantize_row_q8(&f[r * cols..(r + 1) * cols], lin, d);
                pack_row(lin, blocks, qrow, |v| (v as u8) ^ 0x80);
                for (s, &v) in srow.iter_mut().zip(d.iter()) {
                    *s = f16::from_f32(v);
                }
            },
        );
    (quants, scales)
}

/// Activation rows quantised for one product: interleaved int8 values, per-block scales and the
/// per-block bias corrections, the last two padded to whole groups with zeros.
#[derive(Debug, Clone)]
pub struct Q8Rows {
    rows: usize,
    blocks: usize,
    /// `rows · blocks · 32`, interleaved as the weights.
    q: Vec<i8>,
    /// `rows · lanes` scales.
    d: Vec<f32>,
    /// `rows · lanes`: `−128 · Σ q` of each block.
    neg_bias: Vec<i32>,
}

impl Q8Rows {
    /// Quantises `rows` rows of `cols` values each.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(x.len(), rows * cols, "q8 activations: {rows}x{cols}");
        let blocks = cols.div_ceil(Q8_BLOCK);
        let width = blocks * Q8_BLOCK;
        let lanes = blocks.div_ceil(GROUP) * GROUP;
        let mut q = vec![0i8; rows * width];
        let mut d = vec![0f32; rows * lanes];
        let mut neg_bias = vec![0i32; rows * lanes];
        let one =
            |r: usize, lin: &mut Vec<i8>, (qr, dr, nr): (&mut [i8], &mut [f32], &mut [i32])| {
                quantize_row_q8(&x[r * cols..(r + 1) * cols], lin, &mut dr[..blocks]);
                for (n, b) in nr.iter_mut().zip(lin.chunks(Q8_BLOCK)) {
                    *n = -128 * b.iter().map(|&v| v as i32).sum::<i32>();
                }
                pack_row(lin, blocks, qr, |v| v);
            };
        if rows >= 64 && width > 0 {
            q.par_chunks_mut(width)
                .zip(d.par_chunks_mut(lanes))
                .zip(neg_bias.par_chunks_mut(lanes))
                .enumerate()
                .for_each_init(
                    || vec![0i8; width],
                    |lin, (r, ((qr, dr), nr))| one(r, lin, (qr, dr, nr)),
                );
        } else if width > 0 {
            let mut lin = vec![0i8; width];
            for (r, ((qr, dr), nr)) in q
                .chunks_mut(width)
                .zip(d.chunks_mut(lanes))
                .zip(neg_bias.chunks_mut(lanes))
                .enumerate()
            {
                one(r, &mut lin, (qr, dr, nr));
            }
        }
        Self {
            rows,
            blocks,
            q,
            d,
            neg_bias,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }

    fn lanes(&self) -> usize {
        self.blocks.div_ceil(GROUP) * GROUP
    }

    fn width(&self) -> usize {
        self.blocks * Q8_BLOCK
    }
}

/// The weight side of a product: `rows` rows of `blocks` blocks.
#[derive(Clone, Copy)]
pub struct Q8Ref<'a> {
    pub quants: &'a [u8],
    pub scales: &'a [f16],
    pub rows: usize,
    pub blocks: usize,
}

impl Q8Ref<'_> {
    fn check(&self, a: &Q8Rows) {
        assert!(
            self.blocks == a.blocks
                && self.quants.len() >= self.rows * self.blocks * Q8_BLOCK
                && self.scales.len() >= self.rows * self.blocks,
            "q8 product: {} weight rows of {} blocks ({} bytes, {} scales) against activations of {} blocks",
            self.rows,
            self.blocks,
            self.quants.len(),
            self.scales.len(),
            a.blocks
        );
    }
}

/// Where a tile's results go: `out[(j − j0)·sj + (i − i0)·si]`.
struct Dst<'o> {
    out: &'o mut [f32],
    sj: usize,
    si: usize,
}

/// The portable kernel: every product alone, in the lane order of the vector kernels.
fn run_portable<const M: usize, const N: usize>(
    w: Q8Ref<'_>,
    j0: usize,
    j1: usize,
    a: &Q8Rows,
    i0: usize,
    dst: &mut Dst<'_>,
) {
    let (blocks, width, lanes) = (a.blocks, a.width(), a.lanes());
    for j in j0..j1 {
        for i in 0..M {
            let (wrow, xrow) = (
                &w.quants[j * width..(j + 1) * width],
                &a.q[(i0 + i) * width..(i0 + i + 1) * width],
            );
            let mut acc = [0f32; GROUP];
            for g0 in (0..blocks).step_by(GROUP) {
                let len = (blocks - g0).min(GROUP);
                let base = g0 * Q8_BLOCK;
                for (l, a_l) in acc.iter_mut().enumerate().take(len) {
                    let mut s = 0i32;
                    for st in 0..Q8_BLOCK / 4 {
                        let at = base + st * len * 4 + l * 4;
                        for e in 0..4 {
                            s += unbias(wrow[at + e]) as i32 * xrow[at + e] as i32;
                        }
                    }
                    let sc =
                        w.scales[j * blocks + g0 + l].to_f32() * a.d[(i0 + i) * lanes + g0 + l];
                    *a_l += s as f32 * sc;
                }
            }
            dst.out[(j - j0) * dst.sj + i * dst.si] = acc.iter().sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Dst, GROUP, Q8_BLOCK, Q8Ref, Q8Rows};
    use crate::gemv::x86::hsum256;
    use std::arch::x86_64::*;

    /// A mask of the first `n` bytes.
    #[inline]
    fn byte_mask(n: usize) -> u64 {
        if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
    }

    /// One step's 64 bytes of a group of `len` blocks: a plain load for a whole group, a masked
    /// one (the first `4·len` bytes, the rest zero) only for a short last group. Masked byte loads
    /// cost far more than plain ones on Zen 5: with them on every step the decode GEMV read
    /// 16 GB/s on one core, with plain loads 25 GB/s (`examples/gemv_bandwidth.rs`).
    ///
    /// # Safety
    /// `4·len` bytes readable at `p`, and 64 when `len == GROUP`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    unsafe fn load_step<T>(p: *const T, len: usize) -> __m512i {
        // SAFETY: as the caller guarantees.
        unsafe {
            if len == GROUP {
                _mm512_loadu_si512(p.cast())
            } else {
                _mm512_maskz_loadu_epi8(byte_mask(4 * len), p.cast())
            }
        }
    }

    /// Scales one group's integer block sums (`sums[n][i]`: weight row `j + n`, activation row
    /// `i0 + i`) by their blocks' scale products and adds them to the float accumulators.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and F16C; the rows and group as in the callers' checks.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scale512<const M: usize, const N: usize>(
        acc: &mut [[__m512; M]; N],
        sums: &[[__m512i; M]; N],
        w: Q8Ref<'_>,
        j: usize,
        a: &Q8Rows,
        i0: usize,
        g0: usize,
        sm: __mmask16,
    ) {
        let lanes = a.lanes();
        for (n, (accs, sum)) in acc.iter_mut().zip(sums).enumerate() {
            // SAFETY: row j + n's scales of this group (masked to the group's blocks) and each
            // activation row's padded scales, inside the checked buffers.
            unsafe {
                let p = w.scales.as_ptr().add((j + n) * w.blocks + g0);
                let h = if sm == u16::MAX {
                    _mm256_loadu_si256(p.cast())
                } else {
                    _mm256_maskz_loadu_epi16(sm, p.cast())
                };
                let dw = _mm512_cvtph_ps(h);
                for (i, (f, s)) in accs.iter_mut().zip(sum).enumerate() {
                    let dx = _mm512_loadu_ps(a.d.as_ptr().add((i0 + i) * lanes + g0));
                    *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*s), _mm512_mul_ps(dw, dx), *f);
                }
            }
        }
    }

    /// Each accumulator's lanes summed into `dst` (weight rows from `row` on).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
    #[inline]
    fn store512<const M: usize, const N: usize>(
        acc: &[[__m512; M]; N],
        dst: &mut Dst<'_>,
        row: usize,
    ) {
        for (n, accs) in acc.iter().enumerate() {
            for (i, v) in accs.iter().enumerate() {
                dst.out[(row + n) * dst.sj + i * dst.si] = _mm512_reduce_add_ps(*v);
            }
        }
    }

    /// Weight rows `j0..j1` (stepping `N`; the caller passes a multiple of `N`) against activation
    /// rows `i0..i0 + M`, AVX-512 with VNNI (`vpdpbusd`).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL and VNNI; `w` and `a` must have been checked by
    /// [`Q8Ref::check`], with `j1 ≤ w.rows`, `i0 + M ≤ a.rows`, and `dst` large enough.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    // Tiles index accumulators by (weight row, activation row) in both loop orders.
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn run_vnni<const M: usize, const N: usize>(
        w: Q8Ref<'_>,
        j0: usize,
        j1: usize,
        a: &Q8Rows,
        i0: usize,
        dst: &mut Dst<'_>,
    ) {
        let (blocks, width, lanes) = (a.blocks, a.width(), a.lanes());
        let (wq, xq) = (w.quants.as_ptr(), a.q.as_ptr());
        let mut j = j0;
        while j + N <= j1 {
            let mut acc = [[_mm512_setzero_ps(); M]; N];
            let mut g0 = 0;
            while g0 < blocks {
                let len = (blocks - g0).min(GROUP);
                let sm = ((1u32 << len) - 1) as __mmask16;
                let base = g0 * Q8_BLOCK;
                // SAFETY (this block): every load reads inside a row of `wq`, `xq`, `a.d`,
                // `a.neg_bias` or `w.scales`, as checked by the caller; masked loads touch only
                // the bytes of this group (a shorter last group is masked).
                unsafe {
                    let mut sums = [[_mm512_setzero_si512(); M]; N];
                    for i in 0..M {
                        let nb = _mm512_loadu_si512(
                            a.neg_bias.as_ptr().add((i0 + i) * lanes + g0).cast(),
                        );
                        for s in sums.iter_mut() {
                            s[i] = nb;
                        }
                    }
                    for st in 0..Q8_BLOCK / 4 {
                        let off = base + st * len * 4;
                        let mut wv = [_mm512_setzero_si512(); N];
                        for (n, v) in wv.iter_mut().enumerate() {
                            *v = load_step(wq.add((j + n) * width + off), len);
                        }
                        for i in 0..M {
                            let xv = load_step(xq.add((i0 + i) * width + off), len);
                            for n in 0..N {
                                sums[n][i] = _mm512_dpbusd_epi32(sums[n][i], wv[n], xv);
                            }
                        }
                    }
                    scale512(&mut acc, &sums, w, j, a, i0, g0, sm);
                }
                g0 += len;
            }
            store512(&acc, dst, j - j0);
            j += N;
        }
    }

    /// As [`run_vnni`] without VNNI: the weights are unbiased, `|x|` times `w` with `x`'s sign
    /// through `vpmaddubsw` (no saturation: |x|, |w| ≤ 127) and `vpmaddwd`.
    ///
    /// # Safety
    /// As [`run_vnni`], for AVX-512 F/BW/VL.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
    // Tiles index accumulators by (weight row, activation row) in both loop orders.
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn run_bw<const M: usize, const N: usize>(
        w: Q8Ref<'_>,
        j0: usize,
        j1: usize,
        a: &Q8Rows,
        i0: usize,
        dst: &mut Dst<'_>,
    ) {
        let (blocks, width) = (a.blocks, a.width());
        let (wq, xq) = (w.quants.as_ptr(), a.q.as_ptr());
        let (bias, ones) = (_mm512_set1_epi8(-128), _mm512_set1_epi16(1));
        let mut j = j0;
        while j + N <= j1 {
            let mut acc = [[_mm512_setzero_ps(); M]; N];
            let mut g0 = 0;
            while g0 < blocks {
                let len = (blocks - g0).min(GROUP);
                let sm = ((1u32 << len) - 1) as __mmask16;
                let base = g0 * Q8_BLOCK;
                // SAFETY: as in `run_vnni`.
                unsafe {
                    let mut sums = [[_mm512_setzero_si512(); M]; N];
                    for st in 0..Q8_BLOCK / 4 {
                        let off = base + st * len * 4;
                        let mut wv = [_mm512_setzero_si512(); N];
                        for (n, v) in wv.iter_mut().enumerate() {
                            let u = load_step(wq.add((j + n) * width + off), len);
                            // Masked-off bytes become −128 here, against x = 0: no contribution.
                            *v = _mm512_xor_si512(u, bias);
                        }
                        for i in 0..M {
                            let xv = load_step(xq.add((i0 + i) * width + off), len);
                            let (xa, xn) = (_mm512_abs_epi8(xv), _mm512_movepi8_mask(xv));
                            for n in 0..N {
                                let sw =
                                    _mm512_mask_sub_epi8(wv[n], xn, _mm512_setzero_si512(), wv[n]);
                                let p = _mm512_madd_epi16(_mm512_maddubs_epi16(xa, sw), ones);
                                sums[n][i] = _mm512_add_epi32(sums[n][i], p);
                            }
                        }
                    }
                    scale512(&mut acc, &sums, w, j, a, i0, g0, sm);
                }
                g0 += len;
            }
            store512(&acc, dst, j - j0);
            j += N;
        }
    }

    /// A 256-bit lane mask of the first `n` (0..=8) 32-bit lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn lane_mask(n: usize) -> __m256i {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
    }

    /// As [`run_bw`] in two 256-bit halves per group (blocks 0–7, then 8–15).
    ///
    /// # Safety
    /// As [`run_vnni`], for AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    // Tiles index accumulators by (weight row, activation row) in both loop orders.
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn run_avx2<const M: usize, const N: usize>(
        w: Q8Ref<'_>,
        j0: usize,
        j1: usize,
        a: &Q8Rows,
        i0: usize,
        dst: &mut Dst<'_>,
    ) {
        let (blocks, width, lanes) = (a.blocks, a.width(), a.lanes());
        let (wq, xq) = (w.quants.as_ptr(), a.q.as_ptr());
        let (bias, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
        let mut j = j0;
        while j + N <= j1 {
            let mut acc = [[_mm256_setzero_ps(); M]; N];
            let mut g0 = 0;
            while g0 < blocks {
                let len = (blocks - g0).min(GROUP);
                let base = g0 * Q8_BLOCK;
                for h in 0..2 {
                    let nl = len.saturating_sub(8 * h).min(8);
                    if nl == 0 {
                        break;
                    }
                    let lm = lane_mask(nl);
                    // Whole halves load plainly, a short one lane-masked.
                    let load = |p: *const i32| {
                        // SAFETY: `p` is a step's half inside a row (see below); a short half
                        // reads only its lanes.
                        unsafe {
                            if nl == 8 {
                                _mm256_loadu_si256(p.cast())
                            } else {
                                _mm256_maskload_epi32(p, lm)
                            }
                        }
                    };
                    // SAFETY: as in `run_vnni`; `vpmaskmovd` reads only the lanes of this half
                    // that hold blocks.
                    unsafe {
                        let mut sums = [[_mm256_setzero_si256(); M]; N];
                        for st in 0..Q8_BLOCK / 4 {
                            let off = base + st * len * 4 + h * 32;
                            let mut wv = [_mm256_setzero_si256(); N];
                            for (n, v) in wv.iter_mut().enumerate() {
                                let u = load(wq.add((j + n) * width + off).cast());
                                *v = _mm256_xor_si256(u, bias);
                            }
                            for i in 0..M {
                                let xv = load(xq.add((i0 + i) * width + off).cast());
                                let xa = _mm256_sign_epi8(xv, xv);
                                for n in 0..N {
                                    let sw = _mm256_sign_epi8(wv[n], xv);
                                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(xa, sw), ones);
                                    sums[n][i] = _mm256_add_epi32(sums[n][i], p);
                                }
                            }
                        }
                        for n in 0..N {
                            let mut sc = [f16::ZERO; 8];
                            let at = (j + n) * w.blocks + g0 + 8 * h;
                            sc[..nl].copy_from_slice(&w.scales[at..at + nl]);
                            let dw = _mm256_cvtph_ps(_mm_loadu_si128(sc.as_ptr().cast()));
                            for i in 0..M {
                                let dx = _mm256_loadu_ps(
                                    a.d.as_ptr().add((i0 + i) * lanes + g0 + 8 * h),
                                );
                                acc[n][i] = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(sums[n][i]),
                                    _mm256_mul_ps(dw, dx),
                                    acc[n][i],
                                );
                            }
                        }
                    }
                }
                g0 += len;
            }
            for (n, row) in acc.iter().enumerate() {
                for (i, v) in row.iter().enumerate() {
                    dst.out[(j + n - j0) * dst.sj + i * dst.si] = hsum256(*v);
                }
            }
            j += N;
        }
    }

    use half::f16;
}

/// Weight rows `j0..j1` against activation rows `i0..i0 + m` (`m` ≤ [`MR`]) with tiles of `N`
/// weight rows (the rows past the last whole tile one at a time).
fn run<const N: usize>(
    isa: Isa,
    w: Q8Ref<'_>,
    (j0, j1): (usize, usize),
    a: &Q8Rows,
    (i0, m): (usize, usize),
    dst: &mut Dst<'_>,
) {
    let whole = j0 + (j1 - j0) / N * N;
    macro_rules! go {
        ($f:ident) => {{
            macro_rules! by_m {
                ($n:tt, $lo:expr, $hi:expr, $d:expr) => {
                    match m {
                        1 => $f::<1, $n>(w, $lo, $hi, a, i0, $d),
                        2 => $f::<2, $n>(w, $lo, $hi, a, i0, $d),
                        3 => $f::<3, $n>(w, $lo, $hi, a, i0, $d),
                        _ => $f::<4, $n>(w, $lo, $hi, a, i0, $d),
                    }
                };
            }
            by_m!(N, j0, whole, dst);
            if whole < j1 {
                let (sj, si) = (dst.sj, dst.si);
                let mut rest = Dst {
                    out: &mut dst.out[(whole - j0) * sj..],
                    sj,
                    si,
                };
                by_m!(1, whole, j1, &mut rest);
            }
        }};
    }
    #[cfg(target_arch = "x86_64")]
    {
        use x86::{run_avx2, run_bw, run_vnni};
        match isa {
            // SAFETY: `Isa::Avx512Vnni` comes from `Isa::detect`/`available`, which checked the
            // CPU's features; the caller checked the shapes (`Q8Ref::check`) and ranges.
            Isa::Avx512Vnni => return unsafe { go!(run_vnni) },
            // SAFETY: as above, for AVX-512 F/BW/DQ/VL.
            Isa::Avx512 => return unsafe { go!(run_bw) },
            // SAFETY: as above, for AVX2, FMA and F16C.
            Isa::Avx2 => return unsafe { go!(run_avx2) },
            Isa::Portable => {}
        }
    }
    let _ = isa;
    go!(run_portable)
}

/// Decode: `out[r·m + i] = W[r] · x[i]` (a column-major `[rows, m]` block) for `m = a.rows()`
/// ≤ 4, each weight row read once for all activation rows.
pub fn gemv(isa: Isa, w: Q8Ref<'_>, a: &Q8Rows, out: &mut [f32]) {
    w.check(a);
    let m = a.rows;
    assert!(
        (1..=MR).contains(&m) && out.len() == w.rows * m,
        "q8 gemv: {m} rows into {}",
        out.len()
    );
    let mut dst = Dst { out, sj: m, si: 1 };
    run::<1>(isa, w, (0, w.rows), a, (0, m), &mut dst);
}

/// Prefill: `out[i·ldo + r] = W[r] · x[i]` for activation rows `i0..i1` (out's row 0 is `i0`)
/// and every weight row, on the calling thread, blocked for the caches.
pub fn gemm(
    isa: Isa,
    w: Q8Ref<'_>,
    a: &Q8Rows,
    (i0, i1): (usize, usize),
    out: &mut [f32],
    ldo: usize,
) {
    w.check(a);
    assert!(
        i1 <= a.rows && ldo >= w.rows && out.len() >= (i1 - i0).saturating_sub(1) * ldo + w.rows,
        "q8 gemm: rows {i0}..{i1} of {} into {} values (stride {ldo})",
        a.rows,
        out.len()
    );
    for ib in (i0..i1).step_by(IB) {
        let ie = (ib + IB).min(i1);
        for jb in (0..w.rows).step_by(JB) {
            let je = (jb + JB).min(w.rows);
            for i in (ib..ie).step_by(MR) {
                let m = MR.min(ie - i);
                let mut dst = Dst {
                    out: &mut out[(i - i0) * ldo + jb..],
                    sj: 1,
                    si: ldo,
                };
                match isa {
                    Isa::Avx2 | Isa::Portable => run::<1>(isa, w, (jb, je), a, (i, m), &mut dst),
                    _ => run::<2>(isa, w, (jb, je), a, (i, m), &mut dst),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{XorShift, assert_dots_close as close};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = XorShift::new(seed);
        (0..n).map(|_| r.next_signed_unit()).collect()
    }

    /// The integer reference: linear quantisation, exact block sums, scaled in f64.
    fn reference(w: &[f32], x: &[f32], rows: usize, m: usize, cols: usize) -> Vec<f64> {
        let blocks = cols.div_ceil(Q8_BLOCK);
        let width = blocks * Q8_BLOCK;
        let quant = |v: &[f32], n: usize| {
            let (mut q, mut d) = (vec![0i8; n * width], vec![0f32; n * blocks]);
            for r in 0..n {
                quantize_row_q8(
                    &v[r * cols..(r + 1) * cols],
                    &mut q[r * width..(r + 1) * width],
                    &mut d[r * blocks..(r + 1) * blocks],
                );
            }
            (q, d)
        };
        let ((wq, wd), (xq, xd)) = (quant(w, rows), quant(x, m));
        let mut out = vec![0f64; m * rows];
        for i in 0..m {
            for r in 0..rows {
                out[i * rows + r] = (0..blocks)
                    .map(|b| {
                        let dot: i64 = (0..Q8_BLOCK)
                            .map(|e| {
                                wq[r * width + b * 32 + e] as i64
                                    * xq[i * width + b * 32 + e] as i64
                            })
                            .sum();
                        dot as f64
                            * f16::from_f32(wd[r * blocks + b]).to_f64()
                            * xd[i * blocks + b] as f64
                    })
                    .sum();
            }
        }
        out
    }

    /// Column counts: whole groups, a short last group (over and under 8 blocks), a padded block.
    const SHAPES: &[(usize, usize)] = &[(6, 1024), (3, 96), (4, 50), (5, 2816), (7, 800), (9, 544)];

    #[test]
    fn packing_is_a_permutation_of_each_row() {
        for blocks in [1, 3, 8, 9, 16, 17, 31, 40] {
            let mut seen = vec![false; blocks * Q8_BLOCK];
            for c in 0..blocks * Q8_BLOCK {
                let p = packed_index(blocks, c);
                assert!(!seen[p], "blocks {blocks}: {c} collides at {p}");
                seen[p] = true;
            }
            let lin: Vec<i8> = (0..blocks * Q8_BLOCK).map(|c| (c % 251) as i8).collect();
            let mut out = vec![0i8; lin.len()];
            pack_row(&lin, blocks, &mut out, |v| v);
            for (c, &v) in lin.iter().enumerate() {
                assert_eq!(out[packed_index(blocks, c)], v);
            }
        }
    }

    #[test]
    fn gemv_and_gemm_match_the_integer_reference_on_every_isa() {
        for &(rows, cols) in SHAPES {
            let w = rand(rows * cols, 3 + cols as u64);
            let (wq, ws) = quantize_weights(&w, rows, cols);
            let wr = Q8Ref {
                quants: &wq,
                scales: &ws,
                rows,
                blocks: cols.div_ceil(Q8_BLOCK),
            };
            for m in [1, 2, 3, 4, 5, 9, 70] {
                let x = rand(m * cols, 11 + m as u64);
                let a = Q8Rows::quantize(&x, m, cols);
                let want = reference(&w, &x, rows, m, cols);
                for isa in Isa::available() {
                    let what = format!("{isa:?} m={m} {rows}x{cols}");
                    let mut out = vec![0f32; m * rows];
                    gemm(isa, wr, &a, (0, m), &mut out, rows);
                    close(&out, &want, cols, &format!("gemm {what}"));
                    if m <= MR {
                        let mut t = vec![0f32; rows * m];
                        gemv(isa, wr, &a, &mut t);
                        // Decode and prefill compute each product the same way: bit for bit.
                        for i in 0..m {
                            for r in 0..rows {
                                assert_eq!(
                                    t[r * m + i].to_bits(),
                                    out[i * rows + r].to_bits(),
                                    "gemv vs gemm {what} [{i}, {r}]"
                                );
                            }
                        }
                    }
                    // A range of activation rows into a strided output.
                    if m > 2 {
                        let mut part = vec![f32::NAN; (m - 1) * (rows + 3)];
                        gemm(isa, wr, &a, (1, m), &mut part, rows + 3);
                        for i in 1..m {
                            for r in 0..rows {
                                assert_eq!(part[(i - 1) * (rows + 3) + r], out[i * rows + r]);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn q8_is_close_to_the_f32_product() {
        let (rows, cols) = (8, 1024);
        let w = rand(rows * cols, 5);
        let x = rand(2 * cols, 6);
        let (wq, ws) = quantize_weights(&w, rows, cols);
        let wr = Q8Ref {
            quants: &wq,
            scales: &ws,
            rows,
            blocks: cols / Q8_BLOCK,
        };
        let a = Q8Rows::quantize(&x, 2, cols);
        let mut out = vec![0f32; rows * 2];
        gemv(Isa::detect(), wr, &a, &mut out);
        let norm = (cols as f32).sqrt();
        for r in 0..rows {
            for i in 0..2 {
                let exact: f32 = (0..cols).map(|k| w[r * cols + k] * x[i * cols + k]).sum();
                assert!(
                    (out[r * 2 + i] - exact).abs() < 0.02 * norm,
                    "{} vs {exact}",
                    out[r * 2 + i]
                );
            }
        }
    }

    #[test]
    fn quantize_pads_the_tail_and_handles_zero_blocks() {
        let v = [0.0f32; 40];
        let mut q = [1i8; 64];
        let mut d = [1f32; 2];
        quantize_row_q8(&v, &mut q, &mut d);
        assert_eq!(d, [0.0, 0.0]);
        assert!(q.iter().all(|&x| x == 0));
        let v: Vec<f32> = (0..33).map(|i| i as f32 - 16.0).collect();
        quantize_row_q8(&v, &mut q, &mut d);
        assert_eq!(q[0], -127);
        assert_eq!(q[32], 127);
        assert!(q[33..].iter().all(|&x| x == 0));
    }
}
