//! Criterion benchmarks of the communicator: `all_to_all_v` and ring `sendrecv` with 4 ranks on
//! TCP loopback (ranks as threads here; `ringmoe bench comm --transport tcp` runs them as separate
//! processes) and in-process, 1–64 MiB per rank, next to one raw TCP stream moving the same bytes.
//! Throughput is bytes that cross between ranks (see `ringmoe_comm::bench`).
//!
//! Run: `cargo bench -p ringmoe-comm --bench comm`. Numbers go to docs/performance.md.
#![allow(clippy::expect_used)] // Benchmark set-up: a failure here is a bug in the bench itself.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringmoe_comm::local::{on_every_rank, tcp_group};
use ringmoe_comm::{Communicator, TcpOptions, bench, in_process};

const RANKS: usize = 4;
const SIZES: [usize; 4] = [1 << 20, 4 << 20, 16 << 20, 64 << 20];

/// Runs `f` on every rank at once for `iters` iterations; the slowest rank's time counts.
fn on_all(
    comms: &[Communicator],
    iters: u64,
    f: fn(&Communicator, usize, u32) -> ringmoe_comm::Result<f64>,
    bytes: usize,
) -> Duration {
    let secs = on_every_rank(comms, |c| f(c, bytes, iters as u32).expect("collective"))
        .into_iter()
        .fold(0.0, f64::max);
    Duration::from_secs_f64(secs * iters as f64)
}

fn collectives(c: &mut Criterion, name: &str, comms: &[Communicator]) {
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    for bytes in SIZES {
        g.throughput(Throughput::Bytes(
            bench::all_to_all_bytes(RANKS, bytes) as u64
        ));
        g.bench_with_input(
            BenchmarkId::new("all_to_all_v", bytes),
            &bytes,
            |b, &bytes| b.iter_custom(|iters| on_all(comms, iters, bench::all_to_all_secs, bytes)),
        );
        g.throughput(Throughput::Bytes(bench::ring_bytes(RANKS, bytes) as u64));
        g.bench_with_input(
            BenchmarkId::new("ring_sendrecv", bytes),
            &bytes,
            |b, &bytes| b.iter_custom(|iters| on_all(comms, iters, bench::ring_secs, bytes)),
        );
    }
    g.finish();
}

fn tcp_loopback(c: &mut Criterion) {
    let comms =
        tcp_group(RANKS, &TcpOptions::default(), Duration::from_secs(60)).expect("tcp group");
    collectives(c, "tcp_4_ranks", &comms);
    let mut g = c.benchmark_group("raw_tcp_stream");
    g.sample_size(10);
    for bytes in SIZES {
        let total = bench::all_to_all_bytes(RANKS, bytes) as usize;
        g.throughput(Throughput::Bytes(total as u64));
        g.bench_with_input(BenchmarkId::from_parameter(bytes), &total, |b, &total| {
            b.iter_custom(|iters| {
                let gbps =
                    bench::raw_tcp_gbps(total * iters as usize, 8 << 20).expect("raw stream");
                Duration::from_secs_f64((total * iters as usize) as f64 / gbps / 1e9)
            })
        });
    }
    g.finish();
}

fn inproc(c: &mut Criterion) {
    let comms = in_process(RANKS, Duration::from_secs(60));
    collectives(c, "inproc_4_ranks", &comms);
}

criterion_group!(benches, tcp_loopback, inproc);
criterion_main!(benches);
