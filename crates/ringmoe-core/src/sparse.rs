//! Sparse attention for long prefill, after MInference: which (query, key) pairs to score.
//!
//! - **A-shape** (StreamingLLM's pattern): every query sees the first `sink` keys and the `local`
//!   keys ending at itself.
//! - **Vertical-slash**: per query head, a set of key positions every later query sees ("vertical"
//!   columns) and a set of offsets `query − key` every query sees ("slash" diagonals). The sets come
//!   from estimating attention with the last `last_q` queries: [`vs_row_stats`] and [`vs_scores`]
//!   compute one rank's share of the estimate over its own keys, [`VsPattern::select`] turns the
//!   combined scores into the pattern. Ring attention runs the three steps with collectives in
//!   between; a single process runs them back to back.
//!
//! All patterns sit on top of the causal mask. [`attention_sparse`] is the blockwise kernel of
//! [`crate::attention`] under a pattern: it skips `128 × 128` tiles with nothing selected, masks
//! the rest pair by pair, and attends to vertical columns as a gathered block of keys, so a
//! column costs one key per query rather than a whole tile. [`Sparsity::needed_keys`] says which
//! keys of a block any of a set of queries would score — what ring attention needs to send.

use rayon::prelude::*;

use crate::attention::{
    AttentionParams, Causal, Gathered, PartialAttention, Rule, TileKind, attend, mask_each,
};
use crate::{Error, Result, simd};

/// Sinks plus a sliding local window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AShape {
    /// Keys at positions `< sink` are seen by every query.
    pub sink: usize,
    /// A query at `qp` sees keys at `qp − local + 1 ..= qp`.
    pub local: usize,
}

impl Default for AShape {
    /// MInference's A-shape setting for long contexts.
    fn default() -> Self {
        Self {
            sink: 128,
            local: 4096,
        }
    }
}

/// How a vertical-slash pattern is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsConfig {
    /// Queries at the end of the sequence whose attention is computed to pick the pattern.
    pub last_q: usize,
    /// Vertical columns kept per head (the `sink` forced ones included).
    pub vertical: usize,
    /// Slash diagonals kept per head (the `local` forced ones included).
    pub slash: usize,
    /// Columns `0..sink` are always kept (attention sinks).
    pub sink: usize,
    /// Offsets `0..local` are always kept (the local window).
    pub local: usize,
}

impl Default for VsConfig {
    /// MInference's usual vertical-slash budget for 128K+ contexts.
    fn default() -> Self {
        Self {
            last_q: 64,
            vertical: 1000,
            slash: 6096,
            sink: 30,
            local: 100,
        }
    }
}

impl VsConfig {
    fn validate(&self) -> Result<()> {
        if self.last_q == 0 || self.vertical == 0 || self.slash == 0 {
            return Err(Error::InvalidArgument {
                op: "vertical-slash",
                msg: format!("last_q, vertical and slash must be positive: {self:?}"),
            });
        }
        Ok(())
    }
}

/// A fixed-size set of small integers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(items: &[usize], len: usize) -> Self {
        let mut b = vec![0u64; len.div_ceil(64)];
        for &i in items {
            b[i / 64] |= 1 << (i % 64);
        }
        Self(b)
    }
    fn has(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct VsHead {
    /// Sorted key positions.
    verticals: Vec<usize>,
    /// Sorted offsets `qp − kp`.
    slashes: Vec<usize>,
    vbits: Bits,
    sbits: Bits,
}

/// A vertical-slash pattern for one layer: per query head, its columns and diagonals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsPattern {
    seq_len: usize,
    heads: Vec<VsHead>,
}

