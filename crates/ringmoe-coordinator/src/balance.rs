//! Expert load in the coordinator and the rebalance policy (pure; the machine owns one
//! [`Balancer`] and the runtime performs the rebalances it asks for).
//!
//! **The load estimate.** After every run, and every `--load-interval-secs` during a long one,
//! the run reads each worker's load window (`ReportLoad` for the run's placement version: rows
//! its experts computed, per layer and expert, over the worker's last 60 s in 5 s buckets) and
//! hands the reading to the machine. A reading of the placement in force replaces the model's
//! estimate: rows per expert (summed over the workers hosting it) and the measured imbalance.
//! The moving window is therefore the workers' 60 s; a reading of an older version (a run that
//! started before a rebalance) is ignored, since it measures a placement no longer in use.
//!
//! **The measured imbalance** is [`ringmoe_plan::layered_imbalance`] of the rows each worker
//! computed per layer: the busiest worker's rows summed over layers, over the mean's. A layer's
//! expert step lasts as long as its busiest worker, so this is the expert time relative to a
//! perfect balance.
//!
//! **The policy.** When the measured imbalance exceeds `--rebalance-threshold` (and the reading
//! holds at least [`MIN_ROWS_PER_WORKER`] rows per worker, so a handful of tokens does not move
//! experts), [`ringmoe_plan::plan_balanced`] plans a placement under the slot budget
//! (`--expert-slots-per-worker`, default ⌈E/W⌉ + 1) from the estimate. It is published only if
//! its planned imbalance beats the current placement's, under the same estimate, by
//! [`MIN_GAIN`]. One rebalance per placement at a time; after one, none for [`MIN_INTERVAL`];
//! after a failed one, none for [`RETRY_AFTER`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ringmoe_membership::PlacementRecord;
use ringmoe_plan::{Placement, layered_imbalance, plan_balanced, planned_imbalance};

/// A reading below this many routed rows per worker decides nothing.
pub const MIN_ROWS_PER_WORKER: u64 = 64;
/// A new placement must lower the planned imbalance by at least this fraction.
pub const MIN_GAIN: f64 = 0.05;
/// After a failed rebalance, the next waits this long.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// After a rebalance, the next of the same placement waits this long: load that swings between
/// jobs (a prefill-heavy one, a decode-heavy one) must not move experts after every job.
pub const MIN_INTERVAL: Duration = Duration::from_secs(30);

/// How the coordinator balances expert load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalanceConfig {
    /// Rebalance when the measured imbalance exceeds this; 0 turns rebalancing off.
    pub threshold: f64,
    /// Experts a worker may host per layer; 0: ⌈experts / workers⌉ + 1.
    pub slots_per_worker: usize,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            threshold: 1.25,
            slots_per_worker: 0,
        }
    }
}

impl BalanceConfig {
    /// The slot budget for `experts` experts over `workers` workers.
    pub fn slots(&self, experts: usize, workers: usize) -> usize {
        let s = if self.slots_per_worker > 0 {
            self.slots_per_worker
        } else {
            experts.div_ceil(workers.max(1)) + 1
        };
        s.min(experts)
    }
}

/// One reading of the workers' load windows under one placement version.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReading {
    pub model: String,
    /// The placement's workers, in rank order (its worker group).
    pub workers: Vec<String>,
    pub version: u64,
    pub layers: usize,
    pub experts: usize,
    /// Per worker in the placement's rank order: its rows, `[layers × experts]` row-major.
    pub rows: Vec<Vec<u64>>,
}

impl LoadReading {
    /// Rows per (layer, expert), summed over the workers.
    pub fn per_expert(&self) -> Vec<Vec<f64>> {
        let mut out = vec![vec![0.0; self.experts]; self.layers];
        for w in &self.rows {
            for (i, &n) in w.iter().enumerate() {
                let (l, e) = (i / self.experts.max(1), i % self.experts.max(1));
                if let Some(x) = out.get_mut(l).and_then(|r| r.get_mut(e)) {
                    *x += n as f64;
                }
            }
        }
        out
    }

