//! The coordinator core driven by events alone: no processes, no sockets, no clock but the one
//! the test passes in.

use std::time::{Duration, Instant};

use super::*;
use crate::error::WorkerStep;
use crate::output::{Outcome, Timings};

const PER_TOKEN: u64 = 1024;

fn worker(id: &str) -> WorkerRecord {
    WorkerRecord {
        id: id.into(),
        addr: format!("{id}:1"),
        device: "cpu".into(),
        kv_budget_bytes: 1000 * PER_TOKEN,
        models: Vec::new(),
        placement: None,
        draining: false,
    }
}

fn workers(ids: &[&str]) -> Vec<WorkerRecord> {
    ids.iter().map(|i| worker(i)).collect()
}

fn machine(min_workers: usize, max_retries: u32) -> Machine {
    machine_with_groups(min_workers, max_retries, 0)
}

fn machine_with_groups(min_workers: usize, max_retries: u32, group_workers: usize) -> Machine {
    let info = ModelInfo {
        shape: ModelShape {
            layers: 2,
            experts: 4,
            path: "/models/m".into(),
        },
        kv_bytes_per_token: PER_TOKEN,
    };
    Machine::new(
        MachineConfig {
            min_workers,
            retry: RetryPolicy { max_retries },
            balance: crate::balance::BalanceConfig::default(),
            group_workers,
        },
        HashMap::from([("m".to_string(), info)]),
    )
}

fn spec(priority: i32) -> JobSpec {
    JobSpec {
        model: "m".into(),
        mode: JobMode::Score,
        attention: "dense".into(),
        priority,
        owner: None,
    }
}

fn submit(m: &mut Machine, t: Instant, id: JobId, priority: i32) -> Vec<Command> {
    m.on(
        t,
        Event::Submitted {
            id,
            spec: spec(priority),
            input_len: 100,
        },
    )
}

fn output() -> JobOutput {
    JobOutput {
        outcome: Outcome::Scored {
            first: 1,
            nll: vec![0.5; 99],
        },
        timings: Timings::default(),
    }
}

fn lost_worker() -> JobError {
    JobError::Worker {
        rank: 1,
        step: WorkerStep::Run,
        message: "lost peer".into(),
    }
}

/// Every run a batch of commands starts.
fn all_started(cmds: &[Command]) -> Vec<RunOrder> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::StartRun(o) => Some(o.clone()),
            _ => None,
        })
        .collect()
}

fn ids_of(o: &RunOrder) -> Vec<&str> {
    o.workers.iter().map(|w| w.id.as_str()).collect()
}

/// The run a batch of commands starts.
fn started(cmds: &[Command]) -> Option<RunOrder> {
    cmds.iter().find_map(|c| match c {
        Command::StartRun(o) => Some(o.clone()),
        _ => None,
    })
}

/// The states a batch of commands persists for `id`.
fn persisted(cmds: &[Command], id: JobId) -> Vec<JobState> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Transition { id: j, state, .. } if *j == id => Some(state.clone()),
            _ => None,
        })
        .collect()
}

fn finish(m: &mut Machine, t: Instant, run: RunId) -> Vec<Command> {
    m.on(
        t,
        Event::RunFinished {
            run,
            result: Ok(output()),
        },
    )
}

#[test]
fn queued_jobs_run_by_priority_then_submission_order() {
    let t = Instant::now();
    let mut m = machine(1, 3);
    // No worker yet: everything queues.
    for (id, p) in [(1, 0), (2, 5), (3, 0), (4, 9)] {
        assert!(started(&submit(&mut m, t, id, p)).is_none());
    }
    assert_eq!(m.queued(), vec![4, 2, 1, 3]);
    let mut order = Vec::new();
    let mut cmds = m.on(t, Event::Workers(workers(&["w0"])));
    while let Some(run) = started(&cmds) {
        order.push(run.id);
        // A job arriving meanwhile with a top priority goes next.
        if run.id == 4 {
            submit(&mut m, t, 5, 7);
        }
        cmds = finish(&mut m, t, run.run);
    }
    assert_eq!(order, vec![4, 5, 2, 1, 3]);
}

#[test]
fn jobs_wait_for_min_workers() {
    let t = Instant::now();
    let mut m = machine(2, 3);
    submit(&mut m, t, 1, 0);
    assert!(started(&m.on(t, Event::Workers(workers(&["a"])))).is_none());
    let run = started(&m.on(t, Event::Workers(workers(&["b", "a"])))).unwrap();
    let ids: Vec<&str> = run.workers.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"], "rank order is by id");
}

