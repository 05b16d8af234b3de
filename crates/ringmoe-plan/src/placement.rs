//! Expert placement: which workers host which experts, per layer, as a versioned map that the
//! coordinator will keep in etcd and every worker holds a copy of.
//!
//! `layers[l][e]` lists the replicas of expert `e` of layer `l`: one or more `(worker, slot)`,
//! `slot` being the expert's index among the experts that worker hosts in that layer. A layer
//! with a dense MLP has its entries too (the model's layer count and expert count fix the shape)
//! but they are never used.
//!
//! Replica choice (documented policy, no messages needed): on rank `r`, the `j`-th routing slot
//! of expert `e` (counting the rank's slots in token order) goes to replica `(j + r) mod R`.
//! Each rank therefore splits an expert's rows over its `R` replicas to within one row, and the
//! `+ r` rotation spreads the remainders of different ranks over different replicas.
//!
//! Every worker must use the same version: dispatch frames carry it, and a receiver whose version
//! differs refuses the frame (a stale placement would send rows to a worker that no longer holds
//! their expert).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{ExpertSelection, PlanError, Result};

/// One copy of an expert: the worker that hosts it and its slot there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub worker: usize,
    pub slot: usize,
}

/// The versioned expert → replicas map of every layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Bumped on every change; frames carry it and receivers check it.
    pub version: u64,
    /// Number of workers (ranks of the expert-parallel group).
    pub workers: usize,
    /// `layers[layer][expert]` = the expert's replicas.
    pub layers: Vec<Vec<Vec<Replica>>>,
}

fn invalid(msg: String) -> PlanError {
    PlanError::Placement(msg)
}

