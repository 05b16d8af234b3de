//! `ringmoe bench ring`: the cost of ring attention against single-rank blockwise attention over
//! the same sequence (random q/k/v, causal), and, per rank, how much of the ring is spent blocked
//! on the next block (communication not hidden behind compute). With sparse modes: the speedup
//! over the dense single-rank baseline and the fraction of its (query, key) pairs scored.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::{Args, ValueEnum};
use ringmoe_comm::local::{on_every_rank, tcp_group};
use ringmoe_comm::{Kind, Tag, TcpOptions, in_process};
use ringmoe_core::attention::AttentionParams;
use ringmoe_core::sparse::{Sparsity, attention_sparse};
use ringmoe_core::testing::rand_vec;
use ringmoe_parallel::{RingStats, ShardPlan, Sharding, ring_attention_mode};

use crate::forward::{AttentionArg, PatternOpts};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Inproc,
    /// TCP on 127.0.0.1, ranks as threads of this process.
    Tcp,
}

#[derive(Args)]
pub struct RingArgs {
    #[arg(long, default_value_t = 65536)]
    len: usize,
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, value_enum, default_value = "inproc")]
    transport: Transport,
    /// Attention modes to run the ring with (repeatable); the single-rank baseline is dense.
    #[arg(long = "attention", value_enum, default_values = ["dense"])]
    modes: Vec<AttentionArg>,
    #[command(flatten)]
    pattern: PatternOpts,
    #[arg(long)]
    json: bool,
    /// One rank of a ring of processes (with --peers): this process's rank. It computes its
    /// shard of the same random q/k/v as every other rank, runs the ring over TCP and prints
    /// its own figures as one JSON object (no single-rank baseline). For rings across hosts or
    /// through a shaped link (`ringmoe-ring-link`).
    #[arg(long, requires = "peers")]
    rank: Option<usize>,
    /// With --rank: every rank's data-plane address as the others reach it, comma-separated,
    /// in rank order (--ranks is their number).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<std::net::SocketAddr>,
    /// With --rank: where this rank listens (default: its own --peers entry).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

/// CPU seconds (user + system) this process has used, from /proc (Linux).
fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

pub fn run(a: RingArgs) -> Result<()> {
    ensure!(
        a.ranks >= 1 && a.len >= 1,
        "--ranks and --len must be positive"
    );
    let p = AttentionParams {
        n_heads: a.heads,
        n_kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        scale: 1.0 / (a.head_dim as f32).sqrt(),
        causal: true,
    };
    let (qw, kw) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
    let q = rand_vec(a.len * qw, 1, 2.0);
    let k = rand_vec(a.len * kw, 2, 2.0);
    let v = rand_vec(a.len * kw, 3, 1.0);
    if let Some(rank) = a.rank {
        return run_rank(&a, rank, &p, (&q, &k, &v));
    }
    let all: Vec<usize> = (0..a.len).collect();

    let (c0, t0) = (cpu_secs(), Instant::now());
    let (_, dense_pairs) = attention_sparse(&p, &Sparsity::Dense, &q, &all, &k, &v, &all)?;
    let (single_wall, single_cpu) = (
        t0.elapsed().as_secs_f64(),
        cpu_secs().zip(c0).map(|(b, a)| b - a),
    );

    let comms = match a.transport {
        Transport::Inproc => in_process(a.ranks, Duration::from_secs(3600)),
        Transport::Tcp => tcp_group(a.ranks, &TcpOptions::default(), Duration::from_secs(3600))?,
    };
    let plan = ShardPlan::new(a.len, a.ranks, Sharding::Zigzag)?;
    let pick = |src: &[f32], w: usize, r: usize| shard_rows(&plan, r, src, w);
    let inputs: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..a.ranks)
        .map(|r| (pick(&q, qw, r), pick(&k, kw, r), pick(&v, kw, r)))
        .collect();
    if !a.json {
        println!(
            "causal attention, L = {}, {} heads ({} KV), head_dim {}",
            a.len, a.heads, a.kv_heads, a.head_dim
        );
        println!(
            "single rank, dense:  wall {single_wall:8.3} s   cpu {}",
            single_cpu.map_or("-".into(), |c| format!("{c:8.3} s"))
        );
    }
    let mut results = Vec::new();
    for (i, &which) in a.modes.iter().enumerate() {
        let mode = a.pattern.mode(which);
        let (c1, t1) = (cpu_secs(), Instant::now());
        let stats = on_every_rank(&comms, |c| -> Result<RingStats> {
            let (q, k, v) = &inputs[c.rank()];
            let tag = Tag::new(1 + i as u64, 0, 0, Kind::Ring);
            Ok(ring_attention_mode(c, &plan, &p, &mode, q, k, v, tag)?.1)
        })
        .into_iter()
        .collect::<Result<Vec<RingStats>>>()?;
        let (ring_wall, ring_cpu) = (
            t1.elapsed().as_secs_f64(),
            cpu_secs().zip(c1).map(|(b, a)| b - a),
        );
        let pairs: u64 = stats.iter().map(|s| s.pairs_scored).sum();
        let sent: u64 = stats.iter().map(|s| s.bytes_sent).sum();
        let ranks: Vec<_> = stats
            .iter()
            .map(|s| {
                json!({"compute_secs": s.compute_secs, "wait_secs": s.wait_secs, "estimate_secs": s.estimate_secs,
                       "blocked_fraction": s.wait_secs / (s.compute_secs + s.wait_secs).max(1e-12),
                       "blocks_computed": s.blocks_computed, "blocks_skipped": s.blocks_skipped,
                       "pairs_scored": s.pairs_scored, "bytes_sent": s.bytes_sent, "peak_block_bytes": s.peak_block_bytes})
            })
            .collect();
        let res = json!({
            "mode": format!("{mode:?}"),
            "ring_wall_secs": ring_wall, "ring_cpu_secs": ring_cpu,
            "cpu_overhead": ring_cpu.zip(single_cpu).map(|(r, s)| r / s - 1.0),
            "wall_overhead": ring_wall / single_wall - 1.0,
            "speedup_vs_single_dense": single_wall / ring_wall,
            "pairs_fraction": pairs as f64 / dense_pairs.max(1) as f64,
            "bytes_sent": sent,
            "per_rank": ranks,
        });
        if !a.json {
            println!(
                "ring, {} ranks {:?}, {mode:?}:\n  wall {ring_wall:8.3} s   cpu {}   cpu vs single dense {}   speedup {:.2}x   pairs scored {:.4} of dense   K/V sent {:.1} MiB",
                a.ranks,
                a.transport,
                ring_cpu.map_or("-".into(), |c| format!("{c:8.3} s")),
                res["cpu_overhead"]
                    .as_f64()
                    .map_or("-".into(), |o| format!("{:+.1}%", o * 100.0)),
                single_wall / ring_wall,
                pairs as f64 / dense_pairs.max(1) as f64,
                sent as f64 / (1 << 20) as f64,
            );
            for (r, s) in stats.iter().enumerate() {
                println!(
                    "  rank {r}: compute {:7.3} s, blocked on next block {:6.3} s ({:4.1}%), estimate {:.3} s, blocks {} computed / {} skipped",
                    s.compute_secs,
                    s.wait_secs,
                    100.0 * s.wait_secs / (s.compute_secs + s.wait_secs).max(1e-12),
                    s.estimate_secs,
                    s.blocks_computed,
                    s.blocks_skipped
                );
            }
        }
        results.push(res);
    }
    let res = json!({
        "len": a.len, "ranks": a.ranks, "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
        "transport": format!("{:?}", a.transport).to_lowercase(),
        "single_wall_secs": single_wall, "single_cpu_secs": single_cpu, "dense_pairs": dense_pairs,
        "modes": results,
    });
    if a.json {
        println!("{res}");
    }
    let _ = res.get("len").context("result")?;
    Ok(())
}

