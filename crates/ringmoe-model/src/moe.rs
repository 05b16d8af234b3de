//! The mixture-of-experts block split at the points where expert parallelism inserts its all-to-all:
//!
//! 1. [`route`]: router logits → top-k expert ids and gate weights per token.
//! 2. [`plan`]: the routing slots grouped per expert (counts + permutation), stable in token order.
//! 3. [`gather_rows`] + [`expert_compute`]: one grouped pass of SwiGLU expert MLPs over each
//!    expert's rows (two GEMMs per expert, never per token).
//! 4. [`combine`]: the weighted scatter back to token order.
//!
//! Between 2/3 a distributed forward sends rows to the worker hosting each expert and back.
//! The router lives here; expert weights ([`ExpertWeights`]) are data, their layout in checkpoints
//! is the architecture files' business, and the compute goes through `ringmoe_core::gemm`.

use rayon::prelude::*;
use ringmoe_core::gemm::Par;
use ringmoe_core::{Backend, Cpu, Stored, Tensor, WeightPrecision, Weights, ops};

use crate::{Error, Result};

/// Top-k routing of a batch of tokens. `expert_ids` and `weights` are `[tokens, top_k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub expert_ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn tokens(&self) -> usize {
        self.expert_ids.len().checked_div(self.top_k).unwrap_or(0)
    }
}

/// How the top-k probabilities are turned into gate weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopKNorm {
    /// Divide by their sum (Mixtral always; Qwen with `norm_topk_prob`).
    Renormalize,
    /// Use the softmax probabilities as they are.
    Softmax,
}

/// Softmax over all experts in f32, top-k, then optional renormalisation: exactly transformers'
/// `MixtralTopKRouter` / `Qwen*MoeTopKRouter`. `logits` is `[tokens, num_experts]`.
pub fn route(logits: &[f32], num_experts: usize, top_k: usize, norm: TopKNorm) -> Result<Routing> {
    if num_experts == 0
        || top_k == 0
        || top_k > num_experts
        || !logits.len().is_multiple_of(num_experts)
    {
        return Err(Error::InvalidInput(format!(
            "route: {} logits cannot be split into rows of {num_experts} experts with top-{top_k}",
            logits.len()
        )));
    }
    let tokens = logits.len() / num_experts;
    let mut expert_ids = vec![0u32; tokens * top_k];
    let mut weights = vec![0f32; tokens * top_k];
    expert_ids
        .par_chunks_mut(top_k)
        .zip(weights.par_chunks_mut(top_k))
        .zip(logits.par_chunks(num_experts))
        .for_each(|((ids, ws), row)| {
            let mut probs = row.to_vec();
            ops::softmax_inplace(&mut probs);
            let top = ops::top_k(&probs, top_k);
            let sum: f32 = top.iter().map(|&e| probs[e]).sum();
            for (j, &e) in top.iter().enumerate() {
                ids[j] = e as u32;
                ws[j] = match norm {
                    TopKNorm::Renormalize => probs[e] / sum,
                    TopKNorm::Softmax => probs[e],
                };
            }
        });
    Ok(Routing {
        top_k,
        expert_ids,
        weights,
    })
}

/// Routing slots grouped by expert. Row `r` of the grouped order is routing slot
/// `slot_of_row[r]` (= `token · top_k + j`); expert `e` owns rows `offsets[e]..offsets[e + 1]`.
/// Within an expert, rows are in token order.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchPlan {
    pub top_k: usize,
    pub offsets: Vec<usize>,
    pub slot_of_row: Vec<u32>,
    /// Inverse permutation: the grouped row of each routing slot.
    pub row_of_slot: Vec<u32>,
}

