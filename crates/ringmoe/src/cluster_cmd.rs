//! The cluster commands: `coordinator`, `worker`, `serve` (both on this machine), `submit`
//! and `health`. Their security flags live in `security_opts.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use ringmoe_coordinator::{CoordinatorConfig, ModelEntry};
use ringmoe_membership::etcd::{EtcdMembership, EtcdOptions, EtcdTls};
use ringmoe_membership::{Membership, MemoryMembership};
use ringmoe_proto::ServerOptions;
use ringmoe_proto::client;
use ringmoe_proto::secret::ClusterSecret;
use ringmoe_worker::{Registry, WorkerConfig, WorkerDevice};
use tokio::net::TcpListener;

use crate::security_opts::{AuthOpts, ClusterSecretOpts, TlsOpts, UploadOpts};

#[derive(Args, Clone, Debug)]
pub struct LimitOpts {
    /// Largest gRPC message accepted or sent, in bytes (uploads are chunked well below it).
    #[arg(long, default_value_t = 16 << 20)]
    pub(crate) max_message_bytes: usize,
}

impl LimitOpts {
    pub(crate) fn server(&self) -> ServerOptions {
        ServerOptions {
            max_message_bytes: self.max_message_bytes,
            tls: None,
        }
    }
}

/// Logs and traces (every server command and `submit`).
#[derive(Args, Clone, Debug)]
pub struct TelemetryOpts {
    /// Where traces go: an OTLP/gRPC endpoint (`http://HOST:4317`). Default: the standard
    /// OTEL_EXPORTER_OTLP_ENDPOINT; neither: no traces (and no cost).
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Log lines on stderr: `text`, or `json` (one object per line, with the trace id).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

impl TelemetryOpts {
    /// Sets up logs and traces; call inside the runtime (the exporter's channel lives on it).
    /// The returned guard flushes queued spans when dropped.
    pub(crate) fn init(
        &self,
        service: &'static str,
        default_filter: &'static str,
    ) -> Result<ringmoe_telemetry::Telemetry> {
        Ok(ringmoe_telemetry::init(ringmoe_telemetry::Options {
            service,
            default_filter,
            log_format: self.log_format.parse()?,
            otlp_endpoint: self.otlp_endpoint.clone(),
        })?)
    }
}

/// Binds `--metrics-addr` and serves `GET /metrics` there on the current runtime, printing
/// `metrics on http://ADDR/metrics`.
fn serve_metrics(addr: Option<&str>) -> Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding --metrics-addr {addr}"))?;
    println!("metrics on http://{}/metrics", l.local_addr()?);
    tokio::spawn(async move {
        if let Err(e) = ringmoe_telemetry::metrics::serve(l, std::future::pending()).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(())
}

/// etcd membership (optional: without it workers heartbeat to the coordinator).
#[derive(Args, Clone, Debug)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (`host:port` or `http://host:port`).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Keys live under `/<cluster>/`, so several clusters can share one etcd.
    #[arg(long, default_value = "ringmoe")]
    cluster: String,
    /// etcd user, when etcd authentication is on (the password comes from --etcd-password or
    /// the RINGMOE_ETCD_PASSWORD environment variable).
    #[arg(long, requires = "etcd")]
    etcd_user: Option<String>,
    #[arg(long, env = "RINGMOE_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// TLS to etcd: the CA (PEM) that signed etcd's certificate. Turns TLS on.
    #[arg(long, requires = "etcd")]
    etcd_ca: Option<PathBuf>,
    /// TLS client certificate and key (PEM), when etcd runs with --client-cert-auth.
    #[arg(long, requires_all = ["etcd_ca", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    #[arg(long, requires_all = ["etcd_ca", "etcd_cert"])]
    etcd_key: Option<PathBuf>,
    /// The name etcd's certificate is checked against (default: the endpoint's host).
    #[arg(long, requires = "etcd_ca")]
    etcd_domain: Option<String>,
}

impl EtcdArgs {
    /// The membership store, when `--etcd` is given.
    async fn membership(&self) -> Result<Option<Arc<dyn Membership>>> {
        Ok(self
            .etcd()
            .await?
            .map(|m| Arc::new(m) as Arc<dyn Membership>))
    }

