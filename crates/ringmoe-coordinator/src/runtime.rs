//! The async runtime around the coordinator core: it feeds [`Event`]s to the [`Machine`] and
//! performs the [`Command`]s it returns — job-store writes (on blocking threads), watch-channel
//! publications, runs and probes (tasks whose results come back as events), heartbeat-registry
//! removals. Events are applied one at a time and their commands performed in order, so a
//! state is always persisted before it is published and never overtaken by a later one.

use ringmoe_proto::secret::Credential;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringmoe_membership::{
    MemberEvent, Membership, MemoryMembership, PlacementRecord, WorkerRecord,
};
use ringmoe_proto::proto;
pub(crate) use ringmoe_proto::server::lock;
use tokio::sync::{mpsc, watch};
use tonic::Status;
use tracing::{Instrument, error, info, info_span, warn};

use crate::CoordinatorConfig;
use crate::convert::progress;
use crate::machine::{Command, Event, Machine, Report, RunId, RunOrder};
use crate::models::ServedModel;
use crate::output::JobOutput;
use crate::run::{self, RunContext};
use crate::store::{JobId, JobSpec, JobState, JobStore};

/// A job as watchers and `ListJobs` see it.
pub(crate) struct Watched {
    pub spec: JobSpec,
    pub input_len: usize,
    pub progress: watch::Sender<Snapshot>,
    /// The job's trace root (`job`), open from submission (or recovery) until the job
    /// finishes; its runs are children.
    pub span: Option<tracing::Span>,
}

/// What a job's watchers see: its progress, and the tokens its current run has generated so
/// far (a log, so a slow watcher misses none although the channel keeps only the newest value).
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    pub progress: proto::JobProgress,
    pub generated: Arc<Vec<u32>>,
    /// Counts the runs that started: a new run's log starts empty.
    pub run: u64,
}

impl Snapshot {
    pub fn new(progress: proto::JobProgress) -> Self {
        Self {
            progress,
            ..Self::default()
        }
    }
}

pub(crate) struct Runtime {
    machine: Mutex<Machine>,
    /// Serialises [`Runtime::apply`]: one event and its commands at a time.
    applying: tokio::sync::Mutex<()>,
    pub store: Arc<JobStore>,
    pub jobs: Mutex<HashMap<JobId, Watched>>,
    /// Abort switches of the runs in flight.
    runs: Mutex<HashMap<RunId, watch::Sender<bool>>>,
    pub models: HashMap<String, ServedModel>,
    pub membership: Arc<dyn Membership>,
    /// The registry heartbeats feed, when workers heartbeat here instead of registering in etcd.
    pub heartbeats: Option<MemoryMembership>,
    pub cfg: CoordinatorConfig,
    /// Upload slots (`--max-uploads`).
    pub uploads: Arc<tokio::sync::Semaphore>,
    /// Each client's submissions of the last minute (`max_jobs_per_minute`).
    pub submissions: crate::auth::SubmissionRate,
    /// Set when the coordinator stops (shutdown, or lost leadership): nothing more is applied,
    /// so nothing more is written to a store another leader may now own.
    stopped: std::sync::atomic::AtomicBool,
    /// Set at the shutdown signal: submissions are refused and no run starts.
    draining: std::sync::atomic::AtomicBool,
}

impl Runtime {
    /// What this coordinator presents to workers: the cluster secret, if it has one, and its
    /// fencing token when elected.
    pub fn credential(&self) -> Credential {
        Credential::new(self.cfg.cluster_secret.clone()).fenced(self.store.fence_token())
    }

