//! The placement planner (EPLB): from measured expert loads, how many replicas each expert gets
//! and which workers host them, so that every worker computes about the same number of rows in
//! every layer.
//!
//! Per layer, independently (DeepSeek's EPLB in two steps, both greedy and deterministic):
//!
//! 1. **Replica counts.** Every expert gets one replica. Spare slots of the budget
//!    (`workers × slots_per_worker − experts`) go one at a time to the expert with the highest
//!    load per replica (ties: lower expert id), never more replicas than workers and never to an
//!    expert with no load (an idle expert gains nothing from a copy, and a copy costs memory).
//! 2. **Packing.** Replicas, heaviest load per replica first (ties: lower expert id), each go to
//!    the worker with the least expected load so far (ties: fewer slots used, then lower worker)
//!    that has a free slot and does not hold that expert yet. A redundant replica that finds no
//!    such worker is dropped (its expert keeps the others); a first replica always finds one,
//!    since the budget covers every expert once.
//!
//! 3. **Local search.** While moving a replica off the busiest worker (to a free slot), or
//!    swapping it with a lighter replica of another worker, makes that pair lighter than the
//!    busiest load was, the best such step is taken.
//!
//! Steps 2 and 3 run after each replica step 1 adds, from none to the whole budget, and the
//! packing whose busiest worker is least loaded is kept (ties: fewer replicas).
//!
//! The expected load of a replica is its expert's load divided by its replica count, which is
//! what the replica choice of [`crate::Placement::choose`] delivers (each rank splits an
//! expert's rows over its replicas to within one row).
//!
//! The figure of merit, [`layered_imbalance`], weighs layers by their load: the sum over layers of
//! the busiest worker's rows over the sum of the mean worker's rows. The MoE step of a layer
//! lasts as long as its busiest worker, so this is the time the experts take relative to a perfect
//! balance (1.0).

use crate::{Placement, PlanError, Result};

/// `Σ_layers max_w load[l][w] / Σ_layers mean_w load[l][w]` for per-layer, per-worker loads
/// (1.0 is perfect balance; 0.0 when nothing was recorded).
pub fn layered_imbalance(per_layer: &[Vec<f64>]) -> f64 {
    let (mut max, mut mean) = (0.0, 0.0);
    for l in per_layer {
        if l.is_empty() {
            continue;
        }
        max += l.iter().copied().fold(0.0, f64::max);
        mean += l.iter().sum::<f64>() / l.len() as f64;
    }
    if mean > 0.0 { max / mean } else { 0.0 }
}

/// The expected rows per worker in each layer if each expert's `load[l][e]` splits evenly over
/// its replicas in `placement`.
pub fn expected_per_layer(placement: &Placement, load: &[Vec<f64>]) -> Vec<Vec<f64>> {
    placement
        .layers
        .iter()
        .enumerate()
        .map(|(l, layer)| {
            let mut w = vec![0.0; placement.workers];
            for (e, rs) in layer.iter().enumerate() {
                let n = load.get(l).and_then(|c| c.get(e)).copied().unwrap_or(0.0);
                for r in rs {
                    if let Some(x) = w.get_mut(r.worker) {
                        *x += n / rs.len() as f64;
                    }
                }
            }
            w
        })
        .collect()
}

/// [`layered_imbalance`] of the expected rows `placement` gives each worker under `load`.
pub fn planned_imbalance(placement: &Placement, load: &[Vec<f64>]) -> f64 {
    layered_imbalance(&expected_per_layer(placement, load))
}

/// Plans a placement (version `version`) of `experts` experts in each of `load.len()` layers over
/// `workers` workers holding at most `slots_per_worker` experts per layer each, balancing
/// `load[layer][expert]` (rows, or any proportional estimate). See the module documentation.
pub fn plan_balanced(
    version: u64,
    workers: usize,
    experts: usize,
    slots_per_worker: usize,
    load: &[Vec<f64>],
) -> Result<Placement> {
    if workers == 0 {
        return Err(PlanError::Placement(
            "a placement needs at least one worker".into(),
        ));
    }
    let slots = slots_per_worker.min(experts);
    if workers * slots < experts {
        return Err(PlanError::Placement(format!(
            "{workers} workers with {slots_per_worker} expert slots each cannot hold {experts} \
             experts per layer (--expert-slots-per-worker must be at least {})",
            experts.div_ceil(workers)
        )));
    }
    let hosts: Vec<Vec<Vec<usize>>> = load
        .iter()
        .map(|layer| plan_layer(workers, experts, slots, layer))
        .collect();
    Placement::from_hosts(version, workers, &hosts)
}