    async fn etcd(&self) -> Result<Option<EtcdMembership>> {
        if self.etcd.is_empty() {
            return Ok(None);
        }
        let opts = EtcdOptions {
            endpoints: self.etcd.clone(),
            cluster: self.cluster.clone(),
            user: self
                .etcd_user
                .clone()
                .map(|u| (u, self.etcd_password.clone().unwrap_or_default())),
            tls: self.etcd_ca.clone().map(|ca| EtcdTls {
                ca,
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
                domain: self.etcd_domain.clone(),
            }),
        };
        Ok(Some(EtcdMembership::connect(opts).await?))
    }
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// Where to listen (port 0: any free port; the bound address is stdout's first line).
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// The job store directory (created if missing; reloaded on restart).
    #[arg(long, alias = "job-store")]
    store: PathBuf,
    /// A model to serve: `DIR` (named after the directory) or `NAME=DIR`. Repeatable. DIR must
    /// be the same path on every worker.
    #[arg(long = "model", required = true)]
    models: Vec<String>,
    /// Jobs wait until this many workers are live.
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    /// Times a job re-runs after losing a worker before it fails.
    #[arg(long, default_value_t = 3)]
    max_retries: u32,
    /// With --etcd: leadership lease TTL in seconds (how soon a standby takes over).
    #[arg(long, default_value_t = 2)]
    leader_ttl_secs: u64,
    /// How long workers may take to load a placement's weights before the job fails.
    #[arg(long, default_value_t = 600)]
    load_timeout_secs: u64,
    /// After SIGTERM, seconds to keep running the jobs in flight (new submissions refused,
    /// nothing new started) before stopping; what is left re-runs on the next leader. Keep it
    /// below the pod's terminationGracePeriodSeconds.
    #[arg(long, default_value_t = 30)]
    drain_timeout_secs: u64,
    #[command(flatten)]
    balance: BalanceOpts,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    limits: LimitOpts,
    #[command(flatten)]
    tls: TlsOpts,
    /// Where the OpenAI-compatible HTTP API listens (off unless given; port 0: any free port,
    /// printed on stdout as `http api on http://ADDR`).
    #[arg(long)]
    http_addr: Option<String>,
    #[command(flatten)]
    http: HttpOpts,
    #[command(flatten)]
    auth: AuthOpts,
    #[command(flatten)]
    uploads: UploadOpts,
    #[command(flatten)]
    secret: ClusterSecretOpts,
    /// Where Prometheus scrapes `GET /metrics` (off unless given; port 0: any free port,
    /// printed on stdout as `metrics on http://ADDR/metrics`).
    #[arg(long)]
    metrics_addr: Option<String>,
    #[command(flatten)]
    telemetry: TelemetryOpts,
}

/// Expert load balancing, worker groups and the autoscaling signal (`coordinator` and `serve`).
#[derive(Args, Clone, Debug)]
pub struct BalanceOpts {
    /// Republish the expert placement when the measured imbalance (busiest worker's expert
    /// rows over the mean's, summed over layers) exceeds this; 0: never rebalance.
    #[arg(long, default_value_t = 1.25)]
    rebalance_threshold: f64,
    /// Experts a worker may host per layer when rebalancing (replicas of hot experts use the
    /// spare slots); 0: one more than an even split, ⌈experts / workers⌉ + 1.
    #[arg(long, default_value_t = 0)]
    expert_slots_per_worker: usize,
    /// How often a running job's expert load is read (it is also read after every job).
    #[arg(long, default_value_t = 10)]
    load_interval_secs: u64,
    /// Split the workers into groups of this many (sorted by id; the remainder joins the last
    /// group), each with an expert placement of its own, and run jobs concurrently, one per
    /// group; a job whose K/V no group holds waits for every worker. 0: one group of all
    /// workers, one job at a time.
    #[arg(long, default_value_t = 0)]
    group_workers: usize,
    /// The most workers the autoscaling signal (`desired_workers`) asks for; 0: no cap.
    #[arg(long, default_value_t = 0)]
    max_workers: usize,
}

impl BalanceOpts {
    fn apply(&self, cfg: &mut CoordinatorConfig) -> Result<()> {
        if !(self.rebalance_threshold == 0.0 || self.rebalance_threshold >= 1.0) {
            bail!(
                "--rebalance-threshold must be 0 (off) or at least 1.0 (perfect balance), not {}",
                self.rebalance_threshold
            );
        }
        cfg.balance = ringmoe_coordinator::balance::BalanceConfig {
            threshold: self.rebalance_threshold,
            slots_per_worker: self.expert_slots_per_worker,
        };
        cfg.load_interval = Duration::from_secs(self.load_interval_secs.max(1));
        cfg.group_workers = self.group_workers;
        cfg.max_workers = self.max_workers;
        Ok(())
    }
}

/// The HTTP API's limits (`coordinator` and `serve`).
#[derive(Args, Clone, Debug)]
pub struct HttpOpts {
    /// Largest HTTP request body; longer inputs (million-token jobs) belong on gRPC, which
    /// uploads in chunks (`ringmoe submit --file`).
    #[arg(long, default_value_t = 16 << 20)]
    http_max_body_bytes: usize,
    /// Unfinished jobs (from any API) past which HTTP requests get 429 Too Many Requests.
    #[arg(long, default_value_t = 256)]
    http_max_jobs: usize,
}

impl HttpOpts {
    /// Binds `addr` and prints where the API is: HTTPS with the server's certificate when
    /// `tls` has one.
    fn bind(
        &self,
        addr: &str,
        tls: Option<&ringmoe_proto::tls::Tls>,
    ) -> Result<ringmoe_coordinator::HttpConfig> {
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding --http-addr {addr}"))?;
        let tls = tls.filter(|t| t.http_server().is_some()).cloned();
        let scheme = if tls.is_some() { "https" } else { "http" };
        println!("http api on {scheme}://{}", l.local_addr()?);
        Ok(ringmoe_coordinator::HttpConfig {
            listener: Arc::new(l),
            max_body_bytes: self.http_max_body_bytes,
            max_jobs: self.http_max_jobs.max(1),
            tls,
        })
    }
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The coordinator's address (workers heartbeat to it), unless --etcd is given.
    #[arg(long, required_unless_present = "etcd")]
    coordinator: Option<String>,
    /// Lease TTL in etcd, seconds: how long a dead worker stays listed.
    #[arg(long, default_value_t = 5)]
    lease_ttl_secs: u64,
    /// A model on this worker's disk: `DIR` (named after the directory) or `NAME=DIR`;
    /// repeatable. Checked at start. Models the coordinator serves that are not given here load
    /// from the coordinator's path (a shared volume).
    #[arg(long = "model")]
    models: Vec<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Where this worker's gRPC server listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: String,
    /// The address the coordinator should use for this worker (default: the bound address).
    #[arg(long)]
    advertise: Option<String>,
    /// The IP job data-plane connections bind to and peers reach (default: the listen IP).
    #[arg(long)]
    data_host: Option<std::net::IpAddr>,
    /// Ports job data-plane listeners take, `LO-HI`, the first free one (default: any), so a
    /// firewall or NetworkPolicy can name them. One per job prepared at once: a few suffice.
    #[arg(long, value_parser = parse_port_range)]
    data_ports: Option<std::ops::RangeInclusive<u16>>,
    #[command(flatten)]
    kv: KvOpts,
    #[command(flatten)]
    limits: LimitOpts,
    #[command(flatten)]
    tls: TlsOpts,
    /// `cpu`, or `cuda:N`: this worker's weights, K/V and compute on GPU N, its jobs'
    /// transfers over NCCL (needs a `--features cuda` build; every worker of a job on a GPU).
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    device: crate::DeviceArg,
    /// Weight precision on a GPU: bf16 (serving) or f32 (parity).
    #[arg(long, default_value = "bf16")]
    precision: ringmoe_cuda::Precision,
    #[command(flatten)]
    weights: crate::WeightsOpts,
    /// Where Prometheus scrapes `GET /metrics` (off unless given; printed on stdout).
    #[arg(long)]
    metrics_addr: Option<String>,
    #[command(flatten)]
    secret: ClusterSecretOpts,
    /// Load models only from inside this directory (repeatable): a `LoadModel` or published
    /// placement naming a path outside every root (after following symlinks and `..`) is
    /// refused, and so is a `--model` outside them. Unset: any directory this process can read.
    #[arg(long = "model-root")]
    model_roots: Vec<PathBuf>,
    /// TLS on the data plane too (activations and K/V between workers), with this worker's
    /// --tls-cert, --tls-key and --tls-ca: peers must present a certificate the CA signed. Every
    /// worker of a cluster must set it or none: a plain peer cannot join a TLS worker's job.
    #[arg(long, requires_all = ["tls_cert", "tls_key", "tls_ca"])]
    data_tls: bool,
    /// After SIGTERM, seconds to finish the current job before leaving (the worker is marked
    /// draining meanwhile: nothing new is scheduled on it); a job still running then is retried
    /// on other workers. Keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, default_value_t = 600)]
    drain_timeout_secs: u64,
    #[command(flatten)]
    telemetry: TelemetryOpts,
}

/// `LO-HI` (inclusive), `0 < LO <= HI`.
fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|e| format!("{s:?}: want LO-HI, two ports: {e}"))
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: want LO-HI with 0 < LO <= HI"));
    }
    Ok(lo..=hi)
}

