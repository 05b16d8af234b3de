//! Expert load statistics: rows computed per (layer, expert, worker) over a sliding time window.
//!
//! Each worker records the rows its replicas compute; the window is cut into buckets that expire
//! whole, so a snapshot covers between `window − window/buckets` and `window` of history. The
//! hot-expert replication ([`crate::Placement::replicate_hot`]), the autoscaler and metrics read
//! [`LoadSnapshot`]s; a replica is identified by the worker that hosts it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `(layer, expert, worker)`.
pub type LoadKey = (u32, u32, u32);

#[derive(Debug)]
struct Bucket {
    start: Instant,
    counts: BTreeMap<LoadKey, u64>,
}

/// Thread-safe sliding-window counters; share it behind an `Arc`.
#[derive(Debug)]
pub struct LoadTracker {
    window: Duration,
    bucket: Duration,
    buckets: Mutex<VecDeque<Bucket>>,
    /// Rows per (layer, expert) since the tracker was made (for counters that never expire).
    totals: Mutex<BTreeMap<(u32, u32), u64>>,
}

/// Totals over the window at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadSnapshot {
    pub counts: BTreeMap<LoadKey, u64>,
}

impl Default for LoadTracker {
    /// A one-minute window in 12 buckets of 5 s.
    fn default() -> Self {
        Self::new(Duration::from_secs(60), 12)
    }
}

impl LoadTracker {
    pub fn new(window: Duration, buckets: u32) -> Self {
        let buckets = buckets.max(1);
        Self {
            window,
            bucket: (window / buckets).max(Duration::from_millis(1)),
            buckets: Mutex::new(VecDeque::new()),
            totals: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    fn expire(&self, q: &mut VecDeque<Bucket>, now: Instant) {
        while q
            .front()
            .is_some_and(|b| now.saturating_duration_since(b.start) >= self.window)
        {
            q.pop_front();
        }
    }

    /// Adds `rows` computed by `worker`'s replica of (`layer`, `expert`).
    pub fn record(&self, layer: usize, expert: usize, worker: usize, rows: u64) {
        self.record_at(Instant::now(), layer, expert, worker, rows);
    }

    pub fn record_at(&self, now: Instant, layer: usize, expert: usize, worker: usize, rows: u64) {
        let mut q = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut q, now);
        let fresh = q
            .back()
            .is_none_or(|b| now.saturating_duration_since(b.start) >= self.bucket);
        if fresh {
            q.push_back(Bucket {
                start: now,
                counts: BTreeMap::new(),
            });
        }
        if let Some(b) = q.back_mut() {
            *b.counts
                .entry((layer as u32, expert as u32, worker as u32))
                .or_default() += rows;
        }
        drop(q);
        let mut t = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        *t.entry((layer as u32, expert as u32)).or_default() += rows;
    }

    /// Rows per (layer, expert) recorded since this tracker was made, whatever the window.
    pub fn totals(&self) -> BTreeMap<(u32, u32), u64> {
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn snapshot(&self) -> LoadSnapshot {
        self.snapshot_at(Instant::now())
    }

    pub fn snapshot_at(&self, now: Instant) -> LoadSnapshot {
        let mut q = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut q, now);
        let mut counts = BTreeMap::new();
        for b in q.iter() {
            for (k, v) in &b.counts {
                *counts.entry(*k).or_default() += v;
            }
        }
        LoadSnapshot { counts }
    }
}

impl LoadSnapshot {
    /// Adds another snapshot's counts (another worker's, when gathering a cluster-wide view).
    pub fn merge(&mut self, other: &LoadSnapshot) {
        for (k, v) in &other.counts {
            *self.counts.entry(*k).or_default() += v;
        }
    }

    /// Rows per expert, summed over replicas: `[layer][expert]` for `layers × experts`.
    pub fn per_expert(&self, layers: usize, experts: usize) -> Vec<Vec<u64>> {
        let mut out = vec![vec![0u64; experts]; layers];
        for (&(l, e, _), &v) in &self.counts {
            if let Some(c) = out.get_mut(l as usize).and_then(|r| r.get_mut(e as usize)) {
                *c += v;
            }
        }
        out
    }

