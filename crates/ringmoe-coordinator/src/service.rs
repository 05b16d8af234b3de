//! The coordinator's gRPC services: `JobService` for clients and `ClusterService` for
//! heartbeating workers. Handlers check input, write what must be durable before they answer
//! (a new job), and hand everything else to the core as events.

use std::pin::Pin;
use std::sync::Arc;

use ringmoe_membership::WorkerRecord;
use ringmoe_proto::proto::cluster_service_server::ClusterService;
use ringmoe_proto::proto::job_service_server::JobService;
use ringmoe_proto::proto::{self};
use ringmoe_telemetry::propagate::set_parent;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info};

use crate::admission::{Admitted, admit};
use crate::auth::{Caller, caller_of};
use crate::convert::{mode_proto, phase_finished, progress};
use crate::machine::{Event, Report};
use crate::output::{JobOutput, Outcome, StoredOutput};
use crate::runtime::{Runtime, Snapshot, Watched, lock};
use crate::store::{JobId, JobSpec, JobState};
use ringmoe_hf::TextStream;

#[derive(Clone)]
pub(crate) struct Coordinator {
    pub rt: Arc<Runtime>,
}

impl Coordinator {
    /// Job `id`'s progress channel, if `caller` may see the job (another tenant's job does not
    /// exist for it: the same `NOT_FOUND` as an unknown id).
    fn subscribe(&self, id: JobId, caller: &Caller) -> Result<watch::Receiver<Snapshot>, Status> {
        lock(&self.rt.jobs)?
            .get(&id)
            .filter(|j| caller.sees(j.spec.owner.as_deref()))
            .map(|j| j.progress.subscribe())
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
    }

    /// Whether `caller` may queue one more job: its `max_jobs_per_minute` (this attempt
    /// counts), then its `max_queued_jobs` over its unfinished jobs (`RESOURCE_EXHAUSTED`
    /// naming the limit).
    pub(crate) fn admit_caller(&self, caller: &Caller) -> Result<(), Status> {
        let Some(t) = caller.tenant() else {
            return Ok(());
        };
        self.rt.submissions.admit(t, std::time::Instant::now())?;
        let Some(most) = t.max_queued_jobs else {
            return Ok(());
        };
        let unfinished = lock(&self.rt.jobs)?
            .values()
            .filter(|j| j.spec.owner.as_deref() == Some(t.name.as_str()))
            .filter(|j| !phase_finished(j.progress.borrow().progress.phase()))
            .count();
        if unfinished >= most {
            return Err(Status::resource_exhausted(format!(
                "client '{}' has {unfinished} jobs queued or running, its limit \
                 (max_queued_jobs={most}); wait for one to finish",
                t.name
            )));
        }
        Ok(())
    }