#[derive(Args, Clone, Debug)]
pub struct KvOpts {
    /// GiB of K/V cache per worker; the coordinator refuses jobs longer than the workers hold.
    #[arg(long, default_value_t = 8.0)]
    kv_budget_gib: f64,
}

impl KvOpts {
    fn bytes(&self) -> Result<u64> {
        if !(self.kv_budget_gib.is_finite() && self.kv_budget_gib > 0.0) {
            bail!(
                "--kv-budget-gib must be a positive number, got {}",
                self.kv_budget_gib
            );
        }
        Ok((self.kv_budget_gib * (1u64 << 30) as f64) as u64)
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A model to serve: `DIR` or `NAME=DIR`. Repeatable.
    #[arg(long = "model", required = true)]
    models: Vec<String>,
    /// Worker count (each holds a shard of every sequence and 1/N of the experts).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[command(flatten)]
    weights: crate::WeightsOpts,
    /// Where the coordinator listens (port 0: any free port; printed on stdout's first line).
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// The job store directory.
    #[arg(long, default_value = "ringmoe-jobs")]
    store: PathBuf,
    #[command(flatten)]
    kv: KvOpts,
    #[command(flatten)]
    balance: BalanceOpts,
    #[command(flatten)]
    limits: LimitOpts,
    #[command(flatten)]
    tls: TlsOpts,
    /// Where the OpenAI-compatible HTTP API listens (port 0: any free port; the address is
    /// printed on stdout as `http api on http://ADDR`).
    #[arg(long, default_value = "127.0.0.1:8000")]
    http_addr: String,
    /// No HTTP API (gRPC only).
    #[arg(long, conflicts_with = "http_addr")]
    no_http: bool,
    #[command(flatten)]
    http: HttpOpts,
    #[command(flatten)]
    auth: AuthOpts,
    #[command(flatten)]
    uploads: UploadOpts,
    /// Where Prometheus scrapes `GET /metrics` for the coordinator and its workers (port 0:
    /// any free port; printed on stdout as `metrics on http://ADDR/metrics`).
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: String,
    /// No metrics endpoint.
    #[arg(long, conflicts_with = "metrics_addr")]
    no_metrics: bool,
    #[command(flatten)]
    telemetry: TelemetryOpts,
}

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The server's address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// The service to ask about (`ringmoe.v1.JobService`, `ringmoe.v1.WorkerService`, ...);
    /// empty: the server as a whole.
    #[arg(long, default_value = "")]
    service: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
    #[command(flatten)]
    tls: TlsOpts,
}