impl DispatchPlan {
    pub fn num_experts(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn count(&self, expert: usize) -> usize {
        self.offsets[expert + 1] - self.offsets[expert]
    }

    /// `(expert, rows)` for every expert that received at least one row, in expert order.
    pub fn groups(&self) -> Vec<(usize, usize)> {
        (0..self.num_experts())
            .map(|e| (e, self.count(e)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    /// The token a grouped row came from.
    pub fn token_of_row(&self, row: usize) -> usize {
        self.slot_of_row[row] as usize / self.top_k
    }
}

/// Groups routing slots per expert (a counting sort, stable in token order).
pub fn plan(routing: &Routing, num_experts: usize) -> Result<DispatchPlan> {
    let mut offsets = vec![0usize; num_experts + 1];
    for (slot, &e) in routing.expert_ids.iter().enumerate() {
        let e = e as usize;
        if e >= num_experts {
            return Err(Error::InvalidInput(format!(
                "routing slot {slot} (token {}) names expert {e}, but the layer has {num_experts} experts",
                slot / routing.top_k.max(1)
            )));
        }
        offsets[e + 1] += 1;
    }
    for e in 0..num_experts {
        offsets[e + 1] += offsets[e];
    }
    let mut next = offsets.clone();
    let mut slot_of_row = vec![0u32; routing.expert_ids.len()];
    let mut row_of_slot = vec![0u32; routing.expert_ids.len()];
    for (slot, &e) in routing.expert_ids.iter().enumerate() {
        let row = next[e as usize];
        next[e as usize] += 1;
        slot_of_row[row] = slot as u32;
        row_of_slot[slot] = row as u32;
    }
    Ok(DispatchPlan {
        top_k: routing.top_k,
        offsets,
        slot_of_row,
        row_of_slot,
    })
}

/// Copies the hidden state of each grouped row's token: the payload a dispatch sends.
pub fn gather_rows(x: &[f32], hidden: usize, plan: &DispatchPlan) -> Vec<f32> {
    let mut out = vec![0f32; plan.slot_of_row.len() * hidden];
    out.par_chunks_mut(hidden).enumerate().for_each(|(r, row)| {
        let t = plan.token_of_row(r);
        row.copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
    });
    out
}

/// One SwiGLU expert: `down(silu(gate(x)) ⊙ up(x))`, with gate and up fused row-wise as
/// `gate_up = [gate; up]` (`[2·intermediate, hidden]`) so one GEMM computes both.
#[derive(Debug, Clone)]
pub struct ExpertWeights<B: Backend = Cpu> {
    pub hidden: usize,
    pub intermediate: usize,
    /// `[2·intermediate, hidden]`.
    pub gate_up: B::Weight,
    /// `[hidden, intermediate]`.
    pub down: B::Weight,
}

impl PartialEq for ExpertWeights<Cpu> {
    fn eq(&self, o: &Self) -> bool {
        self.hidden == o.hidden
            && self.intermediate == o.intermediate
            && self.gate_up == o.gate_up
            && self.down == o.down
    }
}

impl ExpertWeights<Cpu> {
    /// An expert from f32 matrices (benchmarks and tests build experts this way).
    pub fn from_f32(
        hidden: usize,
        intermediate: usize,
        gate_up: Vec<f32>,
        down: Vec<f32>,
    ) -> Result<Self> {
        Ok(Self {
            hidden,
            intermediate,
            gate_up: Weights::from_f32(gate_up, 2 * intermediate, hidden)?,
            down: Weights::from_f32(down, hidden, intermediate)?,
        })
    }

    /// Applies the expert to `rows` rows of `x` (`[rows, hidden]`).
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.forward_with(x, rows, Par::Rayon)
    }

    /// [`Self::forward`] with an explicit GEMM parallelism.
    pub fn forward_with(&self, x: &[f32], rows: usize, par: Par) -> Result<Vec<f32>> {
        let i = self.intermediate;
        let gu = self.gate_up.matmul_nt(x, rows, par)?;
        let act = ops::swiglu_fused(&gu, rows, i)?;
        Ok(self.down.matmul_nt(&act, rows, par)?)
    }

    /// The same expert on backend `b`, matrices in `precision`.
    pub fn into_backend<B: Backend>(
        self,
        b: &B,
        precision: WeightPrecision,
    ) -> ringmoe_core::Result<ExpertWeights<B>> {
        Ok(ExpertWeights {
            hidden: self.hidden,
            intermediate: self.intermediate,
            gate_up: b.weight(self.gate_up, precision, false)?,
            down: b.weight(self.down, precision, false)?,
        })
    }
}

impl<B: Backend> ExpertWeights<B> {
    /// The expert on `[rows, hidden]` rows on its backend.
    pub fn forward_on(&self, b: &B, x: &B::Act) -> ringmoe_core::Result<B::Act> {
        let gu = b.linear(x, &self.gate_up, None)?;
        b.linear(&b.swiglu(&gu)?, &self.down, None)
    }

    /// Bytes of weights held, in their stored precision.
    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }
}

/// The experts of one layer that this process holds; the rest are `None`.
#[derive(Debug, Clone)]
pub struct ExpertSet<B: Backend = Cpu> {
    pub layer: usize,
    pub experts: Vec<Option<ExpertWeights<B>>>,
}

impl Default for ExpertSet<Cpu> {
    fn default() -> Self {
        Self {
            layer: 0,
            experts: Vec::new(),
        }
    }
}

impl ExpertSet<Cpu> {
    /// The same experts on backend `b`.
    pub fn into_backend<B: Backend>(
        self,
        b: &B,
        precision: WeightPrecision,
    ) -> ringmoe_core::Result<ExpertSet<B>> {
        Ok(ExpertSet {
            layer: self.layer,
            experts: self
                .experts
                .into_iter()
                .map(|e| e.map(|e| e.into_backend(b, precision)).transpose())
                .collect::<std::result::Result<_, _>>()?,
        })
    }
}

impl<B: Backend> ExpertSet<B> {
    pub fn get(&self, expert: usize) -> Result<&ExpertWeights<B>> {
        self.experts
            .get(expert)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::ExpertNotLoaded {
                layer: self.layer,
                expert,
                loaded: self.loaded(),
            })
    }

    /// Ids of the experts held.
    pub fn loaded(&self) -> Vec<usize> {
        self.experts
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_some())
            .map(|(i, _)| i)
            .collect()
    }

