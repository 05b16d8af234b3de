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

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringmoe_comm::TcpOptions;
use ringmoe_core::WeightPrecision;
use ringmoe_cuda::{CudaBackend, CudaError, CudaModel, Precision};
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
use ringmoe_proto::secret::{ClusterSecret, Credential, Gate};
use ringmoe_proto::server::{self, ServerOptions, lock};
use tonic::service::interceptor::InterceptedService;

mod job;
mod registration;
mod service;
mod shard;
mod telemetry;

use job::JobRun;
use registration::{follow_placements, heartbeat, stay_registered};
use service::internal;
use shard::{Shard, receive_shard};

/// The check a worker makes of a shard header before building anything: the plan it names, or
/// `INVALID_ARGUMENT` (public for the fuzz targets in `fuzz/` and their corpus replay).
pub fn plan_of_shard_header(
    h: &proto::ShardHeader,
    max_tokens: u64,
    kv_budget_bytes: u64,
) -> Result<ringmoe_plan::ShardPlan, Status> {
    shard::plan_of(h, max_tokens, kv_budget_bytes)
}

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

    #[error("{0}")]
    Config(String),
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
    /// The precision a CPU worker holds its matrices in (`--weights`).
    pub weights: WeightPrecision,
    /// The address this worker's gRPC server is reachable at, as told to the coordinator (the
    /// bound address when `None`).
    pub advertise: Option<String>,
    /// Bytes this worker may spend on K/V cache.
    pub kv_budget_bytes: u64,
    /// Where job data-plane listeners bind.
    pub data_host: std::net::IpAddr,
    /// The ports job data-plane listeners may take, the first free one in order (a firewall or
    /// a Kubernetes NetworkPolicy can then name them); `None`: any port the OS picks.
    pub data_ports: Option<std::ops::RangeInclusive<u16>>,
    /// How long a data-plane receive may wait for a peer before the job fails.
    pub data_timeout: Duration,
    pub server: ServerOptions,
    /// Models on this worker's disk, by cluster name; a placement or `LoadModel` for another
    /// model loads from the coordinator's path.
    pub models: Vec<ModelEntry>,
    /// The cluster secret (`--cluster-secret-file`): every `WorkerService` call must carry it,
    /// and heartbeats present it. `None`: any caller is served.
    pub cluster_secret: Option<ClusterSecret>,
    /// Directories a model may be loaded from (`--model-root`); empty: any directory. A path
    /// from `LoadModel` or a published placement must resolve (symlinks followed) inside one.
    pub model_roots: Vec<std::path::PathBuf>,
    /// TLS on the data plane too (`--data-tls`), with the certificate, key and CA of
    /// `server.tls` (all three needed), read afresh for every job.
    pub data_tls: bool,
    /// After the shutdown signal (SIGTERM), how long the worker waits for its jobs to finish
    /// before it leaves (`--drain-timeout-secs`); it is marked draining meanwhile, so nothing
    /// new is scheduled on it.
    pub drain_timeout: Duration,
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

    /// Bytes of weights held (host memory on the CPU, device memory on a GPU).
    fn weight_bytes(&self) -> usize {
        match self {
            Self::Cpu(m) => m.weight_bytes(),
            Self::Cuda(m) => m.weight_bytes(),
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
    /// The rows this version's experts computed: a sliding window (`ReportLoad`) and totals
    /// (the `ringmoe_expert_rows_total` counters). Per version, because the coordinator judges
    /// a placement by the load it measured under that placement.
    load: Arc<LoadTracker>,
    /// Expert rows already counted in the metrics, by (layer, expert).
    rows_reported: Mutex<BTreeMap<(u32, u32), u64>>,
}

impl Loaded {
    fn is(&self, model: &str, version: u64) -> bool {
        self.name == model && self.placement.version == version
    }
}

/// The placement versions a worker holds: the newest, and the one before it after an
/// incremental expert move. The previous version shares every weight but the moved experts with
/// the newest, and is kept until a job is prepared on the newest: a run the coordinator started
/// before it switched to the new version still finds its own.
#[derive(Default)]
struct Held {
    current: Option<Arc<Loaded>>,
    previous: Option<Arc<Loaded>>,
}

impl Held {
    /// The held version `version` of `model`, if any.
    fn find(&self, model: &str, version: u64) -> Option<&Arc<Loaded>> {
        [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .find(|l| l.is(model, version))
    }
}

/// What a placement load did, for `LoadModel`'s answer, the acknowledgement and the logs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LoadReport {
    pub secs: f64,
    /// Nothing was read: the version (or its layout) was held already.
    pub cached: bool,
    /// Only the experts the new placement adds were read (the rest shared with the old one).
    pub incremental: bool,
    /// Bytes read from the checkpoint.
    pub bytes_read: u64,
}

/// A job between `PrepareJob` and `RunJob`.
struct PendingJob {
    /// The placement version the job runs on (chosen by the coordinator, held from `PrepareJob`
    /// to the end of the run whatever this worker loads meanwhile).
    loaded: Arc<Loaded>,
    listener: Option<TcpListener>,
    /// The job's data-plane token: peers' hellos must carry it.
    token: [u8; 32],
    shard: Option<Shard>,
    /// When it was prepared: a job whose coordinator died before `RunJob` is dropped after
    /// the data timeout, giving back its port and shard.
    since: Instant,
}

struct Inner {
    /// This worker's GPU (opened once at start), or `None` on the CPU.
    gpu: Option<(Arc<CudaBackend>, Precision)>,
    /// The precision CPU loads hold matrices in.
    weights: WeightPrecision,
    /// Held by the job computing on the GPU: the backend's stream and cuBLAS handle serve one
    /// job at a time (the coordinator runs one job at a time anyway; this covers a stale run
    /// still finishing when its re-run arrives).
    gpu_busy: Mutex<()>,
    loaded: Mutex<Held>,
    /// Held by a placement load from start to finish: one load at a time, each building on the
    /// version the previous one left.
    loading: tokio::sync::Mutex<()>,
    pending: Mutex<HashMap<u64, PendingJob>>,
    running: Mutex<HashMap<u64, Arc<AtomicBool>>>,
    /// How this worker is known (its advertised address): the `worker` label and span field.
    id: String,
    data_host: std::net::IpAddr,
    data_ports: Option<std::ops::RangeInclusive<u16>>,
    data_timeout: Duration,
    /// Bytes of K/V cache this worker may hold (bounds the shards it accepts).
    kv_budget_bytes: u64,
    /// False while the worker's lease is lost: it takes no new jobs until it re-registers.
    accepting: AtomicBool,
    /// Set at the shutdown signal: the worker finishes what it has and leaves.
    draining: AtomicBool,
    /// Local model directories by name.
    models: HashMap<String, std::path::PathBuf>,
    /// Canonical model roots (empty: no confinement).
    model_roots: Vec<std::path::PathBuf>,
    /// True when placements come from a membership store: `LoadModel` is then refused, so the
    /// placement this worker holds is always the one it acknowledged in its record (an RPC could
    /// otherwise change it under the same version, behind the coordinator's back).
    follows_store: bool,
    /// The TLS files the data plane uses, when it uses TLS.
    data_tls: Option<ringmoe_proto::tls::TlsFiles>,
}

#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

/// `path` resolved (symlinks and `..` followed) when it lies inside one of `roots` (canonical);
/// refused otherwise, with the same message whether or not the path exists, so a caller learns
/// nothing about the worker's files. No roots: `path` as given.
pub(crate) fn confine(roots: &[std::path::PathBuf], path: &str) -> Result<String, Status> {
    if roots.is_empty() {
        return Ok(path.to_string());
    }
    match std::path::Path::new(path).canonicalize() {
        Ok(p) if roots.iter().any(|r| p.starts_with(r)) => Ok(p.display().to_string()),
        _ => {
            warn!(path, "refused a model path outside the model roots");
            Err(Status::permission_denied(format!(
                "the model path {path:?} is not a directory inside this worker's model roots \
                 (--model-root)"
            )))
        }
    }
}

/// A listener for one job's data plane on `host`: any port, or the first free one of `ports`.
pub(crate) fn bind_data_port(
    host: std::net::IpAddr,
    ports: Option<std::ops::RangeInclusive<u16>>,
) -> Result<TcpListener, Status> {
    let Some(ports) = ports else {
        return TcpListener::bind(SocketAddr::new(host, 0))
            .map_err(|e| service::internal(format!("binding a data-plane port on {host}: {e}")));
    };
    let (lo, hi) = (*ports.start(), *ports.end());
    let mut last = None;
    for port in ports {
        match TcpListener::bind(SocketAddr::new(host, port)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(Status::resource_exhausted(format!(
        "no free data-plane port on {host} in {lo}-{hi} (--data-ports){}",
        last.map(|e| format!(": {e}")).unwrap_or_default()
    )))
}

impl Worker {
    /// Opens the GPU first when the worker runs on one: a worker that cannot use its device
    /// fails at start, not at its first job.
    fn new(cfg: &WorkerConfig, id: &str) -> Result<Self, WorkerError> {
        // Data-plane TLS is checked at start: a worker that cannot use it never joins.
        let data_tls = match (cfg.data_tls, &cfg.server.tls) {
            (false, _) => None,
            (true, None) => {
                return Err(WorkerError::Config(
                    "--data-tls needs --tls-cert, --tls-key and --tls-ca".into(),
                ));
            }
            (true, Some(t)) => {
                ringmoe_proto::tls::data_plane(t.files())
                    .map_err(|e| WorkerError::Config(format!("--data-tls: {e}")))?;
                Some(t.files().clone())
            }
        };
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
                weights: cfg.weights,
                gpu_busy: Mutex::default(),
                loaded: Mutex::default(),
                loading: tokio::sync::Mutex::default(),
                pending: Mutex::default(),
                running: Mutex::default(),
                id: id.to_string(),
                data_host: cfg.data_host,
                data_ports: cfg.data_ports.clone(),
                data_timeout: cfg.data_timeout,
                kv_budget_bytes: cfg.kv_budget_bytes,
                accepting: AtomicBool::new(true),
                draining: AtomicBool::new(false),
                models: cfg
                    .models
                    .iter()
                    .map(|m| (m.name.clone(), m.path.clone()))
                    .collect(),
                model_roots: cfg
                    .model_roots
                    .iter()
                    .map(|r| {
                        r.canonicalize().map_err(|source| WorkerError::Io {
                            what: "a --model-root",
                            source,
                        })
                    })
                    .collect::<Result<_, _>>()?,
                follows_store: matches!(cfg.registry, Registry::Membership(_)),
                data_tls,
            }),
        })
    }

    /// Loads `model` with the experts of `index` in `placement` (from the local copy when this
    /// worker has one, else from `path`), unless that is what it holds already.
    ///
    /// A CPU worker that holds the same model already moves only the experts that differ
    /// ([`Model::with_experts`]): the new version is built beside the current one, which keeps
    /// serving meanwhile, and both share every other weight. Anything else (another model, a
    /// GPU) drops what is held first: two whole copies may not fit.
    async fn load(
        &self,
        model: String,
        path: String,
        placement: Placement,
        index: usize,
    ) -> Result<LoadReport, Status> {
        if index >= placement.workers {
            return Err(Status::invalid_argument(format!(
                "worker index {index} outside a placement of {} workers",
                placement.workers
            )));
        }
        let path = match self.inner.models.get(&model) {
            Some(local) => local.display().to_string(),
            None => confine(&self.inner.model_roots, &path)?,
        };
        let held_already = |held: &Held| {
            held.find(&model, placement.version).is_some_and(|l| {
                l.path == path && l.index == index && l.placement.layers == placement.layers
            })
        };
        let cached = LoadReport {
            cached: true,
            ..LoadReport::default()
        };
        // A version held already answers at once, even while another loads in the background
        // (a run on the version in force must not wait for a rebalance's load).
        if held_already(&*lock(&self.inner.loaded)?) {
            return Ok(cached);
        }
        let _one_at_a_time = self.inner.loading.lock().await;
        let base = {
            let mut held = lock(&self.inner.loaded)?;
            if held_already(&held) {
                return Ok(cached);
            }
            let current = held.current.clone();
            match current {
                Some(l) if l.name == model && l.path == path => {
                    if l.index == index
                        && l.placement.workers == placement.workers
                        && l.placement.layers == placement.layers
                    {
                        // Only the version moved (a republication): nothing to load.
                        held.previous = held.current.replace(Arc::new(Loaded {
                            name: l.name.clone(),
                            path: l.path.clone(),
                            placement,
                            index,
                            model: l.model.clone(),
                            load: l.load.clone(),
                            rows_reported: Mutex::new(lock(&l.rows_reported)?.clone()),
                        }));
                        return Ok(LoadReport {
                            cached: true,
                            ..LoadReport::default()
                        });
                    }
                    match &l.model {
                        Engine::Cpu(m) => Some(m.clone()),
                        Engine::Cuda(_) => {
                            *held = Held::default();
                            None
                        }
                    }
                }
                _ => {
                    *held = Held::default();
                    None
                }
            }
        };
        let (p, sel) = (path.clone(), placement.selection(index));
        let t = Instant::now();
        let gpu = self.inner.gpu.clone();
        let weights = self.inner.weights;
        let incremental = base.is_some();
        let (loaded_model, bytes_read) = tokio::task::spawn_blocking(move || {
            let dir = std::path::Path::new(&p);
            match (base, gpu) {
                (Some(m), _) => {
                    let ckpt = ringmoe_model::Checkpoint::open(dir).map_err(|e| e.to_string())?;
                    let (next, delta) = m
                        .with_experts(&ckpt, &sel, weights)
                        .map_err(|e| e.to_string())?;
                    info!(
                        loaded = delta.loaded,
                        kept = delta.kept,
                        dropped = delta.dropped,
                        loaded_bytes = delta.loaded_bytes,
                        dropped_bytes = delta.dropped_bytes,
                        "experts moved"
                    );
                    Ok((Engine::Cpu(Arc::new(next)), ckpt.bytes_read()))
                }
                (None, None) => {
                    let opts = LoadOptions {
                        experts: sel,
                        weights,
                    };
                    let cfg = ModelConfig::from_dir(dir).map_err(|e| e.to_string())?;
                    let ckpt = ringmoe_model::Checkpoint::open(dir).map_err(|e| e.to_string())?;
                    let m = Model::from_checkpoint(cfg, &ckpt, &opts).map_err(|e| e.to_string())?;
                    Ok((Engine::Cpu(Arc::new(m)), ckpt.bytes_read()))
                }
                (None, Some((b, precision))) => ringmoe_cuda::load_model(b, dir, &sel, precision)
                    .map(|m| {
                        let bytes = m.weight_bytes() as u64;
                        (Engine::Cuda(Arc::new(m)), bytes)
                    })
                    .map_err(|e| e.to_string()),
            }
        })
        .await
        .map_err(internal)?
        .map_err(|e: String| Status::failed_precondition(format!("loading {path}: {e}")))?;
        let c = loaded_model.config();
        placement
            .check_shape(c.num_layers, c.moe.num_experts, placement.workers)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let secs = t.elapsed().as_secs_f64();
        let weight_bytes = loaded_model.weight_bytes();
        let precision = match (&loaded_model, &self.inner.gpu) {
            (Engine::Cuda(_), Some((_, p))) => format!("{p:?}").to_lowercase(),
            _ => self.inner.weights.to_string(),
        };
        telemetry::weight_bytes(&self.inner.id, &precision, weight_bytes as u64);
        telemetry::placement_load(&self.inner.id, incremental, bytes_read, secs);
        info!(
            %model, index, version = placement.version, secs, weight_bytes, bytes_read,
            incremental, %precision, "model loaded"
        );
        let next = Arc::new(Loaded {
            name: model,
            path,
            placement,
            index,
            model: loaded_model,
            load: Arc::default(),
            rows_reported: Mutex::default(),
        });
        let mut held = lock(&self.inner.loaded)?;
        held.previous = held.current.replace(next);
        if !incremental {
            held.previous = None;
        }
        Ok(LoadReport {
            secs,
            cached: false,
            incremental,
            bytes_read,
        })
    }
}

