//! `ringmoe-chaos`, run through `scripts/chaos.sh [--minutes M] [--seed S] [--json]`: the
//! cluster on a test network (testkit's `NsCluster`: etcd, two coordinators sharing one job
//! store, four workers, each in its own network namespace), a stream of mixed jobs (score and
//! generate, 1K–32K tokens, three priorities) and, for M minutes, a seeded random schedule of
//! network and process faults, one at a time, each held a few seconds and healed:
//!
//! | kind | what |
//! |---|---|
//! | `worker_kill` | kill -9 a worker, start it again |
//! | `worker_stop` | SIGSTOP a worker, then SIGCONT |
//! | `worker_partition` | a worker's link down, then up |
//! | `worker_peer_isolation` | two workers cut off from each other only |
//! | `leader_kill` | kill -9 the leader, start it again (as a standby) |
//! | `leader_stop` | SIGSTOP the leader past its lease, then SIGCONT: a deposed leader that wakes up believing it leads, whose late writes and calls the fence must refuse |
//! | `leader_etcd_partition` | the leader cut off from etcd only (it steps down and exits), healed, started again |
//! | `slow_link` | a worker's control link (the coordinator's gRPC to it, through testkit's proxy) capped at 256 KiB/s with 50 ms each way |
//! | `connection_reset` | every connection on a worker's control link reset |
//!
//! Then every fault is healed, submission stops, and every acknowledged job (its id came back
//! from `SubmitJob`) is waited for. A job is correct when it finished once with the
//! single-process engine's result (NLL within 1e-4, greedy tokens identical); lost when it
//! never finished or failed; duplicated when the coordinators' logs show it finished more than
//! once. `stale_writes_refused` counts the fencing refusals in the logs (the store's refused
//! writes and the workers' refused calls from a deposed leader); `max_recovery_secs` is the
//! longest time from a fault to the next job finishing. The seed fixes the schedule and the
//! jobs (not the timing of processes), so a failing run can be replayed. Needs root.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ringmoe_model::generate::{Sampler, SamplingParams, generate};
use ringmoe_model::{LoadOptions, Model, write_random_checkpoint};
use ringmoe_proto::client::{self, Client, Input, JobResult};
use ringmoe_proto::proto::{self, JobPhase};
use ringmoe_testkit::{
    CLUSTER_MODEL_CONFIG, CLUSTER_MODEL_SEED, ClusterSpec, NsCluster, Proxy, max_abs_diff,
};
use serde_json::json;

#[derive(Parser)]
#[command(about = "A seeded randomized fault run against a namespaced ringmoe cluster")]
struct Args {
    /// Minutes of faults (jobs keep coming meanwhile); the drain after them is extra.
    #[arg(long, default_value_t = 3.0)]
    minutes: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object (the summary) on stdout.
    #[arg(long)]
    json: bool,
    /// The `ringmoe` binary.
    #[arg(long)]
    bin: PathBuf,
}

/// SplitMix64: a seeded generator, enough for a schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(lo + (hi - lo) * u)
    }

    /// An index drawn with the given weights.
    fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u32 = weights.iter().sum();
        let mut x = self.below(total as usize) as u32;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

/// The inputs jobs draw from (shorter ones more often) and how many tokens a generate job asks.
const SIZES: [usize; 6] = [1024, 2048, 4096, 8192, 16384, 32768];
const SIZE_WEIGHTS: [u32; 6] = [4, 4, 3, 2, 1, 1];
const NEW_TOKENS: usize = 8;
const WORKERS: usize = 4;
/// Jobs in flight (acknowledged, not finished) before the client waits.
const IN_FLIGHT: usize = 3;

const FAULTS: [&str; 9] = [
    "worker_kill",
    "worker_stop",
    "worker_partition",
    "worker_peer_isolation",
    "leader_kill",
    "leader_stop",
    "leader_etcd_partition",
    "slow_link",
    "connection_reset",
];

struct Reference {
    ids: Vec<u32>,
    nll: Vec<f32>,
    tokens: Vec<u32>,
}

#[derive(Debug, Clone)]
enum Outcome {
    /// Finished `Done` with this result.
    Done(JobResult),
    /// Finished otherwise (failed, cancelled): its phase and message.
    Ended(String),
}

struct JobRec {
    id: u64,
    input: usize,
    generate: bool,
    outcome: Option<Outcome>,
}

