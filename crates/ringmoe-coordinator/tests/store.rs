//! The job store across restarts: what `create` returned survives, running jobs re-queue,
//! finished ones stay finished, half-created ones disappear, corrupt files are named.

use anyhow::{Context, Result, ensure};
use ringmoe_coordinator::{JobMode, JobSpec, JobState, JobStore, StoreError};

fn spec(priority: i32) -> JobSpec {
    JobSpec {
        model: "mixtral-tiny".into(),
        mode: JobMode::Score,
        attention: "dense".into(),
        priority,
        owner: None,
    }
}

#[test]
fn acknowledged_jobs_survive_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tokens: Vec<u32> = (0..100_000).map(|i| (i * 7919) % 32_000).collect();
    let (queued, running, done) = {
        let (store, rec) = JobStore::open(dir.path())?;
        ensure!(rec.jobs.is_empty());
        let queued = store.create(&spec(1), &tokens)?;
        let running = store.create(&spec(2), &tokens[..10])?;
        let done = store.create(&spec(3), &[5, 6, 7])?;
        store.set_state(running, JobState::Loading)?;
        store.set_state(
            running,
            JobState::Prefill {
                layer: 3,
                layers: 48,
            },
        )?;
        for s in [
            JobState::Loading,
            JobState::Decode {
                token: 2,
                tokens: 2,
            },
            JobState::Done,
        ] {
            store.set_state(done, s)?;
        }
        store.put_result(done, &serde_json::json!({"nll": [1.5, 2.25]}))?;
        (queued, running, done)
    }; // the "coordinator" goes away here
    // A job whose creation was cut short (no state file): never acknowledged.
    std::fs::create_dir(dir.path().join("jobs/99"))?;
    std::fs::write(dir.path().join("jobs/99/input.bin"), [0u8; 8])?;

    let (store, rec) = JobStore::open(dir.path())?;
    let ids: Vec<u64> = rec.jobs.iter().map(|j| j.id).collect();
    ensure!(ids == vec![queued, running, done], "{ids:?}");
    ensure!(rec.requeued == vec![running]);
    ensure!(rec.discarded.len() == 1 && !dir.path().join("jobs/99").exists());
    ensure!(store.input(queued)? == tokens);
    ensure!(rec.jobs[0].input_len == tokens.len() && rec.jobs[0].spec == spec(1));
    ensure!(store.state(running)? == JobState::Queued);
    ensure!(store.state(done)? == JobState::Done);
    ensure!(
        store.result::<serde_json::Value>(done)? == Some(serde_json::json!({"nll": [1.5, 2.25]}))
    );
    ensure!(store.result::<serde_json::Value>(queued)?.is_none());
    // New ids never reuse old ones (99 was seen, even though discarded).
    let next = store.create(&spec(0), &[1])?;
    ensure!(next == 100, "{next}");
    Ok(())
}

#[test]
fn bad_transitions_unknown_jobs_and_corrupt_files_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (store, _) = JobStore::open(dir.path())?;
    let id = store.create(&spec(0), &[1, 2, 3])?;
    store.set_state(id, JobState::Cancelled)?;
    let err = store
        .set_state(id, JobState::Loading)
        .unwrap_err()
        .to_string();
    ensure!(err.contains("cannot go from cancelled to loading"), "{err}");
    ensure!(matches!(store.state(42), Err(StoreError::UnknownJob(42))));
    ensure!(matches!(store.input(42), Err(StoreError::UnknownJob(42))));
    // Damaged files of finished or unfinished jobs: the store opens, lists each as failed
    // with what is wrong, and keeps the good jobs.
    let good = store.create(&spec(5), &[4, 5])?;
    let truncated = store.create(&spec(6), &[1, 2])?;
    let no_spec = store.create(&spec(7), &[1])?;
    let torn_input = store.create(&spec(8), &[1, 2, 3])?;
    let job = |id: u64, f: &str| dir.path().join(format!("jobs/{id}/{f}"));
    std::fs::write(job(id, "state.json"), "{\"state\": \"sideways\"}")?;
    std::fs::write(job(truncated, "state.json"), "{\"sta")?;
    std::fs::write(job(no_spec, "spec.json"), "")?;
    std::fs::write(job(torn_input, "input.bin"), [0u8; 5])?;
    let (reopened, rec) = JobStore::open(dir.path())?;
    let damaged: Vec<u64> = rec.damaged.iter().map(|(id, _)| *id).collect();
    ensure!(
        damaged == [id, truncated, no_spec, torn_input],
        "{:?}",
        rec.damaged
    );
    let why = |i: usize| rec.damaged[i].1.clone();
    ensure!(
        why(0).contains("state.json") && why(0).contains("sideways"),
        "{}",
        why(0)
    );
    ensure!(
        why(2).contains("spec.json") && why(3).contains("whole number"),
        "{:?}",
        rec.damaged
    );
    for j in &rec.jobs {
        match j.id {
            x if x == good => ensure!(j.state == JobState::Queued && j.spec == spec(5)),
            x if x == truncated => ensure!(
                matches!(&j.state, JobState::Failed { message } if message.contains("damaged"))
                    && j.spec == spec(6)
            ),
            _ => ensure!(matches!(j.state, JobState::Failed { .. }), "{j:?}"),
        }
    }
    ensure!(rec.jobs.len() == 5);
    // New ids never reuse a damaged job's.
    ensure!(reopened.create(&spec(0), &[1])? > torn_input);
    Ok(())
}

/// Two elected coordinators in turn on one store: once the newer leader opened it (raising the
/// fence to its token), every write of the older one is refused and counted, reads still work,
/// and a leader with a token below the fence cannot open it at all.
#[test]
fn a_newer_leaders_fence_refuses_the_older_leaders_writes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (old, _) = JobStore::open_fenced(dir.path(), 5)?;
    let id = old.create(&spec(1), &[1, 2, 3])?;
    old.set_state(id, JobState::Loading)?;
    let (new, rec) = JobStore::open_fenced(dir.path(), 7)?;
    // The new leader re-queues what was running.
    ensure!(rec.requeued == vec![id], "{:?}", rec.requeued);
    for (what, r) in [
        ("set_state", old.set_state(id, JobState::Done).err()),
        (
            "put_result",
            old.put_result(id, &serde_json::json!({})).err(),
        ),
        ("create", old.create(&spec(2), &[4]).err()),
    ] {
        let e = r.with_context(|| format!("the old leader's {what} went through"))?;
        ensure!(
            matches!(
                e,
                StoreError::Fenced {
                    token: 5,
                    current: 7,
                    ..
                }
            ),
            "{what}: {e}"
        );
    }
    ensure!(old.stale_writes_refused() == 3);
    ensure!(old.state(id)? == JobState::Queued, "reads still work");
    new.set_state(id, JobState::Done)?;
    ensure!(new.stale_writes_refused() == 0);
    let e = JobStore::open_fenced(dir.path(), 6).err();
    ensure!(
        matches!(
            e,
            Some(StoreError::Fenced {
                token: 6,
                current: 7,
                ..
            })
        ),
        "{e:?}"
    );
    // The same leader reopening (a restart with the same token) is fine.
    JobStore::open_fenced(dir.path(), 7)?;
    Ok(())
}
