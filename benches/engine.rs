//! Criterion benchmarks of the single-process engine on a bench-size random Mixtral (vocab 32000,
//! hidden 1024, intermediate 2816, 4 layers, 16 heads, 8 KV heads, 8 experts, top-2):
//! prefill tokens/s at 512 and 2048 tokens, the grouped expert GEMM, and the attention kernel;
//! decode steps and one expert's GEMV with the weights held as f32, bf16 and q8; one expert's
//! prefill GEMM (512 rows) per format; decode attention (one query, 4096 keys).
//!
//! Run: `cargo bench -p ringmoe-model --bench engine`. Numbers go to docs/performance.md.

#![allow(clippy::expect_used)] // Benchmark set-up: a failure here is a bug in the bench itself.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringmoe_core::attention::{AttentionParams, attention_block};
use ringmoe_core::gemm::Par;
use ringmoe_core::gemv::Isa;
use ringmoe_core::{WeightFormat, WeightPrecision, Weights};
use ringmoe_model::moe::{ExpertSet, ExpertWeights, expert_compute};
use ringmoe_model::{LoadOptions, LogitsFor, Model, ModelConfig, RandomWeights, TensorSource};

fn bench_config() -> ModelConfig {
    ModelConfig::from_json(&ringmoe_model::bench_model_config()).expect("bench config is valid")
}

fn tokens(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % vocab)
        .collect()
}

fn prefill(c: &mut Criterion) {
    let model = Model::from_checkpoint(
        bench_config(),
        &RandomWeights { seed: 1 },
        &LoadOptions::default(),
    )
    .expect("model");
    let mut g = c.benchmark_group("prefill");
    g.sample_size(10);
    for n in [512usize, 2048] {
        let ids = tokens(n, 32000);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &ids, |b, ids| {
            b.iter(|| {
                model
                    .forward(ids, &mut model.new_cache(), LogitsFor::Last)
                    .expect("forward")
            })
        });
    }
    g.finish();
}

fn expert_gemm(c: &mut Criterion) {
    let (h, i, e, rows) = (1024, 2816, 8, 512);
    let src = RandomWeights { seed: 2 };
    let load = |name: &str, shape: &[usize]| src.load(name, shape).expect("random").into_vec();
    let set = ExpertSet {
        layer: 0,
        experts: (0..e)
            .map(|k| {
                Some(
                    ExpertWeights::from_f32(
                        h,
                        i,
                        load(&format!("e{k}.gate_up"), &[2 * i, h]),
                        load(&format!("e{k}.down"), &[h, i]),
                    )
                    .expect("expert"),
                )
            })
            .collect(),
    };
    let x = load("x", &[e * rows, h]);
    let groups: Vec<(usize, usize)> = (0..e).map(|k| (k, rows)).collect();
    let mut g = c.benchmark_group("expert_gemm");
    g.sample_size(10);
    // Throughput in FLOPs: criterion's "elements/s" then reads as FLOP/s.
    g.throughput(Throughput::Elements(6 * (e * rows * h * i) as u64));
    g.bench_function("8x512_h1024_i2816", |b| {
        b.iter(|| expert_compute(&x, h, &groups, &set).expect("experts"))
    });
    g.finish();
}

/// Random q (`lq` rows), k and v (`l` rows) for 16 heads, 8 KV heads, d = 64, positions `0..l`.
type AttentionInputs = (AttentionParams, Vec<f32>, Vec<f32>, Vec<f32>, Vec<usize>);

fn attention_inputs(lq: usize, l: usize, seed: u64) -> AttentionInputs {
    let (hq, hkv, d) = (16, 8, 64);
    let src = RandomWeights { seed };
    let q = src.load("q", &[lq, hq * d]).expect("q").into_vec();
    let k = src.load("k", &[l, hkv * d]).expect("k").into_vec();
    let v = src.load("v", &[l, hkv * d]).expect("v").into_vec();
    let p = AttentionParams {
        n_heads: hq,
        n_kv_heads: hkv,
        head_dim: d,
        scale: 1.0 / 8.0,
        causal: true,
    };
    (p, q, k, v, (0..l).collect())
}

fn attention(c: &mut Criterion) {
    let (l, hq, d) = (2048usize, 16, 64);
    let (p, q, k, v, pos) = attention_inputs(l, l, 3);
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    // Causal FLOPs: QKᵀ and PV over half the score matrix.
    g.throughput(Throughput::Elements((2 * 2 * l * l * d * hq / 2) as u64));
    g.bench_function("causal_2048_h16_kv8_d64", |b| {
        b.iter(|| attention_block(&p, &q, &pos, &k, &v, &pos).expect("attention"))
    });
    g.finish();
}

