//! The cluster on a network of the test's own hosts: etcd, a coordinator and four workers,
//! each in its own network namespace with its own address (testkit's `TestNet`), started with
//! `--addr`/`--data-host` on that address; the test talks to the coordinator as a client on
//! the same network. Faults here are network faults: a worker's link goes down mid-prefill
//! while the process lives on. Needs root (network namespaces): without it the test fails
//! saying so, never skips.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ringmoe_model::{LoadOptions, Model, write_random_checkpoint};
use ringmoe_proto::client::{self, JobResult};
use ringmoe_proto::proto::{self, JobPhase};
use ringmoe_testkit::{
    CLUSTER_MODEL_CONFIG, CLUSTER_MODEL_SEED, ClusterSpec, NsCluster, TestNet, max_abs_diff,
};

mod common;
use common::procs::spec;
use common::{reference, submit_watching};

const BIN: &str = env!("CARGO_BIN_EXE_ringmoe");

fn model(dir: &Path) -> Result<PathBuf> {
    let m = dir.join("model");
    write_random_checkpoint(
        &m,
        &serde_json::from_str(CLUSTER_MODEL_CONFIG)?,
        CLUSTER_MODEL_SEED,
    )?;
    Ok(m)
}

fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i ^ seed).wrapping_mul(2_654_435_761) % 512)
        .collect()
}

const WORKERS: usize = 4;

/// The cluster on its test network (testkit's `NsCluster`), and the client's side of it.
struct Cluster {
    c: NsCluster,
    /// The first coordinator's address (the leader, started first).
    addr: String,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Cluster {
    type Target = NsCluster;
    fn deref(&self) -> &NsCluster {
        &self.c
    }
}

impl Cluster {
    /// Jobs wait for `min_workers` live workers that are not excluded.
    fn start(
        model: &Path,
        coordinators: usize,
        workers: usize,
        min_workers: usize,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let spec = ClusterSpec {
            bin: BIN.into(),
            model: format!("m={}", model.display()),
            coordinators,
            workers,
            min_workers,
            leader_ttl_secs: 3,
            worker_ttl_secs: 1,
            coordinator_args: Vec::new(),
        };
        let mut c = NsCluster::start(spec, dir.path())?;
        c.start_workers()?;
        Ok(Self {
            addr: c.addrs[0].clone(),
            c,
            _dir: dir,
        })
    }

    async fn live_workers(&self) -> Result<u32> {
        let mut c = client::connect(&self.addr, 1 << 20).await?;
        Ok(c.list_jobs(proto::ListJobsRequest {})
            .await?
            .into_inner()
            .workers)
    }