#[derive(Default)]
struct State {
    jobs: Vec<JobRec>,
    /// When each job finished (any outcome), as the client saw it.
    finished_at: Vec<Instant>,
    submit_failures: u64,
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn model(dir: &Path) -> Result<PathBuf> {
    let m = dir.join("model");
    write_random_checkpoint(
        &m,
        &serde_json::from_str(CLUSTER_MODEL_CONFIG)?,
        CLUSTER_MODEL_SEED,
    )?;
    Ok(m)
}

/// The single-process engine's answers for every input.
fn references(model_dir: &Path, seed: u64) -> Result<Vec<Reference>> {
    let engine = Model::load(model_dir, &LoadOptions::default())?;
    let mut out = Vec::new();
    for (i, &n) in SIZES.iter().enumerate() {
        let salt = (seed as u32).wrapping_mul(31).wrapping_add(i as u32);
        let ids: Vec<u32> = (0..n as u32)
            .map(|t| (t ^ salt).wrapping_mul(2_654_435_761) % 512)
            .collect();
        let nll = engine.score(&ids)?;
        let mut sampler = Sampler::new(SamplingParams::default())?;
        let (tokens, _) = generate(&engine, &ids, NEW_TOKENS, &mut sampler, &[], |_| Ok(()))?;
        out.push(Reference { ids, nll, tokens });
    }
    Ok(out)
}

fn run(a: &Args) -> Result<bool> {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let model_dir = model(tmp.path())?;
    let refs = Arc::new(references(&model_dir, a.seed)?);
    eprintln!(
        "chaos: seed {}, {} min; references of {} inputs in {:.1?}",
        a.seed,
        a.minutes,
        refs.len(),
        t0.elapsed()
    );
    let spec = ClusterSpec {
        bin: a.bin.clone(),
        model: format!("m={}", model_dir.display()),
        coordinators: 2,
        workers: WORKERS,
        min_workers: 2,
        leader_ttl_secs: 3,
        worker_ttl_secs: 1,
        // Faults come one after another for minutes: a job may be re-run many times.
        coordinator_args: vec!["--max-retries".into(), "1000".into()],
    };
    let mut c = NsCluster::start(spec, tmp.path())?;
    // Each worker registers its proxy's address: the coordinators reach it through the proxy
    // (in this process, on the test network), whose link the schedule slows and resets.
    let mut proxies = Vec::new();
    for w in 0..WORKERS {
        let upstream: SocketAddr = c.worker_addr(w).parse()?;
        proxies.push(Proxy::start(
            SocketAddr::new(c.net.client.into(), 0),
            upstream,
        )?);
    }
    let worker_cmd = |c: &NsCluster, w: usize| {
        let mut cmd = c.worker_command(w);
        cmd.args(["--advertise", &proxies[w].addr.to_string()]);
        cmd
    };
    for w in 0..WORKERS {
        c.workers[w] = Some(c.spawn_worker(w, worker_cmd(&c, w))?);
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let state = Arc::new(Mutex::new(State::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let drain_end = Arc::new(Mutex::new(None::<Instant>));
    let addrs = c.addrs.clone();
    let submitter = rt.spawn(submit_jobs(
        addrs.clone(),
        refs.clone(),
        state.clone(),
        a.seed,
        stop.clone(),
        drain_end.clone(),
    ));

    // The fault schedule, on this thread (it starts and stops processes).
    let mut rng = Rng(a.seed ^ 0xC4A0_5EED);
    let mut faults: Vec<(&str, Instant)> = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(a.minutes * 60.0);
    let start = Instant::now();
    loop {
        let gap = rng.secs(4.0, 10.0);
        let kind = FAULTS[rng.below(FAULTS.len())];
        let hold = rng.secs(2.0, 8.0);
        if Instant::now() + gap + hold > end {
            break;
        }
        std::thread::sleep(gap);
        let at = Instant::now();
        let what = match inject(
            &mut c,
            &rt,
            &addrs,
            &proxies,
            &mut rng,
            kind,
            hold,
            &worker_cmd,
        ) {
            Ok(Some(what)) => what,
            Ok(None) => continue,
            Err(e) => bail!("injecting {kind}: {e:#}"),
        };
        eprintln!(
            "[{:7.1}s] {kind}: {what} (held {hold:.1?})",
            (at - start).as_secs_f64()
        );
        faults.push((kind, at));
        restart_exited(&mut c, &worker_cmd)?;
    }
    stop.store(true, Ordering::Relaxed);
    // The drain: every acknowledged job gets this long to finish.
    *drain_end.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(Instant::now() + Duration::from_secs(300));
    rt.block_on(submitter)
        .context("the client task panicked")??;
    let drained = Instant::now();
    let st = lock(&state);

    // The verdicts.
    let logs = |prefix: &str, n: usize| -> String {
        (0..n)
            .filter_map(|k| c.log(&format!("{prefix}-{k}")).ok())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let coordinator_logs = logs("coordinator", 2);
    let worker_logs = logs("worker", WORKERS);
    let done_counts = finished_done(&coordinator_logs);
    let (mut correct, mut lost, mut duplicated, mut wrong) = (0, 0, 0, 0);
    for j in &st.jobs {
        let r = &refs[j.input];
        match &j.outcome {
            Some(Outcome::Done(res)) => {
                let ok = match (res, j.generate) {
                    (JobResult::Tokens(t), true) => *t == r.tokens,
                    (JobResult::Scores(s), false) => {
                        s.len() == r.nll.len() && max_abs_diff(s, &r.nll) <= 1e-4
                    }
                    _ => false,
                };
                if ok {
                    correct += 1;
                } else {
                    wrong += 1;
                    eprintln!("job {}: WRONG result", j.id);
                }
            }
            Some(Outcome::Ended(why)) => {
                lost += 1;
                eprintln!("job {}: LOST ({why})", j.id);
            }
            None => {
                lost += 1;
                eprintln!("job {}: LOST (never finished)", j.id);
            }
        }
        if done_counts.get(&j.id).copied().unwrap_or(0) > 1 {
            duplicated += 1;
            eprintln!("job {}: DUPLICATED (finished more than once)", j.id);
        }
    }
    let stale = count(&coordinator_logs, "so its write was refused")
        + count(&worker_logs, "refused a call from a deposed coordinator");
    // From each fault to the next job that finished (or the end of the drain).
    let recovery: Vec<f64> = faults
        .iter()
        .map(|(_, at)| {
            st.finished_at
                .iter()
                .filter(|t| *t > at)
                .min()
                .copied()
                .unwrap_or(drained)
                .duration_since(*at)
                .as_secs_f64()
        })
        .collect();
    for ((kind, at), r) in faults.iter().zip(&recovery) {
        eprintln!(
            "[{:7.1}s] {kind}: the next job finished {r:.1} s later",
            (*at - start).as_secs_f64()
        );
    }
    let max_recovery = recovery.iter().copied().fold(0.0, f64::max);
    let mut by_kind: BTreeMap<&str, u64> = FAULTS.iter().map(|k| (*k, 0)).collect();
    for (k, _) in &faults {
        *by_kind.entry(k).or_default() += 1;
    }
    let pass = lost == 0 && duplicated == 0 && wrong == 0;
    let summary = json!({
        "seed": a.seed,
        "minutes": a.minutes,
        "faults_injected": by_kind,
        "jobs_acknowledged": st.jobs.len(),
        "jobs_correct": correct,
        "jobs_lost": lost,
        "jobs_duplicated": duplicated,
        "jobs_wrong": wrong,
        "stale_writes_refused": stale,
        "max_recovery_secs": (max_recovery * 10.0).round() / 10.0,
    });
    eprintln!(
        "chaos: {} faults, {} jobs acknowledged ({} submissions refused or unanswered, not \
         counted), {correct} correct, {lost} lost, {duplicated} duplicated, {wrong} wrong; \
         {stale} stale writes/calls refused; max recovery {max_recovery:.1} s; {:.0?} in all",
        faults.len(),
        st.jobs.len(),
        st.submit_failures,
        t0.elapsed()
    );
    if a.json {
        println!("{summary}");
    }
    if !pass {
        let keep = tmp.keep();
        eprintln!("chaos: FAILED; logs kept in {}", keep.display());
    }
    Ok(pass)
}

/// Starts again any process that exited on its own (a coordinator that stepped down after
/// losing etcd for too long; a worker that gave up).
fn restart_exited(
    c: &mut NsCluster,
    worker_cmd: &dyn Fn(&NsCluster, usize) -> std::process::Command,
) -> Result<()> {
    for k in 0..c.coordinators.len() {
        if let Some(p) = c.coordinators[k].as_mut()
            && let Some(status) = p.wait_exit(Duration::ZERO)?
        {
            eprintln!("chaos: coordinator {k} had exited ({status}); starting it again");
            c.coordinators[k] = Some(c.spawn_coordinator(k)?);
        }
    }
    for w in 0..c.workers.len() {
        if let Some(p) = c.workers[w].as_mut()
            && let Some(status) = p.wait_exit(Duration::ZERO)?
        {
            eprintln!("chaos: worker {w} had exited ({status}); starting it again");
            c.workers[w] = Some(c.spawn_worker(w, worker_cmd(c, w))?);
        }
    }
    Ok(())
}

/// How many times each job id finished `Done`, from the coordinators' "job finished" lines.
fn finished_done(logs: &str) -> HashMap<u64, u32> {
    let mut n = HashMap::new();
    for l in logs
        .lines()
        .filter(|l| l.contains("job finished") && l.contains("state=Done"))
    {
        if let Some(id) = l
            .split_whitespace()
            .find_map(|w| w.strip_prefix("job=")?.parse().ok())
        {
            *n.entry(id).or_default() += 1;
        }
    }
    n
}

fn count(logs: &str, what: &str) -> u64 {
    logs.lines().filter(|l| l.contains(what)).count() as u64
}

/// Applies one fault of `kind` for `hold`, then heals it. `None`: it does not apply now (no
/// leader serves to cut off).
#[allow(clippy::too_many_arguments)]
fn inject(
    c: &mut NsCluster,
    rt: &tokio::runtime::Runtime,
    addrs: &[String],
    proxies: &[Proxy],
    rng: &mut Rng,
    kind: &str,
    hold: Duration,
    worker_cmd: &dyn Fn(&NsCluster, usize) -> std::process::Command,
) -> Result<Option<String>> {
    let w = rng.below(WORKERS);
    let what = match kind {
        "worker_kill" => {
            c.workers[w] = None;
            std::thread::sleep(hold);
            c.workers[w] = Some(c.spawn_worker(w, worker_cmd(c, w))?);
            format!("worker {w}")
        }
        "worker_stop" => {
            let p = c.workers[w].as_ref().context("worker")?;
            p.signal("STOP")?;
            std::thread::sleep(hold);
            p.signal("CONT")?;
            format!("worker {w}")
        }
        "worker_partition" => {
            let h = c.worker_host(w);
            c.net.link_down(h)?;
            std::thread::sleep(hold);
            c.net.link_up(h)?;
            format!("worker {w}")
        }
        "worker_peer_isolation" => {
            let v = (w + 1 + rng.below(WORKERS - 1)) % WORKERS;
            let (a, b) = (c.worker_host(w), c.worker_host(v));
            c.net.isolate(a, b)?;
            std::thread::sleep(hold);
            c.net.reconnect(a, b)?;
            format!("workers {w} and {v}")
        }
        "leader_kill" => {
            let Some(k) = rt.block_on(leader(addrs)).map(|(k, _)| k) else {
                return Ok(None);
            };
            c.coordinators[k] = None;
            std::thread::sleep(hold);
            c.coordinators[k] = Some(c.spawn_coordinator(k)?);
            format!("coordinator {k}")
        }
        "leader_stop" => {
            let Some(k) = rt.block_on(leader(addrs)).map(|(k, _)| k) else {
                return Ok(None);
            };
            let p = c.coordinators[k].as_ref().context("leader")?;
            p.signal("STOP")?;
            // Past the lease (3 s) and the standby's election, so it wakes up deposed.
            std::thread::sleep(hold.max(Duration::from_secs(6)));
            p.signal("CONT")?;
            format!("coordinator {k}")
        }
        "leader_etcd_partition" => {
            let Some(k) = rt.block_on(leader(addrs)).map(|(k, _)| k) else {
                return Ok(None);
            };
            let h = c.coordinator_host(k);
            c.net.isolate(h, 0)?;
            let exited = match c.coordinators[k].as_mut() {
                Some(p) => p.wait_exit(hold.max(Duration::from_secs(8)))?.is_some(),
                None => true,
            };
            c.net.reconnect(h, 0)?;
            // Still running means it never noticed: a fault of its own, reported as such.
            if !exited {
                bail!("coordinator {k}, cut off from etcd, still runs 8 s later");
            }
            c.coordinators[k] = Some(c.spawn_coordinator(k)?);
            format!("coordinator {k}")
        }
        "slow_link" => {
            proxies[w].set_rate(Some(256 << 10));
            proxies[w].set_latency(Duration::from_millis(50));
            std::thread::sleep(hold);
            proxies[w].set_rate(None);
            proxies[w].set_latency(Duration::ZERO);
            format!("worker {w}'s control link")
        }
        "connection_reset" => {
            let n = proxies[w].reset();
            format!("{n} connection(s) to worker {w}")
        }
        k => bail!("unknown fault kind {k}"),
    };
    Ok(Some(what))
}

/// The coordinator that serves now (the leader; standbys do not listen) and a client of it.
async fn leader(addrs: &[String]) -> Option<(usize, Client)> {
    for (k, a) in addrs.iter().enumerate() {
        let Ok(Ok(mut cl)) =
            tokio::time::timeout(Duration::from_secs(1), client::connect(a, 64 << 20)).await
        else {
            continue;
        };
        let listed = tokio::time::timeout(
            Duration::from_secs(2),
            cl.list_jobs(proto::ListJobsRequest {}),
        )
        .await;
        if matches!(listed, Ok(Ok(_))) {
            return Some((k, cl));
        }
    }
    None
}

/// The client: keeps up to [`IN_FLIGHT`] jobs acknowledged and unfinished until `stop`, each
/// followed by a watcher; returns once every watcher is done (or the drain ended).
async fn submit_jobs(
    addrs: Vec<String>,
    refs: Arc<Vec<Reference>>,
    state: Arc<Mutex<State>>,
    seed: u64,
    stop: Arc<AtomicBool>,
    drain_end: Arc<Mutex<Option<Instant>>>,
) -> Result<()> {
    let mut rng = Rng(seed ^ 0x10B5);
    let mut watchers = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(rng.secs(0.5, 3.0)).await;
        let in_flight = {
            let s = lock(&state);
            s.jobs.iter().filter(|j| j.outcome.is_none()).count()
        };
        if in_flight >= IN_FLIGHT {
            continue;
        }
        let input = rng.weighted(&SIZE_WEIGHTS);
        let generate = rng.below(2) == 1;
        let priority = rng.below(3) as i32;
        let spec = proto::JobSpec {
            model: "m".into(),
            mode: if generate {
                proto::JobMode::Generate
            } else {
                proto::JobMode::Score
            } as i32,
            max_new_tokens: if generate { NEW_TOKENS as u32 } else { 0 },
            sampling: Some(proto::Sampling::default()),
            priority,
            ..Default::default()
        };
        let Some((_, mut cl)) = leader(&addrs).await else {
            lock(&state).submit_failures += 1;
            continue;
        };
        let ids = Input::Tokens(refs[input].ids.clone());
        let sub = client::submit(&mut cl, spec, ids, client::UPLOAD_CHUNK, |_| {});
        let id = match tokio::time::timeout(Duration::from_secs(30), sub).await {
            Ok(Ok(r)) => r.job_id,
            _ => {
                lock(&state).submit_failures += 1;
                continue;
            }
        };
        lock(&state).jobs.push(JobRec {
            id,
            input,
            generate,
            outcome: None,
        });
        watchers.push(tokio::spawn(follow(
            addrs.clone(),
            id,
            state.clone(),
            drain_end.clone(),
        )));
    }
    for w in watchers {
        w.await?;
    }
    Ok(())
}

/// Follows job `id` through failovers (re-watching on whichever coordinator leads) until it
/// finishes or the drain ends; records its outcome and when it finished.
async fn follow(
    addrs: Vec<String>,
    id: u64,
    state: Arc<Mutex<State>>,
    drain_end: Arc<Mutex<Option<Instant>>>,
) {
    loop {
        let over = drain_end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|e| Instant::now() > e);
        if over {
            return;
        }
        let Some((_, mut cl)) = leader(&addrs).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let last = match client::watch(&mut cl, id, |_| {}).await {
            Ok(p) => p,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let outcome = match last.phase() {
            JobPhase::Done => {
                match tokio::time::timeout(Duration::from_secs(30), client::result(&mut cl, id))
                    .await
                {
                    Ok(Ok(r)) => Outcome::Done(r),
                    _ => continue,
                }
            }
            JobPhase::Failed | JobPhase::Cancelled => {
                Outcome::Ended(format!("{:?}: {}", last.phase(), last.message))
            }
            // The stream ended early (the coordinator stepped down): watch again.
            _ => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut s = lock(&state);
        s.finished_at.push(Instant::now());
        if let Some(j) = s.jobs.iter_mut().find(|j| j.id == id) {
            j.outcome = Some(outcome);
        }
        return;
    }
}
