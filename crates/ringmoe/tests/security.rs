//! Security as an operator runs it, with real processes on 127.0.0.1.
//!
//! Clients: tokens made by `ringmoe token new`, a `serve` with `--auth-tokens-file`, clients on
//! gRPC (the client library and `ringmoe submit`) and on the HTTP API. Strangers are refused,
//! tenants see only their own jobs, an admin sees every job, per-client limits hold, and SIGHUP
//! swaps the tokens file without a restart.
//!
//! The control plane: with `--cluster-secret-file`, a heartbeat or a worker call without the
//! secret is refused, a worker with the wrong secret is never scheduled, and jobs still run
//! (their data plane keyed by the token the coordinator hands out).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ringmoe_proto::client::{self, Client, Input};
use ringmoe_proto::proto::cluster_service_client::ClusterServiceClient;
use ringmoe_proto::proto::worker_service_client::WorkerServiceClient;
use ringmoe_proto::proto::{self, JobPhase};
use ringmoe_proto::secret::{ClusterSecret, Credential};
use ringmoe_testkit::{Proc, fixture};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_ringmoe");

/// `ringmoe token new NAME`: (token, tokens-file line).
fn new_token(name: &str, dir: &Path) -> Result<(String, String)> {
    let out = Command::new(BIN).args(["token", "new", name]).output()?;
    ensure!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines();
    let (token, line) = (
        lines.next().context("token")?.to_string(),
        lines.next().context("line")?.to_string(),
    );
    // --token-out writes the token to a private file and prints only the line.
    let file = dir.join(format!("{name}.token"));
    let out = Command::new(BIN)
        .args(["token", "new", name, "--token-out"])
        .arg(&file)
        .output()?;
    ensure!(out.status.success(), "{out:?}");
    let other_line = String::from_utf8(out.stdout)?;
    let other = std::fs::read_to_string(&file)?;
    use std::os::unix::fs::PermissionsExt;
    ensure!(std::fs::metadata(&file)?.permissions().mode() & 0o077 == 0);
    ensure!(other.trim() != token && other_line.trim().starts_with(&format!("{name} sha256:")));
    Ok((token, line))
}

fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn spec(max_new_tokens: u32) -> proto::JobSpec {
    proto::JobSpec {
        model: "m".into(),
        mode: proto::JobMode::Generate as i32,
        max_new_tokens,
        sampling: Some(proto::Sampling::default()),
        ..Default::default()
    }
}

async fn as_client(addr: &str, token: Option<&str>) -> Result<Client> {
    Ok(client::connect_as(addr, 16 << 20, token).await?)
}

async fn submit(c: &mut Client, ids: Vec<u32>, max_new_tokens: u32) -> Result<u64, tonic::Status> {
    client::submit(
        c,
        spec(max_new_tokens),
        Input::Tokens(ids),
        client::UPLOAD_CHUNK,
        |_| {},
    )
    .await
    .map(|r| r.job_id)
}

fn code<T>(r: Result<T, tonic::Status>) -> Option<Code> {
    r.err().map(|s| s.code())
}

/// One HTTP/1.0 request; (status, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head.split_whitespace().nth(1).context("status")?.parse()?;
    Ok((status, body.to_string()))
}