    /// Rows per worker over all layers and experts.
    pub fn per_worker(&self, workers: usize) -> Vec<u64> {
        let mut out = vec![0u64; workers];
        for (&(_, _, w), &v) in &self.counts {
            if let Some(c) = out.get_mut(w as usize) {
                *c += v;
            }
        }
        out
    }

    /// `max / mean` of rows per worker (1 is perfect balance; 0 when nothing was recorded).
    pub fn imbalance(&self, workers: usize) -> f64 {
        imbalance(&self.per_worker(workers))
    }

    /// Flattened as `[layer, expert, worker, rows]` quadruples (for the wire).
    pub fn to_i64(&self) -> Vec<i64> {
        self.counts
            .iter()
            .flat_map(|(&(l, e, w), &v)| [l as i64, e as i64, w as i64, v as i64])
            .collect()
    }

    /// Inverse of [`Self::to_i64`]; `None` if the length is not a multiple of four or a field is
    /// out of range.
    pub fn from_i64(v: &[i64]) -> Option<Self> {
        if !v.len().is_multiple_of(4) {
            return None;
        }
        let mut counts = BTreeMap::new();
        for q in v.chunks_exact(4) {
            let key = (
                u32::try_from(q[0]).ok()?,
                u32::try_from(q[1]).ok()?,
                u32::try_from(q[2]).ok()?,
            );
            *counts.entry(key).or_default() += u64::try_from(q[3]).ok()?;
        }
        Some(Self { counts })
    }
}

/// `max / mean` of a list of loads (0 for an empty or all-zero list).
pub fn imbalance(load: &[u64]) -> f64 {
    let total: u64 = load.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let max = load.iter().copied().max().unwrap_or(0) as f64;
    max / (total as f64 / load.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_expire_with_their_bucket() {
        let t = LoadTracker::new(Duration::from_secs(10), 5);
        let t0 = Instant::now();
        t.record_at(t0, 0, 3, 1, 5);
        t.record_at(t0 + Duration::from_secs(1), 0, 3, 1, 2);
        t.record_at(t0 + Duration::from_secs(4), 1, 0, 0, 7);
        let s = t.snapshot_at(t0 + Duration::from_secs(5));
        assert_eq!(s.counts[&(0, 3, 1)], 7);
        assert_eq!(s.per_expert(2, 4), vec![vec![0, 0, 0, 7], vec![7, 0, 0, 0]]);
        assert_eq!(s.per_worker(2), vec![7, 7]);
        assert_eq!(s.imbalance(2), 1.0);
        // The first bucket (started at t0) is gone after 10 s; the one from t0 + 4 s is not.
        let later = t.snapshot_at(t0 + Duration::from_secs(11));
        assert_eq!(later.counts.get(&(0, 3, 1)), None);
        assert_eq!(later.counts[&(1, 0, 0)], 7);
        assert!(
            t.snapshot_at(t0 + Duration::from_secs(20))
                .counts
                .is_empty()
        );
        // The totals keep everything, by (layer, expert), whichever worker's replica.
        t.record_at(t0 + Duration::from_secs(30), 0, 3, 0, 1);
        let totals = t.totals();
        assert_eq!(totals[&(0, 3)], 8);
        assert_eq!(totals[&(1, 0)], 7);
        assert_eq!(totals.len(), 2);
    }

    #[test]
    fn snapshots_travel_and_merge() {
        let t = LoadTracker::default();
        t.record(2, 5, 3, 9);
        let s = t.snapshot();
        let back = LoadSnapshot::from_i64(&s.to_i64()).unwrap();
        assert_eq!(back, s);
        let mut m = back.clone();
        m.merge(&s);
        assert_eq!(m.counts[&(2, 5, 3)], 18);
        assert!(LoadSnapshot::from_i64(&[1, 2, 3]).is_none());
        assert!(LoadSnapshot::from_i64(&[1, 2, -3, 4]).is_none());
        assert_eq!(imbalance(&[3, 1]), 1.5);
    }
}