/// One layer: the hosting workers of each expert. Every number of redundant replicas from none
/// to the whole budget is packed, and the packing with the lowest busiest worker wins (ties: the
/// fewest replicas, i.e. the least memory). Using every spare slot is not always best: a
/// replica of a hot expert must sit on a worker that does not hold it yet, which can force it
/// onto an already busy one.
fn plan_layer(workers: usize, experts: usize, slots: usize, load: &[f64]) -> Vec<Vec<usize>> {
    let of = |e: usize| load.get(e).copied().unwrap_or(0.0).max(0.0);
    let mut replicas = vec![1usize; experts];
    let mut best = pack(workers, slots, &replicas, &of);
    for _ in experts..workers * slots {
        // The next replica goes to the expert with the highest load per replica.
        let hot = (0..experts)
            .filter(|&e| replicas[e] < workers && of(e) > 0.0)
            .max_by(|&a, &b| {
                let (la, lb) = (of(a) / replicas[a] as f64, of(b) / replicas[b] as f64);
                la.total_cmp(&lb).then(b.cmp(&a))
            });
        let Some(e) = hot else { break };
        replicas[e] += 1;
        let candidate = pack(workers, slots, &replicas, &of);
        if candidate.1 < best.1 * (1.0 - 1e-9) {
            best = candidate;
        }
    }
    let mut hosts = best.0;
    for h in &mut hosts {
        h.sort_unstable();
    }
    hosts
}

/// Packs `replicas[e]` copies of each expert, heaviest load per copy first, each on the least
/// loaded worker with a free slot that does not hold the expert yet (a redundant copy with
/// nowhere to go is dropped). Returns the hosts of each expert and the busiest worker's
/// expected load.
fn pack(
    workers: usize,
    slots: usize,
    replicas: &[usize],
    of: &impl Fn(usize) -> f64,
) -> (Vec<Vec<usize>>, f64) {
    let experts = replicas.len();
    let mut items: Vec<(usize, f64)> = (0..experts)
        .flat_map(|e| std::iter::repeat_n((e, of(e) / replicas[e] as f64), replicas[e]))
        .collect();
    items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut hosts: Vec<Vec<usize>> = vec![Vec::new(); experts];
    let mut used = vec![0usize; workers];
    for (e, _) in items {
        let expected = expected_of(&hosts, workers, of);
        let target = (0..workers)
            .filter(|&w| used[w] < slots && !hosts[e].contains(&w))
            .min_by(|&a, &b| {
                expected[a]
                    .total_cmp(&expected[b])
                    .then(used[a].cmp(&used[b]))
                    .then(a.cmp(&b))
            });
        if let Some(w) = target {
            hosts[e].push(w);
            used[w] += 1;
        }
    }
    improve(&mut hosts, workers, slots, of);
    let max = expected_of(&hosts, workers, of)
        .into_iter()
        .fold(0.0, f64::max);
    (hosts, max)
}

/// Local search after the greedy packing: while moving one replica off the busiest worker (to
/// a worker with a free slot), or swapping it with a lighter replica of another worker, lowers
/// the larger of the two workers' loads below the busiest one's, the best such step is taken.
/// Each step lowers the busiest load or the number of workers carrying it, so it ends.
fn improve(hosts: &mut [Vec<usize>], workers: usize, slots: usize, of: &impl Fn(usize) -> f64) {
    let share = |hosts: &[Vec<usize>], e: usize| of(e) / hosts[e].len().max(1) as f64;
    for _ in 0..4 * hosts.len() * workers {
        let load = expected_of(hosts, workers, of);
        let Some(b) = (0..workers).max_by(|&x, &y| load[x].total_cmp(&load[y]).then(y.cmp(&x)))
        else {
            return;
        };
        let on = |w: usize| -> Vec<usize> {
            (0..hosts.len())
                .filter(|&e| hosts[e].contains(&w))
                .collect()
        };
        let on_b = on(b);
        // (new max of the pair, expert leaving b, worker, expert coming back to b)
        let mut best: Option<(f64, usize, usize, Option<usize>)> = None;
        for &e in &on_b {
            let x = share(hosts, e);
            for w in (0..workers).filter(|&w| w != b && !hosts[e].contains(&w)) {
                let on_w = on(w);
                let mut consider = |pair: f64, back: Option<usize>| {
                    if pair < load[b] - 1e-9 && best.is_none_or(|(p, ..)| pair < p - 1e-12) {
                        best = Some((pair, e, w, back));
                    }
                };
                if on_w.len() < slots {
                    consider((load[b] - x).max(load[w] + x), None);
                }
                for &f in on_w.iter().filter(|&&f| !hosts[f].contains(&b)) {
                    let y = share(hosts, f);
                    if y < x {
                        consider((load[b] - x + y).max(load[w] - y + x), Some(f));
                    }
                }
            }
        }
        let Some((_, e, w, back)) = best else { return };
        for h in hosts[e].iter_mut().filter(|h| **h == b) {
            *h = w;
        }
        if let Some(f) = back {
            for h in hosts[f].iter_mut().filter(|h| **h == w) {
                *h = b;
            }
        }
    }
}