impl Placement {
    /// Builds a placement from the hosting workers of each expert (`hosts[layer][expert]`),
    /// giving each worker's experts slots in increasing expert id, and validates it.
    pub fn from_hosts(version: u64, workers: usize, hosts: &[Vec<Vec<usize>>]) -> Result<Self> {
        let layers = hosts
            .iter()
            .map(|layer| {
                let mut next_slot = vec![0usize; workers];
                layer
                    .iter()
                    .map(|ws| {
                        ws.iter()
                            .map(|&worker| {
                                let slot = next_slot.get(worker).copied().unwrap_or(0);
                                if let Some(s) = next_slot.get_mut(worker) {
                                    *s += 1;
                                }
                                Replica { worker, slot }
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let p = Self {
            version,
            workers,
            layers,
        };
        p.validate()?;
        Ok(p)
    }

    /// Contiguous blocks: worker `w` hosts experts `⌊w·E/W⌋ .. ⌊(w+1)·E/W⌋` of every layer
    /// (with more workers than experts some workers host none).
    pub fn contiguous(layers: usize, experts: usize, workers: usize) -> Result<Self> {
        Self::uniform(layers, experts, workers, |e| e * workers / experts.max(1))
    }

    /// Round-robin: expert `e` on worker `e mod W` in every layer.
    pub fn round_robin(layers: usize, experts: usize, workers: usize) -> Result<Self> {
        Self::uniform(layers, experts, workers, |e| e % workers.max(1))
    }

    fn uniform(
        layers: usize,
        experts: usize,
        workers: usize,
        host: impl Fn(usize) -> usize,
    ) -> Result<Self> {
        if workers == 0 {
            return Err(invalid("a placement needs at least one worker".into()));
        }
        let layer: Vec<Vec<usize>> = (0..experts).map(|e| vec![host(e)]).collect();
        Self::from_hosts(1, workers, &vec![layer; layers])
    }

    /// Reads a placement from JSON (the format [`Self::to_json`] writes) and validates it.
    pub fn from_json(text: &str) -> Result<Self> {
        let p: Self =
            serde_json::from_str(text).map_err(|e| invalid(format!("not a placement: {e}")))?;
        p.validate()?;
        Ok(p)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))
    }

    pub fn to_json(&self) -> String {
        // A plain struct of numbers and vectors always serialises.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the map itself: every expert has at least one replica, on distinct existing
    /// workers, and each worker's slots in a layer are `0..n` with no repeats.
    pub fn validate(&self) -> Result<()> {
        if self.workers == 0 {
            return Err(invalid("a placement needs at least one worker".into()));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let mut slots: Vec<Vec<usize>> = vec![Vec::new(); self.workers];
            for (e, replicas) in layer.iter().enumerate() {
                if replicas.is_empty() {
                    return Err(invalid(format!(
                        "expert {e} of layer {l} is hosted by no worker"
                    )));
                }
                for (i, r) in replicas.iter().enumerate() {
                    if r.worker >= self.workers {
                        return Err(invalid(format!(
                            "expert {e} of layer {l} is placed on worker {}, but there are {} workers",
                            r.worker, self.workers
                        )));
                    }
                    if replicas[..i].iter().any(|o| o.worker == r.worker) {
                        return Err(invalid(format!(
                            "expert {e} of layer {l} has two replicas on worker {}",
                            r.worker
                        )));
                    }
                    slots[r.worker].push(r.slot);
                }
            }
            for (w, s) in slots.iter_mut().enumerate() {
                s.sort_unstable();
                if s.iter().enumerate().any(|(i, &x)| i != x) {
                    return Err(invalid(format!(
                        "worker {w}'s slots in layer {l} are {s:?}, expected 0..{}",
                        s.len()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks that the placement fits a model of `num_layers` layers with `num_experts` experts
    /// each (one entry per layer, one per expert) and a group of `world` workers.
    pub fn check_shape(&self, num_layers: usize, num_experts: usize, world: usize) -> Result<()> {
        if self.workers != world {
            return Err(invalid(format!(
                "placement version {} is for {} workers, the group has {world}",
                self.version, self.workers
            )));
        }
        if self.layers.len() != num_layers {
            return Err(invalid(format!(
                "placement has {} layers, the model {}",
                self.layers.len(),
                num_layers
            )));
        }
        let n = num_experts;
        match self.layers.iter().position(|l| l.len() != n) {
            Some(l) => Err(invalid(format!(
                "placement lists {} experts in layer {l}, the model has {n}",
                self.layers[l].len()
            ))),
            None => Ok(()),
        }
    }

    /// Replicas of `expert` in `layer`.
    pub fn replicas(&self, layer: usize, expert: usize) -> Result<&[Replica]> {
        self.layers
            .get(layer)
            .and_then(|l| l.get(expert))
            .map(Vec::as_slice)
            .ok_or_else(|| {
                invalid(format!(
                    "placement version {} has no entry for expert {expert} of layer {layer}",
                    self.version
                ))
            })
    }

    /// Experts `worker` hosts in `layer`, ascending.
    pub fn hosted(&self, layer: usize, worker: usize) -> Vec<usize> {
        self.layers.get(layer).map_or_else(Vec::new, |l| {
            l.iter()
                .enumerate()
                .filter(|(_, rs)| rs.iter().any(|r| r.worker == worker))
                .map(|(e, _)| e)
                .collect()
        })
    }

    pub fn hosts(&self, layer: usize, expert: usize, worker: usize) -> bool {
        self.replicas(layer, expert)
            .is_ok_and(|rs| rs.iter().any(|r| r.worker == worker))
    }

    /// What `worker` loads from the checkpoint: exactly the experts placed on it.
    pub fn selection(&self, worker: usize) -> ExpertSelection {
        ExpertSelection::PerLayer(
            (0..self.layers.len())
                .map(|l| self.hosted(l, worker))
                .collect(),
        )
    }

    /// The worker that gets the `j`-th routing slot of `expert` on rank `rank` (see the module
    /// documentation).
    pub fn choose(&self, layer: usize, expert: usize, j: usize, rank: usize) -> Result<usize> {
        let rs = self.replicas(layer, expert)?;
        Ok(rs[(j + rank) % rs.len()].worker)
    }

    /// A new version with one more replica of each of the `k` most loaded experts of every layer
    /// (`load[layer][expert]`, e.g. a [`crate::LoadSnapshot`]'s per-expert totals). Each new
    /// replica goes to the worker with the least expected load that does not host the expert
    /// yet, expected load being each hosted expert's load divided by its replica count. Ties
    /// break toward the lower expert id and the lower worker.
    pub fn replicate_hot(&self, load: &[Vec<u64>], k: usize) -> Result<Self> {
        let mut hosts: Vec<Vec<Vec<usize>>> = self
            .layers
            .iter()
            .map(|l| {
                l.iter()
                    .map(|rs| rs.iter().map(|r| r.worker).collect())
                    .collect()
            })
            .collect();
        for (l, layer) in hosts.iter_mut().enumerate() {
            let counts = load.get(l).map_or(&[][..], Vec::as_slice);
            let of = |e: usize| counts.get(e).copied().unwrap_or(0);
            let mut order: Vec<usize> = (0..layer.len()).filter(|&e| of(e) > 0).collect();
            order.sort_by(|&a, &b| of(b).cmp(&of(a)).then(a.cmp(&b)));
            for &e in order.iter().take(k) {
                let expected = |w: usize, layer: &[Vec<usize>]| -> f64 {
                    layer
                        .iter()
                        .enumerate()
                        .filter(|(_, ws)| ws.contains(&w))
                        .map(|(x, ws)| of(x) as f64 / ws.len() as f64)
                        .sum()
                };
                let best = (0..self.workers)
                    .filter(|w| !layer[e].contains(w))
                    .map(|w| (expected(w, layer), w))
                    .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                if let Some((_, w)) = best {
                    layer[e].push(w);
                }
            }
        }
        Self::from_hosts(self.version + 1, self.workers, &hosts)
    }

    /// Expected rows per worker if each expert's `load` splits evenly over its replicas.
    pub fn expected_worker_load(&self, load: &[Vec<u64>]) -> Vec<f64> {
        let mut out = vec![0f64; self.workers];
        for (l, layer) in self.layers.iter().enumerate() {
            for (e, rs) in layer.iter().enumerate() {
                let n = load.get(l).and_then(|c| c.get(e)).copied().unwrap_or(0) as f64;
                for r in rs {
                    out[r.worker] += n / rs.len() as f64;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_cover_every_expert_once() {
        let c = Placement::contiguous(2, 8, 3).unwrap();
        assert_eq!(c.hosted(0, 0), vec![0, 1, 2]);
        assert_eq!(c.hosted(1, 1), vec![3, 4, 5]);
        assert_eq!(c.hosted(0, 2), vec![6, 7]);
        assert_eq!(c.replicas(0, 7).unwrap(), &[Replica { worker: 2, slot: 1 }]);
        let r = Placement::round_robin(1, 8, 3).unwrap();
        assert_eq!(r.hosted(0, 1), vec![1, 4, 7]);
        assert_eq!(r.replicas(0, 7).unwrap()[0].slot, 2);
        let wide = Placement::contiguous(1, 2, 4).unwrap();
        assert_eq!(wide.hosted(0, 1), Vec::<usize>::new());
        assert_eq!(wide.hosted(0, 2), vec![1]);
    }

    #[test]
    fn invalid_maps_name_what_is_wrong() {
        let err = |hosts: Vec<Vec<Vec<usize>>>| {
            Placement::from_hosts(1, 2, &hosts).unwrap_err().to_string()
        };
        assert!(
            err(vec![vec![vec![0], vec![]]]).contains("expert 1 of layer 0 is hosted by no worker")
        );
        assert!(err(vec![vec![vec![0], vec![2]]]).contains("placed on worker 2, but there are 2"));
        assert!(err(vec![vec![vec![1, 1]]]).contains("two replicas on worker 1"));
        let mut p = Placement::round_robin(1, 4, 2).unwrap();
        p.layers[0][2][0].slot = 0;
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("slots in layer 0")
        );
        let json = p.to_json();
        assert!(Placement::from_json(&json).is_err());
        assert!(
            Placement::from_json("{\"version\": 1}")
                .unwrap_err()
                .to_string()
                .contains("not a placement")
        );
    }

    #[test]
    fn json_round_trips() {
        let p = Placement::from_hosts(7, 3, &[vec![vec![0, 2], vec![1], vec![2]]]).unwrap();
        assert_eq!(Placement::from_json(&p.to_json()).unwrap(), p);
        assert_eq!(p.replicas(0, 0).unwrap()[1], Replica { worker: 2, slot: 0 });
        assert_eq!(p.replicas(0, 2).unwrap()[0], Replica { worker: 2, slot: 1 });
    }

    #[test]
    fn replica_choice_splits_rows_evenly() {
        let p = Placement::from_hosts(1, 4, &[vec![vec![0, 1, 3]]]).unwrap();
        for rank in 0..4 {
            let mut n = [0usize; 4];
            for j in 0..10 {
                n[p.choose(0, 0, j, rank).unwrap()] += 1;
            }
            assert_eq!(n[2], 0);
            assert!(
                [n[0], n[1], n[3]].iter().all(|&c| c == 3 || c == 4),
                "{n:?}"
            );
        }
    }

    #[test]
    fn hot_experts_get_replicas_on_the_least_loaded_workers() {
        let p = Placement::contiguous(1, 4, 2).unwrap();
        // Experts 0 and 1 (worker 0) take almost everything.
        let load = vec![vec![100, 60, 5, 5]];
        let before = p.expected_worker_load(&load);
        let q = p.replicate_hot(&load, 2).unwrap();
        assert_eq!(q.version, 2);
        assert_eq!(
            q.layers[0][0].iter().map(|r| r.worker).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(
            q.layers[0][1].iter().map(|r| r.worker).collect::<Vec<_>>(),
            vec![0, 1]
        );
        let after = q.expected_worker_load(&load);
        let imbalance = |v: &[f64]| {
            v.iter().copied().fold(0.0, f64::max) / (v.iter().sum::<f64>() / v.len() as f64)
        };
        assert!(
            imbalance(&after) < imbalance(&before),
            "{before:?} → {after:?}"
        );
        assert!(q.hosts(0, 0, 1) && !p.hosts(0, 0, 1));
    }
}
