//! Every collective against the local reference (`testkit`), over in-process ranks and TCP ranks
//! (threads in this process; separate processes are in `processes.rs`), for world sizes 1–8.

use std::time::Duration;

use anyhow::{Result, anyhow};
use ringmoe_comm::local::{on_every_rank, tcp_group};
use ringmoe_comm::{Communicator, TcpOptions, in_process, testkit};

fn run_all(comms: Vec<Communicator>, seed: u64, rounds: u64) -> Result<()> {
    for (r, res) in on_every_rank(&comms, |c| testkit::exercise_all(c, seed, rounds))
        .into_iter()
        .enumerate()
    {
        res.map_err(|e| anyhow!("rank {r}: {e}"))?;
    }
    Ok(())
}

fn tcp(n: usize, session: u64, timeout: Duration) -> Result<Vec<Communicator>> {
    Ok(tcp_group(
        n,
        &TcpOptions {
            session,
            ..TcpOptions::default()
        },
        timeout,
    )?)
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
        run_all(tcp(n, n as u64, Duration::from_secs(10))?, 3 + n as u64, 2)?;
    }
    Ok(())
}

#[test]
fn tcp_collectives_match_reference_at_world_size_8() -> Result<()> {
    run_all(tcp(8, 8, Duration::from_secs(20))?, 99, 1)
}
