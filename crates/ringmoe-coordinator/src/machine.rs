//! The coordinator's core as a state machine with no I/O: [`Machine::on`] takes an [`Event`]
//! (something that happened) and returns the [`Command`]s to perform (store writes, RPCs,
//! membership calls), which the runtime in `runtime.rs` carries out and whose results come back
//! as further events. It owns the queue and priorities, admission of a job to a run (workers
//! enough, K/V capacity, the placement), the retry policy, cancellation and result assembly.
//!
//! | event | what the machine does |
//! |---|---|
//! | `Recovered(jobs)` | queues the store's queued jobs (running ones came back queued) |
//! | `Submitted` | queues the job |
//! | `Workers(list)` | takes the live list; may start the next run; a worker of the run in flight missing: `AbortRun`, then handled as its loss |
//! | `WorkerMentioned(id)` | ends `id`'s exclusion |
//! | `PlacementKnown(rec)` | remembers the placement published for the model |
//! | `Cancel(id)` | queued or between runs: `Cancelled`; running: `AbortRun` |
//! | `Progress` | `Publish` (watchers only, never stored) for the current run |
//! | `RunFinished(Ok)` | `StoreResult`, then `Done` |
//! | `RunFinished(Err)` | cancelled: `Cancelled`; aborted because a worker left: the retry policy with that worker dead (no probe); not retryable: `Failed`; else `Probe` |
//! | `Probed(dead)` | the retry policy: `Retrying` + `ForgetWorkers` + a new run, or `Failed` |
//! | `Tick` | time passed (exclusions expire); may start the next run |
//! | `Load(reading)` | updates the model's load estimate; may `Rebalance` (see `balance.rs`) |
//! | `Rebalanced` | every worker holds the new placement: later runs use it |
//! | `Drain` | shutting down: no run starts any more |
//!
//! Runs are numbered: an event of an older run (a late progress report, the result of a run
//! that was given up) changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use ringmoe_membership::{PlacementRecord, WorkerRecord};

use crate::balance::{BalanceConfig, Balancer, Estimate, LoadReading};
use crate::error::JobError;
use crate::output::JobOutput;
use crate::placement::{self, ModelShape};
use crate::queue::Queue;
use crate::retry::{Exclusions, RetryPolicy, Verdict};
use crate::store::{JobId, JobMode, JobSpec, JobState, StoredJob};

pub type RunId = u64;

#[derive(Debug, Clone, Copy)]
pub struct MachineConfig {
    /// A queued job waits until at least this many workers are live (retries need one).
    pub min_workers: usize,
    pub retry: RetryPolicy,
    pub balance: BalanceConfig,
    /// Workers per group (`--group-workers`): jobs run concurrently on different groups, each
    /// with a placement of its own; 0: one group of every live worker.
    pub group_workers: usize,
}

/// What the machine knows of a served model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub shape: ModelShape,
    /// K/V bytes one token costs on a worker.
    pub kv_bytes_per_token: u64,
}

/// The figures a watcher sees besides the state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub workers: u32,
    pub tokens_done: u64,
    pub tokens_total: u64,
    pub tokens_per_sec: f64,
    pub eta_secs: f64,
    pub message: String,
    /// Decode: the token this step produced (the runtime appends it to the job's token log,
    /// which `WatchJob` streams).
    pub token: Option<u32>,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The job store's jobs at start (running ones already back in `Queued`).
    Recovered(Vec<StoredJob>),
    /// A job is durable in the store and acknowledged to its client.
    Submitted {
        id: JobId,
        spec: JobSpec,
        input_len: usize,
    },
    Cancel(JobId),
    /// The live workers now.
    Workers(Vec<WorkerRecord>),
    /// Membership said something of this worker (it re-registered, changed or left).
    WorkerMentioned(String),
    /// A placement is published (read at start, or published by a run).
    PlacementKnown(PlacementRecord),
    /// A run's progress: a finer state (`Loading`, `Prefill`, `Decode`) and its figures.
    Progress {
        run: RunId,
        state: JobState,
        report: Report,
    },
    RunFinished {
        run: RunId,
        result: Result<JobOutput, JobError>,
    },
    /// The workers of a failed run that did not answer a probe.
    Probed {
        run: RunId,
        dead: Vec<String>,
    },
    Tick,
    /// The workers' expert load under a placement version (after a run, or during a long one).
    Load(LoadReading),
    /// The coordinator is shutting down: no run starts any more (those in flight go on).
    Drain,
    /// A rebalance of the placement over `workers` ended: every worker acknowledged `version`
    /// (`ok`), or it failed.
    Rebalanced {
        model: String,
        workers: Vec<String>,
        version: u64,
        ok: bool,
    },
}