impl VsPattern {
    /// A pattern from explicit per-head `(verticals, slashes)` over a sequence of `seq_len`.
    pub fn new(seq_len: usize, per_head: Vec<(Vec<usize>, Vec<usize>)>) -> Result<Self> {
        let heads = per_head
            .into_iter()
            .enumerate()
            .map(|(h, (mut v, mut s))| {
                v.sort_unstable();
                v.dedup();
                s.sort_unstable();
                s.dedup();
                if v.last().is_some_and(|&x| x >= seq_len)
                    || s.last().is_some_and(|&x| x >= seq_len)
                {
                    return Err(Error::InvalidArgument {
                        op: "vertical-slash",
                        msg: format!("head {h}: a column or offset is beyond the {seq_len} tokens"),
                    });
                }
                Ok(VsHead {
                    vbits: Bits::new(&v, seq_len),
                    sbits: Bits::new(&s, seq_len),
                    verticals: v,
                    slashes: s,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { seq_len, heads })
    }

    /// Every offset a slash: the pattern that keeps all of causal attention.
    pub fn keep_everything(seq_len: usize, n_heads: usize) -> Self {
        let all: Vec<usize> = (0..seq_len).collect();
        let head = VsHead {
            verticals: Vec::new(),
            vbits: Bits::new(&[], seq_len),
            sbits: Bits::new(&all, seq_len),
            slashes: all,
        };
        Self {
            seq_len,
            heads: vec![head; n_heads],
        }
    }

    pub fn n_heads(&self) -> usize {
        self.heads.len()
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Head `h`'s columns and diagonals, sorted.
    pub fn head(&self, h: usize) -> Option<(&[usize], &[usize])> {
        self.heads
            .get(h)
            .map(|x| (x.verticals.as_slice(), x.slashes.as_slice()))
    }

    /// Picks each head's pattern from the estimate: the forced columns `0..sink` and offsets
    /// `0..local`, then the best-scoring others up to `vertical` and `slash` (ties to the smaller
    /// position or offset, so every rank picks the same). `vertical[h]` holds candidate
    /// `(score, position)` pairs (a superset of the top `cfg.vertical`); `slash` is `[n_heads,
    /// seq_len]`, the summed score of each offset.
    pub fn select(
        cfg: &VsConfig,
        seq_len: usize,
        vertical: &[Vec<(f64, usize)>],
        slash: &[f64],
    ) -> Result<Self> {
        cfg.validate()?;
        let n_heads = vertical.len();
        if slash.len() != n_heads * seq_len {
            return Err(Error::InvalidArgument {
                op: "vertical-slash",
                msg: format!(
                    "{} slash scores for {n_heads} heads × {seq_len} offsets",
                    slash.len()
                ),
            });
        }
        let per_head = (0..n_heads)
            .map(|h| {
                let forced_v = cfg.sink.min(seq_len);
                let v = top_n(
                    (0..forced_v)
                        .map(|p| (f64::INFINITY, p))
                        .chain(vertical[h].iter().copied().filter(|&(_, p)| p >= forced_v)),
                    cfg.vertical.min(seq_len),
                );
                let row = &slash[h * seq_len..(h + 1) * seq_len];
                let s = top_n(
                    row.iter().enumerate().map(|(o, &x)| {
                        if o < cfg.local {
                            (f64::INFINITY, o)
                        } else {
                            (x, o)
                        }
                    }),
                    cfg.slash.min(seq_len),
                );
                (v, s)
            })
            .collect();
        Self::new(seq_len, per_head)
    }
}

/// The `n` best `(score, index)` pairs: higher score first, then smaller index; NaN counts lowest.
pub fn top_n(items: impl Iterator<Item = (f64, usize)>, n: usize) -> Vec<usize> {
    let mut all: Vec<(f64, usize)> = items
        .map(|(s, i)| (if s.is_nan() { f64::NEG_INFINITY } else { s }, i))
        .collect();
    let cmp = |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if all.len() > n {
        all.select_nth_unstable_by(n, cmp);
        all.truncate(n);
    }
    all.sort_unstable_by(cmp);
    all.into_iter().map(|(_, i)| i).collect()
}

/// Which pairs an attention call scores, on top of the causal mask.
#[derive(Debug, Clone, Copy)]
pub enum Sparsity<'a> {
    Dense,
    AShape(AShape),
    VerticalSlash(&'a VsPattern),
}

struct AShapeRule(AShape);

impl Rule for AShapeRule {
    fn tile(&self, _h: usize, (qlo, qhi): (usize, usize), (klo, khi): (usize, usize)) -> TileKind {
        let AShape { sink, local } = self.0;
        let near = khi + local > qlo; // some key may be within the window of some query
        if klo > qhi || !(klo < sink || near) {
            TileKind::Skip
        } else if khi <= qlo && (khi < sink || klo + local > qhi) {
            TileKind::Full
        } else {
            TileKind::Masked
        }
    }
    fn keep(&self, _h: usize, qp: usize, kp: usize) -> bool {
        kp <= qp && (kp < self.0.sink || qp - kp < self.0.local)
    }
    fn same_for_every_head(&self) -> bool {
        true
    }
}

/// A tile with at least one diagonal per this many offsets in its range is computed whole
/// (measured: the pair-by-pair path costs about 6× a tile's per pair; `bench ring`).
const TILE_DENSITY: usize = 6;

/// Vertical-slash on one block of keys: the columns are gathered into a block of keys attended
/// to with GEMMs; the diagonals as masked tiles where they are dense and pair by pair elsewhere.
struct VsRule<'a> {
    pattern: &'a VsPattern,
    gathered: Vec<Gathered>,
}

impl Rule for VsRule<'_> {
    /// A tile whose offset range is densely covered by diagonals is computed as a masked tile;
    /// a sparser one is left to the pair-by-pair path, which costs several times more per pair
    /// than a tile's GEMM but scores only the selected pairs.
    fn tile(&self, h: usize, (qlo, qhi): (usize, usize), (klo, khi): (usize, usize)) -> TileKind {
        if klo > qhi {
            return TileKind::Skip;
        }
        // Offsets present in the tile lie in [qlo − khi, qhi − klo].
        let (lo, hi) = (qlo.saturating_sub(khi), qhi - klo);
        let s = &self.pattern.heads[h].slashes;
        let count = s.partition_point(|&o| o <= hi) - s.partition_point(|&o| o < lo);
        if count > 0 && count * TILE_DENSITY > hi - lo {
            TileKind::Masked
        } else {
            TileKind::Skip
        }
    }
    /// For a run of consecutive key positions, walks the diagonals that cross the row instead of
    /// testing every key.
    fn mask_row(&self, h: usize, qp: usize, k_pos: &[usize], row: &mut [f32]) {
        let n = k_pos.len().min(row.len());
        let (Some(&first), Some(&last)) = (k_pos.first(), k_pos.get(n.wrapping_sub(1))) else {
            return;
        };
        if last + 1 - first != n || n > 128 {
            return mask_each(self, h, qp, k_pos, row);
        }
        let head = &self.pattern.heads[h];
        let mut kept = [0f32; 128];
        kept[..n].copy_from_slice(&row[..n]);
        row[..n].fill(f32::NEG_INFINITY);
        if first > qp {
            return;
        }
        // Keys first ..= min(last, qp) are at offsets qp − min(last, qp) ..= qp − first.
        let (lo, hi) = (qp - last.min(qp), qp - first);
        let s = &head.slashes;
        for &o in s[s.partition_point(|&o| o < lo)..]
            .iter()
            .take_while(|&&o| o <= hi)
        {
            let kp = qp - o;
            if !head.vbits.has(kp) {
                row[kp - first] = kept[kp - first];
            }
        }
    }
    fn diagonals(&self, h: usize) -> Option<&[usize]> {
        self.pattern.heads.get(h).map(|x| x.slashes.as_slice())
    }
    fn keep(&self, h: usize, qp: usize, kp: usize) -> bool {
        let head = &self.pattern.heads[h];
        kp <= qp && head.sbits.has(qp - kp) && !head.vbits.has(kp)
    }
    fn gathered(&self, h: usize) -> Option<&Gathered> {
        self.gathered.get(h)
    }
}

/// Blockwise attention of `q` to `k`/`v` (same layouts as [`crate::attention_block`]) scoring only
/// the pairs `mask` selects. Returns the partial result and the number of (query, key) pairs the
/// kernel scored, summed over heads — the attention work, for comparing patterns.
pub fn attention_sparse(
    p: &AttentionParams,
    mask: &Sparsity<'_>,
    q: &[f32],
    q_pos: &[usize],
    k: &[f32],
    v: &[f32],
    k_pos: &[usize],
) -> Result<(PartialAttention, u64)> {
    let bad = |msg: String| {
        Err(Error::InvalidArgument {
            op: "sparse attention",
            msg,
        })
    };
    if !p.causal && !matches!(mask, Sparsity::Dense) {
        return bad("sparse patterns need causal attention".into());
    }
    match mask {
        Sparsity::Dense => attend(p, &Causal(p.causal), q, q_pos, k, v, k_pos),
        Sparsity::AShape(a) => {
            if a.local == 0 {
                return bad("the A-shape local window must be at least 1".into());
            }
            attend(p, &AShapeRule(*a), q, q_pos, k, v, k_pos)
        }
        Sparsity::VerticalSlash(pattern) => {
            p.validate(q, q_pos, k, v, k_pos)?;
            if pattern.n_heads() != p.n_heads {
                return bad(format!(
                    "pattern for {} heads, attention has {}",
                    pattern.n_heads(),
                    p.n_heads
                ));
            }
            if let Some(&mx) = q_pos.iter().chain(k_pos).max()
                && mx >= pattern.seq_len
            {
                return bad(format!(
                    "position {mx} beyond the pattern's {} tokens",
                    pattern.seq_len
                ));
            }
            let rule = VsRule {
                pattern,
                gathered: gather_verticals(p, pattern, k, v, k_pos),
            };
            attend(p, &rule, q, q_pos, k, v, k_pos)
        }
    }
}

/// Per query head, the K/V rows of this block that are vertical columns, sorted by position.
fn gather_verticals(
    p: &AttentionParams,
    pattern: &VsPattern,
    k: &[f32],
    v: &[f32],
    k_pos: &[usize],
) -> Vec<Gathered> {
    let (d, hkv) = (p.head_dim, p.n_kv_heads);
    let group = p.n_heads / hkv;
    pattern
        .heads
        .par_iter()
        .enumerate()
        .map(|(h, head)| {
            let kvh = h / group;
            let mut idx: Vec<usize> = (0..k_pos.len())
                .filter(|&j| head.vbits.has(k_pos[j]))
                .collect();
            idx.sort_by_key(|&j| k_pos[j]);
            let mut g = Gathered {
                k: Vec::with_capacity(idx.len() * d),
                v: Vec::with_capacity(idx.len() * d),
                pos: Vec::with_capacity(idx.len()),
            };
            for j in idx {
                let at = (j * hkv + kvh) * d;
                g.k.extend_from_slice(&k[at..at + d]);
                g.v.extend_from_slice(&v[at..at + d]);
                g.pos.push(k_pos[j]);
            }
            g
        })
        .collect()
}

/// Maximal runs of consecutive values in a sorted list, as inclusive `(first, last)`.
pub fn runs(sorted: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &x in sorted {
        match out.last_mut() {
            Some((_, e)) if x <= *e + 1 => *e = (*e).max(x),
            _ => out.push((x, x)),
        }
    }
    out
}

impl Sparsity<'_> {
    /// For each key position in `k_pos`: does any query in `q_pos` (any head) score it? Exact,
    /// and a pure function of its arguments, so a sender and a receiver that both know the
    /// positions agree on which keys travel.
    pub fn needed_keys(&self, causal: bool, q_pos: &[usize], k_pos: &[usize]) -> Vec<bool> {
        let mut q: Vec<usize> = q_pos.to_vec();
        q.sort_unstable();
        let Some(&qmax) = q.last() else {
            return vec![false; k_pos.len()];
        };
        if !causal {
            return vec![true; k_pos.len()];
        }
        match self {
            Sparsity::Dense => k_pos.iter().map(|&kp| kp <= qmax).collect(),
            Sparsity::AShape(a) => k_pos
                .iter()
                .map(|&kp| {
                    if kp < a.sink {
                        return kp <= qmax;
                    }
                    // The first query at or after kp must be within the window.
                    let i = q.partition_point(|&x| x < kp);
                    i < q.len() && q[i] - kp < a.local
                })
                .collect(),
            Sparsity::VerticalSlash(pattern) => {
                let mut need: Vec<bool> = k_pos
                    .iter()
                    .map(|&kp| kp <= qmax && pattern.heads.iter().any(|h| h.vbits.has(kp)))
                    .collect();
                // Keys in sorted order, so a range of positions is a range of indices.
                let mut order: Vec<usize> = (0..k_pos.len()).collect();
                order.sort_by_key(|&j| k_pos[j]);
                let sorted: Vec<usize> = order.iter().map(|&j| k_pos[j]).collect();
                let mut offsets: Vec<usize> = pattern
                    .heads
                    .iter()
                    .flat_map(|h| h.slashes.iter().copied())
                    .collect();
                offsets.sort_unstable();
                offsets.dedup();
                let q_runs = runs(&q);
                let mut diff = vec![0i64; sorted.len() + 1];
                for &o in &offsets {
                    for &(a, b) in &q_runs {
                        if b < o {
                            continue;
                        }
                        let (lo, hi) = (a.saturating_sub(o), b - o);
                        let s = sorted.partition_point(|&x| x < lo);
                        let e = sorted.partition_point(|&x| x <= hi);
                        if s < e {
                            diff[s] += 1;
                            diff[e] -= 1;
                        }
                    }
                }
                let mut run = 0;
                for (i, &j) in order.iter().enumerate() {
                    run += diff[i];
                    if run > 0 {
                        need[j] = true;
                    }
                }
                need
            }
        }
    }
}

/// Scores of queries `q_last` (`[n, n_heads, head_dim]` at `last_pos`) against keys `k`: one f32
/// dot product per pair in a fixed order (so every rank and a single process get the same bits),
/// then f64 from there on.
/// Calls `f(h, i, j, score)` for each unmasked (head, query, key) triple, heads in parallel.
fn for_each_score<T: Send>(
    p: &AttentionParams,
    q_last: &[f32],
    last_pos: &[usize],
    k: &[f32],
    k_pos: &[usize],
    init: impl Fn() -> T + Sync,
    f: impl Fn(&mut T, usize, usize, usize, f64) + Sync,
) -> Vec<T> {
    let (d, hq, hkv) = (p.head_dim, p.n_heads, p.n_kv_heads);
    let group = hq / hkv;
    (0..hq)
        .into_par_iter()
        .map(|h| {
            let mut acc = init();
            let kvh = h / group;
            let mut starts = Vec::with_capacity(k_pos.len());
            let mut js = Vec::with_capacity(k_pos.len());
            let mut dots = vec![0f32; k_pos.len()];
            for (i, &qp) in last_pos.iter().enumerate() {
                let qrow = &q_last[(i * hq + h) * d..][..d];
                starts.clear();
                js.clear();
                for (j, &kp) in k_pos.iter().enumerate() {
                    if kp <= qp {
                        starts.push((j * hkv + kvh) * d);
                        js.push(j);
                    }
                }
                let dots = &mut dots[..js.len()];
                simd::dot_rows(qrow, k, &starts, dots);
                for (&j, &x) in js.iter().zip(dots.iter()) {
                    f(&mut acc, h, i, j, x as f64 * p.scale as f64);
                }
            }
            acc
        })
        .collect()
}

fn check_last(
    p: &AttentionParams,
    q_last: &[f32],
    last_pos: &[usize],
    k: &[f32],
    k_pos: &[usize],
) -> Result<()> {
    p.validate(q_last, last_pos, k, k, k_pos)
}

/// Step 1 of the estimate, over this rank's keys: for each last query `i` and head `h` (index
/// `i · n_heads + h`), the max score and `Σ exp(score − max)`; `(-inf, 0)` when no key is visible.
pub fn vs_row_stats(
    p: &AttentionParams,
    q_last: &[f32],
    last_pos: &[usize],
    k: &[f32],
    k_pos: &[usize],
) -> Result<Vec<(f64, f64)>> {
    check_last(p, q_last, last_pos, k, k_pos)?;
    let n = last_pos.len();
    // One pass per head: a running max, rescaling the sum whenever it grows.
    let stats = for_each_score(
        p,
        q_last,
        last_pos,
        k,
        k_pos,
        || vec![(f64::NEG_INFINITY, 0f64); n],
        |st, _h, i, _j, x| {
            let (m, sum) = &mut st[i];
            if x > *m {
                *sum = *sum * (*m - x).exp() + 1.0;
                *m = x;
            } else {
                *sum += (x - *m).exp();
            }
        },
    );
    let hq = p.n_heads;
    let mut out = vec![(f64::NEG_INFINITY, 0.0); n * hq];
    for h in 0..hq {
        for i in 0..n {
            out[i * hq + h] = stats[h][i];
        }
    }
    Ok(out)
}

/// Combines per-rank [`vs_row_stats`] (in rank order) into each row's log-sum-exp.
pub fn combine_row_stats(parts: &[Vec<(f64, f64)>]) -> Result<Vec<f64>> {
    let n = parts.first().map_or(0, Vec::len);
    if parts.iter().any(|x| x.len() != n) {
        return Err(Error::InvalidArgument {
            op: "vertical-slash",
            msg: "row statistics of different lengths".into(),
        });
    }
    Ok((0..n)
        .map(|r| {
            let m = parts
                .iter()
                .map(|x| x[r].0)
                .fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                return f64::NEG_INFINITY;
            }
            let s: f64 = parts
                .iter()
                .filter(|x| x[r].1 > 0.0)
                .map(|x| x[r].1 * (x[r].0 - m).exp())
                .sum();
            m + s.ln()
        })
        .collect())
}

