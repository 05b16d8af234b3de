//! Sparse prefill across ranks: the attention mode a job picks, and the distributed estimate of a
//! vertical-slash pattern.
//!
//! The estimate needs the last `last_q` queries against every key. Keys stay where they are:
//! 1. all-gather the last queries (at most `last_q` rows, usually on one or two ranks);
//! 2. each rank computes, per (last query, head), the max and exp-sum of its scores over its own
//!    keys; all-gather those and combine them into each row's log-sum-exp;
//! 3. each rank scores its own keys (vertical) and the offsets its keys produce (slash); it
//!    all-gathers its best `vertical` columns per head and the slash sums over the offset ranges
//!    its keys can produce (two ranges per zigzag chunk, not the whole sequence).
//!
//! Every rank then selects the same pattern from the same gathered numbers. Scores are computed
//! in f64 with a fixed summation order, so a single process and any number of ranks agree except
//! where a slash's pairs straddle two ranks (summed in a different grouping, differing in the last
//! bits of an f64).

use ringmoe_comm::{Communicator, Data, Payload, Tag};
use ringmoe_core::attention::AttentionParams;
use ringmoe_core::sparse::{
    AShape, VsConfig, VsPattern, combine_row_stats, last_positions, last_queries, runs, top_n,
    vs_row_stats, vs_scores,
};

use crate::{ParallelError, Result, ShardPlan};

/// How a job's prefill attention is computed. Dense is exact and the default; the sparse modes
/// trade accuracy for work on long contexts. Decode is always dense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionMode {
    #[default]
    Dense,
    AShape(AShape),
    VerticalSlash(VsConfig),
}

fn gather_i64(comm: &Communicator, tag: Tag, v: Vec<i64>) -> Result<Vec<Vec<i64>>> {
    let payload = Payload {
        shape: vec![v.len()],
        data: Data::I64(v),
    };
    let parts = comm.all_gather(tag, payload)?;
    parts
        .into_iter()
        .enumerate()
        .map(|(r, p)| match p.data {
            Data::I64(v) => Ok(v),
            _ => Err(ParallelError::Invalid(format!(
                "pattern estimate: rank {r} sent {}, expected I64",
                p.describe()
            ))),
        })
        .collect()
}

fn bits(x: f64) -> i64 {
    x.to_bits() as i64
}

fn unbits(x: i64) -> f64 {
    f64::from_bits(x as u64)
}