    /// Rows per layer and worker: `[layer][worker]`.
    pub fn per_layer_worker(&self) -> Vec<Vec<f64>> {
        let e = self.experts.max(1);
        (0..self.layers)
            .map(|l| {
                self.rows
                    .iter()
                    .map(|w| {
                        w.get(l * e..(l + 1) * e)
                            .map_or(0, |r| r.iter().sum::<u64>()) as f64
                    })
                    .collect()
            })
            .collect()
    }

    pub fn total(&self) -> u64 {
        self.rows.iter().flatten().sum()
    }
}

/// What the coordinator knows of a model's expert load.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Estimate {
    /// The placement version the estimate was measured under.
    pub version: u64,
    /// Rows per (layer, expert) over the workers' window.
    pub per_expert: Vec<Vec<f64>>,
    /// Rows each worker computed, summed over layers (rank order of that version).
    pub per_worker: Vec<f64>,
    /// The measured imbalance (see the module documentation).
    pub imbalance: f64,
    /// Rebalances published for this model by this coordinator.
    pub rebalances: u64,
}

#[derive(Debug, Default)]
struct ModelBalance {
    estimate: Estimate,
    /// A rebalance published and not yet acknowledged by every worker.
    in_flight: Option<PlacementRecord>,
    not_before: Option<Instant>,
}

/// The load estimates and rebalances of every placement: a model over a worker set (a worker
/// group, or every worker), keyed by both.
#[derive(Debug, Default)]
pub struct Balancer {
    cfg: BalanceConfig,
    models: HashMap<(String, Vec<String>), ModelBalance>,
}

impl Balancer {
    pub fn new(cfg: BalanceConfig) -> Self {
        Self {
            cfg,
            models: HashMap::new(),
        }
    }

    fn key(model: &str, workers: &[String]) -> (String, Vec<String>) {
        (model.to_string(), workers.to_vec())
    }

    pub fn estimate(&self, model: &str, workers: &[String]) -> Option<&Estimate> {
        self.models
            .get(&Self::key(model, workers))
            .map(|m| &m.estimate)
    }

    /// The rebalance of `model` over `workers` in flight, if any.
    pub fn in_flight(&self, model: &str, workers: &[String]) -> Option<&PlacementRecord> {
        self.models
            .get(&Self::key(model, workers))?
            .in_flight
            .as_ref()
    }

    /// The highest version of `model` being published by a rebalance (0: none).
    pub fn max_in_flight(&self, model: &str) -> u64 {
        self.models
            .iter()
            .filter(|((m, _), _)| m == model)
            .filter_map(|(_, b)| b.in_flight.as_ref().map(|r| r.version))
            .max()
            .unwrap_or(0)
    }

