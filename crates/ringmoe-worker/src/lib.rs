//! `ringmoe worker`: serves [`WorkerService`] to the coordinator and runs its part of jobs.
//!
//! A worker registers (a lease in the membership store, or heartbeats to the coordinator), loads
//! the dense weights and the experts the placement gives it (published in the membership store
//! and acknowledged in its record, or sent by `LoadModel`), and per job: binds a data-plane listener ([`WorkerService::prepare_job`]),
//! receives its zigzag shard of the sequence, connects a TCP communicator to the job's peers and
//! runs prefill (and decode) with ring attention and expert-parallel MoE. The compute runs on a
//! thread of its own; the gRPC side only moves messages.
//!
//! A worker runs on the CPU or on one GPU ([`WorkerDevice`]). A GPU worker holds its weights in
//! device memory (`ringmoe_cuda::CudaModel`, only the experts its placement gives it) and, per
//! job, forms an NCCL group over the job's TCP communicator (the unique id travels through it):
//! ring attention, the expert all-to-all and the decode all-gathers then move device buffers
//! over NCCL. Every worker of a job must be on the same kind of device.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringmoe_comm::TcpOptions;
use ringmoe_cuda::{CudaBackend, CudaError, CudaModel, CudaShardedSequence, Precision};
use ringmoe_model::generate::SamplingParams;
use ringmoe_model::model::nll_of;
use ringmoe_model::{LoadOptions, Model, ModelConfig, Sampler};
use ringmoe_parallel::{
    ExpertParallel, JobOptions, LoadTracker, ParallelError, Placement, ShardedSequence,
    prefill_shard_observed,
};
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use ringmoe_hf::ModelEntry;
use ringmoe_membership::{Membership, PlacementAck, PlacementRecord, WorkerRecord};
use ringmoe_proto::proto::cluster_service_client::ClusterServiceClient;
use ringmoe_proto::proto::worker_service_server::{WorkerService, WorkerServiceServer};
use ringmoe_proto::proto::{self, worker_event};
use ringmoe_proto::server::{self, ServerOptions};

mod shard;

use shard::{Shard, receive_shard};

/// Errors that stop a worker process (a failing job is reported on its event stream instead).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },

    #[error(transparent)]
    Serve(#[from] ringmoe_proto::ServeError),

    #[error("worker device {device}: {message}")]
    Device { device: String, message: String },
}

/// Locks a mutex; a poisoned one (a panic elsewhere) becomes an internal error, not a panic here.
fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, Status> {
    m.lock()
        .map_err(|_| Status::internal("internal state poisoned by an earlier panic"))
}

/// The engine's attention for a wire mode, with the patterns' default settings.
fn attention_mode(m: i32) -> Result<ringmoe_parallel::AttentionMode, String> {
    use ringmoe_core::sparse::{AShape, VsConfig};
    use ringmoe_parallel::AttentionMode;
    Ok(match proto::AttentionMode::try_from(m) {
        Ok(proto::AttentionMode::Unspecified | proto::AttentionMode::Dense) => AttentionMode::Dense,
        Ok(proto::AttentionMode::AShape) => AttentionMode::AShape(AShape::default()),
        Ok(proto::AttentionMode::VerticalSlash) => {
            AttentionMode::VerticalSlash(VsConfig::default())
        }
        Err(_) => return Err(format!("unknown attention mode {m}")),
    })
}

/// Where a worker makes itself known.
#[derive(Debug, Clone)]
pub enum Registry {
    /// Heartbeats to this coordinator (`host:port` or a URL): no etcd.
    Coordinator(String),
    /// A lease in a membership store (etcd, or in-process for `serve`).
    Membership(Arc<dyn Membership>),
}

/// Where a worker computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerDevice {
    #[default]
    Cpu,
    /// GPU `ordinal`, weights in `precision` (needs a build with `--features cuda`).
    Cuda {
        ordinal: usize,
        precision: Precision,
    },
}