/// A data link between two live workers breaks: every worker answers the probe, yet the job
/// re-runs without the worker the failing one blamed, which stays registered (not forgotten)
/// but excluded.
#[test]
fn a_broken_link_between_live_workers_reruns_without_the_blamed_end() {
    let t = Instant::now();
    let mut m = machine(1, 2);
    m.on(t, Event::Workers(workers(&["a", "b", "c"])));
    let run = started(&submit(&mut m, t, 1, 0)).unwrap();
    let link = JobError::Link {
        rank: 0,
        peer: 2,
        message: "rendezvous: cannot connect to rank 2".into(),
    };
    m.on(
        t,
        Event::RunFinished {
            run: run.run,
            result: Err(link),
        },
    );
    let cmds = m.on(
        t,
        Event::Probed {
            run: run.run,
            dead: vec![],
        },
    );
    assert!(
        !cmds.iter().any(|c| matches!(c, Command::ForgetWorkers(_))),
        "{cmds:?}"
    );
    let states = persisted(&cmds, 1);
    assert!(
        matches!(&states[..], [JobState::Retrying { attempt: 1, reason }, JobState::Running { attempt: 1 }]
            if reason.contains("left out worker(s) c") && reason.contains("data link")),
        "{states:?}"
    );
    let next = started(&cmds).unwrap();
    let ids: Vec<&str> = next.workers.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(m.is_excluded("c", t));
    // A failure that blames no link, with every worker answering, is the job's own.
    m.on(
        t,
        Event::RunFinished {
            run: next.run,
            result: Err(lost_worker()),
        },
    );
    let cmds = m.on(
        t,
        Event::Probed {
            run: next.run,
            dead: vec![],
        },
    );
    assert!(
        matches!(&persisted(&cmds, 1)[..], [JobState::Failed { .. }]),
        "{cmds:?}"
    );
}

#[test]
fn a_lost_worker_retries_on_the_rest_up_to_max_retries() {
    let t = Instant::now();
    let mut m = machine(1, 2);
    m.on(t, Event::Workers(workers(&["a", "b", "c", "d"])));
    let mut run = started(&submit(&mut m, t, 1, 0)).unwrap();
    for (attempt, victim) in [(1, "d"), (2, "c")] {
        let cmds = m.on(
            t,
            Event::RunFinished {
                run: run.run,
                result: Err(lost_worker()),
            },
        );
        assert!(
            matches!(&cmds[..], [Command::Probe { run: r, workers }] if *r == run.run && workers.len() == run.workers.len())
        );
        let cmds = m.on(
            t,
            Event::Probed {
                run: run.run,
                dead: vec![victim.into()],
            },
        );
        assert!(cmds.contains(&Command::ForgetWorkers(vec![victim.into()])));
        let states = persisted(&cmds, 1);
        assert!(
            matches!(&states[..], [JobState::Retrying { attempt: a, reason }, JobState::Running { attempt: b }]
                if *a == attempt && *b == attempt && reason.contains(victim)),
            "{states:?}"
        );
        let next = started(&cmds).unwrap();
        assert_eq!(next.attempt, attempt);
        assert!(
            next.workers.iter().all(|w| w.id != victim),
            "the dead worker is left out"
        );
        // The dead worker is still listed (its lease has not run out): it stays excluded.
        assert!(m.is_excluded(victim, t));
        run = next;
    }
    // The third loss: max_retries (2) is used up.
    m.on(
        t,
        Event::RunFinished {
            run: run.run,
            result: Err(lost_worker()),
        },
    );
    let cmds = m.on(
        t,
        Event::Probed {
            run: run.run,
            dead: vec!["b".into()],
        },
    );
    let states = persisted(&cmds, 1);
    assert!(
        matches!(&states[..], [JobState::Failed { message }] if message.contains("gave up after 2 retries")),
        "{states:?}"
    );
    // Membership speaking of a worker ends its exclusion; an hour ends every exclusion.
    m.on(t, Event::WorkerMentioned("d".into()));
    assert!(!m.is_excluded("d", t));
    assert!(!m.is_excluded("c", t + Duration::from_secs(3600)));
}