/// Rank `r`'s rows (of width `w`) of `src`, in its shard's position order.
fn shard_rows(plan: &ShardPlan, r: usize, src: &[f32], w: usize) -> Vec<f32> {
    plan.positions(r)
        .iter()
        .flat_map(|&i| src[i * w..(i + 1) * w].iter().copied())
        .collect()
}

/// `--rank`: this process's part of a ring of processes (see [`RingArgs::rank`]).
fn run_rank(
    a: &RingArgs,
    rank: usize,
    p: &AttentionParams,
    (q, k, v): (&[f32], &[f32], &[f32]),
) -> Result<()> {
    let world = a.peers.len();
    ensure!(
        rank < world,
        "--rank {rank} is outside the {world} addresses of --peers"
    );
    let listen = a.listen.unwrap_or(a.peers[rank]);
    let listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let opts = TcpOptions {
        connect_timeout: Duration::from_secs(60),
        ..TcpOptions::default()
    };
    let comm = ringmoe_comm::tcp(rank, listener, &a.peers, &opts, Duration::from_secs(3600))?;
    let plan = ShardPlan::new(a.len, world, Sharding::Zigzag)?;
    let pick = |src: &[f32], w: usize| shard_rows(&plan, rank, src, w);
    let (qw, kw) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
    let (q, k, v) = (pick(q, qw), pick(k, kw), pick(v, kw));
    let mut modes = Vec::new();
    for (i, &which) in a.modes.iter().enumerate() {
        let mode = a.pattern.mode(which);
        // Every rank starts the mode together, so one rank's set-up is not counted as waiting.
        comm.barrier(Tag::new(100 + i as u64, 0, 0, Kind::Barrier))?;
        let t = Instant::now();
        let tag = Tag::new(1 + i as u64, 0, 0, Kind::Ring);
        let (_, s) = ring_attention_mode(&comm, &plan, p, &mode, &q, &k, &v, tag)?;
        modes.push(json!({
            "mode": format!("{mode:?}"), "wall_secs": t.elapsed().as_secs_f64(),
            "compute_secs": s.compute_secs, "wait_secs": s.wait_secs,
            "blocks_computed": s.blocks_computed, "pairs_scored": s.pairs_scored,
            "bytes_sent": s.bytes_sent,
        }));
    }
    println!(
        "{}",
        json!({"rank": rank, "ranks": world, "len": a.len, "heads": a.heads,
               "kv_heads": a.kv_heads, "head_dim": a.head_dim, "modes": modes})
    );
    Ok(())
}
