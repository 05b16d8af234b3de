//! Every collective against the local reference (`testkit`), over in-process ranks and TCP ranks
//! (threads in this process; separate processes are in `processes.rs`), for world sizes 1–8.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{Result, anyhow};
use ringmoe_comm::{Communicator, TcpOptions, in_process, tcp, testkit};

fn run_all(comms: Vec<Communicator>, seed: u64, rounds: u64) -> Result<()> {
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| s.spawn(move || testkit::exercise_all(c, seed, rounds)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("rank panicked".into())))
            .collect()
    });
    for (r, res) in results.into_iter().enumerate() {
        res.map_err(|e| anyhow!("rank {r}: {e}"))?;
    }
    Ok(())
}

/// `n` TCP communicators on 127.0.0.1 free ports, connected from `n` threads.
pub fn tcp_group(n: usize, session: u64, timeout: Duration) -> Result<Vec<Communicator>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<_>>()?;
    let opts = TcpOptions {
        session,
        ..TcpOptions::default()
    };
    std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, opts) = (&addrs, &opts);
                s.spawn(move || tcp(r, l, addrs, opts, timeout))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("rendezvous panicked"))?
                    .map_err(Into::into)
            })
            .collect()
    })
}

#[test]
fn in_process_collectives_match_reference_for_world_sizes_1_to_8() -> Result<()> {
    for n in 1..=8 {
        for seed in [1, 2] {
            run_all(
                in_process(n, Duration::from_secs(10)),
                seed + n as u64 * 10,
                2,
            )?;
        }
    }
    Ok(())
}

#[test]
fn tcp_collectives_match_reference_for_world_sizes_1_to_5() -> Result<()> {
    for n in 1..=5 {
        run_all(
            tcp_group(n, n as u64, Duration::from_secs(10))?,
            3 + n as u64,
            2,
        )?;
    }
    Ok(())
}

#[test]
fn tcp_collectives_match_reference_at_world_size_8() -> Result<()> {
    run_all(tcp_group(8, 8, Duration::from_secs(20))?, 99, 1)
}
