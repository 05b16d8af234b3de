//! The expert dispatch protocol, one for every backend and transport: which slots go to which
//! worker in which order, the header words every worker sends every other before the rows (and
//! the checks a receiver makes on them), the expert-major permutation of received rows and the
//! combine's row indices. Pure index arithmetic on the host; [`crate::moe_parallel_on`] moves the
//! rows with it on any [`ringmoe_core::Backend`] over any [`crate::Collective`]. The tests below
//! also run a whole expert-parallel layer over simulated ranks with it.

use ringmoe_model::moe::{Routing, combine_plan};

use crate::{DROPPED, ParallelError, Placement, check_version};

/// Words before the per-batch counts in a header: placement version (low, high), experts.
pub const HEADER: usize = 3;

/// One layer's dispatch on one rank (not `ringmoe_model::moe::DispatchPlan`, the single-process
/// grouping of slots by expert).
#[derive(Debug)]
pub struct ExchangePlan {
    /// Token ranges of the micro-batches (two with overlap, else one).
    pub batches: Vec<(usize, usize)>,
    /// `orders[b][w]`: the slots of batch `b` sent to worker `w`, grouped by expert ascending,
    /// token order within an expert — the order rows travel and come back in.
    pub orders: Vec<Vec<Vec<u32>>>,
    top_k: usize,
}

impl ExchangePlan {
    /// `dest[slot]` is the worker of every slot (or [`DROPPED`]), from `assign_slots`.
    pub fn new(routing: &Routing, dest: &[u32], world: usize, overlap: bool) -> Self {
        let (tokens, k) = (routing.tokens(), routing.top_k);
        let batches = if overlap {
            vec![(0, tokens / 2), (tokens / 2, tokens)]
        } else {
            vec![(0, tokens)]
        };
        let expert_of = |slot: u32| routing.expert_ids[slot as usize];
        let orders = batches
            .iter()
            .map(|&(s, e)| {
                let mut order = vec![Vec::new(); world];
                for slot in (s * k) as u32..(e * k) as u32 {
                    let d = dest[slot as usize];
                    if d != DROPPED {
                        order[d as usize].push(slot);
                    }
                }
                for o in &mut order {
                    o.sort_by_key(|&slot| expert_of(slot));
                }
                order
            })
            .collect();
        Self {
            batches,
            orders,
            top_k: k,
        }
    }

    /// Header words per peer, `[version lo, version hi, experts, counts of batch 0 per expert,
    /// counts of batch 1 …]`, for every peer back to back.
    pub fn header(&self, version: u64, experts: usize, routing: &Routing) -> Vec<u32> {
        let world = self.orders.first().map_or(0, Vec::len);
        let mut words = Vec::with_capacity(world * self.header_width(experts));
        for w in 0..world {
            words.extend([version as u32, (version >> 32) as u32, experts as u32]);
            for order in &self.orders {
                let mut counts = vec![0u32; experts];
                for &slot in &order[w] {
                    counts[routing.expert_ids[slot as usize] as usize] += 1;
                }
                words.extend(counts);
            }
        }
        words
    }

    /// Words of one peer's header.
    pub fn header_width(&self, experts: usize) -> usize {
        HEADER + self.batches.len() * experts
    }

    /// The token (row of the layer input) of every row sent in batch `b`, in send order.
    pub fn send_tokens(&self, b: usize) -> Vec<usize> {
        self.orders[b]
            .iter()
            .flatten()
            .map(|&slot| slot as usize / self.top_k)
            .collect()
    }

    /// Rows sent to each worker in batch `b`.
    pub fn send_rows(&self, b: usize) -> Vec<usize> {
        self.orders[b].iter().map(Vec::len).collect()
    }

    /// For the combine of batch `b`: per token, its slots in increasing expert id, as rows of
    /// the returned buffer (a dropped slot reads row `sent`, the zero row after the returned
    /// ones) and their gate weights.
    pub fn combine_rows(&self, b: usize, routing: &Routing) -> (Vec<usize>, Vec<f32>) {
        let (s, e) = self.batches[b];
        let k = self.top_k;
        let sent: usize = self.send_rows(b).iter().sum();
        let mut row_of_slot = vec![sent; (e - s) * k];
        for (r, &slot) in self.orders[b].iter().flatten().enumerate() {
            row_of_slot[slot as usize - s * k] = r;
        }
        let batch = Routing {
            top_k: k,
            expert_ids: routing.expert_ids[s * k..e * k].to_vec(),
            weights: routing.weights[s * k..e * k].to_vec(),
        };
        combine_plan(&batch, |slot| row_of_slot[slot])
    }
}