impl std::fmt::Display for WorkerDevice {
    /// `cpu` or `cuda:N`, as published in the worker's record.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda { ordinal, .. } => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub registry: Registry,
    /// Lease TTL in a membership store: how long a dead worker stays listed.
    pub lease_ttl: Duration,
    pub device: WorkerDevice,
    /// The address this worker's gRPC server is reachable at, as told to the coordinator (the
    /// bound address when `None`).
    pub advertise: Option<String>,
    /// Bytes this worker may spend on K/V cache.
    pub kv_budget_bytes: u64,
    /// Where job data-plane listeners bind (their port is always picked by the OS).
    pub data_host: std::net::IpAddr,
    /// How long a data-plane receive may wait for a peer before the job fails.
    pub data_timeout: Duration,
    pub server: ServerOptions,
    /// Models on this worker's disk, by cluster name; a placement or `LoadModel` for another
    /// model loads from the coordinator's path.
    pub models: Vec<ModelEntry>,
}

/// A model in host memory or on this worker's GPU.
#[derive(Clone)]
enum Engine {
    Cpu(Arc<Model>),
    Cuda(Arc<CudaModel>),
}

impl Engine {
    fn config(&self) -> &ModelConfig {
        match self {
            Self::Cpu(m) => &m.config,
            Self::Cuda(m) => &m.config,
        }
    }
}

/// A loaded model and the placement it was loaded for.
struct Loaded {
    name: String,
    path: String,
    placement: Placement,
    index: usize,
    model: Engine,
}

/// A job between `PrepareJob` and `RunJob`.
struct PendingJob {
    listener: Option<TcpListener>,
    shard: Option<Shard>,
    /// When it was prepared: a job whose coordinator died before `RunJob` is dropped after
    /// the data timeout, giving back its port and shard.
    since: Instant,
}

struct Inner {
    /// This worker's GPU (opened once at start), or `None` on the CPU.
    gpu: Option<(Arc<CudaBackend>, Precision)>,
    /// Held by the job computing on the GPU: the backend's stream and cuBLAS handle serve one
    /// job at a time (the coordinator runs one job at a time anyway; this covers a stale run
    /// still finishing when its re-run arrives).
    gpu_busy: Mutex<()>,
    loaded: Mutex<Option<Arc<Loaded>>>,
    pending: Mutex<HashMap<u64, PendingJob>>,
    running: Mutex<HashMap<u64, Arc<AtomicBool>>>,
    load: Arc<LoadTracker>,
    data_host: std::net::IpAddr,
    data_timeout: Duration,
    /// Bytes of K/V cache this worker may hold (bounds the shards it accepts).
    kv_budget_bytes: u64,
    /// False while the worker's lease is lost: it takes no new jobs until it re-registers.
    accepting: AtomicBool,
    /// Local model directories by name.
    models: HashMap<String, std::path::PathBuf>,
}

#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