/// Step 2 of the estimate, over this rank's keys, given the rows' global log-sum-exp.
#[derive(Debug, Clone, PartialEq)]
pub struct VsScores {
    /// `[n_heads, keys]`: each key's attention summed over the last queries.
    pub vertical: Vec<f64>,
    /// `[n_heads, seq_len]`: each offset's attention summed over the last queries, for the pairs
    /// whose key is on this rank. Summed over ranks it is the slash score.
    pub slash: Vec<f64>,
}

pub fn vs_scores(
    p: &AttentionParams,
    q_last: &[f32],
    last_pos: &[usize],
    lse: &[f64],
    k: &[f32],
    k_pos: &[usize],
    seq_len: usize,
) -> Result<VsScores> {
    check_last(p, q_last, last_pos, k, k_pos)?;
    let hq = p.n_heads;
    if lse.len() != last_pos.len() * hq {
        return Err(Error::InvalidArgument {
            op: "vertical-slash",
            msg: format!("{} lse values for {} rows", lse.len(), last_pos.len() * hq),
        });
    }
    if let Some(&mx) = last_pos.iter().chain(k_pos).max()
        && mx >= seq_len
    {
        return Err(Error::InvalidArgument {
            op: "vertical-slash",
            msg: format!("position {mx} beyond the sequence of {seq_len}"),
        });
    }
    let lk = k_pos.len();
    let per_head = for_each_score(
        p,
        q_last,
        last_pos,
        k,
        k_pos,
        || (vec![0f64; lk], vec![0f64; seq_len]),
        |(vert, slash), h, i, j, s| {
            let w = (s - lse[i * hq + h]).exp();
            vert[j] += w;
            slash[last_pos[i] - k_pos[j]] += w;
        },
    );
    let mut out = VsScores {
        vertical: Vec::with_capacity(hq * lk),
        slash: Vec::with_capacity(hq * seq_len),
    };
    for (v, s) in per_head {
        out.vertical.extend(v);
        out.slash.extend(s);
    }
    Ok(out)
}