    /// Takes a reading; `current` is the placement runs of the model use now. Returns the
    /// record of a new placement to publish when the policy says so.
    pub fn on_reading(
        &mut self,
        now: Instant,
        r: &LoadReading,
        current: Option<&PlacementRecord>,
        next_version: u64,
    ) -> Option<PlacementRecord> {
        let current = current
            .filter(|c| c.version == r.version && c.model == r.model && c.workers == r.workers)?;
        let placement = Placement::from_json(&current.placement).ok()?;
        if r.rows.len() != placement.workers || r.experts == 0 {
            return None;
        }
        let per_layer = r.per_layer_worker();
        let per_expert = r.per_expert();
        let m = self
            .models
            .entry(Self::key(&r.model, &r.workers))
            .or_default();
        let enough = r.total() >= MIN_ROWS_PER_WORKER * placement.workers as u64;
        if r.total() > 0 {
            m.estimate = Estimate {
                version: r.version,
                per_worker: (0..placement.workers)
                    .map(|w| per_layer.iter().map(|l| l[w]).sum())
                    .collect(),
                imbalance: layered_imbalance(&per_layer),
                per_expert: per_expert.clone(),
                rebalances: m.estimate.rebalances,
            };
        }
        let measured = m.estimate.imbalance;
        if self.cfg.threshold <= 0.0
            || !enough
            || measured <= self.cfg.threshold
            || m.in_flight.is_some()
            || m.not_before.is_some_and(|t| now < t)
        {
            return None;
        }
        let slots = self.cfg.slots(r.experts, placement.workers);
        let next = plan_balanced(
            next_version.max(current.version + 1),
            placement.workers,
            r.experts,
            slots,
            &per_expert,
        )
        .ok()?;
        let (before, after) = (
            planned_imbalance(&placement, &per_expert),
            planned_imbalance(&next, &per_expert),
        );
        if after > before * (1.0 - MIN_GAIN) {
            return None;
        }
        tracing::info!(
            model = %r.model,
            measured,
            planned_before = before,
            planned_after = after,
            version = next.version,
            slots,
            "rebalancing the expert placement"
        );
        let rec = PlacementRecord {
            model: current.model.clone(),
            version: next.version,
            path: current.path.clone(),
            workers: current.workers.clone(),
            placement: next.to_json(),
        };
        m.in_flight = Some(rec.clone());
        Some(rec)
    }