    async fn wait_for_workers(&self, n: u32) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            match self.live_workers().await {
                Ok(k) if k == n => return Ok(()),
                _ if Instant::now() > end => bail!("{n} workers never registered"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// A job through the coordinator, watching it; `on` sees each progress message. Returns the
/// phases seen, the largest worker count of a run, and the result.
async fn job(
    addr: &str,
    spec: proto::JobSpec,
    ids: &[u32],
    mut on: impl FnMut(&proto::JobProgress) -> Result<()>,
) -> Result<(Vec<JobPhase>, u32, JobResult)> {
    let (mut cl, id, mut s) = submit_watching(addr, spec, ids).await?;
    let (mut phases, mut workers) = (Vec::new(), 0);
    while let Some(p) = s.message().await? {
        on(&p)?;
        if phases.last() != Some(&p.phase()) {
            phases.push(p.phase());
        }
        workers = workers.max(p.workers);
    }
    ensure!(phases.last() == Some(&JobPhase::Done), "{phases:?}");
    Ok((phases, workers, client::result(&mut cl, id).await?))
}

#[test]
fn a_namespaced_cluster_matches_the_engine_and_outlives_a_partitioned_worker() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model_dir = model(tmp.path())?;
    let c = Cluster::start(&model_dir, 1, WORKERS, WORKERS)?;
    let prefix = c.net.prefix().to_string();
    let engine = Model::load(&model_dir, &LoadOptions::default())?;
    let short = ids(2_000, 3);
    let long = ids(16 * 1024, 5);
    let (want_short, want_tokens) = reference(&engine, &short, 8)?;
    let (want_long, _) = reference(&engine, &long, 1)?;
    drop(engine);
    let rt = rt()?;
    rt.block_on(async {
        c.wait_for_workers(WORKERS as u32).await?;
        // Score and generate over four hosts, equal to the single-process engine.
        let (_, n, r) = job(&c.addr, spec(proto::JobMode::Score, 0), &short, |_| Ok(())).await?;
        ensure!(n == WORKERS as u32, "ran on {n} workers");
        let JobResult::Scores(got) = r else {
            bail!("not scores")
        };
        let d = max_abs_diff(&got, &want_short);
        ensure!(d <= 1e-4, "score: max |Δ| {d:e}");
        let (_, _, r) = job(&c.addr, spec(proto::JobMode::Generate, 8), &short, |_| {
            Ok(())
        })
        .await?;
        ensure!(
            r == JobResult::Tokens(want_tokens.clone()),
            "generate: {r:?}"
        );

        // Worker 3's link goes down in the first prefill layer; its process lives on. Its lease
        // ends, the coordinator stops the run, and the job re-runs on the other three.
        let victim = WORKERS - 1;
        let mut cut = None;
        let (phases, _, r) = job(&c.addr, spec(proto::JobMode::Score, 0), &long, |p| {
            if cut.is_none() && p.phase() == JobPhase::Prefill {
                c.net.link_down(c.worker_host(victim))?;
                cut = Some(Instant::now());
            }
            Ok(())
        })
        .await?;
        let cut = cut.context("the long job never reached prefill")?;
        eprintln!(
            "partitioned mid-prefill; the job was done {:?} later",
            cut.elapsed()
        );
        ensure!(phases.contains(&JobPhase::Retrying), "{phases:?}");
        let JobResult::Scores(got) = r else {
            bail!("not scores")
        };
        let d = max_abs_diff(&got, &want_long);
        ensure!(d <= 1e-4, "after the partition: max |Δ| {d:e}");

        // Healed, the worker registers again and the next job uses all four.
        c.net.link_up(c.worker_host(victim))?;
        c.wait_for_workers(WORKERS as u32).await?;
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, n, r) =
                job(&c.addr, spec(proto::JobMode::Score, 0), &short, |_| Ok(())).await?;
            let JobResult::Scores(got) = r else {
                bail!("not scores")
            };
            let d = max_abs_diff(&got, &want_short);
            ensure!(d <= 1e-4, "after healing: max |Δ| {d:e}");
            if n == WORKERS as u32 {
                break;
            }
            // Excluded after its probe found it dead, until membership mentions it again.
            ensure!(
                Instant::now() < end,
                "the healed worker was never used again"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        anyhow::Ok(())
    })?;
    let log = c.log("coordinator-0")?;
    ensure!(
        log.contains("left the membership during the run"),
        "the coordinator's log does not say why the run stopped: {}",
        log.lines()
            .filter(|l| l.contains("WARN") || l.contains("retry") || l.contains("left"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(c);
    ensure!(
        TestNet::namespaces_left(&prefix)?.is_empty(),
        "namespaces left behind"
    );
    Ok(())
}

/// Two workers cut off from each other only (each still reaches etcd, the coordinator and the
/// other workers). Before a job: its data-plane rendezvous fails on that link within the
/// workers' rendezvous timeout, and the job re-runs without the end the failing worker blamed.
/// Mid-prefill, on established connections: the stalled link fails within the unacknowledged-
/// data timeout, and the job re-runs likewise. Never a hang; results equal the engine's.
#[test]
fn workers_cut_off_from_each_other_rerun_without_one_end() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model_dir = model(tmp.path())?;
    // Three: the worker left out after the first cut stays excluded for a while.
    let c = Cluster::start(&model_dir, 1, WORKERS, WORKERS - 1)?;
    let engine = Model::load(&model_dir, &LoadOptions::default())?;
    let short = ids(2_000, 11);
    let long = ids(16 * 1024, 13);
    let (want_short, _) = reference(&engine, &short, 1)?;
    let (want_long, _) = reference(&engine, &long, 1)?;
    drop(engine);
    let rt = rt()?;
    rt.block_on(async {
        c.wait_for_workers(WORKERS as u32).await?;
        c.net.isolate(c.worker_host(1), c.worker_host(2))?;
        let t = Instant::now();
        let (phases, n, r) =
            job(&c.addr, spec(proto::JobMode::Score, 0), &short, |_| Ok(())).await?;
        eprintln!(
            "cut before the job: done in {:?} on {n} workers",
            t.elapsed()
        );
        ensure!(phases.contains(&JobPhase::Retrying), "{phases:?}");
        let JobResult::Scores(got) = r else {
            bail!("not scores")
        };
        let d = max_abs_diff(&got, &want_short);
        ensure!(d <= 1e-4, "after a cut before the job: max |Δ| {d:e}");
        c.net.reconnect(c.worker_host(1), c.worker_host(2))?;

        // Mid-prefill, between two of the workers the next run uses (one of 1 and 2 is
        // excluded for a while): 0 and 3.
        let mut cut = None;
        let (phases, _, r) = job(&c.addr, spec(proto::JobMode::Score, 0), &long, |p| {
            if cut.is_none() && p.phase() == JobPhase::Prefill {
                c.net
                    .isolate(c.worker_host(0), c.worker_host(WORKERS - 1))?;
                cut = Some(Instant::now());
            }
            Ok(())
        })
        .await?;
        let cut = cut.context("the long job never reached prefill")?;
        eprintln!("cut mid-prefill: done {:?} later", cut.elapsed());
        ensure!(phases.contains(&JobPhase::Retrying), "{phases:?}");
        let JobResult::Scores(got) = r else {
            bail!("not scores")
        };
        let d = max_abs_diff(&got, &want_long);
        ensure!(d <= 1e-4, "after a cut mid-prefill: max |Δ| {d:e}");
        anyhow::Ok(())
    })?;
    let log = c.log("coordinator-0")?;
    ensure!(
        log.contains("lost its data link"),
        "the coordinator's log does not say which link failed"
    );
    Ok(())
}

/// The leader loses etcd but not its workers, mid-prefill: it gives up leadership at its renew
/// deadline (before its lease could end) and exits; the standby is elected with a larger
/// fencing token, fences the store, re-queues the job and finishes it exactly once, with the
/// engine's result.
#[test]
fn a_leader_cut_off_from_etcd_steps_down_and_the_standby_finishes_the_job_once() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model_dir = model(tmp.path())?;
    let mut c = Cluster::start(&model_dir, 2, 3, 3)?;
    let long = ids(16 * 1024, 9);
    let engine = Model::load(&model_dir, &LoadOptions::default())?;
    let (want, _) = reference(&engine, &long, 1)?;
    drop(engine);
    let rt = rt()?;
    let (id, cut) = rt.block_on(async {
        c.wait_for_workers(3).await?;
        let (_cl, id, mut s) =
            submit_watching(&c.addrs[0], spec(proto::JobMode::Score, 0), &long).await?;
        // The old leader's stream ends (with an error) when it steps down.
        let prefill = async {
            while let Ok(Some(p)) = s.message().await {
                if p.phase() == JobPhase::Prefill {
                    return true;
                }
            }
            false
        };
        match tokio::time::timeout(Duration::from_secs(120), prefill).await {
            Ok(true) => {
                c.net.isolate(1, 0)?;
                anyhow::Ok((id, Instant::now()))
            }
            Ok(false) => bail!("the job never reached prefill"),
            Err(_) => bail!("the job did not reach prefill in 120 s"),
        }
    })?;
    let old = c.c.coordinators[0].as_mut().context("leader")?;
    let status = old.wait_exit(Duration::from_secs(10))?;
    let stepped_down = cut.elapsed();
    ensure!(status.is_some(), "the cut-off leader still runs 10 s later");
    eprintln!("the old leader exited {stepped_down:?} after losing etcd ({status:?})");
    let finish = async {
        // Connecting waits until the standby, now leader, serves.
        let mut cl = client::connect(&c.addrs[1], 64 << 20).await?;
        let last = client::watch(&mut cl, id, |_| {}).await?;
        ensure!(last.phase() == JobPhase::Done, "{last:?}");
        let l = cl.list_jobs(proto::ListJobsRequest {}).await?.into_inner();
        ensure!(l.jobs.len() == 1, "{} jobs", l.jobs.len());
        anyhow::Ok(client::result(&mut cl, id).await?)
    };
    let got = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(300), finish).await })
        .context("the standby did not finish the job in 300 s")??;
    let JobResult::Scores(got) = got else {
        bail!("not scores")
    };
    let d = max_abs_diff(&got, &want);
    ensure!(d <= 1e-4, "after the failover: max |Δ| {d:e}");
    let log = |k: usize| c.log(&format!("coordinator-{k}"));
    let (old_log, new_log) = (log(0)?, log(1)?);
    ensure!(
        old_log.contains("leadership lost"),
        "the old leader does not say why it stopped"
    );
    let token = |log: &str| -> Option<u64> {
        log.lines()
            .find(|l| l.contains("elected leader"))?
            .split("fencing_token=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let (t_old, t_new) = (token(&old_log), token(&new_log));
    ensure!(
        matches!((t_old, t_new), (Some(a), Some(b)) if b > a),
        "fencing tokens {t_old:?} then {t_new:?}"
    );
    let fence: u64 = std::fs::read_to_string(c.dir.join("store/fence"))?
        .trim()
        .parse()?;
    ensure!(Some(fence) == t_new, "the store is fenced at {fence}");
    // Its renew deadline is 2 s of its 3 s TTL; it exits once its runs stopped.
    ensure!(
        stepped_down < Duration::from_secs(8),
        "the old leader took {stepped_down:?} to exit"
    );
    Ok(())
}
