//! One run of a job over its workers — the I/O of a [`RunOrder`]: connect, have every worker
//! hold the run's placement (the publisher in `placement.rs`), bind each worker's data-plane
//! port, stream each its shard, start them with their peers' addresses, then merge their event
//! streams into progress reports and the [`JobOutput`].
//!
//! The run reports through `report` (progress and the placement it published); its result is
//! the return value. It never writes the store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ringmoe_membership::Membership;
use ringmoe_plan::{ShardPlan, Sharding};
use ringmoe_proto::proto::worker_service_client::WorkerServiceClient;
use ringmoe_proto::proto::{self, shard_chunk, worker_event};
use ringmoe_proto::secret::Credential;
use ringmoe_proto::tls::Tls;
use ringmoe_telemetry::propagate::TraceHeaders;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::{Instrument, info, info_span, warn};

use crate::balance::LoadReading;
use crate::error::{JobError, WorkerStep};
use crate::machine::{Event, Report, RunOrder};
use crate::output::{JobOutput, Outcome, Timings};
use crate::placement;
use crate::store::{JobMode, JobState};

/// A connection to a worker that presents the cluster secret (when there is one) on every call.
pub type WorkerClient = WorkerServiceClient<InterceptedService<Channel, Credential>>;

/// What a run needs besides its order.
pub struct RunContext {
    pub max_message_bytes: usize,
    /// TLS to the workers (`--tls-*`).
    pub tls: Option<Tls>,
    /// The cluster secret the workers require (`--cluster-secret-file`).
    pub credential: Credential,
    /// Where placements are published and acknowledged; `None`: workers heartbeat and get the
    /// placement by `LoadModel`.
    pub membership: Option<Arc<dyn Membership>>,
    pub load_timeout: Duration,
    /// How often the run reads its workers' expert load while it runs.
    pub load_interval: Duration,
    /// EOS token ids of each served model.
    pub eos: Vec<u32>,
    pub layers: u32,
}

/// Tokens per shard chunk on the wire.
const SHARD_CHUNK: usize = 64 * 1024;