pub fn health(a: HealthArgs) -> Result<()> {
    let tls = a.tls.load(false)?;
    let ask = client::health(&a.addr, &a.service, tls.as_ref());
    let serving = runtime()?.block_on(async {
        tokio::time::timeout(Duration::from_secs(a.timeout_secs.max(1)), ask)
            .await
            .with_context(|| format!("{}: no health answer in {}s", a.addr, a.timeout_secs))?
            .map_err(|s| anyhow::anyhow!("{}: {}", a.addr, s.message()))
    })?;
    if !serving {
        bail!("{}: not serving {:?}", a.addr, a.service);
    }
    println!("serving");
    Ok(())
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn model_entries(specs: &[String]) -> Result<Vec<ModelEntry>> {
    specs
        .iter()
        .map(|s| {
            let (name, dir) = match s.split_once('=') {
                Some((n, d)) => (n.to_string(), PathBuf::from(d)),
                None => {
                    let dir = PathBuf::from(s);
                    let name = dir
                        .canonicalize()
                        .ok()
                        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                        .with_context(|| format!("--model {s}: not a directory name"))?;
                    (name, dir)
                }
            };
            let path = dir
                .canonicalize()
                .with_context(|| format!("--model {s}: {}", dir.display()))?;
            Ok(ModelEntry { name, path })
        })
        .collect()
}

async fn bind(addr: &str) -> Result<TcpListener> {
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    // The first line of stdout: scripts and tests read the bound address from it.
    println!("listening on {}", l.local_addr()?);
    Ok(l)
}

pub fn coordinator(a: CoordinatorArgs) -> Result<()> {
    let rt = runtime()?;
    let _in_rt = rt.enter();
    let _telemetry = a.telemetry.init("ringmoe-coordinator", "info")?;
    let mut cfg = CoordinatorConfig::new(a.store, model_entries(&a.models)?);
    cfg.cluster_secret = a.secret.read()?;
    cfg.server = a.tls.server(&a.limits)?;
    cfg.min_workers = a.min_workers;
    cfg.max_retries = a.max_retries;
    cfg.load_timeout = Duration::from_secs(a.load_timeout_secs.max(1));
    cfg.drain_timeout = Duration::from_secs(a.drain_timeout_secs);
    a.balance.apply(&mut cfg)?;
    rt.block_on(async move {
        cfg.auth = a.auth.open()?;
        a.uploads.apply(&mut cfg);
        let l = bind(&a.addr).await?;
        if let Some(h) = &a.http_addr {
            cfg.http = Some(a.http.bind(h, cfg.server.tls.as_ref())?);
        }
        serve_metrics(a.metrics_addr.as_deref())?;
        if let Some(m) = a.etcd.etcd().await? {
            // Replicas share the job store (a shared volume) and elect a leader through etcd.
            cfg.membership = Some(Arc::new(m.clone()));
            cfg.election = Some(Arc::new(m));
            cfg.leader_ttl = Duration::from_secs(a.leader_ttl_secs.max(1));
        }
        ringmoe_coordinator::run_coordinator(l, cfg, shutdown_signal()).await?;
        Ok(())
    })
}

/// Model entries whose `config.json` parses and whose safetensors headers are whole (every
/// tensor inside its file: a truncated download is caught here): a worker or `serve` given a
/// bad directory says so at start, not at every job. Only headers are read (the weights are
/// memory-mapped, not loaded).
fn checked_models(specs: &[String]) -> Result<Vec<ModelEntry>> {
    let models = model_entries(specs)?;
    for m in &models {
        let what = || format!("--model {}={}", m.name, m.path.display());
        ringmoe_model::ModelConfig::from_dir(&m.path).with_context(what)?;
        ringmoe_model::Checkpoint::open(&m.path).with_context(what)?;
    }
    Ok(models)
}

pub fn worker(a: WorkerArgs) -> Result<()> {
    let rt = runtime()?;
    let _in_rt = rt.enter();
    let _telemetry = a.telemetry.init("ringmoe-worker", "info")?;
    let models = checked_models(&a.models)?;
    let roots = a
        .model_roots
        .iter()
        .map(|r| {
            r.canonicalize()
                .with_context(|| format!("--model-root {}", r.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(m) = models
        .iter()
        .find(|m| !roots.is_empty() && !roots.iter().any(|r| m.path.starts_with(r)))
    {
        bail!(
            "--model {}={} is outside every --model-root",
            m.name,
            m.path.display()
        );
    }
    rt.block_on(async move {
        let l = bind(&a.addr).await?;
        serve_metrics(a.metrics_addr.as_deref())?;
        let registry = match (a.etcd.membership().await?, a.coordinator) {
            (Some(m), _) => Registry::Membership(m),
            (None, Some(c)) => Registry::Coordinator(c),
            (None, None) => bail!("give --coordinator or --etcd"),
        };
        let cfg = WorkerConfig {
            registry,
            lease_ttl: Duration::from_secs(a.lease_ttl_secs.max(1)),
            device: match a.device {
                crate::DeviceArg::Cpu => WorkerDevice::Cpu,
                crate::DeviceArg::Cuda(ordinal) => WorkerDevice::Cuda {
                    ordinal,
                    precision: a.precision,
                },
            },
            weights: a.weights.weights,
            advertise: a.advertise,
            kv_budget_bytes: a.kv.bytes()?,
            data_host: a.data_host.unwrap_or(l.local_addr()?.ip()),
            data_ports: a.data_ports,
            data_timeout: Duration::from_secs(300),
            server: a.tls.server(&a.limits)?,
            models,
            cluster_secret: a.secret.read()?,
            model_roots: roots,
            data_tls: a.data_tls,
            drain_timeout: Duration::from_secs(a.drain_timeout_secs),
        };
        ringmoe_worker::run_worker(l, cfg, shutdown_signal()).await?;
        Ok(())
    })
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let rt = runtime()?;
    let _in_rt = rt.enter();
    let _telemetry = a.telemetry.init("ringmoe-serve", "info")?;
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let models = checked_models(&a.models)?;
    let mut cfg = CoordinatorConfig::new(a.store.clone(), models.clone());
    // The same TLS on the coordinator's server and every in-process worker's hop.
    let server = a.tls.server(&a.limits)?;
    cfg.server = server.clone();
    cfg.min_workers = a.workers;
    a.balance.apply(&mut cfg)?;
    // The coordinator and its in-process workers share a secret no other process knows, so
    // their loopback control ports serve only each other.
    let secret = ClusterSecret::random()?;
    cfg.cluster_secret = Some(secret.clone());
    let kv = a.kv.bytes()?;
    rt.block_on(async move {
        cfg.auth = a.auth.open()?;
        a.uploads.apply(&mut cfg);
        let l = bind(&a.addr).await?;
        let coord = l.local_addr()?.to_string();
        if !a.no_http {
            cfg.http = Some(a.http.bind(&a.http_addr, cfg.server.tls.as_ref())?);
        }
        if !a.no_metrics {
            serve_metrics(Some(&a.metrics_addr))?;
        }
        // Coordinator and workers share one in-process membership: no etcd, no heartbeats.
        let members = MemoryMembership::new(Duration::from_millis(100));
        cfg.membership = Some(Arc::new(members.clone()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..a.workers {
            let wl = TcpListener::bind("127.0.0.1:0").await?;
            let wcfg = WorkerConfig {
                registry: Registry::Membership(Arc::new(members.clone())),
                lease_ttl: Duration::from_secs(3),
                device: WorkerDevice::Cpu,
                weights: a.weights.weights,
                advertise: None,
                kv_budget_bytes: kv,
                data_host: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                data_ports: None,
                data_timeout: Duration::from_secs(300),
                server: server.clone(),
                models: models.clone(),
                cluster_secret: Some(secret.clone()),
                model_roots: Vec::new(),
                // The workers of `serve` talk over loopback inside one process.
                data_tls: false,
                // `serve` stops its coordinator too: nothing to drain for.
                drain_timeout: Duration::ZERO,
            };
            let run = ringmoe_worker::run_worker(wl, wcfg, stopped(stop_rx.clone()));
            tasks.spawn(async move { run.await.map_err(anyhow::Error::from) });
        }
        let cfg_http = cfg.http.clone();
        let run = ringmoe_coordinator::run_coordinator(l, cfg, stopped(stop_rx.clone()));
        tasks.spawn(async move { run.await.map_err(anyhow::Error::from) });
        let http = match &cfg_http {
            Some(h) => format!(", OpenAI API on http://{}/v1", h.listener.local_addr()?),
            None => String::new(),
        };
        eprintln!(
            "ringmoe serve: coordinator on {coord}{http} with {} workers, job store {}",
            a.workers,
            a.store.display()
        );
        tokio::select! {
            _ = shutdown_signal() => {}
            r = tasks.join_next() => {
                if let Some(Ok(Err(e))) = r {
                    return Err(e);
                }
            }
        }
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::parse_port_range;

    #[test]
    fn port_ranges_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_port_range("7100-7107"), Ok(7100..=7107));
        assert_eq!(parse_port_range("7100"), Ok(7100..=7100));
        for bad in ["0-3", "9-3", "a-b", "7100-70000", "-", ""] {
            assert!(parse_port_range(bad).is_err(), "{bad} was accepted");
        }
    }
}