/// Parses and checks every source's header (`got`: `width` words per source): returns
/// `recv[batch][source][expert]` row counts. Refuses another placement version, another expert
/// count, and rows for an expert this worker does not host or did not load (`loaded(e)`).
pub fn parse_headers(
    placement: &Placement,
    layer: usize,
    me: usize,
    experts: usize,
    loaded: impl Fn(usize) -> bool,
    got: &[u32],
    batches: usize,
) -> Result<Vec<Vec<Vec<usize>>>, ParallelError> {
    let width = HEADER + batches * experts;
    let world = got.len() / width;
    let bad = |from: usize, msg: String| {
        ParallelError::Dispatch(format!(
            "worker {me}, layer {layer}: header from rank {from}: {msg}"
        ))
    };
    let mut recv = vec![vec![vec![0usize; experts]; world]; batches];
    for (from, h) in got.chunks_exact(width).enumerate() {
        check_version(placement, me, from, h[0] as u64 | ((h[1] as u64) << 32))?;
        if h[2] as usize != experts {
            return Err(bad(
                from,
                format!("header names {} experts, the layer has {experts}", h[2]),
            ));
        }
        for (b, counts) in h[HEADER..]
            .chunks_exact(experts.max(1))
            .enumerate()
            .take(batches)
        {
            for (e, &c) in counts.iter().enumerate() {
                if c > 0 && (!placement.hosts(layer, e, me) || !loaded(e)) {
                    return Err(bad(
                        from,
                        format!(
                            "{c} rows for expert {e}, which this worker does not host (placement \
                             version {})",
                            placement.version
                        ),
                    ));
                }
                recv[b][from][e] = c as usize;
            }
        }
    }
    Ok(recv)
}

/// Received rows (each source's run grouped by expert, `counts[source][expert]`) in
/// expert-major order, sources in rank order within an expert — the order the grouped GEMM
/// takes and the host path computes in.
#[derive(Debug, PartialEq, Eq)]
pub struct ExpertMajor {
    /// `perm[i]`: the received row of the i-th expert-major row.
    pub perm: Vec<usize>,
    /// `(expert, rows)` of every expert with rows, ascending.
    pub groups: Vec<(usize, usize)>,
    /// `inverse[r]`: the expert-major row of received row `r` (results back in arrival order).
    pub inverse: Vec<usize>,
}

pub fn expert_major(counts: &[Vec<usize>]) -> ExpertMajor {
    let experts = counts.first().map_or(0, Vec::len);
    let mut start = vec![vec![0usize; experts]; counts.len()];
    let mut at = 0;
    for (src, c) in counts.iter().enumerate() {
        for (e, &n) in c.iter().enumerate() {
            start[src][e] = at;
            at += n;
        }
    }
    let mut perm = Vec::with_capacity(at);
    let mut groups = Vec::new();
    for e in 0..experts {
        let total: usize = counts.iter().map(|c| c[e]).sum();
        if total == 0 {
            continue;
        }
        for (src, c) in counts.iter().enumerate() {
            perm.extend(start[src][e]..start[src][e] + c[e]);
        }
        groups.push((e, total));
    }
    let mut inverse = vec![0usize; at];
    for (i, &r) in perm.iter().enumerate() {
        inverse[r] = i;
    }
    ExpertMajor {
        perm,
        groups,
        inverse,
    }
}

#[cfg(test)]
mod tests {
    use ringmoe_core::testing::{XorShift, rand_vec};

    use crate::{ExpertParallel, assign_slots};

    use super::*;

    /// A stand-in expert: a different affine map per expert, so a row reaching the wrong expert
    /// or coming back to the wrong slot changes the result.
    fn expert(e: usize, row: &[f32]) -> Vec<f32> {
        row.iter()
            .enumerate()
            .map(|(i, &v)| v * (e as f32 + 1.5) + (e * 7 + i) as f32 * 0.01)
            .collect()
    }