/// The whole estimate in one process: `q`/`k` hold every token at `pos` (positions `0..seq_len`
/// in any order). Ring attention computes the same thing with the keys spread over ranks.
pub fn estimate_vs(
    p: &AttentionParams,
    cfg: &VsConfig,
    q: &[f32],
    k: &[f32],
    pos: &[usize],
) -> Result<VsPattern> {
    cfg.validate()?;
    let seq_len = pos.len();
    let (last_pos, q_last) = last_queries(p, cfg, seq_len, q, pos);
    let stats = vs_row_stats(p, &q_last, &last_pos, k, pos)?;
    let lse = combine_row_stats(&[stats])?;
    let sc = vs_scores(p, &q_last, &last_pos, &lse, k, pos, seq_len)?;
    let vertical: Vec<Vec<(f64, usize)>> = sc
        .vertical
        .chunks(pos.len().max(1))
        .map(|row| row.iter().zip(pos).map(|(&s, &kp)| (s, kp)).collect())
        .take(p.n_heads)
        .collect();
    VsPattern::select(cfg, seq_len, &vertical, &sc.slash)
}

/// Which of `pos` are among the last `cfg.last_q` positions of the sequence, sorted by position:
/// `(position, index in pos)`.
pub fn last_positions(cfg: &VsConfig, seq_len: usize, pos: &[usize]) -> Vec<(usize, usize)> {
    let first = seq_len.saturating_sub(cfg.last_q);
    let mut rows: Vec<(usize, usize)> = pos
        .iter()
        .enumerate()
        .filter(|&(_, &x)| x >= first)
        .map(|(i, &x)| (x, i))
        .collect();
    rows.sort_unstable();
    rows
}