    /// `(rows, (gate_up, down))` of each `(expert, rows)` group, for `Backend::grouped_mlp`; an
    /// expert not held here is an error naming it.
    pub fn groups(
        &self,
        groups: &[(usize, usize)],
    ) -> Result<Vec<ringmoe_core::ExpertGroup<'_, B::Weight>>> {
        groups
            .iter()
            .map(|&(e, n)| {
                let w = self.get(e)?;
                Ok((n, (&w.gate_up, &w.down)))
            })
            .collect()
    }
}

/// Runs each expert over its contiguous group of rows. `groups` lists `(expert, rows)` in the
/// order the rows appear in `x_rows` (`[Σ rows, hidden]`); the result has the same row order.
/// The host form of `Backend::grouped_mlp`.
pub fn expert_compute(
    x_rows: &[f32],
    hidden: usize,
    groups: &[(usize, usize)],
    experts: &ExpertSet,
) -> Result<Vec<f32>> {
    let total: usize = groups.iter().map(|g| g.1).sum();
    if x_rows.len() != total * hidden {
        return Err(Error::InvalidInput(format!(
            "expert_compute: {} values for {total} rows of hidden size {hidden}",
            x_rows.len()
        )));
    }
    let x = Tensor::from_vec(x_rows.to_vec(), [total, hidden])?;
    Ok(Cpu.grouped_mlp(&x, &experts.groups(groups)?)?.into_vec())
}

/// Weighted sum of each token's expert outputs (`[tokens, hidden]`). A token's contributions are
/// added in increasing expert id, the order transformers' per-expert `index_add_` uses.
pub fn combine(
    expert_out: &[f32],
    hidden: usize,
    plan: &DispatchPlan,
    routing: &Routing,
) -> Result<Vec<f32>> {
    let (tokens, k) = (routing.tokens(), routing.top_k);
    if expert_out.len() != tokens * k * hidden || plan.row_of_slot.len() != tokens * k {
        return Err(Error::InvalidInput(format!(
            "combine: {} expert output values for {tokens} tokens × top-{k} × hidden {hidden}",
            expert_out.len()
        )));
    }
    combine_rows(expert_out, hidden, &plan.row_of_slot, routing, None)
}