/// Offset ranges `[lo, hi]` that pairs (last query, one of `keys`) can produce, merged.
fn offset_ranges(keys: &[usize], first_last: usize, seq_len: usize) -> Vec<(usize, usize)> {
    let mut sorted = keys.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<(usize, usize)> = runs(&sorted)
        .into_iter()
        .filter(|&(a, _)| a < seq_len)
        .map(|(a, b)| (first_last.saturating_sub(b), seq_len - 1 - a))
        .collect();
    out.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (a, b) in out {
        match merged.last_mut() {
            Some((_, e)) if a <= *e + 1 => *e = (*e).max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// Estimates this layer's vertical-slash pattern over the ranks of `comm`; every rank returns the
/// same pattern. `q`/`k` are this rank's rows at `plan.positions(rank)`.
pub fn estimate_vs(
    comm: &Communicator,
    plan: &ShardPlan,
    params: &AttentionParams,
    cfg: &VsConfig,
    q: &[f32],
    k: &[f32],
    tag: Tag,
) -> Result<VsPattern> {
    let me = comm.rank();
    let seq_len = plan.len;
    let hq = params.n_heads;
    let mine = plan.positions(me);
    let row = hq * params.head_dim;
    let step = |s: u32| Tag { step: s, ..tag };

    // 1. The last queries, from whoever holds them, in position order.
    let (_, my_rows) = last_queries(params, cfg, seq_len, q, mine);
    let parts = comm.all_gather(step(0), Payload::f32(my_rows))?;
    let mut rows: Vec<(usize, &[f32])> = Vec::new();
    for (r, p) in parts.iter().enumerate() {
        let theirs: Vec<usize> = last_positions(cfg, seq_len, plan.positions(r))
            .into_iter()
            .map(|(x, _)| x)
            .collect();
        let Data::F32(data) = &p.data else {
            return Err(ParallelError::Invalid(format!(
                "pattern estimate: rank {r} sent {} queries",
                p.describe()
            )));
        };
        if data.len() != theirs.len() * row {
            return Err(ParallelError::Invalid(format!(
                "pattern estimate: rank {r} sent {} query values for {} positions",
                data.len(),
                theirs.len()
            )));
        }
        rows.extend(theirs.into_iter().zip(data.chunks(row.max(1))));
    }
    rows.sort_by_key(|&(p, _)| p);
    let last_pos: Vec<usize> = rows.iter().map(|&(p, _)| p).collect();
    let q_last: Vec<f32> = rows.iter().flat_map(|&(_, r)| r.iter().copied()).collect();

    // 2. Each row's log-sum-exp over all keys.
    let stats = vs_row_stats(params, &q_last, &last_pos, k, mine)?;
    let flat = stats
        .iter()
        .flat_map(|&(m, s)| [bits(m), bits(s)])
        .collect();
    let gathered = gather_i64(comm, step(1), flat)?;
    let per_rank: Vec<Vec<(f64, f64)>> = gathered
        .iter()
        .map(|v| v.chunks(2).map(|c| (unbits(c[0]), unbits(c[1]))).collect())
        .collect();
    let lse = combine_row_stats(&per_rank)?;

    // 3. Local scores; gather vertical candidates and slash sums over the offsets we produce.
    let sc = vs_scores(params, &q_last, &last_pos, &lse, k, mine, seq_len)?;
    let n_cand = cfg.vertical.min(mine.len());
    let mut msg: Vec<i64> = Vec::new();
    for h in 0..hq {
        let scores = &sc.vertical[h * mine.len()..(h + 1) * mine.len()];
        // `mine` is ascending, so ties between indices break as ties between positions do.
        for j in top_n(scores.iter().enumerate().map(|(j, &s)| (s, j)), n_cand) {
            msg.extend([bits(scores[j]), mine[j] as i64]);
        }
    }
    let first_last = last_pos.first().copied().unwrap_or(seq_len);
    let ranges = offset_ranges(mine, first_last, seq_len);
    msg.push(ranges.len() as i64);
    for &(a, b) in &ranges {
        msg.extend([a as i64, b as i64]);
        for h in 0..hq {
            msg.extend(
                sc.slash[h * seq_len + a..=h * seq_len + b]
                    .iter()
                    .map(|&x| bits(x)),
            );
        }
    }
    let gathered = gather_i64(comm, step(2), msg)?;
    let mut vertical: Vec<Vec<(f64, usize)>> = vec![Vec::new(); hq];
    let mut slash = vec![0f64; hq * seq_len];
    for (r, m) in gathered.iter().enumerate() {
        let bad =
            || ParallelError::Invalid(format!("pattern estimate: malformed scores from rank {r}"));
        let n = cfg.vertical.min(plan.positions(r).len());
        let (cand, rest) = m.split_at_checked(2 * n * hq).ok_or_else(bad)?;
        for (h, c) in cand.chunks(2 * n.max(1)).enumerate().take(hq) {
            vertical[h].extend(c.chunks(2).map(|x| (unbits(x[0]), x[1] as usize)));
        }
        let (&nr, mut rest) = rest.split_first().ok_or_else(bad)?;
        for _ in 0..nr {
            let (ab, tail) = rest.split_at_checked(2).ok_or_else(bad)?;
            let (a, b) = (ab[0] as usize, ab[1] as usize);
            if a > b || b >= seq_len {
                return Err(bad());
            }
            let len = b - a + 1;
            let (vals, tail) = tail.split_at_checked(len * hq).ok_or_else(bad)?;
            for h in 0..hq {
                for (o, &x) in (a..=b).zip(&vals[h * len..(h + 1) * len]) {
                    slash[h * seq_len + o] += unbits(x);
                }
            }
            rest = tail;
        }
        if vertical
            .iter()
            .any(|c| c.iter().any(|&(_, p)| p >= seq_len))
        {
            return Err(bad());
        }
    }
    Ok(VsPattern::select(cfg, seq_len, &vertical, &slash)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_ranges_cover_what_last_queries_produce() {
        // Keys 0..10 and 90..100 of 100, last 5 queries at 95..100.
        let r = offset_ranges(&(0..10).chain(90..100).collect::<Vec<_>>(), 95, 100);
        assert_eq!(r, vec![(0, 9), (86, 99)]);
        assert_eq!(offset_ranges(&[], 95, 100), vec![]);
    }
}
