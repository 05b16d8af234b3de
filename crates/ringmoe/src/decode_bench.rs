//! `ringmoe bench decode`: greedy decode speed of the CPU engine against the machine's memory
//! bandwidth (a STREAM-like copy in the same run), and `ringmoe bench make-model`: the bench
//! checkpoint written to disk (for other engines to load the same weights).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Args;
use rayon::prelude::*;
use ringmoe_core::DType;
use ringmoe_core::testing::XorShift;
use ringmoe_model::{
    LoadOptions, LogitsFor, Model, Sampler, SamplingParams, bench_model_config,
    write_random_checkpoint_as,
};

#[derive(Args)]
pub struct DecodeArgs {
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    weights: crate::WeightsOpts,
    /// Prompt tokens (random ids) prefilled before decoding.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens decoded greedily after the prompt, one at a time.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Resident set size of this process, from /proc (None where there is no /proc).
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Best of three STREAM "copy" passes over two 256 MiB buffers on every core: bytes read plus
/// bytes written per second.
fn copy_bandwidth() -> f64 {
    const N: usize = 64 << 20; // f32 elements: 256 MiB per buffer, far beyond any cache
    let src = vec![1f32; N];
    let mut dst = vec![0f32; N];
    let chunk = N / (rayon::current_num_threads() * 8).max(1);
    let mut best = 0f64;
    for _ in 0..4 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.max(2.0 * 4.0 * N as f64 / t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    best
}

pub fn run_decode(a: DecodeArgs) -> Result<()> {
    ensure!(
        a.prompt_tokens > 0 && a.new_tokens > 0 && a.repeat > 0,
        "--prompt-tokens, --new-tokens and --repeat must be positive"
    );
    let rss0 = rss_bytes();
    let t = Instant::now();
    let opts = LoadOptions {
        weights: a.weights.weights,
        ..LoadOptions::default()
    };
    let model = Model::load(&a.model, &opts)
        .with_context(|| format!("loading model from {}", a.model.display()))?;
    let load_secs = t.elapsed().as_secs_f64();
    let rss_after_load = rss_bytes();
    let vocab = model.config.vocab_size as u64;
    let prompt: Vec<u32> = XorShift::new(a.seed)
        .take(a.prompt_tokens)
        .map(|s| (s % vocab) as u32)
        .collect();
    let streamed = model.decode_bytes_per_token();
    let mut prefill_rates = Vec::new();
    let mut decode_rates = Vec::new();
    let mut greedy = Sampler::new(SamplingParams::default())?;
    // One untimed round first (allocator and page warm-up), then the timed ones.
    for round in 0..=a.repeat {
        let mut cache = model.new_cache();
        let t = Instant::now();
        let out = model.forward(&prompt, &mut cache, LogitsFor::Last)?;
        let prefill = a.prompt_tokens as f64 / t.elapsed().as_secs_f64();
        let mut next = greedy.sample(out.logits.as_slice());
        let t = Instant::now();
        for _ in 0..a.new_tokens {
            let out = model.forward(&[next], &mut cache, LogitsFor::Last)?;
            next = greedy.sample(out.logits.as_slice());
        }
        let decode = a.new_tokens as f64 / t.elapsed().as_secs_f64();
        if round > 0 {
            prefill_rates.push(prefill);
            decode_rates.push(decode);
        }
    }
    let bw = copy_bandwidth();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (pm, dm) = (
        median(&mut prefill_rates.clone()),
        median(&mut decode_rates.clone()),
    );
    let achieved = dm * streamed as f64;
    let weight_bytes = model.weight_bytes();
    let params = parameter_count(&model);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "weights": a.weights.weights.to_string(),
                "parameters": params,
                "weight_bytes": weight_bytes,
                "bytes_per_parameter": weight_bytes as f64 / params as f64,
                "rss_before_load": rss0,
                "rss_after_load": rss_after_load,
                "load_secs": load_secs,
                "prompt_tokens": a.prompt_tokens,
                "new_tokens": a.new_tokens,
                "prefill_tokens_per_sec": prefill_rates,
                "decode_tokens_per_sec": decode_rates,
                "median_prefill_tokens_per_sec": pm,
                "median_decode_tokens_per_sec": dm,
                "decode_bytes_per_token": streamed,
                "decode_gbytes_per_sec": achieved / 1e9,
                "copy_gbytes_per_sec": bw / 1e9,
                "threads": rayon::current_num_threads(),
            })
        );
    } else {
        let gib = |b: Option<u64>| {
            b.map_or("?".into(), |b| {
                format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
            })
        };
        println!(
            "weights {}: {:.2} GiB for {params} parameters ({:.3} bytes each); RSS {} before load, {} after",
            a.weights.weights,
            weight_bytes as f64 / (1u64 << 30) as f64,
            weight_bytes as f64 / params as f64,
            gib(rss0),
            gib(rss_after_load),
        );
        println!(
            "prefill {}: median {pm:.1} tokens/s; decode {}: median {dm:.1} tokens/s",
            a.prompt_tokens, a.new_tokens
        );
        println!(
            "decode reads {:.1} MB of weights per token: {:.1} GB/s, against {:.1} GB/s copy bandwidth ({:.0}%)",
            streamed as f64 / 1e6,
            achieved / 1e9,
            bw / 1e9,
            100.0 * achieved / bw
        );
    }
    Ok(())
}

/// Parameters of the loaded model, counted from its config (every expert, loaded or not).
fn parameter_count(model: &Model) -> u64 {
    let c = &model.config;
    let (h, v) = (c.hidden_size as u64, c.vocab_size as u64);
    let attn =
        h * (c.num_heads * c.head_dim) as u64 * 2 + h * (c.num_kv_heads * c.head_dim) as u64 * 2;
    let mut total = v * h * if c.tie_word_embeddings { 1 } else { 2 } + h;
    for l in model.layers() {
        total += attn + 2 * h;
        total += match &l.mlp {
            ringmoe_model::layers::Mlp::Dense(m) => 3 * h * m.0.intermediate as u64,
            ringmoe_model::layers::Mlp::Sparse(m) => {
                let e = m.experts.experts.len() as u64;
                let shared = m
                    .shared
                    .as_ref()
                    .map_or(0, |(s, _)| 3 * h * s.0.intermediate as u64 + h);
                e * h + e * 3 * h * c.moe.expert_intermediate_size as u64 + shared
            }
        };
    }
    total
}

#[derive(Args)]
pub struct MakeModelArgs {
    /// Directory to write (config.json + model.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Storage type of every tensor: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run_make_model(a: MakeModelArgs) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => anyhow::bail!("--dtype {other:?}: want f32, bf16 or f16"),
    };
    write_random_checkpoint_as(&a.out, &bench_model_config(), a.seed, dtype)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote the bench model ({}) to {}", a.dtype, a.out.display());
    Ok(())
}
