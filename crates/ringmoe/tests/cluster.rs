//! The cluster as users run it: `ringmoe coordinator` and `ringmoe worker` processes (or
//! `ringmoe serve`) on 127.0.0.1, jobs through the gRPC client, results against the
//! single-process engine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ringmoe_membership::etcd::{EtcdMembership, EtcdOptions};
use ringmoe_membership::{Membership, PlacementRecord, WorkerRecord};
use ringmoe_model::{LoadOptions, Model, ModelConfig, write_random_checkpoint};
use ringmoe_proto::client::{self, Input};
use ringmoe_proto::proto::{self, JobPhase, submit_job_request};
use ringmoe_testkit::Etcd;
use ringmoe_testkit::{fixture, max_abs_diff};

mod common;
use common::procs::*;
use common::{reference, submit_watching};
use serde_json::json;
use tonic::Code;

/// Runs a score job on `ids` and checks it against the single-process engine on `model_dir`.
fn score_matches_engine(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    model_dir: &Path,
    ids: Vec<u32>,
    what: &str,
) -> Result<()> {
    let model = Model::load(model_dir, &LoadOptions::default())?;
    let (want, _) = reference(&model, &ids, 1)?;
    let (_, got) = rt.block_on(run_job(
        addr,
        spec(proto::JobMode::Score, 0),
        Input::Tokens(ids),
    ))?;
    let d = max_abs_diff(&scores(got)?, &want);
    ensure!(d <= 1e-4, "{what}: max |Δ| {d:e}");
    Ok(())
}

fn random_ids(n: usize, vocab: u32, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i ^ seed).wrapping_mul(2_654_435_761) % vocab)
        .collect()
}

/// One Mixtral layer with long-context RoPE and 4 experts (one per worker), narrow elsewhere.
fn long_model(dir: &Path) -> Result<PathBuf> {
    long_model_with(dir, 1, 256)
}

fn long_model_with(dir: &Path, layers: usize, hidden: usize) -> Result<PathBuf> {
    let m = dir.join("long-model");
    write_random_checkpoint(
        &m,
        &json!({
            "architectures": ["MixtralForCausalLM"], "vocab_size": 512, "hidden_size": hidden,
            "intermediate_size": 256, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
            "max_position_embeddings": 65536, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
            "eos_token_id": 9999
        }),
        5,
    )?;
    Ok(m)
}

#[test]
fn a_32k_token_job_on_four_worker_processes_matches_the_single_process_engine() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = long_model(tmp.path())?;
    let c = cluster(&dir, 4, &[], &[])?;
    let ids = random_ids(32 * 1024, 512, 7);
    let model = Model::load(&dir, &LoadOptions::default())?;
    let t = Instant::now();
    let (want_nll, want_tokens) = reference(&model, &ids, 4)?;
    let single = t.elapsed().as_secs_f64();
    drop(model);
    let rt = rt()?;
    let t = Instant::now();
    let (_, got) = rt.block_on(run_job(
        &c.addr,
        spec(proto::JobMode::Score, 0),
        Input::Tokens(ids.clone()),
    ))?;
    // Not asserted (timings are noisy); `--no-capture` shows them.
    eprintln!(
        "32K tokens: single-process score + 4 greedy tokens {single:.1}s; cluster score job \
         {:.1}s (upload, 4 workers, results)",
        t.elapsed().as_secs_f64()
    );
    let got = scores(got)?;
    let d = max_abs_diff(&got, &want_nll);
    ensure!(d <= 1e-4, "32K tokens over 4 workers: NLL max |Δ| {d:e}");
    let (_, got) = rt.block_on(run_job(
        &c.addr,
        spec(proto::JobMode::Generate, 4),
        Input::Tokens(ids),
    ))?;
    ensure!(tokens(got)? == want_tokens, "greedy tokens differ");
    drop(c.workers);
    drop(c.coordinator);
    drop(c.dir);
    Ok(())
}

