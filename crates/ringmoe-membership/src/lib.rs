//! Who is in the cluster: workers register under a lease and disappear when it ends.
//!
//! [`Membership`] has two implementations: [`MemoryMembership`] (one process: `ringmoe serve`, and
//! the coordinator's own registry fed by worker heartbeats when there is no etcd) and
//! [`etcd::EtcdMembership`] (a real etcd; the only module that knows etcd exists).
//!
//! The same store carries the **expert placement**: the leading coordinator publishes a
//! [`PlacementRecord`] per model with a version; each worker named in it loads its experts and
//! acknowledges the version in its own record ([`WorkerRecord::placement`], which lives on the
//! worker's lease, so the acknowledgement goes when the worker goes). The coordinator starts a
//! job only once every worker of the placement acknowledged it.

pub mod etcd;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};

/// What a worker publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique per worker process; the key it registers under.
    pub id: String,
    /// Where its `WorkerService` listens.
    pub addr: String,
    /// `cpu`, or `cuda:N`.
    pub device: String,
    /// Bytes it may spend on K/V cache.
    pub kv_budget_bytes: u64,
    /// Models this worker has on local disk (`ringmoe worker --model`); others it loads from
    /// the coordinator's path (a shared volume).
    #[serde(default)]
    pub models: Vec<String>,
    /// The placement it loaded last, and the experts it hosts in it.
    #[serde(default)]
    pub placement: Option<PlacementAck>,
    /// It got SIGTERM and is finishing its job: the coordinator schedules nothing new on it.
    #[serde(default)]
    pub draining: bool,
}

/// A model's expert placement over named workers, as the leading coordinator publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    /// The cluster's name for the model.
    pub model: String,
    /// Increases with every publication for `model`; equal to the placement's own version.
    pub version: u64,
    /// The model directory on the coordinator (used by workers without a local copy).
    pub path: String,
    /// Worker ids in rank order: worker `workers[i]` hosts placement worker `i`'s experts.
    pub workers: Vec<String>,
    /// The placement (ringmoe-parallel's `Placement` as JSON).
    pub placement: String,
}

/// A worker's acknowledgement of a placement version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementAck {
    pub model: String,
    pub version: u64,
    /// Its index in the placement.
    pub rank: usize,
    /// `experts[layer]` = the experts it hosts there, ascending.
    pub experts: Vec<Vec<usize>>,
    /// Set when loading failed: the version is acknowledged but not served.
    pub error: Option<String>,
    /// The version before this one that the worker still holds (after an incremental expert
    /// move, until a job runs on the new one), at the same rank: a run the coordinator started
    /// on it is still served.
    #[serde(default)]
    pub previous: Option<u64>,
    /// Whether loading this version read only the experts it added, and the bytes it read.
    #[serde(default)]
    pub incremental: bool,
    #[serde(default)]
    pub bytes_read: u64,
    #[serde(default)]
    pub load_millis: u64,
}

/// A change to the membership.
// A few events per join, leave or acknowledgement, never on a hot path: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// Added or updated.
    Put(WorkerRecord),
    /// Gone (lease expired, revoked or deleted), by id.
    Removed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("etcd at {endpoints}: {msg}")]
    Etcd { endpoints: String, msg: String },

    #[error("membership record {key}: {msg}")]
    BadRecord { key: String, msg: String },

    #[error("membership: {0}")]
    Closed(String),
}

pub type Result<T> = std::result::Result<T, MembershipError>;

/// A registration kept alive in the background. [`Registration::lost`] resolves when the lease
/// ended anyway (the store unreachable for longer than the TTL); dropping the registration
/// revokes it where the store allows.
#[derive(Debug)]
pub struct Registration {
    /// The store's handle of the lease (an etcd lease id; a generation in memory).
    lease: i64,
    /// For a leader's election lease: its fencing token, larger for every later leader (0 for
    /// other leases).
    token: u64,
    lost: watch::Receiver<bool>,
    _stop: Option<std::sync::mpsc::Sender<()>>,
}

impl Registration {
    /// Resolves once the lease is lost.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|l| *l).await;
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// The fencing token of an election lease (see [`Election::campaign`]); 0 otherwise.
    pub fn token(&self) -> u64 {
        self.token
    }
}

/// Membership of workers.
#[tonic::async_trait]
pub trait Membership: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes `rec` under a lease of `ttl`, kept alive until the registration is dropped.
    async fn register(&self, rec: WorkerRecord, ttl: Duration) -> Result<Registration>;

    /// The workers registered now.
    async fn list(&self) -> Result<Vec<WorkerRecord>>;

    /// The workers now, and every change after that snapshot.
    async fn watch(&self) -> Result<(Vec<WorkerRecord>, mpsc::Receiver<MemberEvent>)>;

    /// Replaces the record of a live registration (same id, same lease).
    async fn update(&self, reg: &Registration, rec: WorkerRecord) -> Result<()>;

    /// Publishes a model's placement (replacing the previous version).
    async fn publish_placement(&self, rec: &PlacementRecord) -> Result<()>;

    /// The placement published for `model`, if any.
    async fn placement(&self, model: &str) -> Result<Option<PlacementRecord>>;

    /// Every published placement now, and each one published after that snapshot.
    async fn watch_placements(
        &self,
    ) -> Result<(Vec<PlacementRecord>, mpsc::Receiver<PlacementRecord>)>;
}