#[test]
fn no_retry_when_every_worker_is_alive_or_the_failure_is_the_jobs_own() {
    let t = Instant::now();
    let mut m = machine(1, 3);
    m.on(t, Event::Workers(workers(&["a", "b"])));
    let run = started(&submit(&mut m, t, 1, 0)).unwrap();
    m.on(
        t,
        Event::RunFinished {
            run: run.run,
            result: Err(lost_worker()),
        },
    );
    let cmds = m.on(
        t,
        Event::Probed {
            run: run.run,
            dead: vec![],
        },
    );
    assert_eq!(
        persisted(&cmds, 1),
        vec![JobState::Failed {
            message: lost_worker().to_string()
        }]
    );
    // A failure a retry cannot fix is not even probed.
    let run = started(&submit(&mut m, t, 2, 0)).unwrap();
    let refused = JobError::LoadRefused {
        worker: "a".into(),
        model: "m".into(),
        version: 1,
        message: "no such file".into(),
    };
    let cmds = m.on(
        t,
        Event::RunFinished {
            run: run.run,
            result: Err(refused.clone()),
        },
    );
    assert!(!cmds.iter().any(|c| matches!(c, Command::Probe { .. })));
    assert_eq!(
        persisted(&cmds, 2),
        vec![JobState::Failed {
            message: refused.to_string()
        }]
    );
}

#[test]
fn cancel_while_queued_while_running_and_after_done() {
    let t = Instant::now();
    let mut m = machine(1, 3);
    m.on(t, Event::Workers(workers(&["a"])));
    let run = started(&submit(&mut m, t, 1, 0)).unwrap();
    submit(&mut m, t, 2, 0);
    // Queued: cancelled at once, never run.
    let cmds = m.on(t, Event::Cancel(2));
    assert_eq!(persisted(&cmds, 2), vec![JobState::Cancelled]);
    assert!(m.queued().is_empty());
    // Running: the run is aborted; the job is cancelled once the run ends, and its late
    // progress is not published.
    let cmds = m.on(t, Event::Cancel(1));
    assert_eq!(cmds, vec![Command::AbortRun { run: run.run }]);
    let late = m.on(
        t,
        Event::Progress {
            run: run.run,
            state: JobState::Prefill {
                layer: 1,
                layers: 2,
            },
            report: Report::default(),
        },
    );
    assert!(late.is_empty(), "{late:?}");
    let cmds = m.on(
        t,
        Event::RunFinished {
            run: run.run,
            result: Err(JobError::Cancelled { id: 1 }),
        },
    );
    assert_eq!(persisted(&cmds, 1), vec![JobState::Cancelled]);
    // Done: a cancel changes nothing.
    let run = started(&submit(&mut m, t, 3, 0)).unwrap();
    finish(&mut m, t, run.run);
    assert!(m.on(t, Event::Cancel(3)).is_empty());
    // Between runs (waiting for a worker after a loss): cancelled at once.
    let run = started(&submit(&mut m, t, 4, 0)).unwrap();
    m.on(
        t,
        Event::RunFinished {
            run: run.run,
            result: Err(lost_worker()),
        },
    );
    m.on(t, Event::Workers(vec![]));
    let cmds = m.on(
        t,
        Event::Probed {
            run: run.run,
            dead: vec!["a".into()],
        },
    );
    assert!(started(&cmds).is_none(), "no worker left");
    let cmds = m.on(t, Event::Cancel(4));
    assert_eq!(persisted(&cmds, 4), vec![JobState::Cancelled]);
    assert!(m.running().is_empty());
}

#[test]
fn a_job_stores_few_states_however_long_it_runs() {
    let t = Instant::now();
    let mut m = machine(1, 3);
    m.on(t, Event::Workers(workers(&["a", "b"])));
    let mut all = submit(&mut m, t, 1, 0);
    let run = started(&all).unwrap();
    // 48 layers and 4096 decoded tokens of progress: published, never stored.
    for layer in 0..48 {
        let cmds = m.on(
            t,
            Event::Progress {
                run: run.run,
                state: JobState::Prefill { layer, layers: 48 },
                report: Report::default(),
            },
        );
        assert!(matches!(&cmds[..], [Command::Publish { id: 1, .. }]));
        all.extend(cmds);
    }
    for token in 0..4096 {
        all.extend(m.on(
            t,
            Event::Progress {
                run: run.run,
                state: JobState::Decode {
                    token,
                    tokens: 4096,
                },
                report: Report::default(),
            },
        ));
    }
    all.extend(finish(&mut m, t, run.run));
    let stores = all
        .iter()
        .filter(|c| matches!(c, Command::Transition { .. } | Command::StoreResult { .. }))
        .count();
    assert_eq!(
        persisted(&all, 1),
        vec![JobState::Running { attempt: 0 }, JobState::Done]
    );
    assert_eq!(stores, 3, "running, the result, done");
    assert!(
        all.iter()
            .any(|c| matches!(c, Command::StoreResult { output, .. } if output.timings.runs == 1))
    );
}