    /// Stores a checked job, then queues it: the job exists for clients once this returns.
    /// `span` is the job's trace root ([`crate::telemetry::job_span`]).
    pub(crate) async fn create_job(
        &self,
        spec: JobSpec,
        tokens: Vec<u32>,
        span: tracing::Span,
    ) -> Result<JobId, Status> {
        let rt = &self.rt;
        if rt.is_draining() {
            return Err(Status::unavailable(
                "the coordinator is shutting down and takes no new jobs; submit again in a \
                 moment (to the next leader, or after the restart)",
            ));
        }
        let len = tokens.len();
        span.record("model", spec.model.as_str());
        span.record("mode", crate::telemetry::mode(&spec));
        span.record("tokens", len);
        let store_spec = spec.clone();
        let store = rt.store.clone();
        let id = tokio::task::spawn_blocking(move || store.create(&store_spec, &tokens))
            .instrument(tracing::info_span!(parent: &span, "store", tokens = len))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("storing the job: {e}")))?;
        span.record("job.id", id);
        span.in_scope(|| info!(job = id, model = %spec.model, tokens = len, "job accepted"));
        let (tx, _) = watch::channel(Snapshot::new(progress(
            id,
            &JobState::Queued,
            &Report::default(),
        )));
        lock(&rt.jobs)?.insert(
            id,
            Watched {
                spec: spec.clone(),
                input_len: len,
                progress: tx,
                span: Some(span),
            },
        );
        rt.apply(Event::Submitted {
            id,
            spec,
            input_len: len,
        })
        .await;
        Ok(id)
    }

    /// Job `id`'s progress until it finishes (the last message has the final phase), each
    /// message with the tokens decoded since the previous one and their text.
    pub(crate) fn follow(
        &self,
        id: JobId,
        caller: &Caller,
    ) -> Result<mpsc::Receiver<Result<proto::JobProgress, Status>>, Status> {
        let mut rx = self.subscribe(id, caller)?;
        let rt = self.rt.clone();
        let model = lock(&rt.jobs)?
            .get(&id)
            .map(|j| j.spec.model.clone())
            .unwrap_or_default();
        let (tx, out) = mpsc::channel(16);
        tokio::spawn(async move {
            let tokenizer = rt.models.get(&model).and_then(|m| m.tokenizer.as_ref());
            let mut run = None;
            let mut sent = 0;
            let mut text = TextStream::default();
            loop {
                let snap = rx.borrow_and_update().clone();
                if run != Some(snap.run) {
                    run = Some(snap.run);
                    sent = 0;
                    text = TextStream::default();
                }
                let mut p = snap.progress;
                let done = phase_finished(p.phase());
                let new = snap.generated.get(sent..).unwrap_or_default();
                sent = snap.generated.len();
                p.new_tokens = new.to_vec();
                if let Some(tok) = tokenizer {
                    let finished = p.phase() == proto::JobPhase::Done;
                    match decode_more(&mut text, tok, new, finished) {
                        Ok(piece) => p.new_text = piece,
                        Err(e) => {
                            let e = Status::internal(format!("decoding job {id}'s tokens: {e}"));
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
                if tx.send(Ok(p)).await.is_err() || done || rx.changed().await.is_err() {
                    break;
                }
            }
        });
        Ok(out)
    }

    /// Job `id`'s output once it is done; its failure or cancellation as an error.
    pub(crate) async fn result(&self, id: JobId, caller: &Caller) -> Result<JobOutput, Status> {
        let mut rx = self.subscribe(id, caller)?;
        let last = rx
            .wait_for(|s| phase_finished(s.progress.phase()))
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?
            .progress
            .clone();
        match last.phase() {
            proto::JobPhase::Done => {}
            proto::JobPhase::Cancelled => {
                return Err(Status::cancelled(format!("job {id} was cancelled")));
            }
            _ => {
                return Err(Status::aborted(format!(
                    "job {id} failed: {}",
                    last.message
                )));
            }
        }
        let store = self.rt.store.clone();
        Ok(
            tokio::task::spawn_blocking(move || store.result::<StoredOutput>(id))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(format!("job {id}'s stored result: {e}")))?
                .ok_or_else(|| Status::internal(format!("job {id} is done but has no result")))?
                .into(),
        )
    }

    /// Cancels job `id` unless it already finished; its phase afterwards. A running job's
    /// phase may still be the running one: its run stops asynchronously, and the phase turns
    /// `Cancelled` when the workers have been told.
    pub(crate) async fn cancel(
        &self,
        id: JobId,
        caller: &Caller,
    ) -> Result<proto::JobPhase, Status> {
        let phase = self.subscribe(id, caller)?.borrow().progress.phase();
        if !phase_finished(phase) {
            self.rt.apply(Event::Cancel(id)).await;
        }
        Ok(self.subscribe(id, caller)?.borrow().progress.phase())
    }

    /// A generate job's tokens as text, special tokens skipped; `None` for a model without a
    /// tokenizer (ids only).
    fn decode(&self, id: JobId, tokens: &[u32]) -> Result<Option<String>, Status> {
        let model = lock(&self.rt.jobs)?
            .get(&id)
            .map(|j| j.spec.model.clone())
            .ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        let Some(tokenizer) = self
            .rt
            .models
            .get(&model)
            .and_then(|m| m.tokenizer.as_ref())
        else {
            return Ok(None);
        };
        tokenizer
            .decode(tokens, true)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding job {id}'s tokens: {e}")))
    }
}

/// The text `new` adds to `text`'s stream, and with `finished` whatever it still held back.
fn decode_more(
    text: &mut TextStream,
    tok: &ringmoe_hf::Tokenizer,
    new: &[u32],
    finished: bool,
) -> Result<String, ringmoe_hf::Error> {
    let mut out = String::new();
    for t in new {
        out.extend(text.push(tok, *t)?);
    }
    if finished {
        out.extend(text.finish(tok)?);
    }
    Ok(out)
}

#[tonic::async_trait]
impl JobService for Coordinator {
    async fn submit_job(
        &self,
        req: Request<Streaming<proto::SubmitJobRequest>>,
    ) -> Result<Response<proto::SubmitJobResponse>, Status> {
        let rt = &self.rt;
        let caller = caller_of(&req)?;
        self.admit_caller(&caller)?;
        // Bounded uploads in flight: streams that trickle or stall cannot pile up.
        let _slot = rt.uploads.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} uploads are in progress, the most this coordinator takes at once \
                 (--max-uploads); try again shortly",
                rt.cfg.max_uploads
            ))
        })?;
        // The job's trace continues the client's, when it sent one.
        let span = crate::telemetry::job_span();
        set_parent(&span, req.metadata());
        let mut stream = req.into_inner();
        let workers = rt.live_workers().await?;
        let Admitted { mut spec, tokens } = admit(
            &mut stream,
            &rt.models,
            &workers,
            rt.cfg.server.max_message_bytes,
            caller.tenant(),
            rt.cfg.upload_idle,
        )
        .instrument(tracing::info_span!(parent: &span, "admission"))
        .await?;
        let len = tokens.len();
        spec.owner = caller.owner();
        let id = self.create_job(spec, tokens, span).await?;
        Ok(Response::new(proto::SubmitJobResponse {
            job_id: id,
            input_tokens: len as u64,
        }))
    }

    type WatchJobStream =
        Pin<Box<dyn Stream<Item = Result<proto::JobProgress, Status>> + Send + 'static>>;

    async fn watch_job(
        &self,
        req: Request<proto::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = caller_of(&req)?;
        let out = self.follow(req.into_inner().job_id, &caller)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    type GetResultStream =
        Pin<Box<dyn Stream<Item = Result<proto::ResultChunk, Status>> + Send + 'static>>;

    async fn get_result(
        &self,
        req: Request<proto::GetResultRequest>,
    ) -> Result<Response<Self::GetResultStream>, Status> {
        let caller = caller_of(&req)?;
        let id = req.into_inner().job_id;
        let output = self.result(id, &caller).await?;
        let mut chunks = output.chunks();
        if let Outcome::Generated { tokens } = &output.outcome
            && let Some(text) = self.decode(id, tokens)?
        {
            chunks.push(proto::ResultChunk {
                part: Some(proto::result_chunk::Part::Text(text)),
            });
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn cancel_job(
        &self,
        req: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::CancelJobResponse>, Status> {
        let caller = caller_of(&req)?;
        let phase = self.cancel(req.into_inner().job_id, &caller).await?;
        Ok(Response::new(proto::CancelJobResponse {
            phase: phase as i32,
        }))
    }

    async fn list_jobs(
        &self,
        req: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        let rt = &self.rt;
        let caller = caller_of(&req)?;
        let mut jobs: Vec<proto::JobSummary> = lock(&rt.jobs)?
            .iter()
            .filter(|(_, j)| caller.sees(j.spec.owner.as_deref()))
            .map(|(id, j)| {
                let p = &j.progress.borrow().progress;
                proto::JobSummary {
                    job_id: *id,
                    model: j.spec.model.clone(),
                    mode: mode_proto(&j.spec.mode) as i32,
                    phase: p.phase,
                    input_tokens: j.input_len as u64,
                    priority: j.spec.priority,
                    message: p.message.clone(),
                }
            })
            .collect();
        jobs.sort_by_key(|j| j.job_id);
        let mut models: Vec<String> = rt.models.keys().cloned().collect();
        models.sort();
        Ok(Response::new(proto::ListJobsResponse {
            jobs,
            models,
            workers: rt.live_workers().await?.len() as u32,
        }))
    }

    async fn get_cluster_status(
        &self,
        req: Request<proto::ClusterStatusRequest>,
    ) -> Result<Response<proto::ClusterStatus>, Status> {
        // Any authenticated client may see the cluster (no job of another tenant shows).
        caller_of(&req)?;
        Ok(Response::new(self.rt.cluster_status()?))
    }
}

#[tonic::async_trait]
impl ClusterService for Coordinator {
    async fn heartbeat(
        &self,
        req: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let certs = req.peer_certs();
        let r = req.into_inner();
        let host = check_worker_addr(&r.worker_addr)?;
        // Under mTLS the worker's certificate (which the cluster CA signed) must name the host
        // it registers: one worker's certificate cannot put another address into the cluster.
        if let Some(certs) = certs {
            let named = certs.first().map_or_else(
                || Err("no certificate was presented".to_string()),
                |c| ringmoe_proto::tls::certificate_names(c, host),
            );
            if let Err(why) = named {
                tracing::warn!(
                    worker = %r.worker_addr,
                    %why,
                    "refused a heartbeat: its certificate does not name its address"
                );
                return Err(Status::unauthenticated(format!(
                    "the heartbeat registers {}, but {why}",
                    r.worker_addr
                )));
            }
        }
        // A budget that cannot hold one token of a served model can hold no job, and would
        // only shrink the cluster's capacity to nothing.
        let one_token = self
            .rt
            .models
            .values()
            .map(|m| m.kv_bytes_per_token())
            .max()
            .unwrap_or(0);
        if r.kv_budget_bytes < one_token.max(1) {
            return Err(Status::invalid_argument(format!(
                "a worker's K/V budget of {} bytes does not hold one token ({one_token} bytes) \
                 of every served model",
                r.kv_budget_bytes
            )));
        }
        let Some(reg) = &self.rt.heartbeats else {
            return Err(Status::failed_precondition(
                "this coordinator's workers register in its membership store (etcd, or in \
                 process under `serve`), not by heartbeat; start the worker with --etcd",
            ));
        };
        let rec = WorkerRecord {
            id: r.worker_addr.clone(),
            addr: r.worker_addr.clone(),
            device: "cpu".into(),
            kv_budget_bytes: r.kv_budget_bytes,
            models: Vec::new(),
            placement: None,
            draining: r.draining,
        };
        // A new worker shows up as a membership event, which the core hears.
        reg.refresh(rec, self.rt.cfg.worker_timeout);
        Ok(Response::new(proto::HeartbeatResponse {
            interval_ms: self.rt.cfg.heartbeat_interval.as_millis() as u64,
        }))
    }
}

/// A heartbeat's `worker_addr` must be `HOST:PORT` (a name or an IP, a port above 0), or a URL
/// of that form: the coordinator will connect to it. Returns the host (brackets of an IPv6
/// address removed).
fn check_worker_addr(addr: &str) -> Result<&str, Status> {
    let bad = |why: &str| {
        Err(Status::invalid_argument(format!(
            "the heartbeat's worker address {addr:?} {why}; it must be HOST:PORT"
        )))
    };
    let hostport = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    let Some((host, port)) = hostport.rsplit_once(':') else {
        return bad("has no port");
    };
    if !port.parse::<u16>().is_ok_and(|p| p > 0) {
        return bad("has no valid port");
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c));
    if !name_ok {
        return bad("has no valid host");
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::check_worker_addr;

    #[test]
    fn worker_addresses_must_be_host_and_port() {
        for ok in [
            "10.0.0.7:7071",
            "worker-3.ringmoe-workers.default.svc:7071",
            "[::1]:7071",
            "http://w:1",
        ] {
            assert!(check_worker_addr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "not an addr!!",
            "host",
            "host:0",
            "host:99999",
            ":7071",
            "a b:1",
        ] {
            let e = check_worker_addr(bad).err().map(|s| s.code());
            assert_eq!(e, Some(tonic::Code::InvalidArgument), "{bad:?}");
        }
    }
}
