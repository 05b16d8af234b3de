//! `ringmoe coordinator`: accepts jobs ([`JobService`]), keeps them in the [`JobStore`], and
//! drives them over the live workers.
//!
//! Scheduling: **one job at a time over every live worker**; the rest wait in the queue, highest
//! priority first, then in submission order. A long job wants all the cluster's K/V memory and
//! compute, and running jobs side by side would halve both for each.
//!
//! A job's run: place the model's experts over the P live workers (the placement the workers
//! hold already when it covers exactly them, else a new contiguous one with the next version),
//! have every worker load and acknowledge it (published in the membership store and acknowledged
//! in the workers' records; or by `LoadModel` when workers heartbeat here), bind each worker's
//! data-plane port, stream each its zigzag shard, tell them their peers and start them; then follow rank 0's progress, collect the
//! results, persist them, and mark the job done. Every state transition is persisted before it is
//! published. On restart, the store's running jobs come back queued and run again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringmoe_model::{ModelConfig, Tokenizer};
use ringmoe_parallel::{Placement, ShardPlan, Sharding};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{Instrument, error, info, info_span, warn};

use crate::convert::{attention_proto, mode_proto, phase_finished, phase_of, spec_from_proto};
use crate::membership::{
    Election, MemberEvent, Membership, MemoryMembership, PlacementRecord, WorkerRecord,
};
use crate::proto::cluster_service_server::{ClusterService, ClusterServiceServer};
use crate::proto::job_service_server::{JobService, JobServiceServer};
use crate::proto::worker_service_client::WorkerServiceClient;
use crate::proto::{self, result_chunk, shard_chunk, submit_job_request, worker_event};
use crate::server::{self, ServerOptions};
use crate::store::{JobId, JobMode, JobSpec, JobState, JobStore};
use crate::{ClusterError, lock};

/// A model the coordinator serves: its cluster name and its directory, which must be the same
/// path on every worker (a shared volume in Kubernetes, the same disk on one machine).
#[derive(Debug, Clone)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The job store directory.
    pub store_dir: PathBuf,
    pub models: Vec<ModelEntry>,
    pub server: ServerOptions,
    /// Jobs wait until at least this many workers are live.
    pub min_workers: usize,
    /// How often workers beat, and how long without a beat makes a worker dead.
    pub heartbeat_interval: Duration,
    pub worker_timeout: Duration,
    /// Where workers register (etcd, or an in-process membership shared with `serve`'s
    /// workers). `None`: the coordinator's own registry, fed by `ClusterService.Heartbeat`.
    pub membership: Option<Arc<dyn Membership>>,
    /// Times a job re-runs after losing a worker before it fails.
    pub max_retries: u32,
    /// Coordinator replicas: when set, this one serves and schedules only while it leads; a
    /// standby holds its port but answers nothing until elected, then reloads the job store.
    pub election: Option<Arc<dyn Election>>,
    /// Leadership lease TTL: how long after a leader dies a standby takes over.
    pub leader_ttl: Duration,
    /// How long workers may take to load and acknowledge a placement.
    pub load_timeout: Duration,
}

impl CoordinatorConfig {
    pub fn new(store_dir: PathBuf, models: Vec<ModelEntry>) -> Self {
        Self {
            store_dir,
            models,
            server: ServerOptions::default(),
            min_workers: 1,
            heartbeat_interval: Duration::from_millis(500),
            worker_timeout: Duration::from_secs(3),
            membership: None,
            max_retries: 3,
            election: None,
            leader_ttl: Duration::from_secs(2),
            load_timeout: Duration::from_secs(600),
        }
    }
}

/// What the coordinator knows of a model without loading its weights.
struct ServedModel {
    path: PathBuf,
    config: ModelConfig,
    tokenizer: Option<Tokenizer>,
    eos: Vec<u32>,
}

impl ServedModel {
    /// Bytes of K/V one token costs (f32 K and V in every layer).
    fn kv_bytes_per_token(&self) -> u64 {
        let c = &self.config;
        (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4) as u64
    }
}

/// A job as the running coordinator tracks it.
struct JobEntry {
    spec: JobSpec,
    input_len: usize,
    progress: watch::Sender<proto::JobProgress>,
    cancel: Arc<AtomicBool>,
}

struct Shared {
    store: JobStore,
    models: HashMap<String, ServedModel>,
    membership: Arc<dyn Membership>,
    /// The registry heartbeats feed, when workers heartbeat here instead of registering in etcd.
    heartbeats: Option<MemoryMembership>,
    /// Workers found dead after a failed job, left out until membership next says anything of
    /// them (re-registered, or removed), or for a minute.
    excluded: Mutex<HashMap<String, Instant>>,
    jobs: Mutex<HashMap<JobId, JobEntry>>,
    /// The placement published last per model.
    placements: Mutex<HashMap<String, PlacementRecord>>,
    /// Wakes the scheduler: a job arrived, a worker joined, a job was cancelled.
    wake: Notify,
    cfg: CoordinatorConfig,
}

