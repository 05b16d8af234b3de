//! Seeded pseudo-random data for tests, benchmarks and random-weight models: the same seed gives
//! the same values on every machine, without pulling a random-number crate into the engine.

/// A xorshift64 stream of `u64`s.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in `[-1, 1)`, 24 bits of resolution.
    pub fn next_signed_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

impl Iterator for XorShift {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        Some(self.next_u64())
    }
}

/// `n` values uniform in `[-amp, amp)` from `seed`.
pub fn rand_vec(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut r = XorShift::new(seed);
    (0..n).map(|_| r.next_signed_unit() * amp).collect()
}

/// Asserts f32 dot products of length `cols` against f64 references, within f32 rounding over
/// `cols` terms: `1e-5 · √cols · (1 + |want|)`.
pub fn assert_dots_close(got: &[f32], want: &[f64], cols: usize, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 * (cols as f64).sqrt() * (1.0 + w.abs());
        assert!((g as f64 - w).abs() <= tol, "{what} [{j}]: {g} vs {w}");
    }
}

/// A rayon pool of `threads` workers, so a test exercises the parallel splits whatever the
/// machine's core count.
#[cfg(test)]
pub fn thread_pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a test thread pool")
}
