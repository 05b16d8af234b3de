//! `ringmoe gpu-check`: the CUDA kernels against the CPU kernels, the CUDA model against
//! transformers' logits on the fixtures, attention throughput, and prefill / MoE-layer
//! throughput of the bench-size model.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use ringmoe_cuda::check;
use ringmoe_cuda::{CudaBackend, Precision};
use ringmoe_model::{ModelConfig, RandomWeights};
use ringmoe_parallel::{ShardPlan, Sharding};

#[derive(Args, Debug)]
pub struct GpuCheckArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Attention shapes to time, `TOKENS:HEADS:KV_HEADS:HEAD_DIM`, comma-separated (causal,
    /// one sequence).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4096:32:8:128,16384:32:8:128"
    )]
    attention: Vec<String>,
    /// Timed calls per attention shape (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// The fixture models (`scripts/make_fixtures.py`'s output, with transformers' reference
    /// logits) the CUDA model is checked on.
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    /// Prefill / MoE-layer lengths for the bench-size model (random Mixtral, hidden 1024,
    /// 4 layers, 8 experts top-2), comma-separated; empty to skip.
    #[arg(long, value_delimiter = ',', default_value = "2048,16384")]
    model_tokens: Vec<usize>,
    /// Ranks of the NCCL checks (ring attention alone, and the fixtures' distributed prefill and
    /// decode with expert parallelism), rank r on GPU r (one GPU: 1; NCCL cannot put two ranks
    /// on one GPU). The sequence is zigzag-sharded as in the cluster.
    #[arg(long, default_value_t = 1)]
    ring_ranks: usize,
    /// Tokens of the ring-attention check (16 heads, 4 KV heads, head_dim 128).
    #[arg(long, default_value_t = 4096)]
    ring_tokens: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Only compile the kernels with NVRTC for this compute capability (e.g. `9.0`) and list
    /// them: needs libnvrtc, not a GPU or a driver.
    #[arg(long, value_name = "MAJOR.MINOR")]
    compile_only: Option<String>,
}