/// Everything a run needs, decided by the machine.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOrder {
    pub run: RunId,
    pub id: JobId,
    pub attempt: u32,
    pub spec: JobSpec,
    pub input_len: usize,
    /// In rank order.
    pub workers: Vec<WorkerRecord>,
    pub placement: PlacementRecord,
    /// The placement is a new version the run must publish first.
    pub fresh: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Persist `state`, then publish it to the job's watchers.
    Transition {
        id: JobId,
        state: JobState,
        report: Report,
    },
    /// Publish a progress state to the watchers only (nothing is stored).
    Publish {
        id: JobId,
        state: JobState,
        report: Report,
    },
    /// Persist the output (always followed by the `Done` transition).
    StoreResult {
        id: JobId,
        output: JobOutput,
    },
    StartRun(RunOrder),
    /// Stop a run (cancel it on its workers); its `RunFinished` follows.
    AbortRun {
        run: RunId,
    },
    /// Ask each worker if it is alive; a `Probed` follows.
    Probe {
        run: RunId,
        workers: Vec<WorkerRecord>,
    },
    /// Drop these workers from the heartbeat registry (they are dead).
    ForgetWorkers(Vec<String>),
    /// Have `workers` (the record's, in rank order) load and acknowledge `record` in the
    /// background, while runs go on with the placement in force; a `Rebalanced` follows.
    Rebalance {
        record: PlacementRecord,
        workers: Vec<WorkerRecord>,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Stage {
    Running {
        run: RunId,
        workers: Vec<WorkerRecord>,
    },
    Probing {
        run: RunId,
        workers: Vec<WorkerRecord>,
        failure: JobError,
    },
    /// Between runs of a retried job: no live worker yet.
    WaitingForWorkers,
}

#[derive(Debug)]
struct Active {
    id: JobId,
    attempt: u32,
    stage: Stage,
    cancelling: bool,
    /// A worker of the run in flight that left the membership (its lease ended: dead, or cut
    /// off from the store) while the run ran: the run was aborted and is retried.
    left: Option<String>,
}

#[derive(Debug)]
struct Job {
    spec: JobSpec,
    input_len: usize,
    finished: bool,
}

#[derive(Debug)]
pub struct Machine {
    cfg: MachineConfig,
    models: HashMap<String, ModelInfo>,
    jobs: BTreeMap<JobId, Job>,
    queue: Queue,
    /// The jobs being run or waiting between runs, oldest first (one per worker group at most).
    active: Vec<Active>,
    workers: Vec<WorkerRecord>,
    exclusions: Exclusions,
    /// Placement records per model, the newest for each worker set (rank order) seen.
    placements: HashMap<String, Vec<PlacementRecord>>,
    /// The newest placement version that named each (model, worker): a record is reused only
    /// while it is the newest for every one of its workers (they may not hold an older one).
    newest: HashMap<(String, String), u64>,
    /// The highest placement version this machine gave a run, per model (two groups' runs
    /// must not get the same version before either is published).
    issued: HashMap<String, u64>,
    balancer: Balancer,
    next_run: RunId,
    /// Shutting down: nothing new starts.
    draining: bool,
}

impl Machine {
    pub fn new(cfg: MachineConfig, models: HashMap<String, ModelInfo>) -> Self {
        Self {
            cfg,
            models,
            jobs: BTreeMap::new(),
            queue: Queue::default(),
            active: Vec::new(),
            workers: Vec::new(),
            exclusions: Exclusions::default(),
            placements: HashMap::new(),
            newest: HashMap::new(),
            issued: HashMap::new(),
            balancer: Balancer::new(cfg.balance),
            next_run: 1,
            draining: false,
        }
    }

    /// Handles one event at time `now`; returns what to do, in order.
    pub fn on(&mut self, now: Instant, ev: Event) -> Vec<Command> {
        let mut out = Vec::new();
        match ev {
            Event::Recovered(jobs) => {
                for j in jobs {
                    let finished = j.state.is_finished();
                    if !finished {
                        self.queue.push(j.id, j.spec.priority);
                    }
                    self.jobs.insert(
                        j.id,
                        Job {
                            spec: j.spec,
                            input_len: j.input_len,
                            finished,
                        },
                    );
                }
            }
            Event::Submitted {
                id,
                spec,
                input_len,
            } => {
                self.queue.push(id, spec.priority);
                self.jobs.insert(
                    id,
                    Job {
                        spec,
                        input_len,
                        finished: false,
                    },
                );
            }
            Event::Cancel(id) => self.cancel(id, &mut out),
            Event::Workers(mut list) => {
                list.sort_by(|a, b| a.id.cmp(&b.id));
                self.workers = list;
                self.abort_if_a_worker_left(&mut out);
            }
            Event::WorkerMentioned(id) => self.exclusions.clear(&id),
            Event::PlacementKnown(rec) => self.remember(rec),
            Event::Progress { run, state, report } => {
                if let Some(a) = self.active_of_run(run)
                    && !a.cancelling
                {
                    out.push(Command::Publish {
                        id: a.id,
                        state,
                        report,
                    });
                }
            }
            Event::RunFinished { run, result } => self.run_finished(now, run, result, &mut out),
            Event::Probed { run, dead } => self.probed(now, run, dead, &mut out),
            Event::Tick => {}
            Event::Drain => self.draining = true,
            Event::Load(reading) => {
                let current = self.record(&reading.model, &reading.workers).cloned();
                let next = self.next_version(&reading.model);
                if let Some(record) =
                    self.balancer
                        .on_reading(now, &reading, current.as_ref(), next)
                {
                    let workers = record
                        .workers
                        .iter()
                        .filter_map(|id| self.workers.iter().find(|w| &w.id == id).cloned())
                        .collect::<Vec<_>>();
                    if workers.len() == record.workers.len() {
                        out.push(Command::Rebalance { record, workers });
                    } else {
                        // A worker of the placement left: the next run places afresh anyway.
                        self.balancer.finished(
                            now,
                            &record.model,
                            &record.workers,
                            record.version,
                            false,
                        );
                    }
                }
            }
            Event::Rebalanced {
                model,
                workers,
                version,
                ok,
            } => {
                if let Some(rec) = self.balancer.finished(now, &model, &workers, version, ok) {
                    self.remember(rec);
                }
            }
        }
        self.schedule(now, &mut out);
        out
    }

    /// Keeps `rec` as the placement of its worker set if it is newer than the one known, and
    /// as the newest version each of its workers was given.
    fn remember(&mut self, rec: PlacementRecord) {
        for w in &rec.workers {
            let v = self
                .newest
                .entry((rec.model.clone(), w.clone()))
                .or_default();
            *v = (*v).max(rec.version);
        }
        let recs = self.placements.entry(rec.model.clone()).or_default();
        match recs.iter_mut().find(|r| r.workers == rec.workers) {
            Some(r) if r.version >= rec.version => {}
            Some(r) => *r = rec,
            None => recs.push(rec),
        }
    }

    /// The placement known for exactly `workers` (rank order) of `model`.
    fn record(&self, model: &str, workers: &[String]) -> Option<&PlacementRecord> {
        self.placements
            .get(model)?
            .iter()
            .find(|r| r.workers == workers)
    }

    /// The version a new placement of `model` gets: above every one known or being loaded.
    fn next_version(&self, model: &str) -> u64 {
        let known = self
            .placements
            .get(model)
            .map_or(0, |rs| rs.iter().map(|r| r.version).max().unwrap_or(0));
        known
            .max(self.balancer.max_in_flight(model))
            .max(self.issued.get(model).copied().unwrap_or(0))
            + 1
    }

    fn active_of_run(&self, run: RunId) -> Option<&Active> {
        self.active.iter().find(|a| a.current_run() == Some(run))
    }

    fn active_index_of_run(&self, run: RunId) -> Option<usize> {
        self.active
            .iter()
            .position(|a| a.current_run() == Some(run))
    }

    fn cancel(&mut self, id: JobId, out: &mut Vec<Command>) {
        if self.queue.remove(id) {
            self.finish(id, JobState::Cancelled, out);
            return;
        }
        let Some(i) = self.active.iter().position(|a| a.id == id) else {
            return; // unknown or finished: nothing to do
        };
        let a = &mut self.active[i];
        match &a.stage {
            Stage::Running { run, .. } => {
                a.cancelling = true;
                out.push(Command::AbortRun { run: *run });
            }
            // No run in flight: the job ends here; a late `Probed` finds no active run.
            Stage::Probing { .. } | Stage::WaitingForWorkers => {
                self.active.remove(i);
                self.finish(id, JobState::Cancelled, out);
            }
        }
    }

    /// A worker of a run in flight is no longer a member (its lease ended): the run cannot
    /// finish (its peers would wait on it for the data timeout), so it is aborted now and its
    /// end is handled as that worker's loss — a probe, then a retry without the dead.
    fn abort_if_a_worker_left(&mut self, out: &mut Vec<Command>) {
        for a in &mut self.active {
            let Stage::Running { run, workers } = &a.stage else {
                continue;
            };
            if a.cancelling || a.left.is_some() {
                continue;
            }
            if let Some(w) = workers
                .iter()
                .find(|w| !self.workers.iter().any(|l| l.id == w.id))
            {
                a.left = Some(w.id.clone());
                out.push(Command::AbortRun { run: *run });
            }
        }
    }

    fn run_finished(
        &mut self,
        now: Instant,
        run: RunId,
        result: Result<JobOutput, JobError>,
        out: &mut Vec<Command>,
    ) {
        let Some(i) = self.active_index_of_run(run) else {
            return;
        };
        let a = &mut self.active[i];
        // A run aborted because a worker left failed for that reason, whatever its own error
        // (the abort's cancellation) says.
        let result = match (result, &a.left) {
            (Err(_), Some(worker)) if !a.cancelling => Err(JobError::LeftDuringRun {
                worker: worker.clone(),
            }),
            (r, _) => r,
        };
        let Stage::Running { workers, .. } = &a.stage else {
            return;
        };
        let id = a.id;
        match result {
            // A run that completed is done even if a cancel raced with its end.
            Ok(mut output) => {
                output.timings.runs = a.attempt + 1;
                self.active.remove(i);
                out.push(Command::StoreResult { id, output });
                self.finish(id, JobState::Done, out);
            }
            Err(_) if a.cancelling => {
                self.active.remove(i);
                self.finish(id, JobState::Cancelled, out);
            }
            Err(e) if !e.retryable() => {
                self.active.remove(i);
                self.fail(id, &e, out);
            }
            // The worker that left is known to be gone: no probe to wait for (it would time
            // out on a cut-off worker); any other loss shows in the next run.
            Err(failure) if a.left.is_some() => {
                let dead: Vec<String> = a.left.iter().cloned().collect();
                self.after_failure(now, i, failure, dead, true, out);
            }
            Err(failure) => {
                let workers = workers.clone();
                out.push(Command::Probe {
                    run,
                    workers: workers.clone(),
                });
                a.stage = Stage::Probing {
                    run,
                    workers,
                    failure,
                };
            }
        }
    }

    fn probed(&mut self, now: Instant, run: RunId, dead: Vec<String>, out: &mut Vec<Command>) {
        let Some(i) = self.active_index_of_run(run) else {
            return;
        };
        let Stage::Probing {
            failure, workers, ..
        } = &self.active[i].stage
        else {
            return;
        };
        let failure = failure.clone();
        // Every worker answers, yet a data link between two of them failed: a network fault
        // between the pair. The re-run leaves out the end the failing worker blamed (either
        // end mends a cut between two); it stays registered, so it is only excluded.
        if dead.is_empty()
            && let JobError::Link { peer, .. } = &failure
            && let Some(w) = workers.get(*peer)
        {
            let suspect = vec![w.id.clone()];
            return self.after_failure(now, i, failure, suspect, false, out);
        }
        self.after_failure(now, i, failure, dead, true, out);
    }

    /// The run of active job `i` failed with `failure`, and `dead` are its workers found dead
    /// (or one end of a broken link): retry without them, or fail. `forget`: they are gone from
    /// the heartbeat registry too (a dead worker must register again; an unreachable one
    /// still heartbeats and is only excluded).
    fn after_failure(
        &mut self,
        now: Instant,
        i: usize,
        failure: JobError,
        dead: Vec<String>,
        forget: bool,
        out: &mut Vec<Command>,
    ) {
        let a = &mut self.active[i];
        let id = a.id;
        match self.cfg.retry.after_probe(a.attempt, failure, &dead) {
            Verdict::Fail(e) => {
                self.active.remove(i);
                self.fail(id, &e, out);
            }
            Verdict::Retry { attempt, reason } => {
                a.attempt = attempt;
                a.stage = Stage::WaitingForWorkers;
                self.exclusions.exclude(&dead, now);
                if forget {
                    out.push(Command::ForgetWorkers(dead));
                }
                out.push(Command::Transition {
                    id,
                    state: JobState::Retrying {
                        attempt,
                        reason: reason.clone(),
                    },
                    report: Report {
                        message: reason,
                        ..Report::default()
                    },
                });
            }
        }
    }

    /// The worker groups over `live` (sorted by id): with `--group-workers G`, runs of G
    /// consecutive workers, the remainder joining the last; else (or with fewer than 2G live)
    /// one group of all.
    pub fn groups(&self, live: &[WorkerRecord]) -> Vec<Vec<WorkerRecord>> {
        let g = self.cfg.group_workers;
        if g == 0 || live.len() < 2 * g {
            return vec![live.to_vec()];
        }
        let n = live.len() / g;
        (0..n)
            .map(|i| {
                let end = if i + 1 == n { live.len() } else { (i + 1) * g };
                live[i * g..end].to_vec()
            })
            .collect()
    }

    /// K/V tokens job `id` needs (its input and the tokens it may generate).
    fn need(&self, id: JobId) -> Option<u64> {
        let job = self.jobs.get(&id)?;
        let extra = match job.spec.mode {
            JobMode::Generate { max_new_tokens, .. } => u64::from(max_new_tokens),
            JobMode::Score => 0,
        };
        Some(job.input_len as u64 + extra)
    }

    /// Starts what can start, in order — retried jobs first (oldest first), then the queue
    /// (highest priority, then submission order) — each on the first free worker group whose
    /// K/V holds it. A job no single group holds runs on every live worker once all are free.
    /// The first job that cannot start stops the pass: nothing overtakes it, so a job waiting
    /// for the whole cluster gets it as soon as the running ones end (no starvation).
    fn schedule(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.draining {
            return;
        }
        loop {
            let live = self.live_workers(now);
            let waiting = self
                .active
                .iter()
                .find(|a| a.stage == Stage::WaitingForWorkers)
                .map(|a| a.id);
            let (id, queued) = match waiting {
                Some(id) if !live.is_empty() => (id, false),
                Some(_) => return,
                None if live.len() >= self.cfg.min_workers.max(1) => match self.queue.peek() {
                    Some(id) => (id, true),
                    None => return,
                },
                None => return,
            };
            let busy: Vec<&str> = self
                .active
                .iter()
                .flat_map(|a| match &a.stage {
                    Stage::Running { workers, .. } | Stage::Probing { workers, .. } => {
                        workers.iter().map(|w| w.id.as_str()).collect::<Vec<_>>()
                    }
                    Stage::WaitingForWorkers => Vec::new(),
                })
                .collect();
            let free = |g: &[WorkerRecord]| g.iter().all(|w| !busy.contains(&w.id.as_str()));
            let per_token = self
                .jobs
                .get(&id)
                .and_then(|j| self.models.get(&j.spec.model))
                .map(|m| m.kv_bytes_per_token);
            let chosen = match (per_token, self.need(id)) {
                (Some(per), Some(need)) => {
                    let groups = self.groups(&live);
                    let fitting: Vec<&Vec<WorkerRecord>> =
                        groups.iter().filter(|g| capacity(per, g) >= need).collect();
                    if fitting.is_empty() {
                        // No single group holds it: every live worker, once all are free (a
                        // job too long even for them fails at admission below).
                        if !busy.is_empty() {
                            return;
                        }
                        live
                    } else {
                        match fitting.into_iter().find(|g| free(g)) {
                            Some(g) => g.clone(),
                            None => return,
                        }
                    }
                }
                // Unknown job or model: admission says which.
                _ => live,
            };
            if queued {
                self.queue.pop();
                self.active.push(Active {
                    id,
                    attempt: 0,
                    stage: Stage::WaitingForWorkers,
                    cancelling: false,
                    left: None,
                });
            }
            match self.start(id, chosen) {
                Ok(order) => {
                    out.push(Command::Transition {
                        id,
                        state: JobState::Running {
                            attempt: order.attempt,
                        },
                        report: Report {
                            workers: order.workers.len() as u32,
                            tokens_total: order.input_len as u64,
                            ..Report::default()
                        },
                    });
                    out.push(Command::StartRun(order));
                }
                Err(e) => {
                    // The job cannot run at all: it fails and the next one may start.
                    self.active.retain(|a| a.id != id);
                    self.fail(id, &e, out);
                }
            }
        }
    }

    /// Admits the active job `id` to a run over `live`: its model, its K/V size, its placement.
    fn start(&mut self, id: JobId, live: Vec<WorkerRecord>) -> Result<RunOrder, JobError> {
        let job = self.jobs.get(&id).ok_or(JobError::Internal(format!(
            "job {id} was scheduled but is not in the job table"
        )))?;
        let model = self
            .models
            .get(&job.spec.model)
            .ok_or_else(|| JobError::UnknownModel(job.spec.model.clone()))?;
        let need = self.need(id).unwrap_or(0);
        let capacity = capacity(model.kv_bytes_per_token, &live);
        if need > capacity {
            return Err(JobError::Capacity {
                need,
                capacity,
                workers: live.len(),
            });
        }
        let ids: Vec<String> = live.iter().map(|w| w.id.clone()).collect();
        let name = &job.spec.model;
        // Reused only while no newer placement named any of its workers.
        let last = self.record(name, &ids).filter(|r| {
            r.workers
                .iter()
                .all(|w| self.newest.get(&(name.clone(), w.clone())).copied() == Some(r.version))
        });
        let plan = placement::plan(name, &model.shape, last, &ids, self.next_version(name))?;
        let issued = self.issued.entry(name.clone()).or_default();
        *issued = (*issued).max(plan.record.version);
        let run = self.next_run;
        self.next_run += 1;
        let a = self
            .active
            .iter_mut()
            .find(|a| a.id == id)
            .ok_or(JobError::Internal(format!(
                "job {id} was started with no active entry"
            )))?;
        a.stage = Stage::Running {
            run,
            workers: live.clone(),
        };
        a.left = None;
        Ok(RunOrder {
            run,
            id,
            attempt: a.attempt,
            spec: job.spec.clone(),
            input_len: job.input_len,
            workers: live,
            placement: plan.record,
            fresh: plan.fresh,
        })
    }

    fn fail(&mut self, id: JobId, e: &JobError, out: &mut Vec<Command>) {
        self.finish(
            id,
            JobState::Failed {
                message: e.to_string(),
            },
            out,
        );
    }

    fn finish(&mut self, id: JobId, state: JobState, out: &mut Vec<Command>) {
        if let Some(j) = self.jobs.get_mut(&id) {
            j.finished = true;
        }
        out.push(Command::Transition {
            id,
            state,
            report: Report::default(),
        });
    }

    /// Live workers not excluded and not draining, in rank order (by id): the ones a new run
    /// may use.
    pub fn live_workers(&self, now: Instant) -> Vec<WorkerRecord> {
        self.workers
            .iter()
            .filter(|w| !w.draining && !self.exclusions.is_excluded(&w.id, now))
            .cloned()
            .collect()
    }

    /// Every worker the membership lists, excluded or not.
    pub fn all_workers(&self) -> &[WorkerRecord] {
        &self.workers
    }

    pub fn is_excluded(&self, worker: &str, now: Instant) -> bool {
        self.exclusions.is_excluded(worker, now)
    }

    /// Queued jobs in the order they will run.
    pub fn queued(&self) -> Vec<JobId> {
        self.queue.iter().collect()
    }

    /// The placements in force: per model, the newest record of each worker set whose workers
    /// were given no newer one.
    pub fn placements(&self) -> Vec<&PlacementRecord> {
        let mut out: Vec<&PlacementRecord> = self
            .placements
            .values()
            .flatten()
            .filter(|r| {
                r.workers.iter().all(|w| {
                    self.newest.get(&(r.model.clone(), w.clone())).copied() == Some(r.version)
                })
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model).then(a.workers.cmp(&b.workers)));
        out
    }

    /// What the coordinator measured of a placement's expert load (the workers of `rec`).
    pub fn load_estimate(&self, rec: &PlacementRecord) -> Option<&Estimate> {
        self.balancer.estimate(&rec.model, &rec.workers)
    }

    /// The rebalance of `rec`'s workers being loaded, if any.
    pub fn rebalancing(&self, rec: &PlacementRecord) -> Option<&PlacementRecord> {
        self.balancer.in_flight(&rec.model, &rec.workers)
    }

    /// The workers of the runs in flight (busy), by id.
    pub fn run_workers(&self) -> Vec<String> {
        self.active
            .iter()
            .flat_map(|a| match &a.stage {
                Stage::Running { workers, .. } => {
                    workers.iter().map(|w| w.id.clone()).collect::<Vec<_>>()
                }
                _ => Vec::new(),
            })
            .collect()
    }

    /// The jobs being run (or waiting between runs).
    pub fn running(&self) -> Vec<JobId> {
        self.active.iter().map(|a| a.id).collect()
    }
}

impl Active {
    fn current_run(&self) -> Option<RunId> {
        match &self.stage {
            Stage::Running { run, .. } | Stage::Probing { run, .. } => Some(*run),
            Stage::WaitingForWorkers => None,
        }
    }
}

/// Tokens `workers` can hold the K/V of: zigzag shards are equal to within a token, so the
/// smallest budget bounds every shard.
pub fn capacity(kv_bytes_per_token: u64, workers: &[WorkerRecord]) -> u64 {
    let per = kv_bytes_per_token.max(1);
    let min = workers
        .iter()
        .map(|w| w.kv_budget_bytes / per)
        .min()
        .unwrap_or(0);
    min * workers.len() as u64
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
