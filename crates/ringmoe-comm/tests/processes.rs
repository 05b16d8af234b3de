//! TCP ranks as separate OS processes on 127.0.0.1 (the `ringmoe-comm-rank` helper): the full
//! collective suite, and one rank killed (SIGKILL) or frozen (SIGSTOP) in the middle of an
//! `all_to_all_v` or a ring of `sendrecv` — every other rank must report an error within the
//! timeout, never hang.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ringmoe_comm::launch::{self, RankProcess};

fn spawn(n: usize, scenario: &str, timeout_ms: u64) -> Result<Vec<RankProcess>> {
    let program = std::path::Path::new(env!("CARGO_BIN_EXE_ringmoe-comm-rank"));
    Ok(launch::spawn_ranks(program, n, |r| {
        [
            "--rank",
            &r.to_string(),
            "--scenario",
            scenario,
            "--timeout-ms",
            &timeout_ms.to_string(),
            "--bytes",
            "262144",
        ]
        .map(String::from)
        .to_vec()
    })?)
}

/// The final `OK`/`ERR` line of a rank, skipping progress lines, within `limit`.
fn outcome(r: &RankProcess, limit: Duration) -> Result<String> {
    r.line_starting(&["OK", "ERR"], limit)
        .context("rank gave no outcome in time (hung?)")
}

fn wait_for_iteration(r: &RankProcess, iter: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = r
            .next_line(deadline.saturating_duration_since(Instant::now()))
            .context("no progress")?;
        if let Some(i) = line.strip_prefix("ITER ") {
            if i.parse::<u32>()? >= iter {
                return Ok(());
            }
        } else if line.starts_with("ERR") || line.starts_with("OK") {
            bail!("rank finished early: {line}");
        }
    }
}

fn signal(child: &Child, sig: &str) -> Result<()> {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()?;
    ensure!(st.success(), "kill {sig} failed");
    Ok(())
}

#[test]
fn four_processes_run_every_collective_correctly() -> Result<()> {
    let mut ranks = spawn(4, "all", 20_000)?;
    for (i, r) in ranks.iter().enumerate() {
        let line = outcome(r, Duration::from_secs(60))?;
        ensure!(line.starts_with("OK"), "rank {i}: {line}");
    }
    for r in &mut ranks {
        ensure!(r.child.wait()?.success());
    }
    Ok(())
}

/// Kills or freezes `victim` after a few iterations of `scenario`; every other rank must end with
/// an error within the 2 s timeout (plus slack for process scheduling).
fn fault(scenario: &str, sig: &str, victim: usize) -> Result<()> {
    let timeout = Duration::from_secs(2);
    let ranks = spawn(4, scenario, timeout.as_millis() as u64)?;
    wait_for_iteration(&ranks[victim], 3)?;
    let t = Instant::now();
    signal(&ranks[victim].child, sig)?;
    for (i, r) in ranks.iter().enumerate() {
        if i == victim {
            continue;
        }
        let line = outcome(r, timeout * 3)
            .with_context(|| format!("rank {i} after {sig} of rank {victim}"))?;
        ensure!(line.starts_with("ERR"), "rank {i}: {line}");
        ensure!(
            line.contains("lost peer") || line.contains("timed out") || line.contains("poisoned"),
            "rank {i}: unexpected error {line}"
        );
    }
    let elapsed = t.elapsed();
    ensure!(elapsed < timeout * 3, "survivors took {elapsed:?}");
    drop(ranks);
    Ok(())
}

#[test]
fn killing_a_rank_mid_all_to_all_fails_every_other_rank_fast() -> Result<()> {
    fault("fault-a2a", "-KILL", 2)
}

#[test]
fn killing_a_rank_mid_ring_fails_every_other_rank_fast() -> Result<()> {
    fault("fault-ring", "-KILL", 1)
}

#[test]
fn a_frozen_rank_mid_all_to_all_fails_every_other_rank_by_timeout() -> Result<()> {
    fault("fault-a2a", "-STOP", 3)
}
