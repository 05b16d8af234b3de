//! A job's shard as the coordinator streams it: the header is bound-checked before anything is
//! allocated, the shard plan is built from it once (the sharding travels in the header), and the
//! token and target chunks must fill exactly this rank's positions.

use ringmoe_plan::{ShardPlan, Sharding};
use ringmoe_proto::proto::{self, shard_chunk};
use tonic::{Status, Streaming};

/// Most ranks a job may have; a header naming more is refused before any plan is built.
pub(crate) const MAX_WORLD: usize = 4096;

/// This rank's part of a job's sequence.
pub(crate) struct Shard {
    pub job_id: u64,
    pub rank: usize,
    /// The whole job's plan, built once from the header.
    pub plan: ShardPlan,
    pub tokens: Vec<u32>,
    /// Next-token targets in score mode (`u32::MAX` where a position has none), else empty.
    pub targets: Vec<u32>,
}

impl Shard {
    pub fn world(&self) -> usize {
        self.plan.world()
    }
}

fn invalid(msg: String) -> Status {
    Status::invalid_argument(msg)
}

/// The most positions any rank holds under `kind` (from the arithmetic, before any plan exists).
fn largest_shard(len: u64, world: u64, kind: Sharding) -> u64 {
    match kind {
        Sharding::Contiguous => len.div_ceil(world),
        Sharding::Zigzag => 2 * len.div_ceil(2 * world),
    }
}

/// Bytes of plan per position of the whole sequence: the plan lists every rank's positions.
const PLAN_BYTES_PER_POSITION: u64 = std::mem::size_of::<usize>() as u64;

/// Checks a shard header against what this worker can hold and returns the plan it names.
/// `max_tokens` is how many tokens of K/V this worker's budget holds for the loaded model;
/// `kv_budget_bytes` that budget, a quarter of which the plan itself may take.
pub(crate) fn plan_of(
    h: &proto::ShardHeader,
    max_tokens: u64,
    kv_budget_bytes: u64,
) -> Result<ShardPlan, Status> {
    let kind = match proto::Sharding::try_from(h.sharding) {
        Ok(proto::Sharding::Zigzag) => Sharding::Zigzag,
        Ok(proto::Sharding::Contiguous) => Sharding::Contiguous,
        Ok(proto::Sharding::Unspecified) => {
            return Err(invalid(format!(
                "job {}: the shard header names no sharding (zigzag or contiguous)",
                h.job_id
            )));
        }
        Err(_) => {
            return Err(invalid(format!(
                "job {}: unknown sharding {} in the shard header",
                h.job_id, h.sharding
            )));
        }
    };
    let world = h.world as usize;
    if world == 0 || world > MAX_WORLD {
        return Err(invalid(format!(
            "job {}: a world of {world} ranks; a job has 1 to {MAX_WORLD}",
            h.job_id
        )));
    }
    if h.rank >= h.world {
        return Err(invalid(format!(
            "job {}: rank {} outside a world of {world}",
            h.job_id, h.rank
        )));
    }
    // Two positions of slack: zigzag chunks differ by one token, and the coordinator's
    // capacity check is on the whole sequence.
    let largest = largest_shard(h.sequence_len, h.world as u64, kind);
    if largest > max_tokens.saturating_add(2) {
        return Err(invalid(format!(
            "job {}: a sequence of {} tokens over {world} ranks puts up to {largest} on a rank, \
             but this worker's K/V budget holds {max_tokens}",
            h.job_id, h.sequence_len
        )));
    }
    // The plan holds every rank's positions, so its size follows the whole sequence, not this
    // rank's shard: a header naming many ranks could otherwise make a small shard cost
    // gigabytes of plan (a fuzzing find: 248M tokens over 1,006 ranks).
    let most = kv_budget_bytes / 4 / PLAN_BYTES_PER_POSITION;
    if h.sequence_len > most {
        return Err(invalid(format!(
            "job {}: a sequence of {} tokens needs a plan of that many positions, more than \
             this worker's K/V budget allows ({most})",
            h.job_id, h.sequence_len
        )));
    }
    let len = usize::try_from(h.sequence_len).map_err(|_| {
        invalid(format!(
            "job {}: sequence length {} does not fit",
            h.job_id, h.sequence_len
        ))
    })?;
    ShardPlan::new(len, world, kind).map_err(|e| invalid(format!("job {}: {e}", h.job_id)))
}

