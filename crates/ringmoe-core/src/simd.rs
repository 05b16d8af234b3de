//! Vectorised elementwise kernels (exp, softmax row pieces, SwiGLU) with runtime CPU dispatch.
//!
//! The crate is built for the x86-64 baseline (SSE2) so one binary runs on every host. The
//! bodies here are plain loops over 8-wide lane arrays that LLVM vectorises; on x86-64 they are
//! compiled a second time with AVX2+FMA enabled and picked at run time when the CPU has those.
//! This module holds the crate's only `unsafe` outside the GEMM wrapper: the calls into the
//! `#[target_feature]` copies, each made only after the feature check.

const LANES: usize = 8;

/// `e^x` with ≤ 2 ulp error over the f32 range (Cephes `expf` polynomial on a range-reduced
/// argument). Returns exactly 0 for `x < -87.3` (including −∞, so masked scores vanish) and is
/// saturates at e^88 for larger `x`. Written without branches or libm calls so that it vectorises.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer n, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // max/min rather than clamp: they lower to plain vmaxps/vminps and keep the loop branch-free.
    #[allow(clippy::manual_clamp)]
    let xc = x.max(-87.3).min(88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from n's bits (integer ops only, so the loop vectorises without float→int casts).
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if x < -87.3 { 0.0 } else { y * scale }
}

/// Defines `pub fn $name` that runs `$body` (a generic inline fn) through the AVX2+FMA copy when
/// the CPU supports it, else through the baseline copy.
macro_rules! dispatch {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident : $ty:ty),*) -> $ret:ty => $body:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: `avx2` only requires the AVX2 and FMA instruction sets, which the
                    // CPU was just checked to support.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

#[inline(always)]
fn max_body(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in tail {
        m = m.max(x);
    }
    m
}

#[inline(always)]
fn exp_sub_sum_body(row: &mut [f32], m: f32) -> f32 {
    // Two passes: a plain map (which the loop vectoriser handles) and a lane-wise sum (a single
    // fused loop with a float reduction does not vectorise).
    for x in row.iter_mut() {
        *x = exp_approx(*x - m);
    }
    sum_body(row)
}

#[inline(always)]
fn sum_body(row: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

#[inline(always)]
fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    // Equal-length reslices and an index loop: a chain of `zip`s does not vectorise here.
    let n = out.len().min(gate.len()).min(up.len());
    let (gate, up, out) = (&gate[..n], &up[..n], &mut out[..n]);
    for i in 0..n {
        let g = gate[i];
        out[i] = g / (1.0 + exp_approx(-g)) * up[i];
    }
}