pub async fn connect(
    addr: &str,
    max: usize,
    cred: &Credential,
    tls: Option<&Tls>,
) -> Result<WorkerClient, JobError> {
    let bad = |e: &dyn std::fmt::Display| JobError::Connect {
        addr: addr.to_string(),
        message: e.to_string(),
    };
    let channel = ringmoe_proto::tls::endpoint(addr, tls)
        .map_err(|e| bad(&e))?
        .connect()
        .await
        .map_err(|e| bad(&e))?;
    Ok(WorkerServiceClient::with_interceptor(channel, cred.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
}

/// A fresh data-plane token for one run: 32 bytes from the system's random source, handed to
/// the run's workers in `PrepareJob` and presented in every data-plane hello.
fn data_token() -> Result<Vec<u8>, JobError> {
    ringmoe_proto::secret::random_bytes()
        .map(|t| t.to_vec())
        .map_err(|e| JobError::Internal(e.to_string()))
}

/// Runs `f` on every worker concurrently; results by rank, or the first error.
pub async fn on_every<T, F, Fut>(clients: &[WorkerClient], f: F) -> Result<Vec<T>, JobError>
where
    T: Send + 'static,
    F: Fn(usize, WorkerClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, JobError>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for (r, c) in clients.iter().enumerate() {
        let fut = f(r, c.clone());
        set.spawn(async move { (r, fut.await) });
    }
    let mut out: Vec<Option<T>> = (0..clients.len()).map(|_| None).collect();
    while let Some(j) = set.join_next().await {
        let (r, v) = j.map_err(|e| JobError::Internal(format!("a worker request task: {e}")))?;
        out[r] = Some(v?);
    }
    Ok(out.into_iter().flatten().collect())
}

/// Workers of `workers` that do not answer `ReportLoad` within two seconds.
pub async fn dead_workers(
    addrs: Vec<(String, String)>,
    max: usize,
    cred: Credential,
    tls: Option<Tls>,
) -> Vec<String> {
    let mut set = JoinSet::new();
    for (id, addr) in addrs {
        let (cred, tls) = (cred.clone(), tls.clone());
        set.spawn(async move {
            let alive = tokio::time::timeout(Duration::from_secs(2), async {
                let mut c = connect(&addr, max, &cred, tls.as_ref()).await.ok()?;
                c.report_load(proto::ReportLoadRequest::default())
                    .await
                    .ok()
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

/// How long an aborted run may take to stop its workers before it is dropped: a worker cut
/// off from the network answers nothing, and the run must not wait for it.
const ABORT_GRACE: Duration = Duration::from_secs(10);

/// Carries out `order` over its workers on `tokens` (the job's input); `abort` turns true when
/// the job is cancelled, or a worker of the run left the membership. An aborted run cancels
/// its part on every worker it can reach and ends within [`ABORT_GRACE`] whatever the network
/// does; dropping it closes its streams, which stops the workers that miss the cancel.
pub async fn run(
    ctx: &RunContext,
    order: &RunOrder,
    tokens: Vec<u32>,
    abort: watch::Receiver<bool>,
    report: impl Fn(Event),
) -> Result<JobOutput, JobError> {
    let mut stop = abort.clone();
    let inner = run_inner(ctx, order, tokens, abort, report);
    tokio::pin!(inner);
    tokio::select! {
        r = &mut inner => r,
        () = async {
            // A dropped sender is no abort: then only the run's own end counts.
            if stop.wait_for(|a| *a).await.is_err() {
                std::future::pending::<()>().await;
            }
        } => {
            match tokio::time::timeout(ABORT_GRACE, &mut inner).await {
                Ok(r) => r,
                Err(_) => {
                    warn!(
                        job = order.id,
                        "the aborted run did not stop within {ABORT_GRACE:?}; dropping it"
                    );
                    Err(JobError::Cancelled { id: order.id })
                }
            }
        }
    }
}

async fn run_inner(
    ctx: &RunContext,
    order: &RunOrder,
    tokens: Vec<u32>,
    mut abort: watch::Receiver<bool>,
    report: impl Fn(Event),
) -> Result<JobOutput, JobError> {
    let id = order.id;
    let started = Instant::now();
    let len = tokens.len();
    let p = order.workers.len();
    let max = ctx.max_message_bytes;
    let mut clients = Vec::with_capacity(p);
    for w in &order.workers {
        clients.push(connect(&w.addr, max, &ctx.credential, ctx.tls.as_ref()).await?);
    }
    info!(workers = p, tokens = len, "loading");
    let rec = &order.placement;
    let placing = info_span!("placement", model = %rec.model, version = rec.version);
    async {
        match &ctx.membership {
            None => {
                report(Event::PlacementKnown(rec.clone()));
                placement::load_on_workers(&clients, rec).await?;
            }
            Some(m) => {
                if order.fresh {
                    info!(model = %rec.model, version = rec.version, "publishing a placement");
                    placement::publish(m.as_ref(), rec).await?;
                    report(Event::PlacementKnown(rec.clone()));
                } else {
                    // The store keeps one record per model: with worker groups another group's
                    // may have replaced this one, and a worker of this group that restarted
                    // would never see it. Published again (its workers that hold it ack at once).
                    let stored = m
                        .placement(&rec.model)
                        .await
                        .map_err(|e| JobError::Membership(e.to_string()))?;
                    if stored.as_ref() != Some(rec) {
                        placement::publish(m.as_ref(), rec).await?;
                    }
                }
                placement::await_acks(m.as_ref(), rec, ctx.load_timeout, &abort, id).await?;
            }
        }
        Ok::<(), JobError>(())
    }
    .instrument(placing)
    .await?;
    let upload = info_span!("upload", tokens = len, workers = p);
    let trace = TraceHeaders::of(&upload);
    let (name, version) = (order.spec.model.clone(), rec.version);
    let token = data_token()?;
    let peers = on_every(&clients, |r, mut c| {
        let model = name.clone();
        let req = trace.request(proto::PrepareJobRequest {
            job_id: id,
            model,
            placement_version: version,
            data_token: token.clone(),
        });
        async move {
            c.prepare_job(req)
                .await
                .map(|r| r.into_inner().data_addr)
                .map_err(|e| worker_error(r, WorkerStep::Prepare, &e))
        }
    })
    .await?;
    let plan = Arc::new(ShardPlan::new(len, p, Sharding::Zigzag).map_err(JobError::Shard)?);
    let score = matches!(order.spec.mode, JobMode::Score);
    let tokens = Arc::new(tokens);
    on_every(&clients, |r, mut c| {
        let chunks = trace.request(tokio_stream::iter(shard_chunks(
            id, r, &plan, &tokens, score,
        )));
        async move {
            c.send_shard(chunks)
                .await
                .map(|_| ())
                .map_err(|e| worker_error(r, WorkerStep::SendShard, &e))
        }
    })
    .await?;
    drop(upload);
    let load_secs = started.elapsed().as_secs_f64();
    let (mode, max_new_tokens, sampling) = match order.spec.mode {
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
    let req = proto::RunJobRequest {
        job_id: id,
        peers,
        mode: mode as i32,
        max_new_tokens,
        sampling,
        attention: crate::convert::attention_proto(&order.spec.attention) as i32,
        eos_token_ids: ctx.eos.clone(),
    };
    let layers = ctx.layers;
    let workers_n = p as u32;
    let progress = |state: JobState, r: Report| {
        report(Event::Progress {
            run: order.run,
            state,
            report: r,
        })
    };
    progress(
        JobState::Prefill { layer: 0, layers },
        Report {
            workers: workers_n,
            tokens_total: len as u64,
            ..Report::default()
        },
    );
    // Every worker's event stream, merged; a stream's end is an event too.
    let (tx, mut rx) = mpsc::channel::<(usize, Option<Result<proto::WorkerEvent, Status>>)>(256);
    let mut streams = JoinSet::new();
    let execute = info_span!("execute", workers = p);
    let trace = TraceHeaders::of(&execute);
    for (r, c) in clients.iter().enumerate() {
        let (mut c, req, tx) = (c.clone(), trace.request(req.clone()), tx.clone());
        streams.spawn(async move {
            match c.run_job(req).await {
                Err(e) => {
                    let _ = tx.send((r, Some(Err(e)))).await;
                }
                Ok(resp) => {
                    let mut s = resp.into_inner();
                    loop {
                        let m = s.message().await;
                        let end = matches!(m, Ok(None) | Err(_));
                        if tx.send((r, m.transpose())).await.is_err() || end {
                            break;
                        }
                    }
                }
            }
            let _ = tx.send((r, None)).await;
        });
    }
    drop(tx);
    let mut results = Collect::new(if score { len - 1 } else { 0 });
    let mut finished = vec![false; p];
    let prefill_start = Instant::now();
    let mut decode_start: Option<Instant> = None;
    // The expert load of a long run is read as it runs, on a task of its own (a slow worker
    // must not hold up the merged event stream).
    let mut read_every = tokio::time::interval_at(
        tokio::time::Instant::now() + ctx.load_interval,
        ctx.load_interval.max(Duration::from_millis(100)),
    );
    let (load_tx, mut load_rx) = mpsc::channel::<LoadReading>(2);
    let worker_ids: Vec<String> = order.workers.iter().map(|w| w.id.clone()).collect();
    let failure = loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = read_every.tick() => {
                let (clients, model, tx) = (clients.clone(), order.spec.model.clone(), load_tx.clone());
                let ids = worker_ids.clone();
                tokio::spawn(async move {
                    if let Some(r) = read_load(&clients, &model, &ids, version).await {
                        let _ = tx.try_send(r);
                    }
                }.in_current_span());
                continue;
            }
            Some(r) = load_rx.recv() => {
                report(Event::Load(r));
                continue;
            }
            _ = abort.wait_for(|a| *a) => break Some(JobError::Cancelled { id }),
        };
        let Some((r, ev)) = ev else { break None };
        match ev {
            None => {
                finished[r] = true;
                if finished.iter().all(|f| *f) {
                    break None;
                }
            }
            Some(Err(e)) => break Some(run_error(r, &e)),
            Some(Ok(proto::WorkerEvent { event: Some(ev) })) => match ev {
                worker_event::Event::LayerDone(l) => {
                    let secs = prefill_start.elapsed().as_secs_f64().max(1e-9);
                    let done = len as u64 * l.layer as u64 / l.layers.max(1) as u64;
                    let rate = done as f64 / secs;
                    let left = (len as u64).saturating_sub(done) as f64;
                    progress(
                        JobState::Prefill {
                            layer: l.layer,
                            layers: l.layers,
                        },
                        Report {
                            workers: workers_n,
                            tokens_done: done,
                            tokens_total: len as u64,
                            tokens_per_sec: rate,
                            eta_secs: if rate > 0.0 { left / rate } else { 0.0 },
                            ..Report::default()
                        },
                    );
                }
                worker_event::Event::Step(step) => {
                    let n = step.decoded;
                    let start = *decode_start.get_or_insert_with(Instant::now);
                    let secs = start.elapsed().as_secs_f64().max(1e-9);
                    let rate = f64::from(n) / secs;
                    progress(
                        JobState::Decode {
                            token: n,
                            tokens: max_new_tokens,
                        },
                        Report {
                            workers: workers_n,
                            tokens_done: n as u64,
                            tokens_total: max_new_tokens as u64,
                            tokens_per_sec: rate,
                            eta_secs: (max_new_tokens.saturating_sub(n)) as f64 / rate,
                            message: String::new(),
                            token: Some(step.token),
                        },
                    );
                }
                worker_event::Event::Scores(s) => {
                    if let Err(e) = results.scores(r, &s.positions, s.nll) {
                        break Some(e);
                    }
                }
                worker_event::Event::Generated(t) => results.generated.extend(t.ids),
            },
            Some(Ok(_)) => {}
        }
    };
    drop(execute);
    if let Some(f) = failure {
        streams.abort_all();
        // In the background: the run's end must not wait on a worker that cannot answer.
        tokio::spawn(cancel_on_workers(clients, id).instrument(tracing::Span::current()));
        return Err(f);
    }
    let end = Instant::now();
    let decode_secs = decode_start.map_or(0.0, |d| (end - d).as_secs_f64());
    let timings = Timings {
        load_secs,
        prefill_secs: decode_start
            .unwrap_or(end)
            .duration_since(prefill_start)
            .as_secs_f64(),
        decode_secs,
        runs: order.attempt + 1,
    };
    let outcome = results.outcome(score)?;
    if let Some(r) = read_load(&clients, &order.spec.model, &worker_ids, version).await {
        report(Event::Load(r));
    }
    Ok(JobOutput { outcome, timings })
}

/// Reads every worker's expert-load window after a run, for the imbalance gauge (a worker
/// that does not answer within a second is left out of this reading).
/// Cancels job `id` on every worker at once, waiting at most a few seconds for each: a worker
/// that cannot be reached (dead, or cut off) is logged and left to notice the closed stream.
/// The trace context is the caller's (the task is spawned inside its span).
async fn cancel_on_workers(clients: Vec<WorkerClient>, id: u64) {
    let trace = TraceHeaders::current();
    let mut calls = JoinSet::new();
    for (r, mut c) in clients.into_iter().enumerate() {
        let req = trace.request(proto::WorkerCancelRequest { job_id: id });
        calls.spawn(async move {
            match tokio::time::timeout(Duration::from_secs(3), c.cancel_job(req)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!(worker = r, error = %e.message(), "cancelling on a worker"),
                Err(_) => warn!(worker = r, "cancelling on a worker: no answer within 3 s"),
            }
        });
    }
    while calls.join_next().await.is_some() {}
}

/// Reads every worker's expert-load window for placement `version` of `model` (in rank order);
/// `None` when a worker does not answer within a second or answers for another version.
async fn read_load(
    clients: &[WorkerClient],
    model: &str,
    workers: &[String],
    version: u64,
) -> Option<LoadReading> {
    let trace = TraceHeaders::current();
    let read = on_every(clients, |r, mut c| {
        let req = trace.request(proto::ReportLoadRequest {
            placement_version: version,
        });
        async move {
            tokio::time::timeout(Duration::from_secs(1), c.report_load(req))
                .await
                .map_err(|_| JobError::Internal(format!("worker {r}: no load report in 1 s")))?
                .map(|r| r.into_inner())
                .map_err(|e| worker_error(r, WorkerStep::Run, &e))
        }
    })
    .await;
    let reports = match read {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "reading the workers' expert load");
            return None;
        }
    };
    let first = reports.first()?;
    let (layers, experts) = (first.layers as usize, first.experts as usize);
    let fits = |r: &proto::ReportLoadResponse| {
        r.model == model
            && r.placement_version == version
            && r.layers as usize == layers
            && r.experts as usize == experts
            && r.rows.len() == layers * experts
    };
    if experts == 0 || !reports.iter().all(fits) {
        return None;
    }
    Some(LoadReading {
        model: model.to_string(),
        workers: workers.to_vec(),
        version,
        layers,
        experts,
        rows: reports.into_iter().map(|r| r.rows).collect(),
    })
}

/// A worker's failed `RunJob`: a [`JobError::Link`] when it names the peer whose data link
/// failed, else a plain worker error.
fn run_error(rank: usize, e: &Status) -> JobError {
    let peer = e
        .metadata()
        .get(ringmoe_proto::LOST_PEER_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    match peer {
        Some(peer) if !broken_connection(e) => JobError::Link {
            rank,
            peer,
            message: e.message().to_string(),
        },
        _ => worker_error(rank, WorkerStep::Run, e),
    }
}

/// Whether `e` is the connection's failure rather than the worker's answer. tonic makes these
/// itself (a reset or dropped HTTP/2 connection, a failed connect, a keep-alive timeout); a
/// worker's handler never answers `UNAVAILABLE` but when it lost its lease (a membership
/// failure, worth a re-run too) and never `UNKNOWN`.
fn broken_connection(e: &Status) -> bool {
    std::error::Error::source(e).is_some()
        || matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
        || e.message().starts_with("h2 protocol error")
        || e.message().starts_with("transport error")
}

fn worker_error(rank: usize, step: WorkerStep, e: &Status) -> JobError {
    if broken_connection(e) {
        return JobError::Connection {
            rank,
            step,
            message: e.message().to_string(),
        };
    }
    JobError::Worker {
        rank,
        step,
        message: e.message().to_string(),
    }
}

/// Rank `r`'s shard stream: the header (with the sharding, so the worker builds the same
/// plan), its tokens and, in score mode, each position's next token (`u32::MAX` for the last).
fn shard_chunks(
    id: u64,
    r: usize,
    plan: &ShardPlan,
    tokens: &[u32],
    score: bool,
) -> Vec<proto::ShardChunk> {
    let pos = plan.positions(r);
    let mut chunks = vec![proto::ShardChunk {
        part: Some(shard_chunk::Part::Header(proto::ShardHeader {
            job_id: id,
            rank: r as u32,
            world: plan.world() as u32,
            sequence_len: tokens.len() as u64,
            sharding: match plan.kind {
                Sharding::Zigzag => proto::Sharding::Zigzag,
                Sharding::Contiguous => proto::Sharding::Contiguous,
            } as i32,
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
    chunks
}

/// The results as they stream in from the workers.
struct Collect {
    nll: Vec<f32>,
    filled: usize,
    generated: Vec<u32>,
}

impl Collect {
    fn new(scores: usize) -> Self {
        Self {
            nll: vec![f32::NAN; scores],
            filled: 0,
            generated: Vec::new(),
        }
    }

    /// Files rank `r`'s scores by position; each position once, inside the sequence.
    fn scores(&mut self, r: usize, positions: &[u64], nll: Vec<f32>) -> Result<(), JobError> {
        if positions.len() != nll.len() {
            return Err(JobError::BadResult {
                rank: r,
                what: "mismatched scores".into(),
            });
        }
        let before = self.filled;
        for (q, v) in positions.iter().zip(nll) {
            if let Some(slot) = self.nll.get_mut(*q as usize).filter(|x| x.is_nan()) {
                *slot = v;
                self.filled += 1;
            }
        }
        if self.filled - before != positions.len() {
            return Err(JobError::BadResult {
                rank: r,
                what: "scores for positions outside its shard or twice".into(),
            });
        }
        Ok(())
    }

    fn outcome(self, score: bool) -> Result<Outcome, JobError> {
        if score {
            if self.filled != self.nll.len() {
                return Err(JobError::MissingScores {
                    got: self.filled,
                    want: self.nll.len(),
                });
            }
            Ok(Outcome::Scored {
                first: 1,
                nll: self.nll,
            })
        } else if self.generated.is_empty() {
            Err(JobError::NoTokens)
        } else {
            Ok(Outcome::Generated {
                tokens: self.generated,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's own answer stays a worker error (or a link failure naming the peer); what
    /// the connection did becomes a connection error, whatever the call.
    #[test]
    fn broken_connections_are_told_from_the_workers_answers() {
        let own = Status::internal("worker rank 1: expert dispatch: bad frame");
        assert!(matches!(
            run_error(1, &own),
            JobError::Worker {
                step: WorkerStep::Run,
                ..
            }
        ));
        let mut lost = Status::internal("worker rank 1: rank 1: lost peer 2: closed");
        lost.metadata_mut()
            .insert(ringmoe_proto::LOST_PEER_HEADER, "2".parse().unwrap());
        assert!(matches!(
            run_error(1, &lost),
            JobError::Link { peer: 2, .. }
        ));
        for broken in [
            Status::internal("h2 protocol error: error reading a body from connection"),
            Status::unknown("h2 protocol error: stream error received"),
            Status::unavailable("transport error"),
            Status::from_error(Box::new(std::io::Error::other("connection reset"))),
        ] {
            let e = worker_error(2, WorkerStep::SendShard, &broken);
            assert!(
                matches!(e, JobError::Connection { rank: 2, .. }),
                "{broken:?} gave {e:?}"
            );
            assert!(matches!(run_error(2, &broken), JobError::Connection { .. }));
        }
        assert!(matches!(
            worker_error(
                0,
                WorkerStep::Prepare,
                &Status::failed_precondition("no model")
            ),
            JobError::Worker { .. }
        ));
    }

    #[test]
    fn scores_are_filed_once_each_and_must_all_come() {
        let mut c = Collect::new(4);
        c.scores(0, &[0, 3], vec![1.0, 4.0]).unwrap();
        let twice = c.scores(1, &[3], vec![9.0]).unwrap_err();
        assert_eq!(
            twice.to_string(),
            "worker 1 sent scores for positions outside its shard or twice"
        );
        assert!(c.scores(1, &[9], vec![9.0]).is_err());
        let mut short = Collect::new(4);
        short.scores(0, &[0], vec![1.0]).unwrap();
        assert_eq!(
            short.outcome(true).unwrap_err(),
            JobError::MissingScores { got: 1, want: 4 }
        );
        c.scores(1, &[1, 2], vec![2.0, 3.0]).unwrap();
        assert_eq!(
            c.outcome(true).unwrap(),
            Outcome::Scored {
                first: 1,
                nll: vec![1.0, 2.0, 3.0, 4.0]
            }
        );
    }

    #[test]
    fn every_rank_gets_its_positions_and_the_sharding() {
        let tokens: Vec<u32> = (0..100).collect();
        let plan = ShardPlan::new(100, 3, Sharding::Zigzag).unwrap();
        for r in 0..3 {
            let chunks = shard_chunks(5, r, &plan, &tokens, true);
            let Some(shard_chunk::Part::Header(h)) = &chunks[0].part else {
                panic!("header first")
            };
            assert_eq!(h.sharding, proto::Sharding::Zigzag as i32);
            let Some(shard_chunk::Part::Tokens(t)) = &chunks[1].part else {
                panic!("tokens next")
            };
            let want: Vec<u32> = plan.positions(r).iter().map(|&p| p as u32).collect();
            assert_eq!(t.ids, want);
        }
    }
}
