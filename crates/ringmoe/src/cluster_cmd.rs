//! The cluster commands: `coordinator`, `worker`, `serve` (both on this machine), `submit`,
//! `health` and `token new`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use ringmoe_coordinator::{Auth, CoordinatorConfig, ModelEntry};
use ringmoe_membership::etcd::{EtcdMembership, EtcdOptions, EtcdTls};
use ringmoe_membership::{Membership, MemoryMembership};
use ringmoe_proto::ServerOptions;
use ringmoe_proto::client::{self, Input, JobResult};
use ringmoe_proto::proto::{self, JobPhase};
use ringmoe_proto::secret::ClusterSecret;
use ringmoe_worker::{Registry, WorkerConfig, WorkerDevice};
use tokio::net::TcpListener;

use crate::forward::read_input_ids;

#[derive(Args, Clone, Debug)]
pub struct LimitOpts {
    /// Largest gRPC message accepted or sent, in bytes (uploads are chunked well below it).
    #[arg(long, default_value_t = 16 << 20)]
    max_message_bytes: usize,
}

impl LimitOpts {
    fn server(&self) -> ServerOptions {
        ServerOptions {
            max_message_bytes: self.max_message_bytes,
            tls: None,
        }
    }
}

/// TLS on this process's gRPC hops (every server command, `submit`, `health`).
#[derive(Args, Clone, Debug)]
pub struct TlsOpts {
    /// PEM certificate of this process: served by its gRPC server, and presented as its client
    /// identity where a server requires one (mTLS). Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA: the servers this process connects to must present a certificate it signed, and
    /// this process's server then requires one it signed from every client (mTLS).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

impl TlsOpts {
    /// The settings, `None` without TLS flags; `serves`: this process runs a server.
    fn load(&self, serves: bool) -> Result<Option<ringmoe_proto::tls::Tls>> {
        let files = ringmoe_proto::tls::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        };
        Ok(files.load(serves)?)
    }

    /// Server options with this process's TLS, re-read on SIGHUP or when the files change
    /// (new connections, served and dialled, use the new certificate); call inside the runtime.
    fn server(&self, limits: &LimitOpts) -> Result<ServerOptions> {
        let tls = self.load(true)?;
        if let Some(t) = &tls {
            let files = t.files();
            let paths = [&files.cert, &files.key, &files.ca];
            let t = t.clone();
            reload_on_change(
                "TLS certificate",
                paths.into_iter().flatten().cloned().collect(),
                move || t.reload().map(|()| "new connections use it".to_string()),
            )?;
        }
        Ok(ServerOptions {
            tls,
            ..limits.server()
        })
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
    fn init(
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

/// Client authentication on the job APIs (`coordinator` and `serve`).
#[derive(Args, Debug)]
pub struct AuthOpts {
    /// Admit only clients whose bearer token is listed here, one per line: `NAME sha256:HEX
    /// [admin] [max_input_tokens=N] [max_queued_jobs=N] [max_jobs_per_minute=N]` (HEX: the
    /// token's SHA-256; `ringmoe token new NAME` makes a token and its line). Each client sees
    /// only its own jobs (an `admin` one sees all). Re-read on SIGHUP and when the file changes.
    /// Unset: anyone who reaches the port is admitted.
    #[arg(long)]
    auth_tokens_file: Option<PathBuf>,
}

impl AuthOpts {
    /// Reads the tokens file (a bad one stops the server from starting) and re-reads it on
    /// every SIGHUP, and when the file changes (checked every 5 s: a Kubernetes ConfigMap or
    /// Secret volume is updated in place); call inside the runtime.
    fn open(&self) -> Result<Option<Arc<Auth>>> {
        let Some(path) = &self.auth_tokens_file else {
            return Ok(None);
        };
        let auth = Arc::new(Auth::open(path)?);
        tracing::info!(file = %path.display(), "client authentication on");
        let a = auth.clone();
        reload_on_change("tokens file", vec![path.clone()], move || {
            a.reload().map(|n| format!("{n} clients"))
        })?;
        Ok(Some(auth))
    }
}

/// Calls `reload` on every SIGHUP and whenever one of `files` changes (size or modification
/// time, checked every 5 s: a Kubernetes ConfigMap or Secret volume, a cert-manager renewal,
/// update the files in place), logging what happened; a failed reload keeps what is in force.
/// Call inside the runtime.
fn reload_on_change<E: std::fmt::Display>(
    what: &'static str,
    files: Vec<PathBuf>,
    reload: impl Fn() -> std::result::Result<String, E> + Send + 'static,
) -> Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let stamp = move || -> Vec<_> {
        files
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.len(), m.modified().ok()))
            })
            .collect()
    };
    tokio::spawn(async move {
        let mut seen = stamp();
        let mut poll = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                s = hup.recv() => if s.is_none() { break },
                _ = poll.tick() => {
                    if stamp() == seen {
                        continue;
                    }
                }
            }
            seen = stamp();
            match reload() {
                Ok(n) => tracing::info!(what, result = %n, "reloaded"),
                Err(e) => {
                    tracing::error!(what, error = %e, "not reloaded; the previous one stays in force")
                }
            }
        }
    });
    Ok(())
}

