//! Weight bytes per second of the decode GEMV kernels on an lm_head-sized matrix (32000 × 1024,
//! far beyond the caches), per format and instruction set, next to this machine's read bandwidth
//! (a summing pass over 512 MiB on every core).
//!
//! Run: `cargo run --release -p ringmoe-core --example gemv_bandwidth [-- f32|bf16|q8 ...]` (the
//! formats to measure; all by default).

use std::time::Instant;

use rayon::prelude::*;
use ringmoe_core::gemm::Par;
use ringmoe_core::gemv::Isa;
use ringmoe_core::testing::XorShift;
use ringmoe_core::{WeightFormat, Weights};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let buf: Vec<u64> = (0..(64usize << 20)).map(|i| i as u64).collect();
    let read = || {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
        (buf.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    let (n, k) = (32000, 1024);
    let mut rng = XorShift::new(1);
    let w: Vec<f32> = (0..n * k).map(|_| rng.next_signed_unit()).collect();
    let x: Vec<f32> = (0..k).map(|_| rng.next_signed_unit()).collect();
    let mut cases = Vec::new();
    let only: Vec<String> = std::env::args().skip(1).collect();
    for f in [WeightFormat::F32, WeightFormat::BF16, WeightFormat::Q8] {
        if !only.is_empty() && !only.iter().any(|o| o == f.name()) {
            continue;
        }
        let wt = Weights::from_f32_as(w.clone(), n, k, f)?;
        for isa in Isa::available() {
            for par in [Par::Rayon, Par::Serial] {
                cases.push((wt.clone(), isa, par, 0f64));
            }
        }
    }
    // Rounds alternate over every case (the host is shared: best of 7 per case).
    let mut best_read = 0f64;
    for _ in 0..7 {
        best_read = best_read.max(read());
        for (wt, isa, par, best) in cases.iter_mut() {
            let t = Instant::now();
            std::hint::black_box(wt.matmul_nt_isa(&x, 1, *par, *isa).ok());
            *best = best.max(wt.bytes() as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    println!(
        "read bandwidth ({} threads): {best_read:.1} GB/s",
        rayon::current_num_threads()
    );
    for (wt, isa, par, best) in &cases {
        let threads = if *par == Par::Rayon {
            "all threads"
        } else {
            "1 thread"
        };
        println!("{:>4} {isa:?} {threads}: {best:.1} GB/s", wt.format());
    }
    Ok(())
}