/// This holder's rows among the last `cfg.last_q` positions of the sequence, sorted by position:
/// `(positions, q rows)`.
pub fn last_queries(
    p: &AttentionParams,
    cfg: &VsConfig,
    seq_len: usize,
    q: &[f32],
    pos: &[usize],
) -> (Vec<usize>, Vec<f32>) {
    let w = p.n_heads * p.head_dim;
    let rows = last_positions(cfg, seq_len, pos);
    let positions = rows.iter().map(|&(x, _)| x).collect();
    let data = rows
        .iter()
        .flat_map(|&(_, i)| q[i * w..(i + 1) * w].iter().copied())
        .collect();
    (positions, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::naive_attention;
    use crate::testing::rand_vec;

    fn params(hq: usize, hkv: usize, d: usize) -> AttentionParams {
        AttentionParams {
            n_heads: hq,
            n_kv_heads: hkv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            causal: true,
        }
    }

    /// f64 attention of each query over the keys `keep(h, qp, kp)` selects.
    fn naive_masked(
        p: &AttentionParams,
        q: &[f32],
        q_pos: &[usize],
        k: &[f32],
        v: &[f32],
        k_pos: &[usize],
        keep: impl Fn(usize, usize, usize) -> bool,
    ) -> PartialAttention {
        let (d, hq, hkv) = (p.head_dim, p.n_heads, p.n_kv_heads);
        let mut res = PartialAttention::empty(q_pos.len(), hq, d);
        for (t, &qp) in q_pos.iter().enumerate() {
            for h in 0..hq {
                let kvh = h / (hq / hkv);
                let one = AttentionParams {
                    n_heads: 1,
                    n_kv_heads: 1,
                    ..*p
                };
                let sel: Vec<usize> = (0..k_pos.len())
                    .filter(|&j| keep(h, qp, k_pos[j]))
                    .collect();
                let ks: Vec<f32> = sel
                    .iter()
                    .flat_map(|&j| k[(j * hkv + kvh) * d..][..d].to_vec())
                    .collect();
                let vs: Vec<f32> = sel
                    .iter()
                    .flat_map(|&j| v[(j * hkv + kvh) * d..][..d].to_vec())
                    .collect();
                let kp: Vec<usize> = sel.iter().map(|&j| k_pos[j]).collect();
                let r = naive_attention(&one, &q[(t * hq + h) * d..][..d], &[qp], &ks, &vs, &kp)
                    .unwrap();
                res.out[(t * hq + h) * d..][..d].copy_from_slice(&r.out);
                res.lse[t * hq + h] = r.lse[0];
            }
        }
        res
    }

    fn max_diff(a: &PartialAttention, b: &PartialAttention) -> f32 {
        let o = a.out.iter().zip(&b.out).map(|(x, y)| (x - y).abs());
        let l = a
            .lse
            .iter()
            .zip(&b.lse)
            .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() });
        o.chain(l).fold(0.0, f32::max)
    }

    /// Zigzag-like positions: two runs, so tiles straddle a gap.
    fn two_runs(a: std::ops::Range<usize>, b: std::ops::Range<usize>) -> Vec<usize> {
        a.chain(b).collect()
    }

    #[test]
    fn a_shape_matches_masked_reference() {
        let p = params(4, 2, 16);
        let k_pos = two_runs(0..260, 700..900);
        let q_pos = two_runs(300..450, 800..1000);
        let (lq, lk) = (q_pos.len(), k_pos.len());
        let q = rand_vec(lq * 64, 1, 2.0);
        let k = rand_vec(lk * 32, 2, 2.0);
        let v = rand_vec(lk * 32, 3, 1.0);
        for a in [
            AShape { sink: 4, local: 64 },
            AShape { sink: 0, local: 1 },
            AShape {
                sink: 130,
                local: 300,
            },
        ] {
            let (got, scored) =
                attention_sparse(&p, &Sparsity::AShape(a), &q, &q_pos, &k, &v, &k_pos).unwrap();
            let want = naive_masked(&p, &q, &q_pos, &k, &v, &k_pos, |_, qp, kp| {
                kp <= qp && (kp < a.sink || qp - kp < a.local)
            });
            assert!(
                max_diff(&got, &want) < 2e-5,
                "{a:?}: {}",
                max_diff(&got, &want)
            );
            let (_, dense) =
                attention_sparse(&p, &Sparsity::Dense, &q, &q_pos, &k, &v, &k_pos).unwrap();
            assert!(scored <= dense, "{a:?} scored {scored} of dense {dense}");
            if a.local < 128 {
                assert!(scored < dense, "{a:?} scored {scored} of dense {dense}");
            }
        }
    }

    #[test]
    fn vertical_slash_matches_masked_reference() {
        let p = params(4, 2, 16);
        let seq = 1000;
        let k_pos = two_runs(0..260, 700..900);
        let q_pos = two_runs(300..450, 800..1000);
        let (lq, lk) = (q_pos.len(), k_pos.len());
        let q = rand_vec(lq * 64, 4, 2.0);
        let k = rand_vec(lk * 32, 5, 2.0);
        let v = rand_vec(lk * 32, 6, 1.0);
        let heads: Vec<(Vec<usize>, Vec<usize>)> = (0..4)
            .map(|h| {
                let v: Vec<usize> = (0..seq).filter(|x| (x * 7 + h) % 37 == 0).collect();
                let s: Vec<usize> = (0..seq).filter(|x| x < &8 || *x == 333 + h).collect();
                (v, s)
            })
            .collect();
        let pattern = VsPattern::new(seq, heads.clone()).unwrap();
        let (got, scored) = attention_sparse(
            &p,
            &Sparsity::VerticalSlash(&pattern),
            &q,
            &q_pos,
            &k,
            &v,
            &k_pos,
        )
        .unwrap();
        let want = naive_masked(&p, &q, &q_pos, &k, &v, &k_pos, |h, qp, kp| {
            kp <= qp && (heads[h].0.contains(&kp) || heads[h].1.contains(&(qp - kp)))
        });
        assert!(max_diff(&got, &want) < 2e-5, "{}", max_diff(&got, &want));
        let (_, dense) =
            attention_sparse(&p, &Sparsity::Dense, &q, &q_pos, &k, &v, &k_pos).unwrap();
        assert!(scored < dense, "scored {scored} of dense {dense}");
    }

    #[test]
    fn keep_everything_equals_dense() {
        let p = params(4, 2, 16);
        let pos: Vec<usize> = (0..400).collect();
        let q = rand_vec(400 * 64, 7, 2.0);
        let k = rand_vec(400 * 32, 8, 2.0);
        let v = rand_vec(400 * 32, 9, 1.0);
        let dense = attention_sparse(&p, &Sparsity::Dense, &q, &pos, &k, &v, &pos).unwrap();
        let all = VsPattern::keep_everything(400, 4);
        let a = AShape {
            sink: 0,
            local: 400,
        };
        for mask in [Sparsity::AShape(a), Sparsity::VerticalSlash(&all)] {
            let got = attention_sparse(&p, &mask, &q, &pos, &k, &v, &pos).unwrap();
            assert!(max_diff(&got.0, &dense.0) <= 1e-6, "{mask:?}");
        }
    }

    #[test]
    fn needed_keys_is_exact() {
        let seq = 600;
        let q_pos = two_runs(100..150, 500..540);
        let k_pos: Vec<usize> = (0..seq).collect();
        let heads: Vec<(Vec<usize>, Vec<usize>)> = (0..3)
            .map(|h| (vec![5 + h, 200, 520], vec![0, 1, 30 + h, 333]))
            .collect();
        let pattern = VsPattern::new(seq, heads.clone()).unwrap();
        let a = AShape { sink: 3, local: 20 };
        type Keep<'a> = Box<dyn Fn(usize, usize, usize) -> bool + 'a>;
        let cases: [(Sparsity<'_>, Keep<'_>); 3] = [
            (Sparsity::Dense, Box::new(|_, qp, kp| kp <= qp)),
            (
                Sparsity::AShape(a),
                Box::new(move |_, qp, kp| kp <= qp && (kp < a.sink || qp - kp < a.local)),
            ),
            (
                Sparsity::VerticalSlash(&pattern),
                Box::new(|h, qp, kp| {
                    kp <= qp && (heads[h].0.contains(&kp) || heads[h].1.contains(&(qp - kp)))
                }),
            ),
        ];
        for (mask, keep) in &cases {
            let got = mask.needed_keys(true, &q_pos, &k_pos);
            for (j, &kp) in k_pos.iter().enumerate() {
                let want = (0..3).any(|h| q_pos.iter().any(|&qp| keep(h, qp, kp)));
                assert_eq!(got[j], want, "{mask:?} key {kp}");
            }
        }
    }

    #[test]
    fn estimate_prefers_the_columns_and_diagonals_that_carry_attention() {
        // Keys equal to the queries' direction at a few columns and at a fixed lag.
        let p = params(2, 1, 8);
        let seq = 512;
        let mut q = vec![0f32; seq * 16];
        let mut k = rand_vec(seq * 8, 11, 0.1);
        for t in 0..seq {
            for h in 0..2 {
                q[(t * 2 + h) * 8] = 8.0;
            }
        }
        for col in [77, 301] {
            k[col * 8] = 8.0;
        }
        let cfg = VsConfig {
            last_q: 16,
            vertical: 4,
            slash: 3,
            sink: 1,
            local: 1,
        };
        let pos: Vec<usize> = (0..seq).collect();
        let pat = estimate_vs(&p, &cfg, &q, &k, &pos).unwrap();
        for h in 0..2 {
            let (v, s) = pat.head(h).unwrap();
            assert_eq!(v.len(), 4);
            assert!(
                v.contains(&0) && v.contains(&77) && v.contains(&301),
                "{v:?}"
            );
            assert_eq!(s.len(), 3);
            assert!(s.contains(&0), "{s:?}");
        }
    }

    #[test]
    fn bad_patterns_are_errors() {
        assert!(VsPattern::new(10, vec![(vec![10], vec![])]).is_err());
        let p = params(2, 1, 4);
        let pat = VsPattern::keep_everything(4, 1);
        let x = vec![0f32; 8 * 4];
        let pos = [0, 1, 2, 3];
        let r = attention_sparse(
            &p,
            &Sparsity::VerticalSlash(&pat),
            &x,
            &pos,
            &x[..16],
            &x[..16],
            &pos,
        );
        assert!(r.is_err(), "head count mismatch accepted");
        let a = Sparsity::AShape(AShape { sink: 0, local: 0 });
        assert!(attention_sparse(&p, &a, &x, &pos, &x[..16], &x[..16], &pos).is_err());
    }
}
