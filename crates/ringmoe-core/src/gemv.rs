//! Matrix–vector kernels for a few activation rows against weights in their storage precision:
//! the decode path, where every weight is read once per token and memory bandwidth is the limit.
//!
//! Each kernel computes, for a chunk of weight rows `W[r]` and `M ≤ 4` activation rows `x[i]`,
//! `out[r·M + i] = W[r] · x[i]` (a column-major `[rows, M]` block). The weight row is loaded
//! once and used for all `M` activation rows, so `M` tokens cost one pass over the weights.
//!
//! * f32, bf16, f16 weights accumulate in f32 against f32 activations. bf16 → f32 is exact (a
//!   16-bit shift), so a bf16 matrix gives the upcast f32 matrix's dot products up to summation
//!   order. `avx512_bf16`'s `vdpbf16ps` is not used: it would round the activations to bf16 too.
//! * q8 weights (blocks of [`Q8_BLOCK`] int8 with an f16 scale, GGUF's Q8_0) dot against
//!   activations quantised the same way: integer products summed in i32 per block, then scaled
//!   (llama.cpp's `vec_dot_q8_0_q8_0`).
//!
//! Variants: AVX-512 (f32/bf16/f16; q8 two blocks per step with `vpmaddubsw`), AVX2+FMA+F16C
//! (all formats; q8 one block per step), and a portable loop for every format, chosen at run time
//! by [`Isa::detect`]. Tests run every variant
//! the machine supports against a scalar reference. An AVX-512 VNNI q8 kernel (256-bit
//! `vpdpbusd` per block) read 14 GB/s on one core of the dev machine (AMD EPYC, Zen 4) where
//! `vpmaddubsw` reads 20–21 GB/s, so there is none.

use half::{bf16, f16};

/// Activations per q8 block (and its one scale).
pub const Q8_BLOCK: usize = 32;

/// The instruction set a kernel call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
}

impl Isa {
    /// The best the running CPU supports. `Avx512` means AVX-512 F/BW/DQ/VL and implies AVX2, FMA and F16C.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                return if has!("avx512f")
                    && has!("avx512bw")
                    && has!("avx512dq")
                    && has!("avx512vl")
                {
                    Isa::Avx512
                } else {
                    Isa::Avx2
                };
            }
        }
        Isa::Portable
    }

    /// Every variant this machine can run, portable first (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        match Isa::detect() {
            Isa::Avx512 => v.extend([Isa::Avx2, Isa::Avx512]),
            Isa::Avx2 => v.push(Isa::Avx2),
            Isa::Portable => {}
        }
        v
    }
}