#[test]
fn two_jobs_submitted_together_both_complete_correctly() -> Result<()> {
    let fx = fixture("mixtral-tiny");
    let c = cluster(&fx, 2, &[], &[])?;
    let model = Model::load(&fx, &LoadOptions::default())?;
    let a = random_ids(300, 384, 1);
    let b = random_ids(200, 384, 2);
    let (want_a, _) = reference(&model, &a, 1)?;
    let (_, want_b) = reference(&model, &b, 6)?;
    let (ra, rb) = rt()?.block_on(async {
        tokio::join!(
            run_job(&c.addr, spec(proto::JobMode::Score, 0), Input::Tokens(a)),
            run_job(&c.addr, spec(proto::JobMode::Generate, 6), Input::Tokens(b)),
        )
    });
    let d = max_abs_diff(&scores(ra?.1)?, &want_a);
    ensure!(d <= 1e-4, "score job: max |Δ| {d:e}");
    ensure!(tokens(rb?.1)? == want_b, "generate job's tokens differ");
    Ok(())
}

#[test]
fn a_job_acknowledged_before_the_coordinator_is_killed_completes_after_a_restart() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = long_model(tmp.path())?;
    let c = cluster(&dir, 2, &[], &[])?;
    let ids = random_ids(16 * 1024, 512, 3);
    let rt = rt()?;
    let (id, seen) = rt.block_on(async {
        // Follow until the job is running, then pull the plug.
        let (_, id, mut s) = submit_watching(&c.addr, spec(proto::JobMode::Score, 0), &ids).await?;
        let mut seen = JobPhase::Queued;
        while let Some(p) = s.message().await? {
            seen = p.phase();
            if matches!(seen, JobPhase::Prefill | JobPhase::Done) {
                break;
            }
        }
        anyhow::Ok((id, seen))
    })?;
    ensure!(
        seen == JobPhase::Prefill,
        "the job was {seen:?} when killed"
    );
    let Cluster {
        coordinator,
        addr,
        workers,
        dir: cdir,
    } = c;
    drop(coordinator); // SIGKILL: no shutdown path runs
    let store = cdir.path().join("store");
    // Same address, so the workers' heartbeats find the new coordinator.
    let (coordinator, addr2) = start_coordinator(&dir, &store, &addr, 2, &[], cdir.path())?;
    ensure!(addr2 == addr, "restarted on {addr2}, not {addr}");
    let model = Model::load(&dir, &LoadOptions::default())?;
    let (want, _) = reference(&model, &ids, 1)?;
    let got = rt.block_on(async {
        let mut cl = client::connect(&addr, 64 << 20).await?;
        let last = client::watch(&mut cl, id, |_| {}).await?;
        ensure!(last.phase() == JobPhase::Done, "after restart: {last:?}");
        anyhow::Ok(client::result(&mut cl, id).await?)
    })?;
    let d = max_abs_diff(&scores(got)?, &want);
    ensure!(d <= 1e-4, "re-run after restart: max |Δ| {d:e}");
    drop(workers);
    drop(coordinator);
    Ok(())
}

/// Sends raw upload messages and returns the status (or the job id).
async fn raw_submit(
    addr: &str,
    msgs: Vec<proto::SubmitJobRequest>,
) -> Result<std::result::Result<u64, tonic::Status>> {
    let mut c = client::connect(addr, 64 << 20).await?;
    Ok(c.submit_job(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner().job_id))
}

fn spec_msg(s: proto::JobSpec) -> proto::SubmitJobRequest {
    proto::SubmitJobRequest {
        part: Some(submit_job_request::Part::Spec(s)),
    }
}

fn tokens_msg(ids: Vec<u32>) -> proto::SubmitJobRequest {
    proto::SubmitJobRequest {
        part: Some(submit_job_request::Part::Tokens(proto::TokenIds { ids })),
    }
}

fn text_msg(b: &[u8]) -> proto::SubmitJobRequest {
    proto::SubmitJobRequest {
        part: Some(submit_job_request::Part::Text(b.to_vec())),
    }
}

