//! `ringmoe bench comm`: all_to_all_v and ring sendrecv throughput per message size, as
//! nccl-tests' `all_to_all_perf` reports it, with the raw TCP stream of this machine beside the TCP
//! numbers. TCP ranks are separate processes on 127.0.0.1 (this binary's hidden `bench comm-rank`).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::{Args, ValueEnum};
use ringmoe_comm::local::on_every_rank;
use ringmoe_comm::{Communicator, TcpOptions, bench, in_process, launch};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Inproc,
    Tcp,
    Nccl,
}

#[derive(Args)]
pub struct CommArgs {
    #[arg(long, value_enum, default_value = "tcp")]
    transport: Transport,
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    /// Bytes per rank, comma-separated, with K/M/G suffixes (binary).
    #[arg(long, default_value = "1M,4M,16M,64M")]
    bytes: String,
    /// Timed calls per size (after one warm-up); fewer than ~30 mostly measures thread wake-ups.
    #[arg(long, default_value_t = 30)]
    iters: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: DataTlsArgs,
}

/// TLS on every TCP link, as `worker --data-tls` runs it: each rank presents this certificate
/// and requires one the CA signed from its peers.
#[derive(Args, Clone, Debug, Default)]
pub struct DataTlsArgs {
    /// PEM certificate every rank presents (TCP transport only).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// PEM CA that signed every rank's certificate.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<std::path::PathBuf>,
}

impl DataTlsArgs {
    fn options(&self) -> Result<TcpOptions> {
        let tls = match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(c), Some(k), Some(ca)) => {
                let (server, client) =
                    ringmoe_proto::tls::data_plane(&ringmoe_proto::tls::TlsFiles {
                        cert: Some(c.clone()),
                        key: Some(k.clone()),
                        ca: Some(ca.clone()),
                    })?;
                Some(ringmoe_comm::DataTls { server, client })
            }
            _ => None,
        };
        Ok(TcpOptions {
            tls,
            ..TcpOptions::default()
        })
    }

    /// The same flags for a rank process.
    fn args(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (flag, p) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ] {
            if let Some(p) = p {
                v.push(flag.to_string());
                v.push(p.display().to_string());
            }
        }
        v
    }
}

#[derive(Args)]
pub struct CommRankArgs {
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    bytes: String,
    #[arg(long)]
    iters: u32,
    #[command(flatten)]
    tls: DataTlsArgs,
}

fn parse_sizes(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|t| {
            let t = t.trim();
            let (num, mul) = match t.chars().last() {
                Some('K' | 'k') => (&t[..t.len() - 1], 1usize << 10),
                Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
                Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
                _ => (t, 1),
            };
            let n: usize = num.parse().with_context(|| format!("bad size {t:?}"))?;
            n.checked_mul(mul).context("size overflows")
        })
        .collect()
}

/// Seconds per all_to_all_v and per ring step on this rank, for each size.
fn measure(comm: &Communicator, sizes: &[usize], iters: u32) -> Result<Vec<(f64, f64)>> {
    sizes
        .iter()
        .map(|&b| {
            Ok((
                bench::all_to_all_secs(comm, b, iters)?,
                bench::ring_secs(comm, b, iters)?,
            ))
        })
        .collect()
}

pub fn run_rank(a: CommRankArgs) -> Result<()> {
    let sizes = parse_sizes(&a.bytes)?;
    let comm = launch::join_tcp(a.rank, &a.tls.options()?, Duration::from_secs(120))?;
    let res = measure(&comm, &sizes, a.iters)?;
    println!("RESULT {}", json!(res));
    Ok(())
}