/// Tokens `workers` can hold the K/V of for `model`: zigzag shards are equal to within a token, so
/// the smallest budget bounds every shard.
fn capacity_of(model: &ServedModel, workers: &[WorkerRecord]) -> (u64, usize) {
    let per = model.kv_bytes_per_token().max(1);
    let min = workers
        .iter()
        .map(|w| w.kv_budget_bytes / per)
        .min()
        .unwrap_or(0);
    (min * workers.len() as u64, workers.len())
}

fn progress_of(id: JobId, state: &JobState) -> proto::JobProgress {
    let mut p = proto::JobProgress {
        job_id: id,
        phase: phase_of(state) as i32,
        ..Default::default()
    };
    match state {
        JobState::Prefill { layer, layers } => {
            p.layer = *layer;
            p.layers = *layers;
        }
        JobState::Failed { message } => p.message = message.clone(),
        _ => {}
    }
    p
}

impl Shared {
    /// Live workers, sorted by id (the rank order of the next job).
    async fn live_workers(&self) -> Result<Vec<WorkerRecord>, Status> {
        let all = self
            .membership
            .list()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let excluded = lock(&self.excluded)?;
        Ok(all
            .into_iter()
            .filter(|w| {
                excluded
                    .get(&w.id)
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
            })
            .collect())
    }

    /// Tokens the live workers can hold the K/V of for `model`, and how many workers that is.
    async fn kv_capacity(&self, model: &ServedModel) -> Result<(u64, usize), Status> {
        let w = self.live_workers().await?;
        Ok(capacity_of(model, &w))
    }

    /// Persists `state` for `id`, then publishes it with `progress` filled in.
    fn transition(
        &self,
        id: JobId,
        state: JobState,
        fill: impl FnOnce(&mut proto::JobProgress),
    ) -> Result<(), ClusterError> {
        self.store.set_state(id, state.clone())?;
        let mut p = progress_of(id, &state);
        fill(&mut p);
        if let Ok(jobs) = self.jobs.lock() {
            if let Some(j) = jobs.get(&id) {
                j.progress.send_replace(p);
            }
        }
        Ok(())
    }

    fn next_job(&self) -> Option<JobId> {
        let jobs = self.jobs.lock().ok()?;
        jobs.iter()
            .filter(|(_, j)| j.progress.borrow().phase == proto::JobPhase::Queued as i32)
            .max_by_key(|(id, j)| (j.spec.priority, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }
}

#[derive(Clone)]
struct Coordinator {
    shared: Arc<Shared>,
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// The upload of one job, checked as it arrives.
struct Upload<'a> {
    model: &'a ServedModel,
    tokens: Vec<u32>,
    text: Vec<u8>,
    /// Most tokens (or text bytes) accepted before the job is known to be too long.
    limit: u64,
}

impl Upload<'_> {
    fn add_tokens(&mut self, ids: Vec<u32>) -> Result<(), Status> {
        if !self.text.is_empty() {
            return Err(invalid("a job's input is token ids or text, not both"));
        }
        let vocab = self.model.config.vocab_size;
        if let Some((i, t)) = ids.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
            return Err(invalid(format!(
                "token id {t} at position {} is outside the model's vocabulary of {vocab} ids",
                self.tokens.len() + i
            )));
        }
        self.tokens.extend(ids);
        Ok(())
    }

