//! How a worker stays known: a lease in the membership store (re-registered when lost, the
//! record rewritten as it changes), the published placements it follows and acknowledges, or
//! heartbeats to a coordinator without etcd.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::*;

/// Keeps this worker registered with `rec`'s latest value: re-registers when the lease is
/// lost (taking no jobs meanwhile) and rewrites the record when it changes.
pub(crate) async fn stay_registered(
    m: Arc<dyn Membership>,
    mut rec: watch::Receiver<WorkerRecord>,
    ttl: Duration,
    inner: Arc<Inner>,
) {
    loop {
        let current = rec.borrow_and_update().clone();
        match m.register(current, ttl).await {
            Ok(mut reg) => {
                info!("registered");
                inner.accepting.store(true, Ordering::Relaxed);
                loop {
                    tokio::select! {
                        _ = reg.lost() => {
                            warn!("membership lease lost; registering again");
                            break;
                        }
                        changed = rec.changed() => {
                            if changed.is_err() {
                                return; // the worker is stopping
                            }
                            let r = rec.borrow_and_update().clone();
                            if let Err(e) = m.update(&reg, r).await {
                                // Registering again writes the latest record.
                                warn!(error = %e, "updating the record; registering again");
                                break;
                            }
                        }
                    }
                }
                inner.accepting.store(false, Ordering::Relaxed);
            }
            Err(e) => {
                inner.accepting.store(false, Ordering::Relaxed);
                warn!(error = %e, "cannot register");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Watches the published placements; loads each one that names this worker and acknowledges
/// it in the worker's record. Re-watches when the watch ends (etcd restarted, say).
pub(crate) async fn follow_placements(
    m: Arc<dyn Membership>,
    worker: Worker,
    me: String,
    rec: Arc<watch::Sender<WorkerRecord>>,
) {
    // The newest version applied per model: a re-watch replays the current records.
    let mut seen: HashMap<String, u64> = HashMap::new();
    loop {
        match m.watch_placements().await {
            Ok((now, mut rx)) => {
                for p in now {
                    worker.apply_placement(&me, p, &rec, &mut seen).await;
                }
                while let Some(p) = rx.recv().await {
                    worker.apply_placement(&me, p, &rec, &mut seen).await;
                }
                warn!("placement watch ended; watching again");
            }
            Err(e) => warn!(error = %e, "placements unavailable"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Worker {
    async fn apply_placement(
        &self,
        me: &str,
        p: PlacementRecord,
        rec: &watch::Sender<WorkerRecord>,
        seen: &mut HashMap<String, u64>,
    ) {
        let Some(rank) = p.workers.iter().position(|w| w == me) else {
            return;
        };
        if seen.get(&p.model).is_some_and(|&v| v >= p.version) {
            return;
        }
        seen.insert(p.model.clone(), p.version);
        let placement = match Placement::from_json(&p.placement) {
            Ok(pl) if pl.version == p.version => Ok(pl),
            Ok(pl) => Err(format!(
                "the record says version {} but its placement is version {}",
                p.version, pl.version
            )),
            Err(e) => Err(format!("placement: {e}")),
        };
        let (experts, error, report) = match placement {
            Ok(pl) => {
                let experts = (0..pl.layers.len()).map(|l| pl.hosted(l, rank)).collect();
                match self.load(p.model.clone(), p.path.clone(), pl, rank).await {
                    Ok(r) => (experts, None, r),
                    Err(e) => (
                        experts,
                        Some(e.message().to_string()),
                        LoadReport::default(),
                    ),
                }
            }
            Err(e) => (Vec::new(), Some(e), LoadReport::default()),
        };
        // The older version still held (same model, same rank), which runs may still use.
        let previous = lock(&self.inner.loaded).ok().and_then(|h| {
            h.previous
                .as_ref()
                .filter(|l| l.name == p.model && l.index == rank)
                .map(|l| l.placement.version)
        });
        match &error {
            None => info!(model = %p.model, version = p.version, rank, "placement acknowledged"),
            Some(e) => {
                warn!(model = %p.model, version = p.version, error = %e, "placement not loaded")
            }
        }
        rec.send_modify(|r| {
            r.placement = Some(PlacementAck {
                model: p.model,
                version: p.version,
                rank,
                experts,
                error,
                previous,
                incremental: report.incremental,
                bytes_read: report.bytes_read,
                load_millis: (report.secs * 1e3) as u64,
            })
        });
    }
}

pub(crate) async fn heartbeat(
    coordinator: String,
    me: String,
    kv_budget_bytes: u64,
    cred: Credential,
    tls: Option<ringmoe_proto::tls::Tls>,
    inner: Arc<Inner>,
) {
    let mut client = None;
    let mut interval = Duration::from_millis(500);
    // Failures to reach the coordinator are logged once, then every 30 s while they last (a
    // coordinator that is starting is normal; a TLS handshake it refuses is worth seeing).
    let mut quiet_until: Option<Instant> = None;
    let failed = |quiet_until: &mut Option<Instant>, what: &str, e: &dyn std::error::Error| {
        if quiet_until.is_none_or(|t| Instant::now() >= t) {
            let why = ringmoe_proto::error_chain(e);
            warn!(coordinator, error = %why, "{what}");
            *quiet_until = Some(Instant::now() + Duration::from_secs(30));
        }
    };
    loop {
        if client.is_none() {
            client = match ringmoe_proto::tls::endpoint(&coordinator, tls.as_ref()) {
                Ok(e) => match e.connect().await {
                    Ok(ch) => Some(ClusterServiceClient::with_interceptor(ch, cred.clone())),
                    Err(e) => {
                        failed(
                            &mut quiet_until,
                            "cannot reach the coordinator for heartbeats",
                            &e,
                        );
                        None
                    }
                },
                Err(e) => {
                    warn!(coordinator, error = %e, "not a coordinator address");
                    None
                }
            };
        }
        if let Some(c) = client.as_mut() {
            let req = proto::HeartbeatRequest {
                worker_addr: me.clone(),
                kv_budget_bytes,
                draining: inner.draining.load(Ordering::Relaxed),
            };
            match c.heartbeat(req).await {
                Ok(r) => {
                    interval = Duration::from_millis(r.into_inner().interval_ms.clamp(50, 10_000));
                    quiet_until = None;
                }
                Err(e) if e.code() == tonic::Code::Unauthenticated => {
                    warn!(error = %e.message(), "the coordinator refused this worker's heartbeat");
                    interval = Duration::from_secs(5);
                }
                Err(e) => {
                    failed(&mut quiet_until, "heartbeat failed", &e);
                    client = None;
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}