    pub fn new(
        machine: Machine,
        store: JobStore,
        jobs: HashMap<JobId, Watched>,
        models: HashMap<String, ServedModel>,
        membership: Arc<dyn Membership>,
        heartbeats: Option<MemoryMembership>,
        cfg: CoordinatorConfig,
    ) -> Self {
        Self {
            machine: Mutex::new(machine),
            applying: tokio::sync::Mutex::new(()),
            store: Arc::new(store),
            jobs: Mutex::new(jobs),
            runs: Mutex::new(HashMap::new()),
            models,
            membership,
            heartbeats,
            uploads: Arc::new(tokio::sync::Semaphore::new(cfg.max_uploads.max(1))),
            submissions: crate::auth::SubmissionRate::default(),
            cfg,
            stopped: std::sync::atomic::AtomicBool::new(false),
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the coordinator is draining (shutting down): it takes no new jobs.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The shutdown drain: refuse submissions, start no run, and wait for the runs in flight to
    /// end, at most `--drain-timeout-secs` (queued jobs stay in the store for the next leader).
    pub async fn drain(self: &Arc<Self>) {
        let timeout = self.cfg.drain_timeout;
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.apply(Event::Drain).await;
        let t = Instant::now();
        let in_flight = || self.runs.lock().map_or(0, |r| r.len());
        if !timeout.is_zero() && in_flight() > 0 {
            info!(
                runs = in_flight(),
                timeout_secs = timeout.as_secs_f64(),
                "draining: finishing the runs in flight"
            );
        }
        while in_flight() > 0 && t.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match in_flight() {
            0 => info!(secs = t.elapsed().as_secs_f64(), "drained; stopping"),
            n => warn!(
                runs = n,
                "stopping with runs in flight (--drain-timeout-secs ran out): the next leader \
                 re-runs them"
            ),
        }
    }

    /// Stops applying events and aborts the runs in flight (their workers are told to cancel).
    pub async fn stop(&self) {
        let _one_at_a_time = self.applying.lock().await;
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(runs) = self.runs.lock() {
            for a in runs.values() {
                a.send_replace(true);
            }
        }
    }

    /// Applies `ev` to the core and performs what it says, in order. (A boxed future with an
    /// explicit `Send`: runs and probes it starts apply their own events.)
    pub fn apply(
        self: &Arc<Self>,
        ev: Event,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.apply_now(ev))
    }

    async fn apply_now(self: &Arc<Self>, ev: Event) {
        let _one_at_a_time = self.applying.lock().await;
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        match &ev {
            Event::PlacementKnown(rec) => crate::telemetry::placement(&rec.model, rec.version),
            Event::Rebalanced {
                model,
                version,
                ok: true,
                ..
            } => crate::telemetry::placement(model, *version),
            Event::Load(r) => crate::telemetry::expert_imbalance(r),
            _ => {}
        }
        let cmds = match self.machine.lock() {
            Ok(mut m) => m.on(Instant::now(), ev),
            Err(_) => {
                error!("coordinator core poisoned by an earlier panic; event dropped");
                return;
            }
        };
        // A result that could not be stored turns the `Done` after it into a failure.
        let mut unstored: Option<(JobId, String)> = None;
        for c in cmds {
            match c {
                Command::Transition { id, state, report } => {
                    let state = match (&unstored, state) {
                        (Some((u, why)), JobState::Done) if *u == id => JobState::Failed {
                            message: format!("storing the result: {why}"),
                        },
                        (_, s) => s,
                    };
                    self.transition(id, state, &report).await;
                }
                Command::Publish { id, state, report } => self.publish(id, &state, &report),
                Command::StoreResult { id, output } => {
                    if let Ok(jobs) = self.jobs.lock()
                        && let Some(j) = jobs.get(&id)
                    {
                        crate::telemetry::run_done(&j.spec, j.input_len, &output);
                    }
                    if let Err(e) = self.store_result(id, output).await {
                        error!(job = id, error = %e, "storing a result");
                        unstored = Some((id, e));
                    }
                }
                Command::StartRun(order) => self.start_run(order),
                Command::AbortRun { run } => {
                    if let Ok(runs) = self.runs.lock()
                        && let Some(a) = runs.get(&run)
                    {
                        a.send_replace(true);
                    }
                }
                Command::Probe { run, workers } => {
                    let rt = self.clone();
                    let addrs = workers.into_iter().map(|w| (w.id, w.addr)).collect();
                    let max = self.cfg.server.max_message_bytes;
                    tokio::spawn(async move {
                        let tls = rt.cfg.server.tls.clone();
                        let dead = run::dead_workers(addrs, max, rt.credential(), tls).await;
                        rt.apply(Event::Probed { run, dead }).await;
                    });
                }
                Command::Rebalance { record, workers } => self.rebalance(record, workers),
                Command::ForgetWorkers(ids) => {
                    if let Some(hb) = &self.heartbeats {
                        for id in &ids {
                            hb.remove(id);
                        }
                    }
                }
            }
        }
    }

    /// Persists `state` (off the async threads), then publishes it.
    async fn transition(&self, id: JobId, state: JobState, report: &Report) {
        let store = self.store.clone();
        let s = state.clone();
        let res = tokio::task::spawn_blocking(move || store.set_state(id, s)).await;
        match res {
            Ok(Ok(())) => {
                if state.is_finished() {
                    let store_fsyncs = self.store.fsyncs();
                    info!(job = id, state = ?state, store_fsyncs, "job finished");
                    self.finish_trace(id, &state);
                }
                if let JobState::Retrying { reason, attempt } = &state {
                    warn!(job = id, attempt, %reason, "retrying the job");
                    crate::telemetry::retried(reason);
                }
                if matches!(state, JobState::Running { .. }) {
                    self.new_run(id);
                }
                self.publish(id, &state, report);
            }
            Ok(Err(e)) => error!(job = id, error = %e, "job store write failed; not published"),
            Err(e) => error!(job = id, error = %e, "job store task failed"),
        }
    }

    fn publish(&self, id: JobId, state: &JobState, report: &Report) {
        if let Ok(jobs) = self.jobs.lock()
            && let Some(j) = jobs.get(&id)
        {
            j.progress.send_modify(|s| {
                s.progress = progress(id, state, report);
                if let Some(t) = report.token {
                    Arc::make_mut(&mut s.generated).push(t);
                }
            });
        }
    }

    /// Counts the finished job and closes its trace root (the span is exported now).
    fn finish_trace(&self, id: JobId, state: &JobState) {
        if let Ok(mut jobs) = self.jobs.lock()
            && let Some(j) = jobs.get_mut(&id)
        {
            crate::telemetry::job_finished(&j.spec, state);
            if let Some(span) = j.span.take() {
                span.record("outcome", format!("{state:?}"));
            }
        }
    }

    /// The live workers and how many more are listed but excluded.
    pub fn machine_view(&self, now: Instant) -> Option<(Vec<WorkerRecord>, usize)> {
        let m = self.machine.lock().ok()?;
        let live = m.live_workers(now);
        let excluded = m.all_workers().len().saturating_sub(live.len());
        Some((live, excluded))
    }

    /// A run starts: its tokens are a new log.
    fn new_run(&self, id: JobId) {
        if let Ok(jobs) = self.jobs.lock()
            && let Some(j) = jobs.get(&id)
        {
            j.progress.send_modify(|s| {
                s.generated = Arc::default();
                s.run += 1;
            });
        }
    }

    async fn store_result(&self, id: JobId, output: JobOutput) -> Result<(), String> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.put_result(id, &output))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Runs `order` on a task; its reports and its result come back as events, in order.
    fn start_run(self: &Arc<Self>, order: RunOrder) {
        let (abort, abort_rx) = watch::channel(false);
        if let Ok(mut runs) = self.runs.lock() {
            runs.insert(order.run, abort);
        }
        let rt = self.clone();
        // A child of the job's trace root (a root of its own if the job has none).
        let parent = self
            .jobs
            .lock()
            .ok()
            .and_then(|j| j.get(&order.id).and_then(|w| w.span.as_ref()?.id()));
        let span = info_span!(parent: parent, "run", "job.id" = order.id, attempt = order.attempt);
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        // The forwarder applies the run's events in the order the run sent them.
        let forward = {
            let rt = self.clone();
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    rt.apply(ev).await;
                }
            })
        };
        tokio::spawn(
            async move {
                let result = rt.execute(&order, abort_rx, &tx).await;
                if let Ok(mut runs) = rt.runs.lock() {
                    runs.remove(&order.run);
                }
                match &result {
                    Ok(_) => info!("run done"),
                    Err(e) => warn!(error = %e, "run failed"),
                }
                let _ = tx.send(Event::RunFinished {
                    run: order.run,
                    result,
                });
                drop(tx);
                let _ = forward.await;
            }
            .instrument(span),
        );
    }

    async fn execute(
        &self,
        order: &RunOrder,
        abort: watch::Receiver<bool>,
        tx: &mpsc::UnboundedSender<Event>,
    ) -> Result<JobOutput, crate::error::JobError> {
        use crate::error::JobError;
        let model = self
            .models
            .get(&order.spec.model)
            .ok_or_else(|| JobError::UnknownModel(order.spec.model.clone()))?;
        let store = self.store.clone();
        let id = order.id;
        let tokens = tokio::task::spawn_blocking(move || store.input(id))
            .await
            .map_err(|e| JobError::Input {
                id,
                message: e.to_string(),
            })?
            .map_err(|e| JobError::Input {
                id,
                message: e.to_string(),
            })?;
        let ctx = RunContext {
            max_message_bytes: self.cfg.server.max_message_bytes,
            credential: self.credential(),
            tls: self.cfg.server.tls.clone(),
            membership: self.heartbeats.is_none().then(|| self.membership.clone()),
            load_timeout: self.cfg.load_timeout,
            load_interval: self.cfg.load_interval,
            eos: model.eos.clone(),
            layers: model.config.num_layers as u32,
        };
        run::run(&ctx, order, tokens, abort, |ev| {
            let _ = tx.send(ev);
        })
        .await
    }

    /// Has the workers load `record` in the background (published in the membership store and
    /// acknowledged there, or by `LoadModel`); the machine hears how it ended.
    fn rebalance(self: &Arc<Self>, record: PlacementRecord, workers: Vec<WorkerRecord>) {
        let rt = self.clone();
        let span = info_span!("rebalance", model = %record.model, version = record.version);
        tokio::spawn(
            async move {
                let t = Instant::now();
                let res = rt.rebalance_on(&record, &workers).await;
                let secs = t.elapsed().as_secs_f64();
                let ok = match &res {
                    Ok(bytes) => {
                        info!(
                            secs,
                            bytes_read = *bytes,
                            "rebalance acknowledged by every worker"
                        );
                        crate::telemetry::rebalanced(&record.model, *bytes, secs);
                        true
                    }
                    Err(e) => {
                        warn!(secs, error = %e, "rebalance failed; the placement in force stays");
                        false
                    }
                };
                rt.apply(Event::Rebalanced {
                    model: record.model.clone(),
                    workers: record.workers.clone(),
                    version: record.version,
                    ok,
                })
                .await;
            }
            .instrument(span),
        );
    }

    /// The I/O of a rebalance; returns the bytes the workers read.
    async fn rebalance_on(
        &self,
        record: &PlacementRecord,
        workers: &[WorkerRecord],
    ) -> Result<u64, crate::error::JobError> {
        let never = watch::channel(false).1;
        match &self.heartbeats {
            None => {
                crate::placement::publish(self.membership.as_ref(), record).await?;
                crate::placement::await_acks(
                    self.membership.as_ref(),
                    record,
                    self.cfg.load_timeout,
                    &never,
                    0,
                )
                .await?;
                let live = self
                    .membership
                    .list()
                    .await
                    .map_err(|e| crate::error::JobError::Membership(e.to_string()))?;
                Ok(live
                    .iter()
                    .filter(|w| record.workers.contains(&w.id))
                    .filter_map(|w| w.placement.as_ref())
                    .filter(|a| a.version == record.version)
                    .map(|a| a.bytes_read)
                    .sum())
            }
            Some(_) => {
                let max = self.cfg.server.max_message_bytes;
                let cred = self.credential();
                let mut clients = Vec::with_capacity(workers.len());
                for w in workers {
                    clients.push(
                        run::connect(&w.addr, max, &cred, self.cfg.server.tls.as_ref()).await?,
                    );
                }
                crate::placement::load_on_workers(&clients, record).await
            }
        }
    }

    /// The cluster as `GetClusterStatus` reports it (see the proto).
    pub fn cluster_status(&self) -> Result<proto::ClusterStatus, Status> {
        use ringmoe_plan::{Placement, expected_per_layer, planned_imbalance};
        let f = crate::telemetry::figures(self);
        let m = lock(&self.machine)?;
        let now = Instant::now();
        let busy = m.run_workers();
        // Worker groups over the schedulable workers (index = group).
        let groups: Vec<Vec<String>> = m
            .groups(&m.live_workers(now))
            .into_iter()
            .map(|g| g.into_iter().map(|w| w.id).collect())
            .collect();
        let group_of = |id: &str| groups.iter().position(|g| g.iter().any(|w| w == id));
        let mut expected: HashMap<String, f64> = HashMap::new();
        let mut measured: HashMap<String, f64> = HashMap::new();
        let mut loading: Vec<String> = Vec::new();
        let mut placements = Vec::new();
        // The worst of the latest measurements.
        let mut worst = 0f64;
        for rec in m.placements() {
            let latest = m.load_estimate(rec);
            let est = latest.filter(|e| e.version == rec.version);
            let p = Placement::from_json(&rec.placement).ok();
            let mut planned = 0.0;
            if let (Some(p), Some(e)) = (&p, est) {
                planned = planned_imbalance(p, &e.per_expert);
                let per_layer = expected_per_layer(p, &e.per_expert);
                for (rank, id) in rec.workers.iter().enumerate() {
                    let x: f64 = per_layer.iter().filter_map(|l| l.get(rank)).sum();
                    *expected.entry(id.clone()).or_default() += x;
                    *measured.entry(id.clone()).or_default() +=
                        e.per_worker.get(rank).copied().unwrap_or(0.0);
                }
            }
            let imbalance = latest.map_or(0.0, |e| e.imbalance);
            worst = worst.max(imbalance);
            let to = m.rebalancing(rec);
            if let Some(to) = to {
                // A worker is loading until it acknowledges the new version (heartbeating
                // workers answer only when done: all of them until then).
                for id in &to.workers {
                    let acked = m.all_workers().iter().any(|w| {
                        &w.id == id
                            && w.placement
                                .as_ref()
                                .is_some_and(|a| a.model == to.model && a.version == to.version)
                    });
                    if !acked {
                        loading.push(id.clone());
                    }
                }
            }
            // The group whose workers the placement covers (a placement over every worker while
            // there are several groups belongs to none of them: reported as group 0).
            let group = groups.iter().position(|g| *g == rec.workers).unwrap_or(0) as u32;
            placements.push(proto::ModelPlacement {
                model: rec.model.clone(),
                version: rec.version,
                group,
                workers: rec.workers.clone(),
                expert_imbalance: imbalance,
                planned_imbalance: planned,
                rebalances: latest.map_or(0, |e| e.rebalances),
                rebalancing_to: to.map_or(0, |r| r.version),
                measured_version: latest.map_or(0, |e| e.version),
            });
        }
        let workers = m
            .all_workers()
            .iter()
            .filter(|w| !m.is_excluded(&w.id, now))
            .map(|w| proto::WorkerStatus {
                id: w.id.clone(),
                addr: w.addr.clone(),
                device: w.device.clone(),
                state: if w.draining {
                    "draining"
                } else if busy.contains(&w.id) {
                    "busy"
                } else if loading.contains(&w.id) {
                    "loading"
                } else {
                    "ready"
                }
                .into(),
                group: group_of(&w.id).unwrap_or(0) as u32,
                kv_budget_bytes: w.kv_budget_bytes,
                expected_load: expected.get(&w.id).copied().unwrap_or(0.0),
                measured_load: measured.get(&w.id).copied().unwrap_or(0.0),
            })
            .collect();
        Ok(proto::ClusterStatus {
            workers,
            placements,
            expert_imbalance: worst,
            desired_workers: f.desired_workers,
            queued_jobs: f.queued,
            queued_tokens: f.tokens_queued,
            running_jobs: f.running,
        })
    }

    /// Live workers, sorted by id, without those found dead after a failed run.
    pub async fn live_workers(&self) -> Result<Vec<WorkerRecord>, Status> {
        let mut all = self
            .membership
            .list()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let now = Instant::now();
        let m = lock(&self.machine)?;
        all.retain(|w| !w.draining && !m.is_excluded(&w.id, now));
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }
}

