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
    /// A rebalance ended: every worker acknowledged `version` (`ok`), or it failed.
    Rebalanced {
        model: String,
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
    active: Option<Active>,
    workers: Vec<WorkerRecord>,
    exclusions: Exclusions,
    placements: HashMap<String, PlacementRecord>,
    balancer: Balancer,
    next_run: RunId,
}

impl Machine {
    pub fn new(cfg: MachineConfig, models: HashMap<String, ModelInfo>) -> Self {
        Self {
            cfg,
            models,
            jobs: BTreeMap::new(),
            queue: Queue::default(),
            active: None,
            workers: Vec::new(),
            exclusions: Exclusions::default(),
            placements: HashMap::new(),
            balancer: Balancer::new(cfg.balance),
            next_run: 1,
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
            Event::PlacementKnown(rec) => {
                let newer = self
                    .placements
                    .get(&rec.model)
                    .is_none_or(|old| rec.version >= old.version);
                if newer {
                    self.placements.insert(rec.model.clone(), rec);
                }
            }
            Event::Progress { run, state, report } => {
                if let Some(a) = &self.active
                    && a.current_run() == Some(run)
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
            Event::Load(reading) => {
                let current = self.placements.get(&reading.model);
                if let Some(record) = self.balancer.on_reading(now, &reading, current) {
                    let workers = record
                        .workers
                        .iter()
                        .filter_map(|id| self.workers.iter().find(|w| &w.id == id).cloned())
                        .collect::<Vec<_>>();
                    if workers.len() == record.workers.len() {
                        out.push(Command::Rebalance { record, workers });
                    } else {
                        // A worker of the placement left: the next run places afresh anyway.
                        self.balancer
                            .finished(now, &record.model, record.version, false);
                    }
                }
            }
            Event::Rebalanced { model, version, ok } => {
                if let Some(rec) = self.balancer.finished(now, &model, version, ok) {
                    let newer = self
                        .placements
                        .get(&model)
                        .is_none_or(|old| rec.version > old.version);
                    if newer {
                        self.placements.insert(model, rec);
                    }
                }
            }
        }
        self.schedule(now, &mut out);
        out
    }

    fn cancel(&mut self, id: JobId, out: &mut Vec<Command>) {
        if self.queue.remove(id) {
            self.finish(id, JobState::Cancelled, out);
            return;
        }
        let Some(a) = self.active.as_mut().filter(|a| a.id == id) else {
            return; // unknown or finished: nothing to do
        };
        match &a.stage {
            Stage::Running { run, .. } => {
                a.cancelling = true;
                out.push(Command::AbortRun { run: *run });
            }
            // No run in flight: the job ends here; a late `Probed` finds no active run.
            Stage::Probing { .. } | Stage::WaitingForWorkers => {
                self.active = None;
                self.finish(id, JobState::Cancelled, out);
            }
        }
    }

    /// A worker of the run in flight is no longer a member (its lease ended): the run cannot
    /// finish (its peers would wait on it for the data timeout), so it is aborted now and its
    /// end is handled as that worker's loss — a probe, then a retry without the dead.
    fn abort_if_a_worker_left(&mut self, out: &mut Vec<Command>) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Stage::Running { run, workers } = &a.stage else {
            return;
        };
        if a.cancelling || a.left.is_some() {
            return;
        }
        if let Some(w) = workers
            .iter()
            .find(|w| !self.workers.iter().any(|l| l.id == w.id))
        {
            a.left = Some(w.id.clone());
            out.push(Command::AbortRun { run: *run });
        }
    }