/// Expected load per worker of a (partial) packing: each expert's load split over the copies
/// placed so far.
fn expected_of(hosts: &[Vec<usize>], workers: usize, of: &impl Fn(usize) -> f64) -> Vec<f64> {
    let mut w = vec![0.0; workers];
    for (e, hs) in hosts.iter().enumerate() {
        for &h in hs {
            w[h] += of(e) / hs.len() as f64;
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zipf(experts: usize, s: f64) -> Vec<f64> {
        (0..experts)
            .map(|e| 1000.0 / ((e + 1) as f64).powf(s))
            .collect()
    }

    /// Plans `load` on 4 workers, 3 slots each, and returns (contiguous, planned) imbalance.
    fn report(name: &str, load: Vec<Vec<f64>>) -> (f64, f64) {
        let experts = load[0].len();
        let before = planned_imbalance(
            &Placement::contiguous(load.len(), experts, 4).unwrap(),
            &load,
        );
        let p = plan_balanced(2, 4, experts, 3, &load).unwrap();
        p.validate().unwrap();
        for l in 0..load.len() {
            for w in 0..4 {
                assert!(p.hosted(l, w).len() <= 3, "{name}: worker {w} over budget");
            }
        }
        let after = planned_imbalance(&p, &load);
        // Printed for the report (`cargo test -p ringmoe-plan balance -- --nocapture`).
        println!("{name}: contiguous {before:.3} → planned {after:.3}");
        (before, after)
    }

    #[test]
    fn uniform_load_stays_balanced() {
        let (before, after) = report("uniform", vec![vec![100.0; 8]; 2]);
        assert!((before - 1.0).abs() < 1e-9);
        assert!(after <= 1.0 + 1e-9, "{after}");
    }

    #[test]
    fn one_hot_expert_is_spread_over_every_worker() {
        let mut l = vec![10.0; 8];
        l[5] = 400.0;
        let (before, after) = report("one hot", vec![l.clone(), l]);
        assert!(before > 2.0, "{before}");
        assert!(after < 1.1, "{after}");
        let p = plan_balanced(2, 4, 8, 3, &[vec![10.0; 8]]).unwrap();
        assert!(p.layers[0].iter().all(|r| r.len() == 1 || r.len() == 2));
    }

    #[test]
    fn zipf_load_is_balanced() {
        let (before, after) = report("zipf s=1.2", vec![zipf(8, 1.2), zipf(8, 1.2)]);
        assert!(before > 1.5, "{before}");
        assert!(after < 1.1, "{after}");
        let (_, after) = report("zipf s=2.0", vec![zipf(8, 2.0)]);
        assert!(after < 1.25, "{after}");
    }

    #[test]
    fn every_expert_is_placed_and_replicas_are_distinct() {
        // Budgets from the minimum to more slots than experts, many shapes of load.
        for slots in [2, 3, 5, 8, 12] {
            for s in [0.0, 0.5, 1.0, 3.0] {
                let mut load = vec![zipf(8, s)];
                load[0].rotate_left(3);
                let p = plan_balanced(1, 4, 8, slots, &load).unwrap();
                p.validate().unwrap();
                assert!((0..8).all(|e| !p.layers[0][e].is_empty()));
                assert!((0..4).all(|w| p.hosted(0, w).len() <= slots.min(8)));
            }
        }
    }

    #[test]
    fn planning_is_deterministic_and_ignores_idle_experts() {
        let load = vec![vec![5.0, 0.0, 0.0, 9.0, 1.0, 0.0, 3.0, 3.0]];
        let a = plan_balanced(3, 4, 8, 3, &load).unwrap();
        assert_eq!(a, plan_balanced(3, 4, 8, 3, &load).unwrap());
        assert_eq!(a.version, 3);
        for e in [1, 2, 5] {
            assert_eq!(a.layers[0][e].len(), 1, "idle expert {e} replicated");
        }
        // No load at all: one replica each.
        let idle = plan_balanced(1, 2, 8, 6, &[vec![0.0; 8]]).unwrap();
        assert!(idle.layers[0].iter().all(|r| r.len() == 1));
    }

    #[test]
    fn a_budget_too_small_is_refused_with_the_flag() {
        let err = plan_balanced(1, 3, 8, 2, &[vec![1.0; 8]])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--expert-slots-per-worker must be at least 3"),
            "{err}"
        );
        assert_eq!(layered_imbalance(&[vec![0.0, 0.0]]), 0.0);
        assert_eq!(
            layered_imbalance(&[vec![3.0, 1.0], vec![1.0, 1.0]]),
            4.0 / 3.0
        );
    }
}
