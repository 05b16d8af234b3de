//! Expert replicas that follow the load, on real processes (127.0.0.1): the coordinator measures
//! a skewed job stream, republishes a balanced placement on its own, the workers move only the
//! experts that changed (in the background while a job runs on the old version), results stay
//! those of the single-process engine; a worker that gets SIGTERM drains.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ringmoe_model::{LoadOptions, LogitsFor, Model};
use ringmoe_plan::layered_imbalance;
use ringmoe_proto::client::{self, Input};
use ringmoe_proto::proto::{self, JobPhase};
use ringmoe_testkit::{Etcd, fixture, max_abs_diff};

mod common;
use common::procs::*;
use common::{reference, submit_watching};

/// The fixture with its EOS moved out of the vocabulary, so generate jobs run their full length.
fn model_copy(dir: &Path) -> Result<PathBuf> {
    let to = dir.join("mixtral-tiny");
    std::fs::create_dir_all(&to)?;
    for e in std::fs::read_dir(fixture("mixtral-tiny"))? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    for f in ["config.json", "generation_config.json"] {
        let p = to.join(f);
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
        v["eos_token_id"] = 9999.into();
        std::fs::write(&p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(to)
}

/// Inputs that route most rows to a few experts, built from the model's own router: the token
/// whose repetition is the most imbalanced under the contiguous placement over 4 workers, at
/// 7 of every 8 positions (the rest pseudo-random).
fn skewed_ids(model: &Model, n: usize, seed: u32) -> Result<Vec<u32>> {
    let vocab = model.config.vocab_size as u32;
    let experts = model.config.moe.num_experts;
    let mut best = (0.0, 0u32);
    for t in 0..vocab.min(128) {
        let out = model.forward(&[t; 32], &mut model.new_cache(), LogitsFor::All)?;
        let per_layer: Vec<Vec<f64>> = out
            .routing
            .iter()
            .map(|(_, r)| {
                let mut w = vec![0.0; 4];
                for &e in &r.expert_ids {
                    w[e as usize * 4 / experts] += 1.0;
                }
                w
            })
            .collect();
        let x = layered_imbalance(&per_layer);
        if x > best.0 {
            best = (x, t);
        }
    }
    Ok((0..n as u32)
        .map(|i| {
            if i % 8 == 7 {
                (i ^ seed).wrapping_mul(2_654_435_761) % vocab
            } else {
                best.1
            }
        })
        .collect())
}

async fn status(addr: &str) -> Result<proto::ClusterStatus> {
    let mut c = client::connect(addr, 1 << 20).await?;
    Ok(c.get_cluster_status(proto::ClusterStatusRequest {})
        .await?
        .into_inner())
}

/// Polls the status until `done` holds (within `secs`).
async fn wait_status(
    addr: &str,
    secs: u64,
    what: &str,
    done: impl Fn(&proto::ClusterStatus) -> bool,
) -> Result<proto::ClusterStatus> {
    let t = Instant::now();
    loop {
        let s = status(addr).await?;
        if done(&s) {
            return Ok(s);
        }
        ensure!(
            t.elapsed() < Duration::from_secs(secs),
            "{what} did not happen within {secs} s: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn placement(s: &proto::ClusterStatus) -> Result<&proto::ModelPlacement> {
    s.placements.first().context("no placement")
}

/// A score job of `ids` equals the engine's NLL; a generate job its greedy tokens.
fn check_score(got: Vec<f32>, want: &[f32], what: &str) -> Result<()> {
    let d = max_abs_diff(&got, want);
    ensure!(d <= 1e-4, "{what}: max |Δ NLL| {d:e}");
    Ok(())
}

/// Runs the skewed stream on `addr` (4 workers): a score job on placement 1, the rebalance it
/// causes, the same job on placement 2, a generate job; checks results and imbalances.
fn skewed_stream(rt: &tokio::runtime::Runtime, addr: &str, model_dir: &Path) -> Result<()> {
    let model = Model::load(model_dir, &LoadOptions::default())?;
    let ids = skewed_ids(&model, 512, 3)?;
    let (want, want_tokens) = reference(&model, &ids, 12)?;
    let (_, first) = rt.block_on(run_job(
        addr,
        spec(proto::JobMode::Score, 0),
        Input::Tokens(ids.clone()),
    ))?;
    let first = scores(first)?;
    check_score(first.clone(), &want, "score on the contiguous placement")?;
    // The coordinator read the skew after the job and rebalances on its own.
    let s = rt.block_on(wait_status(addr, 60, "a rebalance", |s| {
        s.placements
            .first()
            .is_some_and(|p| p.version >= 2 && p.rebalancing_to == 0 && p.rebalances >= 1)
    }))?;
    let p = placement(&s)?;
    ensure!(
        p.measured_version == 1 && p.expert_imbalance >= 1.5,
        "the skew measured under the contiguous placement: {p:?}"
    );
    let before = p.expert_imbalance;
    let (_, second) = rt.block_on(run_job(
        addr,
        spec(proto::JobMode::Score, 0),
        Input::Tokens(ids.clone()),
    ))?;
    let second = scores(second)?;
    check_score(second.clone(), &want, "score on the rebalanced placement")?;
    let d = max_abs_diff(&first, &second);
    ensure!(
        d <= 1e-5,
        "the same job before and after: max |Δ NLL| {d:e}"
    );
    let s = rt.block_on(status(addr))?;
    let p = placement(&s)?;
    ensure!(
        p.measured_version == p.version && p.expert_imbalance <= 1.15,
        "measured on the rebalanced placement: {p:?}"
    );
    eprintln!(
        "measured imbalance {before:.3} on v1 → {:.3} on v{} (planned {:.3}); |Δ NLL| {d:e}",
        p.expert_imbalance, p.version, p.planned_imbalance
    );
    ensure!(
        s.workers
            .iter()
            .all(|w| w.state == "ready" && w.measured_load > 0.0),
        "{s:?}"
    );
    let (_, generated) = rt.block_on(run_job(
        addr,
        spec(proto::JobMode::Generate, 12),
        Input::Tokens(ids),
    ))?;
    ensure!(tokens(generated)? == want_tokens, "greedy tokens differ");
    Ok(())
}

#[test]
fn a_skewed_job_stream_is_rebalanced_on_its_own_and_results_do_not_change() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = model_copy(dir.path())?;
    let c = cluster(&m, 4, &["--load-interval-secs", "1"], &[])?;
    let rt = rt()?;
    rt.block_on(wait_for_workers(&c.addr, 4))?;
    skewed_stream(&rt, &c.addr, &m)?;
    // The status command's JSON: the documented keys, the rebalanced placement.
    let out = Command::new(env!("CARGO_BIN_EXE_ringmoe"))
        .args(["status", "--addr", &c.addr, "--json"])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    for k in [
        "workers",
        "placements",
        "expert_imbalance",
        "desired_workers",
        "queued_jobs",
        "queued_tokens",
        "running_jobs",
    ] {
        ensure!(v.get(k).is_some(), "no {k} in {v}");
    }
    ensure!(v["workers"].as_array().map(Vec::len) == Some(4), "{v}");
    ensure!(v["placements"][0]["version"].as_u64() >= Some(2), "{v}");
    ensure!(v["running_jobs"] == 0 && v["queued_jobs"] == 0, "{v}");
    Ok(())
}

#[test]
fn with_etcd_the_rebalanced_placement_is_published_acknowledged_and_used() -> Result<()> {
    let etcd = Etcd::start()?;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir()?;
    let m = model_copy(dir.path())?;
    let c = cluster(
        &m,
        4,
        &["--etcd", &ep, "--cluster", "r", "--load-interval-secs", "1"],
        &["--etcd", &ep, "--cluster", "r"],
    )?;
    let rt = rt()?;
    rt.block_on(wait_for_workers(&c.addr, 4))?;
    skewed_stream(&rt, &c.addr, &m)
}

#[test]
fn under_serve_the_in_process_membership_rebalances_the_same_way() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = model_copy(dir.path())?;
    let store = dir.path().join("store");
    let model = format!("m={}", m.display());
    let (_serve, addr) = start(
        "serve",
        &[
            "serve",
            "--model",
            &model,
            "--workers",
            "4",
            "--addr",
            "127.0.0.1:0",
            "--no-http",
            "--no-metrics",
            "--store",
            store.to_str().context("path")?,
            "--load-interval-secs",
            "1",
        ],
        dir.path(),
    )?;
    let rt = rt()?;
    rt.block_on(wait_for_workers(&addr, 4))?;
    skewed_stream(&rt, &addr, &m)
}

/// A generate job being watched: every phase its progress stream showed.
struct Watched {
    client: client::Client,
    id: u64,
    stream: tonic::Streaming<proto::JobProgress>,
    phases: Vec<JobPhase>,
}

/// Submits a generate job long enough for the coordinator to read its load (every second)
/// while it decodes, and returns once the decode started.
fn long_generate(rt: &tokio::runtime::Runtime, addr: &str, ids: &[u32], n: u32) -> Result<Watched> {
    rt.block_on(async {
        let (client, id, stream) =
            submit_watching(addr, spec(proto::JobMode::Generate, n), ids).await?;
        let mut w = Watched {
            client,
            id,
            stream,
            phases: Vec::new(),
        };
        while let Some(p) = w.stream.message().await? {
            w.phases.push(p.phase());
            if p.phase() == JobPhase::Decode {
                return Ok(w);
            }
            ensure!(
                !matches!(p.phase(), JobPhase::Failed | JobPhase::Done),
                "{p:?}"
            );
        }
        anyhow::bail!("job {id}'s progress ended before its decode")
    })
}

/// Follows the job to its end: every phase it went through, and its tokens.
async fn finish(mut w: Watched) -> Result<(Vec<JobPhase>, Vec<u32>)> {
    let mut last = None;
    while let Some(p) = w.stream.message().await? {
        w.phases.push(p.phase());
        last = Some(p);
    }
    let last = last.context("no progress")?;
    ensure!(
        last.phase() == JobPhase::Done,
        "job {}: {:?} {}",
        w.id,
        last.phase(),
        last.message
    );
    Ok((
        w.phases,
        tokens(client::result(&mut w.client, w.id).await?)?,
    ))
}

#[test]
fn a_rebalance_during_a_long_job_leaves_it_on_its_version_and_the_next_job_uses_the_new()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = model_copy(dir.path())?;
    let model = Model::load(&m, &LoadOptions::default())?;
    let ids = skewed_ids(&model, 512, 5)?;
    let n = 600;
    let (_, want) = reference(&model, &ids, n as usize)?;
    let c = cluster(&m, 4, &["--load-interval-secs", "1"], &[])?;
    let rt = rt()?;
    rt.block_on(wait_for_workers(&c.addr, 4))?;
    let job = long_generate(&rt, &c.addr, &ids, n)?;
    // The skew of the prefill is read during the decode; the new version is loaded and
    // acknowledged while the job still runs on version 1.
    let during = rt.block_on(wait_status(&c.addr, 60, "a rebalance", |s| {
        s.placements
            .first()
            .is_some_and(|p| p.version >= 2 && p.rebalancing_to == 0)
    }))?;
    ensure!(
        during.running_jobs == 1,
        "the rebalance finished only after the job: make the job longer ({during:?})"
    );
    let (phases, got) = rt.block_on(finish(job))?;
    ensure!(
        got == want,
        "the job that ran across the rebalance changed its tokens"
    );
    ensure!(!phases.contains(&JobPhase::Retrying), "{phases:?}");
    // The next job runs on a new version (its load is measured under it: version 2, or a
    // later one when its own load, prefill-heavy unlike the long decode's, moved experts
    // again) and is unchanged.
    let (_, again) = rt.block_on(run_job(
        &c.addr,
        spec(proto::JobMode::Generate, 16),
        Input::Tokens(ids),
    ))?;
    ensure!(tokens(again)? == want[..16], "the next job's tokens");
    let s = rt.block_on(status(&c.addr))?;
    let p = placement(&s)?;
    ensure!(p.measured_version >= 2, "{p:?}");
    Ok(())
}

fn sigterm(p: &Proc) -> Result<()> {
    let ok = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()?
        .success();
    ensure!(ok, "kill -TERM {}", p.name);
    Ok(())
}

/// Waits for `p` to exit (within `secs`).
fn exited(p: &mut Proc, secs: u64) -> Result<()> {
    let t = Instant::now();
    while p.child.try_wait()?.is_none() {
        ensure!(
            t.elapsed() < Duration::from_secs(secs),
            "{} still runs after {secs} s",
            p.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn sigterm_drains_a_worker_after_its_job_and_a_short_drain_timeout_retries_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = model_copy(dir.path())?;
    let model = Model::load(&m, &LoadOptions::default())?;
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % 384).collect();
    let n = 700;
    let (_, want) = reference(&model, &ids, n as usize)?;
    // Rebalancing off: this test is about membership.
    let mut c = cluster(&m, 4, &["--rebalance-threshold", "0"], &[])?;
    let rt = rt()?;
    rt.block_on(wait_for_workers(&c.addr, 4))?;

    // SIGTERM mid-job: the job finishes without a retry, then the worker leaves.
    let job = long_generate(&rt, &c.addr, &ids, n)?;
    sigterm(&c.workers[3])?;
    let s = rt.block_on(wait_status(&c.addr, 10, "the draining state", |s| {
        s.workers.iter().any(|w| w.state == "draining")
    }))?;
    ensure!(s.running_jobs == 1, "{s:?}");
    let (phases, got) = rt.block_on(finish(job))?;
    ensure!(got == want, "the drained job's tokens");
    ensure!(!phases.contains(&JobPhase::Retrying), "retried: {phases:?}");
    exited(&mut c.workers[3], 15)?;
    rt.block_on(wait_status(
        &c.addr,
        15,
        "the drained worker leaving",
        |s| s.workers.len() == 3,
    ))?;

    // A worker whose drain timeout is shorter than the job: it leaves mid-job, which is
    // retried on the others and ends the same.
    let late = start_worker(&c.addr, 4, &["--drain-timeout-secs", "0"], c.dir.path())?;
    c.workers.push(late);
    rt.block_on(wait_for_workers(&c.addr, 4))?;
    let job = long_generate(&rt, &c.addr, &ids, n)?;
    sigterm(&c.workers[4])?;
    exited(&mut c.workers[4], 15)?;
    let (phases, got) = rt.block_on(finish(job))?;
    ensure!(
        phases.contains(&JobPhase::Retrying),
        "not retried: {phases:?}"
    );
    ensure!(got == want, "the retried job's tokens");
    Ok(())
}

/// When the job's progress first showed a running phase, and when it finished; its tokens.
async fn timed(mut w: Watched) -> Result<(Instant, Instant, Vec<u32>)> {
    let mut start = None;
    while let Some(p) = w.stream.message().await? {
        if matches!(p.phase(), JobPhase::Prefill | JobPhase::Decode) {
            start.get_or_insert_with(Instant::now);
        }
        if p.phase() == JobPhase::Done {
            break;
        }
        ensure!(p.phase() != JobPhase::Failed, "job {}: {}", w.id, p.message);
    }
    let end = Instant::now();
    let t = tokens(client::result(&mut w.client, w.id).await?)?;
    Ok((start.context("never ran")?, end, t))
}

#[test]
fn with_worker_groups_two_jobs_run_at_once_and_a_job_no_group_holds_still_runs() -> Result<()> {
    worker_groups(&[], &[])
}

#[test]
fn with_etcd_worker_groups_keep_a_placement_each() -> Result<()> {
    let etcd = Etcd::start()?;
    let ep = etcd.endpoint();
    let args = ["--etcd", ep.as_str(), "--cluster", "g"];
    worker_groups(&args, &args)
}

/// Four workers in two groups: two jobs at once, a job no group holds on all four, the
/// autoscaling signal; `coord_extra` and `worker_extra` choose the membership.
fn worker_groups(coord_extra: &[&str], worker_extra: &[&str]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = model_copy(dir.path())?;
    let model = Model::load(&m, &LoadOptions::default())?;
    let c = &model.config;
    let per_token = (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4) as f64;
    // 700 tokens of K/V per worker: a group of two holds 1400, all four 2800.
    let gib = format!("{}", 700.0 * per_token / (1u64 << 30) as f64);
    let mut coord = vec![
        "--group-workers",
        "2",
        "--rebalance-threshold",
        "0",
        "--max-workers",
        "5",
    ];
    coord.extend_from_slice(coord_extra);
    let mut worker = vec!["--kv-budget-gib", gib.as_str()];
    worker.extend_from_slice(worker_extra);
    let cl = cluster(&m, 4, &coord, &worker)?;
    let rt = rt()?;
    rt.block_on(wait_for_workers(&cl.addr, 4))?;
    let a: Vec<u32> = (0..200u32).map(|i| (i * 37 + 11) % 384).collect();
    let b: Vec<u32> = (0..200u32).map(|i| (i * 53 + 7) % 384).collect();
    let n = 400;
    let (_, want_a) = reference(&model, &a, n as usize)?;
    let (_, want_b) = reference(&model, &b, n as usize)?;
    let ((sa, ea, ta), (sb, eb, tb), running) = rt.block_on(async {
        let submit = |ids: Vec<u32>| {
            let addr = cl.addr.clone();
            async move {
                let (client, id, stream) =
                    submit_watching(&addr, spec(proto::JobMode::Generate, n), &ids).await?;
                anyhow::Ok(Watched {
                    client,
                    id,
                    stream,
                    phases: Vec::new(),
                })
            }
        };
        let (ja, jb) = (submit(a.clone()).await?, submit(b.clone()).await?);
        let seen = async {
            // The status shows both running on the two groups, every worker busy.
            wait_status(&cl.addr, 30, "two jobs running", |s| {
                s.running_jobs == 2 && s.workers.iter().all(|w| w.state == "busy")
            })
            .await
        };
        let (ra, rb, seen) = tokio::join!(timed(ja), timed(jb), seen);
        anyhow::Ok((ra?, rb?, seen?))
    })?;
    ensure!(
        ta == want_a && tb == want_b,
        "tokens differ from the engine's"
    );
    ensure!(
        sa < eb && sb < ea,
        "the two jobs did not overlap: a {:?}..{:?}, b {:?}..{:?}",
        sa,
        ea,
        sb,
        eb
    );
    let groups: Vec<u32> = running.workers.iter().map(|w| w.group).collect();
    ensure!(groups == [0, 0, 1, 1], "groups {groups:?}");
    // 2000 tokens: no group holds them, all four workers do.
    let long: Vec<u32> = (0..2000u32).map(|i| (i * 29 + 3) % 384).collect();
    score_like_engine(&rt, &cl.addr, &model, long)?;
    let s = rt.block_on(status(&cl.addr))?;
    ensure!(
        s.placements.iter().any(|p| p.workers.len() == 4),
        "no placement over every worker: {:?}",
        s.placements
    );
    // And a small one goes back to a group.
    score_like_engine(&rt, &cl.addr, &model, a.clone())?;
    // The autoscaling signal: three jobs at once want a group each (6 workers, capped at
    // --max-workers 5); once they are done, the floor (--min-workers 4).
    ensure!(rt.block_on(status(&cl.addr))?.desired_workers == 4);
    rt.block_on(async {
        let mut jobs = Vec::new();
        for ids in [&a, &b, &a] {
            jobs.push(submit_watching(&cl.addr, spec(proto::JobMode::Generate, n), ids).await?);
        }
        let s = status(&cl.addr).await?;
        ensure!(
            s.desired_workers == 5 && s.queued_jobs + s.running_jobs == 3,
            "with three jobs: {s:?}"
        );
        for (mut c, id, _) in jobs {
            client::watch(&mut c, id, |_| {}).await?;
        }
        wait_status(&cl.addr, 10, "the signal falling back", |s| {
            s.desired_workers == 4 && s.running_jobs == 0
        })
        .await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

fn score_like_engine(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    model: &Model,
    ids: Vec<u32>,
) -> Result<()> {
    let (want, _) = reference(model, &ids, 1)?;
    let (_, got) = rt.block_on(run_job(
        addr,
        spec(proto::JobMode::Score, 0),
        Input::Tokens(ids),
    ))?;
    check_score(scores(got)?, &want, "score")
}

#[test]
fn sigterm_drains_the_coordinator_the_running_job_finishes_and_new_ones_are_refused() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let m = model_copy(dir.path())?;
    let model = Model::load(&m, &LoadOptions::default())?;
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 41 + 5) % 384).collect();
    let n = 800;
    let (_, want) = reference(&model, &ids, n as usize)?;
    let mut c = cluster(&m, 2, &["--drain-timeout-secs", "60"], &[])?;
    let rt = rt()?;
    rt.block_on(wait_for_workers(&c.addr, 2))?;
    let job = long_generate(&rt, &c.addr, &ids, n)?;
    sigterm(&c.coordinator)?;
    // A submission during the drain is refused, saying why.
    let refused = rt.block_on(async {
        let t = Instant::now();
        loop {
            let r = async {
                let mut cl = client::connect(&c.addr, 1 << 20).await?;
                let r = client::submit(
                    &mut cl,
                    spec(proto::JobMode::Score, 0),
                    Input::Tokens(ids.clone()),
                    client::UPLOAD_CHUNK,
                    |_| {},
                )
                .await;
                anyhow::Ok(r.err())
            }
            .await?;
            if let Some(e) = r {
                return anyhow::Ok(e);
            }
            // Accepted: the signal had not arrived yet.
            ensure!(t.elapsed() < Duration::from_secs(10), "never refused");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })?;
    ensure!(
        refused.code() == tonic::Code::Unavailable && refused.message().contains("shutting down"),
        "{refused:?}"
    );
    let (phases, got) = rt.block_on(finish(job))?;
    ensure!(got == want, "the drained job's tokens");
    ensure!(!phases.contains(&JobPhase::Retrying), "{phases:?}");
    let t = Instant::now();
    while c.coordinator.child.try_wait()?.is_none() {
        ensure!(
            t.elapsed() < Duration::from_secs(15),
            "the coordinator did not exit after its drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(c.coordinator.child.try_wait()?.is_some_and(|s| s.success()));
    Ok(())
}

#[test]
fn a_worker_that_joins_is_used_by_the_next_job_and_included_in_a_later_rebalance() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = model_copy(dir.path())?;
    let model = Model::load(&m, &LoadOptions::default())?;
    let ids = skewed_ids(&model, 512, 9)?;
    let (want, _) = reference(&model, &ids, 1)?;
    let mut c = cluster(&m, 4, &["--load-interval-secs", "1"], &[])?;
    let rt = rt()?;
    rt.block_on(wait_for_workers(&c.addr, 4))?;
    let score = |rt: &tokio::runtime::Runtime| -> Result<()> {
        let (_, got) = rt.block_on(run_job(
            &c.addr,
            spec(proto::JobMode::Score, 0),
            Input::Tokens(ids.clone()),
        ))?;
        check_score(scores(got)?, &want, "score")
    };
    score(&rt)?;
    let first = rt.block_on(wait_status(&c.addr, 60, "a rebalance on 4", |s| {
        s.placements.first().is_some_and(|p| p.rebalances >= 1)
    }))?;
    let joined = start_worker(&c.addr, 4, &[], c.dir.path())?;
    c.workers.push(joined);
    rt.block_on(wait_for_workers(&c.addr, 5))?;
    // The next job runs on all five (a placement over the new worker set) and measures the
    // newcomer's load; the skew under that placement brings a rebalance over five.
    score(&rt)?;
    let s = rt.block_on(wait_status(
        &c.addr,
        60,
        "a rebalance over five workers",
        |s| {
            s.placements
                .iter()
                .any(|p| p.workers.len() == 5 && p.rebalances >= 1 && p.rebalancing_to == 0)
        },
    ))?;
    let p = s
        .placements
        .iter()
        .find(|p| p.workers.len() == 5)
        .context("no placement over five")?;
    ensure!(p.version > placement(&first)?.version, "{p:?}");
    score(&rt)?;
    let s = rt.block_on(status(&c.addr))?;
    ensure!(
        s.workers.len() == 5 && s.workers.iter().all(|w| w.measured_load > 0.0),
        "every worker computes expert rows on the rebalanced placement: {s:?}"
    );
    Ok(())
}