impl Worker {
    /// A drain: marks the worker draining (in its membership record, or in its heartbeats) so
    /// the coordinator schedules nothing new on it, then waits until no job part runs or waits
    /// to run here, or `timeout` passes. Returns whether it drained (false: timed out).
    async fn drain(&self, timeout: Duration, rec: Option<&watch::Sender<WorkerRecord>>) -> bool {
        use std::sync::atomic::Ordering;
        self.inner.draining.store(true, Ordering::SeqCst);
        if let Some(r) = rec {
            r.send_modify(|r| r.draining = true);
        }
        let started = Instant::now();
        info!(
            timeout_secs = timeout.as_secs_f64(),
            "draining: no new jobs; finishing the current one"
        );
        // A job prepared but never run (its run failed elsewhere) does not hold the drain for
        // long: the coordinator sends RunJob right after PrepareJob and SendShard.
        const UNRUN: Duration = Duration::from_secs(30);
        loop {
            let running = self.inner.running.lock().map_or(0, |r| r.len());
            let pending = self.inner.pending.lock().map_or(0, |p| {
                p.values().filter(|j| j.since.elapsed() < UNRUN).count()
            });
            if running + pending == 0 {
                info!(secs = started.elapsed().as_secs_f64(), "drained; leaving");
                return true;
            }
            if started.elapsed() >= timeout {
                warn!(
                    running,
                    pending,
                    "the drain timeout (--drain-timeout-secs) ran out; leaving with jobs unfinished \
                     (they are retried on other workers)"
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs a worker on `listener` until `shutdown` resolves and the drain after it ends: the gRPC
/// server, and heartbeats to the coordinator (which is how the coordinator learns the worker
/// exists) or a lease in the membership store (revoked when the worker leaves).
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
    let worker = Worker::new(&cfg, &advertise)?;
    let svc = WorkerServiceServer::new(worker.clone())
        .max_decoding_message_size(cfg.server.max_message_bytes)
        .max_encoding_message_size(cfg.server.max_message_bytes);
    // Only the coordinator (holding the cluster secret) is served, and only the newest leader.
    let mut gate = Gate::new(cfg.cluster_secret.clone(), "WorkerService");
    let fence = FenceCheck::new(advertise.clone());
    let routes = tonic::service::Routes::new(InterceptedService::new(svc, move |req| {
        let req = tonic::service::Interceptor::call(&mut gate, req)?;
        fence.check(req)
    }));
    let mut background = tokio::task::JoinSet::new();
    let mut record = None;
    match &cfg.registry {
        Registry::Coordinator(coord) => {
            background.spawn(
                heartbeat(
                    coord.clone(),
                    advertise.clone(),
                    cfg.kv_budget_bytes,
                    Credential::new(cfg.cluster_secret.clone()),
                    cfg.server.tls.clone(),
                    worker.inner.clone(),
                )
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
                draining: false,
            };
            let (rec_tx, rec_rx) = watch::channel(rec);
            let rec_tx = Arc::new(rec_tx);
            record = Some(rec_tx.clone());
            background.spawn(
                stay_registered(m.clone(), rec_rx, cfg.lease_ttl, worker.inner.clone())
                    .instrument(info_span!("membership", worker = %advertise)),
            );
            background.spawn(
                follow_placements(m.clone(), worker.clone(), advertise.clone(), rec_tx)
                    .instrument(info_span!("placement", worker = %advertise)),
            );
        }
    }
    info!(addr = %bound, "worker serving");
    let names = ["ringmoe.v1.WorkerService"];
    let drain_timeout = cfg.drain_timeout;
    let (timed_out, mut gave_up) = watch::channel(false);
    let drained = async move {
        shutdown.await;
        if !worker.drain(drain_timeout, record.as_deref()).await {
            timed_out.send_replace(true);
        }
    };
    // A drain that timed out leaves at once, its jobs' streams and data links broken as if the
    // process died: the coordinator retries them on other workers (a graceful server shutdown
    // would wait for those streams to end).
    let res = tokio::select! {
        r = server::serve(listener, routes, &names, cfg.server.tls.as_ref(), drained) => r,
        _ = gave_up.wait_for(|t| *t) => Ok(()),
    };
    background.abort_all();
    Ok(res?)
}

/// Refuses calls from deposed coordinator leaders: each call's fencing token (see
/// `ringmoe_proto::secret::FENCE_HEADER`; 0 when absent) must be at least the highest this
/// worker has seen. A leader cut off from etcd stops before its lease ends, but a call it sent
/// just before may still arrive after the next leader's first one: that call is refused.
#[derive(Clone)]
struct FenceCheck {
    highest: Arc<std::sync::atomic::AtomicU64>,
    worker: String,
}

impl FenceCheck {
    fn new(worker: String) -> Self {
        Self {
            highest: Arc::default(),
            worker,
        }
    }

    fn check(&self, req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let token = ringmoe_proto::secret::fence_of(&req);
        let seen = self
            .highest
            .fetch_max(token, std::sync::atomic::Ordering::SeqCst);
        if token < seen {
            warn!(
                worker = %self.worker,
                token,
                newest = seen,
                "refused a call from a deposed coordinator (stale fencing token)"
            );
            ringmoe_telemetry::metrics::counter(
                "ringmoe_stale_leader_calls_refused_total",
                "Calls refused because they came from a deposed coordinator leader (a fencing \
                 token below one already seen).",
                &[("worker", &self.worker)],
                1.0,
            );
            return Err(Status::failed_precondition(format!(
                "this call carries fencing token {token}, but a coordinator holding token {seen} \
                 has led since: it comes from a deposed leader and is refused"
            )));
        }
        Ok(req)
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

#[cfg(test)]
mod data_port_tests {
    use super::*;

    #[test]
    fn model_paths_must_resolve_inside_a_root() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("models");
        std::fs::create_dir_all(root.join("mixtral"))?;
        std::fs::create_dir_all(tmp.path().join("secret"))?;
        std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("escape"))?;
        let roots = vec![root.canonicalize()?];
        let inside = root.join("mixtral").display().to_string();
        anyhow::ensure!(
            confine(&roots, &inside)? == root.canonicalize()?.join("mixtral").display().to_string()
        );
        let via_dots = root.join("mixtral/../mixtral").display().to_string();
        anyhow::ensure!(confine(&roots, &via_dots).is_ok());
        let refused = |p: String| {
            confine(&roots, &p)
                .err()
                .map(|s| (s.code(), s.message().to_string()))
        };
        let outside = [
            root.join("../secret").display().to_string(),
            root.join("escape").display().to_string(),
            "/etc".to_string(),
            root.join("absent").display().to_string(),
            "../../etc".to_string(),
        ];
        for p in outside {
            let (code, msg) = refused(p.clone()).ok_or_else(|| anyhow::anyhow!("{p} passed"))?;
            anyhow::ensure!(code == tonic::Code::PermissionDenied, "{p}");
            // The same words whether the path exists or not.
            anyhow::ensure!(
                msg.ends_with("is not a directory inside this worker's model roots (--model-root)"),
                "{msg}"
            );
        }
        anyhow::ensure!(confine(&[], "/anywhere")? == "/anywhere");
        Ok(())
    }

    #[test]
    fn data_listeners_take_the_free_ports_of_the_range_in_order_then_refuse() -> anyhow::Result<()>
    {
        let host = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        // A free pair of ports: bind two at once, then let them go.
        let (lo, blocker) = loop {
            let a = TcpListener::bind((host, 0))?;
            let p = a.local_addr()?.port();
            if p < u16::MAX - 2
                && let Ok(b) = TcpListener::bind((host, p + 1))
            {
                drop(a);
                break (p, b);
            }
        };
        // lo is free, lo+1 taken by someone else, lo+2 unknown: a 2-port range gives lo, then
        // refuses (lo+1 is busy), naming the flag.
        let first = bind_data_port(host, Some(lo..=lo + 1))?;
        anyhow::ensure!(first.local_addr()?.port() == lo);
        let err = bind_data_port(host, Some(lo..=lo + 1)).err();
        let msg = err.map(|s| s.message().to_string()).unwrap_or_default();
        anyhow::ensure!(msg.contains("--data-ports"), "{msg}");
        drop(blocker);
        let second = bind_data_port(host, Some(lo..=lo + 1))?;
        anyhow::ensure!(second.local_addr()?.port() == lo + 1);
        // Without a range, the OS picks.
        anyhow::ensure!(bind_data_port(host, None)?.local_addr()?.port() != 0);
        Ok(())
    }
}
