//! Cluster processes for the integration tests: `ringmoe coordinator` and `ringmoe worker` as
//! child processes on 127.0.0.1 (killed when dropped), and the client calls most tests make.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ringmoe_proto::client::{self, Input, JobResult};
use ringmoe_proto::proto::{self, JobPhase};

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ringmoe ARGS`, waits for stdout's first line (`listening on ADDR`) and returns the
/// process and ADDR. Logs go to `log_dir/NAME.log`.
pub fn start(name: &str, args: &[&str], log_dir: &Path) -> Result<(Proc, String)> {
    let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringmoe"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let p = Proc {
        child,
        name: name.to_string(),
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {} // keep draining so the child never blocks on stdout
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .with_context(|| format!("{} printed no address", p.name))?;
    let addr = line
        .strip_prefix("listening on ")
        .with_context(|| format!("{}'s first line: {line}", p.name))?
        .to_string();
    Ok((p, addr))
}

pub struct Cluster {
    pub coordinator: Proc,
    pub addr: String,
    pub workers: Vec<Proc>,
    pub dir: tempfile::TempDir,
}

/// A coordinator serving `model` and `n` worker processes; `extra` goes to every process.
pub fn cluster(
    model: &Path,
    n: usize,
    coord_extra: &[&str],
    worker_extra: &[&str],
) -> Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let (coordinator, addr) =
        start_coordinator(model, &store, "127.0.0.1:0", n, coord_extra, dir.path())?;
    let workers = (0..n)
        .map(|i| start_worker(&addr, i, worker_extra, dir.path()))
        .collect::<Result<_>>()?;
    Ok(Cluster {
        coordinator,
        addr,
        workers,
        dir,
    })
}

pub fn start_coordinator(
    model: &Path,
    store: &Path,
    addr: &str,
    min_workers: usize,
    extra: &[&str],
    logs: &Path,
) -> Result<(Proc, String)> {
    let model = format!("m={}", model.display());
    let min = min_workers.to_string();
    let mut args = vec![
        "coordinator",
        "--addr",
        addr,
        "--store",
        store.to_str().context("path")?,
        "--model",
        &model,
        "--min-workers",
        &min,
    ];
    args.extend_from_slice(extra);
    start("coordinator", &args, logs)
}

pub fn start_worker(coord: &str, i: usize, extra: &[&str], logs: &Path) -> Result<Proc> {
    let mut args = vec!["worker", "--coordinator", coord];
    args.extend_from_slice(extra);
    Ok(start(&format!("worker{i}"), &args, logs)?.0)
}

pub fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub fn spec(mode: proto::JobMode, max_new_tokens: u32) -> proto::JobSpec {
    proto::JobSpec {
        model: "m".into(),
        mode: mode as i32,
        max_new_tokens,
        sampling: Some(proto::Sampling::default()),
        ..Default::default()
    }
}

/// Submits, follows to the end, and fetches the result.
pub async fn run_job(addr: &str, spec: proto::JobSpec, input: Input) -> Result<(u64, JobResult)> {
    let mut c = client::connect(addr, 64 << 20).await?;
    let id = client::submit(&mut c, spec, input, client::UPLOAD_CHUNK, |_| {})
        .await?
        .job_id;
    let last = client::watch(&mut c, id, |_| {}).await?;
    ensure!(
        last.phase() == JobPhase::Done,
        "job {id} ended {:?}: {}",
        last.phase(),
        last.message
    );
    Ok((id, client::result(&mut c, id).await?))
}

pub fn scores(r: JobResult) -> Result<Vec<f32>> {
    match r {
        JobResult::Scores(s) => Ok(s),
        other => bail!("expected scores, got {other:?}"),
    }
}

pub fn tokens(r: JobResult) -> Result<Vec<u32>> {
    match r {
        JobResult::Tokens(t) => Ok(t),
        other => bail!("expected tokens, got {other:?}"),
    }
}

pub async fn wait_for_workers(addr: &str, n: u32) -> Result<()> {
    let mut c = client::connect(addr, 1 << 20).await?;
    let t = Instant::now();
    while c
        .list_jobs(proto::ListJobsRequest {})
        .await?
        .into_inner()
        .workers
        < n
    {
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "workers never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
