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
//! * q8 weights have their own kernels, shared with the prefill GEMM, in [`crate::q8`].
//!
//! Variants: AVX-512, AVX2+FMA+F16C and a portable loop for every format, chosen at run time by
//! [`Isa::detect`]. Tests run every variant the machine supports against a scalar reference.

use half::{bf16, f16};

/// The instruction set a kernel call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
    /// AVX-512 with VNNI (`vpdpbusd`): the float kernels are [`Isa::Avx512`]'s, q8 differs.
    Avx512Vnni,
}

impl Isa {
    /// The best the running CPU supports. `Avx512` means AVX-512 F/BW/DQ/VL and implies AVX2, FMA
    /// and F16C; `Avx512Vnni` adds AVX512-VNNI.
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
                    if has!("avx512vnni") {
                        Isa::Avx512Vnni
                    } else {
                        Isa::Avx512
                    }
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
            Isa::Avx512Vnni => v.extend([Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni]),
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
    /// Eight elements at `p`, widened to f32 (exactly) in one AVX2 register.
    ///
    /// # Safety
    /// Eight elements readable at `p`; the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: as the trait requires.
        unsafe { x86::loadx256(p) }
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        // SAFETY: as the trait requires.
        unsafe { x86::load_bf16_256(p) }
    }
}

impl WeightElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        // SAFETY: as the trait requires.
        unsafe { x86::load_f16_256(p) }
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
pub(crate) mod x86 {
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
    pub(super) unsafe fn loadx256(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f32 at p.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn load_bf16_256(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) at p.
        let h = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn load_f16_256(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f16 (16 bytes) at p.
        let h = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_cvtph_ps(h)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn fma256(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }

    /// The sum of a vector's eight lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(crate) fn hsum256(a: __m256) -> f32 {
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
                Isa::Avx512 | Isa::Avx512Vnni => {
                    return unsafe { by_m!(m, $avx512, (w, cols, x, out)) };
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{XorShift, assert_dots_close as close};

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
}