/// The coordinator ↔ worker credential (`coordinator` and `worker`).
#[derive(Args, Debug)]
pub struct ClusterSecretOpts {
    /// A file holding the cluster's shared secret (at least 16 visible ASCII characters, e.g.
    /// `openssl rand -hex 32`), the same on the coordinator and every worker: workers'
    /// heartbeats and the coordinator's calls to workers must carry it (others get
    /// UNAUTHENTICATED). Unset: the control plane admits anyone who reaches it.
    #[arg(long)]
    cluster_secret_file: Option<PathBuf>,
}

impl ClusterSecretOpts {
    fn read(&self) -> Result<Option<ClusterSecret>> {
        self.cluster_secret_file
            .as_deref()
            .map(ClusterSecret::from_file)
            .transpose()
            .map_err(Into::into)
    }
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// A fresh client token and its `--auth-tokens-file` line.
    New(TokenNewArgs),
}

#[derive(Args, Debug)]
pub struct TokenNewArgs {
    /// The client's name (letters, digits, - _ . @): the owner of its jobs.
    name: String,
    /// Write the token to this file (mode 0600) and print only the tokens-file line, so
    /// `ringmoe token new alice --token-out alice.token >> tokens` needs no copying.
    #[arg(long)]
    token_out: Option<PathBuf>,
}

/// `ringmoe token new`: without `--token-out`, the token on stdout's first line and its
/// tokens-file line on the second.
pub fn token_new(a: TokenNewArgs) -> Result<()> {
    let (token, line) = ringmoe_coordinator::auth::new_token(&a.name)?;
    // The line must parse as the server will read it (the name's characters).
    ringmoe_coordinator::auth::TokenTable::parse(&line, Path::new("the new line"))?;
    match &a.token_out {
        Some(path) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating --token-out {}", path.display()))?;
            writeln!(f, "{token}")?;
            println!("{line}");
        }
        None => println!("{token}\n{line}"),
    }
    Ok(())
}

/// Bounds on uploads (`coordinator` and `serve`).
#[derive(Args, Debug)]
pub struct UploadOpts {
    /// Job uploads (`SubmitJob` streams) in progress at once; one more is refused
    /// (RESOURCE_EXHAUSTED) rather than queued.
    #[arg(long, default_value_t = 64)]
    max_uploads: usize,
    /// Longest pause, in seconds, between two messages of an upload before it is dropped
    /// (DEADLINE_EXCEEDED).
    #[arg(long, default_value_t = 60)]
    upload_idle_secs: u64,
}

