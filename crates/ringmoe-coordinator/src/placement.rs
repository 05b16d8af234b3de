//! The placement publisher: which expert placement a run uses, and getting every worker of the
//! run to hold it before the run starts.
//!
//! The decision ([`plan`]) is pure: the placement published last for the model is reused when it
//! covers exactly the run's workers (same ids in the same rank order, same model path, same
//! shape), else a contiguous one gets the next version. The I/O: with a membership store the
//! record is published there and each worker acknowledges the version in its own record
//! ([`await_acks`]); with heartbeating workers `LoadModel` carries it ([`load_on_workers`]).

use std::time::{Duration, Instant};

use ringmoe_membership::{Membership, PlacementRecord};
use ringmoe_plan::Placement;
use ringmoe_proto::proto;
use tokio::sync::watch;

use crate::error::{JobError, WorkerStep};

/// What the publisher needs to know of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    pub layers: usize,
    pub experts: usize,
    /// The model directory on the coordinator (workers without a local copy load from it).
    pub path: String,
}

/// The placement a run uses; `fresh` when it is a new version that must be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementPlan {
    pub record: PlacementRecord,
    pub fresh: bool,
}

/// Chooses the placement of `model` over `workers` (ids in rank order) given the record
/// published `last`; a new one gets version `next_version` (above every version published or
/// being published for the model).
pub fn plan(
    model: &str,
    shape: &ModelShape,
    last: Option<&PlacementRecord>,
    workers: &[String],
    next_version: u64,
) -> Result<PlacementPlan, JobError> {
    let reuse = last
        .filter(|r| r.workers == workers && r.path == shape.path)
        .filter(|r| {
            Placement::from_json(&r.placement).is_ok_and(|p| {
                p.version == r.version
                    && p.check_shape(shape.layers, shape.experts, workers.len())
                        .is_ok()
            })
        });
    if let Some(r) = reuse {
        return Ok(PlacementPlan {
            record: r.clone(),
            fresh: false,
        });
    }
    let mut p =
        Placement::contiguous(shape.layers, shape.experts, workers.len()).map_err(|source| {
            JobError::Placement {
                experts: shape.experts,
                workers: workers.len(),
                source,
            }
        })?;
    p.version = next_version.max(last.map_or(0, |r| r.version) + 1);
    Ok(PlacementPlan {
        record: PlacementRecord {
            model: model.to_string(),
            version: p.version,
            path: shape.path.clone(),
            workers: workers.to_vec(),
            placement: p.to_json(),
        },
        fresh: true,
    })
}

/// Sends `rec` to heartbeating workers by `LoadModel` (their answer is the acknowledgement);
/// returns the bytes they read.
pub async fn load_on_workers(
    clients: &[crate::run::WorkerClient],
    rec: &PlacementRecord,
) -> Result<u64, JobError> {
    let trace = ringmoe_telemetry::propagate::TraceHeaders::current();
    crate::run::on_every(clients, |r, mut c| {
        let req = trace.request(proto::LoadModelRequest {
            model: rec.model.clone(),
            path: rec.path.clone(),
            placement_json: rec.placement.clone(),
            worker_index: r as u32,
        });
        async move {
            c.load_model(req)
                .await
                .map(|r| r.into_inner().bytes_read)
                .map_err(|e| JobError::Worker {
                    rank: r,
                    step: WorkerStep::LoadModel,
                    message: e.message().to_string(),
                })
        }
    })
    .await
    .map(|bytes| bytes.iter().sum())
}

/// Publishes `rec` in the membership store.
pub async fn publish(m: &dyn Membership, rec: &PlacementRecord) -> Result<(), JobError> {
    m.publish_placement(rec)
        .await
        .map_err(|e| JobError::Membership(e.to_string()))
}

/// Waits until every worker of `rec` acknowledged its version in its membership record.
pub async fn await_acks(
    m: &dyn Membership,
    rec: &PlacementRecord,
    timeout: Duration,
    abort: &watch::Receiver<bool>,
    job: u64,
) -> Result<(), JobError> {
    let deadline = Instant::now() + timeout;
    loop {
        let live = m
            .list()
            .await
            .map_err(|e| JobError::Membership(e.to_string()))?;
        let mut pending = Vec::new();
        for (rank, id) in rec.workers.iter().enumerate() {
            let Some(w) = live.iter().find(|w| &w.id == id) else {
                return Err(JobError::LeftWhileLoading {
                    worker: id.clone(),
                    model: rec.model.clone(),
                    version: rec.version,
                });
            };
            match &w.placement {
                Some(a)
                    if a.model == rec.model
                        && (a.version == rec.version || a.previous == Some(rec.version))
                        && a.rank == rank =>
                {
                    if let Some(e) = &a.error {
                        return Err(JobError::LoadRefused {
                            worker: id.clone(),
                            model: rec.model.clone(),
                            version: rec.version,
                            message: e.clone(),
                        });
                    }
                }
                _ => pending.push(id.clone()),
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        if *abort.borrow() {
            return Err(JobError::Cancelled { id: job });
        }
        if Instant::now() >= deadline {
            return Err(JobError::AckTimeout {
                workers: pending,
                model: rec.model.clone(),
                version: rec.version,
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ModelShape {
        ModelShape {
            layers: 2,
            experts: 4,
            path: "/m".into(),
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_last_placement_is_reused_only_for_exactly_its_workers() {
        let first = plan("m", &shape(), None, &ids(&["a", "b"]), 1).unwrap();
        assert!(first.fresh && first.record.version == 1);
        let again = plan("m", &shape(), Some(&first.record), &ids(&["a", "b"]), 2).unwrap();
        assert_eq!(
            again,
            PlacementPlan {
                record: first.record.clone(),
                fresh: false
            }
        );
        for other in [ids(&["a", "b", "c"]), ids(&["b", "a"]), ids(&["a"])] {
            let p = plan("m", &shape(), Some(&first.record), &other, 2).unwrap();
            assert!(
                p.fresh && p.record.version == 2 && p.record.workers == other,
                "{other:?}"
            );
        }
        let moved = ModelShape {
            path: "/elsewhere".into(),
            ..shape()
        };
        assert!(
            plan("m", &moved, Some(&first.record), &ids(&["a", "b"]), 2)
                .unwrap()
                .fresh
        );
    }
}