/// Leader election among coordinator replicas.
#[tonic::async_trait]
pub trait Election: Send + Sync + std::fmt::Debug + 'static {
    /// Waits until this replica leads (announcing `value`, its address); the returned lease's
    /// [`Registration::lost`] resolves if leadership ends — before the store could elect
    /// another leader — and its [`Registration::token`] is a fencing token larger than any
    /// earlier leader's. Dropping it resigns.
    async fn campaign(&self, value: String, ttl: Duration) -> Result<Registration>;
}

struct Entry {
    rec: WorkerRecord,
    deadline: Instant,
    /// Bumped on every registration, so an old keep-alive cannot revive a newer entry.
    generation: u64,
}

#[derive(Default)]
struct MemoryInner {
    entries: HashMap<String, Entry>,
    generation: u64,
    placements: HashMap<String, PlacementRecord>,
}

/// Membership inside one process. Leases are deadlines; a sweeper removes expired entries.
#[derive(Clone)]
pub struct MemoryMembership {
    inner: Arc<Mutex<MemoryInner>>,
    events: broadcast::Sender<MemberEvent>,
    placements: broadcast::Sender<PlacementRecord>,
}

impl std::fmt::Debug for MemoryMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryMembership").finish_non_exhaustive()
    }
}

impl MemoryMembership {
    /// A new, empty membership; its sweeper runs on the current tokio runtime every `sweep`.
    pub fn new(sweep: Duration) -> Self {
        let (events, _) = broadcast::channel(1024);
        let (placements, _) = broadcast::channel(64);
        let m = Self {
            inner: Arc::new(Mutex::new(MemoryInner::default())),
            events,
            placements,
        };
        let weak = Arc::downgrade(&m.inner);
        let events = m.events.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(sweep).await;
                let Some(inner) = weak.upgrade() else { return };
                let now = Instant::now();
                let gone: Vec<String> = match inner.lock() {
                    Ok(mut g) => {
                        let gone: Vec<String> = g
                            .entries
                            .iter()
                            .filter(|(_, e)| e.deadline <= now)
                            .map(|(k, _)| k.clone())
                            .collect();
                        for k in &gone {
                            g.entries.remove(k);
                        }
                        gone
                    }
                    Err(_) => return,
                };
                for k in gone {
                    let _ = events.send(MemberEvent::Removed(k));
                }
            }
        });
        m
    }

    /// Puts `rec` with a lease ending `ttl` from now (a worker heartbeat); returns whether it
    /// is new.
    pub fn refresh(&self, rec: WorkerRecord, ttl: Duration) -> bool {
        self.put(rec, ttl, None).0
    }

    /// Puts or refreshes; with `generation`, only refreshes the entry of that generation (a
    /// keep-alive, which keeps the record it finds).
    fn put(&self, rec: WorkerRecord, ttl: Duration, generation: Option<u64>) -> (bool, u64) {
        let Ok(mut g) = self.inner.lock() else {
            return (false, 0);
        };
        let deadline = Instant::now() + ttl;
        if let Some(gen_) = generation {
            return match g.entries.get_mut(&rec.id) {
                Some(e) if e.generation == gen_ => {
                    e.deadline = deadline;
                    (false, gen_)
                }
                _ => (false, 0),
            };
        }
        g.generation += 1;
        let generation = g.generation;
        let old = g.entries.insert(
            rec.id.clone(),
            Entry {
                rec: rec.clone(),
                deadline,
                generation,
            },
        );
        let changed = old.as_ref().map(|e| e.rec != rec).unwrap_or(true);
        drop(g);
        if changed {
            let _ = self.events.send(MemberEvent::Put(rec));
        }
        (old.is_none(), generation)
    }

    /// Removes `id` now (a worker found dead).
    pub fn remove(&self, id: &str) {
        let removed = self
            .inner
            .lock()
            .map(|mut g| g.entries.remove(id).is_some())
            .unwrap_or(false);
        if removed {
            let _ = self.events.send(MemberEvent::Removed(id.to_string()));
        }
    }

    fn snapshot(&self) -> Vec<WorkerRecord> {
        let now = Instant::now();
        let mut v: Vec<WorkerRecord> = self
            .inner
            .lock()
            .map(|g| {
                g.entries
                    .values()
                    .filter(|e| e.deadline > now)
                    .map(|e| e.rec.clone())
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

#[tonic::async_trait]
impl Membership for MemoryMembership {
    async fn register(&self, rec: WorkerRecord, ttl: Duration) -> Result<Registration> {
        let (_, generation) = self.put(rec.clone(), ttl, None);
        let (lost_tx, lost) = watch::channel(false);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                match stopped.try_recv() {
                    Err(std::sync::mpsc::TryRecvError::Empty) => {}
                    _ => {
                        me.remove(&rec.id);
                        return;
                    }
                }
                if me.put(rec.clone(), ttl, Some(generation)).1 == 0 {
                    let _ = lost_tx.send(true);
                    return;
                }
            }
        });
        Ok(Registration {
            lease: generation as i64,
            token: 0,
            lost,
            _stop: Some(stop),
        })
    }

    async fn list(&self) -> Result<Vec<WorkerRecord>> {
        Ok(self.snapshot())
    }

    async fn update(&self, reg: &Registration, rec: WorkerRecord) -> Result<()> {
        let changed = {
            let mut g = self
                .inner
                .lock()
                .map_err(|_| MembershipError::Closed("membership poisoned".into()))?;
            match g.entries.get_mut(&rec.id) {
                Some(e) if e.generation as i64 == reg.lease => {
                    let changed = e.rec != rec;
                    e.rec = rec.clone();
                    changed
                }
                _ => {
                    return Err(MembershipError::Closed(format!(
                        "worker {} is no longer registered",
                        rec.id
                    )));
                }
            }
        };
        if changed {
            let _ = self.events.send(MemberEvent::Put(rec));
        }
        Ok(())
    }

    async fn publish_placement(&self, rec: &PlacementRecord) -> Result<()> {
        self.inner
            .lock()
            .map_err(|_| MembershipError::Closed("membership poisoned".into()))?
            .placements
            .insert(rec.model.clone(), rec.clone());
        let _ = self.placements.send(rec.clone());
        Ok(())
    }

    async fn placement(&self, model: &str) -> Result<Option<PlacementRecord>> {
        Ok(self
            .inner
            .lock()
            .map_err(|_| MembershipError::Closed("membership poisoned".into()))?
            .placements
            .get(model)
            .cloned())
    }

    async fn watch_placements(
        &self,
    ) -> Result<(Vec<PlacementRecord>, mpsc::Receiver<PlacementRecord>)> {
        let rx = self.placements.subscribe();
        let now = self
            .inner
            .lock()
            .map_err(|_| MembershipError::Closed("membership poisoned".into()))?
            .placements
            .values()
            .cloned()
            .collect();
        Ok((now, forward(rx)))
    }

    async fn watch(&self) -> Result<(Vec<WorkerRecord>, mpsc::Receiver<MemberEvent>)> {
        let rx = self.events.subscribe();
        let now = self.snapshot();
        Ok((now, forward(rx)))
    }
}