impl UploadOpts {
    fn apply(&self, cfg: &mut CoordinatorConfig) {
        cfg.max_uploads = self.max_uploads.max(1);
        cfg.upload_idle = Duration::from_secs(self.upload_idle_secs.max(1));
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
    /// Binds `addr` and prints where the API is.
    fn bind(&self, addr: &str) -> Result<ringmoe_coordinator::HttpConfig> {
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding --http-addr {addr}"))?;
        println!("http api on http://{}", l.local_addr()?);
        Ok(ringmoe_coordinator::HttpConfig {
            listener: Arc::new(l),
            max_body_bytes: self.http_max_body_bytes,
            max_jobs: self.http_max_jobs.max(1),
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
    /// Where the coordinator listens (port 0: any free port; printed on stdout's first line).
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// The job store directory.
    #[arg(long, default_value = "ringmoe-jobs")]
    store: PathBuf,
    #[command(flatten)]
    kv: KvOpts,
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

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ModeArg {
    Generate,
    Score,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum AttnArg {
    Dense,
    AShape,
    VerticalSlash,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The coordinator's address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// A UTF-8 text file (the coordinator tokenizes it).
    #[arg(
        long,
        conflicts_with_all = ["token_ids", "watch"],
        required_unless_present_any = ["token_ids", "watch"]
    )]
    file: Option<PathBuf>,
    /// Follow job ID (submitted earlier, by this or another client with the same token) to its
    /// end and print its result, instead of submitting one.
    #[arg(long, conflicts_with = "token_ids")]
    watch: Option<u64>,
    /// How long to keep reconnecting, in seconds, when the coordinator goes away while a job
    /// is followed (the job is stored there and goes on when it is back).
    #[arg(long, default_value_t = 300)]
    reconnect_secs: u64,
    /// A safetensors file with int64 `input_ids` [1, L] (as `forward` takes).
    #[arg(long)]
    token_ids: Option<PathBuf>,
    /// The model to run (default: the coordinator's only model).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, value_enum, default_value = "generate")]
    mode: ModeArg,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: u32,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "dense")]
    attention: AttnArg,
    /// Higher runs first.
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Print one JSON object (job id, final state, result: `tokens` and `text`, or `nll`)
    /// instead of text.
    #[arg(long)]
    json: bool,
    /// Print a generate job's token ids instead of its text.
    #[arg(long, conflicts_with = "json")]
    ids: bool,
    /// Tokens (or text bytes) per upload message.
    #[arg(long, default_value_t = client::UPLOAD_CHUNK)]
    chunk: usize,
    /// A file holding this client's bearer token (for a coordinator with
    /// --auth-tokens-file); or the token itself in RINGMOE_TOKEN.
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitOpts,
    #[command(flatten)]
    tls: TlsOpts,
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

fn runtime() -> Result<tokio::runtime::Runtime> {
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
    rt.block_on(async move {
        cfg.auth = a.auth.open()?;
        a.uploads.apply(&mut cfg);
        let l = bind(&a.addr).await?;
        if let Some(h) = &a.http_addr {
            cfg.http = Some(a.http.bind(h)?);
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
            advertise: a.advertise,
            kv_budget_bytes: a.kv.bytes()?,
            data_host: a.data_host.unwrap_or(l.local_addr()?.ip()),
            data_ports: a.data_ports,
            data_timeout: Duration::from_secs(300),
            server: a.tls.server(&a.limits)?,
            models,
            cluster_secret: a.secret.read()?,
            model_roots: roots,
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
            cfg.http = Some(a.http.bind(&a.http_addr)?);
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
                advertise: None,
                kv_budget_bytes: kv,
                data_host: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                data_ports: None,
                data_timeout: Duration::from_secs(300),
                server: server.clone(),
                models: models.clone(),
                cluster_secret: Some(secret.clone()),
                model_roots: Vec::new(),
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

fn phase_name(p: JobPhase) -> &'static str {
    match p {
        JobPhase::Queued => "queued",
        JobPhase::Loading => "loading",
        JobPhase::Prefill => "prefill",
        JobPhase::Decode => "decode",
        JobPhase::Done => "done",
        JobPhase::Failed => "failed",
        JobPhase::Cancelled => "cancelled",
        JobPhase::Retrying => "retrying",
        JobPhase::Unspecified => "unknown",
    }
}

fn bar(mp: &MultiProgress, len: u64, label: &str, hidden: bool) -> ProgressBar {
    let b = if hidden {
        ProgressBar::hidden()
    } else {
        mp.add(ProgressBar::new(len))
    };
    b.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_prefix(label.to_string());
    b
}

/// The job's input; `None` with `--watch` (nothing to upload).
fn read_input(a: &SubmitArgs) -> Result<Option<Input>> {
    match (&a.file, &a.token_ids, a.watch) {
        (Some(f), None, None) => Ok(Some(Input::Text(
            std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
        ))),
        (None, Some(t), None) => Ok(Some(Input::Tokens(read_input_ids(t)?))),
        (None, None, Some(_)) => Ok(None),
        _ => bail!("give exactly one of --file, --token-ids and --watch"),
    }
}

/// A new connection to the coordinator at `addr`, retried with backoff (200 ms to 5 s) for up
/// to `within`.
async fn reconnect(
    addr: &str,
    max: usize,
    token: Option<&str>,
    tls: Option<&ringmoe_proto::tls::Tls>,
    within: Duration,
) -> Result<client::Client> {
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        tokio::time::sleep(pause).await;
        match client::connect_with(addr, max, token, tls).await {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() < within => {
                tracing::debug!(error = %e.message(), "reconnecting");
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => bail!(
                "the coordinator at {addr} did not come back in {within:?}: {}",
                e.message()
            ),
        }
    }
}

/// Whether a failed call means the coordinator went away (so the job may be followed again
/// once it is back), rather than that it refused something.
fn coordinator_lost(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
}

pub fn submit(a: SubmitArgs) -> Result<()> {
    let rt = runtime()?;
    let _in_rt = rt.enter();
    let _telemetry = a.telemetry.init("ringmoe-submit", "warn")?;
    let input = read_input(&a)?;
    // With tracing on, the job's trace starts here: the coordinator continues it.
    let span = tracing::info_span!("submit", file = ?a.file);
    rt.block_on(tracing::Instrument::instrument(
        submit_async(a, input),
        span,
    ))
}

async fn submit_async(a: SubmitArgs, input: Option<Input>) -> Result<()> {
    let max = a.limits.max_message_bytes;
    let token = match &a.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading --token-file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("RINGMOE_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    let tls = a.tls.load(false)?;
    let mut c = client::connect_with(&a.addr, max, token.as_deref(), tls.as_ref()).await?;
    let quiet = a.json;
    let mp = MultiProgress::new();
    let id = match input {
        None => a.watch.context("--watch or an input")?,
        Some(input) => upload(&a, &mut c, input, &mp).await?,
    };
    let (mut prefill, mut decode): (Option<ProgressBar>, Option<ProgressBar>) = (None, None);
    // Plain output shows the answer as it is decoded (WatchJob's text pieces), on stdout.
    let live_text = !a.json && !a.ids;
    // What stdout shows of the run's text, and what the current watch has received: after a
    // reconnect the coordinator sends the run's text from its start again, and only what goes
    // past what was printed is printed.
    let mut streamed = String::new();
    let reconnect_for = Duration::from_secs(a.reconnect_secs);
    // When the coordinator was first lost: reconnecting stops `reconnect_for` after that.
    let mut lost_at: Option<std::time::Instant> = None;
    let last = loop {
        let mut session = String::new();
        let watched = client::watch(&mut c, id, |p| {
            if live_text && !p.new_text.is_empty() {
                session.push_str(&p.new_text);
                if session.len() > streamed.len()
                    && session.is_char_boundary(streamed.len())
                    && session.starts_with(streamed.as_str())
                {
                    let new = &session[streamed.len()..];
                    mp.suspend(|| {
                        use std::io::Write;
                        print!("{new}");
                        let _ = std::io::stdout().flush();
                    });
                    streamed = session.clone();
                }
            }
            match p.phase() {
                JobPhase::Prefill => {
                    let b =
                        prefill.get_or_insert_with(|| bar(&mp, p.tokens_total, "prefill", quiet));
                    b.set_length(p.tokens_total.max(1));
                    b.set_position(p.tokens_done);
                    b.set_message(format!(
                        "layer {}/{} · {:.0} tok/s · ETA {:.0}s · {} workers",
                        p.layer, p.layers, p.tokens_per_sec, p.eta_secs, p.workers
                    ));
                }
                JobPhase::Retrying => {
                    if !streamed.is_empty() {
                        // The re-run decodes from the first token again.
                        mp.suspend(|| println!());
                        streamed.clear();
                    }
                    session.clear();
                    let _ = mp.println(format!("retrying: {}", p.message));
                    // The re-run starts its phases over.
                    for b in [prefill.take(), decode.take()].into_iter().flatten() {
                        b.abandon();
                    }
                }
                JobPhase::Decode => {
                    if let Some(b) = &prefill {
                        b.finish();
                    }
                    let b = decode.get_or_insert_with(|| bar(&mp, p.tokens_total, "decode", quiet));
                    b.set_position(p.tokens_done);
                    b.set_message(format!("{:.1} tok/s", p.tokens_per_sec));
                }
                _ => {}
            }
        })
        .await;
        match watched {
            Ok(last) => break last,
            Err(s) if coordinator_lost(&s) => {
                let later = format!(
                    "follow it later with `ringmoe submit --watch {id} --addr {}`",
                    a.addr
                );
                // On stderr even with --json or without a terminal (bars may be hidden).
                mp.suspend(|| {
                    eprintln!(
                        "lost the coordinator at {} while following job {id} ({}): the job is \
                         stored there and goes on when it is back; reconnecting for up to {}s \
                         (or {later})",
                        a.addr,
                        s.message(),
                        reconnect_for.as_secs()
                    )
                });
                let left = reconnect_for.saturating_sub(
                    lost_at
                        .get_or_insert_with(std::time::Instant::now)
                        .elapsed(),
                );
                c = reconnect(&a.addr, max, token.as_deref(), tls.as_ref(), left)
                    .await
                    .with_context(|| format!("job {id} is stored on the coordinator; {later}"))?;
                mp.suspend(|| eprintln!("reconnected to {}; following job {id}", a.addr));
            }
            Err(s) => return Err(status_error(s)),
        }
    };
    for b in [prefill, decode].into_iter().flatten() {
        b.finish();
    }
    let phase = last.phase();
    if phase != JobPhase::Done {
        if a.json {
            println!(
                "{}",
                serde_json::json!({"job_id": id, "state": phase_name(phase), "message": last.message})
            );
        }
        bail!("job {id} {}: {}", phase_name(phase), last.message);
    }
    let (result, text) = client::result_with_text(&mut c, id)
        .await
        .map_err(status_error)?;
    if a.json {
        let mut o = serde_json::json!({"job_id": id, "state": "done"});
        match result {
            JobResult::Tokens(t) => {
                o["tokens"] = serde_json::json!(t);
                o["text"] = serde_json::json!(text);
            }
            JobResult::Scores(n) => {
                let mean = n.iter().map(|&x| x as f64).sum::<f64>() / n.len().max(1) as f64;
                o["nll"] = serde_json::json!(n);
                o["mean_nll"] = serde_json::json!(mean);
            }
        }
        println!("{o}");
    } else {
        match result {
            JobResult::Tokens(t) => {
                // The status line on stderr: stdout is the answer alone.
                eprintln!("job {id} done: {} tokens generated", t.len());
                match text {
                    // Already on stdout, as it was decoded.
                    Some(text) if live_text && streamed == text => println!(),
                    Some(text) if !a.ids => {
                        if !streamed.is_empty() {
                            eprintln!("\n(the streamed text differs from the result; the result:)");
                        }
                        println!("{text}")
                    }
                    _ => {
                        if !a.ids {
                            eprintln!("(the model has no tokenizer: token ids)");
                        }
                        println!(
                            "{}",
                            t.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
                        );
                    }
                }
            }
            JobResult::Scores(n) => {
                let mean = n.iter().map(|&x| x as f64).sum::<f64>() / n.len().max(1) as f64;
                println!(
                    "job {id} done: {} tokens scored, mean NLL {mean:.4}, perplexity {:.3}",
                    n.len(),
                    mean.exp()
                );
            }
        }
    }
    Ok(())
}

/// Uploads `input` as a new job (the spec from `a`'s flags) with an upload progress bar;
/// returns its id.
async fn upload(
    a: &SubmitArgs,
    c: &mut client::Client,
    input: Input,
    mp: &MultiProgress,
) -> Result<u64> {
    let quiet = a.json;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let l = c.list_jobs(proto::ListJobsRequest {}).await?.into_inner();
            match l.models.as_slice() {
                [one] => one.clone(),
                many => bail!(
                    "the coordinator serves {} models ({}); say which with --model",
                    many.len(),
                    many.join(", ")
                ),
            }
        }
    };
    let spec = proto::JobSpec {
        model,
        mode: match a.mode {
            ModeArg::Generate => proto::JobMode::Generate,
            ModeArg::Score => proto::JobMode::Score,
        } as i32,
        max_new_tokens: a.max_new_tokens,
        sampling: Some(proto::Sampling {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        }),
        attention: match a.attention {
            AttnArg::Dense => proto::AttentionMode::Dense,
            AttnArg::AShape => proto::AttentionMode::AShape,
            AttnArg::VerticalSlash => proto::AttentionMode::VerticalSlash,
        } as i32,
        priority: a.priority,
        input_length: 0,
    };
    let unit = if matches!(input, Input::Text(_)) {
        "bytes"
    } else {
        "tokens"
    };
    let up = bar(mp, input_len(&input), "upload", quiet);
    up.set_message(unit);
    let up2 = up.clone();
    let mut meta = tonic::metadata::MetadataMap::new();
    ringmoe_telemetry::propagate::TraceHeaders::current().apply(&mut meta);
    let ack = client::submit_with(c, spec, input, a.chunk, move |n| up2.set_position(n), meta)
        .await
        .map_err(status_error)?;
    up.finish_with_message(format!("{unit}: job {} accepted", ack.job_id));
    Ok(ack.job_id)
}

fn input_len(i: &Input) -> u64 {
    match i {
        Input::Tokens(t) => t.len() as u64,
        Input::Text(b) => b.len() as u64,
    }
}

/// A gRPC status as an error that names its code.
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
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