/// A weight element that converts exactly to f32.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl WeightElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Portable kernel: 8-lane partial sums LLVM vectorises for the baseline target.
fn gemv_portable<E: WeightElem>(w: &[E], cols: usize, x: &[f32], m: usize, out: &mut [f32]) {
    const L: usize = 8;
    let rows = out.len() / m;
    for r in 0..rows {
        let wr = &w[r * cols..(r + 1) * cols];
        for i in 0..m {
            let xr = &x[i * cols..(i + 1) * cols];
            let mut acc = [0f32; L];
            let body = cols / L * L;
            for (wc, xc) in wr[..body].chunks_exact(L).zip(xr[..body].chunks_exact(L)) {
                for l in 0..L {
                    acc[l] += wc[l].to_f32() * xc[l];
                }
            }
            let mut s: f32 = acc.iter().sum();
            for k in body..cols {
                s += wr[k].to_f32() * xr[k];
            }
            out[r * m + i] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{WeightElem, bf16, f16};
    use std::arch::x86_64::*;

    /// Defines `$name::<M>`: the chunk kernel for one element type and instruction set, one
    /// weight row at a time. On the dev machine one sequential stream per thread read 29–32 GB/s
    /// where 2, 4 or 8 rows side by side (one page each) read 15–22 GB/s
    /// (`examples/gemv_bandwidth.rs`, docs/performance.md).
    macro_rules! gemv_simd {
        ($name:ident, $feat:literal, $elem:ty, $lanes:expr, $zero:ident, $load_w:ident,
         $load_x:ident, $fma:ident, $hsum:ident) => {
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name<const M: usize>(
                w: &[$elem],
                cols: usize,
                x: &[f32],
                out: &mut [f32],
            ) {
                const L: usize = $lanes;
                let body = cols / L * L;
                for (r, o) in out.chunks_exact_mut(M).enumerate() {
                    let wr = &w[r * cols..(r + 1) * cols];
                    let mut acc = [$zero(); M];
                    let mut k = 0;
                    while k < body {
                        // SAFETY: k + L ≤ cols = wr.len(), and each of the M activation rows
                        // holds `cols` elements (checked by the entry point).
                        unsafe {
                            let wv = $load_w(wr.as_ptr().add(k));
                            for (i, a) in acc.iter_mut().enumerate() {
                                *a = $fma(wv, $load_x(x.as_ptr().add(i * cols + k)), *a);
                            }
                        }
                        k += L;
                    }
                    for (i, (a, o)) in acc.iter().zip(o.iter_mut()).enumerate() {
                        let mut s = $hsum(*a);
                        for kk in body..cols {
                            s += wr[kk].to_f32() * x[i * cols + kk];
                        }
                        *o = s;
                    }
                }
            }
        };
    }

    // --- AVX-512 -------------------------------------------------------------------------------

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn zero512() -> __m512 {
        _mm512_setzero_ps()
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn loadx512(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f32 at p.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load_bf16_512(p: *const bf16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable bf16 (32 bytes) at p.
        let h = unsafe { _mm256_loadu_si256(p.cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load_f16_512(p: *const f16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f16 (32 bytes) at p.
        let h = unsafe { _mm256_loadu_si256(p.cast()) };
        _mm512_cvtph_ps(h)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn fma512(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn hsum512(a: __m512) -> f32 {
        _mm512_reduce_add_ps(a)
    }

    gemv_simd!(
        f32_avx512, "avx512f", f32, 16, zero512, loadx512, loadx512, fma512, hsum512
    );
    gemv_simd!(
        bf16_avx512,
        "avx512f",
        bf16,
        16,
        zero512,
        load_bf16_512,
        loadx512,
        fma512,
        hsum512
    );
    gemv_simd!(
        f16_avx512,
        "avx512f",
        f16,
        16,
        zero512,
        load_f16_512,
        loadx512,
        fma512,
        hsum512
    );

    // --- AVX2 + FMA (+ F16C) -------------------------------------------------------------------

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn zero256() -> __m256 {
        _mm256_setzero_ps()
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn loadx256(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f32 at p.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_bf16_256(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) at p.
        let h = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_f16_256(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f16 (16 bytes) at p.
        let h = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_cvtph_ps(h)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn fma256(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn hsum256(a: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    gemv_simd!(
        f32_avx2,
        "avx2,fma,f16c",
        f32,
        8,
        zero256,
        loadx256,
        loadx256,
        fma256,
        hsum256
    );
    gemv_simd!(
        bf16_avx2,
        "avx2,fma,f16c",
        bf16,
        8,
        zero256,
        load_bf16_256,
        loadx256,
        fma256,
        hsum256
    );
    gemv_simd!(
        f16_avx2,
        "avx2,fma,f16c",
        f16,
        8,
        zero256,
        load_f16_256,
        loadx256,
        fma256,
        hsum256
    );

    // --- q8 ------------------------------------------------------------------------------------

    /// One 32-byte block product `Σ x·w` as 8 i32 lanes, via `vpmaddubsw` (|x| as u8 times w with
    /// x's sign) and `vpmaddwd`. No saturation: |x|, |w| ≤ 127, so a pair sums to ≤ 32258.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dot_block_avx2(xv: __m256i, wv: __m256i) -> __m256i {
        let ax = _mm256_sign_epi8(xv, xv);
        let sw = _mm256_sign_epi8(wv, xv);
        _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1))
    }

    /// One f16 to f32 with F16C (the `half` crate's conversion is a call that checks the CPU).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn f16_to_f32(h: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
    }

    macro_rules! q8_simd {
        ($name:ident, $feat:literal, $dot:ident) => {
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name<const M: usize>(
                wq: &[i8],
                ws: &[f16],
                xq: &[i8],
                xs: &[f32],
                blocks: usize,
                out: &mut [f32],
            ) {
                let rows = out.len() / M;
                let width = blocks * super::Q8_BLOCK;
                for r in 0..rows {
                    let mut acc = [zero256(); M];
                    for b in 0..blocks {
                        // SAFETY: row r's block b lies inside wq (rows·width elements) and each
                        // activation row's block b inside xq (M·width), as the caller checked.
                        unsafe {
                            let wv = _mm256_loadu_si256(wq.as_ptr().add(r * width + b * 32).cast());
                            let d = f16_to_f32(ws[r * blocks + b]);
                            for i in 0..M {
                                let xv =
                                    _mm256_loadu_si256(xq.as_ptr().add(i * width + b * 32).cast());
                                let p = _mm256_cvtepi32_ps($dot(xv, wv));
                                acc[i] = _mm256_fmadd_ps(
                                    p,
                                    _mm256_set1_ps(d * xs[i * blocks + b]),
                                    acc[i],
                                );
                            }
                        }
                    }
                    for i in 0..M {
                        out[r * M + i] = hsum256(acc[i]);
                    }
                }
            }
        };
    }

    q8_simd!(q8_avx2, "avx2,fma,f16c", dot_block_avx2);

    /// q8 with AVX-512 BW: two blocks per 512-bit step (`vpabsb`, a masked negate for the sign,
    /// `vpmaddubsw`, `vpmaddwd`), each half scaled by its own block's scales; an odd last block
    /// goes through the 256-bit step.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn q8_avx512<const M: usize>(
        wq: &[i8],
        ws: &[f16],
        xq: &[i8],
        xs: &[f32],
        blocks: usize,
        out: &mut [f32],
    ) {
        let rows = out.len() / M;
        let width = blocks * super::Q8_BLOCK;
        let pairs = blocks / 2;
        let ones = _mm512_set1_epi16(1);
        // Each activation row's scales as one vector per block pair ([d_b ×8, d_b+1 ×8]), built
        // once per call; a weight row's pair of f16 scales is widened and spread the same way.
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let xsp: Vec<__m512> = (0..M * pairs)
            .map(|ip| {
                let (i, p) = (ip / pairs, ip % pairs);
                let lo = _mm256_set1_ps(xs[i * blocks + 2 * p]);
                let hi = _mm256_set1_ps(xs[i * blocks + 2 * p + 1]);
                _mm512_insertf32x8::<1>(_mm512_castps256_ps512(lo), hi)
            })
            .collect();
        // |x| and x's sign mask per block pair, also once per call (they do not depend on the
        // weight row).
        let (xabs, xneg): (Vec<__m512i>, Vec<__mmask64>) = (0..M * pairs)
            .map(|ip| {
                let (i, p) = (ip / pairs, ip % pairs);
                // SAFETY: block pair p of activation row i lies inside xq (M·width elements).
                let xv = unsafe { _mm512_loadu_si512(xq.as_ptr().add(i * width + p * 64).cast()) };
                (_mm512_abs_epi8(xv), _mm512_movepi8_mask(xv))
            })
            .unzip();
        for r in 0..rows {
            let mut acc = [_mm512_setzero_ps(); M];
            let mut tail = [zero256(); M];
            for p in 0..pairs {
                let b = 2 * p;
                // SAFETY: blocks b and b + 1 of row r lie inside wq (rows·width elements), and
                // their two scales inside ws (rows·blocks, read unaligned), as the caller
                // checked; the activation pairs were read above.
                unsafe {
                    let wv = _mm512_loadu_si512(wq.as_ptr().add(r * width + b * 32).cast());
                    // Scales b and b + 1 are adjacent: one 32-bit load holds both.
                    let bits = ws
                        .as_ptr()
                        .add(r * blocks + b)
                        .cast::<i32>()
                        .read_unaligned();
                    let wd = _mm512_permutexvar_ps(
                        spread,
                        _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(bits))),
                    );
                    for (i, a) in acc.iter_mut().enumerate() {
                        let ip = i * pairs + p;
                        let sw = _mm512_mask_sub_epi8(wv, xneg[ip], _mm512_setzero_si512(), wv);
                        let p32 = _mm512_madd_epi16(_mm512_maddubs_epi16(xabs[ip], sw), ones);
                        let sc = _mm512_mul_ps(wd, xsp[ip]);
                        *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p32), sc, *a);
                    }
                }
            }
            if blocks % 2 == 1 {
                let b = blocks - 1;
                // SAFETY: as above, for the last block alone.
                unsafe {
                    let wv = _mm256_loadu_si256(wq.as_ptr().add(r * width + b * 32).cast());
                    let d = f16_to_f32(ws[r * blocks + b]);
                    for i in 0..M {
                        let xv = _mm256_loadu_si256(xq.as_ptr().add(i * width + b * 32).cast());
                        let p = _mm256_cvtepi32_ps(dot_block_avx2(xv, wv));
                        tail[i] =
                            _mm256_fmadd_ps(p, _mm256_set1_ps(d * xs[i * blocks + b]), tail[i]);
                    }
                }
            }
            for i in 0..M {
                out[r * M + i] = _mm512_reduce_add_ps(acc[i]) + hsum256(tail[i]);
            }
        }
    }
}

/// Calls `$k::<M>` for the runtime `m` (1..=4).
macro_rules! by_m {
    ($m:expr, $k:ident, ($($arg:expr),*)) => {
        match $m {
            1 => $k::<1>($($arg),*),
            2 => $k::<2>($($arg),*),
            3 => $k::<3>($($arg),*),
            _ => $k::<4>($($arg),*),
        }
    };
}

fn check(what: &str, w_len: usize, rows: usize, cols: usize, x_len: usize, m: usize) {
    assert!(
        (1..=4).contains(&m) && w_len >= rows * cols && x_len == m * cols,
        "{what}: {rows}x{cols} weights ({w_len}), {m} rows of x ({x_len})"
    );
}

macro_rules! float_entry {
    ($(#[$doc:meta])* $name:ident, $elem:ty, $avx512:ident, $avx2:ident) => {
        $(#[$doc])*
        /// `out` is `[rows, m]` column-major for the `rows = out.len() / m` rows in `w`; `x` is
        /// `[m, cols]`. Panics on inconsistent lengths (an internal bug, never input).
        pub fn $name(isa: Isa, w: &[$elem], cols: usize, x: &[f32], m: usize, out: &mut [f32]) {
            let rows = out.len() / m.max(1);
            check(stringify!($name), w.len(), rows, cols, x.len(), m);
            #[cfg(target_arch = "x86_64")]
            match isa {
                // SAFETY: `Isa::Avx512` and `Isa::Avx2` come from `Isa::detect` (or
                // `Isa::available`), which checked the CPU has the kernel's features; the
                // lengths were checked above.
                Isa::Avx512 => return unsafe { by_m!(m, $avx512, (w, cols, x, out)) },
                // SAFETY: as above.
                Isa::Avx2 => return unsafe { by_m!(m, $avx2, (w, cols, x, out)) },
                Isa::Portable => {}
            }
            let _ = isa;
            gemv_portable(w, cols, x, m, out)
        }
    };
}

#[cfg(target_arch = "x86_64")]
use x86::{bf16_avx2, bf16_avx512, f16_avx2, f16_avx512, f32_avx2, f32_avx512};

float_entry!(
    /// f32 weights.
    gemv_f32, f32, f32_avx512, f32_avx2
);
float_entry!(
    /// bf16 weights, accumulated in f32.
    gemv_bf16, bf16, bf16_avx512, bf16_avx2
);
float_entry!(
    /// f16 weights, accumulated in f32.
    gemv_f16, f16, f16_avx512, f16_avx2
);

/// Quantises one row to q8 blocks: `q = round(v / d)` (to nearest, ties to even) with
/// `d = max|v| / 127` per block, as GGUF's Q8_0 (which rounds ties away from zero). `q` gets `blocks · 32` values (the tail zero-padded), `d` one scale per block.
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

/// q8 weights (`wq`: `rows · blocks · 32`, `ws`: `rows · blocks`) against `m = xs.len() / blocks`
/// q8 activation rows (`xq`: `m · blocks · 32`, `xs`: `m · blocks`); `out` as for the float
/// kernels.
pub fn gemv_q8(
    isa: Isa,
    wq: &[i8],
    ws: &[f16],
    xq: &[i8],
    xs: &[f32],
    blocks: usize,
    out: &mut [f32],
) {
    let m = xs.len() / blocks.max(1);
    let rows = out.len() / m.max(1);
    let width = blocks * Q8_BLOCK;
    check("gemv_q8", wq.len(), rows, width, xq.len(), m);
    assert!(ws.len() >= rows * blocks && xs.len() == m * blocks);
    #[cfg(target_arch = "x86_64")]
    {
        use x86::{q8_avx2, q8_avx512};
        match isa {
            // SAFETY: `Isa::Avx512` comes from `Isa::detect`/`available`, which checked for
            // AVX-512 F/BW/DQ/VL besides AVX2, FMA and F16C; lengths checked above.
            Isa::Avx512 => return unsafe { by_m!(m, q8_avx512, (wq, ws, xq, xs, blocks, out)) },
            // SAFETY: as above, for AVX2, FMA and F16C.
            Isa::Avx2 => return unsafe { by_m!(m, q8_avx2, (wq, ws, xq, xs, blocks, out)) },
            Isa::Portable => {}
        }
    }
    let _ = isa;
    for r in 0..rows {
        for i in 0..m {
            let mut s = 0f32;
            for b in 0..blocks {
                let wb = &wq[r * width + b * Q8_BLOCK..][..Q8_BLOCK];
                let xb = &xq[i * width + b * Q8_BLOCK..][..Q8_BLOCK];
                let dot: i32 = wb.iter().zip(xb).map(|(&a, &c)| a as i32 * c as i32).sum();
                s += dot as f32 * (ws[r * blocks + b].to_f32() * xs[i * blocks + b]);
            }
            out[r * m + i] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::XorShift;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = XorShift::new(seed);
        (0..n).map(|_| r.next_signed_unit()).collect()
    }

    fn reference<E: WeightElem>(
        w: &[E],
        cols: usize,
        x: &[f32],
        m: usize,
        rows: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; rows * m];
        for r in 0..rows {
            for i in 0..m {
                out[r * m + i] = (0..cols)
                    .map(|k| w[r * cols + k].to_f32() as f64 * x[i * cols + k] as f64)
                    .sum();
            }
        }
        out
    }

    fn close(got: &[f32], want: &[f64], cols: usize, what: &str) {
        for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-5 * (cols as f64).sqrt() * (1.0 + w.abs());
            assert!((g as f64 - w).abs() <= tol, "{what} [{j}]: {g} vs {w}");
        }
    }

    #[test]
    fn float_kernels_match_the_reference_on_every_isa() {
        // Column counts with and without a tail after the unrolled body.
        for &(rows, cols) in &[(5, 64), (7, 1024), (3, 77), (9, 33), (2, 5)] {
            let wf = rand(rows * cols, 1 + cols as u64);
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            for m in 1..=4 {
                let x = rand(m * cols, 7 + m as u64);
                let (rf, rb, rh) = (
                    reference(&wf, cols, &x, m, rows),
                    reference(&wb, cols, &x, m, rows),
                    reference(&wh, cols, &x, m, rows),
                );
                for isa in Isa::available() {
                    let mut out = vec![0f32; rows * m];
                    gemv_f32(isa, &wf, cols, &x, m, &mut out);
                    close(&out, &rf, cols, &format!("f32 {isa:?} m={m} {rows}x{cols}"));
                    gemv_bf16(isa, &wb, cols, &x, m, &mut out);
                    close(
                        &out,
                        &rb,
                        cols,
                        &format!("bf16 {isa:?} m={m} {rows}x{cols}"),
                    );
                    gemv_f16(isa, &wh, cols, &x, m, &mut out);
                    close(&out, &rh, cols, &format!("f16 {isa:?} m={m} {rows}x{cols}"));
                }
            }
        }
    }

    fn quantize(v: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>, usize) {
        let blocks = cols.div_ceil(Q8_BLOCK);
        let mut q = vec![0i8; rows * blocks * Q8_BLOCK];
        let mut d = vec![0f32; rows * blocks];
        for r in 0..rows {
            quantize_row_q8(
                &v[r * cols..(r + 1) * cols],
                &mut q[r * blocks * Q8_BLOCK..(r + 1) * blocks * Q8_BLOCK],
                &mut d[r * blocks..(r + 1) * blocks],
            );
        }
        (q, d, blocks)
    }

    #[test]
    fn q8_kernels_match_the_integer_reference_on_every_isa() {
        for &(rows, cols) in &[(6, 1024), (3, 96), (4, 50)] {
            let w = rand(rows * cols, 3);
            let (wq, wd, blocks) = quantize(&w, rows, cols);
            let ws: Vec<f16> = wd.iter().map(|&d| f16::from_f32(d)).collect();
            for m in 1..=4 {
                let x = rand(m * cols, 11 + m as u64);
                let (xq, xs, _) = quantize(&x, m, cols);
                // Reference: exact integer block sums, scaled in f64.
                let width = blocks * Q8_BLOCK;
                let mut want = vec![0f64; rows * m];
                for r in 0..rows {
                    for i in 0..m {
                        want[r * m + i] = (0..blocks)
                            .map(|b| {
                                let dot: i64 = (0..Q8_BLOCK)
                                    .map(|j| {
                                        wq[r * width + b * 32 + j] as i64
                                            * xq[i * width + b * 32 + j] as i64
                                    })
                                    .sum();
                                dot as f64 * ws[r * blocks + b].to_f64() * xs[i * blocks + b] as f64
                            })
                            .sum();
                    }
                }
                for isa in Isa::available() {
                    let mut out = vec![0f32; rows * m];
                    gemv_q8(isa, &wq, &ws, &xq, &xs, blocks, &mut out);
                    close(
                        &out,
                        &want,
                        cols,
                        &format!("q8 {isa:?} m={m} {rows}x{cols}"),
                    );
                }
                // And as a quality figure against the f32 product: within a few percent.
                let exact = reference(&w, cols, &x, m, rows);
                let mut out = vec![0f32; rows * m];
                gemv_q8(Isa::detect(), &wq, &ws, &xq, &xs, blocks, &mut out);
                let norm = (cols as f64).sqrt();
                for (g, e) in out.iter().zip(&exact) {
                    assert!((*g as f64 - e).abs() < 0.02 * norm, "q8 {g} vs f32 {e}");
                }
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