#[test]
fn bad_inputs_get_invalid_argument_and_the_coordinator_keeps_serving() -> Result<()> {
    let fx = fixture("mixtral-tiny");
    // 1 MiB messages; K/V for 2 layers x 2 x 2 heads x 16 dims x 4 bytes = 512 B/token, so a
    // 128 KiB budget holds 256 tokens.
    let budget = (128.0 / (1024.0 * 1024.0)).to_string();
    let c = cluster(
        &fx,
        1,
        &["--max-message-bytes", "1048576"],
        &["--kv-budget-gib", &budget],
    )?;
    let score = spec(proto::JobMode::Score, 0);
    let mut declared = score.clone();
    declared.input_length = 100;
    let unknown = proto::JobSpec {
        model: "nope".into(),
        ..score.clone()
    };
    let cases: Vec<(&str, Vec<proto::SubmitJobRequest>, &str)> = vec![
        ("empty job", vec![spec_msg(score.clone())], "input tokens"),
        (
            "token id out of the vocabulary",
            vec![spec_msg(score.clone()), tokens_msg(vec![1, 2, 384])],
            "vocabulary of 384",
        ),
        (
            "unknown model",
            vec![spec_msg(unknown), tokens_msg(vec![1, 2, 3])],
            "unknown model 'nope'",
        ),
        (
            "invalid UTF-8",
            vec![spec_msg(score.clone()), text_msg(b"ok \xff\xfe bad")],
            "UTF-8",
        ),
        ("spec missing", vec![tokens_msg(vec![1, 2, 3])], "spec"),
        (
            "stream closed mid-upload",
            vec![spec_msg(declared), tokens_msg(vec![5; 50])],
            "declared 100",
        ),
        (
            "oversize message",
            vec![spec_msg(score.clone()), tokens_msg(vec![300; 600_000])],
            "size limit",
        ),
        (
            "longer than the cluster's K/V capacity",
            vec![spec_msg(score.clone()), tokens_msg(vec![7; 300])],
            "256",
        ),
    ];
    let rt = rt()?;
    // The worker must have registered for the capacity check.
    rt.block_on(wait_for_workers(&c.addr, 1))?;
    for (what, msgs, needle) in cases {
        let r = rt.block_on(raw_submit(&c.addr, msgs))?;
        let e = match r {
            Ok(id) => bail!("{what}: accepted as job {id}"),
            Err(e) => e,
        };
        ensure!(
            e.code() == Code::InvalidArgument,
            "{what}: {:?} {}",
            e.code(),
            e.message()
        );
        ensure!(
            e.message().contains(needle),
            "{what}: message {:?} does not say {needle:?}",
            e.message()
        );
    }
    let ids = random_ids(100, 384, 9);
    score_matches_engine(&rt, &c.addr, &fx, ids, "good job after bad ones")
}

fn write_input_ids(path: &Path, ids: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = ids.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, ids.len()], &bytes)?;
    safetensors::serialize_to_file([("input_ids", view)], None, path)?;
    Ok(())
}

