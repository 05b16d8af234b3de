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

/// Per-kind totals count each payload byte once on each side, and time spent blocked.
#[test]
fn totals_count_bytes_by_kind_and_the_wait_for_a_late_sender() -> Result<()> {
    use ringmoe_comm::{Kind, Payload, Tag};
    let comms = in_process(3, Duration::from_secs(10));
    let tag = |k| Tag::new(7, 0, 0, k);
    let res = on_every_rank(&comms, |c| -> Result<()> {
        let (me, n) = (c.rank(), c.world_size());
        // A ring step of 10 f32 (40 bytes) each way.
        let got = c.sendrecv(
            (me + 1) % n,
            Payload::f32(vec![me as f32; 10]),
            (me + n - 1) % n,
            tag(Kind::Ring),
        )?;
        assert_eq!(got.byte_len(), 40);
        // An all-to-all of 2 f32 to each other rank; rank 0 posts late.
        if me == 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        c.all_to_all_v(tag(Kind::Dispatch), vec![Payload::f32(vec![1.0; 2]); n])?;
        Ok(())
    });
    for r in res {
        r?;
    }
    for c in &comms {
        let t = c.totals();
        let ring = t.get(Kind::Ring);
        assert_eq!((ring.bytes_sent, ring.bytes_received), (40, 40));
        let d = t.get(Kind::Dispatch);
        assert_eq!(
            (d.bytes_sent, d.bytes_received),
            (16, 16),
            "the own slot moves locally"
        );
        assert_eq!(t.get(Kind::Combine), Default::default());
        if c.rank() != 0 {
            assert!(
                d.wait_secs >= 0.15,
                "rank {} waited {}s for rank 0",
                c.rank(),
                d.wait_secs
            );
        }
        let before = t.clone();
        assert_eq!(c.totals().since(&before).get(Kind::Ring).bytes_sent, 0);
    }
    Ok(())
}
