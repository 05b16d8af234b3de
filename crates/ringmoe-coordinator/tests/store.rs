//! The job store across restarts: what `create` returned survives, running jobs re-queue,
//! finished ones stay finished, half-created ones disappear, corrupt files are named.

use anyhow::{Result, ensure};
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
    std::fs::write(
        dir.path().join(format!("jobs/{id}/state.json")),
        "{\"state\": \"sideways\"}",
    )?;
    let err = JobStore::open(dir.path()).unwrap_err().to_string();
    ensure!(
        err.contains("state.json") && err.contains("sideways"),
        "{err}"
    );
    Ok(())
}