#[test]
fn a_restart_replays_the_store() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ids, done) = {
        let (store, _) = crate::store::JobStore::open(dir.path())?;
        let low = store.create(&spec(0), &[1, 2, 3])?;
        let high = store.create(&spec(5), &[1, 2, 3])?;
        let running = store.create(&spec(1), &[1, 2, 3])?;
        store.set_state(running, JobState::Running { attempt: 0 })?;
        let done = store.create(&spec(9), &[1, 2, 3])?;
        store.set_state(done, JobState::Done)?;
        (vec![high, running, low], done)
    }; // the coordinator dies here
    let (_, recovered) = crate::store::JobStore::open(dir.path())?;
    let t = Instant::now();
    let mut m = machine(1, 3);
    m.on(t, Event::Recovered(recovered.jobs));
    assert_eq!(
        m.queued(),
        ids,
        "the running job re-runs; the done one does not"
    );
    let mut order = Vec::new();
    let mut cmds = m.on(t, Event::Workers(workers(&["a"])));
    while let Some(run) = started(&cmds) {
        assert_ne!(run.id, done);
        order.push(run.id);
        cmds = finish(&mut m, t, run.run);
    }
    assert_eq!(order, ids);
    Ok(())
}

#[test]
fn a_placement_change_while_a_job_is_queued() {
    let t = Instant::now();
    let mut m = machine(1, 3);
    m.on(t, Event::Workers(workers(&["a", "b"])));
    let first = started(&submit(&mut m, t, 1, 0)).unwrap();
    assert!(first.fresh && first.placement.version == 1);
    // The run publishes its placement; a second job queues behind it; a worker joins.
    m.on(t, Event::PlacementKnown(first.placement.clone()));
    submit(&mut m, t, 2, 0);
    m.on(t, Event::Workers(workers(&["a", "b", "c"])));
    let second = started(&finish(&mut m, t, first.run)).unwrap();
    assert_eq!(second.id, 2);
    assert!(second.fresh, "three workers need a new placement");
    assert_eq!(second.placement.version, 2);
    assert_eq!(second.placement.workers, ["a", "b", "c"]);
    // Unchanged membership reuses the published placement.
    m.on(t, Event::PlacementKnown(second.placement.clone()));
    submit(&mut m, t, 3, 0);
    let third = started(&finish(&mut m, t, second.run)).unwrap();
    assert!(!third.fresh);
    assert_eq!(third.placement, second.placement);
    // A placement published elsewhere (another leader) with a newer version counts; an older
    // one does not replace it.
    let mut newer = third.placement.clone();
    newer.version = 7;
    m.on(t, Event::PlacementKnown(newer.clone()));
    let mut older = newer.clone();
    older.version = 3;
    m.on(t, Event::PlacementKnown(older));
    submit(&mut m, t, 4, 0);
    m.on(t, Event::Workers(workers(&["a", "b"])));
    let fourth = started(&finish(&mut m, t, third.run)).unwrap();
    assert_eq!(fourth.placement.version, 8);
}

#[test]
fn a_job_too_long_for_the_workers_fails_and_the_next_runs() {
    let t = Instant::now();
    let mut m = machine(1, 3);
    // 2 workers of 1000 tokens each.
    m.on(
        t,
        Event::Submitted {
            id: 1,
            spec: spec(0),
            input_len: 5000,
        },
    );
    submit(&mut m, t, 2, 0);
    let cmds = m.on(t, Event::Workers(workers(&["a", "b"])));
    let states = persisted(&cmds, 1);
    assert!(
        matches!(&states[..], [JobState::Failed { message }] if message.contains("needs K/V for 5000 tokens") && message.contains("hold 2000")),
        "{states:?}"
    );
    assert_eq!(started(&cmds).map(|r| r.id), Some(2));
}