/// Feeds membership to the core: the placements published before this coordinator led (so a
/// new leader continues their versions), then the live workers on every change and every
/// heartbeat interval (leases expire without an event in some stores). Re-watches when the
/// watch ends (etcd restarted, say).
pub(crate) async fn follow_membership(rt: Arc<Runtime>) {
    if rt.heartbeats.is_none() {
        let mut names: Vec<&String> = rt.models.keys().collect();
        names.sort();
        for name in names {
            loop {
                match rt.membership.placement(name).await {
                    Ok(found) => {
                        if let Some(r) = found {
                            rt.apply(Event::PlacementKnown(r)).await;
                        }
                        break;
                    }
                    Err(e) => {
                        warn!(model = %name, error = %e, "reading the published placement");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }
    // Aborted with this task (the guard drops when the coordinator aborts the follower).
    let _relist = AbortOnDrop({
        let rt = rt.clone();
        tokio::spawn(async move {
            loop {
                relist_workers(&rt).await;
                tokio::time::sleep(rt.cfg.heartbeat_interval).await;
            }
        })
    });
    loop {
        match rt.membership.watch().await {
            Ok((now, mut rx)) => {
                info!(workers = now.len(), "membership");
                rt.apply(Event::Workers(now)).await;
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
                    rt.apply(Event::WorkerMentioned(id)).await;
                    relist_workers(&rt).await;
                }
                warn!("membership watch ended; watching again");
            }
            Err(e) => warn!(error = %e, "membership unavailable"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn relist_workers(rt: &Arc<Runtime>) {
    match rt.membership.list().await {
        Ok(list) => rt.apply(Event::Workers(list)).await,
        Err(e) => {
            tracing::debug!(error = %e, "listing workers");
            rt.apply(Event::Tick).await;
        }
    }
}