#[test]
fn serve_and_submit_as_the_readme_shows() -> Result<()> {
    let fx = fixture("mixtral-tiny");
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("jobs");
    let (_serve, addr) = start(
        "serve",
        &[
            "serve",
            "--model",
            fx.to_str().context("path")?,
            "--workers",
            "2",
            "--addr",
            "127.0.0.1:0",
            "--store",
            store.to_str().context("path")?,
            "--http-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        tmp.path(),
    )?;
    let ids = random_ids(120, 384, 4);
    let inp = tmp.path().join("ids.safetensors");
    write_input_ids(&inp, &ids)?;
    let model = Model::load(&fx, &LoadOptions::default())?;
    let (want_nll, want_tokens) = reference(&model, &ids, 5)?;
    let submit = |extra: &[&str]| -> Result<std::process::Output> {
        let mut args = vec!["submit", "--addr", &addr, "--json"];
        args.extend_from_slice(extra);
        Ok(Command::new(env!("CARGO_BIN_EXE_ringmoe"))
            .args(&args)
            .output()?)
    };
    let submit_plain = |extra: &[&str]| -> Result<std::process::Output> {
        let mut args = vec!["submit", "--addr", &addr];
        args.extend_from_slice(extra);
        Ok(Command::new(env!("CARGO_BIN_EXE_ringmoe"))
            .args(&args)
            .output()?)
    };
    let inp_s = inp.to_str().context("path")?;
    let out = submit(&["--token-ids", inp_s, "--mode", "score"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["state"] == "done", "{v}");
    let got: Vec<f32> = serde_json::from_value(v["nll"].clone())?;
    let d = max_abs_diff(&got, &want_nll);
    ensure!(d <= 1e-4, "submit --mode score: max |Δ| {d:e}");
    let out = submit(&["--token-ids", inp_s, "--max-new-tokens", "5"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let got: Vec<u32> = serde_json::from_value(v["tokens"].clone())?;
    ensure!(
        got == want_tokens,
        "submit generate: {got:?} vs {want_tokens:?}"
    );
    // The coordinator decodes a generate job's tokens with the model's tokenizer.
    let tok = ringmoe_model::tokenizer::Tokenizer::from_file(&fx.join("tokenizer.json"))?;
    let want_text = tok.decode(&want_tokens, true)?;
    ensure!(v["text"] == want_text.as_str(), "submit --json text: {v}");
    // Without --json, stdout is the text alone; --ids prints the ids instead.
    let out = submit_plain(&["--token-ids", inp_s, "--max-new-tokens", "5"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&out.stdout) == format!("{want_text}\n"),
        "submit stdout: {:?} vs {want_text:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = submit_plain(&["--token-ids", inp_s, "--max-new-tokens", "5", "--ids"])?;
    let ids: Vec<String> = want_tokens.iter().map(u32::to_string).collect();
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == ids.join(" "),
        "submit --ids stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Text input goes through the model's tokenizer.
    let txt = tmp.path().join("in.txt");
    std::fs::write(&txt, "The quick brown fox jumps over the lazy dog.")?;
    let out = submit(&["--file", txt.to_str().context("path")?, "--mode", "score"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A failure exits non-zero with the server's message.
    let out = submit(&["--token-ids", inp_s, "--model", "nope"])?;
    ensure!(!out.status.success(), "an unknown model was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("unknown model 'nope'"), "stderr: {err}");
    Ok(())
}

#[test]
fn cancelling_a_queued_job_finishes_it_as_cancelled() -> Result<()> {
    let fx = fixture("mixtral-tiny");
    // Two workers but jobs wait for three: the job stays queued until cancelled.
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let (_coord, addr) = start_coordinator(&fx, &store, "127.0.0.1:0", 3, &[], dir.path())?;
    let _w: Vec<Proc> = (0..2)
        .map(|i| start_worker(&addr, i, &[], dir.path()))
        .collect::<Result<_>>()?;
    rt()?.block_on(async {
        let mut c = client::connect(&addr, 1 << 20).await?;
        let id = client::submit(
            &mut c,
            spec(proto::JobMode::Score, 0),
            Input::Tokens(random_ids(50, 384, 5)),
            client::UPLOAD_CHUNK,
            |_| {},
        )
        .await?
        .job_id;
        let r = c
            .cancel_job(proto::CancelJobRequest { job_id: id })
            .await?
            .into_inner();
        ensure!(
            r.phase() == JobPhase::Cancelled,
            "after cancel: {:?}",
            r.phase()
        );
        let last = client::watch(&mut c, id, |_| {}).await?;
        ensure!(last.phase() == JobPhase::Cancelled, "watch: {last:?}");
        let e = client::result(&mut c, id).await.err().context("a result")?;
        ensure!(e.code() == Code::Cancelled, "GetResult: {e:?}");
        let e = c
            .cancel_job(proto::CancelJobRequest { job_id: id + 100 })
            .await
            .err()
            .context("cancelled an unknown job")?;
        ensure!(e.code() == Code::NotFound, "{e:?}");
        let jobs = c.list_jobs(proto::ListJobsRequest {}).await?.into_inner();
        ensure!(jobs.jobs.len() == 1 && jobs.workers == 2, "{jobs:?}");
        anyhow::Ok(())
    })
}

#[test]
fn cancelling_a_running_job_stops_it_and_the_workers_take_the_next() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = long_model(tmp.path())?;
    let c = cluster(&dir, 2, &[], &[])?;
    let rt = rt()?;
    rt.block_on(async {
        let ids = random_ids(16 * 1024, 512, 8);
        let (mut cl, id, mut s) =
            submit_watching(&c.addr, spec(proto::JobMode::Score, 0), &ids).await?;
        while let Some(p) = s.message().await? {
            if p.phase() != JobPhase::Queued && p.phase() != JobPhase::Loading {
                ensure!(p.phase() == JobPhase::Prefill, "job ran ahead: {p:?}");
                break;
            }
        }
        cl.cancel_job(proto::CancelJobRequest { job_id: id })
            .await?;
        let last = client::watch(&mut cl, id, |_| {}).await?;
        ensure!(last.phase() == JobPhase::Cancelled, "{last:?}");
        anyhow::Ok(())
    })?;
    let ids = random_ids(500, 512, 9);
    score_matches_engine(&rt, &c.addr, &dir, ids, "job after a cancelled one")
}

/// Coordinator and workers registered in `etcd` (lease TTL `ttl` seconds).
fn etcd_cluster(etcd: &Etcd, model: &Path, n: usize, ttl: &str) -> Result<Cluster> {
    let ep = etcd.endpoint();
    cluster(
        model,
        n,
        &["--etcd", &ep, "--cluster", "t"],
        &["--etcd", &ep, "--cluster", "t", "--lease-ttl-secs", ttl],
    )
}

fn etcd_worker(etcd: &Etcd, c: &Cluster, i: usize, ttl: &str) -> Result<Proc> {
    let ep = etcd.endpoint();
    start_worker(
        &c.addr,
        i,
        &["--etcd", &ep, "--cluster", "t", "--lease-ttl-secs", ttl],
        c.dir.path(),
    )
}

async fn live_workers(addr: &str) -> Result<u32> {
    let mut c = client::connect(addr, 1 << 20).await?;
    Ok(c.list_jobs(proto::ListJobsRequest {})
        .await?
        .into_inner()
        .workers)
}

#[test]
fn with_etcd_a_killed_worker_leaves_the_membership_within_its_lease_ttl() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut c = etcd_cluster(&etcd, &fixture("mixtral-tiny"), 2, "1")?;
    let rt = rt()?;
    rt.block_on(wait_for_workers(&c.addr, 2))?;
    let mut dead = c.workers.remove(0);
    dead.child.kill()?; // SIGKILL: no lease revoke
    let t = Instant::now();
    rt.block_on(async {
        while live_workers(&c.addr).await? != 1 {
            ensure!(
                t.elapsed() < Duration::from_secs(5),
                "the dead worker is still listed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    })?;
    // etcd checks lease expiry about every 500 ms, on top of the 1 s TTL.
    let took = t.elapsed();
    ensure!(
        took < Duration::from_millis(2500),
        "removed after {took:?} (TTL 1 s)"
    );
    eprintln!("dead worker removed after {took:?} with a 1 s lease");
    Ok(())
}

#[test]
fn after_etcd_restarts_the_workers_register_again_and_the_next_job_runs() -> Result<()> {
    let mut etcd = Etcd::start()?;
    let fx = fixture("mixtral-tiny");
    let c = etcd_cluster(&etcd, &fx, 2, "1")?;
    let rt = rt()?;
    rt.block_on(wait_for_workers(&c.addr, 2))?;
    etcd.restart()?;
    // The keep-alives notice the restart and register again; the coordinator watches again.
    std::thread::sleep(Duration::from_millis(1500));
    rt.block_on(wait_for_workers(&c.addr, 2))?;
    let ids = random_ids(150, 384, 11);
    score_matches_engine(&rt, &c.addr, &fx, ids, "job after an etcd restart")
}

/// Copies a checkpoint directory (flat) to `to`.
fn copy_model(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// The published placement of model `m` and the workers' records, read straight from etcd.
async fn placement_in_etcd(etcd: &Etcd) -> Result<(PlacementRecord, Vec<WorkerRecord>)> {
    let m = EtcdMembership::connect(EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        cluster: "t".into(),
        user: None,
        tls: None,
    })
    .await?;
    let p = m.placement("m").await?.context("no placement in etcd")?;
    Ok((p, m.list().await?))
}

/// Every worker of the placement acknowledged its version, and together they host every
/// expert of every layer.
fn check_acks(p: &PlacementRecord, workers: &[WorkerRecord], experts: usize) -> Result<()> {
    let mut hosted: Vec<Vec<usize>> = Vec::new();
    for (rank, id) in p.workers.iter().enumerate() {
        let w = workers
            .iter()
            .find(|w| &w.id == id)
            .with_context(|| format!("{id} is not registered"))?;
        let a = w
            .placement
            .as_ref()
            .with_context(|| format!("{id} acknowledged nothing"))?;
        ensure!(
            a.model == "m" && a.version == p.version && a.rank == rank && a.error.is_none(),
            "{id}: {a:?} for version {}",
            p.version
        );
        hosted.resize(a.experts.len(), Vec::new());
        for (l, es) in a.experts.iter().enumerate() {
            hosted[l].extend(es);
        }
    }
    for (l, mut es) in hosted.into_iter().enumerate() {
        es.sort_unstable();
        ensure!(
            es == (0..experts).collect::<Vec<_>>(),
            "layer {l} hosts {es:?}"
        );
    }
    Ok(())
}

#[test]
fn placements_live_in_etcd_and_a_joining_worker_is_used_from_the_next_job() -> Result<()> {
    let etcd = Etcd::start()?;
    let tmp = tempfile::tempdir()?;
    // The coordinator's copy loses its weights once it started (it reads only the config and
    // the tokenizer); workers load their own copy, given with `worker --model`.
    let (theirs, mine) = (
        tmp.path().join("coordinator-copy"),
        tmp.path().join("worker-copy"),
    );
    copy_model(&fixture("mixtral-tiny"), &theirs)?;
    copy_model(&fixture("mixtral-tiny"), &mine)?;
    let ep = etcd.endpoint();
    let local = format!("m={}", mine.display());
    let worker_args = [
        "--etcd",
        &ep,
        "--cluster",
        "t",
        "--lease-ttl-secs",
        "2",
        "--model",
        &local,
    ];
    let mut c = cluster(&theirs, 2, &["--etcd", &ep, "--cluster", "t"], &worker_args)?;
    let rt = rt()?;
    rt.block_on(wait_for_workers(&c.addr, 2))?;
    for e in std::fs::read_dir(&theirs)? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            std::fs::remove_file(path)?;
        }
    }
    let experts = ModelConfig::from_dir(&mine)?.moe.num_experts;
    score_matches_engine(&rt, &c.addr, &mine, random_ids(200, 384, 31), "first job")?;
    let (p1, workers) = rt.block_on(placement_in_etcd(&etcd))?;
    ensure!(p1.workers.len() == 2 && p1.version >= 1, "{p1:?}");
    check_acks(&p1, &workers, experts)?;

    // Same workers: the same placement, nothing reloaded.
    score_matches_engine(&rt, &c.addr, &mine, random_ids(120, 384, 32), "second job")?;
    ensure!(rt.block_on(placement_in_etcd(&etcd))?.0 == p1);

    // A worker that follows etcd takes its placement only from there: LoadModel, which could
    // change its experts under the acknowledged version, is refused.
    let w0 = workers
        .first()
        .map(|w| w.addr.clone())
        .context("no worker records")?;
    // Called with the leader's fencing token (from the store's fence), or the worker would
    // refuse the call as a deposed leader's before looking at it.
    let token: u64 = std::fs::read_to_string(c.dir.path().join("store/fence"))?
        .trim()
        .parse()?;
    let refused = rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{w0}"))?
            .connect()
            .await?;
        let mut w = proto::worker_service_client::WorkerServiceClient::with_interceptor(
            ch,
            ringmoe_proto::secret::Credential::new(None).fenced(token),
        );
        let mut other = ringmoe_parallel::Placement::round_robin(2, experts, 2)?;
        other.version = p1.version;
        let r = w
            .load_model(proto::LoadModelRequest {
                model: "m".into(),
                path: mine.display().to_string(),
                placement_json: other.to_json(),
                worker_index: 0,
            })
            .await;
        anyhow::Ok(r.err().map(|s| (s.code(), s.message().to_string())))
    })?;
    ensure!(
        refused
            .as_ref()
            .is_some_and(|(c, m)| *c == Code::FailedPrecondition && m.contains("membership store")),
        "{refused:?}"
    );

    // A third worker joins between jobs: the next job places experts over all three.
    c.workers
        .push(start_worker(&c.addr, 2, &worker_args, c.dir.path())?);
    rt.block_on(wait_for_workers(&c.addr, 3))?;
    score_matches_engine(
        &rt,
        &c.addr,
        &mine,
        random_ids(250, 384, 33),
        "after a join",
    )?;
    let (p2, workers) = rt.block_on(placement_in_etcd(&etcd))?;
    ensure!(
        p2.version == p1.version + 1 && p2.workers.len() == 3,
        "{p2:?}"
    );
    check_acks(&p2, &workers, experts)?;
    Ok(())
}

#[test]
fn a_worker_given_a_model_directory_that_is_not_one_refuses_to_start() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = Command::new(env!("CARGO_BIN_EXE_ringmoe"))
        .args(["worker", "--coordinator", "127.0.0.1:1", "--model"])
        .arg(tmp.path())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "started: {err}");
    ensure!(
        err.contains("--model") && err.contains("config.json"),
        "{err}"
    );
    Ok(())
}

/// Where in a job a worker is killed.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// As prefill starts (layer 0 running).
    FirstLayer,
    /// After every layer but the last finished.
    LastLayer,
    /// Once the first token is decoded.
    Decode,
}

#[test]
fn losing_a_worker_mid_job_reruns_it_on_the_rest_with_the_same_result() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = long_model_with(tmp.path(), 2, 128)?;
    let etcd = Etcd::start()?;
    let mut c = etcd_cluster(&etcd, &dir, 4, "1")?;
    let ids = random_ids(32 * 1024, 512, 21);
    let new_tokens = 100;
    let model = Model::load(&dir, &LoadOptions::default())?;
    let (want_nll, want_tokens) = reference(&model, &ids, new_tokens)?;
    drop(model);
    let rt = rt()?;
    let plan = [
        KillAt::FirstLayer,
        KillAt::LastLayer,
        KillAt::Decode,
        KillAt::FirstLayer,
        KillAt::LastLayer,
    ];
    for (run, at) in plan.into_iter().enumerate() {
        rt.block_on(wait_for_workers(&c.addr, 4))?;
        let generate = matches!(at, KillAt::Decode);
        let job_spec = if generate {
            spec(proto::JobMode::Generate, new_tokens as u32)
        } else {
            spec(proto::JobMode::Score, 0)
        };
        let victim = run % c.workers.len();
        let (phases, result) = rt.block_on(async {
            let (mut cl, id, mut s) = submit_watching(&c.addr, job_spec, &ids).await?;
            let mut killed = false;
            let mut phases = Vec::new();
            while let Some(p) = s.message().await? {
                phases.push((p.phase(), p.layer));
                let hit = match at {
                    KillAt::FirstLayer => p.phase() == JobPhase::Prefill && p.layer == 0,
                    KillAt::LastLayer => {
                        p.phase() == JobPhase::Prefill && p.layers > 0 && p.layer == p.layers - 1
                    }
                    KillAt::Decode => p.phase() == JobPhase::Decode,
                };
                if hit && !killed {
                    c.workers[victim].child.kill()?;
                    killed = true;
                }
            }
            ensure!(killed, "run {run}: never reached {at:?}: {phases:?}");
            anyhow::Ok((phases, client::result(&mut cl, id).await?))
        })?;
        ensure!(
            phases.iter().any(|(p, _)| *p == JobPhase::Retrying),
            "run {run} ({at:?}): no retry seen: {phases:?}"
        );
        ensure!(
            phases.last().map(|p| p.0) == Some(JobPhase::Done),
            "run {run} ({at:?}): {phases:?}"
        );
        if generate {
            ensure!(
                tokens(result)? == want_tokens,
                "run {run} ({at:?}): tokens differ"
            );
        } else {
            let d = max_abs_diff(&scores(result)?, &want_nll);
            ensure!(d <= 1e-4, "run {run} ({at:?}): NLL max |Δ| {d:e}");
        }
        // A replacement joins; it is used from the next job on.
        c.workers[victim] = etcd_worker(&etcd, &c, 4 + run, "1")?;
    }
    Ok(())
}

#[test]
fn a_standby_coordinator_takes_over_and_finishes_the_leaders_jobs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = long_model(tmp.path())?;
    let etcd = Etcd::start()?;
    let ep = etcd.endpoint();
    let c = etcd_cluster(&etcd, &dir, 2, "1")?;
    let rt = rt()?;
    // The first coordinator serves only once it leads.
    rt.block_on(wait_for_workers(&c.addr, 2))?;
    let store = c.dir.path().join("store");
    let (_standby, standby_addr) = start_coordinator(
        &dir,
        &store,
        "127.0.0.1:0",
        2,
        &["--etcd", &ep, "--cluster", "t"],
        tmp.path(),
    )?;
    let long = random_ids(16 * 1024, 512, 31);
    let short = random_ids(300, 512, 32);
    let (a, b) = rt.block_on(async {
        let mut cl = client::connect(&c.addr, 64 << 20).await?;
        let mut submit = async |ids: &Vec<u32>| {
            let r = client::submit(
                &mut cl,
                spec(proto::JobMode::Score, 0),
                Input::Tokens(ids.clone()),
                client::UPLOAD_CHUNK,
                |_| {},
            )
            .await?;
            anyhow::Ok(r.job_id)
        };
        let a = submit(&long).await?;
        let b = submit(&short).await?;
        let mut s = cl
            .watch_job(proto::WatchJobRequest { job_id: a })
            .await?
            .into_inner();
        while let Some(p) = s.message().await? {
            if p.phase() == JobPhase::Prefill {
                break;
            }
        }
        anyhow::Ok((a, b))
    })?;
    let Cluster {
        coordinator: leader,
        workers: _workers,
        ..
    } = c;
    drop(leader); // SIGKILL with job `a` running and job `b` queued
    let model = Model::load(&dir, &LoadOptions::default())?;
    let (want_a, _) = reference(&model, &long, 1)?;
    let (want_b, _) = reference(&model, &short, 1)?;
    let (got_a, got_b) = rt.block_on(async {
        // Connecting waits until the standby, now leader, serves.
        let mut cl = client::connect(&standby_addr, 64 << 20).await?;
        let mut done = async |id: u64| {
            let last = client::watch(&mut cl, id, |_| {}).await?;
            ensure!(last.phase() == JobPhase::Done, "job {id}: {last:?}");
            anyhow::Ok(client::result(&mut cl, id).await?)
        };
        let ra = done(a).await?;
        let rb = done(b).await?;
        anyhow::Ok((ra, rb))
    })?;
    let d = max_abs_diff(&scores(got_a)?, &want_a);
    ensure!(d <= 1e-4, "running job after failover: max |Δ| {d:e}");
    let d = max_abs_diff(&scores(got_b)?, &want_b);
    ensure!(d <= 1e-4, "queued job after failover: max |Δ| {d:e}");
    // The new leader fenced the store with its token, above the first leader's.
    let fence: u64 = std::fs::read_to_string(store.join("fence"))?
        .trim()
        .parse()?;
    ensure!(fence >= 2, "the store's fence is {fence}");
    Ok(())
}

#[test]
fn workers_sharing_a_data_port_range_run_a_job_and_health_answers() -> Result<()> {
    let fx = fixture("mixtral-tiny");
    // Both workers on this host take their data-plane ports from one range of 4 (as the Helm
    // chart gives every worker pod the same range): each takes the first free one.
    let lo = loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
            .min(u16::MAX - 8);
        let all: Result<Vec<_>, _> = (p..p + 4)
            .map(|q| std::net::TcpListener::bind(("127.0.0.1", q)))
            .collect();
        if all.is_ok() {
            break p;
        }
    };
    let range = format!("{lo}-{}", lo + 3);
    let c = cluster(&fx, 2, &[], &["--data-ports", &range])?;
    let ids = random_ids(150, 384, 9);
    let model = Model::load(&fx, &LoadOptions::default())?;
    let (want, _) = reference(&model, &ids, 1)?;
    let (_, got) = rt()?.block_on(run_job(
        &c.addr,
        spec(proto::JobMode::Score, 0),
        Input::Tokens(ids),
    ))?;
    let d = max_abs_diff(&scores(got)?, &want);
    ensure!(
        d <= 1e-4,
        "score over workers sharing --data-ports: max |Δ| {d:e}"
    );
    // `ringmoe health`: the images' health check.
    let health = |service: &str| -> Result<std::process::Output> {
        Ok(Command::new(env!("CARGO_BIN_EXE_ringmoe"))
            .args(["health", "--addr", &c.addr, "--service", service])
            .output()?)
    };
    let ok = health("ringmoe.v1.JobService")?;
    ensure!(
        ok.status.success() && String::from_utf8_lossy(&ok.stdout).trim() == "serving",
        "health: {ok:?}"
    );
    let bad = health("ringmoe.v1.NoSuchService")?;
    ensure!(!bad.status.success(), "an unknown service reported serving");
    Ok(())
}
