//! `ringmoe gpu-check`: the CUDA kernels against the CPU kernels, and attention throughput.

use anyhow::{Context, Result, bail};
use clap::Args;
use ringmoe_cuda::CudaBackend;
use ringmoe_cuda::check;

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
    let b = CudaBackend::new(a.device)?;
    let checks = check::kernels(&b)?;
    let mut timings = Vec::new();
    for [t, h, kv, d] in shapes {
        timings.push(check::attention_timing(&b, t, h, kv, d, a.iters)?);
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
        });
        println!("{v}");
    } else {
        println!("device: {}", b.describe());
        println!(
            "{:<44} {:>12} {:>10}  result",
            "check", "rel. error", "tolerance"
        );
        for c in &checks {
            println!(
                "{:<44} {:>12.3e} {:>10.1e}  {}",
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
    }
    if failed > 0 {
        bail!("{failed} of {} GPU checks failed", checks.len());
    }
    Ok(())
}