/// `GET path` over HTTPS (HTTP/1.0), the server checked against `ca`; (status, body).
fn https_get(addr: &str, ca: &Path, path: &str) -> Result<(u16, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let conn = rustls::ClientConnection::new(
        std::sync::Arc::new(cfg),
        ServerName::try_from(host)?.to_owned(),
    )?;
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    s.flush()?;
    let mut buf = Vec::new();
    // A server may close without close_notify after an HTTP/1.0 response: what came is it.
    if let Err(e) = s.read_to_end(&mut buf) {
        ensure!(
            e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty(),
            "{e}"
        );
    }
    let buf = String::from_utf8(buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head.split_whitespace().nth(1).context("status")?.parse()?;
    Ok((status, body.to_string()))
}

#[test]
fn tenants_authenticate_see_only_their_own_jobs_and_a_sighup_swaps_the_tokens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (alice, la) = new_token("alice", dir.path())?;
    let (bob, lb) = new_token("bob", dir.path())?;
    let (ops, lo) = new_token("ops", dir.path())?;
    let (carol, lc) = new_token("carol", dir.path())?;
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "# clients of this cluster\n{la} max_input_tokens=64 max_queued_jobs=1\n{lb}\n{lo} admin\n"
        ),
    )?;
    let model = format!("m={}", fixture("mixtral-tiny").display());
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--model",
        &model,
        "--workers",
        "2",
        "--addr",
        "127.0.0.1:0",
    ])
    .args(["--http-addr", "127.0.0.1:0", "--no-metrics", "--store"])
    .arg(dir.path().join("store"))
    .arg("--auth-tokens-file")
    .arg(&tokens)
    .env("RUST_LOG", "info");
    let serve = Proc::spawn("serve", cmd, dir.path())?;
    let addr = serve.line_after("listening on ", Duration::from_secs(30))?;
    let http_addr = serve.line_after("http api on http://", Duration::from_secs(30))?;
    let rt = rt()?;
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 256).collect();

    rt.block_on(async {
        // Strangers: no token, a made-up one, a malformed one.
        for t in [None, Some("rmk_00"), Some("not a token at all")] {
            let mut c = as_client(&addr, t).await?;
            let listed = c.list_jobs(proto::ListJobsRequest {}).await;
            ensure!(
                code(listed) == Some(Code::Unauthenticated),
                "{t:?} listed jobs"
            );
            ensure!(code(submit(&mut c, ids.clone(), 4).await) == Some(Code::Unauthenticated));
        }
        // Alice runs a job; it is hers.
        let mut a = as_client(&addr, Some(&alice)).await?;
        let job = submit(&mut a, ids.clone(), 4).await?;
        let last = client::watch(&mut a, job, |_| {}).await?;
        ensure!(last.phase() == JobPhase::Done, "{last:?}");
        let result = client::result(&mut a, job).await?;
        // Bob cannot see it at all: every call is NOT_FOUND, as for an id that never existed.
        let mut b = as_client(&addr, Some(&bob)).await?;
        let w = b.watch_job(proto::WatchJobRequest { job_id: job }).await;
        ensure!(code(w) == Some(Code::NotFound));
        ensure!(code(client::result(&mut b, job).await) == Some(Code::NotFound));
        let cancel = b.cancel_job(proto::CancelJobRequest { job_id: job }).await;
        ensure!(code(cancel) == Some(Code::NotFound));
        let bobs = b.list_jobs(proto::ListJobsRequest {}).await?.into_inner();
        ensure!(bobs.jobs.is_empty() && bobs.models == ["m"], "{bobs:?}");
        // The admin sees every job and its result.
        let mut o = as_client(&addr, Some(&ops)).await?;
        let all = o.list_jobs(proto::ListJobsRequest {}).await?.into_inner();
        ensure!(all.jobs.iter().any(|j| j.job_id == job), "{all:?}");
        ensure!(client::result(&mut o, job).await? == result);
        // Alice's limits: 64 input tokens a job, one job at a time.
        let long = submit(&mut a, (0..65).collect(), 1).await;
        let msg = long.as_ref().err().map(|s| s.message().to_string());
        ensure!(code(long) == Some(Code::InvalidArgument), "{msg:?}");
        ensure!(msg.is_some_and(|m| m.contains("max_input_tokens")));
        let running = submit(&mut a, ids.clone(), 900).await?;
        let second = submit(&mut a, ids.clone(), 4).await;
        let msg = second.as_ref().err().map(|s| s.message().to_string());
        ensure!(code(second) == Some(Code::ResourceExhausted), "{msg:?}");
        ensure!(msg.is_some_and(|m| m.contains("max_queued_jobs=1")));
        // Bob has no such limit, and alice may cancel her own job.
        let bobs_job = submit(&mut b, ids.clone(), 2).await?;
        a.cancel_job(proto::CancelJobRequest { job_id: running })
            .await?;
        let end = client::watch(&mut a, running, |_| {}).await?;
        ensure!(end.phase() == JobPhase::Cancelled, "{end:?}");
        ensure!(client::watch(&mut b, bobs_job, |_| {}).await?.phase() == JobPhase::Done);
        anyhow::Ok(())
    })?;

    // The HTTP API: the same tokens, OpenAI's 401 without one.
    let (st, body) = http(&http_addr, "GET", "/v1/models", None, "")?;
    ensure!(st == 401 && body.contains("invalid_api_key"), "{st} {body}");
    let (st, _) = http(&http_addr, "GET", "/v1/models", Some("rmk_00"), "")?;
    ensure!(st == 401);
    let (st, body) = http(&http_addr, "GET", "/v1/models", Some(&bob), "")?;
    ensure!(st == 200 && body.contains("\"m\""), "{st} {body}");
    let (st, _) = http(&http_addr, "GET", "/health", None, "")?;
    ensure!(st == 200, "health needs no token (probes)");
    let req = r#"{"model": "m", "prompt": [1, 2, 3, 4, 5], "max_tokens": 3, "temperature": 0}"#;
    let (st, body) = http(&http_addr, "POST", "/v1/completions", None, req)?;
    ensure!(st == 401, "{st} {body}");
    let (st, body) = http(&http_addr, "POST", "/v1/completions", Some(&bob), req)?;
    ensure!(
        st == 200 && body.contains("\"completion_tokens\":3"),
        "{st} {body}"
    );
    let long = format!(
        r#"{{"model": "m", "prompt": {:?}, "max_tokens": 1}}"#,
        vec![1; 65]
    );
    let (st, body) = http(&http_addr, "POST", "/v1/completions", Some(&alice), &long)?;
    ensure!(
        st == 400 && body.contains("max_input_tokens"),
        "{st} {body}"
    );
    // Bob's HTTP job is his: alice does not see it, bob does.
    rt.block_on(async {
        let mut a = as_client(&addr, Some(&alice)).await?;
        let mine = a.list_jobs(proto::ListJobsRequest {}).await?.into_inner();
        ensure!(mine.jobs.len() == 2, "alice sees {:?}", mine.jobs);
        let mut b = as_client(&addr, Some(&bob)).await?;
        ensure!(
            b.list_jobs(proto::ListJobsRequest {})
                .await?
                .into_inner()
                .jobs
                .len()
                == 2
        );
        anyhow::Ok(())
    })?;

    // `ringmoe submit` takes the token from RINGMOE_TOKEN or --token-file.
    let prompt = dir.path().join("prompt.txt");
    std::fs::write(&prompt, "The quick brown fox")?;
    let submit_cli = |env: Option<&str>, file: Option<&Path>| -> Result<std::process::Output> {
        let mut c = Command::new(BIN);
        c.args(["submit", "--addr", &addr, "--max-new-tokens", "3", "--file"])
            .arg(&prompt)
            .env_remove("RINGMOE_TOKEN");
        if let Some(t) = env {
            c.env("RINGMOE_TOKEN", t);
        }
        if let Some(f) = file {
            c.arg("--token-file").arg(f);
        }
        Ok(c.output()?)
    };
    let out = submit_cli(None, None)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("bearer token"),
        "{err}"
    );
    ensure!(submit_cli(Some(&bob), None)?.status.success());
    let bob_file = dir.path().join("bob.secret");
    std::fs::write(&bob_file, format!("{bob}\n"))?;
    ensure!(submit_cli(None, Some(&bob_file))?.status.success());

    // SIGHUP: carol in, bob out, without a restart; a broken file changes nothing.
    std::fs::write(&tokens, format!("{la}\n{lc} max_jobs_per_minute=1\n"))?;
    serve.signal("HUP")?;
    rt.block_on(async {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = as_client(&addr, Some(&carol)).await?;
            match c.list_jobs(proto::ListJobsRequest {}).await {
                Ok(_) => break,
                Err(s) if s.code() == Code::Unauthenticated && Instant::now() < end => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(s) => bail!("carol after the reload: {s}"),
            }
        }
        let mut b = as_client(&addr, Some(&bob)).await?;
        ensure!(code(b.list_jobs(proto::ListJobsRequest {}).await) == Some(Code::Unauthenticated));
        // Carol may submit one job a minute.
        let mut c = as_client(&addr, Some(&carol)).await?;
        submit(&mut c, ids.clone(), 2).await?;
        let again = submit(&mut c, ids.clone(), 2).await;
        let msg = again.as_ref().err().map(|s| s.message().to_string());
        ensure!(code(again) == Some(Code::ResourceExhausted), "{msg:?}");
        ensure!(msg.is_some_and(|m| m.contains("max_jobs_per_minute=1")));
        anyhow::Ok(())
    })?;
    std::fs::write(&tokens, "carol sha256:broken\n")?;
    serve.signal("HUP")?;
    std::thread::sleep(Duration::from_millis(500));
    rt.block_on(async {
        let mut c = as_client(&addr, Some(&carol)).await?;
        c.list_jobs(proto::ListJobsRequest {}).await?;
        anyhow::Ok(())
    })?;
    let log = std::fs::read_to_string(dir.path().join("serve.log"))?;
    ensure!(
        log.contains("refused an unauthenticated client"),
        "refusals are logged"
    );
    ensure!(
        log.contains("not reloaded; the previous one stays in force"),
        "a bad reload is logged"
    );
    Ok(())
}

