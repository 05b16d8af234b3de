//! The coordinator's gRPC services: `JobService` for clients and `ClusterService` for
//! heartbeating workers. Handlers check input, write what must be durable before they answer
//! (a new job), and hand everything else to the core as events.

use std::pin::Pin;
use std::sync::Arc;

use ringmoe_membership::WorkerRecord;
use ringmoe_proto::proto::cluster_service_server::ClusterService;
use ringmoe_proto::proto::job_service_server::JobService;
use ringmoe_proto::proto::{self};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use crate::admission::{Admitted, admit};
use crate::convert::{mode_proto, phase_finished, progress};
use crate::machine::{Event, Report};
use crate::output::{JobOutput, Outcome, StoredOutput};
use crate::runtime::{Runtime, Watched, lock};
use crate::store::{JobId, JobState};

#[derive(Clone)]
pub(crate) struct Coordinator {
    pub rt: Arc<Runtime>,
}

impl Coordinator {
    fn subscribe(&self, id: JobId) -> Result<watch::Receiver<proto::JobProgress>, Status> {
        lock(&self.rt.jobs)?
            .get(&id)
            .map(|j| j.progress.subscribe())
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
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

#[tonic::async_trait]
impl JobService for Coordinator {
    async fn submit_job(
        &self,
        req: Request<Streaming<proto::SubmitJobRequest>>,
    ) -> Result<Response<proto::SubmitJobResponse>, Status> {
        let rt = &self.rt;
        let mut stream = req.into_inner();
        let workers = rt.live_workers().await?;
        let Admitted { spec, tokens } = admit(
            &mut stream,
            &rt.models,
            &workers,
            rt.cfg.server.max_message_bytes,
        )
        .await?;
        let len = tokens.len();
        let store_spec = spec.clone();
        let store = rt.store.clone();
        let id = tokio::task::spawn_blocking(move || store.create(&store_spec, &tokens))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("storing the job: {e}")))?;
        info!(job = id, model = %spec.model, tokens = len, "job accepted");
        let (tx, _) = watch::channel(progress(id, &JobState::Queued, &Report::default()));
        lock(&rt.jobs)?.insert(
            id,
            Watched {
                spec: spec.clone(),
                input_len: len,
                progress: tx,
            },
        );
        rt.apply(Event::Submitted {
            id,
            spec,
            input_len: len,
        })
        .await;
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
        let id = req.into_inner().job_id;
        let mut rx = self.subscribe(id)?;
        let (tx, out) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let p = rx.borrow_and_update().clone();
                let done = phase_finished(p.phase());
                if tx.send(Ok(p)).await.is_err() || done || rx.changed().await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    type GetResultStream =
        Pin<Box<dyn Stream<Item = Result<proto::ResultChunk, Status>> + Send + 'static>>;

    async fn get_result(
        &self,
        req: Request<proto::GetResultRequest>,
    ) -> Result<Response<Self::GetResultStream>, Status> {
        let id = req.into_inner().job_id;
        let mut rx = self.subscribe(id)?;
        let last = rx
            .wait_for(|p| phase_finished(p.phase()))
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?
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
        let output: JobOutput =
            tokio::task::spawn_blocking(move || store.result::<StoredOutput>(id))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(format!("job {id}'s stored result: {e}")))?
                .ok_or_else(|| Status::internal(format!("job {id} is done but has no result")))?
                .into();
        let mut chunks = output.chunks();
        if let Outcome::Generated { tokens } = &output.outcome {
            if let Some(text) = self.decode(id, tokens)? {
                chunks.push(proto::ResultChunk {
                    part: Some(proto::result_chunk::Part::Text(text)),
                });
            }
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn cancel_job(
        &self,
        req: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::CancelJobResponse>, Status> {
        let id = req.into_inner().job_id;
        let phase = self.subscribe(id)?.borrow().phase();
        if !phase_finished(phase) {
            self.rt.apply(Event::Cancel(id)).await;
        }
        let phase = self.subscribe(id)?.borrow().phase();
        Ok(Response::new(proto::CancelJobResponse {
            phase: phase as i32,
        }))
    }

    async fn list_jobs(
        &self,
        _req: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        let rt = &self.rt;
        let mut jobs: Vec<proto::JobSummary> = lock(&rt.jobs)?
            .iter()
            .map(|(id, j)| {
                let p = j.progress.borrow();
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
}

#[tonic::async_trait]
impl ClusterService for Coordinator {
    async fn heartbeat(
        &self,
        req: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        if r.worker_addr.is_empty() {
            return Err(Status::invalid_argument(
                "a heartbeat must say where the worker listens",
            ));
        }
        let Some(reg) = &self.rt.heartbeats else {
            return Err(Status::failed_precondition(
                "this coordinator's workers register in etcd; start the worker with --etcd",
            ));
        };
        let rec = WorkerRecord {
            id: r.worker_addr.clone(),
            addr: r.worker_addr.clone(),
            device: "cpu".into(),
            kv_budget_bytes: r.kv_budget_bytes,
            models: Vec::new(),
            placement: None,
        };
        // A new worker shows up as a membership event, which the core hears.
        reg.refresh(rec, self.rt.cfg.worker_timeout);
        Ok(Response::new(proto::HeartbeatResponse {
            interval_ms: self.rt.cfg.heartbeat_interval.as_millis() as u64,
        }))
    }
}