/// [`combine`] with the row of each routing slot given directly (`row_of_slot[slot]`). Slots
/// marked `false` in `keep` (tokens a capacity limit dropped) contribute nothing.
pub fn combine_rows(
    expert_out: &[f32],
    hidden: usize,
    row_of_slot: &[u32],
    routing: &Routing,
    keep: Option<&[bool]>,
) -> Result<Vec<f32>> {
    let (tokens, k) = (routing.tokens(), routing.top_k);
    let rows = expert_out.len() / hidden.max(1);
    if row_of_slot.len() != tokens * k
        || row_of_slot.iter().any(|&r| r as usize >= rows)
        || keep.is_some_and(|m| m.len() != tokens * k)
    {
        return Err(Error::InvalidInput(format!(
            "combine: {} slot rows into {rows} expert output rows for {tokens} tokens × top-{k}",
            row_of_slot.len()
        )));
    }
    let (order, weights) = combine_plan(routing, |s| match keep {
        Some(m) if !m[s] => rows,
        _ => row_of_slot[s] as usize,
    });
    Ok(ringmoe_core::ops::weighted_row_sum(
        expert_out, hidden, &order, &weights, k,
    )?)
}

/// The order every MoE combine sums a token's expert outputs in — increasing expert id, the
/// order transformers' per-expert `index_add_` uses — decided here once for the host and device
/// paths: for each token, its slots sorted by expert, as the rows to read (`row_of(slot)`; the
/// row count of the source marks a dropped slot) and their gate weights, ready for
/// [`ringmoe_core::ops::weighted_row_sum`] or `Backend::combine`.
pub fn combine_plan(routing: &Routing, row_of: impl Fn(usize) -> usize) -> (Vec<usize>, Vec<f32>) {
    let k = routing.top_k;
    let mut rows = Vec::with_capacity(routing.expert_ids.len());
    let mut weights = Vec::with_capacity(routing.expert_ids.len());
    for t in 0..routing.tokens() {
        let mut slots: Vec<usize> = (t * k..(t + 1) * k).collect();
        slots.sort_by_key(|&s| routing.expert_ids[s]);
        for s in slots {
            rows.push(row_of(s));
            weights.push(routing.weights[s]);
        }
    }
    (rows, weights)
}

/// route → plan → gather → compute → combine on one process: the single-process MoE block.
pub fn moe_forward(
    x: &[f32],
    hidden: usize,
    router_logits: &[f32],
    experts: &ExpertSet,
    top_k: usize,
    norm: TopKNorm,
) -> Result<(Vec<f32>, Routing)> {
    let routing = route(router_logits, experts.experts.len(), top_k, norm)?;
    Ok((experts_local(x, hidden, &routing, experts)?, routing))
}

/// plan → gather → grouped expert MLPs → combine in increasing expert id, of already routed
/// tokens `x` (`[tokens, hidden]`) on backend `b`, every expert routed to held in `experts`.
pub fn experts_on<B: Backend>(
    b: &B,
    x: &B::Act,
    routing: &Routing,
    experts: &ExpertSet<B>,
) -> Result<B::Act> {
    let plan = plan(routing, experts.experts.len())?;
    let token_of_row: Vec<usize> = (0..plan.slot_of_row.len())
        .map(|r| plan.token_of_row(r))
        .collect();
    let rows = b.gather_rows(x, &token_of_row)?;
    let y = b.grouped_mlp(&rows, &experts.groups(&plan.groups())?)?;
    let (order, weights) = combine_plan(routing, |s| plan.row_of_slot[s] as usize);
    Ok(b.combine(&y, &order, &weights, routing.top_k)?)
}