/// Runs a server command that must refuse to start because of `what`: its stderr, once it
/// exited non-zero. A server that started anyway (and would serve until killed) is killed
/// after 30 s and fails the test.
fn refused_at_start(mut cmd: Command, what: &str) -> Result<String> {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let end = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > end {
            child.kill()?;
            bail!("the server started with {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    ensure!(!out.status.success(), "the server exited 0 with {what}");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_malformed_tokens_file_stops_the_server_at_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "alice sha256:abc\n")?;
    let mut cmd = Command::new(BIN);
    cmd.args(["coordinator", "--addr", "127.0.0.1:0", "--store"])
        .arg(dir.path().join("store"))
        .arg("--model")
        .arg(fixture("mixtral-tiny"))
        .arg("--auth-tokens-file")
        .arg(&tokens);
    let err = refused_at_start(cmd, "a broken tokens file")?;
    ensure!(
        err.contains("line 1") && err.contains("64 hex digits"),
        "{err}"
    );
    Ok(())
}

/// Workers the coordinator at `addr` counts live (as `ListJobs` says).
async fn live_workers(addr: &str) -> Result<u32> {
    let mut c = as_client(addr, None).await?;
    Ok(c.list_jobs(proto::ListJobsRequest {})
        .await?
        .into_inner()
        .workers)
}

#[test]
fn the_control_plane_admits_only_holders_of_the_cluster_secret() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (secret, wrong) = (dir.path().join("secret"), dir.path().join("wrong"));
    std::fs::write(&secret, "9f1c2e7a5b3d4c6e8f0a1b2c3d4e5f60\n")?;
    std::fs::write(&wrong, "00000000000000000000000000000000\n")?;
    // The workers load only from `models/`: the model is copied there, and a symlink in it
    // points out of it.
    let root = dir.path().join("models");
    let copy = root.join("mixtral-tiny");
    std::fs::create_dir_all(&copy)?;
    for f in std::fs::read_dir(fixture("mixtral-tiny"))? {
        let f = f?;
        std::fs::copy(f.path(), copy.join(f.file_name()))?;
    }
    std::fs::create_dir(dir.path().join("private"))?;
    std::os::unix::fs::symlink(dir.path().join("private"), root.join("escape"))?;
    let model = format!("m={}", copy.display());
    let mut cmd = Command::new(BIN);
    cmd.args([
        "coordinator",
        "--addr",
        "127.0.0.1:0",
        "--model",
        &model,
        "--min-workers",
        "2",
    ])
    .arg("--store")
    .arg(dir.path().join("store"))
    .arg("--cluster-secret-file")
    .arg(&secret)
    .env("RUST_LOG", "info");
    let coord = Proc::spawn("coordinator", cmd, dir.path())?;
    let addr = coord.line_after("listening on ", Duration::from_secs(30))?;
    let worker = |name: &str, secret: Option<&Path>| -> Result<(Proc, String)> {
        let mut cmd = Command::new(BIN);
        cmd.args(["worker", "--coordinator", &addr])
            .arg("--model-root")
            .arg(&root)
            .env("RUST_LOG", "info");
        if let Some(s) = secret {
            cmd.arg("--cluster-secret-file").arg(s);
        }
        let p = Proc::spawn(name, cmd, dir.path())?;
        let a = p.line_after("listening on ", Duration::from_secs(30))?;
        Ok((p, a))
    };
    let (_a, a_addr) = worker("worker-a", Some(&secret))?;
    let (_b, _) = worker("worker-b", Some(&wrong))?;
    let (_c, _) = worker("worker-c", None)?;
    let rt = rt()?;
    let held = ClusterSecret::from_file(&secret)?;
    rt.block_on(async {
        // A (the secret) joins; B (a wrong one) and C (none) never do, however long they beat.
        let end = Instant::now() + Duration::from_secs(10);
        while live_workers(&addr).await? < 1 {
            ensure!(Instant::now() < end, "worker A never registered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure!(
            live_workers(&addr).await? == 1,
            "a worker without the secret registered"
        );

        // A hand-made heartbeat: refused without the secret; with it, a bad address or a
        // budget that holds nothing is still refused.
        let url = format!("http://{addr}");
        let beat = |worker_addr: &str, kv_budget_bytes| proto::HeartbeatRequest {
            worker_addr: worker_addr.into(),
            kv_budget_bytes,
            draining: false,
        };
        let mut stranger = ClusterServiceClient::connect(url.clone()).await?;
        let r = stranger.heartbeat(beat("127.0.0.1:9", 1 << 40)).await;
        ensure!(code(r) == Some(Code::Unauthenticated));
        let ch = tonic::transport::Channel::from_shared(url)?
            .connect()
            .await?;
        let mut member =
            ClusterServiceClient::with_interceptor(ch, Credential::new(Some(held.clone())));
        for (a, budget) in [("not an addr!!", 1 << 30), ("127.0.0.1:9", 1)] {
            let r = member.heartbeat(beat(a, budget)).await;
            ensure!(code(r) == Some(Code::InvalidArgument), "{a} {budget}");
        }
        ensure!(live_workers(&addr).await? == 1);

        // Worker A serves only the coordinator: a LoadModel from anyone else is refused before
        // it touches a path.
        let load = proto::LoadModelRequest {
            model: "m".into(),
            path: "../../etc".into(),
            ..Default::default()
        };
        let mut w = WorkerServiceClient::connect(format!("http://{a_addr}")).await?;
        ensure!(code(w.load_model(load.clone()).await) == Some(Code::Unauthenticated));
        let ch = tonic::transport::Channel::from_shared(format!("http://{a_addr}"))?
            .connect()
            .await?;
        let bad = ClusterSecret::from_file(&wrong)?;
        let mut w = WorkerServiceClient::with_interceptor(ch, Credential::new(Some(bad)));
        ensure!(code(w.load_model(load.clone()).await) == Some(Code::Unauthenticated));
        // Even the coordinator (the secret) cannot point a worker outside its model roots, by
        // `..` or by a symlink; the answer does not say whether the path exists.
        let ch = tonic::transport::Channel::from_shared(format!("http://{a_addr}"))?
            .connect()
            .await?;
        let mut w = WorkerServiceClient::with_interceptor(ch, Credential::new(Some(held.clone())));
        let placement = ringmoe_parallel::Placement::contiguous(2, 8, 1)?.to_json();
        for path in [
            "../../etc".to_string(),
            root.join("escape").display().to_string(),
        ] {
            let req = proto::LoadModelRequest {
                path: path.clone(),
                placement_json: placement.clone(),
                ..load.clone()
            };
            let r = w.load_model(req).await;
            let msg = r
                .as_ref()
                .err()
                .map(|s| s.message().to_string())
                .unwrap_or_default();
            ensure!(code(r) == Some(Code::PermissionDenied), "{path}: {msg}");
            ensure!(msg.contains("model roots"), "{msg}");
        }
        anyhow::Ok(())
    })?;

    // A second member joins, and a job runs over A and D: the coordinator's calls carry the
    // secret and the workers' data plane the job's token.
    let (_d, d_addr) = worker("worker-d", Some(&secret))?;
    // The coordinator ranks workers by id (their address).
    let a_rank = u32::from(d_addr < a_addr);
    rt.block_on(async {
        let mut c = as_client(&addr, None).await?;
        let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 300).collect();
        let id = submit(&mut c, prompt.clone(), 6).await?;
        let last = client::watch(&mut c, id, |_| {}).await?;
        ensure!(last.phase() == JobPhase::Done, "{last:?}");
        ensure!(live_workers(&addr).await? == 2);
        let first = client::result(&mut c, id).await?;

        // Self-healing: an authenticated LoadModel gives worker A another placement under the
        // published version (1) and its own rank. The coordinator sends its placement with every run and A
        // reloads what differs, so the next job runs on the published placement and gives the
        // same tokens.
        let ch = tonic::transport::Channel::from_shared(format!("http://{a_addr}"))?
            .connect()
            .await?;
        let mut w = WorkerServiceClient::with_interceptor(ch, Credential::new(Some(held.clone())));
        let mut other = ringmoe_parallel::Placement::round_robin(2, 8, 2)?;
        other.version = 1;
        let rogue = w
            .load_model(proto::LoadModelRequest {
                model: "m".into(),
                path: copy.display().to_string(),
                placement_json: other.to_json(),
                worker_index: a_rank,
            })
            .await?
            .into_inner();
        ensure!(
            !rogue.cached,
            "worker A did not take the divergent placement"
        );
        let id = submit(&mut c, prompt, 6).await?;
        let last = client::watch(&mut c, id, |_| {}).await?;
        ensure!(
            last.phase() == JobPhase::Done,
            "after a divergent LoadModel: {last:?}"
        );
        ensure!(
            client::result(&mut c, id).await? == first,
            "the job after a divergent LoadModel gave other tokens"
        );

        // Fencing: once a call with token 10 reached worker A, a call with a lower token (a
        // deposed leader's), or none, is refused.
        let fenced = |token: u64| {
            let ch = tonic::transport::Channel::from_shared(format!("http://{a_addr}"));
            let cred = Credential::new(Some(held.clone())).fenced(token);
            async move {
                let ch = ch?.connect().await?;
                let mut w = WorkerServiceClient::with_interceptor(ch, cred);
                anyhow::Ok(
                    w.cancel_job(proto::WorkerCancelRequest { job_id: 999 })
                        .await
                        .map(|_| ()),
                )
            }
        };
        ensure!(fenced(10).await?.is_ok());
        ensure!(fenced(10).await?.is_ok(), "the same leader again");
        for stale in [5, 0] {
            let r = fenced(stale).await?;
            let msg = r.as_ref().err().map(|s| s.message().to_string());
            ensure!(
                code(r) == Some(Code::FailedPrecondition)
                    && msg.is_some_and(|m| m.contains("deposed leader")),
                "token {stale} was not refused"
            );
        }
        ensure!(fenced(11).await?.is_ok(), "a newer leader");
        anyhow::Ok(())
    })?;
    let log = std::fs::read_to_string(dir.path().join("coordinator.log"))?;
    ensure!(
        log.contains("refused a call") && log.contains("a wrong cluster secret"),
        "refusals are logged"
    );
    let a_log = std::fs::read_to_string(dir.path().join("worker-a.log"))?;
    ensure!(
        a_log.contains("refused a call from a deposed coordinator"),
        "worker A did not log the stale calls"
    );
    let b_log = std::fs::read_to_string(dir.path().join("worker-b.log"))?;
    ensure!(
        b_log.contains("refused this worker's heartbeat"),
        "worker B says why it is not used"
    );
    Ok(())
}

#[test]
fn serve_refuses_a_truncated_checkpoint_at_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    std::fs::create_dir(&model)?;
    for f in ["config.json", "tokenizer.json", "generation_config.json"] {
        std::fs::copy(fixture("mixtral-tiny").join(f), model.join(f))?;
    }
    let weights = std::fs::read(fixture("mixtral-tiny").join("model.safetensors"))?;
    std::fs::write(
        model.join("model.safetensors"),
        &weights[..weights.len() / 2],
    )?;
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--workers",
        "1",
        "--addr",
        "127.0.0.1:0",
        "--no-http",
    ])
    .arg("--no-metrics")
    .arg("--store")
    .arg(dir.path().join("store"))
    .arg("--model")
    .arg(&model);
    let err = refused_at_start(cmd, "a truncated checkpoint")?;
    ensure!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
    Ok(())
}