fn shape(s: &str) -> Result<[usize; 4]> {
    let v: Vec<usize> = s
        .split(':')
        .map(|x| x.parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--attention {s}: want TOKENS:HEADS:KV_HEADS:HEAD_DIM"))?;
    match v[..] {
        [a, b, c, d] => Ok([a, b, c, d]),
        _ => bail!("--attention {s}: want TOKENS:HEADS:KV_HEADS:HEAD_DIM"),
    }
}

pub fn run(a: GpuCheckArgs) -> Result<()> {
    if let Some(cc) = &a.compile_only {
        let (major, minor) = cc
            .split_once('.')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .with_context(|| format!("--compile-only {cc}: want MAJOR.MINOR, e.g. 9.0"))?;
        let kernels = ringmoe_cuda::compile_kernels(major, minor)?;
        println!(
            "compiled for compute_{major}{minor}: {}",
            kernels.join(", ")
        );
        return Ok(());
    }
    let shapes: Vec<[usize; 4]> = a
        .attention
        .iter()
        .map(|s| shape(s))
        .collect::<Result<_>>()?;
    let b = Arc::new(CudaBackend::new(a.device)?);
    let mut checks = check::kernels(&b)?;
    checks.extend(
        check::fixtures(&b, &a.fixtures)
            .with_context(|| format!("fixture models in {}", a.fixtures.display()))?,
    );
    let plan = ShardPlan::new(a.ring_tokens, a.ring_ranks, Sharding::Zigzag)?;
    let (ring_checks, ring_secs) = check::ring_nccl(&plan, 16, 4, 128).context(
        "ring attention over NCCL (needs libnccl.so on LD_LIBRARY_PATH; scripts/gpu-check.sh links it)",
    )?;
    checks.extend(ring_checks);
    checks
        .extend(check::distributed(&a.fixtures, a.ring_ranks).context(
            "the fixtures' ring + expert-parallel prefill and sharded decode over NCCL",
        )?);
    let mut timings = Vec::new();
    for [t, h, kv, d] in shapes {
        timings.push(check::attention_timing(&b, t, h, kv, d, a.iters)?);
    }
    let mut models = Vec::new();
    if !a.model_tokens.is_empty() {
        let cfg = bench_config()?;
        for p in [Precision::Bf16, Precision::F32] {
            models.extend(check::model_timing(
                &b,
                &cfg,
                &RandomWeights { seed: 1 },
                p,
                &a.model_tokens,
                a.iters.clamp(1, 5),
            )?);
        }
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    if a.json {
        let v = serde_json::json!({
            "device": b.describe(),
            "checks": checks.iter().map(|c| serde_json::json!({
                "name": c.name, "rel_err": c.rel_err, "tolerance": c.tolerance, "passed": c.passed(),
            })).collect::<Vec<_>>(),
            "attention": timings.iter().map(|t| serde_json::json!({
                "tokens": t.tokens, "heads": t.heads, "kv_heads": t.kv_heads,
                "head_dim": t.head_dim, "secs": t.secs, "tflops": t.tflops,
            })).collect::<Vec<_>>(),
            "ring": {"ranks": a.ring_ranks, "tokens": a.ring_tokens, "secs_per_rank": ring_secs},
            "model": models.iter().map(|m| serde_json::json!({
                "precision": format!("{:?}", m.precision), "tokens": m.tokens,
                "prefill_secs": m.prefill_secs, "prefill_tokens_per_sec": m.prefill_tokens_per_sec,
                "moe_secs": m.moe_secs, "moe_tokens_per_sec": m.moe_tokens_per_sec,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        println!("device: {}", b.describe());
        println!(
            "{:<72} {:>12} {:>10}  result",
            "check", "rel. error", "tolerance"
        );
        for c in &checks {
            println!(
                "{:<72} {:>12.3e} {:>10.1e}  {}",
                c.name,
                c.rel_err,
                c.tolerance,
                if c.passed() { "ok" } else { "FAILED" }
            );
        }
        println!();
        println!("causal attention (f32, ringmoe kernel)");
        println!(
            "{:>8} {:>6} {:>9} {:>9} {:>10} {:>9}",
            "tokens", "heads", "kv heads", "head dim", "ms", "TFLOP/s"
        );
        for t in &timings {
            println!(
                "{:>8} {:>6} {:>9} {:>9} {:>10.3} {:>9.2}",
                t.tokens,
                t.heads,
                t.kv_heads,
                t.head_dim,
                t.secs * 1e3,
                t.tflops
            );
        }
        println!();
        println!(
            "ring attention over NCCL: {} rank(s), {} tokens (zigzag), 16 heads / 4 KV heads, d 128: {} ms per rank",
            a.ring_ranks,
            a.ring_tokens,
            ring_secs
                .iter()
                .map(|s| format!("{:.3}", s * 1e3))
                .collect::<Vec<_>>()
                .join(" / ")
        );
        if !models.is_empty() {
            println!();
            println!("bench-size model (random Mixtral, hidden 1024, 4 layers, 8 experts top-2)");
            println!(
                "{:>9} {:>8} {:>12} {:>14} {:>12} {:>14}",
                "precision", "tokens", "prefill ms", "prefill tok/s", "MoE ms", "MoE tok/s"
            );
            for m in &models {
                println!(
                    "{:>9} {:>8} {:>12.2} {:>14.0} {:>12.3} {:>14.0}",
                    format!("{:?}", m.precision),
                    m.tokens,
                    m.prefill_secs * 1e3,
                    m.prefill_tokens_per_sec,
                    m.moe_secs * 1e3,
                    m.moe_tokens_per_sec
                );
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} GPU checks failed", checks.len());
    }
    Ok(())
}

/// The bench model of docs/performance.md and `benches/engine.rs`.
fn bench_config() -> Result<ModelConfig> {
    Ok(ModelConfig::from_json(&ringmoe_model::bench_model_config())?)
}