    fn routing(tokens: usize, experts: usize, k: usize, rng: &mut XorShift) -> Routing {
        let mut ids = Vec::with_capacity(tokens * k);
        let mut weights = Vec::with_capacity(tokens * k);
        for _ in 0..tokens {
            let mut chosen: Vec<u32> = Vec::new();
            while chosen.len() < k {
                let e = (rng.next_u64() % experts as u64) as u32;
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            for e in chosen {
                ids.push(e);
                weights.push(0.1 + (rng.next_u64() % 100) as f32 / 100.0);
            }
        }
        Routing {
            top_k: k,
            expert_ids: ids,
            weights,
        }
    }

    /// Every rank's layer output through the device path's bookkeeping, with the transfers and
    /// the kernels done on the host: headers and rows exchanged by transposition, the experts
    /// applied in expert-major order, results returned and combined.
    fn simulate(
        ep: &ExpertParallel,
        xs: &[Vec<f32>],
        routings: &[Routing],
        hidden: usize,
        experts: usize,
    ) -> Result<Vec<Vec<f32>>, ParallelError> {
        let world = xs.len();
        let plans: Vec<ExchangePlan> = (0..world)
            .map(|r| -> Result<_, ParallelError> {
                let dest = assign_slots(ep, 0, experts, &routings[r], r)?;
                Ok(ExchangePlan::new(&routings[r], &dest, world, ep.overlap))
            })
            .collect::<Result<_, _>>()?;
        let nb = plans[0].batches.len();
        let width = plans[0].header_width(experts);
        let headers: Vec<Vec<u32>> = (0..world)
            .map(|r| plans[r].header(ep.placement.version, experts, &routings[r]))
            .collect();
        let mut outs: Vec<Vec<f32>> = vec![Vec::new(); world];
        for b in 0..nb {
            // What each rank sends each peer: rows of its input.
            let sends: Vec<Vec<Vec<f32>>> = (0..world)
                .map(|r| {
                    let tokens = plans[r].send_tokens(b);
                    let mut at = 0;
                    plans[r]
                        .send_rows(b)
                        .iter()
                        .map(|&n| {
                            let rows: Vec<f32> = tokens[at..at + n]
                                .iter()
                                .flat_map(|&t| xs[r][t * hidden..(t + 1) * hidden].to_vec())
                                .collect();
                            at += n;
                            rows
                        })
                        .collect()
                })
                .collect();
            // Each receiver: parse headers, permute, compute, permute back, return.
            let mut returned: Vec<Vec<Vec<f32>>> = vec![vec![Vec::new(); world]; world];
            for me in 0..world {
                let got: Vec<u32> = (0..world)
                    .flat_map(|from| headers[from][me * width..(me + 1) * width].to_vec())
                    .collect();
                let hosted = |e: usize| ep.placement.hosts(0, e, me);
                let recv = parse_headers(&ep.placement, 0, me, experts, hosted, &got, nb)?;
                let incoming: Vec<f32> = (0..world)
                    .flat_map(|from| sends[from][me].clone())
                    .collect();
                let em = expert_major(&recv[b]);
                let mut y = Vec::with_capacity(incoming.len());
                let mut at = 0;
                for &(e, n) in &em.groups {
                    for &r in &em.perm[at..at + n] {
                        y.extend(expert(e, &incoming[r * hidden..(r + 1) * hidden]));
                    }
                    at += n;
                }
                let back: Vec<f32> = em
                    .inverse
                    .iter()
                    .flat_map(|&i| y[i * hidden..(i + 1) * hidden].to_vec())
                    .collect();
                let mut off = 0;
                for (from, c) in recv[b].iter().enumerate() {
                    let n: usize = c.iter().sum();
                    returned[from][me] = back[off * hidden..(off + n) * hidden].to_vec();
                    off += n;
                }
            }
            // Each owner: its rows back in send order, a zero row, the combine.
            for r in 0..world {
                let mut back: Vec<f32> = returned[r].concat();
                back.extend(vec![0.0; hidden]);
                let (rows, ws) = plans[r].combine_rows(b, &routings[r]);
                let k = routings[r].top_k;
                for (t_rows, t_ws) in rows.chunks(k).zip(ws.chunks(k)) {
                    let mut acc = vec![0f32; hidden];
                    for (&row, &w) in t_rows.iter().zip(t_ws) {
                        for (a, v) in acc.iter_mut().zip(&back[row * hidden..(row + 1) * hidden]) {
                            *a += w * v;
                        }
                    }
                    outs[r].extend(acc);
                }
            }
        }
        Ok(outs)
    }

    /// The direct answer: each kept slot's expert on its token, summed in increasing expert id.
    fn reference(
        ep: &ExpertParallel,
        x: &[f32],
        routing: &Routing,
        hidden: usize,
        experts: usize,
        me: usize,
    ) -> Vec<f32> {
        let dest = assign_slots(ep, 0, experts, routing, me).unwrap_or_default();
        let k = routing.top_k;
        let mut out = Vec::new();
        for t in 0..routing.tokens() {
            let mut slots: Vec<usize> = (t * k..(t + 1) * k).collect();
            slots.sort_by_key(|&s| routing.expert_ids[s]);
            let mut acc = vec![0f32; hidden];
            for s in slots {
                if dest[s] == DROPPED {
                    continue;
                }
                let y = expert(
                    routing.expert_ids[s] as usize,
                    &x[t * hidden..(t + 1) * hidden],
                );
                for (a, v) in acc.iter_mut().zip(y) {
                    *a += routing.weights[s] * v;
                }
            }
            out.extend(acc);
        }
        out
    }

    #[test]
    fn a_simulated_layer_over_the_device_bookkeeping_equals_the_direct_sum() {
        let mut rng = XorShift::new(7);
        let (hidden, experts, k) = (5, 6, 3);
        for world in [1, 2, 3] {
            let base = Placement::round_robin(1, experts, world).unwrap();
            let replicated = base.replicate_hot(&[vec![9, 1, 5, 1, 1, 1]], 2).unwrap();
            for placement in [base, replicated] {
                for (overlap, capacity) in [(false, None), (true, None), (true, Some(0.5))] {
                    let ep = ExpertParallel {
                        overlap,
                        capacity_factor: capacity,
                        ..ExpertParallel::new(placement.clone())
                    };
                    // Uneven token counts per rank, one rank with a single token.
                    let tokens: Vec<usize> = (0..world).map(|r| [9, 1, 4][r]).collect();
                    let xs: Vec<Vec<f32>> = tokens
                        .iter()
                        .enumerate()
                        .map(|(r, &t)| rand_vec(t * hidden, 40 + r as u64, 1.0))
                        .collect();
                    let routings: Vec<Routing> = tokens
                        .iter()
                        .map(|&t| routing(t, experts, k, &mut rng))
                        .collect();
                    let got = simulate(&ep, &xs, &routings, hidden, experts).unwrap();
                    for r in 0..world {
                        let want = reference(&ep, &xs[r], &routings[r], hidden, experts, r);
                        assert_eq!(
                            got[r], want,
                            "world {world}, rank {r}, overlap {overlap}, capacity {capacity:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn headers_of_another_version_or_for_unhosted_experts_are_refused() {
        let placement = Placement::round_robin(1, 4, 2).unwrap();
        let routing = Routing {
            top_k: 1,
            expert_ids: vec![0, 1, 2],
            weights: vec![1.0; 3],
        };
        let ep = ExpertParallel::new(placement.clone());
        let dest = assign_slots(&ep, 0, 4, &routing, 0).unwrap();
        let plan = ExchangePlan::new(&routing, &dest, 2, false);
        let words = plan.header(placement.version, 4, &routing);
        let w = plan.header_width(4);
        // Worker 1 receives rank 0's header for it: expert 1 only (round-robin hosts 1 and 3).
        let to_1 = words[w..2 * w].to_vec();
        let ok = parse_headers(&placement, 0, 1, 4, |_| true, &to_1, 1).unwrap();
        assert_eq!(ok[0][0], vec![0, 1, 0, 0]);
        let mut stale = to_1.clone();
        stale[0] ^= 1;
        let e = parse_headers(&placement, 0, 1, 4, |_| true, &stale, 1).unwrap_err();
        assert!(matches!(e, ParallelError::StalePlacement { .. }), "{e}");
        // The same header delivered to worker 0, which does not host expert 1.
        let e = parse_headers(&placement, 0, 0, 4, |_| true, &to_1, 1).unwrap_err();
        assert!(
            e.to_string()
                .contains("expert 1, which this worker does not host"),
            "{e}"
        );
        // Hosted by the placement but not loaded here.
        let e = parse_headers(&placement, 0, 1, 4, |e| e != 1, &to_1, 1).unwrap_err();
        assert!(e.to_string().contains("does not host"), "{e}");
        let mut wrong = to_1;
        wrong[2] = 5;
        let e = parse_headers(&placement, 0, 1, 4, |_| true, &wrong, 1).unwrap_err();
        assert!(e.to_string().contains("header names 5 experts"), "{e}");
    }

    #[test]
    fn expert_major_order_is_expert_then_source_and_inverts() {
        // Two sources over three experts: source 0 sends 2 rows of e0 and 1 of e2; source 1
        // sends 1 row of e1 and 2 of e2.
        let em = expert_major(&[vec![2, 0, 1], vec![0, 1, 2]]);
        assert_eq!(em.perm, vec![0, 1, 3, 2, 4, 5]);
        assert_eq!(em.groups, vec![(0, 2), (1, 1), (2, 3)]);
        for (i, &r) in em.perm.iter().enumerate() {
            assert_eq!(em.inverse[r], i);
        }
    }
}
