//! Deterministic scenarios that exercise a communicator and check every result against a local
//! reference. The same scenarios run over in-process ranks, TCP ranks in threads, and TCP ranks in
//! separate OS processes (the `ringmoe-comm-rank` helper), so every transport is held to the same
//! answers.

use ringmoe_core::DType;
use ringmoe_core::testing::XorShift;

use crate::{Communicator, Data, Kind, Payload, ReduceOp, Tag};

const DTYPES: [DType; 6] = [
    DType::F32,
    DType::BF16,
    DType::F16,
    DType::I32,
    DType::I64,
    DType::U8,
];

/// Element count that rank `src` sends to rank `dst` in round `round`: uneven, often zero.
pub fn count(seed: u64, round: u64, src: usize, dst: usize) -> usize {
    let h = XorShift::new(seed ^ (round << 32) ^ ((src as u64) << 16) ^ dst as u64)
        .nth(2)
        .unwrap_or(0);
    match h % 5 {
        0 => 0,
        1 => 1,
        _ => (h >> 8) as usize % 3000,
    }
}

/// The payload `src` sends `dst`: values derived from (seed, round, src, dst, index) in `dtype`.
pub fn payload(dtype: DType, seed: u64, round: u64, src: usize, dst: usize) -> Payload {
    let n = count(seed, round, src, dst);
    let base = (seed as i64 * 31 + round as i64 * 7 + src as i64 * 1000 + dst as i64 * 13) % 97;
    let v = |k: usize| ((base + k as i64) % 251) as f32 - 125.0;
    let data = match dtype {
        DType::F32 => Data::F32((0..n).map(|k| v(k) * 0.5).collect()),
        DType::BF16 => Data::BF16((0..n).map(|k| half::bf16::from_f32(v(k))).collect()),
        DType::F16 => Data::F16((0..n).map(|k| half::f16::from_f32(v(k))).collect()),
        DType::I32 => Data::I32((0..n).map(|k| v(k) as i32 * 1_000_003).collect()),
        DType::I64 => Data::I64((0..n).map(|k| v(k) as i64 * 1_000_000_007_000).collect()),
        DType::U8 => Data::U8((0..n).map(|k| (v(k) as i32 + 125) as u8).collect()),
    };
    Payload {
        shape: vec![n],
        data,
    }
}

fn expect_eq(what: &str, got: &Payload, want: &Payload) -> Result<(), String> {
    if got != want {
        return Err(format!(
            "{what}: got {} , expected {}",
            got.describe(),
            want.describe()
        ));
    }
    Ok(())
}

/// Every collective, every dtype, `rounds` times. Returns a description of the first mismatch.
pub fn exercise_all(comm: &Communicator, seed: u64, rounds: u64) -> Result<(), String> {
    let (me, n) = (comm.rank(), comm.world_size());
    let e = |e: crate::CommError| e.to_string();
    for round in 0..rounds {
        for (di, &dtype) in DTYPES.iter().enumerate() {
            let tag = Tag::new(seed, round as u32, di as u32, Kind::AllToAll);
            let sends = (0..n).map(|j| payload(dtype, seed, round, me, j)).collect();
            let got = comm.all_to_all_v(tag, sends).map_err(e)?;
            for (j, p) in got.iter().enumerate() {
                expect_eq(
                    &format!("all_to_all_v {dtype:?} round {round} from {j}"),
                    p,
                    &payload(dtype, seed, round, j, me),
                )?;
            }

            let gathered = comm
                .all_gather(tag, payload(dtype, seed, round, me, me))
                .map_err(e)?;
            for (j, p) in gathered.iter().enumerate() {
                expect_eq(
                    &format!("all_gather {dtype:?} from {j}"),
                    p,
                    &payload(dtype, seed, round, j, j),
                )?;
            }
        }

        // A full ring: every block visits every rank, as in ring attention.
        if n > 1 {
            let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
            let mut block = payload(DType::F32, seed, round, me, 0);
            for step in 0..n - 1 {
                let tag = Tag::new(seed, round as u32, step as u32, Kind::Ring);
                block = comm.sendrecv(next, block, prev, tag).map_err(e)?;
                let origin = (me + n - 1 - step) % n;
                expect_eq(
                    &format!("ring step {step}"),
                    &block,
                    &payload(DType::F32, seed, round, origin, 0),
                )?;
            }
        }

        // All-reduce: every rank must get the same bits as the rank-order reduction.
        let len = 1 + count(seed, round, 99, 99);
        let mine = |r: usize| -> Vec<f32> {
            (0..len)
                .map(|k| ((r * 7 + k * 3) % 23) as f32 * 0.37 - 4.0)
                .collect()
        };
        for op in [ReduceOp::Sum, ReduceOp::Max] {
            let mut data = mine(me);
            comm.all_reduce(
                Tag::new(seed, round as u32, 0, Kind::AllReduce),
                &mut data,
                op,
            )
            .map_err(e)?;
            let mut want = mine(0);
            for r in 1..n {
                for (a, b) in want.iter_mut().zip(mine(r)) {
                    *a = match op {
                        ReduceOp::Sum => *a + b,
                        ReduceOp::Max => a.max(b),
                    };
                }
            }
            if data != want {
                return Err(format!("all_reduce {op:?} round {round} differs"));
            }
        }

        // Point to point: rank 0 asks every rank, each answers.
        let tag = Tag::new(seed, round as u32, 0, Kind::Data);
        if me == 0 {
            for j in 1..n {
                comm.send(j, tag, payload(DType::I64, seed, round, 0, j))
                    .map_err(e)?;
            }
            for j in 1..n {
                let p = comm
                    .recv_expect(j, tag, DType::I64, &[count(seed, round, j, 0)])
                    .map_err(e)?;
                expect_eq(
                    &format!("reply from {j}"),
                    &p,
                    &payload(DType::I64, seed, round, j, 0),
                )?;
            }
        } else {
            let p = comm.recv(0, tag).map_err(e)?;
            expect_eq(
                "request from 0",
                &p,
                &payload(DType::I64, seed, round, 0, me),
            )?;
            comm.send(0, tag, payload(DType::I64, seed, round, me, 0))
                .map_err(e)?;
        }
        comm.barrier(Tag::new(seed, round as u32, 0, Kind::Barrier))
            .map_err(e)?;
    }
    Ok(())
}