impl Worker {
    /// Opens the GPU first when the worker runs on one: a worker that cannot use its device
    /// fails at start, not at its first job.
    fn new(cfg: &WorkerConfig) -> Result<Self, WorkerError> {
        let gpu = match cfg.device {
            WorkerDevice::Cpu => None,
            WorkerDevice::Cuda { ordinal, precision } => Some((
                Arc::new(CudaBackend::new(ordinal).map_err(|e| WorkerError::Device {
                    device: format!("cuda:{ordinal}"),
                    message: e.to_string(),
                })?),
                precision,
            )),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                gpu,
                gpu_busy: Mutex::default(),
                loaded: Mutex::default(),
                pending: Mutex::default(),
                running: Mutex::default(),
                load: Arc::default(),
                data_host: cfg.data_host,
                data_timeout: cfg.data_timeout,
                kv_budget_bytes: cfg.kv_budget_bytes,
                accepting: AtomicBool::new(true),
                models: cfg
                    .models
                    .iter()
                    .map(|m| (m.name.clone(), m.path.clone()))
                    .collect(),
            }),
        })
    }

    /// Loads `model` with the experts of `index` in `placement` (from the local copy when this
    /// worker has one, else from `path`), unless that is what it holds already. Returns the
    /// seconds it took and whether it was cached.
    async fn load(
        &self,
        model: String,
        path: String,
        placement: Placement,
        index: usize,
    ) -> Result<(f64, bool), Status> {
        if index >= placement.workers {
            return Err(Status::invalid_argument(format!(
                "worker index {index} outside a placement of {} workers",
                placement.workers
            )));
        }
        let path = match self.inner.models.get(&model) {
            Some(local) => local.display().to_string(),
            None => path,
        };
        {
            let mut loaded = lock(&self.inner.loaded)?;
            if let Some(l) = loaded.as_ref() {
                let same = l.name == model
                    && l.path == path
                    && l.index == index
                    && l.placement.workers == placement.workers
                    && l.placement.layers == placement.layers;
                if same {
                    // Only the version moved (a republication): nothing to load.
                    if l.placement.version != placement.version {
                        *loaded = Some(Arc::new(Loaded {
                            name: l.name.clone(),
                            path: l.path.clone(),
                            placement,
                            index,
                            model: l.model.clone(),
                        }));
                    }
                    return Ok((0.0, true));
                }
            }
            // Drop the old model first: two copies may not fit.
            *loaded = None;
        }
        let (p, sel) = (path.clone(), placement.selection(index));
        let t = Instant::now();
        let gpu = self.inner.gpu.clone();
        let loaded_model = tokio::task::spawn_blocking(move || {
            let dir = std::path::Path::new(&p);
            match gpu {
                None => {
                    let opts = LoadOptions {
                        experts: sel,
                        ..LoadOptions::default()
                    };
                    Model::load(dir, &opts)
                        .map(|m| Engine::Cpu(Arc::new(m)))
                        .map_err(|e| e.to_string())
                }
                Some((b, precision)) => CudaModel::load(b, dir, &sel, precision)
                    .map(|m| Engine::Cuda(Arc::new(m)))
                    .map_err(|e| e.to_string()),
            }
        })
        .await
        .map_err(internal)?
        .map_err(|e| Status::failed_precondition(format!("loading {path}: {e}")))?;
        let c = loaded_model.config();
        placement
            .check_shape(c.num_layers, c.moe.num_experts, placement.workers)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let secs = t.elapsed().as_secs_f64();
        info!(%model, index, version = placement.version, secs, "model loaded");
        *lock(&self.inner.loaded)? = Some(Arc::new(Loaded {
            name: model,
            path,
            placement,
            index,
            model: loaded_model,
        }));
        Ok((secs, false))
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::WorkerEvent, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for Worker {
    async fn load_model(
        &self,
        req: Request<proto::LoadModelRequest>,
    ) -> Result<Response<proto::LoadModelResponse>, Status> {
        let r = req.into_inner();
        let placement = Placement::from_json(&r.placement_json)
            .map_err(|e| Status::invalid_argument(format!("placement: {e}")))?;
        let (load_secs, cached) = self
            .load(r.model, r.path, placement, r.worker_index as usize)
            .await?;
        Ok(Response::new(proto::LoadModelResponse {
            load_secs,
            cached,
        }))
    }

    async fn prepare_job(
        &self,
        req: Request<proto::PrepareJobRequest>,
    ) -> Result<Response<proto::PrepareJobResponse>, Status> {
        let r = req.into_inner();
        let id = r.job_id;
        if !self.inner.accepting.load(Ordering::Relaxed) {
            return Err(Status::unavailable(
                "this worker lost its membership lease and takes no jobs until it re-registers",
            ));
        }
        // The coordinator uses only a placement every worker acknowledged; this one's must be it.
        match lock(&self.inner.loaded)?.as_ref() {
            Some(l) if l.name == r.model && l.placement.version == r.placement_version => {}
            Some(l) => {
                return Err(Status::failed_precondition(format!(
                    "job {id} wants model '{}' at placement version {}; this worker holds '{}' \
                     at version {}",
                    r.model, r.placement_version, l.name, l.placement.version
                )));
            }
            None => {
                return Err(Status::failed_precondition(format!(
                    "job {id} wants model '{}'; this worker has loaded none",
                    r.model
                )));
            }
        }
        let host = self.inner.data_host;
        let listener = TcpListener::bind(SocketAddr::new(host, 0))
            .map_err(|e| internal(format!("binding a data-plane port on {host}: {e}")))?;
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
        pending.insert(
            id,
            PendingJob {
                listener: Some(listener),
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
        let mut stream = req.into_inner();
        let max_tokens = {
            let loaded = lock(&self.inner.loaded)?;
            let l = loaded
                .as_ref()
                .ok_or_else(|| Status::failed_precondition("no model is loaded"))?;
            let c = l.model.config();
            let per_token = (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4).max(1) as u64;
            self.inner.kv_budget_bytes / per_token
        };
        let shard = receive_shard(&mut stream, max_tokens).await?;
        let n = shard.tokens.len() as u64;
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
        let loaded = lock(&self.inner.loaded)?
            .clone()
            .ok_or_else(|| Status::failed_precondition("no model is loaded"))?;
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
        let cancel = Arc::new(AtomicBool::new(false));
        lock(&self.inner.running)?.insert(id, cancel.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let inner = self.inner.clone();
        let span = info_span!("job", id, rank = shard.rank);
        std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || {
                let _g = span.enter();
                let run = JobRun {
                    id,
                    gpu: inner.gpu.as_ref().map(|g| &g.0),
                    loaded: &loaded,
                    shard: &shard,
                    cancel: &cancel,
                    tx: &tx,
                    load: &inner.load,
                };
                let t = Instant::now();
                let _gpu = inner
                    .gpu
                    .is_some()
                    .then(|| inner.gpu_busy.lock().unwrap_or_else(|p| p.into_inner()));
                let res = run.execute(listener, &peers, &r, attention, inner.data_timeout);
                match res {
                    Ok(()) => info!(secs = t.elapsed().as_secs_f64(), "job part done"),
                    Err(e) => {
                        warn!(error = %e, "job part failed");
                        let status = match e {
                            ParallelError::Cancelled(_) => Status::cancelled(e.to_string()),
                            e => Status::internal(format!("worker rank {}: {e}", shard.rank)),
                        };
                        let _ = tx.blocking_send(Err(status));
                    }
                }
                // A re-run of the same job (after a coordinator restart) may have replaced
                // this entry; remove only our own.
                if let Ok(mut m) = inner.running.lock() {
                    if m.get(&id).is_some_and(|c| Arc::ptr_eq(c, &cancel)) {
                        m.remove(&id);
                    }
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
        _req: Request<proto::ReportLoadRequest>,
    ) -> Result<Response<proto::ReportLoadResponse>, Status> {
        let (layers, experts) = match lock(&self.inner.loaded)?.as_ref() {
            Some(l) => {
                let c = l.model.config();
                (c.num_layers, c.moe.num_experts)
            }
            None => (0, 0),
        };
        let snap = self.inner.load.snapshot();
        let rows = snap
            .per_expert(layers, experts)
            .into_iter()
            .flatten()
            .collect();
        Ok(Response::new(proto::ReportLoadResponse {
            layers: layers as u32,
            experts: experts as u32,
            rows,
            window_secs: self.inner.load.window().as_secs_f64(),
        }))
    }
}

/// A GPU backend's error as the distributed forward's: cancellations, collective failures and
/// model errors keep their kind; the rest is a device error.
fn from_cuda(e: CudaError) -> ParallelError {
    match e {
        CudaError::Parallel(p) => p,
        CudaError::Comm(c) => ParallelError::Comm(c),
        CudaError::Model(m) => ParallelError::Model(m),
        CudaError::Core(c) => ParallelError::Core(c),
        other => ParallelError::Device(Box::new(other)),
    }
}

/// One worker's part of one job, on its own thread.
struct JobRun<'a> {
    id: u64,
    gpu: Option<&'a Arc<CudaBackend>>,
    loaded: &'a Loaded,
    shard: &'a Shard,
    cancel: &'a AtomicBool,
    tx: &'a tokio::sync::mpsc::Sender<Result<proto::WorkerEvent, Status>>,
    load: &'a Arc<LoadTracker>,
}

/// Values per streamed chunk of scores or tokens (well under any sane message limit).
const CHUNK: usize = 16 * 1024;

impl JobRun<'_> {
    fn emit(&self, ev: worker_event::Event) -> Result<(), ParallelError> {
        self.tx
            .blocking_send(Ok(proto::WorkerEvent { event: Some(ev) }))
            .map_err(|_| ParallelError::Cancelled(self.id))
    }

    /// Stops the job when it was cancelled or the coordinator stopped listening.
    fn check(&self) -> Result<(), ParallelError> {
        if self.cancel.load(Ordering::Relaxed) || self.tx.is_closed() {
            return Err(ParallelError::Cancelled(self.id));
        }
        Ok(())
    }

    fn execute(
        &self,
        listener: TcpListener,
        peers: &[SocketAddr],
        r: &proto::RunJobRequest,
        attention: ringmoe_parallel::AttentionMode,
        timeout: Duration,
    ) -> Result<(), ParallelError> {
        let s = self.shard;
        let opts = TcpOptions {
            session: self.id,
            ..TcpOptions::default()
        };
        let comm = ringmoe_comm::tcp(s.rank, listener, peers, &opts, timeout)?;
        let plan = &s.plan;
        let ep = ExpertParallel {
            load: self.load.clone(),
            ..ExpertParallel::new(self.loaded.placement.clone())
        };
        let job = JobOptions {
            id: self.id,
            attention,
        };
        let lead = s.rank == 0;
        let mut on_layer = |layer: usize, layers: usize| {
            self.check()?;
            if lead {
                self.emit(worker_event::Event::LayerDone(proto::LayerDone {
                    layer: layer as u32,
                    layers: layers as u32,
                }))?;
            }
            Ok(())
        };
        let mode = proto::JobMode::try_from(r.mode)
            .ok()
            .filter(|m| matches!(m, proto::JobMode::Score | proto::JobMode::Generate))
            .ok_or_else(|| ParallelError::Invalid(format!("unknown job mode {}", r.mode)))?;
        match &self.loaded.model {
            Engine::Cpu(model) => match mode {
                proto::JobMode::Score => {
                    let out = prefill_shard_observed(
                        model,
                        &comm,
                        plan,
                        &s.tokens,
                        job,
                        Some(&ep),
                        &mut on_layer,
                    )?;
                    self.scores(model.config.vocab_size, &out.positions, |a, b| {
                        Ok(model.logits(&out.hidden.rows(a, b)?)?)
                    })
                }
                _ => {
                    let (mut seq, logits) = ShardedSequence::prefill_shard(
                        model,
                        &comm,
                        plan,
                        &s.tokens,
                        job,
                        Some(&ep),
                        &mut on_layer,
                    )?;
                    self.generate(r, logits, |t| seq.decode(t))
                }
            },
            Engine::Cuda(model) => {
                if attention != ringmoe_parallel::AttentionMode::Dense {
                    return Err(ParallelError::Invalid(format!(
                        "GPU workers run dense attention only; this job asks for {attention:?}"
                    )));
                }
                let b = self.gpu.ok_or_else(|| {
                    ParallelError::Invalid("a GPU model on a worker with no GPU opened".into())
                })?;
                let nccl = b.join_nccl(&comm, timeout).map_err(from_cuda)?;
                let mut on_layer =
                    |done: usize, layers: usize| on_layer(done, layers).map_err(CudaError::from);
                match mode {
                    proto::JobMode::Score => {
                        let out = model
                            .prefill_shard(&nccl, plan, &s.tokens, Some(&ep), &mut on_layer)
                            .map_err(from_cuda)?;
                        self.scores(model.config.vocab_size, &out.positions, |a, b| {
                            model.logits_of_rows(&out.hidden, a, b).map_err(from_cuda)
                        })
                    }
                    _ => {
                        let (mut seq, logits) = CudaShardedSequence::prefill_shard(
                            model,
                            &nccl,
                            plan,
                            &s.tokens,
                            Some(&ep),
                            &mut on_layer,
                        )
                        .map_err(from_cuda)?;
                        self.generate(r, logits, |t| seq.decode(t).map_err(from_cuda))
                    }
                }
            }
        }
    }

    /// Samples from `logits`, feeds each token to `decode` for the next logits, until an EOS
    /// token or `max_new_tokens`; the lead rank reports progress and streams the tokens.
    fn generate(
        &self,
        r: &proto::RunJobRequest,
        mut logits: Vec<f32>,
        mut decode: impl FnMut(u32) -> Result<Vec<f32>, ParallelError>,
    ) -> Result<(), ParallelError> {
        let lead = self.shard.rank == 0;
        let sp = r.sampling.unwrap_or_default();
        let mut sampler = Sampler::new(SamplingParams {
            temperature: sp.temperature,
            top_p: if sp.top_p == 0.0 { 1.0 } else { sp.top_p },
            seed: sp.seed,
        })?;
        let mut out = Vec::new();
        loop {
            let next = sampler.sample(&logits);
            out.push(next);
            if lead {
                self.emit(worker_event::Event::Decoded(out.len() as u32))?;
            }
            if r.eos_token_ids.contains(&next) || out.len() >= r.max_new_tokens as usize {
                break;
            }
            self.check()?;
            logits = decode(next)?;
        }
        if lead {
            for c in out.chunks(CHUNK) {
                self.emit(worker_event::Event::Generated(proto::TokenIds {
                    ids: c.to_vec(),
                }))?;
            }
        }
        Ok(())
    }

    /// NLL of the next token at each of this rank's positions that has one, streamed in chunks;
    /// `logits(start, end)` (lm_head) runs on a few hundred rows at a time.
    fn scores(
        &self,
        vocab: usize,
        positions: &[usize],
        logits: impl Fn(usize, usize) -> Result<ringmoe_core::Tensor, ParallelError>,
    ) -> Result<(), ParallelError> {
        let targets = &self.shard.targets;
        if targets.len() != positions.len() {
            return Err(ParallelError::Invalid(format!(
                "score mode needs a target per position: {} targets for {} positions",
                targets.len(),
                positions.len()
            )));
        }
        let (mut pos, mut nll) = (Vec::new(), Vec::new());
        const ROWS: usize = 256;
        for s in (0..positions.len()).step_by(ROWS) {
            self.check()?;
            let e = (s + ROWS).min(positions.len());
            let logits = logits(s, e)?;
            for (i, row) in logits.as_slice().chunks(vocab).enumerate() {
                let t = targets[s + i];
                if t == u32::MAX {
                    continue;
                }
                if t as usize >= vocab {
                    return Err(ParallelError::Invalid(format!(
                        "target token {t} outside the vocabulary of {vocab}"
                    )));
                }
                pos.push(positions[s + i] as u64);
                nll.push(nll_of(row, t as usize));
            }
            if pos.len() >= CHUNK || e == positions.len() {
                self.emit(worker_event::Event::Scores(proto::PositionScores {
                    positions: std::mem::take(&mut pos),
                    nll: std::mem::take(&mut nll),
                }))?;
            }
        }
        Ok(())
    }
}

/// Runs a worker on `listener` until `shutdown` resolves: the gRPC server, and heartbeats to the
/// coordinator (which is how the coordinator learns the worker exists).
pub async fn run_worker(
    listener: tokio::net::TcpListener,
    cfg: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let bound = listener.local_addr().map_err(|source| WorkerError::Io {
        what: "local_addr",
        source,
    })?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());
    let worker = Worker::new(&cfg)?;
    let svc = WorkerServiceServer::new(worker.clone())
        .max_decoding_message_size(cfg.server.max_message_bytes)
        .max_encoding_message_size(cfg.server.max_message_bytes);
    let routes = tonic::service::Routes::new(svc);
    let mut background = tokio::task::JoinSet::new();
    match &cfg.registry {
        Registry::Coordinator(coord) => {
            background.spawn(
                heartbeat(coord.clone(), advertise.clone(), cfg.kv_budget_bytes)
                    .instrument(info_span!("heartbeat", worker = %advertise)),
            );
        }
        Registry::Membership(m) => {
            let rec = WorkerRecord {
                id: advertise.clone(),
                addr: advertise.clone(),
                device: cfg.device.to_string(),
                kv_budget_bytes: cfg.kv_budget_bytes,
                models: cfg.models.iter().map(|m| m.name.clone()).collect(),
                placement: None,
            };
            let (rec_tx, rec_rx) = watch::channel(rec);
            background.spawn(
                stay_registered(m.clone(), rec_rx, cfg.lease_ttl, worker.inner.clone())
                    .instrument(info_span!("membership", worker = %advertise)),
            );
            background.spawn(
                follow_placements(m.clone(), worker, advertise.clone(), rec_tx)
                    .instrument(info_span!("placement", worker = %advertise)),
            );
        }
    }
    info!(addr = %bound, "worker serving");
    let names = ["ringmoe.v1.WorkerService"];
    let res = server::serve(listener, routes, &names, shutdown).await;
    background.abort_all();
    Ok(res?)
}

/// Keeps this worker registered with `rec`'s latest value: re-registers when the lease is
/// lost (taking no jobs meanwhile) and rewrites the record when it changes.
async fn stay_registered(
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
async fn follow_placements(
    m: Arc<dyn Membership>,
    worker: Worker,
    me: String,
    rec: watch::Sender<WorkerRecord>,
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
        let (experts, error) = match placement {
            Ok(pl) => {
                let experts = (0..pl.layers.len()).map(|l| pl.hosted(l, rank)).collect();
                let r = self.load(p.model.clone(), p.path.clone(), pl, rank).await;
                (experts, r.err().map(|e| e.message().to_string()))
            }
            Err(e) => (Vec::new(), Some(e)),
        };
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
            })
        });
    }
}

async fn heartbeat(coordinator: String, me: String, kv_budget_bytes: u64) {
    let url = server::http_url(&coordinator);
    let mut client: Option<ClusterServiceClient<tonic::transport::Channel>> = None;
    let mut interval = Duration::from_millis(500);
    loop {
        if client.is_none() {
            client = ClusterServiceClient::connect(url.clone()).await.ok();
        }
        if let Some(c) = client.as_mut() {
            let req = proto::HeartbeatRequest {
                worker_addr: me.clone(),
                kv_budget_bytes,
            };
            match c.heartbeat(req).await {
                Ok(r) => {
                    interval = Duration::from_millis(r.into_inner().interval_ms.clamp(50, 10_000));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat failed");
                    client = None;
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// Starts a worker's server on `listener` in the background (for `serve` and tests).
pub fn spawn_worker(
    listener: tokio::net::TcpListener,
    cfg: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), WorkerError>> {
    tokio::spawn(run_worker(listener, cfg, shutdown))
}