    fn run_finished(
        &mut self,
        now: Instant,
        run: RunId,
        result: Result<JobOutput, JobError>,
        out: &mut Vec<Command>,
    ) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
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
        if a.current_run() != Some(run) {
            return;
        }
        let id = a.id;
        match result {
            // A run that completed is done even if a cancel raced with its end.
            Ok(mut output) => {
                output.timings.runs = a.attempt + 1;
                self.active = None;
                out.push(Command::StoreResult { id, output });
                self.finish(id, JobState::Done, out);
            }
            Err(_) if a.cancelling => {
                self.active = None;
                self.finish(id, JobState::Cancelled, out);
            }
            Err(e) if !e.retryable() => {
                self.active = None;
                self.fail(id, &e, out);
            }
            // The worker that left is known to be gone: no probe to wait for (it would time
            // out on a cut-off worker); any other loss shows in the next run.
            Err(failure) if a.left.is_some() => {
                let dead: Vec<String> = a.left.iter().cloned().collect();
                self.after_failure(now, failure, dead, true, out);
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
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Stage::Probing {
            failure, workers, ..
        } = &a.stage
        else {
            return;
        };
        if a.current_run() != Some(run) {
            return;
        }
        let failure = failure.clone();
        // Every worker answers, yet a data link between two of them failed: a network fault
        // between the pair. The re-run leaves out the end the failing worker blamed (either
        // end mends a cut between two); it stays registered, so it is only excluded.
        if dead.is_empty()
            && let JobError::Link { peer, .. } = &failure
            && let Some(w) = workers.get(*peer)
        {
            let suspect = vec![w.id.clone()];
            return self.after_failure(now, failure, suspect, false, out);
        }
        self.after_failure(now, failure, dead, true, out);
    }

    /// The active job's run failed with `failure`, and `dead` are its workers found dead (or
    /// one end of a broken link): retry without them, or fail. `forget`: they are gone from
    /// the heartbeat registry too (a dead worker must register again; an unreachable one
    /// still heartbeats and is only excluded).
    fn after_failure(
        &mut self,
        now: Instant,
        failure: JobError,
        dead: Vec<String>,
        forget: bool,
        out: &mut Vec<Command>,
    ) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let id = a.id;
        match self.cfg.retry.after_probe(a.attempt, failure, &dead) {
            Verdict::Fail(e) => {
                self.active = None;
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

    /// Starts what can start: the retried job once a worker is live, else the next queued job
    /// once enough are.
    fn schedule(&mut self, now: Instant, out: &mut Vec<Command>) {
        loop {
            let live = self.live_workers(now);
            let id = match &self.active {
                Some(a) if a.stage == Stage::WaitingForWorkers && !live.is_empty() => a.id,
                Some(_) => return,
                None if live.len() >= self.cfg.min_workers.max(1) => match self.queue.pop() {
                    Some(id) => {
                        self.active = Some(Active {
                            id,
                            attempt: 0,
                            stage: Stage::WaitingForWorkers,
                            cancelling: false,
                            left: None,
                        });
                        id
                    }
                    None => return,
                },
                None => return,
            };
            match self.start(id, live) {
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
                    return;
                }
                Err(e) => {
                    // The job cannot run at all: it fails and the next one may start.
                    self.active = None;
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
        let extra = match job.spec.mode {
            JobMode::Generate { max_new_tokens, .. } => u64::from(max_new_tokens),
            JobMode::Score => 0,
        };
        let need = job.input_len as u64 + extra;
        let capacity = capacity(model.kv_bytes_per_token, &live);
        if need > capacity {
            return Err(JobError::Capacity {
                need,
                capacity,
                workers: live.len(),
            });
        }
        let ids: Vec<String> = live.iter().map(|w| w.id.clone()).collect();
        let last = self.placements.get(&job.spec.model);
        let next_version = last
            .map(|r| r.version)
            .max(self.balancer.in_flight(&job.spec.model).map(|r| r.version))
            .unwrap_or(0)
            + 1;
        let plan = placement::plan(&job.spec.model, &model.shape, last, &ids, next_version)?;
        let run = self.next_run;
        self.next_run += 1;
        let a = self.active.as_mut().ok_or(JobError::Internal(format!(
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

    /// The placement runs of `model` use now.
    pub fn placement(&self, model: &str) -> Option<&PlacementRecord> {
        self.placements.get(model)
    }

    /// The models with a placement, and their records.
    pub fn placements(&self) -> impl Iterator<Item = &PlacementRecord> {
        self.placements.values()
    }

    /// What the coordinator measured of `model`'s expert load.
    pub fn load_estimate(&self, model: &str) -> Option<&Estimate> {
        self.balancer.estimate(model)
    }

    /// The rebalance of `model` being loaded, if any.
    pub fn rebalancing(&self, model: &str) -> Option<&PlacementRecord> {
        self.balancer.in_flight(model)
    }

    /// The workers of the run in flight (busy), by id.
    pub fn run_workers(&self) -> Vec<String> {
        match self.active.as_ref().map(|a| &a.stage) {
            Some(Stage::Running { workers, .. }) => workers.iter().map(|w| w.id.clone()).collect(),
            _ => Vec::new(),
        }
    }

    /// The job being run (or waiting between runs), if any.
    pub fn running(&self) -> Option<JobId> {
        self.active.as_ref().map(|a| a.id)
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
