//! Blockwise attention with an online softmax, returning `(out, lse)`, and the exact `merge` of two
//! partial results.
//!
//! `attention_block` attends a block of queries to a block of keys/values, each token carrying its
//! absolute position; the causal mask is "key position ≤ query position". It never materialises an
//! `Lq × Lk` score matrix: it walks `BQ × BK` tiles (FlashAttention's schedule), skips tiles that
//! the mask removes entirely, and keeps a running max and sum per query row. The per-row
//! log-sum-exp it returns lets partial results over disjoint key sets be combined exactly by
//! [`merge`], which is all ring attention needs.

use rayon::prelude::*;

use crate::gemm::{MatRef, Par, gemm_into};
use crate::simd;
use crate::{Error, Result};

/// Query rows per tile.
const BQ: usize = 128;
/// Key rows per tile.
const BK: usize = 128;
/// Query tiles whose results are gathered before they are copied into the output (see
/// [`attend`]): every head of 64 tiles is plenty of tasks for the pool, and 8K query rows of
/// buffers.
const TILES_PER_BATCH: usize = 64;

/// Head layout and scaling of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionParams {
    pub n_heads: usize,
    /// Key/value heads; `n_heads` must be a multiple (grouped-query attention).
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q·k` (usually `1/sqrt(head_dim)`).
    pub scale: f32,
    /// Mask keys whose position is greater than the query's.
    pub causal: bool,
}

/// The result of attending queries to one subset of the keys.
///
/// `out` is `[tokens, n_heads, head_dim]`, normalised over that subset; `lse` is `[tokens, n_heads]`,
/// the natural log of the softmax denominator (`-inf` for a row that saw no unmasked key, whose
/// `out` row is zero).
#[derive(Debug, Clone, PartialEq)]
pub struct PartialAttention {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

impl PartialAttention {
    /// The neutral element of [`merge`]: no keys seen.
    pub fn empty(tokens: usize, n_heads: usize, head_dim: usize) -> Self {
        Self {
            out: vec![0.0; tokens * n_heads * head_dim],
            lse: vec![f32::NEG_INFINITY; tokens * n_heads],
        }
    }
}

impl AttentionParams {
    pub(crate) fn validate(
        &self,
        q: &[f32],
        q_pos: &[usize],
        k: &[f32],
        v: &[f32],
        k_pos: &[usize],
    ) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::InvalidArgument {
                op: "attention",
                msg,
            })
        };
        if self.n_heads == 0 || self.n_kv_heads == 0 || self.head_dim == 0 {
            return bad(format!("empty head layout {self:?}"));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} query heads are not a multiple of {} kv heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if q.len() != q_pos.len() * self.n_heads * self.head_dim {
            return bad(format!(
                "q has {} elements for {} positions",
                q.len(),
                q_pos.len()
            ));
        }
        let kv = k_pos.len() * self.n_kv_heads * self.head_dim;
        if k.len() != kv || v.len() != kv {
            return bad(format!(
                "k/v have {}/{} elements for {} positions (want {kv})",
                k.len(),
                v.len(),
                k_pos.len()
            ));
        }
        Ok(())
    }
}

pub(crate) fn min_max(pos: &[usize]) -> (usize, usize) {
    pos.iter()
        .fold((usize::MAX, 0), |(lo, hi), &p| (lo.min(p), hi.max(p)))
}

/// `rows × cols` starting at `data[start]`, rows `row_stride` apart.
fn strided(data: &[f32], start: usize, rows: usize, cols: usize, row_stride: usize) -> MatRef<'_> {
    MatRef {
        data: &data[start..],
        rows,
        cols,
        row_stride,
        col_stride: 1,
    }
}

/// What the kernel does with one `BQ × BK` tile of (query, key) pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TileKind {
    /// Nothing in it is kept: not computed.
    Skip,
    /// Everything in it is kept: computed without a mask.
    Full,
    /// Computed, then `keep` decides pair by pair.
    Masked,
}

/// Which (query, key) pairs an attention call scores. `tile` sees the position ranges of a tile
/// and must be conservative: `Skip` only when no pair in it is kept, `Full` only when every pair
/// is. `keep` is exact.
pub(crate) trait Rule: Sync {
    fn tile(&self, h: usize, q: (usize, usize), k: (usize, usize)) -> TileKind;
    fn keep(&self, h: usize, qp: usize, kp: usize) -> bool;
    /// Sets `row[i]` (query `qp` against key `k_pos[i]`) to −∞ wherever `keep` is false.
    fn mask_row(&self, h: usize, qp: usize, k_pos: &[usize], row: &mut [f32]) {
        mask_each(self, h, qp, k_pos, row);
    }
    /// Keys that query head `h` scores outside the tiles: vertical-slash's columns, gathered into
    /// a compact block and attended to under the causal mask only.
    fn gathered(&self, _h: usize) -> Option<&Gathered> {
        None
    }
    /// Offsets `qp − kp` (sorted) that query head `h` scores pair by pair in the tiles that
    /// `tile` skipped: vertical-slash's diagonals where they are too sparse for a whole tile.
    fn diagonals(&self, _h: usize) -> Option<&[usize]> {
        None
    }
    /// True when `tile`, `keep` and `mask_row` ignore the head, and no head has gathered keys
    /// or diagonals: query heads may then be scored together.
    fn same_for_every_head(&self) -> bool {
        false
    }
}

/// Position → row of a block of keys, as runs of consecutive positions at consecutive rows.
pub(crate) struct PosIndex {
    /// `(first position, first row, length)`, sorted by position.
    runs: Vec<(usize, usize, usize)>,
}

impl PosIndex {
    pub(crate) fn new(pos: &[usize]) -> Self {
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (j, &p) in pos.iter().enumerate() {
            match runs.last_mut() {
                Some((p0, j0, n)) if *p0 + *n == p && *j0 + *n == j => *n += 1,
                _ => runs.push((p, j, 1)),
            }
        }
        runs.sort_unstable();
        Self { runs }
    }

    pub(crate) fn get(&self, p: usize) -> Option<usize> {
        let i = self.runs.partition_point(|r| r.0 <= p);
        let &(p0, j0, n) = self.runs.get(i.checked_sub(1)?)?;
        (p < p0 + n).then(|| j0 + p - p0)
    }
}

/// Offsets per chunk of the pair-by-pair path.
const DIAG_CHUNK: usize = 64;

/// `Rule::mask_row` by testing every key with `keep`.
pub(crate) fn mask_each<R: Rule + ?Sized>(
    rule: &R,
    h: usize,
    qp: usize,
    k_pos: &[usize],
    row: &mut [f32],
) {
    for (x, &kp) in row.iter_mut().zip(k_pos) {
        if !rule.keep(h, qp, kp) {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// K/V rows of one head gathered from a block (`[n, head_dim]` each) with their positions, sorted.
#[derive(Debug, Default)]
pub(crate) struct Gathered {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub pos: Vec<usize>,
}

/// The causal mask alone (or no mask at all when `.0` is false).
pub(crate) struct Causal(pub bool);

impl Rule for Causal {
    fn tile(&self, _h: usize, (qlo, qhi): (usize, usize), (klo, khi): (usize, usize)) -> TileKind {
        if !self.0 || khi <= qlo {
            TileKind::Full
        } else if klo > qhi {
            TileKind::Skip
        } else {
            TileKind::Masked
        }
    }
    fn keep(&self, _h: usize, qp: usize, kp: usize) -> bool {
        !self.0 || kp <= qp
    }
    fn same_for_every_head(&self) -> bool {
        true
    }
}

/// One online-softmax step for a row of scores: rescales the running sum `l` and output `acc` to
/// the new max and turns `row` into weights `e^(s − m)`. Returns false, leaving everything
/// untouched, when every score is −∞ (nothing kept).
fn softmax_step(m: &mut f32, l: &mut f32, acc: &mut [f32], row: &mut [f32]) -> bool {
    let mx = simd::row_max(row);
    if mx == f32::NEG_INFINITY {
        return false;
    }
    let m_new = m.max(mx);
    let sum = simd::exp_sub_sum(row, m_new);
    let corr = simd::exp_approx(*m - m_new);
    *l = *l * corr + sum;
    if corr != 1.0 {
        simd::scale(acc, corr);
    }
    *m = m_new;
    true
}

/// The running softmax of one (head, query tile): FlashAttention's `m`, `l` and unnormalised
/// output, plus the scratch score tile.
struct Rows {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
    s: Vec<f32>,
    d: usize,
    /// (query, key) pairs scored, masked or not: the kernel's work.
    scored: u64,
    /// Row offsets of a tile's keys and values (the row-wise path).
    k_at: Vec<usize>,
    v_at: Vec<usize>,
}

/// What [`Rows::finish`] returns: normalised output rows, their log-sum-exp, pairs scored.
type Finished = (Vec<f32>, Vec<f32>, u64);

/// Query blocks up to this many rows score a tile row by row instead of through the GEMM.
const ROWWISE_QUERIES: usize = 4;

impl Rows {
    fn new(bq: usize, d: usize) -> Self {
        Self {
            m: vec![f32::NEG_INFINITY; bq],
            l: vec![0.0; bq],
            acc: vec![0.0; bq * d],
            s: vec![0.0; bq * BK],
            d,
            scored: 0,
            k_at: Vec::new(),
            v_at: Vec::new(),
        }
    }

    /// Scores the queries against one tile of at most `BK` keys and folds it into the running
    /// softmax; with `masked`, `mask(qp, k_pos, row)` first sets the dropped scores of each row
    /// to −∞.
    #[allow(clippy::too_many_arguments)]
    fn tile<F: Fn(usize, &[usize], &mut [f32])>(
        &mut self,
        q: MatRef<'_>,
        q_pos: &[usize],
        k: MatRef<'_>,
        v: MatRef<'_>,
        k_pos: &[usize],
        scale: f32,
        masked: bool,
        mask: &F,
    ) -> Result<()> {
        let (bq, bk, d) = (q.rows, k.rows, self.d);
        self.scored += (bq * bk) as u64;
        // A few queries (decode) against a tile: gathered dot products and weighted row sums,
        // which skip the GEMM's packing (12% of a decode step when every tile went through it).
        let rowwise = bq <= ROWWISE_QUERIES
            && q.col_stride == 1
            && k.col_stride == 1
            && v.col_stride == 1
            && q.cols == d
            && k.cols == d
            && v.cols == d;
        if rowwise {
            q.check("q")?;
            k.check("k")?;
            v.check("v")?;
            self.k_at.clear();
            self.k_at.extend((0..bk).map(|j| j * k.row_stride));
            self.v_at.clear();
            self.v_at.extend((0..bk).map(|j| j * v.row_stride));
            for r in 0..bq {
                let qr = &q.data[r * q.row_stride..r * q.row_stride + d];
                let row = &mut self.s[r * BK..r * BK + bk];
                simd::dot_rows(qr, k.data, &self.k_at, row);
                simd::scale(row, scale);
            }
        } else {
            gemm_into(&mut self.s, BK, q, k.t(), scale, false, Par::Serial)?;
        }
        for (r, &qp) in q_pos.iter().enumerate().take(bq) {
            let row = &mut self.s[r * BK..r * BK + bk];
            if masked {
                mask(qp, k_pos, row);
            }
            let acc = &mut self.acc[r * d..(r + 1) * d];
            if !softmax_step(&mut self.m[r], &mut self.l[r], acc, row) {
                row.fill(0.0);
            }
        }
        if rowwise {
            for r in 0..bq {
                let p = &self.s[r * BK..r * BK + bk];
                simd::axpy_rows(&mut self.acc[r * d..(r + 1) * d], p, v.data, &self.v_at);
            }
            return Ok(());
        }
        let p_view = MatRef {
            data: &self.s,
            rows: bq,
            cols: bk,
            row_stride: BK,
            col_stride: 1,
        };
        gemm_into(&mut self.acc, d, p_view, v, 1.0, true, Par::Serial)
    }

    /// Scores each query against the keys at `qp − o` for the `offsets` (sorted) that `index`
    /// finds in the block, in key tiles not computed as tiles (`tiled`), and that `keep` accepts,
    /// folding them into the running softmax. `q_at(r)` and `k_at(j)` give where query row `r`
    /// and key/value row `j` start.
    ///
    /// Diagonal-major: for one offset the tile's queries use a strip of consecutive keys, and
    /// nearby offsets use overlapping strips, so keys are reused from cache across offsets
    /// instead of each query streaming its own scattered keys.
    #[allow(clippy::too_many_arguments)]
    fn diagonals<F: Fn(usize, usize) -> bool>(
        &mut self,
        q: &[f32],
        q_at: impl Fn(usize) -> usize,
        q_pos: &[usize],
        k: &[f32],
        v: &[f32],
        k_at: impl Fn(usize) -> usize,
        offsets: &[usize],
        index: &PosIndex,
        tiled: &[bool],
        scale: f32,
        keep: &F,
    ) {
        let (d, bq) = (self.d, q_pos.len());
        // Only offsets that put some query's key inside one of the block's runs of positions.
        let (qlo, qhi) = min_max(q_pos);
        let mut ranges: Vec<(usize, usize)> = index
            .runs
            .iter()
            .filter(|r| r.0 <= qhi)
            .map(|&(p0, _, n)| (qlo.saturating_sub(p0 + n - 1), qhi - p0))
            .collect();
        ranges.sort_unstable();
        let mut usable: Vec<usize> = Vec::new();
        let mut next = 0; // offsets below this are already taken
        for (lo, hi) in ranges {
            let from = offsets.partition_point(|&o| o < lo.max(next));
            usable.extend(offsets[from..].iter().take_while(|&&o| o <= hi));
            next = next.max(hi + 1);
        }
        let q_rows: Vec<usize> = (0..bq).map(&q_at).collect();
        // Scores [row][offset in chunk]; per offset, the (row, key row) pairs that count.
        let mut sc = vec![f32::NEG_INFINITY; bq * DIAG_CHUNK];
        let (mut rows, mut keys, mut q_starts, mut acc_at) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut bounds = Vec::with_capacity(DIAG_CHUNK + 1);
        let mut dots = vec![0f32; bq];
        let mut w = Vec::new();
        for chunk in usable.chunks(DIAG_CHUNK) {
            sc.fill(f32::NEG_INFINITY);
            rows.clear();
            keys.clear();
            bounds.clear();
            bounds.push(0);
            for (c, &o) in chunk.iter().enumerate() {
                let first = rows.len();
                q_starts.clear();
                for (r, &qp) in q_pos.iter().enumerate() {
                    let Some(kp) = qp.checked_sub(o) else {
                        continue;
                    };
                    let Some(j) = index.get(kp) else { continue };
                    if tiled[j / BK] || !keep(qp, kp) {
                        continue;
                    }
                    rows.push(r);
                    keys.push(k_at(j));
                    q_starts.push(q_rows[r]);
                }
                let n = rows.len() - first;
                simd::dot_pairs(q, &q_starts, k, &keys[first..], d, &mut dots[..n]);
                for (&r, &x) in rows[first..].iter().zip(&dots[..n]) {
                    sc[r * DIAG_CHUNK + c] = x * scale;
                }
                bounds.push(rows.len());
            }
            if rows.is_empty() {
                continue;
            }
            self.scored += rows.len() as u64;
            for r in 0..bq {
                let row = &mut sc[r * DIAG_CHUNK..(r + 1) * DIAG_CHUNK];
                let acc = &mut self.acc[r * d..(r + 1) * d];
                softmax_step(&mut self.m[r], &mut self.l[r], acc, row);
            }
            for c in 0..chunk.len() {
                let (s, e) = (bounds[c], bounds[c + 1]);
                w.clear();
                acc_at.clear();
                for &r in &rows[s..e] {
                    w.push(sc[r * DIAG_CHUNK + c]);
                    acc_at.push(r * d);
                }
                simd::axpy_pairs(&mut self.acc, &acc_at, &w, v, &keys[s..e], d);
            }
        }
    }

    /// Normalised output rows and their log-sum-exp (`-inf` and zeros for rows that kept nothing).
    fn finish(mut self) -> Finished {
        let d = self.d;
        let mut lse = vec![f32::NEG_INFINITY; self.m.len()];
        for (r, lv) in lse.iter_mut().enumerate() {
            let row = &mut self.acc[r * d..(r + 1) * d];
            if self.l[r] > 0.0 {
                let inv = 1.0 / self.l[r];
                row.iter_mut().for_each(|a| *a *= inv);
                *lv = self.m[r] + self.l[r].ln();
            } else {
                row.fill(0.0);
            }
        }
        (self.acc, lse, self.scored)
    }
}

/// Attends `q` (`[Lq, n_heads, head_dim]`, positions `q_pos`) to `k`/`v` (`[Lk, n_kv_heads,
/// head_dim]`, positions `k_pos`). Positions need not be sorted or contiguous.
pub fn attention_block(
    p: &AttentionParams,
    q: &[f32],
    q_pos: &[usize],
    k: &[f32],
    v: &[f32],
    k_pos: &[usize],
) -> Result<PartialAttention> {
    Ok(attend(p, &Causal(p.causal), q, q_pos, k, v, k_pos)?.0)
}

/// The blockwise kernel under any [`Rule`]; also returns the number of (query, key) pairs scored
/// (summed over heads).
pub(crate) fn attend<R: Rule>(
    p: &AttentionParams,
    rule: &R,
    q: &[f32],
    q_pos: &[usize],
    k: &[f32],
    v: &[f32],
    k_pos: &[usize],
) -> Result<(PartialAttention, u64)> {
    p.validate(q, q_pos, k, v, k_pos)?;
    let (lq, lk, d, hq, hkv) = (
        q_pos.len(),
        k_pos.len(),
        p.head_dim,
        p.n_heads,
        p.n_kv_heads,
    );
    let group = hq / hkv;
    let q_tiles = lq.div_ceil(BQ);
    let k_tiles: Vec<(usize, usize, usize, usize)> = (0..lk.div_ceil(BK))
        .map(|t| {
            let (s, e) = (t * BK, ((t + 1) * BK).min(lk));
            let (lo, hi) = min_max(&k_pos[s..e]);
            (s, e, lo, hi)
        })
        .collect();
    // Decode (one query position) under grouped-query attention: the query heads that share a
    // KV head are scored together as the rows of one task (up to the row-wise limit), so each
    // K/V row comes from memory once per KV head instead of once per query head. Every row's
    // arithmetic is what it is alone, so the result is bit-identical.
    let sub = group.min(ROWWISE_QUERIES);
    let tasks = hkv * group.div_ceil(sub);
    if lq == 1 && sub > 1 && rule.same_for_every_head() && tasks >= rayon::current_num_threads() {
        let qp = vec![q_pos[0]; sub];
        let parts: Vec<(usize, Finished)> = (0..tasks)
            .into_par_iter()
            .map(|task| {
                let (kvh, c) = (task / group.div_ceil(sub), task % group.div_ceil(sub));
                let h0 = kvh * group + c * sub;
                let n = sub.min((kvh + 1) * group - h0);
                let q_view = MatRef {
                    data: &q[h0 * d..],
                    rows: n,
                    cols: d,
                    row_stride: d,
                    col_stride: 1,
                };
                let mut rows = Rows::new(n, d);
                for &(k0, k1, klo, khi) in &k_tiles {
                    let kind = rule.tile(h0, (q_pos[0], q_pos[0]), (klo, khi));
                    if kind == TileKind::Skip {
                        continue;
                    }
                    let start = k0 * hkv * d + kvh * d;
                    rows.tile(
                        q_view,
                        &qp[..n],
                        strided(k, start, k1 - k0, d, hkv * d),
                        strided(v, start, k1 - k0, d, hkv * d),
                        &k_pos[k0..k1],
                        p.scale,
                        kind == TileKind::Masked,
                        &|qp, kps: &[usize], row: &mut [f32]| rule.mask_row(h0, qp, kps, row),
                    )?;
                }
                Ok((h0, rows.finish()))
            })
            .collect::<Result<_>>()?;
        let mut res = PartialAttention::empty(1, hq, d);
        let mut scored = 0;
        for (h0, (acc, lse, n)) in parts {
            scored += n;
            res.out[h0 * d..h0 * d + acc.len()].copy_from_slice(&acc);
            res.lse[h0..h0 + lse.len()].copy_from_slice(&lse);
        }
        return Ok((res, scored));
    }

    let causal = Causal(true);
    let index = (0..hq)
        .any(|h| rule.diagonals(h).is_some())
        .then(|| PosIndex::new(k_pos));

    // One task per (head, query tile); each returns its rows of out and lse, which are copied
    // into the result a batch of query tiles at a time, so the tasks' buffers never hold a
    // second copy of a long sequence's whole output.
    let mut res = PartialAttention::empty(lq, hq, d);
    let mut scored = 0;
    for batch in (0..q_tiles).step_by(TILES_PER_BATCH) {
        let batch_tiles = TILES_PER_BATCH.min(q_tiles - batch);
        let tiles: Vec<(Vec<f32>, Vec<f32>, u64)> = (0..hq * batch_tiles)
            .into_par_iter()
            .map(|task| {
                let (h, qt) = (task / batch_tiles, batch + task % batch_tiles);
                let (q0, q1) = (qt * BQ, ((qt + 1) * BQ).min(lq));
                let (qlo, qhi) = min_max(&q_pos[q0..q1]);
                let kvh = h / group;
                let q_view = MatRef {
                    data: &q[q0 * hq * d + h * d..],
                    rows: q1 - q0,
                    cols: d,
                    row_stride: hq * d,
                    col_stride: 1,
                };
                let mut rows = Rows::new(q1 - q0, d);
                if let Some(g) = rule.gathered(h) {
                    for s in (0..g.pos.len()).step_by(BK) {
                        let e = (s + BK).min(g.pos.len());
                        let kind = causal.tile(h, (qlo, qhi), min_max(&g.pos[s..e]));
                        if kind == TileKind::Skip {
                            continue;
                        }
                        rows.tile(
                            q_view,
                            &q_pos[q0..q1],
                            strided(&g.k, s * d, e - s, d, d),
                            strided(&g.v, s * d, e - s, d, d),
                            &g.pos[s..e],
                            p.scale,
                            kind == TileKind::Masked,
                            &|qp, kps: &[usize], row: &mut [f32]| {
                                Causal(true).mask_row(0, qp, kps, row)
                            },
                        )?;
                    }
                }
                // Tiles computed here; the pair-by-pair path leaves their pairs alone.
                let mut tiled = vec![false; k_tiles.len()];
                for (t, &(k0, k1, klo, khi)) in k_tiles.iter().enumerate() {
                    let kind = rule.tile(h, (qlo, qhi), (klo, khi));
                    if kind == TileKind::Skip {
                        continue;
                    }
                    tiled[t] = true;
                    let start = k0 * hkv * d + kvh * d;
                    rows.tile(
                        q_view,
                        &q_pos[q0..q1],
                        strided(k, start, k1 - k0, d, hkv * d),
                        strided(v, start, k1 - k0, d, hkv * d),
                        &k_pos[k0..k1],
                        p.scale,
                        kind == TileKind::Masked,
                        &|qp, kps: &[usize], row: &mut [f32]| rule.mask_row(h, qp, kps, row),
                    )?;
                }
                if let (Some(offsets), Some(index)) = (rule.diagonals(h), &index) {
                    rows.diagonals(
                        q,
                        |r| ((q0 + r) * hq + h) * d,
                        &q_pos[q0..q1],
                        k,
                        v,
                        |j| (j * hkv + kvh) * d,
                        offsets,
                        index,
                        &tiled,
                        p.scale,
                        &|qp, kp| rule.keep(h, qp, kp),
                    );
                }
                Ok(rows.finish())
            })
            .collect::<Result<_>>()?;
        for (task, (acc, lse, n)) in tiles.into_iter().enumerate() {
            let (h, qt) = (task / batch_tiles, batch + task % batch_tiles);
            scored += n;
            for (r, (row, &lv)) in acc.chunks(d).zip(&lse).enumerate() {
                let t = qt * BQ + r;
                res.out[(t * hq + h) * d..(t * hq + h + 1) * d].copy_from_slice(row);
                res.lse[t * hq + h] = lv;
            }
        }
    }
    Ok((res, scored))
}

/// Combines two partial results over disjoint key sets into the result over their union.
///
/// With `m = max(lse_a, lse_b)` the weights `exp(lse_a − m)` and `exp(lse_b − m)` are at most 1, so
/// no exponent can overflow however extreme the logits; rows where both sides saw nothing stay
/// empty (`lse = -inf`, `out = 0`) instead of becoming NaN.
pub fn merge(a: &PartialAttention, b: &PartialAttention) -> Result<PartialAttention> {
    let mut acc = a.clone();
    merge_into(&mut acc, b)?;
    Ok(acc)
}

/// In-place [`merge`]: `acc ← merge(acc, b)`.
pub fn merge_into(acc: &mut PartialAttention, b: &PartialAttention) -> Result<()> {
    merge_into_rows(&mut acc.out, &mut acc.lse, b)
}

/// [`merge_into`] on a run of an accumulator's rows (`out`, `lse`: the same rows of a larger
/// [`PartialAttention`]), so a query block computed in pieces merges piece by piece.
pub fn merge_into_rows(out: &mut [f32], lse: &mut [f32], b: &PartialAttention) -> Result<()> {
    merge_slices(out, lse, &b.out, &b.lse)
}

/// [`merge_into_rows`] with the other partial result as slices (`b_out`, `b_lse`).
pub fn merge_slices(out: &mut [f32], lse: &mut [f32], b_out: &[f32], b_lse: &[f32]) -> Result<()> {
    let rows = lse.len();
    if b_lse.len() != rows
        || out.len() != b_out.len()
        || (rows > 0 && !out.len().is_multiple_of(rows))
    {
        return Err(Error::ShapeMismatch {
            op: "merge",
            expected: vec![rows, out.len()],
            got: vec![b_lse.len(), b_out.len()],
        });
    }
    if rows == 0 {
        return Ok(());
    }
    let d = out.len() / rows;
    out.par_chunks_mut(d)
        .zip(lse.par_iter_mut())
        .zip(b_out.par_chunks(d).zip(b_lse.par_iter()))
        .for_each(|((oa, la), (ob, &lb))| {
            let m = la.max(lb);
            if m == f32::NEG_INFINITY {
                return;
            }
            let (wa, wb) = ((*la - m).exp(), (lb - m).exp());
            let inv = 1.0 / (wa + wb);
            let (wa, wb) = (wa * inv, wb * inv);
            for (x, &y) in oa.iter_mut().zip(ob) {
                *x = wa * *x + wb * y;
            }
            // One of the two weights is exactly 1, so this is m + ln(1 + e^{-|Δ|}).
            *la = m + (-(*la - lb).abs()).exp().ln_1p();
        });
    Ok(())
}

/// Reference attention that materialises every score row in f64. For tests of the blockwise
/// kernel and of ring attention, never for serving.
pub fn naive_attention(
    p: &AttentionParams,
    q: &[f32],
    q_pos: &[usize],
    k: &[f32],
    v: &[f32],
    k_pos: &[usize],
) -> Result<PartialAttention> {
    p.validate(q, q_pos, k, v, k_pos)?;
    let (d, hq, hkv) = (p.head_dim, p.n_heads, p.n_kv_heads);
    let mut res = PartialAttention::empty(q_pos.len(), hq, d);
    for (t, &qp) in q_pos.iter().enumerate() {
        for h in 0..hq {
            let kvh = h / (hq / hkv);
            let qrow = &q[(t * hq + h) * d..][..d];
            let scores: Vec<f64> = k_pos
                .iter()
                .enumerate()
                .map(|(j, &kp)| {
                    if p.causal && kp > qp {
                        f64::NEG_INFINITY
                    } else {
                        let krow = &k[(j * hkv + kvh) * d..][..d];
                        p.scale as f64
                            * qrow
                                .iter()
                                .zip(krow)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                    }
                })
                .collect();
            let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if mx == f64::NEG_INFINITY {
                continue;
            }
            let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f64 = w.iter().sum();
            let out = &mut res.out[(t * hq + h) * d..][..d];
            for (j, wj) in w.iter().enumerate() {
                let vrow = &v[(j * hkv + kvh) * d..][..d];
                for (o, x) in out.iter_mut().zip(vrow) {
                    *o += (wj / sum * *x as f64) as f32;
                }
            }
            res.lse[t * hq + h] = (mx + sum.ln()) as f32;
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::testing::rand_vec;

    fn assert_close(a: &PartialAttention, b: &PartialAttention, tol: f32) {
        for (x, y) in a.out.iter().zip(&b.out) {
            assert!((x - y).abs() <= tol, "out {x} vs {y}");
        }
        for (x, y) in a.lse.iter().zip(&b.lse) {
            assert!(x == y || (x - y).abs() <= tol, "lse {x} vs {y}");
        }
    }

    fn params(hq: usize, hkv: usize, d: usize, causal: bool) -> AttentionParams {
        AttentionParams {
            n_heads: hq,
            n_kv_heads: hkv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            causal,
        }
    }

    #[test]
    fn matches_naive_on_multi_tile_causal_gqa() {
        let p = params(4, 2, 16, true);
        let (lq, lk) = (150, 300);
        let q = rand_vec(lq * 4 * 16, 1, 2.0);
        let k = rand_vec(lk * 2 * 16, 2, 2.0);
        let v = rand_vec(lk * 2 * 16, 3, 1.0);
        let q_pos: Vec<usize> = (150..300).collect();
        let k_pos: Vec<usize> = (0..300).collect();
        let got = attention_block(&p, &q, &q_pos, &k, &v, &k_pos).unwrap();
        let want = naive_attention(&p, &q, &q_pos, &k, &v, &k_pos).unwrap();
        assert_close(&got, &want, 1e-5);
    }

    #[test]
    fn decode_sized_query_blocks_match_naive() {
        // 1–4 queries take the row-wise tile path; keys span several tiles, one partly masked.
        let p = params(4, 2, 16, true);
        let lk = 300;
        let k = rand_vec(lk * 2 * 16, 12, 2.0);
        let v = rand_vec(lk * 2 * 16, 13, 1.0);
        let k_pos: Vec<usize> = (0..lk).collect();
        for lq in 1..=4 {
            let q = rand_vec(lq * 4 * 16, 14 + lq as u64, 2.0);
            let q_pos: Vec<usize> = (lk - lq..lk).map(|x| x - 40).collect();
            let got = attention_block(&p, &q, &q_pos, &k, &v, &k_pos).unwrap();
            let want = naive_attention(&p, &q, &q_pos, &k, &v, &k_pos).unwrap();
            assert_close(&got, &want, 1e-5);
        }
    }

    #[test]
    fn grouped_decode_is_bit_identical_to_one_head_at_a_time() {
        // One query position: the heads sharing a KV head are scored as rows of one task. Each
        // head alone (a one-head problem on its KV head's slice) must give the same bits.
        let pool = crate::testing::thread_pool(2);
        let (lk, d) = (300, 64);
        for (hq, hkv) in [(8, 4), (12, 4), (32, 4), (16, 16)] {
            let p = params(hq, hkv, d, true);
            let k = rand_vec(lk * hkv * d, 21, 2.0);
            let v = rand_vec(lk * hkv * d, 22, 1.0);
            let k_pos: Vec<usize> = (0..lk).collect();
            let q = rand_vec(hq * d, 23 + hq as u64, 2.0);
            // The last position (every tile full) and one inside the second tile (masked, skipped).
            for qp in [lk - 1, 150] {
                let got = pool
                    .install(|| attention_block(&p, &q, &[qp], &k, &v, &k_pos))
                    .unwrap();
                let one = params(1, 1, d, true);
                for h in 0..hq {
                    let kvh = h / (hq / hkv);
                    let slice = |x: &[f32]| -> Vec<f32> {
                        (0..lk)
                            .flat_map(|t| x[(t * hkv + kvh) * d..][..d].to_vec())
                            .collect()
                    };
                    let alone = attention_block(
                        &one,
                        &q[h * d..(h + 1) * d],
                        &[qp],
                        &slice(&k),
                        &slice(&v),
                        &k_pos,
                    )
                    .unwrap();
                    assert_eq!(
                        &got.out[h * d..(h + 1) * d],
                        &alone.out[..],
                        "{hq}/{hkv} head {h}"
                    );
                    assert_eq!(got.lse[h].to_bits(), alone.lse[0].to_bits());
                }
            }
        }
    }

    #[test]
    fn fully_masked_rows_are_empty_not_nan() {
        let p = params(2, 1, 8, true);
        let q = rand_vec(3 * 2 * 8, 4, 1.0);
        let k = rand_vec(5 * 8, 5, 1.0);
        let v = rand_vec(5 * 8, 6, 1.0);
        let got = attention_block(&p, &q, &[0, 1, 2], &k, &v, &[10, 11, 12, 13, 14]).unwrap();
        assert!(got.lse.iter().all(|l| *l == f32::NEG_INFINITY));
        assert!(got.out.iter().all(|o| *o == 0.0));
    }

    #[test]
    fn merge_is_stable_at_extreme_logits() {
        let a = PartialAttention {
            out: vec![1.0, 2.0],
            lse: vec![1e30],
        };
        let b = PartialAttention {
            out: vec![3.0, 4.0],
            lse: vec![-1e30],
        };
        let m = merge(&a, &b).unwrap();
        assert_eq!(m.out, vec![1.0, 2.0]);
        assert_eq!(m.lse, vec![1e30]);
        let c = PartialAttention {
            out: vec![5.0, 6.0],
            lse: vec![88.8],
        };
        let d = PartialAttention {
            out: vec![7.0, 8.0],
            lse: vec![88.8],
        };
        let m = merge(&c, &d).unwrap();
        assert!((m.out[0] - 6.0).abs() < 1e-6 && (m.lse[0] - (88.8 + 2f32.ln())).abs() < 1e-4);
        let e = PartialAttention::empty(1, 1, 2);
        assert_eq!(merge(&e, &e).unwrap(), e);
        assert_eq!(merge(&e, &c).unwrap(), c);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let p = params(3, 2, 4, true);
        assert!(attention_block(&p, &[0.0; 12], &[0], &[0.0; 8], &[0.0; 8], &[0]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Splitting the keys into any number of blocks, attending to each and merging the
        /// results in order gives plain attention over all keys.
        #[test]
        fn any_block_partition_equals_naive(
            lq in 1usize..90, lk in 1usize..300, cuts in proptest::collection::vec(0usize..300, 0..5),
            seed in 0u64..1000, causal in any::<bool>(), offset in 0usize..200,
        ) {
            let p = params(4, 2, 8, causal);
            let q = rand_vec(lq * 32, seed, 3.0);
            let k = rand_vec(lk * 16, seed + 1, 3.0);
            let v = rand_vec(lk * 16, seed + 2, 1.0);
            let q_pos: Vec<usize> = (0..lq).map(|i| i * 3 + offset).collect();
            let k_pos: Vec<usize> = (0..lk).collect();
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c % (lk + 1)).collect();
            bounds.extend([0, lk]);
            bounds.sort_unstable();
            let mut acc = PartialAttention::empty(lq, 4, 8);
            for w in bounds.windows(2) {
                let (s, e) = (w[0], w[1]);
                let part = attention_block(&p, &q, &q_pos, &k[s * 16..e * 16], &v[s * 16..e * 16], &k_pos[s..e]).unwrap();
                merge_into(&mut acc, &part).unwrap();
            }
            let want = naive_attention(&p, &q, &q_pos, &k, &v, &k_pos).unwrap();
            assert_close(&acc, &want, 2e-5);
        }

        #[test]
        fn merge_is_commutative_and_associative(seed in 0u64..1000, rows in 1usize..20, spread in 0.0f32..80.0) {
            let d = 4;
            let mk = |s: u64| {
                let mut lse = rand_vec(rows, s, spread);
                // Some rows saw no keys.
                if s.is_multiple_of(3) { lse[0] = f32::NEG_INFINITY; }
                let mut out = rand_vec(rows * d, s + 7, 1.0);
                for (r, l) in lse.iter().enumerate() {
                    if *l == f32::NEG_INFINITY { out[r * d..(r + 1) * d].fill(0.0); }
                }
                PartialAttention { out, lse }
            };
            let (a, b, c) = (mk(seed * 3), mk(seed * 3 + 1), mk(seed * 3 + 2));
            assert_close(&merge(&a, &b).unwrap(), &merge(&b, &a).unwrap(), 1e-5);
            let left = merge(&merge(&a, &b).unwrap(), &c).unwrap();
            let right = merge(&a, &merge(&b, &c).unwrap()).unwrap();
            assert_close(&left, &right, 1e-4);
        }
    }
}