/// A broadcast subscription as an mpsc receiver, as the trait hands out.
fn forward<T: Clone + Send + 'static>(mut rx: broadcast::Receiver<T>) -> mpsc::Receiver<T> {
    let (tx, out) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            addr: format!("{id}:1"),
            device: "cpu".into(),
            kv_budget_bytes: 1,
            models: vec![],
            placement: None,
            draining: false,
        }
    }

    #[tokio::test]
    async fn memory_leases_expire_unless_kept_alive() {
        let m = MemoryMembership::new(Duration::from_millis(10));
        let (_, mut events) = m.watch().await.unwrap();
        let kept = m
            .register(rec("a"), Duration::from_millis(150))
            .await
            .unwrap();
        m.refresh(rec("b"), Duration::from_millis(150));
        assert_eq!(events.recv().await, Some(MemberEvent::Put(rec("a"))));
        assert_eq!(events.recv().await, Some(MemberEvent::Put(rec("b"))));
        // b is never refreshed: it goes; a's keep-alive holds it.
        assert_eq!(events.recv().await, Some(MemberEvent::Removed("b".into())));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(m.list().await.unwrap(), vec![rec("a")]);
        assert!(!kept.is_lost());
        drop(kept);
        assert_eq!(events.recv().await, Some(MemberEvent::Removed("a".into())));
    }

    #[tokio::test]
    async fn memory_updates_records_and_publishes_placements() {
        let m = MemoryMembership::new(Duration::from_millis(10));
        let reg = m.register(rec("a"), Duration::from_secs(5)).await.unwrap();
        let (_, mut events) = m.watch().await.unwrap();
        let (now, mut placements) = m.watch_placements().await.unwrap();
        assert!(now.is_empty());
        let p = PlacementRecord {
            model: "m".into(),
            version: 3,
            path: "/m".into(),
            workers: vec!["a".into()],
            placement: "{}".into(),
        };
        m.publish_placement(&p).await.unwrap();
        assert_eq!(placements.recv().await, Some(p.clone()));
        assert_eq!(m.placement("m").await.unwrap(), Some(p));
        let mut acked = rec("a");
        acked.placement = Some(PlacementAck {
            model: "m".into(),
            version: 3,
            rank: 0,
            experts: vec![vec![0]],
            error: None,
            ..PlacementAck::default()
        });
        m.update(&reg, acked.clone()).await.unwrap();
        assert_eq!(events.recv().await, Some(MemberEvent::Put(acked.clone())));
        assert_eq!(m.list().await.unwrap(), vec![acked.clone()]);
        // A registration that was replaced cannot write over its successor.
        let newer = m.register(rec("a"), Duration::from_secs(5)).await.unwrap();
        assert!(m.update(&reg, acked).await.is_err());
        assert_eq!(m.list().await.unwrap(), vec![rec("a")]);
        drop(newer);
    }
}