#[test]
fn events_of_an_old_run_change_nothing() {
    let t = Instant::now();
    let mut m = machine(1, 3);
    m.on(t, Event::Workers(workers(&["a", "b"])));
    let run = started(&submit(&mut m, t, 1, 0)).unwrap();
    m.on(
        t,
        Event::RunFinished {
            run: run.run,
            result: Err(lost_worker()),
        },
    );
    let next = started(&m.on(
        t,
        Event::Probed {
            run: run.run,
            dead: vec!["b".into()],
        },
    ))
    .unwrap();
    assert_ne!(next.run, run.run);
    // The first run's stream ends late with a result: ignored.
    assert!(finish(&mut m, t, run.run).is_empty());
    assert!(
        m.on(
            t,
            Event::Progress {
                run: run.run,
                state: JobState::Prefill {
                    layer: 0,
                    layers: 2
                },
                report: Report::default(),
            },
        )
        .is_empty()
    );
    assert_eq!(
        persisted(&finish(&mut m, t, next.run), 1),
        vec![JobState::Done]
    );
}

#[test]
fn a_placement_published_by_a_failed_run_is_not_reused_stale() {
    let t = Instant::now();
    let mut m = machine(1, 3);
    m.on(t, Event::Workers(workers(&["a", "b"])));
    let first = started(&submit(&mut m, t, 1, 0)).unwrap();
    m.on(t, Event::PlacementKnown(first.placement.clone()));
    finish(&mut m, t, first.run);
    // A third worker joins; the next run publishes version 2 for three workers, then loses c
    // before every worker acknowledged it.
    m.on(t, Event::Workers(workers(&["a", "b", "c"])));
    let second = started(&submit(&mut m, t, 2, 0)).unwrap();
    assert_eq!(second.placement.version, 2);
    m.on(t, Event::PlacementKnown(second.placement.clone()));
    m.on(
        t,
        Event::RunFinished {
            run: second.run,
            result: Err(JobError::LeftWhileLoading {
                worker: "c".into(),
                model: "m".into(),
                version: 2,
            }),
        },
    );
    let retry = started(&m.on(
        t,
        Event::Probed {
            run: second.run,
            dead: vec!["c".into()],
        },
    ))
    .unwrap();
    // Version 1 covered exactly a and b, but the workers now hold version 2: reusing 1 would
    // wait for acknowledgements that never come. The retry publishes version 3.
    assert!(retry.fresh);
    assert_eq!(retry.placement.version, 3);
    assert_eq!(retry.placement.workers, ["a", "b"]);
}

#[test]
fn a_worker_leaving_mid_run_aborts_the_run_and_it_retries_without_it() {
    let t = Instant::now();
    let mut m = machine(1, 2);
    m.on(t, Event::Workers(workers(&["a", "b", "c"])));
    let run = started(&submit(&mut m, t, 1, 0)).unwrap();
    // Still listed: nothing happens; "c"'s lease ends: the run is aborted, once.
    assert!(
        m.on(t, Event::Workers(workers(&["a", "b", "c"])))
            .is_empty()
    );
    let cmds = m.on(t, Event::Workers(workers(&["a", "b"])));
    assert_eq!(cmds, vec![Command::AbortRun { run: run.run }]);
    assert!(m.on(t, Event::Workers(workers(&["a"]))).is_empty());
    // The aborted run ends cancelled; that is the lost worker's failure. No probe (a cut-off
    // worker would only time out): "c" counts as dead, the job retries on the rest at once.
    m.on(t, Event::Workers(workers(&["a", "b"])));
    let cmds = m.on(
        t,
        Event::RunFinished {
            run: run.run,
            result: Err(JobError::Cancelled { id: 1 }),
        },
    );
    assert!(
        !cmds.iter().any(|c| matches!(c, Command::Probe { .. })),
        "{cmds:?}"
    );
    assert!(cmds.contains(&Command::ForgetWorkers(vec!["c".into()])));
    let states = persisted(&cmds, 1);
    assert!(
        matches!(&states[..], [JobState::Retrying { attempt: 1, reason }, JobState::Running { attempt: 1 }]
            if reason.contains("lost worker(s) c: worker c left the membership during the run")),
        "{states:?}"
    );
    let next = started(&cmds).unwrap();
    assert!(next.workers.iter().all(|w| w.id != "c"));
    // A cancel is still a cancel: a worker leaving after it changes nothing.
    let cmds = m.on(t, Event::Cancel(1));
    assert_eq!(cmds, vec![Command::AbortRun { run: next.run }]);
    assert!(m.on(t, Event::Workers(workers(&["a"]))).is_empty());
}