    /// The rebalance of `model` over `workers` to `version` ended: acknowledged by every worker
    /// (`ok`), or not. Returns the record now in force when it succeeded.
    pub fn finished(
        &mut self,
        now: Instant,
        model: &str,
        workers: &[String],
        version: u64,
        ok: bool,
    ) -> Option<PlacementRecord> {
        let m = self.models.get_mut(&Self::key(model, workers))?;
        if m.in_flight.as_ref().is_none_or(|r| r.version != version) {
            return None;
        }
        let rec = m.in_flight.take()?;
        if ok {
            m.estimate.rebalances += 1;
            m.not_before = Some(now + MIN_INTERVAL);
            Some(rec)
        } else {
            m.not_before = Some(now + RETRY_AFTER);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: u64, p: &Placement) -> PlacementRecord {
        PlacementRecord {
            model: "m".into(),
            version,
            path: "/m".into(),
            workers: (0..p.workers).map(|w| format!("w{w}")).collect(),
            placement: p.to_json(),
        }
    }

    /// A reading in which each worker computed exactly its hosted experts' `load` share.
    fn reading(p: &Placement, load: &[Vec<u64>]) -> LoadReading {
        let (layers, experts) = (load.len(), load[0].len());
        let mut rows = vec![vec![0u64; layers * experts]; p.workers];
        for (l, layer) in load.iter().enumerate() {
            for (e, &n) in layer.iter().enumerate() {
                let rs = &p.layers[l][e];
                for (i, r) in rs.iter().enumerate() {
                    // Split as evenly as the replica choice does.
                    let share = n / rs.len() as u64 + u64::from((i as u64) < n % rs.len() as u64);
                    rows[r.worker][l * experts + e] += share;
                }
            }
        }
        LoadReading {
            model: "m".into(),
            workers: (0..p.workers).map(|w| format!("w{w}")).collect(),
            version: p.version,
            layers,
            experts,
            rows,
        }
    }

    #[test]
    fn a_skewed_load_is_rebalanced_once_and_the_new_placement_balances_it() {
        let p = Placement::contiguous(2, 8, 4).unwrap();
        let cur = record(1, &p);
        let load = vec![vec![900, 700, 40, 40, 30, 30, 20, 20]; 2];
        let mut b = Balancer::new(BalanceConfig::default());
        let t = Instant::now();
        let r = reading(&p, &load);
        let next = b.on_reading(t, &r, Some(&cur), 2).expect("a rebalance");
        assert!(b.estimate("m", &cur.workers).unwrap().imbalance > 2.0);
        assert_eq!(next.version, 2);
        assert_eq!(next.workers, cur.workers);
        // One at a time.
        assert!(b.on_reading(t, &r, Some(&cur), 2).is_none());
        let done = b.finished(t, "m", &cur.workers, 2, true).unwrap();
        let q = Placement::from_json(&done.placement).unwrap();
        assert!((0..4).all(|w| q.hosted(0, w).len() <= 3));
        // Measured under the new placement: balanced, so nothing more happens.
        let after = reading(&q, &load);
        assert!(
            b.on_reading(t + MIN_INTERVAL, &after, Some(&done), 3)
                .is_none()
        );
        // Within the interval after a rebalance, even a skewed reading moves nothing.
        let skewed_again = reading(&q, &vec![vec![20, 20, 30, 30, 40, 40, 700, 900]; 2]);
        assert!(
            b.on_reading(t, &skewed_again, Some(&done), 3).is_none(),
            "a second rebalance within {MIN_INTERVAL:?}"
        );
        assert!(
            b.on_reading(t + MIN_INTERVAL, &skewed_again, Some(&done), 3)
                .is_some()
        );
        b.finished(t + MIN_INTERVAL, "m", &cur.workers, 3, true);
        assert!(
            b.on_reading(t + 2 * MIN_INTERVAL, &after, Some(&done), 4)
                .is_none()
        );
        let est = b.estimate("m", &cur.workers).unwrap();
        assert!(est.imbalance < 1.15, "{}", est.imbalance);
        assert_eq!((est.version, est.rebalances), (2, 2));
    }

    #[test]
    fn nothing_moves_below_the_threshold_on_little_data_or_for_a_stale_version() {
        let p = Placement::contiguous(1, 8, 4).unwrap();
        let cur = record(1, &p);
        let t = Instant::now();
        let mut b = Balancer::new(BalanceConfig::default());
        assert!(
            b.on_reading(t, &reading(&p, &[vec![100; 8]]), Some(&cur), 2)
                .is_none()
        );
        // Skewed but tiny.
        let tiny = reading(&p, &[vec![20, 10, 1, 1, 1, 1, 1, 1]]);
        assert!(b.on_reading(t, &tiny, Some(&cur), 2).is_none());
        // Skewed, but for another version than the one in force.
        let mut stale = reading(&p, &[vec![900, 700, 40, 40, 30, 30, 20, 20]]);
        stale.version = 7;
        assert!(b.on_reading(t, &stale, Some(&cur), 2).is_none());
        // Off.
        let mut off = Balancer::new(BalanceConfig {
            threshold: 0.0,
            ..BalanceConfig::default()
        });
        stale.version = 1;
        assert!(off.on_reading(t, &stale, Some(&cur), 2).is_none());
    }

    #[test]
    fn a_failed_rebalance_waits_before_the_next() {
        let p = Placement::contiguous(1, 8, 4).unwrap();
        let cur = record(1, &p);
        let r = reading(&p, &[vec![900, 700, 40, 40, 30, 30, 20, 20]]);
        let mut b = Balancer::new(BalanceConfig::default());
        let t = Instant::now();
        assert!(b.on_reading(t, &r, Some(&cur), 2).is_some());
        assert!(b.finished(t, "m", &cur.workers, 2, false).is_none());
        assert!(b.on_reading(t, &r, Some(&cur), 2).is_none());
        assert!(b.on_reading(t + RETRY_AFTER, &r, Some(&cur), 2).is_some());
    }

    #[test]
    fn the_default_budget_is_one_slot_more_than_an_even_split() {
        let c = BalanceConfig::default();
        assert_eq!(c.slots(8, 4), 3);
        assert_eq!(c.slots(8, 3), 4);
        assert_eq!(c.slots(4, 8), 2);
        assert_eq!(c.slots(2, 1), 2);
        let fixed = BalanceConfig {
            slots_per_worker: 5,
            ..c
        };
        assert_eq!(fixed.slots(8, 4), 5);
    }
}
