//! Weight bytes per second of the decode GEMV kernels on an lm_head-sized matrix (32000 × 1024,
//! far beyond the caches), per format and instruction set, next to this machine's read bandwidth
//! (a summing pass over 512 MiB on every core).
//!
//! Run: `cargo run --release -p ringmoe-core --example gemv_bandwidth`

use std::time::Instant;

use rayon::prelude::*;
use ringmoe_core::gemm::Par;
use ringmoe_core::gemv::Isa;
use ringmoe_core::testing::XorShift;
use ringmoe_core::{WeightFormat, Weights};

fn best_of(n: usize, mut f: impl FnMut() -> f64) -> f64 {
    (0..n).map(|_| f()).fold(0.0, f64::max)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let buf: Vec<u64> = (0..(64usize << 20)).map(|i| i as u64).collect();
    let read = best_of(5, || {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
        (buf.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
    });
    drop(buf);
    println!(
        "read bandwidth ({} threads): {read:.1} GB/s",
        rayon::current_num_threads()
    );
    let (n, k) = (32000, 1024);
    let mut rng = XorShift::new(1);
    let w: Vec<f32> = (0..n * k).map(|_| rng.next_signed_unit()).collect();
    let x: Vec<f32> = (0..k).map(|_| rng.next_signed_unit()).collect();
    for f in [WeightFormat::F32, WeightFormat::BF16, WeightFormat::Q8] {
        let wt = Weights::from_f32_as(w.clone(), n, k, f)?;
        for isa in Isa::available() {
            for (par, name) in [(Par::Rayon, "all threads"), (Par::Serial, "1 thread")] {
                let gbs = best_of(7, || {
                    let t = Instant::now();
                    std::hint::black_box(wt.matmul_nt_isa(&x, 1, par, isa).ok());
                    wt.bytes() as f64 / t.elapsed().as_secs_f64() / 1e9
                });
                println!("{f:>4} {isa:?} {name}: {gbs:.1} GB/s");
            }
        }
    }
    Ok(())
}