pub fn run(a: CommArgs) -> Result<()> {
    let sizes = parse_sizes(&a.bytes)?;
    ensure!(
        a.ranks >= 1 && a.iters >= 1,
        "--ranks and --iters must be at least 1"
    );
    let tls = a.tls.tls_cert.is_some();
    ensure!(
        !tls || a.transport == Transport::Tcp,
        "--tls-cert applies to the TCP transport only"
    );
    // Checked here, before any rank starts.
    a.tls.options()?;
    // Per size: the slowest rank's seconds for (all_to_all_v, ring step).
    let per_rank: Vec<Vec<(f64, f64)>> = match a.transport {
        // One thread per rank, rank r on GPU r; without `--features cuda` this says so.
        Transport::Nccl => ringmoe_comm::nccl::bench_threads(a.ranks, &sizes, a.iters)?,
        Transport::Inproc => {
            let comms = in_process(a.ranks, Duration::from_secs(120));
            on_every_rank(&comms, |c| measure(c, &sizes, a.iters))
                .into_iter()
                .collect::<Result<_>>()?
        }
        Transport::Tcp => {
            let exe = std::env::current_exe()?;
            let ranks = launch::spawn_ranks(&exe, a.ranks, |r| {
                [
                    "bench",
                    "comm-rank",
                    "--rank",
                    &r.to_string(),
                    "--bytes",
                    &a.bytes,
                    "--iters",
                    &a.iters.to_string(),
                ]
                .map(String::from)
                .into_iter()
                .chain(a.tls.args())
                .collect()
            })?;
            ranks
                .iter()
                .enumerate()
                .map(|(r, p)| {
                    let line = p
                        .line_starting(&["RESULT "], Duration::from_secs(600))
                        .with_context(|| format!("rank {r} gave no result"))?;
                    Ok(serde_json::from_str(&line["RESULT ".len()..])?)
                })
                .collect::<Result<_>>()?
        }
    };
    let mut rows = Vec::new();
    for (i, &b) in sizes.iter().enumerate() {
        let a2a = per_rank.iter().map(|r| r[i].0).fold(0.0, f64::max);
        let ring = per_rank.iter().map(|r| r[i].1).fold(0.0, f64::max);
        let a2a_gbps = bench::all_to_all_bytes(a.ranks, b) / a2a / 1e9;
        let ring_gbps = if a.ranks > 1 {
            bench::ring_bytes(a.ranks, b) / ring / 1e9
        } else {
            0.0
        };
        let raw = if a.transport == Transport::Tcp {
            let total =
                (bench::all_to_all_bytes(a.ranks, b) as usize * a.iters as usize).max(64 << 20);
            Some(bench::raw_tcp_gbps(
                total,
                TcpOptions::default().socket_buffer_bytes,
            )?)
        } else {
            None
        };
        rows.push(json!({
            "bytes_per_rank": b, "all_to_all_v_gbps": a2a_gbps, "ring_sendrecv_gbps": ring_gbps, "raw_tcp_gbps": raw,
            "all_to_all_v_vs_raw": raw.map(|r| a2a_gbps / r), "ring_sendrecv_vs_raw": raw.map(|r| ring_gbps / r),
        }));
    }
    if a.json {
        println!(
            "{}",
            json!({"transport": format!("{:?}", a.transport).to_lowercase(), "tls": tls, "ranks": a.ranks, "iters": a.iters, "rows": rows})
        );
        return Ok(());
    }
    println!(
        "transport {:?}{}, {} ranks{}, {} iterations; GB/s of bytes crossing between ranks",
        a.transport,
        if tls { " over TLS" } else { "" },
        a.ranks,
        if a.transport == Transport::Tcp {
            " (separate processes on 127.0.0.1)"
        } else {
            ""
        },
        a.iters
    );
    println!(
        "{:>12} {:>16} {:>16} {:>12} {:>10} {:>10}",
        "bytes/rank", "all_to_all_v", "ring sendrecv", "raw TCP", "a2a/raw", "ring/raw"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().map_or("-".to_string(), |v| format!("{v:.2}"));
        println!(
            "{:>12} {:>16} {:>16} {:>12} {:>10} {:>10}",
            r["bytes_per_rank"],
            f("all_to_all_v_gbps"),
            f("ring_sendrecv_gbps"),
            f("raw_tcp_gbps"),
            f("all_to_all_v_vs_raw"),
            f("ring_sendrecv_vs_raw")
        );
    }
    Ok(())
}