/// [`experts_on`] on host rows (`[tokens, hidden]`): the single-process MoE's routed experts.
pub fn experts_local(
    x: &[f32],
    hidden: usize,
    routing: &Routing,
    experts: &ExpertSet,
) -> Result<Vec<f32>> {
    let x = Tensor::from_vec(x.to_vec(), [routing.tokens(), hidden])?;
    Ok(experts_on(&Cpu, &x, routing, experts)?.into_vec())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use ringmoe_core::testing::rand_vec;

    fn experts(n: usize, hidden: usize, inter: usize, seed: u64) -> ExpertSet {
        ExpertSet {
            layer: 0,
            experts: (0..n as u64)
                .map(|e| {
                    Some(
                        ExpertWeights::from_f32(
                            hidden,
                            inter,
                            rand_vec(2 * inter * hidden, seed + 2 * e, 0.5),
                            rand_vec(hidden * inter, seed + 2 * e + 1, 0.5),
                        )
                        .unwrap(),
                    )
                })
                .collect(),
        }
    }

    /// Per-token reference: for each token, evaluate its chosen experts one by one in f64.
    fn naive_moe(
        x: &[f32],
        hidden: usize,
        logits: &[f32],
        ex: &ExpertSet,
        k: usize,
        norm: TopKNorm,
    ) -> Vec<f32> {
        let ne = ex.experts.len();
        let mut out = vec![0f32; x.len()];
        for (t, row) in logits.chunks(ne).enumerate() {
            let m = row
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let p: Vec<f64> = row.iter().map(|&l| (l as f64 - m).exp()).collect();
            let z: f64 = p.iter().sum();
            let mut idx: Vec<usize> = (0..ne).collect();
            idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let top = &idx[..k];
            let s: f64 = top.iter().map(|&e| p[e] / z).sum();
            let xt = &x[t * hidden..(t + 1) * hidden];
            for &e in top {
                let w = if norm == TopKNorm::Renormalize {
                    p[e] / z / s
                } else {
                    p[e] / z
                };
                let ew = ex.get(e).unwrap();
                let i = ew.intermediate;
                let (gate_up, down) = (ew.gate_up.to_f32(), ew.down.to_f32());
                let dot = |r: &[f32]| {
                    r.iter()
                        .zip(xt)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                };
                let act: Vec<f64> = (0..i)
                    .map(|j| {
                        let g = dot(&gate_up[j * hidden..(j + 1) * hidden]);
                        let u = dot(&gate_up[(i + j) * hidden..(i + j + 1) * hidden]);
                        g / (1.0 + (-g).exp()) * u
                    })
                    .collect();
                for h in 0..hidden {
                    let y: f64 = (0..i).map(|j| down[h * i + j] as f64 * act[j]).sum();
                    out[t * hidden + h] += (w * y) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn route_renormalizes_only_when_asked() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let r = route(&logits, 4, 2, TopKNorm::Renormalize).unwrap();
        assert_eq!(r.expert_ids, vec![0, 1]);
        assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let s = route(&logits, 4, 2, TopKNorm::Softmax).unwrap();
        assert!(s.weights.iter().sum::<f32>() < 0.95);
    }

    #[test]
    fn plan_rejects_unknown_expert_and_missing_expert_is_named() {
        let r = Routing {
            top_k: 1,
            expert_ids: vec![0, 5],
            weights: vec![1.0, 1.0],
        };
        assert!(plan(&r, 4).unwrap_err().to_string().contains("expert 5"));
        let mut ex = experts(4, 8, 4, 1);
        ex.experts[2] = None;
        let e = expert_compute(&[0.0; 8], 8, &[(2, 1)], &ex)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expert 2 of layer 0 is not loaded"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn composed_parts_equal_naive_per_token_moe(
            tokens in 0usize..40, ne in 1usize..9, k_raw in 1usize..9, seed in 0u64..10_000, renorm in any::<bool>(),
        ) {
            let k = 1 + (k_raw - 1) % ne;
            let (hidden, inter) = (12, 10);
            let x = rand_vec(tokens * hidden, seed, 1.0);
            let logits = rand_vec(tokens * ne, seed + 99, 3.0);
            let ex = experts(ne, hidden, inter, seed + 7);
            let norm = if renorm { TopKNorm::Renormalize } else { TopKNorm::Softmax };
            let (got, routing) = moe_forward(&x, hidden, &logits, &ex, k, norm).unwrap();
            let p = plan(&routing, ne).unwrap();
            // The plan is a permutation of the slots, grouped by expert, stable in token order.
            let mut seen = p.slot_of_row.clone();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..(tokens * k) as u32).collect::<Vec<_>>());
            for e in 0..ne {
                let rows = &p.slot_of_row[p.offsets[e]..p.offsets[e + 1]];
                prop_assert!(rows.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(rows.iter().all(|&s| routing.expert_ids[s as usize] as usize == e));
            }
            let want = naive_moe(&x, hidden, &logits, &ex, k, norm);
            for (a, b) in got.iter().zip(&want) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{} vs {}", a, b);
            }
        }
    }
}
