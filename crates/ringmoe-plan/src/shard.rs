//! Sequence sharding: which absolute positions each of P ranks holds.
//!
//! Zigzag (the default): the sequence is cut into 2P chunks as evenly as possible and rank r holds
//! chunks r and 2P−1−r. Under a causal mask early tokens attend to little and late tokens to a lot,
//! so pairing an early chunk with a late one gives every rank about the same attention work.
//! Contiguous: P chunks, rank r holds chunk r (for comparison: the last rank does most work).
//! Any length works, including fewer tokens than chunks (some ranks then hold none).

use crate::{PlanError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    Zigzag,
    Contiguous,
}

/// The positions of every rank, each list ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub len: usize,
    pub kind: Sharding,
    ranks: Vec<Vec<usize>>,
}

/// `chunks` half-open ranges covering `0..len`, sizes differing by at most one (larger first).
fn chunk_bounds(len: usize, chunks: usize) -> Vec<(usize, usize)> {
    let (base, extra) = (len / chunks, len % chunks);
    let mut start = 0;
    (0..chunks)
        .map(|c| {
            let end = start + base + usize::from(c < extra);
            let r = (start, end);
            start = end;
            r
        })
        .collect()
}

impl ShardPlan {
    pub fn new(len: usize, world: usize, kind: Sharding) -> Result<Self> {
        if world == 0 {
            return Err(PlanError::NoRanks);
        }
        let ranks = match kind {
            Sharding::Contiguous => chunk_bounds(len, world)
                .into_iter()
                .map(|(s, e)| (s..e).collect())
                .collect(),
            Sharding::Zigzag => {
                let b = chunk_bounds(len, 2 * world);
                (0..world)
                    .map(|r| {
                        (b[r].0..b[r].1)
                            .chain(b[2 * world - 1 - r].0..b[2 * world - 1 - r].1)
                            .collect()
                    })
                    .collect()
            }
        };
        Ok(Self { len, kind, ranks })
    }

    /// A plan over `world` ranks where only the first `active` hold tokens (sharded as by
    /// [`Self::new`]); the rest take part in every collective with empty shards, e.g. workers
    /// that only host experts.
    pub fn with_active(len: usize, world: usize, active: usize, kind: Sharding) -> Result<Self> {
        if active == 0 || active > world {
            return Err(PlanError::ActiveRanks { active, world });
        }
        let mut p = Self::new(len, active, kind)?;
        p.ranks.resize(world, Vec::new());
        Ok(p)
    }

    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    /// Absolute positions held by `rank`, ascending.
    pub fn positions(&self, rank: usize) -> &[usize] {
        self.ranks.get(rank).map_or(&[], Vec::as_slice)
    }

    /// The tokens `rank` holds, in its position order.
    pub fn tokens_for(&self, rank: usize, tokens: &[u32]) -> Result<Vec<u32>> {
        if tokens.len() != self.len {
            return Err(PlanError::TokenCount {
                got: tokens.len(),
                len: self.len,
            });
        }
        Ok(self.positions(rank).iter().map(|&p| tokens[p]).collect())
    }

    /// Tokens on the most loaded rank.
    pub fn max_shard(&self) -> usize {
        self.ranks.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Puts per-rank rows (`row` values each, in each rank's position order) back in sequence order.
    pub fn unshard_rows(&self, per_rank: &[Vec<f32>], row: usize) -> Result<Vec<f32>> {
        if per_rank.len() != self.world() {
            return Err(PlanError::RankOutputs {
                got: per_rank.len(),
                world: self.world(),
            });
        }
        let mut out = vec![0f32; self.len * row];
        for (r, rows) in per_rank.iter().enumerate() {
            let pos = self.positions(r);
            if rows.len() != pos.len() * row {
                return Err(PlanError::RankRows {
                    rank: r,
                    got: rows.len(),
                    rows: pos.len(),
                    row,
                });
            }
            for (i, &p) in pos.iter().enumerate() {
                out[p * row..(p + 1) * row].copy_from_slice(&rows[i * row..(i + 1) * row]);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn zigzag_pairs_early_and_late_chunks() {
        let p = ShardPlan::new(16, 4, Sharding::Zigzag).unwrap();
        assert_eq!(p.positions(0), &[0, 1, 14, 15]);
        assert_eq!(p.positions(3), &[6, 7, 8, 9]);
        let short = ShardPlan::new(3, 4, Sharding::Zigzag).unwrap();
        assert_eq!(short.positions(0), &[0]);
        assert!(short.positions(3).is_empty());
    }

    /// Causal attention work of a rank: Σ over its queries of (position + 1) keys.
    fn work(p: &ShardPlan, r: usize) -> usize {
        p.positions(r).iter().map(|&q| q + 1).sum()
    }

    proptest! {
        #[test]
        fn every_position_is_held_exactly_once_and_shards_are_balanced(len in 0usize..5000, world in 1usize..9, zig in any::<bool>()) {
            let kind = if zig { Sharding::Zigzag } else { Sharding::Contiguous };
            let p = ShardPlan::new(len, world, kind).unwrap();
            let mut all: Vec<usize> = (0..world).flat_map(|r| p.positions(r).to_vec()).collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..len).collect::<Vec<_>>());
            let sizes: Vec<usize> = (0..world).map(|r| p.positions(r).len()).collect();
            prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 2);
            for r in 0..world {
                prop_assert!(p.positions(r).windows(2).all(|w| w[0] < w[1]));
            }
            // Zigzag balances causal work to within one chunk's worth per rank.
            if zig && len >= 4 * world {
                let ws: Vec<usize> = (0..world).map(|r| work(&p, r)).collect();
                let (lo, hi) = (*ws.iter().min().unwrap() as f64, *ws.iter().max().unwrap() as f64);
                prop_assert!(hi / lo < 1.0 + 4.0 * world as f64 / len as f64 + 0.05, "{:?}", ws);
            }
        }
    }
}