fn swiglu(c: &mut Criterion) {
    // One layer's worth of routed rows of the bench model: 4096 rows × intermediate 2816.
    let (rows, inter) = (4096usize, 2816);
    let gu = RandomWeights { seed: 4 }
        .load("gate_up", &[rows, 2 * inter])
        .expect("gate_up")
        .into_vec();
    let mut g = c.benchmark_group("swiglu");
    g.sample_size(10);
    g.throughput(Throughput::Elements((rows * inter) as u64));
    g.bench_function("4096x2816", |b| {
        b.iter(|| ringmoe_core::ops::swiglu_fused(&gu, rows, inter).expect("swiglu"))
    });
    g.finish();
}

/// One decode step (a token after a 512-token prompt) with the matrices held as f32, bf16, q8.
fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    for p in [
        WeightPrecision::F32,
        WeightPrecision::BF16,
        WeightPrecision::Q8,
    ] {
        let opts = LoadOptions {
            weights: p,
            ..LoadOptions::default()
        };
        let model = Model::from_checkpoint(bench_config(), &RandomWeights { seed: 1 }, &opts)
            .expect("model");
        let mut cache = model.new_cache();
        model
            .forward(&tokens(512, 32000), &mut cache, LogitsFor::Last)
            .expect("prompt");
        g.bench_function(p.name(), |b| {
            b.iter_batched(
                || cache.clone(),
                |mut cache| {
                    model
                        .forward(&[7], &mut cache, LogitsFor::Last)
                        .expect("decode")
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

/// One expert's gate/up matrix (5632 × 1024) times one activation row, per format and kernel:
/// bytes of weights read per second.
fn gemv(c: &mut Criterion) {
    let (n, k) = (2 * 2816, 1024);
    let src = RandomWeights { seed: 5 };
    let w = src.load("w", &[n, k]).expect("w").into_vec();
    let x = src.load("x", &[1, k]).expect("x").into_vec();
    let mut g = c.benchmark_group("gemv");
    g.sample_size(30);
    for f in [WeightFormat::F32, WeightFormat::BF16, WeightFormat::Q8] {
        let wt = Weights::from_f32_as(w.clone(), n, k, f).expect("weights");
        g.throughput(Throughput::Bytes(wt.bytes() as u64));
        for isa in Isa::available() {
            g.bench_function(format!("{f}_{isa:?}_5632x1024"), |b| {
                b.iter(|| wt.matmul_nt_isa(&x, 1, Par::Serial, isa).expect("gemv"))
            });
        }
    }
    g.finish();
}

/// One expert's gate/up matrix (5632 × 1024) times 512 activation rows, per format (q8 per
/// kernel): multiply-adds per second.
fn matmul_prefill(c: &mut Criterion) {
    let (n, k, m) = (2 * 2816, 1024, 512);
    let src = RandomWeights { seed: 6 };
    let w = src.load("w", &[n, k]).expect("w").into_vec();
    let x = src.load("x", &[m, k]).expect("x").into_vec();
    let mut g = c.benchmark_group("matmul_prefill");
    g.sample_size(10);
    g.throughput(Throughput::Elements((n * k * m) as u64));
    for f in [WeightFormat::F32, WeightFormat::BF16, WeightFormat::Q8] {
        let wt = Weights::from_f32_as(w.clone(), n, k, f).expect("weights");
        let isas = if f == WeightFormat::Q8 {
            Isa::available()
        } else {
            vec![Isa::detect()]
        };
        for isa in isas {
            g.bench_function(format!("{f}_{isa:?}_512x1024x5632"), |b| {
                b.iter(|| wt.matmul_nt_isa(&x, m, Par::Rayon, isa).expect("matmul"))
            });
        }
    }
    g.finish();
}

/// One decode query against 4096 cached keys (16 heads, 8 KV heads, d 64): K/V bytes per second.
fn attention_decode(c: &mut Criterion) {
    let (l, hkv, d) = (4096usize, 8, 64);
    let (p, q, k, v, pos) = attention_inputs(1, l, 7);
    let mut g = c.benchmark_group("attention_decode");
    g.sample_size(30);
    g.throughput(Throughput::Bytes((2 * l * hkv * d * 4) as u64));
    g.bench_function("1x4096_h16_kv8_d64", |b| {
        b.iter(|| attention_block(&p, &q, &[l - 1], &k, &v, &pos).expect("attention"))
    });
    g.finish();
}

criterion_group!(
    benches,
    matmul_prefill,
    attention_decode,
    attention,
    swiglu,
    expert_gemm,
    prefill,
    decode,
    gemv
);
criterion_main!(benches);
