//! `ringmoe-ring-link`: ring attention on a constrained link. Each rank is a process
//! (`ringmoe bench ring --rank R --peers …`) in its own network namespace (testkit's
//! `TestNet`); every connection to a rank goes through its own userspace proxy (testkit's
//! `Proxy`), capped at `--cap-mib` MiB/s per direction, so each rank's outgoing K/V crosses one
//! capped link. For each sequence length (block size c = len / ranks tokens per ring step) it
//! runs the ring uncapped and capped and reports, per rank, the time computing and the time
//! blocked waiting for the next block, and the fraction of the transfer hidden behind compute:
//!
//!   measured hidden = 1 − wait / (bytes sent / cap), clamped to [0, 1];
//!   predicted hidden = min(1, C / T), C = compute / ranks the compute of one step, T =
//!   (bytes sent / cap) / (ranks − 1) the transfer of one block (each step's send overlaps
//!   its compute, so only transfer beyond compute shows as waiting);
//!
//! and the Ring Attention paper's threshold c* = F / B in this setting: the block size at
//! which a step's compute (c²·h/2 scored pairs at the measured F pairs/s) equals its transfer
//! (c tokens of K and V, 8·kv_heads·head_dim bytes each, at B bytes/s). Needs root.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use ringmoe_testkit::{Proc, Proxy, TestNet};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Ring attention across namespaces through capped links")]
struct Args {
    /// The `ringmoe` binary.
    #[arg(long)]
    bin: PathBuf,
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    /// Sequence lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [4096usize, 8192, 16384, 32768])]
    lens: Vec<usize>,
    /// The cap of each rank's link, MiB/s per direction.
    #[arg(long, default_value_t = 4.0)]
    cap_mib: f64,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Compute threads per rank (`RAYON_NUM_THREADS`): ranks × threads at most the cores, or
    /// ranks compete for them and the compute figures mean less.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

const PORT: u16 = 7300;

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(a.ranks >= 2, "--ranks: at least 2");
    let cap = a.cap_mib * (1 << 20) as f64;
    let mut rows = Vec::new();
    if !a.json {
        println!(
            "{} ranks, {} heads ({} KV), head_dim {}, cap {} MiB/s per rank and direction",
            a.ranks, a.heads, a.kv_heads, a.head_dim, a.cap_mib
        );
        println!(
            "{:>7} {:>6} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}",
            "len", "c", "link", "wall s", "compute", "wait", "predicted", "measured", "c*"
        );
    }
    for &len in &a.lens {
        for capped in [false, true] {
            let ranks = run_ring(&a, len, capped.then_some(cap))?;
            let (mut compute, mut wait, mut wall, mut bytes, mut pairs) =
                (0.0, 0.0, 0.0f64, 0.0, 0.0);
            for r in &ranks {
                let m = &r["modes"][0];
                compute += m["compute_secs"].as_f64().unwrap_or(0.0);
                wait += m["wait_secs"].as_f64().unwrap_or(0.0);
                wall = wall.max(m["wall_secs"].as_f64().unwrap_or(0.0));
                bytes += m["bytes_sent"].as_f64().unwrap_or(0.0);
                pairs += m["pairs_scored"].as_f64().unwrap_or(0.0);
            }
            let n = ranks.len() as f64;
            let n_ranks = a.ranks as f64;
            let (compute, wait, bytes, pairs) = (compute / n, wait / n, bytes / n, pairs / n);
            // Scored pairs per second per rank (over heads), as this run measured it.
            let f = pairs / compute.max(1e-9);
            let bytes_per_token = (8 * a.kv_heads * a.head_dim) as f64;
            let c_star = 2.0 * f * bytes_per_token / (a.heads as f64 * cap);
            let (predicted, measured) = if capped {
                let transfer = bytes / cap;
                let per_step = (compute / n_ranks) / (transfer / (n_ranks - 1.0));
                (
                    Some(per_step.min(1.0)),
                    Some((1.0 - wait / transfer).clamp(0.0, 1.0)),
                )
            } else {
                (None, None)
            };
            let c = len / a.ranks;
            let link = if capped {
                format!("{}M", a.cap_mib)
            } else {
                "free".into()
            };
            if !a.json {
                let pct = |x: Option<f64>| x.map_or("-".into(), |x| format!("{:.0}%", 100.0 * x));
                println!(
                    "{len:>7} {c:>6} {link:>7} {wall:>8.2} {compute:>8.2} {wait:>8.2} {:>9} {:>9} {c_star:>8.0}",
                    pct(predicted),
                    pct(measured)
                );
            }
            rows.push(json!({
                "len": len, "block_tokens": c, "cap_bytes_per_sec": capped.then_some(cap),
                "wall_secs": wall, "compute_secs": compute, "wait_secs": wait,
                "bytes_sent_per_rank": bytes, "pairs_per_sec": f, "c_star_tokens": c_star,
                "predicted_hidden": predicted, "measured_hidden": measured,
            }));
        }
    }
    if a.json {
        println!(
            "{}",
            json!({"ranks": a.ranks, "heads": a.heads, "kv_heads": a.kv_heads,
                   "head_dim": a.head_dim, "cap_mib": a.cap_mib, "runs": rows})
        );
    }
    Ok(())
}

/// One ring over `len` tokens, each rank in its namespace behind its proxy; every rank's JSON.
fn run_ring(a: &Args, len: usize, cap: Option<f64>) -> Result<Vec<Value>> {
    let net = TestNet::new(a.ranks)?;
    let dir = tempfile::tempdir()?;
    let mut proxies = Vec::new();
    for h in &net.hosts {
        let p = Proxy::start(
            SocketAddr::new(net.client.into(), 0),
            SocketAddr::new(h.addr.into(), PORT),
        )?;
        p.set_rate(cap.map(|c| c as u64));
        proxies.push(p);
    }
    let peers = proxies
        .iter()
        .map(|p| p.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Vec::new();
    for r in 0..a.ranks {
        let mut cmd = net.command(r, &a.bin.to_string_lossy());
        cmd.args(["bench", "ring", "--transport", "tcp", "--json"])
            .args(["--len", &len.to_string(), "--ranks", &a.ranks.to_string()])
            .args(["--heads", &a.heads.to_string()])
            .args(["--kv-heads", &a.kv_heads.to_string()])
            .args(["--head-dim", &a.head_dim.to_string()])
            .args(["--rank", &r.to_string(), "--peers", &peers])
            .args(["--listen", &format!("{}:{PORT}", net.hosts[r].addr)])
            .env("RAYON_NUM_THREADS", a.threads.to_string());
        procs.push(Proc::spawn(&format!("rank-{r}"), cmd, dir.path())?);
    }
    let mut out = Vec::new();
    for (r, p) in procs.iter().enumerate() {
        let rest = p
            .line_after("{\"", Duration::from_secs(1800))
            .with_context(|| {
                let log = std::fs::read_to_string(dir.path().join(format!("rank-{r}.log")));
                format!("rank {r}: {}", log.unwrap_or_default())
            })?;
        out.push(serde_json::from_str(&format!("{{\"{rest}"))?);
    }
    Ok(out)
}