    fn add_text(&mut self, bytes: Vec<u8>) -> Result<(), Status> {
        if !self.tokens.is_empty() {
            return Err(invalid("a job's input is token ids or text, not both"));
        }
        self.text.extend(bytes);
        // A token is at least one byte: many more bytes than tokens fit is hopeless, but a few
        // bytes per token is normal, so only refuse far past the limit.
        if self.text.len() as u64 > self.limit.saturating_mul(16) {
            return Err(invalid(format!(
                "the input text passed {} bytes, far more than the cluster's K/V capacity of {} tokens",
                self.text.len(),
                self.limit
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl JobService for Coordinator {
    async fn submit_job(
        &self,
        req: Request<Streaming<proto::SubmitJobRequest>>,
    ) -> Result<Response<proto::SubmitJobResponse>, Status> {
        let sh = &self.shared;
        let mut stream = req.into_inner();
        let limit_msg = |e: Status| -> Status {
            if e.code() == Code::OutOfRange || e.message().contains("too large") {
                invalid(format!(
                    "a message exceeded the size limit of {} bytes (--max-message-bytes): {}; \
                     send the input in smaller chunks",
                    sh.cfg.server.max_message_bytes,
                    e.message()
                ))
            } else {
                invalid(format!("the upload stream broke: {}", e.message()))
            }
        };
        let first = stream.message().await.map_err(limit_msg)?;
        let Some(proto::SubmitJobRequest {
            part: Some(submit_job_request::Part::Spec(pspec)),
        }) = first
        else {
            return Err(invalid(
                "a job upload starts with the job spec (the spec is missing)",
            ));
        };
        let spec = spec_from_proto(&pspec).map_err(invalid)?;
        let model = sh.models.get(&spec.model).ok_or_else(|| {
            let mut known: Vec<&str> = sh.models.keys().map(String::as_str).collect();
            known.sort_unstable();
            invalid(format!(
                "unknown model '{}'; this coordinator serves: {}",
                spec.model,
                known.join(", ")
            ))
        })?;
        let extra = match spec.mode {
            JobMode::Generate { max_new_tokens, .. } => u64::from(max_new_tokens),
            JobMode::Score => 0,
        };
        let (capacity, workers) = sh.kv_capacity(model).await?;
        // With no worker yet the job queues; its length is checked when it runs.
        let limit = if workers == 0 {
            u64::MAX
        } else {
            capacity.saturating_sub(extra)
        };
        let mut up = Upload {
            model,
            tokens: Vec::new(),
            text: Vec::new(),
            limit,
        };
        let capacity_error = |n: usize| {
            invalid(format!(
                "the job needs K/V for {} tokens ({n} input + {extra} to generate) but the cluster \
                 holds {capacity} ({workers} workers; {} bytes per token for {})",
                n as u64 + extra,
                model.kv_bytes_per_token(),
                spec.model
            ))
        };
        while let Some(m) = stream.message().await.map_err(limit_msg)? {
            match m.part {
                Some(submit_job_request::Part::Tokens(t)) => up.add_tokens(t.ids),
                Some(submit_job_request::Part::Text(b)) => up.add_text(b),
                Some(submit_job_request::Part::Spec(_)) => Err(invalid("a second job spec")),
                None => Err(invalid("an empty upload message")),
            }?;
            // Refuse as soon as the upload outgrows the cluster, not after buffering all of it.
            if up.tokens.len() as u64 > limit {
                return Err(capacity_error(up.tokens.len()));
            }
        }
        let declared = pspec.input_length;
        let got = if up.text.is_empty() {
            up.tokens.len()
        } else {
            up.text.len()
        } as u64;
        if declared != 0 && declared != got {
            let unit = if up.text.is_empty() {
                "tokens"
            } else {
                "bytes"
            };
            return Err(invalid(format!(
                "the spec declared {declared} {unit} of input but the stream ended after {got}"
            )));
        }
        let tokens = if up.text.is_empty() {
            up.tokens
        } else {
            let text = std::str::from_utf8(&up.text).map_err(|e| {
                invalid(format!(
                    "the input text is not valid UTF-8 (at byte {})",
                    e.valid_up_to()
                ))
            })?;
            let tok = model.tokenizer.as_ref().ok_or_else(|| {
                invalid(format!(
                    "model '{}' has no tokenizer.json; send token ids instead of text",
                    spec.model
                ))
            })?;
            tok.encode(text, true)
                .map_err(|e| invalid(format!("tokenizing the input: {e}")))?
        };
        let need = if matches!(spec.mode, JobMode::Score) {
            2
        } else {
            1
        };
        if tokens.len() < need {
            return Err(invalid(format!(
                "the job has {} input tokens; {} needs at least {need}",
                tokens.len(),
                if need == 2 { "scoring" } else { "generation" }
            )));
        }
        if workers > 0 && tokens.len() as u64 > limit {
            return Err(capacity_error(tokens.len()));
        }
        let len = tokens.len();
        let store_spec = spec.clone();
        let id = {
            let sh = self.shared.clone();
            tokio::task::spawn_blocking(move || sh.store.create(&store_spec, &tokens))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(format!("storing the job: {e}")))?
        };
        info!(job = id, model = %spec.model, tokens = len, "job accepted");
        let (progress, _) = watch::channel(progress_of(id, &JobState::Queued));
        lock(&sh.jobs)?.insert(
            id,
            JobEntry {
                spec,
                input_len: len,
                progress,
                cancel: Arc::new(AtomicBool::new(false)),
            },
        );
        sh.wake.notify_one();
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
        let result = self
            .shared
            .store
            .result(id)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::internal(format!("job {id} is done but has no result")))?;
        let chunks = result_chunks(&result)
            .map_err(|e| Status::internal(format!("job {id}'s stored result: {e}")))?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn cancel_job(
        &self,
        req: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::CancelJobResponse>, Status> {
        let id = req.into_inner().job_id;
        let sh = &self.shared;
        let (phase, cancel) = {
            let jobs = lock(&sh.jobs)?;
            let j = jobs
                .get(&id)
                .ok_or_else(|| Status::not_found(format!("no job {id}")))?;
            (j.progress.borrow().phase(), j.cancel.clone())
        };
        if phase_finished(phase) {
            return Ok(Response::new(proto::CancelJobResponse {
                phase: phase as i32,
            }));
        }
        cancel.store(true, Ordering::Relaxed);
        if phase == proto::JobPhase::Queued {
            sh.transition(id, JobState::Cancelled, |_| {})
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        sh.wake.notify_waiters();
        let phase = self.subscribe(id)?.borrow().phase();
        Ok(Response::new(proto::CancelJobResponse {
            phase: phase as i32,
        }))
    }

    async fn list_jobs(
        &self,
        _req: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        let sh = &self.shared;
        let mut jobs: Vec<proto::JobSummary> = lock(&sh.jobs)?
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
        let mut models: Vec<String> = sh.models.keys().cloned().collect();
        models.sort();
        Ok(Response::new(proto::ListJobsResponse {
            jobs,
            models,
            workers: sh.live_workers().await?.len() as u32,
        }))
    }
}

impl Coordinator {
    fn subscribe(&self, id: JobId) -> Result<watch::Receiver<proto::JobProgress>, Status> {
        lock(&self.shared.jobs)?
            .get(&id)
            .map(|j| j.progress.subscribe())
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
    }
}

/// Values per result chunk.
const RESULT_CHUNK: usize = 64 * 1024;

fn result_chunks(v: &serde_json::Value) -> Result<Vec<proto::ResultChunk>, String> {
    let nums = |key: &str| -> Option<Vec<f64>> {
        v.get(key)?
            .as_array()?
            .iter()
            .map(serde_json::Value::as_f64)
            .collect()
    };
    if let Some(t) = nums("tokens") {
        let ids: Vec<u32> = t.into_iter().map(|x| x as u32).collect();
        Ok(ids
            .chunks(RESULT_CHUNK)
            .map(|c| proto::ResultChunk {
                part: Some(result_chunk::Part::Tokens(proto::TokenIds {
                    ids: c.to_vec(),
                })),
            })
            .collect())
    } else if let Some(n) = nums("nll") {
        let nll: Vec<f32> = n.into_iter().map(|x| x as f32).collect();
        Ok(nll
            .chunks(RESULT_CHUNK)
            .enumerate()
            .map(|(i, c)| proto::ResultChunk {
                part: Some(result_chunk::Part::Scores(proto::ScoreChunk {
                    offset: (i * RESULT_CHUNK) as u64,
                    nll: c.to_vec(),
                })),
            })
            .collect())
    } else {
        Err("neither tokens nor nll".into())
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
            return Err(invalid("a heartbeat must say where the worker listens"));
        }
        let Some(reg) = &self.shared.heartbeats else {
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
        if reg.refresh(rec, self.shared.cfg.worker_timeout) {
            self.shared.wake.notify_one();
        }
        Ok(Response::new(proto::HeartbeatResponse {
            interval_ms: self.shared.cfg.heartbeat_interval.as_millis() as u64,
        }))
    }
}

/// Starts the coordinator on `listener` and serves until `shutdown` resolves.
pub async fn run_coordinator(
    listener: tokio::net::TcpListener,
    cfg: CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ClusterError> {
    let leadership = match &cfg.election {
        Some(e) => {
            let me = listener
                .local_addr()
                .map_err(ClusterError::io("local_addr"))?
                .to_string();
            info!("standby: campaigning for leadership");
            let l = e
                .campaign(me, cfg.leader_ttl)
                .await
                .map_err(|e| ClusterError::Server(format!("leader election: {e}")))?;
            info!("elected leader");
            Some(l)
        }
        None => None,
    };
    let mut models = HashMap::new();
    for m in &cfg.models {
        let bad = |msg: String| ClusterError::Model {
            name: m.name.clone(),
            msg,
        };
        let config = ModelConfig::from_dir(&m.path).map_err(|e| bad(e.to_string()))?;
        let tok_path = m.path.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(Tokenizer::from_file(&tok_path).map_err(|e| bad(e.to_string()))?)
        } else {
            None
        };
        let mut eos = config.eos_token_ids.clone();
        if let Ok(Some(g)) = ringmoe_model::GenerationConfig::from_dir(&m.path) {
            eos.extend(g.eos_token_ids);
        }
        models.insert(
            m.name.clone(),
            ServedModel {
                path: m.path.clone(),
                config,
                tokenizer,
                eos,
            },
        );
    }
    let dir = cfg.store_dir.clone();
    let (store, recovered) = tokio::task::spawn_blocking(move || JobStore::open(&dir))
        .await
        .map_err(|e| ClusterError::Server(e.to_string()))??;
    info!(
        jobs = recovered.jobs.len(),
        requeued = ?recovered.requeued,
        "job store opened"
    );
    let mut jobs = HashMap::new();
    for j in recovered.jobs {
        let (progress, _) = watch::channel(progress_of(j.id, &j.state));
        jobs.insert(
            j.id,
            JobEntry {
                spec: j.spec,
                input_len: j.input_len,
                progress,
                cancel: Arc::new(AtomicBool::new(false)),
            },
        );
    }
    let max = cfg.server.max_message_bytes;
    let (membership, heartbeats): (Arc<dyn Membership>, _) = match &cfg.membership {
        Some(m) => (m.clone(), None),
        None => {
            let m = MemoryMembership::new(Duration::from_millis(100));
            (Arc::new(m.clone()), Some(m))
        }
    };
    let shared = Arc::new(Shared {
        store,
        models,
        membership,
        heartbeats,
        excluded: Mutex::new(HashMap::new()),
        jobs: Mutex::new(jobs),
        placements: Mutex::new(HashMap::new()),
        wake: Notify::new(),
        cfg,
    });
    let c = Coordinator {
        shared: shared.clone(),
    };
    let routes = tonic::service::Routes::new(
        JobServiceServer::new(c.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
    .add_service(
        ClusterServiceServer::new(c)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    let watcher = tokio::spawn(follow_membership(shared.clone()));
    let scheduler = tokio::spawn(schedule(shared));
    let names = ["ringmoe.v1.JobService", "ringmoe.v1.ClusterService"];
    let lost = async move {
        match leadership {
            Some(mut l) => l.lost().await,
            None => std::future::pending().await,
        }
    };
    let res = tokio::select! {
        r = server::serve(listener, routes, &names, shutdown) => r,
        _ = lost => Err(ClusterError::Server(
            "lost coordinator leadership; exiting so that no job runs twice".into(),
        )),
    };
    scheduler.abort();
    watcher.abort();
    res
}

/// Logs membership changes and wakes the scheduler on them; re-watches when the watch ends
/// (etcd restarted, say).
async fn follow_membership(sh: Arc<Shared>) {
    loop {
        match sh.membership.watch().await {
            Ok((now, mut rx)) => {
                info!(workers = now.len(), "membership");
                sh.wake.notify_one();
                while let Some(ev) = rx.recv().await {
                    let id = match &ev {
                        MemberEvent::Put(w) => {
                            info!(worker = %w.id, addr = %w.addr, "worker joined or updated");
                            w.id.clone()
                        }
                        MemberEvent::Removed(id) => {
                            info!(worker = %id, "worker left");
                            id.clone()
                        }
                    };
                    if let Ok(mut ex) = sh.excluded.lock() {
                        ex.remove(&id);
                    }
                    sh.wake.notify_one();
                }
                warn!("membership watch ended; watching again");
            }
            Err(e) => warn!(error = %e, "membership unavailable"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs queued jobs one at a time, whenever enough workers are live.
async fn schedule(sh: Arc<Shared>) {
    loop {
        let ready = sh
            .live_workers()
            .await
            .map(|w| w.len() >= sh.cfg.min_workers.max(1))
            .unwrap_or(false);
        if ready {
            if let Some(id) = sh.next_job() {
                let span = info_span!("job", id);
                if let Err(e) = run_job(&sh, id).instrument(span).await {
                    error!(job = id, error = %e, "job store write failed");
                }
                continue;
            }
        }
        tokio::select! {
            _ = sh.wake.notified() => {}
            _ = tokio::time::sleep(sh.cfg.heartbeat_interval) => {}
        }
    }
}

/// Runs one job to a finished state; only a job store failure is an error here (a failing job
/// is a `Failed` state).
async fn run_job(sh: &Arc<Shared>, id: JobId) -> Result<(), ClusterError> {
    let (spec, cancel) = {
        let jobs = sh
            .jobs
            .lock()
            .map_err(|_| ClusterError::Server("job table poisoned".into()))?;
        let Some(j) = jobs.get(&id) else {
            return Ok(());
        };
        (j.spec.clone(), j.cancel.clone())
    };
    if cancel.load(Ordering::Relaxed) {
        return Ok(()); // cancelled while queued: CancelJob already recorded it
    }
    sh.transition(id, JobState::Loading, |_| {})?;
    let started = Instant::now();
    let mut attempt = 0;
    let outcome = loop {
        let workers = match sh.live_workers().await {
            Ok(w) if !w.is_empty() => w,
            Ok(_) => {
                // Every worker was lost: wait for one (a replacement pod, say).
                tokio::select! {
                    _ = sh.wake.notified() => {}
                    _ = tokio::time::sleep(sh.cfg.heartbeat_interval) => {}
                }
                if cancel.load(Ordering::Relaxed) {
                    break Err(format!("job {id} was cancelled"));
                }
                continue;
            }
            Err(e) => break Err(e.message().to_string()),
        };
        let failure = match drive(sh, id, &spec, &cancel, &workers).await {
            Ok(v) => break Ok(v),
            Err(f) => f,
        };
        if cancel.load(Ordering::Relaxed) || !failure.retry {
            break Err(failure.message);
        }
        // Which workers are gone? Probe them; a failure with every worker alive is the job's
        // own, and re-running it would fail again.
        let dead = dead_workers(sh, &workers).await;
        if dead.is_empty() || attempt >= sh.cfg.max_retries {
            break Err(if dead.is_empty() {
                failure.message
            } else {
                format!("{} (gave up after {attempt} retries)", failure.message)
            });
        }
        attempt += 1;
        if let Ok(mut ex) = sh.excluded.lock() {
            for d in &dead {
                ex.insert(d.clone(), Instant::now());
            }
        }
        if let Some(hb) = &sh.heartbeats {
            for d in &dead {
                hb.remove(d);
            }
        }
        let reason = format!("lost worker(s) {}: {}", dead.join(", "), failure.message);
        warn!(attempt, %reason, "retrying the job");
        sh.transition(
            id,
            JobState::Retrying {
                attempt,
                reason: reason.clone(),
            },
            |p| p.message = reason,
        )?;
    };
    let state = match outcome {
        Ok(result) => {
            sh.store.put_result(id, &result)?;
            info!(secs = started.elapsed().as_secs_f64(), "job done");
            JobState::Done
        }
        Err(_) if cancel.load(Ordering::Relaxed) => {
            info!("job cancelled");
            JobState::Cancelled
        }
        Err(message) => {
            warn!(%message, "job failed");
            JobState::Failed { message }
        }
    };
    sh.transition(id, state, |_| {})
}

/// Workers of `workers` that do not answer within two seconds.
async fn dead_workers(sh: &Shared, workers: &[WorkerRecord]) -> Vec<String> {
    let max = sh.cfg.server.max_message_bytes;
    let mut set = JoinSet::new();
    for w in workers {
        let (id, addr) = (w.id.clone(), w.addr.clone());
        set.spawn(async move {
            let alive = tokio::time::timeout(Duration::from_secs(2), async {
                let mut c = connect(&addr, max).await.ok()?;
                c.report_load(proto::ReportLoadRequest {}).await.ok()
            })
            .await
            .ok()
            .flatten()
            .is_some();
            (id, alive)
        });
    }
    let mut dead = Vec::new();
    while let Some(Ok((id, alive))) = set.join_next().await {
        if !alive {
            dead.push(id);
        }
    }
    dead.sort();
    dead
}

/// Why a run of a job failed, and whether losing a worker may explain it.
struct Failure {
    message: String,
    retry: bool,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self {
            message,
            retry: true,
        }
    }
}

fn fatal(message: String) -> Failure {
    Failure {
        message,
        retry: false,
    }
}

type WorkerClient = WorkerServiceClient<Channel>;

async fn connect(addr: &str, max: usize) -> Result<WorkerClient, String> {
    let c = WorkerServiceClient::connect(server::http_url(addr))
        .await
        .map_err(|e| format!("connecting to worker {addr}: {e}"))?;
    Ok(c.max_decoding_message_size(max)
        .max_encoding_message_size(max))
}

/// Runs `f` on every worker concurrently; results by rank, or the first error.
async fn on_every<T, F, Fut>(clients: &[WorkerClient], f: F) -> Result<Vec<T>, String>
where
    T: Send + 'static,
    F: Fn(usize, WorkerClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for (r, c) in clients.iter().enumerate() {
        let fut = f(r, c.clone());
        set.spawn(async move { (r, fut.await) });
    }
    let mut out: Vec<Option<T>> = (0..clients.len()).map(|_| None).collect();
    while let Some(j) = set.join_next().await {
        let (r, v) = j.map_err(|e| e.to_string())?;
        out[r] = Some(v?);
    }
    out.into_iter()
        .map(|v| v.ok_or_else(|| "a worker task vanished".to_string()))
        .collect()
}

/// Places `name`'s experts over `workers` (in rank order) and returns the placement once every
/// worker holds it. The last published placement is reused when it covers exactly these
/// workers; otherwise a contiguous one gets the next version. With a membership store the
/// placement is published there and each worker acknowledges it in its record; with
/// heartbeating workers, `LoadModel` carries it and its answer is the acknowledgement.
async fn place(
    sh: &Arc<Shared>,
    name: &str,
    model: &ServedModel,
    workers: &[WorkerRecord],
    clients: &[WorkerClient],
    cancel: &AtomicBool,
) -> Result<Placement, Failure> {
    let cfg = &model.config;
    let ids: Vec<String> = workers.iter().map(|w| w.id.clone()).collect();
    let cached = lock(&sh.placements)
        .map_err(|e| fatal(e.message().to_string()))?
        .get(name)
        .cloned();
    let last = match cached {
        Some(r) => Some(r),
        // A new leader continues the versions the store holds (and reuses what workers loaded).
        None if sh.heartbeats.is_none() => sh
            .membership
            .placement(name)
            .await
            .map_err(|e| Failure::from(e.to_string()))?,
        None => None,
    };
    let reuse = last
        .as_ref()
        .filter(|r| r.workers == ids && r.path == model.path.display().to_string())
        .and_then(|r| Placement::from_json(&r.placement).ok())
        .filter(|p| p.check_model(cfg, ids.len()).is_ok());
    let (placement, fresh) = match reuse {
        Some(p) => (p, false),
        None => {
            let mut p = Placement::contiguous(cfg.num_layers, cfg.moe.num_experts, ids.len())
                .map_err(|e| {
                    fatal(format!(
                        "placing {} experts on {} workers: {e}",
                        cfg.moe.num_experts,
                        ids.len()
                    ))
                })?;
            p.version = last.as_ref().map_or(0, |r| r.version) + 1;
            (p, true)
        }
    };
    let rec = PlacementRecord {
        model: name.to_string(),
        version: placement.version,
        path: model.path.display().to_string(),
        workers: ids,
        placement: placement.to_json(),
    };
    if sh.heartbeats.is_some() {
        on_every(clients, |r, mut c| {
            let req = proto::LoadModelRequest {
                model: rec.model.clone(),
                path: rec.path.clone(),
                placement_json: rec.placement.clone(),
                worker_index: r as u32,
            };
            async move {
                c.load_model(req)
                    .await
                    .map_err(|e| format!("worker {r} loading the model: {}", e.message()))
            }
        })
        .await?;
    } else {
        if fresh {
            info!(
                model = name,
                version = rec.version,
                "publishing a placement"
            );
            sh.membership
                .publish_placement(&rec)
                .await
                .map_err(|e| Failure::from(e.to_string()))?;
        }
        await_acks(sh, &rec, cancel).await?;
    }
    if let Ok(mut m) = sh.placements.lock() {
        m.insert(name.to_string(), rec);
    }
    Ok(placement)
}

/// Waits until every worker of `rec` acknowledged its version in its membership record.
async fn await_acks(
    sh: &Shared,
    rec: &PlacementRecord,
    cancel: &AtomicBool,
) -> Result<(), Failure> {
    let deadline = Instant::now() + sh.cfg.load_timeout;
    loop {
        let live = sh
            .membership
            .list()
            .await
            .map_err(|e| Failure::from(e.to_string()))?;
        let mut pending = Vec::new();
        for (rank, id) in rec.workers.iter().enumerate() {
            let Some(w) = live.iter().find(|w| &w.id == id) else {
                return Err(Failure::from(format!(
                    "worker {id} left while loading placement version {} of '{}'",
                    rec.version, rec.model
                )));
            };
            match &w.placement {
                Some(a) if a.model == rec.model && a.version == rec.version && a.rank == rank => {
                    if let Some(e) = &a.error {
                        return Err(fatal(format!(
                            "worker {id} cannot load placement version {} of '{}': {e}",
                            rec.version, rec.model
                        )));
                    }
                }
                _ => pending.push(id.as_str()),
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(fatal("cancelled while loading".into()));
        }
        if Instant::now() >= deadline {
            return Err(Failure::from(format!(
                "worker(s) {} did not acknowledge placement version {} of '{}' within {:?}",
                pending.join(", "),
                rec.version,
                rec.model,
                sh.cfg.load_timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Tokens per shard chunk on the wire.
const SHARD_CHUNK: usize = 64 * 1024;

/// The job's run over the workers; the error is the job's failure message.
async fn drive(
    sh: &Arc<Shared>,
    id: JobId,
    spec: &JobSpec,
    cancel: &AtomicBool,
    workers: &[WorkerRecord],
) -> Result<serde_json::Value, Failure> {
    let model = sh.models.get(&spec.model).ok_or_else(|| {
        fatal(format!(
            "the coordinator no longer serves model '{}'",
            spec.model
        ))
    })?;
    let cfg = &model.config;
    let tokens = {
        let sh = sh.clone();
        tokio::task::spawn_blocking(move || sh.store.input(id))
            .await
            .map_err(|e| fatal(e.to_string()))?
            .map_err(|e| fatal(e.to_string()))?
    };
    let len = tokens.len();
    let extra = match spec.mode {
        JobMode::Generate { max_new_tokens, .. } => max_new_tokens as u64,
        JobMode::Score => 0,
    };
    let (capacity, p) = capacity_of(model, workers);
    if len as u64 + extra > capacity {
        return Err(fatal(format!(
            "the job needs K/V for {} tokens but the {p} live workers hold {capacity}",
            len as u64 + extra
        )));
    }
    let max = sh.cfg.server.max_message_bytes;
    let mut clients = Vec::with_capacity(p);
    for w in workers {
        clients.push(connect(&w.addr, max).await?);
    }
    info!(workers = p, tokens = len, "loading");
    let placement = place(sh, &spec.model, model, workers, &clients, cancel).await?;
    let (name, version) = (spec.model.clone(), placement.version);
    let peers = on_every(&clients, |r, mut c| {
        let model = name.clone();
        async move {
            c.prepare_job(proto::PrepareJobRequest {
                job_id: id,
                model,
                placement_version: version,
            })
            .await
            .map(|r| r.into_inner().data_addr)
            .map_err(|e| format!("worker {r} preparing: {}", e.message()))
        }
    })
    .await?;
    let plan = ShardPlan::new(len, p, Sharding::Zigzag).map_err(|e| e.to_string())?;
    let score = matches!(spec.mode, JobMode::Score);
    let tokens = Arc::new(tokens);
    let plan = Arc::new(plan);
    on_every(&clients, |r, mut c| {
        let (tokens, plan) = (tokens.clone(), plan.clone());
        async move {
            let pos = plan.positions(r);
            let mut chunks = vec![proto::ShardChunk {
                part: Some(shard_chunk::Part::Header(proto::ShardHeader {
                    job_id: id,
                    rank: r as u32,
                    world: plan.world() as u32,
                    sequence_len: tokens.len() as u64,
                })),
            }];
            let mine: Vec<u32> = pos.iter().map(|&q| tokens[q]).collect();
            for c in mine.chunks(SHARD_CHUNK) {
                chunks.push(proto::ShardChunk {
                    part: Some(shard_chunk::Part::Tokens(proto::TokenIds {
                        ids: c.to_vec(),
                    })),
                });
            }
            if score {
                let targets: Vec<u32> = pos
                    .iter()
                    .map(|&q| tokens.get(q + 1).copied().unwrap_or(u32::MAX))
                    .collect();
                for c in targets.chunks(SHARD_CHUNK) {
                    chunks.push(proto::ShardChunk {
                        part: Some(shard_chunk::Part::Targets(proto::TokenIds {
                            ids: c.to_vec(),
                        })),
                    });
                }
            }
            c.send_shard(tokio_stream::iter(chunks))
                .await
                .map_err(|e| format!("worker {r} receiving its shard: {}", e.message()))
        }
    })
    .await?;
    let (mode, max_new_tokens, sampling) = match spec.mode {
        JobMode::Generate {
            max_new_tokens,
            temperature,
            top_p,
            seed,
        } => (
            proto::JobMode::Generate,
            max_new_tokens,
            Some(proto::Sampling {
                temperature,
                top_p,
                seed,
            }),
        ),
        JobMode::Score => (proto::JobMode::Score, 0, None),
    };
    let run = proto::RunJobRequest {
        job_id: id,
        peers,
        mode: mode as i32,
        max_new_tokens,
        sampling,
        attention: attention_proto(&spec.attention) as i32,
        eos_token_ids: model.eos.clone(),
    };
    let layers = cfg.num_layers as u32;
    let workers_n = p as u32;
    sh.transition(id, JobState::Prefill { layer: 0, layers }, |pr| {
        pr.workers = workers_n;
        pr.tokens_total = len as u64;
    })
    .map_err(|e| e.to_string())?;
    // Every worker's event stream, merged; a stream's end is an event too.
    let (tx, mut rx) = mpsc::channel::<(usize, Option<Result<proto::WorkerEvent, Status>>)>(256);
    let mut streams = JoinSet::new();
    for (r, c) in clients.iter().enumerate() {
        let (mut c, run, tx) = (c.clone(), run.clone(), tx.clone());
        streams.spawn(async move {
            match c.run_job(run).await {
                Err(e) => {
                    let _ = tx.send((r, Some(Err(e)))).await;
                }
                Ok(resp) => {
                    let mut s = resp.into_inner();
                    loop {
                        let m = s.message().await;
                        let end = matches!(m, Ok(None) | Err(_));
                        let item = m.transpose();
                        if tx.send((r, item)).await.is_err() || end {
                            break;
                        }
                    }
                }
            }
            let _ = tx.send((r, None)).await;
        });
    }
    drop(tx);
    let cancel_all = |clients: Vec<WorkerClient>| async move {
        for (r, mut c) in clients.into_iter().enumerate() {
            if let Err(e) = c
                .cancel_job(proto::WorkerCancelRequest { job_id: id })
                .await
            {
                warn!(worker = r, error = %e.message(), "cancelling on a worker");
            }
        }
    };
    let mut nll = vec![f32::NAN; if score { len - 1 } else { 0 }];
    let mut filled = 0usize;
    let mut generated = Vec::new();
    let mut finished = vec![false; p];
    let phase_start = Instant::now();
    let mut decode_start: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let failure = loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = tick.tick() => {
                if cancel.load(Ordering::Relaxed) {
                    break Some(format!("job {id} was cancelled"));
                }
                continue;
            }
        };
        let Some((r, ev)) = ev else { break None };
        match ev {
            None => {
                finished[r] = true;
                if finished.iter().all(|f| *f) {
                    break None;
                }
            }
            Some(Err(e)) => break Some(format!("worker {r}: {}", e.message())),
            Some(Ok(proto::WorkerEvent { event: Some(ev) })) => match ev {
                worker_event::Event::LayerDone(l) => {
                    let secs = phase_start.elapsed().as_secs_f64().max(1e-9);
                    let done = len as u64 * l.layer as u64 / l.layers.max(1) as u64;
                    let rate = done as f64 / secs;
                    let left = (len as u64).saturating_sub(done) as f64;
                    sh.transition(
                        id,
                        JobState::Prefill {
                            layer: l.layer,
                            layers: l.layers,
                        },
                        |pr| {
                            pr.workers = workers_n;
                            pr.tokens_done = done;
                            pr.tokens_total = len as u64;
                            pr.tokens_per_sec = rate;
                            pr.eta_secs = if rate > 0.0 { left / rate } else { 0.0 };
                        },
                    )
                    .map_err(|e| e.to_string())?;
                }
                worker_event::Event::Decoded(n) => {
                    let start = *decode_start.get_or_insert_with(Instant::now);
                    let secs = start.elapsed().as_secs_f64().max(1e-9);
                    let rate = f64::from(n) / secs;
                    sh.transition(
                        id,
                        JobState::Decode {
                            token: n,
                            tokens: max_new_tokens,
                        },
                        |pr| {
                            pr.workers = workers_n;
                            pr.tokens_done = n as u64;
                            pr.tokens_total = max_new_tokens as u64;
                            pr.tokens_per_sec = rate;
                            pr.eta_secs = (max_new_tokens.saturating_sub(n)) as f64 / rate;
                        },
                    )
                    .map_err(|e| e.to_string())?;
                }
                worker_event::Event::Scores(s) => {
                    if s.positions.len() != s.nll.len() {
                        break Some(format!("worker {r} sent mismatched scores"));
                    }
                    let before = filled;
                    for (q, v) in s.positions.iter().zip(s.nll) {
                        if let Some(slot) = nll.get_mut(*q as usize).filter(|x| x.is_nan()) {
                            *slot = v;
                            filled += 1;
                        }
                    }
                    if filled - before != s.positions.len() {
                        break Some(format!(
                            "worker {r} sent scores for positions outside its shard or twice"
                        ));
                    }
                }
                worker_event::Event::Generated(t) => generated.extend(t.ids),
            },
            Some(Ok(_)) => {}
        }
    };
    if let Some(f) = failure {
        streams.abort_all();
        cancel_all(clients).await;
        return Err(f.into());
    }
    if score {
        if filled != len - 1 {
            return Err(format!("the workers returned {filled} of {} scores", len - 1).into());
        }
        let mean = nll.iter().map(|&x| x as f64).sum::<f64>() / nll.len() as f64;
        Ok(serde_json::json!({ "nll": nll, "mean_nll": mean }))
    } else {
        if generated.is_empty() {
            return Err(String::from("rank 0 returned no generated tokens").into());
        }
        Ok(serde_json::json!({ "tokens": generated }))
    }
}
