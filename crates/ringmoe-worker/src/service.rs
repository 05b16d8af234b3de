//! `WorkerService`: what the coordinator asks of a worker — load a placement, prepare a job
//! (bind its data-plane port), receive its shard, run it (streaming progress and results),
//! cancel it, report expert load.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ringmoe_telemetry::propagate::set_parent;

use crate::*;

/// How long a job's data-plane rendezvous may take (see `run_job`).
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(10);

/// The span of one call from the coordinator, a child of the caller's span when the request
/// carries its trace context.
fn call_span<T>(req: &Request<T>, span: tracing::Span) -> tracing::Span {
    set_parent(&span, req.metadata());
    span
}

/// Most jobs prepared (a data-plane listener bound) but not yet run, at once.
const MAX_PENDING: usize = 8;

pub(crate) fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::WorkerEvent, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for Worker {
    async fn load_model(
        &self,
        req: Request<proto::LoadModelRequest>,
    ) -> Result<Response<proto::LoadModelResponse>, Status> {
        let span = call_span(
            &req,
            info_span!("worker.load_model", worker = %self.inner.id, model = tracing::field::Empty),
        );
        let r = req.into_inner();
        span.record("model", r.model.as_str());
        if self.inner.follows_store {
            return Err(Status::failed_precondition(
                "this worker follows the placements published in its membership store (etcd) \
                 and acknowledges them there; LoadModel is for workers that heartbeat",
            ));
        }
        let placement = Placement::from_json(&r.placement_json)
            .map_err(|e| Status::invalid_argument(format!("placement: {e}")))?;
        let done = self
            .load(r.model, r.path, placement, r.worker_index as usize)
            .instrument(span)
            .await?;
        Ok(Response::new(proto::LoadModelResponse {
            load_secs: done.secs,
            cached: done.cached,
            incremental: done.incremental,
            bytes_read: done.bytes_read,
        }))
    }

    async fn prepare_job(
        &self,
        req: Request<proto::PrepareJobRequest>,
    ) -> Result<Response<proto::PrepareJobResponse>, Status> {
        let span = call_span(
            &req,
            info_span!("worker.prepare_job", "job.id" = req.get_ref().job_id, worker = %self.inner.id),
        );
        let _in = span.enter();
        let r = req.into_inner();
        let id = r.job_id;
        let token: [u8; 32] = r.data_token.as_slice().try_into().map_err(|_| {
            Status::invalid_argument(format!(
                "job {id}: the data-plane token must be 32 bytes, not {}",
                r.data_token.len()
            ))
        })?;
        if !self.inner.accepting.load(Ordering::Relaxed) {
            return Err(Status::unavailable(
                "this worker lost its membership lease and takes no jobs until it re-registers",
            ));
        }
        // The coordinator uses only a placement every worker acknowledged; this one's must be it.
        let loaded = {
            let mut held = lock(&self.inner.loaded)?;
            match (
                held.find(&r.model, r.placement_version).cloned(),
                &held.current,
            ) {
                (Some(l), Some(current)) => {
                    // A job on the newest version: the coordinator has switched, and the
                    // previous version is freed once the jobs still holding it end.
                    if Arc::ptr_eq(&l, current) {
                        held.previous = None;
                    }
                    l
                }
                (_, Some(l)) => {
                    return Err(Status::failed_precondition(format!(
                        "job {id} wants model '{}' at placement version {}; this worker holds '{}' \
                         at version {}",
                        r.model, r.placement_version, l.name, l.placement.version
                    )));
                }
                (_, None) => {
                    return Err(Status::failed_precondition(format!(
                        "job {id} wants model '{}'; this worker has loaded none",
                        r.model
                    )));
                }
            }
        };
        let listener = bind_data_port(self.inner.data_host, self.inner.data_ports.clone())?;
        let addr = listener.local_addr().map_err(internal)?;
        let mut pending = lock(&self.inner.pending)?;
        let stale = self.inner.data_timeout;
        pending.retain(|job, p| {
            let keep = p.since.elapsed() < stale;
            if !keep {
                warn!(job, "dropping a job prepared {stale:?} ago that never ran");
            }
            keep
        });
        // The coordinator runs one job at a time: more prepared jobs than a few are leftovers
        // (or abuse), each holding a listening socket. The oldest go first.
        while pending.len() >= MAX_PENDING {
            let Some(oldest) = pending.iter().min_by_key(|(_, p)| p.since).map(|(j, _)| *j) else {
                break;
            };
            warn!(
                job = oldest,
                "dropping a prepared job that never ran: too many pending"
            );
            pending.remove(&oldest);
        }
        pending.insert(
            id,
            PendingJob {
                loaded,
                listener: Some(listener),
                token,
                shard: None,
                since: Instant::now(),
            },
        );
        Ok(Response::new(proto::PrepareJobResponse {
            data_addr: addr.to_string(),
        }))
    }

    async fn send_shard(
        &self,
        req: Request<Streaming<proto::ShardChunk>>,
    ) -> Result<Response<proto::SendShardResponse>, Status> {
        let span = call_span(
            &req,
            info_span!("worker.send_shard", worker = %self.inner.id, tokens = tracing::field::Empty),
        );
        let mut stream = req.into_inner();
        let max_tokens = {
            let held = lock(&self.inner.loaded)?;
            let l = held
                .current
                .as_ref()
                .ok_or_else(|| Status::failed_precondition("no model is loaded"))?;
            let c = l.model.config();
            let per_token = (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4).max(1) as u64;
            self.inner.kv_budget_bytes / per_token
        };
        let shard = receive_shard(&mut stream, max_tokens, self.inner.kv_budget_bytes)
            .instrument(span.clone())
            .await?;
        let n = shard.tokens.len() as u64;
        span.record("tokens", n);
        let mut pending = lock(&self.inner.pending)?;
        let job = pending.get_mut(&shard.job_id).ok_or_else(|| {
            Status::failed_precondition(format!("job {} was not prepared", shard.job_id))
        })?;
        job.shard = Some(shard);
        Ok(Response::new(proto::SendShardResponse { tokens: n }))
    }

    type RunJobStream = EventStream;

    async fn run_job(
        &self,
        req: Request<proto::RunJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let span = call_span(
            &req,
            info_span!(
                "worker.run_job",
                "job.id" = req.get_ref().job_id,
                worker = %self.inner.id,
                rank = tracing::field::Empty,
                model = tracing::field::Empty,
                tokens = tracing::field::Empty,
            ),
        );
        let r = req.into_inner();
        let id = r.job_id;
        let job = lock(&self.inner.pending)?
            .remove(&id)
            .ok_or_else(|| Status::failed_precondition(format!("job {id} was not prepared")))?;
        let (Some(listener), Some(shard)) = (job.listener, job.shard) else {
            return Err(Status::failed_precondition(format!(
                "job {id} has no shard yet"
            )));
        };
        let loaded = job.loaded;
        let peers: Vec<SocketAddr> = r
            .peers
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| Status::invalid_argument(format!("peer address: {e}")))?;
        if peers.len() != shard.world() || loaded.placement.workers != shard.world() {
            return Err(Status::invalid_argument(format!(
                "{} peers and a placement of {} workers for a shard of a {}-rank job",
                peers.len(),
                loaded.placement.workers,
                shard.world()
            )));
        }
        let attention = attention_mode(r.attention).map_err(Status::invalid_argument)?;
        let tls = match &self.inner.data_tls {
            None => None,
            Some(files) => {
                let (server, client) = ringmoe_proto::tls::data_plane(files).map_err(|e| {
                    Status::failed_precondition(format!("job {id}: data-plane TLS: {e}"))
                })?;
                Some(ringmoe_comm::DataTls { server, client })
            }
        };
        // A peer must know the job's token (from the coordinator's PrepareJob) to be heard.
        let opts = ringmoe_comm::TcpOptions {
            session: id,
            token: job.token,
            tls,
            // Every peer bound its listener in PrepareJob, before any RunJob went out: a peer
            // not connected within this is cut off, not slow to start.
            connect_timeout: RENDEZVOUS_TIMEOUT,
            ..ringmoe_comm::TcpOptions::default()
        };
        let cancel = Arc::new(AtomicBool::new(false));
        lock(&self.inner.running)?.insert(id, cancel.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let inner = self.inner.clone();
        span.record("rank", shard.rank);
        span.record("model", loaded.name.as_str());
        span.record("tokens", shard.tokens.len());
        let kv = {
            let c = loaded.model.config();
            (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4) as u64
                * (shard.tokens.len() as u64 + u64::from(r.max_new_tokens))
        };
        std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || {
                let _g = span.enter();
                crate::telemetry::kv_bytes(&inner.id, kv);
                let run = JobRun {
                    id,
                    gpu: inner.gpu.as_ref().map(|g| &g.0),
                    loaded: &loaded,
                    shard: &shard,
                    cancel: &cancel,
                    tx: &tx,
                };
                let t = Instant::now();
                let _gpu = inner
                    .gpu
                    .is_some()
                    .then(|| inner.gpu_busy.lock().unwrap_or_else(|p| p.into_inner()));
                let res = run.execute(listener, &peers, &opts, &r, attention, inner.data_timeout);
                match res {
                    Ok(()) => info!(
                        secs = t.elapsed().as_secs_f64(),
                        data_tls = opts.tls.is_some(),
                        "job part done"
                    ),
                    Err(e) => {
                        warn!(error = %e, "job part failed");
                        let status = match e {
                            ParallelError::Cancelled(_) => Status::cancelled(e.to_string()),
                            e => link_failure(shard.rank, e),
                        };
                        let _ = tx.blocking_send(Err(status));
                    }
                }
                crate::telemetry::kv_bytes(&inner.id, 0);
                // A re-run of the same job (after a coordinator restart) may have replaced
                // this entry; remove only our own.
                if let Ok(mut m) = inner.running.lock()
                    && m.get(&id).is_some_and(|c| Arc::ptr_eq(c, &cancel))
                {
                    m.remove(&id);
                }
            })
            .map_err(internal)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(
        &self,
        req: Request<proto::WorkerCancelRequest>,
    ) -> Result<Response<proto::WorkerCancelResponse>, Status> {
        let id = req.into_inner().job_id;
        lock(&self.inner.pending)?.remove(&id);
        let was_running = match lock(&self.inner.running)?.get(&id) {
            Some(c) => {
                c.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        };
        Ok(Response::new(proto::WorkerCancelResponse { was_running }))
    }

    async fn report_load(
        &self,
        req: Request<proto::ReportLoadRequest>,
    ) -> Result<Response<proto::ReportLoadResponse>, Status> {
        let want = req.into_inner().placement_version;
        let loaded = {
            let held = lock(&self.inner.loaded)?;
            [&held.current, &held.previous]
                .into_iter()
                .flatten()
                .find(|l| want == 0 || l.placement.version == want)
                .cloned()
        };
        let Some(l) = loaded else {
            return Ok(Response::new(proto::ReportLoadResponse::default()));
        };
        let c = l.model.config();
        let (layers, experts) = (c.num_layers, c.moe.num_experts);
        let rows = l
            .load
            .snapshot()
            .per_expert(layers, experts)
            .into_iter()
            .flatten()
            .collect();
        Ok(Response::new(proto::ReportLoadResponse {
            layers: layers as u32,
            experts: experts as u32,
            rows,
            window_secs: l.load.window().as_secs_f64(),
            model: l.name.clone(),
            placement_version: l.placement.version,
        }))
    }
}

/// A failed run's status: the error, and the peer it blames when a data link failed (so the
/// coordinator can leave one end of a broken link out of the re-run).
fn link_failure(rank: usize, e: ParallelError) -> Status {
    let peer = match &e {
        ParallelError::Comm(c) => c.lost_peer(),
        _ => None,
    };
    let mut status = Status::internal(format!("worker rank {rank}: {e}"));
    if let Some(p) = peer
        && let Ok(v) = p.to_string().parse()
    {
        status
            .metadata_mut()
            .insert(ringmoe_proto::LOST_PEER_HEADER, v);
    }
    status
}
