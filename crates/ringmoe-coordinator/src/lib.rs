//! `ringmoe-coordinator`: accepts jobs over gRPC, keeps them in the durable [`JobStore`], and
//! drives them over the live workers. It never links the engine: it knows models from their
//! metadata (`ringmoe-hf`), plans with `ringmoe-plan`, and talks to workers through
//! `ringmoe-proto`.
//!
//! Where things are:
//! * [`machine`] — the sans-IO core: events in, commands out (queue, admission to a run,
//!   retries, cancellation, results);
//! * [`queue`] — the priority queue; [`retry`] — the retry policy and exclusions;
//!   [`placement`] — the placement publisher; [`run`] — one run of a job over its workers;
//! * `runtime.rs` — performs the core's commands; `service.rs` — the gRPC handlers;
//!   `admission.rs` — upload checks; [`store`] — the job store; [`output`] — job results.
//!
//! Scheduling: by default **one job at a time over every live worker**; the rest wait in the
//! queue, highest priority first, then in submission order. A long job wants all the cluster's
//! K/V memory and compute. With `--group-workers G` the live workers form groups of G (each with
//! a placement of its own) and jobs run concurrently, one per group, in queue order; a job no
//! group's K/V holds waits until every worker is free, and nothing behind it overtakes it.

pub mod admission;
pub mod auth;
pub mod balance;
pub mod convert;
pub mod error;
mod http;
pub mod machine;
mod models;
/// The OpenAI request parsing, public for the fuzz targets (`fuzz/`) and their corpus replay.
pub mod openai;
pub mod output;
pub mod placement;
pub mod queue;
pub mod retry;
pub mod run;
mod runtime;
mod service;
pub mod store;
mod telemetry;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ringmoe_membership::{Election, Membership, MemoryMembership};
use ringmoe_proto::proto::cluster_service_server::ClusterServiceServer;
use ringmoe_proto::proto::job_service_server::JobServiceServer;
use ringmoe_proto::secret::{ClusterSecret, Gate};
use ringmoe_proto::server::{self, ServerOptions};
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

pub use auth::{Auth, AuthError, Caller, Tenant};
pub use error::{CoordinatorError, JobError};
pub use http::{CHAT_DEFAULT_MAX_TOKENS, HttpConfig};
pub use models::ServedModel;
pub use output::{JobOutput, Outcome, Timings};
pub use ringmoe_hf::ModelEntry;
pub use store::{JobId, JobMode, JobSpec, JobState, JobStore, Recovered, StoreError, StoredJob};

use crate::convert::progress;
use crate::machine::{Event, Machine, MachineConfig, Report};
use crate::retry::RetryPolicy;
use crate::runtime::{Runtime, Snapshot, Watched};
use crate::service::Coordinator;

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
    /// The OpenAI-compatible HTTP API, when wanted.
    pub http: Option<HttpConfig>,
    /// Client authentication on `JobService` and the HTTP API (`--auth-tokens-file`); `None`:
    /// every client is admitted and sees every job.
    pub auth: Option<Arc<Auth>>,
    /// The cluster secret (`--cluster-secret-file`): heartbeats must carry it, and every call to
    /// a worker presents it. `None`: workers are not authenticated.
    pub cluster_secret: Option<ClusterSecret>,
    /// Uploads (`SubmitJob` streams) in progress at once; one more is `RESOURCE_EXHAUSTED`.
    pub max_uploads: usize,
    /// Longest pause between two messages of an upload before it is dropped.
    pub upload_idle: Duration,
    /// Expert rebalancing (`--rebalance-threshold`, `--expert-slots-per-worker`).
    pub balance: balance::BalanceConfig,
    /// How often a run reads its workers' expert load while it runs (besides at its end).
    pub load_interval: Duration,
    /// Workers per group (`--group-workers`): jobs run concurrently on different groups; 0: one
    /// group of every live worker (one job at a time).
    pub group_workers: usize,
    /// The most workers `desired_workers` asks for (`--max-workers`; 0: no cap).
    pub max_workers: usize,
    /// At the shutdown signal, how long a leader keeps running the jobs in flight (submissions
    /// refused, nothing new started) before it stops and hands over (`--drain-timeout-secs`;
    /// 0: at once — the job store keeps every job for the next leader).
    pub drain_timeout: Duration,
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
            http: None,
            auth: None,
            cluster_secret: None,
            max_uploads: 64,
            upload_idle: Duration::from_secs(60),
            balance: balance::BalanceConfig::default(),
            load_interval: Duration::from_secs(10),
            group_workers: 0,
            max_workers: 0,
            drain_timeout: Duration::ZERO,
        }
    }
}