/// A random one-layer Mixtral (hidden 64) for positions up to `max_positions`, whose EOS id is
/// outside the vocabulary (so generation always runs to `max_new_tokens`).
fn one_layer_model(dir: &Path, max_positions: usize) -> Result<std::path::PathBuf> {
    let model = dir.join("one-layer");
    ringmoe_model::write_random_checkpoint(
        &model,
        &serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "vocab_size": 512, "hidden_size": 64,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
            "max_position_embeddings": max_positions, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
            "eos_token_id": 9999
        }),
        3,
    )?;
    Ok(model)
}

/// A cancel must stop the work, not just the job's status: a cancelled job's workers stop
/// inside the layer (inside a ring step's attention), give the cores back, and the next job
/// runs at once. The model has one layer, so no layer boundary comes to the rescue, and the
/// job is long enough (131,072 tokens: each ring step scores billions of pairs, minutes of
/// work on this machine) that waiting for the step to end would be seen.
#[test]
fn a_cancelled_job_stops_its_workers_mid_layer_and_the_next_job_runs_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = one_layer_model(dir.path(), 262_144)?;
    let name = format!("m={}", model.display());
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--workers",
        "2",
        "--addr",
        "127.0.0.1:0",
        "--no-http",
    ])
    .args(["--no-metrics", "--model", &name, "--store"])
    .arg(dir.path().join("store"))
    .env("RUST_LOG", "info");
    let serve = Proc::spawn("serve", cmd, dir.path())?;
    let addr = serve.line_after("listening on ", Duration::from_secs(30))?;
    let log = dir.path().join("serve.log");
    let parts_cancelled = || -> Result<usize> {
        let text = std::fs::read_to_string(&log)?;
        Ok(text
            .lines()
            .filter(|l| l.contains("job part failed") && l.contains("cancelled"))
            .count())
    };
    let rt = rt()?;
    rt.block_on(async {
        let mut c = as_client(&addr, None).await?;
        let long: Vec<u32> = (0..131_072u32).map(|i| i.wrapping_mul(2_654_435_761) >> 23).collect();
        let score = proto::JobSpec {
            mode: proto::JobMode::Score as i32,
            ..spec(0)
        };
        let id = client::submit(&mut c, score, Input::Tokens(long), client::UPLOAD_CHUNK, |_| {})
            .await?
            .job_id;
        // Into the prefill: the workers are computing the ring's first step.
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let l = c.list_jobs(proto::ListJobsRequest {}).await?.into_inner();
            let phase = l.jobs.iter().find(|j| j.job_id == id).map(|j| j.phase());
            if phase == Some(JobPhase::Prefill) {
                break;
            }
            ensure!(Instant::now() < end, "the long job never reached prefill: {phase:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cancelled_at = Instant::now();
        c.cancel_job(proto::CancelJobRequest { job_id: id }).await?;
        // Both workers' parts stop (each logs its part failed as cancelled) well before the
        // ring step could have ended by itself.
        while parts_cancelled()? < 2 {
            ensure!(
                cancelled_at.elapsed() < Duration::from_secs(30),
                "the workers were still computing 30 s after the cancel"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stopped = cancelled_at.elapsed();
        // The next job gets the cores.
        let short = submit(&mut c, (1..40).collect(), 4).await?;
        let last = client::watch(&mut c, short, |_| {}).await?;
        ensure!(last.phase() == JobPhase::Done, "{last:?}");
        eprintln!(
            "cancelled parts stopped {stopped:?} after the cancel; the next job was done {:?} after it",
            cancelled_at.elapsed()
        );
        ensure!(
            cancelled_at.elapsed() < Duration::from_secs(60),
            "the next job waited {:?}",
            cancelled_at.elapsed()
        );
        anyhow::Ok(())
    })
}

/// `(--tls-cert, --tls-key, --tls-ca)` arguments for a process holding `cert` of `ca`.
fn tls_args(cert: &Path, key: &Path, ca: &Path) -> Vec<std::ffi::OsString> {
    let mut v = Vec::new();
    for (flag, p) in [("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)] {
        v.push(flag.into());
        v.push(p.as_os_str().to_owned());
    }
    v
}

#[test]
fn mtls_on_every_grpc_hop_keeps_out_whoever_the_cluster_ca_did_not_sign() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ours = ringmoe_testkit::make_certs(&dir.path().join("ca"))?;
    let theirs = ringmoe_testkit::make_certs(&dir.path().join("rogue-ca"))?;
    let model = format!("m={}", fixture("mixtral-tiny").display());
    let mut cmd = Command::new(BIN);
    cmd.args(["coordinator", "--addr", "127.0.0.1:0", "--model", &model])
        .args([
            "--min-workers",
            "3",
            "--http-addr",
            "127.0.0.1:0",
            "--store",
        ])
        .arg(dir.path().join("store"))
        .args(tls_args(&ours.server_cert, &ours.server_key, &ours.ca))
        .env("RUST_LOG", "info");
    let coord = Proc::spawn("coordinator", cmd, dir.path())?;
    let addr = coord.line_after("listening on ", Duration::from_secs(30))?;
    let http_addr = coord.line_after("http api on https://", Duration::from_secs(30))?;
    let worker = |name: &str, t: &ringmoe_testkit::TlsFiles| -> Result<Proc> {
        let mut cmd = Command::new(BIN);
        // The data plane runs over TLS too.
        cmd.args(["worker", "--coordinator", &addr, "--data-tls"])
            .args(tls_args(&t.client_cert, &t.client_key, &t.ca))
            .env("RUST_LOG", "info");
        let p = Proc::spawn(name, cmd, dir.path())?;
        p.line_after("listening on ", Duration::from_secs(30))?;
        Ok(p)
    };
    // A certificate the cluster CA signed, but for another host than the one it registers.
    let (cert, key) =
        ringmoe_testkit::sign_cert(&dir.path().join("ca"), "elsewhere", "DNS:elsewhere.example")?;
    let elsewhere = ringmoe_testkit::TlsFiles {
        client_cert: cert,
        client_key: key,
        ..ours.clone()
    };
    let _w0 = worker("worker-0", &ours)?;
    let _rogue = worker("worker-rogue", &theirs)?;
    let _impostor = worker("worker-impostor", &elsewhere)?;
    let _w1 = worker("worker-1", &ours)?;
    let _w2 = worker("worker-2", &ours)?;
    let client_tls = |cert: Option<(&Path, &Path)>, ca: &Path| {
        ringmoe_proto::tls::TlsFiles {
            cert: cert.map(|c| c.0.to_path_buf()),
            key: cert.map(|c| c.1.to_path_buf()),
            ca: Some(ca.to_path_buf()),
        }
        .load(false)
    };
    let good = client_tls(Some((&ours.client_cert, &ours.client_key)), &ours.ca)?;
    let rt = rt()?;
    rt.block_on(async {
        let list = |tls: Option<ringmoe_proto::tls::Tls>| {
            let addr = addr.clone();
            async move {
                let mut c = client::connect_with(&addr, 1 << 20, None, tls.as_ref()).await?;
                let l = c.list_jobs(proto::ListJobsRequest {}).await?.into_inner();
                Ok::<_, tonic::Status>(l.workers)
            }
        };
        // Plaintext, no client certificate, a certificate of another CA: all refused.
        ensure!(list(None).await.is_err(), "a plaintext client got in");
        ensure!(
            list(client_tls(None, &ours.ca)?).await.is_err(),
            "a client without a certificate got in"
        );
        let rogue = client_tls(Some((&theirs.client_cert, &theirs.client_key)), &theirs.ca)?;
        ensure!(list(rogue).await.is_err(), "a client of another CA got in");
        // Our client sees exactly our three workers: the rogue one and the impostor never
        // registered.
        let end = Instant::now() + Duration::from_secs(20);
        while list(good.clone()).await? < 3 {
            ensure!(
                Instant::now() < end,
                "the workers never registered over mTLS"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        ensure!(
            list(good.clone()).await? == 3,
            "the rogue or the impostor worker registered"
        );
        // A job over mTLS control-plane hops.
        let mut c = client::connect_with(&addr, 16 << 20, None, good.as_ref()).await?;
        let id = submit(&mut c, (1..30).collect(), 5).await?;
        let last = client::watch(&mut c, id, |_| {}).await?;
        ensure!(last.phase() == JobPhase::Done, "{last:?}");
        anyhow::Ok(())
    })?;
    // The CLI: submit and health with the same flags.
    let mut submit_cli = Command::new(BIN);
    submit_cli
        .args([
            "submit",
            "--addr",
            &addr,
            "--max-new-tokens",
            "3",
            "--ids",
            "--token-ids",
        ])
        .arg(write_ids(dir.path(), &[1, 2, 3, 4])?)
        .args(tls_args(&ours.client_cert, &ours.client_key, &ours.ca));
    let out = submit_cli.output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let health = |args: Vec<std::ffi::OsString>| -> Result<std::process::Output> {
        Ok(Command::new(BIN)
            .args(["health", "--addr", &addr])
            .args(args)
            .output()?)
    };
    ensure!(
        health(tls_args(&ours.client_cert, &ours.client_key, &ours.ca))?
            .status
            .success()
    );
    let out = health(Vec::new())?;
    ensure!(!out.status.success(), "plaintext health answered over TLS");
    // The HTTP API is HTTPS with the coordinator's certificate, and asks no client certificate
    // (its clients authenticate by bearer token); plain HTTP gets no answer.
    let (status, body) = https_get(&http_addr, &ours.ca, "/v1/models")?;
    ensure!(status == 200 && body.contains("\"m\""), "{status} {body}");
    ensure!(
        http(&http_addr, "GET", "/v1/models", None, "").is_err(),
        "plain HTTP answered on the HTTPS port"
    );
    let log = std::fs::read_to_string(dir.path().join("worker-rogue.log"))?;
    ensure!(
        log.contains("heartbeat"),
        "the rogue worker's log says nothing of its heartbeats"
    );
    for w in ["worker-0", "worker-1", "worker-2"] {
        let log = std::fs::read_to_string(dir.path().join(format!("{w}.log")))?;
        ensure!(
            log.contains("data_tls=true") && log.contains("job part done"),
            "{w} ran no job part over data-plane TLS"
        );
    }
    let log = std::fs::read_to_string(dir.path().join("worker-impostor.log"))?;
    ensure!(
        log.contains("the certificate is not valid for 127.0.0.1"),
        "the impostor's log does not say why it was refused"
    );
    let log = std::fs::read_to_string(dir.path().join("coordinator.log"))?;
    ensure!(
        log.contains("its certificate does not name its address"),
        "the coordinator did not log the impostor"
    );
    Ok(())
}

/// A safetensors file with int64 `input_ids` [1, L], as `submit --token-ids` takes.
fn write_ids(dir: &Path, ids: &[i64]) -> Result<std::path::PathBuf> {
    let path = dir.join("ids.safetensors");
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, ids.len()], &bytes)?;
    safetensors::serialize_to_file([("input_ids", view)], None, &path)?;
    Ok(path)
}

/// Uploads that open and send nothing hold a slot only until `--upload-idle-secs`, and no more
/// than `--max-uploads` are in progress: a client cannot exhaust the coordinator with streams.
#[test]
fn stalled_uploads_are_bounded_and_dropped() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = format!("m={}", fixture("mixtral-tiny").display());
    let mut cmd = Command::new(BIN);
    cmd.args(["coordinator", "--addr", "127.0.0.1:0", "--model", &model])
        .args(["--max-uploads", "2", "--upload-idle-secs", "3", "--store"])
        .arg(dir.path().join("store"));
    let coord = Proc::spawn("coordinator", cmd, dir.path())?;
    let addr = coord.line_after("listening on ", Duration::from_secs(30))?;
    let rt = rt()?;
    rt.block_on(async {
        // Two uploads that never send a message (the senders stay open, silent).
        let mut held = Vec::new();
        let mut stalled = Vec::new();
        for _ in 0..2 {
            let (tx, rx) = tokio::sync::mpsc::channel::<proto::SubmitJobRequest>(1);
            held.push(tx);
            let mut c = as_client(&addr, None).await?;
            stalled.push(tokio::spawn(async move {
                let s = tokio_stream::wrappers::ReceiverStream::new(rx);
                c.submit_job(s).await.map(|_| ())
            }));
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        // A third is refused at once while they hold the slots.
        let mut c = as_client(&addr, None).await?;
        let third = submit(&mut c, vec![1, 2, 3], 2).await;
        let msg = third.as_ref().err().map(|s| s.message().to_string());
        ensure!(code(third) == Some(Code::ResourceExhausted), "{msg:?}");
        ensure!(msg.is_some_and(|m| m.contains("--max-uploads")));
        // The stalled ones are dropped after the idle time, freeing the slots.
        for s in stalled {
            let r = tokio::time::timeout(Duration::from_secs(20), s).await??;
            let msg = r.as_ref().err().map(|s| s.message().to_string());
            ensure!(code(r) == Some(Code::DeadlineExceeded), "{msg:?}");
        }
        drop(held);
        submit(&mut c, vec![1, 2, 3], 2).await?;
        anyhow::Ok(())
    })
}

/// `submit` losing its coordinator mid-job says so, reconnects with backoff, and follows the
/// job (stored, re-run after the restart) to its end; `submit --watch ID` follows a job later.
#[test]
fn submit_follows_its_job_across_a_coordinator_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = one_layer_model(dir.path(), 65_536)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let name = format!("m={}", model.display());
    let coordinator = |log: &str| -> Result<Proc> {
        let mut cmd = Command::new(BIN);
        cmd.args(["coordinator", "--addr", &addr, "--model", &name, "--store"])
            .arg(dir.path().join("store"));
        let p = Proc::spawn(log, cmd, dir.path())?;
        p.line_after("listening on ", Duration::from_secs(30))?;
        Ok(p)
    };
    let coord = coordinator("coordinator")?;
    let mut w = Command::new(BIN);
    w.args(["worker", "--coordinator", &addr]);
    let _worker = Proc::spawn("worker", w, dir.path())?;
    let ids = write_ids(dir.path(), &(1..200).collect::<Vec<i64>>())?;
    let mut submit_cmd = Command::new(BIN);
    submit_cmd
        .args([
            "submit",
            "--addr",
            &addr,
            "--json",
            "--max-new-tokens",
            "3000",
        ])
        .args(["--reconnect-secs", "60", "--token-ids"])
        .arg(&ids)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let submitted = submit_cmd.spawn()?;
    let rt = rt()?;
    rt.block_on(async {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let phase = match as_client(&addr, None).await {
                Ok(mut c) => c
                    .list_jobs(proto::ListJobsRequest {})
                    .await
                    .ok()
                    .and_then(|l| l.into_inner().jobs.first().map(|j| j.phase())),
                Err(_) => None,
            };
            if phase == Some(JobPhase::Decode) {
                break;
            }
            ensure!(
                phase != Some(JobPhase::Done),
                "the job ended before the restart"
            );
            ensure!(
                Instant::now() < end,
                "the job never reached decode: {phase:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    })?;
    // The coordinator dies mid-decode and comes back on the same address and store.
    drop(coord);
    std::thread::sleep(Duration::from_secs(1));
    let _coord = coordinator("coordinator-again")?;
    let out = submitted.wait_with_output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    ensure!(out.status.success(), "submit failed: {stderr}");
    ensure!(
        stderr.contains("lost the coordinator") && stderr.contains("reconnected"),
        "{stderr}"
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim())?;
    ensure!(
        v["state"] == "done" && v["tokens"].as_array().map(Vec::len) == Some(3000),
        "{v}"
    );
    // Later, by id.
    let again = Command::new(BIN)
        .args(["submit", "--addr", &addr, "--json", "--watch"])
        .arg(v["job_id"].to_string())
        .output()?;
    let w: serde_json::Value = serde_json::from_slice(&again.stdout)?;
    ensure!(w["tokens"] == v["tokens"], "{w}");
    Ok(())
}

/// Certificate rotation without a restart: the coordinator's certificate, key and CA files are
/// replaced (here by another CA's, as a CA rotation looks) and a SIGHUP makes new connections
/// use them, while a connection made before keeps working.
#[test]
fn a_sighup_rotates_the_tls_certificate_for_new_connections() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let old = ringmoe_testkit::make_certs(&dir.path().join("old"))?;
    let new = ringmoe_testkit::make_certs(&dir.path().join("new"))?;
    let live = dir.path().join("live");
    std::fs::create_dir(&live)?;
    let install = |t: &ringmoe_testkit::TlsFiles| -> Result<()> {
        std::fs::copy(&t.server_cert, live.join("tls.crt"))?;
        std::fs::copy(&t.server_key, live.join("tls.key"))?;
        std::fs::copy(&t.ca, live.join("ca.crt"))?;
        Ok(())
    };
    install(&old)?;
    let model = format!("m={}", fixture("mixtral-tiny").display());
    let mut cmd = Command::new(BIN);
    cmd.args([
        "coordinator",
        "--addr",
        "127.0.0.1:0",
        "--model",
        &model,
        "--store",
    ])
    .arg(dir.path().join("store"))
    .args(tls_args(
        &live.join("tls.crt"),
        &live.join("tls.key"),
        &live.join("ca.crt"),
    ))
    .env("RUST_LOG", "info");
    let coord = Proc::spawn("coordinator", cmd, dir.path())?;
    let addr = coord.line_after("listening on ", Duration::from_secs(30))?;
    let client_of = |t: &ringmoe_testkit::TlsFiles| {
        ringmoe_proto::tls::TlsFiles {
            cert: Some(t.client_cert.clone()),
            key: Some(t.client_key.clone()),
            ca: Some(t.ca.clone()),
        }
        .load(false)
    };
    let (old_client, new_client) = (client_of(&old)?, client_of(&new)?);
    let rt = rt()?;
    rt.block_on(async {
        let list = |tls: Option<ringmoe_proto::tls::Tls>| {
            let addr = addr.clone();
            async move {
                let mut c = client::connect_with(&addr, 1 << 20, None, tls.as_ref()).await?;
                c.list_jobs(proto::ListJobsRequest {}).await?;
                Ok::<_, tonic::Status>(())
            }
        };
        list(old_client.clone()).await?;
        ensure!(
            list(new_client.clone()).await.is_err(),
            "the new CA's client got in early"
        );
        let mut kept = client::connect_with(&addr, 1 << 20, None, old_client.as_ref()).await?;
        kept.list_jobs(proto::ListJobsRequest {}).await?;
        install(&new)?;
        coord.signal("HUP")?;
        let end = Instant::now() + Duration::from_secs(10);
        while list(new_client.clone()).await.is_err() {
            ensure!(Instant::now() < end, "the new certificate never served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            list(old_client.clone()).await.is_err(),
            "the old CA's client still got in"
        );
        kept.list_jobs(proto::ListJobsRequest {}).await?;
        anyhow::Ok(())
    })
}