#[test]
fn with_groups_jobs_run_at_once_on_different_groups_each_with_its_placement() {
    let t = Instant::now();
    let mut m = machine_with_groups(1, 3, 2);
    m.on(t, Event::Workers(workers(&["a", "b", "c", "d", "e"])));
    // Five workers in groups of two: [a, b] and [c, d, e] (the remainder joins the last).
    assert_eq!(
        m.groups(&m.live_workers(t))
            .iter()
            .map(|g| g.len())
            .collect::<Vec<_>>(),
        vec![2, 3]
    );
    let first = started(&submit(&mut m, t, 1, 0)).unwrap();
    let second = started(&submit(&mut m, t, 2, 0)).unwrap();
    assert!(
        started(&submit(&mut m, t, 3, 0)).is_none(),
        "no third group"
    );
    assert_eq!(ids_of(&first), ["a", "b"]);
    assert_eq!(ids_of(&second), ["c", "d", "e"]);
    assert!(first.fresh && second.fresh);
    assert_ne!(first.placement.version, second.placement.version);
    assert_eq!(m.running(), vec![1, 2]);
    m.on(t, Event::PlacementKnown(first.placement.clone()));
    m.on(t, Event::PlacementKnown(second.placement.clone()));
    // The first group frees up: the third job runs there, on that group's placement.
    let third = started(&finish(&mut m, t, first.run)).unwrap();
    assert_eq!((third.id, ids_of(&third)), (3, vec!["a", "b"]));
    assert!(!third.fresh);
    assert_eq!(third.placement, first.placement);
    // Progress and results go to the right job.
    let cmds = m.on(
        t,
        Event::Progress {
            run: second.run,
            state: JobState::Prefill {
                layer: 1,
                layers: 2,
            },
            report: Report::default(),
        },
    );
    assert!(
        matches!(&cmds[..], [Command::Publish { id: 2, .. }]),
        "{cmds:?}"
    );
    assert_eq!(
        persisted(&finish(&mut m, t, second.run), 2),
        vec![JobState::Done]
    );
    assert_eq!(
        persisted(&finish(&mut m, t, third.run), 3),
        vec![JobState::Done]
    );
    assert!(m.running().is_empty());
}

#[test]
fn with_groups_a_job_no_group_holds_waits_for_every_worker_and_nothing_overtakes_it() {
    let t = Instant::now();
    let mut m = machine_with_groups(1, 3, 2);
    m.on(t, Event::Workers(workers(&["a", "b", "c", "d"])));
    let small = started(&submit(&mut m, t, 1, 0)).unwrap();
    // 3000 tokens: a group of two holds 2000, all four 4000.
    let cmds = m.on(
        t,
        Event::Submitted {
            id: 2,
            spec: spec(0),
            input_len: 3000,
        },
    );
    assert!(started(&cmds).is_none(), "waits for the whole cluster");
    // A small job behind it does not overtake it, although a group is free.
    assert!(started(&submit(&mut m, t, 3, 0)).is_none());
    let long = started(&finish(&mut m, t, small.run)).unwrap();
    assert_eq!((long.id, ids_of(&long)), (2, vec!["a", "b", "c", "d"]));
    let next = all_started(&finish(&mut m, t, long.run));
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].id, ids_of(&next[0])), (3, vec!["a", "b"]));
}

#[test]
fn with_groups_a_retried_job_waits_for_a_free_group_and_draining_workers_get_none() {
    let t = Instant::now();
    let mut m = machine_with_groups(1, 3, 2);
    m.on(t, Event::Workers(workers(&["a", "b", "c", "d"])));
    let one = started(&submit(&mut m, t, 1, 0)).unwrap();
    let two = started(&submit(&mut m, t, 2, 0)).unwrap();
    m.on(
        t,
        Event::RunFinished {
            run: one.run,
            result: Err(lost_worker()),
        },
    );
    // b is dead: three live workers make one group, busy with job 2: the retry waits.
    let cmds = m.on(
        t,
        Event::Probed {
            run: one.run,
            dead: vec!["b".into()],
        },
    );
    assert!(started(&cmds).is_none(), "{cmds:?}");
    assert!(matches!(
        &persisted(&cmds, 1)[..],
        [JobState::Retrying { .. }]
    ));
    let retry = started(&finish(&mut m, t, two.run)).unwrap();
    assert_eq!((retry.id, ids_of(&retry)), (1, vec!["a", "c", "d"]));
    finish(&mut m, t, retry.run);
    // A draining worker is in no group.
    let mut list = workers(&["a", "b", "c", "d"]);
    list[3].draining = true;
    m.on(t, Event::Workers(list));
    let run = started(&submit(&mut m, t, 4, 0)).unwrap();
    assert!(!ids_of(&run).contains(&"d"), "{:?}", ids_of(&run));
}