/// Starts the coordinator on `listener` and serves until `shutdown` resolves.
pub async fn run_coordinator(
    listener: tokio::net::TcpListener,
    cfg: CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    // `shutdown` ends the wait for leadership at once, and the serving after the drain.
    let (signal_tx, signal_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = signal_tx.send(true);
    });
    let stop_rx = signal_rx.clone();
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let leadership = match &cfg.election {
        Some(e) => {
            let me = listener
                .local_addr()
                .map_err(|source| CoordinatorError::Io {
                    what: "local_addr",
                    source,
                })?
                .to_string();
            info!("standby: campaigning for leadership");
            // A standby waits for etcd as long as it takes: pods start in any order, and etcd
            // may start after the coordinator or be briefly unreachable.
            let mut backoff = Duration::from_millis(200);
            let l = loop {
                tokio::select! {
                    r = e.campaign(me.clone(), cfg.leader_ttl) => match r {
                        Ok(l) => break l,
                        Err(err) => warn!(
                            error = %err, retry_in = ?backoff,
                            "campaigning for leadership failed; retrying"
                        ),
                    },
                    _ = stopped(stop_rx.clone()) => return Ok(()),
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(stop_rx.clone()) => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            };
            info!(fencing_token = l.token(), "elected leader");
            Some(l)
        }
        None => None,
    };
    // An elected leader fences the store and its calls to workers with its token, so nothing a
    // deposed leader still sends or writes is taken.
    let fence = leadership.as_ref().map_or(0, |l| l.token());
    let models = models::open_all(&cfg.models)?;
    let dir = cfg.store_dir.clone();
    let (store, recovered) = tokio::task::spawn_blocking(move || match fence {
        0 => JobStore::open(&dir),
        t => JobStore::open_fenced(&dir, t),
    })
    .await
    .map_err(|e| CoordinatorError::Internal(e.to_string()))??;
    info!(
        jobs = recovered.jobs.len(),
        requeued = ?recovered.requeued,
        "job store opened"
    );
    for (id, why) in &recovered.damaged {
        tracing::error!(job = id, error = %why, "a stored job is damaged; it is listed as failed");
    }
    let mut jobs = HashMap::new();
    for j in &recovered.jobs {
        let (tx, _) = watch::channel(Snapshot::new(progress(j.id, &j.state, &Report::default())));
        jobs.insert(
            j.id,
            Watched {
                spec: j.spec.clone(),
                input_len: j.input_len,
                progress: tx,
                // Unfinished jobs continue under a new trace root (the old one ended with the
                // process that held it).
                span: (!j.state.is_finished()).then(|| {
                    let s = telemetry::job_span();
                    s.record("job.id", j.id);
                    s.record("model", j.spec.model.as_str());
                    s.record("mode", telemetry::mode(&j.spec));
                    s.record("tokens", j.input_len);
                    s.record("recovered", true);
                    s
                }),
            },
        );
    }
    let (membership, heartbeats): (Arc<dyn Membership>, _) = match &cfg.membership {
        Some(m) => (m.clone(), None),
        None => {
            let m = MemoryMembership::new(Duration::from_millis(100));
            (Arc::new(m.clone()), Some(m))
        }
    };
    let machine = Machine::new(
        MachineConfig {
            min_workers: cfg.min_workers,
            retry: RetryPolicy {
                max_retries: cfg.max_retries,
            },
            balance: cfg.balance,
            group_workers: cfg.group_workers,
        },
        models.iter().map(|(n, m)| (n.clone(), m.info())).collect(),
    );
    let max = cfg.server.max_message_bytes;
    let rt = Arc::new(Runtime::new(
        machine, store, jobs, models, membership, heartbeats, cfg,
    ));
    // Queue, workers and the autoscaling signal, refreshed at each scrape of /metrics.
    let _metrics = telemetry::collector(&rt);
    // The signal drains (runs in flight finish, up to the drain timeout), then stops the servers.
    let (stop_tx, stop_rx) = watch::channel(false);
    {
        let (rt, mut signal) = (rt.clone(), signal_rx);
        tokio::spawn(async move {
            if signal.wait_for(|s| *s).await.is_ok() {
                rt.drain().await;
            }
            let _ = stop_tx.send(true);
        });
    }
    rt.apply(Event::Recovered(recovered.jobs)).await;
    let c = Coordinator { rt: rt.clone() };
    let c_http = c.clone();
    // Every JobService call is authenticated before its handler runs (the caller travels in
    // the request's extensions); workers' heartbeats are not client calls.
    let routes = tonic::service::Routes::new(InterceptedService::new(
        JobServiceServer::new(c.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        auth::interceptor(rt.cfg.auth.clone()),
    ))
    .add_service(InterceptedService::new(
        ClusterServiceServer::new(c)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        Gate::new(rt.cfg.cluster_secret.clone(), "ClusterService"),
    ));
    let follower = tokio::spawn(runtime::follow_membership(rt.clone()));
    let names = ["ringmoe.v1.JobService", "ringmoe.v1.ClusterService"];
    let lost = async move {
        match leadership {
            Some(mut l) => l.lost().await,
            None => std::future::pending().await,
        }
    };
    let http = rt.cfg.http.clone();
    let tls = rt.cfg.server.tls.clone();
    let http_stop = stopped(stop_rx.clone());
    let http = async move {
        match http {
            Some(h) => http::serve(c_http, h, http_stop).await,
            None => std::future::pending().await,
        }
    };
    let res = tokio::select! {
        r = server::serve(listener, routes, &names, tls.as_ref(), stopped(stop_rx)) => r.map_err(CoordinatorError::from),
        r = http => r.map_err(|source| CoordinatorError::Io { what: "the HTTP API", source }),
        _ = lost => {
            tracing::error!(
                fencing_token = fence,
                "leadership lost (no lease renewal within the renew deadline): stopping every \
                 run and exiting before etcd can elect another leader"
            );
            Err(CoordinatorError::LostLeadership)
        }
    };
    follower.abort();
    rt.stop().await;
    res
}
