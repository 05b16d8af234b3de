//! Resident memory of a bf16 checkpoint held as bf16 against the same checkpoint decoded to f32,
//! measured through the RSS of a fresh process per load: this test binary started again on the
//! helper test below (a process that wrote the checkpoint has freed pages a load would reuse).

use anyhow::{Context, Result, ensure};
use ringmoe_core::{DType, WeightPrecision};
use ringmoe_model::{LoadOptions, Model, write_random_checkpoint_as};
use serde_json::json;

fn rss() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no VmRSS in /proc/self/status")?
        .parse()?;
    Ok(kb * 1024)
}

/// Runs the helper in a fresh copy of this test binary: (RSS growth, weight bytes) of one load.
fn load_delta(dir: &std::path::Path, weights: WeightPrecision) -> Result<(u64, usize)> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "load_and_report_rss", "--ignored", "--nocapture"])
        .env("RINGMOE_RSS_DIR", dir)
        .env("RINGMOE_RSS_WEIGHTS", weights.to_string())
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "helper failed: {text}");
    let field = |key: &str| -> Result<u64> {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .with_context(|| format!("no {key} in the helper's output: {text}"))?
            .parse()
            .with_context(|| format!("{key} in {text}"))
    };
    Ok((field("rss_growth=")?, field("weight_bytes=")? as usize))
}

/// Helper for the test below, in its own process: loads `RINGMOE_RSS_DIR` with
/// `RINGMOE_RSS_WEIGHTS` and prints the RSS growth.
#[test]
#[ignore = "helper: run in a fresh process by the bf16 memory test"]
fn load_and_report_rss() -> Result<()> {
    let dir = std::env::var("RINGMOE_RSS_DIR").context("RINGMOE_RSS_DIR")?;
    let weights: WeightPrecision = std::env::var("RINGMOE_RSS_WEIGHTS")
        .context("RINGMOE_RSS_WEIGHTS")?
        .parse()
        .map_err(anyhow::Error::msg)?;
    let before = rss()?;
    let m = Model::load(
        std::path::Path::new(&dir),
        &LoadOptions {
            weights,
            ..LoadOptions::default()
        },
    )?;
    let after = rss()?;
    println!(
        "rss_growth={} weight_bytes={}",
        after.saturating_sub(before),
        m.weight_bytes()
    );
    Ok(())
}

#[test]
fn a_bf16_checkpoint_held_as_bf16_takes_about_half_the_memory_of_f32() -> Result<()> {
    // ~30 M parameters: 60 MB as bf16, 120 MB as f32.
    let cfg = json!({
        "architectures": ["MixtralForCausalLM"], "vocab_size": 8192, "hidden_size": 256,
        "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 4096, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
    });
    let dir = tempfile::tempdir()?;
    write_random_checkpoint_as(dir.path(), &cfg, 3, DType::BF16)?;
    let (bf16_rss, bf16_bytes) = load_delta(dir.path(), WeightPrecision::Native)?;
    let (f32_rss, f32_bytes) = load_delta(dir.path(), WeightPrecision::F32)?;
    let (q8_rss, q8_bytes) = load_delta(dir.path(), WeightPrecision::Q8)?;
    eprintln!(
        "RSS growth: bf16 {:.1} MB ({bf16_bytes} weight bytes), f32 {:.1} MB ({f32_bytes}), q8 {:.1} MB ({q8_bytes})",
        bf16_rss as f64 / 1e6,
        f32_rss as f64 / 1e6,
        q8_rss as f64 / 1e6
    );
    ensure!(
        (bf16_bytes as f64) < 0.51 * f32_bytes as f64,
        "bf16 holds {bf16_bytes} bytes, f32 {f32_bytes}"
    );
    // The measurement sees the load (a process that reused freed pages would not).
    ensure!(
        f32_rss as f64 >= 0.8 * f32_bytes as f64,
        "an f32 load of {f32_bytes} weight bytes grew RSS by only {f32_rss}"
    );
    ensure!(
        (bf16_rss as f64) <= 0.6 * f32_rss as f64,
        "a bf16 load grew RSS by {bf16_rss} bytes, an f32 load by {f32_rss}"
    );
    Ok(())
}