#[inline(always)]
fn bf16_to_f32_body(src: &[half::bf16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    for i in 0..n {
        dst[i] = f32::from_bits((src[i].to_bits() as u32) << 16);
    }
}

#[inline(always)]
fn scale_body(row: &mut [f32], s: f32) {
    for x in row.iter_mut() {
        *x *= s;
    }
}

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn dot_rows_body(x: &[f32], m: &[f32], starts: &[usize], out: &mut [f32]) {
    let d = x.len();
    for (o, &s) in out.iter_mut().zip(starts) {
        *o = dot_body(x, &m[s..s + d]);
    }
}

#[inline(always)]
fn axpy_rows_body(acc: &mut [f32], w: &[f32], m: &[f32], starts: &[usize]) {
    let d = acc.len();
    for (&wi, &s) in w.iter().zip(starts) {
        let row = &m[s..s + d];
        for i in 0..d {
            acc[i] += wi * row[i];
        }
    }
}

/// The decode attention's row kernels with AVX2, four rows at a time: four independent
/// accumulator chains for four dot products; one load and store of `acc` for four weighted rows.
/// (The loop bodies above, vectorised by LLVM, keep one chain per row and were most of a
/// long-context decode step.) Each lane multiplies and adds (no FMA) in the bodies' order, and a
/// dot's lanes are summed in the bodies' order, so the results are bit-identical to theirs.
#[cfg(target_arch = "x86_64")]
mod rows_x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(x: &[f32], m: &[f32], starts: &[usize], out: &mut [f32]) {
        let d = x.len();
        let whole = d / 8 * 8;
        let n = out.len().min(starts.len());
        let mut j = 0;
        while j + 4 <= n {
            let rows = [
                &m[starts[j]..starts[j] + d],
                &m[starts[j + 1]..starts[j + 1] + d],
                &m[starts[j + 2]..starts[j + 2] + d],
                &m[starts[j + 3]..starts[j + 3] + d],
            ];
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < whole {
                // SAFETY: c + 8 ≤ whole ≤ d, the length of x and of each row slice.
                unsafe {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(c));
                    for (a, r) in acc.iter_mut().zip(&rows) {
                        *a = _mm256_add_ps(
                            *a,
                            _mm256_mul_ps(xv, _mm256_loadu_ps(r.as_ptr().add(c))),
                        );
                    }
                }
                c += 8;
            }
            for (k, (a, r)) in acc.iter().zip(&rows).enumerate() {
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` holds exactly eight f32.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
                let tail: f32 = x[whole..].iter().zip(&r[whole..]).map(|(a, b)| a * b).sum();
                out[j + k] = lanes.iter().sum::<f32>() + tail;
            }
            j += 4;
        }
        for k in j..n {
            out[k] = super::dot_body(x, &m[starts[k]..starts[k] + d]);
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_rows(acc: &mut [f32], w: &[f32], m: &[f32], starts: &[usize]) {
        let d = acc.len();
        let whole = d / 8 * 8;
        let n = w.len().min(starts.len());
        let mut j = 0;
        while j < n {
            let k = (n - j).min(4);
            // Rows past the last real one repeat it with weight 0 (adding exactly 0).
            let at = |i: usize| starts[j + i.min(k - 1)];
            let (a0, a1, a2, a3) = (at(0), at(1), at(2), at(3));
            let rows = [
                &m[a0..a0 + d],
                &m[a1..a1 + d],
                &m[a2..a2 + d],
                &m[a3..a3 + d],
            ];
            let wt = |i: usize| if i < k { w[j + i] } else { 0.0 };
            let wv = [wt(0), wt(1), wt(2), wt(3)];
            let wb = [
                _mm256_set1_ps(wv[0]),
                _mm256_set1_ps(wv[1]),
                _mm256_set1_ps(wv[2]),
                _mm256_set1_ps(wv[3]),
            ];
            let mut c = 0;
            while c < whole {
                // SAFETY: c + 8 ≤ whole ≤ d, the length of acc and of each row slice.
                unsafe {
                    let p = acc.as_mut_ptr().add(c);
                    let mut a = _mm256_loadu_ps(p);
                    for (wk, r) in wb.iter().zip(&rows) {
                        a = _mm256_add_ps(
                            a,
                            _mm256_mul_ps(*wk, _mm256_loadu_ps(r.as_ptr().add(c))),
                        );
                    }
                    _mm256_storeu_ps(p, a);
                }
                c += 8;
            }
            for i in whole..d {
                for (wk, r) in wv.iter().zip(&rows) {
                    acc[i] += wk * r[i];
                }
            }
            j += k;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod panel_x86 {
    use crate::gemv::WeightElem;
    use std::arch::x86_64::*;

    /// The 8×8 tiles of [`super::transpose_to_f32`]: eight rows loaded (and widened), transposed
    /// in registers, stored as eight contiguous column pieces. Edges as the scalar body.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; the shapes are the caller's, checked.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn transpose<E: WeightElem>(w: &[E], p: usize, k: usize, out: &mut [f32]) {
        let (p8, k8) = (p / 8 * 8, k / 8 * 8);
        for r0 in (0..p8).step_by(8) {
            for c0 in (0..k8).step_by(8) {
                // SAFETY: rows r0..r0+8 ≤ p and columns c0..c0+8 ≤ k of the p×k input, and
                // the same of the k×p output (both lengths checked by the caller).
                unsafe {
                    let r: [__m256; 8] =
                        std::array::from_fn(|i| E::load8(w.as_ptr().add((r0 + i) * k + c0)));
                    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                    let cols = [
                        _mm256_permute2f128_ps::<0x20>(s0, s4),
                        _mm256_permute2f128_ps::<0x20>(s1, s5),
                        _mm256_permute2f128_ps::<0x20>(s2, s6),
                        _mm256_permute2f128_ps::<0x20>(s3, s7),
                        _mm256_permute2f128_ps::<0x31>(s0, s4),
                        _mm256_permute2f128_ps::<0x31>(s1, s5),
                        _mm256_permute2f128_ps::<0x31>(s2, s6),
                        _mm256_permute2f128_ps::<0x31>(s3, s7),
                    ];
                    for (c, v) in cols.iter().enumerate() {
                        _mm256_storeu_ps(out.as_mut_ptr().add((c0 + c) * p + r0), *v);
                    }
                }
            }
        }
        super::transpose_edges(w, p, k, out, p8, k8);
    }
}

/// The elements the 8×8 tiles leave: rows from `p8` on, columns from `k8` on.
fn transpose_edges<E: crate::gemv::WeightElem>(
    w: &[E],
    p: usize,
    k: usize,
    out: &mut [f32],
    p8: usize,
    k8: usize,
) {
    for r in 0..p {
        let from = if r < p8 { k8 } else { 0 };
        for c in from..k {
            out[c * p + r] = w[r * k + c].to_f32();
        }
    }
}

/// `out[c·p + r] = w[r·k + c]` as f32: a row-major `p × k` block of f32, bf16 or f16 weights
/// decoded and transposed (the layout the f32 GEMM packs without gathering).
pub fn transpose_to_f32<E: crate::gemv::WeightElem>(w: &[E], p: usize, k: usize, out: &mut [f32]) {
    assert!(
        w.len() == p * k && out.len() == p * k,
        "transpose_to_f32: {p}x{k} from {} into {} values",
        w.len(),
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU was just checked; the lengths above.
        return unsafe { panel_x86::transpose(w, p, k, out) };
    }
    transpose_edges(w, p, k, out, 0, 0)
}

/// `out[i] = x · m[starts[i] .. starts[i] + x.len()]`: one query against gathered key rows.
pub fn dot_rows(x: &[f32], m: &[f32], starts: &[usize], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU was just checked for AVX2 and FMA.
        return unsafe { rows_x86::dot_rows(x, m, starts, out) };
    }
    dot_rows_body(x, m, starts, out)
}

/// `acc += Σ w[i] · m[starts[i] .. starts[i] + acc.len()]`: weighted gathered value rows.
pub fn axpy_rows(acc: &mut [f32], w: &[f32], m: &[f32], starts: &[usize]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU was just checked for AVX2 and FMA.
        return unsafe { rows_x86::axpy_rows(acc, w, m, starts) };
    }
    axpy_rows_body(acc, w, m, starts)
}

#[inline(always)]
fn dot_pairs_body(a: &[f32], a_at: &[usize], b: &[f32], b_at: &[usize], d: usize, out: &mut [f32]) {
    for ((o, &i), &j) in out.iter_mut().zip(a_at).zip(b_at) {
        *o = dot_body(&a[i..i + d], &b[j..j + d]);
    }
}

#[inline(always)]
fn axpy_pairs_body(
    acc: &mut [f32],
    acc_at: &[usize],
    w: &[f32],
    b: &[f32],
    b_at: &[usize],
    d: usize,
) {
    for ((&i, &wi), &j) in acc_at.iter().zip(w).zip(b_at) {
        let (dst, src) = (&mut acc[i..i + d], &b[j..j + d]);
        for t in 0..d {
            dst[t] += wi * src[t];
        }
    }
}

dispatch! {
    /// bf16 → f32 (exact: the bits shifted into the high half), `min(len)` elements.
    pub fn bf16_to_f32(src: &[half::bf16], dst: &mut [f32]) -> () => bf16_to_f32_body
}

dispatch! {
    /// `out[n] = a[a_at[n] ..][..d] · b[b_at[n] ..][..d]`: dot products of paired rows.
    pub fn dot_pairs(a: &[f32], a_at: &[usize], b: &[f32], b_at: &[usize], d: usize, out: &mut [f32]) -> () => dot_pairs_body
}

dispatch! {
    /// `acc[acc_at[n] ..][..d] += w[n] · b[b_at[n] ..][..d]` for each pair, in order.
    pub fn axpy_pairs(acc: &mut [f32], acc_at: &[usize], w: &[f32], b: &[f32], b_at: &[usize], d: usize) -> () => axpy_pairs_body
}

dispatch! {
    /// The largest element (−∞ for an empty row).
    pub fn row_max(row: &[f32]) -> f32 => max_body
}

dispatch! {
    /// `row[i] = e^(row[i] − m)` in place; returns the sum of the new values.
    pub fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 => exp_sub_sum_body
}

dispatch! {
    /// `out = silu(gate) ⊙ up` for rows of equal length.
    pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) -> () => swiglu_body
}

dispatch! {
    /// `row *= s`.
    pub fn scale(row: &mut [f32], s: f32) -> () => scale_body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposing_decode_matches_the_scalar_transpose() {
        use half::{bf16, f16};
        let mut r = crate::testing::XorShift::new(7);
        // Whole 8×8 tiles, ragged edges on either side, and blocks smaller than a tile.
        for (p, k) in [(16, 24), (19, 37), (8, 5), (3, 8), (1, 1), (64, 1024)] {
            let f: Vec<f32> = (0..p * k).map(|_| r.next_signed_unit()).collect();
            let b: Vec<bf16> = f.iter().map(|&x| bf16::from_f32(x)).collect();
            let h: Vec<f16> = f.iter().map(|&x| f16::from_f32(x)).collect();
            let want = |g: &dyn Fn(usize) -> f32| {
                let mut o = vec![0f32; p * k];
                for rr in 0..p {
                    for c in 0..k {
                        o[c * p + rr] = g(rr * k + c);
                    }
                }
                o
            };
            let mut got = vec![f32::NAN; p * k];
            transpose_to_f32(&f, p, k, &mut got);
            assert_eq!(got, want(&|i| f[i]), "f32 {p}x{k}");
            transpose_to_f32(&b, p, k, &mut got);
            assert_eq!(got, want(&|i| b[i].to_f32()), "bf16 {p}x{k}");
            transpose_to_f32(&h, p, k, &mut got);
            assert_eq!(got, want(&|i| h[i].to_f32()), "f16 {p}x{k}");
            // The portable path alone.
            let mut port = vec![f32::NAN; p * k];
            transpose_edges(&b, p, k, &mut port, 0, 0);
            assert_eq!(port, want(&|i| b[i].to_f32()), "portable bf16 {p}x{k}");
        }
    }

    #[test]
    fn exp_approx_is_accurate_and_exact_at_the_edges() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp_approx(x) as f64 - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "max relative error {worst:e}");
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(1000.0).is_finite());
    }

    #[test]
    fn dispatched_kernels_match_scalar() {
        let row: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 * 0.13 - 6.0)
            .collect();
        assert_eq!(
            row_max(&row),
            row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        );
        let mut e = row.clone();
        let s = exp_sub_sum(&mut e, 1.5);
        let want: f64 = row.iter().map(|&x| ((x - 1.5) as f64).exp()).sum();
        assert!(((s as f64 - want) / want).abs() < 1e-6);
        let mut out = vec![0f32; 37];
        swiglu(&row, &e, &mut out);
        for ((o, g), u) in out.iter().zip(&row).zip(&e) {
            let w = *g as f64 / (1.0 + (-*g as f64).exp()) * *u as f64;
            assert!((*o as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()));
        }
    }

    #[test]
    fn row_kernels_are_bit_identical_to_the_loop_bodies() {
        let mut r = crate::testing::XorShift::new(17);
        for d in [1, 7, 8, 64, 77] {
            for n in [0, 1, 3, 4, 5, 11, 16] {
                let stride = d + 3;
                let m: Vec<f32> = (0..n * stride + d).map(|_| r.next_signed_unit()).collect();
                let x: Vec<f32> = (0..d).map(|_| r.next_signed_unit()).collect();
                let w: Vec<f32> = (0..n).map(|_| r.next_signed_unit()).collect();
                // Rows out of order, some repeated.
                let starts: Vec<usize> = (0..n).map(|j| ((j * 5) % n.max(1)) * stride).collect();
                let (mut out, mut want) = (vec![0f32; n], vec![0f32; n]);
                dot_rows(&x, &m, &starts, &mut out);
                dot_rows_body(&x, &m, &starts, &mut want);
                assert_eq!(out, want, "dot d={d} n={n}");
                let mut acc: Vec<f32> = (0..d).map(|_| r.next_signed_unit()).collect();
                let mut want_acc = acc.clone();
                axpy_rows(&mut acc, &w, &m, &starts);
                axpy_rows_body(&mut want_acc, &w, &m, &starts);
                assert_eq!(acc, want_acc, "axpy d={d} n={n}");
                // And both are the products they claim to be.
                for (j, &s) in starts.iter().enumerate() {
                    let dot: f64 = x
                        .iter()
                        .zip(&m[s..s + d])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    assert!((out[j] as f64 - dot).abs() < 1e-5 * (d as f64).sqrt());
                }
            }
        }
    }
}