/// Receives a shard stream: header, then token chunks (and target chunks in score mode).
pub(crate) async fn receive_shard(
    stream: &mut Streaming<proto::ShardChunk>,
    max_tokens: u64,
    kv_budget_bytes: u64,
) -> Result<Shard, Status> {
    let header = match stream.message().await? {
        Some(proto::ShardChunk {
            part: Some(shard_chunk::Part::Header(h)),
        }) => h,
        _ => return Err(invalid("a shard stream starts with its header".into())),
    };
    let plan = plan_of(&header, max_tokens, kv_budget_bytes)?;
    let rank = header.rank as usize;
    let want = plan.positions(rank).len();
    let (mut tokens, mut targets) = (Vec::with_capacity(want), Vec::new());
    while let Some(chunk) = stream.message().await? {
        match chunk.part {
            Some(shard_chunk::Part::Tokens(t)) => tokens.extend(t.ids),
            Some(shard_chunk::Part::Targets(t)) => targets.extend(t.ids),
            _ => return Err(invalid("a second shard header".into())),
        }
        if tokens.len() > want || targets.len() > want {
            return Err(invalid(format!(
                "more than the {want} tokens of rank {rank}'s shard"
            )));
        }
    }
    if tokens.len() != want || !(targets.is_empty() || targets.len() == want) {
        return Err(invalid(format!(
            "rank {rank}'s shard has {want} positions; got {} tokens and {} targets",
            tokens.len(),
            targets.len()
        )));
    }
    Ok(Shard {
        job_id: header.job_id,
        rank,
        plan,
        tokens,
        targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(rank: u32, world: u32, len: u64, sharding: proto::Sharding) -> proto::ShardHeader {
        proto::ShardHeader {
            job_id: 7,
            rank,
            world,
            sequence_len: len,
            sharding: sharding as i32,
        }
    }

    #[test]
    fn hostile_headers_are_refused_before_a_plan_is_built() {
        let z = proto::Sharding::Zigzag;
        let cases = [
            (header(0, 1 << 31, 100, z), "a world of 2147483648 ranks"),
            (header(0, 0, 100, z), "a world of 0 ranks"),
            (header(5, 4, 100, z), "rank 5 outside a world of 4"),
            (header(0, 2, 1 << 63, z), "K/V budget holds 1000"),
            // Within the rank's budget, but a plan of 248M positions (found by fuzzing).
            (
                header(0, 1006, 248_000_000, proto::Sharding::Contiguous),
                "needs a plan of that many positions",
            ),
            (
                header(0, 2, 100, proto::Sharding::Unspecified),
                "names no sharding",
            ),
        ];
        for (h, needle) in cases {
            let max_tokens = if h.world == 1006 { 1 << 20 } else { 1000 };
            let e = plan_of(&h, max_tokens, 1 << 30).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message().contains(needle),
                "{needle:?} not in {:?}",
                e.message()
            );
        }
        let mut bad = header(0, 2, 100, z);
        bad.sharding = 99;
        assert!(
            plan_of(&bad, 1000, 1 << 30)
                .unwrap_err()
                .message()
                .contains("unknown sharding 99")
        );
    }

    #[test]
    fn the_header_names_the_plan() {
        for (s, kind) in [
            (proto::Sharding::Zigzag, Sharding::Zigzag),
            (proto::Sharding::Contiguous, Sharding::Contiguous),
        ] {
            let p = plan_of(&header(1, 3, 1000, s), 1000, 1 << 30).unwrap();
            assert_eq!(p, ShardPlan::new(1000, 3, kind).unwrap());
            // The arithmetic bound is what the plan really does.
            let most = (0..3).map(|r| p.positions(r).len()).max().unwrap() as u64;
            assert!(most <= largest_shard(1000, 3, kind));
        }
    }
}
