//! `ringmoe eval niah`: needle-in-a-haystack recall over context lengths and needle depths, in
//! one process or through a cluster, as Gemini 1.5 measures long context.
//!
//! The task comes from a `needle.json` (`scripts/train_needle.py` writes the needle model's):
//! `{"bos": ID or null, "haystack": [LO, HI], "markers": [ID, ...], "values": [LO, HI],
//! "max_len": N}`. A case of length `L` at depth `d` is: the optional BOS, haystack tokens drawn
//! uniformly from `[LO, HI)`, a marker `m` from `markers` and a value `v` from `[values)` with the
//! marker at position `round(d · (L − 3))` after the BOS (ties to even, as Python's `round`;
//! clamped so the value fits), and the marker alone at the end; `L` counts every token. The
//! answer is right when the first greedy token is `v`. Cases come from SplitMix64 seeded by
//! `--seed`, the length, the depth's index and the trial, in the order marker, value, haystack.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ringmoe_comm::in_process;
use ringmoe_model::Model;
use ringmoe_parallel::{AttentionMode, JobOptions, ShardPlan, ShardedSequence, Sharding};
use ringmoe_proto::client::{self, Input, JobResult};
use ringmoe_proto::proto;
use serde_json::{Value, json};

use crate::WeightsOpts;
use crate::cluster_cmd::runtime;
use crate::forward::{AttentionArg, PatternOpts};
use crate::security_opts::ClientTokenOpts;

#[derive(Subcommand, Debug)]
pub enum EvalCmd {
    /// Needle-in-a-haystack recall by context length and needle depth: results.json, the
    /// heatmap niah.png and a summary line per length.
    Niah(NiahArgs),
    /// Per-token NLL of one long input by position (bucketed, cumulative), nll.json and the
    /// log-log nll.png; `--synthetic L` repeats a segment across the whole length.
    Nll(crate::eval_nll::NllArgs),
}

pub fn run(cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Niah(a) => niah(a),
        EvalCmd::Nll(a) => crate::eval_nll::run(a),
    }
}

/// Where an evaluation runs, and how its prefill attends: the flags `eval niah` and `eval nll`
/// share.
#[derive(Args, Debug)]
pub struct EvalTarget {
    /// A model directory, run in this process.
    #[arg(long, conflicts_with = "addr", required_unless_present = "addr")]
    pub model: Option<PathBuf>,
    /// A coordinator: the work goes to it as jobs over gRPC.
    #[arg(long)]
    pub addr: Option<String>,
    /// With --addr: the coordinator's model to run (default: its only one).
    #[arg(long, requires = "addr")]
    pub model_name: Option<String>,
    /// Prefill attention (a model's sliding-window layers keep their window whatever this says).
    #[arg(long, value_enum, default_value = "dense")]
    pub attention: AttentionArg,
    #[command(flatten)]
    pub pattern: PatternOpts,
    #[command(flatten)]
    pub weights: WeightsOpts,
    #[command(flatten)]
    pub token: ClientTokenOpts,
}

impl EvalTarget {
    /// The job's attention mode on the wire.
    pub fn proto_attention(&self) -> proto::AttentionMode {
        match self.attention {
            AttentionArg::Dense => proto::AttentionMode::Dense,
            AttentionArg::AShape => proto::AttentionMode::AShape,
            AttentionArg::VerticalSlash => proto::AttentionMode::VerticalSlash,
        }
    }

    /// A client of the coordinator at `addr` and the model to run there.
    pub async fn connect(&self, addr: &str) -> Result<(client::Client, String)> {
        let token = self.token.token()?;
        let mut c = client::connect_as(addr, 256 << 20, token.as_deref()).await?;
        let model =
            crate::submit_cmd::model_to_run(&mut c, self.model_name.as_deref(), "--model-name")
                .await?;
        Ok((c, model))
    }
}

/// Submits `tokens` as a job of `spec` and waits for its result.
pub async fn run_job(
    c: &mut client::Client,
    spec: proto::JobSpec,
    tokens: &[u32],
) -> Result<JobResult> {
    let ack = client::submit(
        c,
        spec,
        Input::Tokens(tokens.to_vec()),
        client::UPLOAD_CHUNK,
        |_| {},
    )
    .await
    .map_err(|s| anyhow::anyhow!("submitting: {:?}: {}", s.code(), s.message()))?;
    client::result(c, ack.job_id)
        .await
        .map_err(|s| anyhow::anyhow!("job {}: {:?}: {}", ack.job_id, s.code(), s.message()))
}

#[derive(Args, Debug)]
pub struct NiahArgs {
    #[command(flatten)]
    target: EvalTarget,
    /// The task (needle.json); default: the model directory's.
    #[arg(long)]
    task: Option<PathBuf>,
    /// Context lengths, with K = 1024 and M = 1024²: `1K,4K,16K,64K,256K,1M`.
    #[arg(long, default_value = "1K,4K,16K,64K,256K,1M", value_delimiter = ',')]
    lengths: Vec<String>,
    /// Needle depths in [0, 1].
    #[arg(
        long,
        default_value = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
        value_delimiter = ','
    )]
    depths: Vec<f64>,
    /// Cases per length and depth.
    #[arg(long, default_value_t = 5)]
    trials: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where results.json and niah.png go.
    #[arg(long, default_value = "niah")]
    out: PathBuf,
}

/// `needle.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub bos: Option<u32>,
    pub haystack: (u32, u32),
    pub markers: Vec<u32>,
    pub values: (u32, u32),
    pub max_len: usize,
}

impl Task {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the task {}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        Self::from_json(&v).with_context(|| format!("the task {}", path.display()))
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let id = |x: &Value, what: &str| -> Result<u32> {
            x.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .with_context(|| format!("{what}: expected a token id, got {x}"))
        };
        let range = |key: &str| -> Result<(u32, u32)> {
            match v.get(key).and_then(Value::as_array).map(Vec::as_slice) {
                Some([lo, hi]) => {
                    let (lo, hi) = (id(lo, key)?, id(hi, key)?);
                    ensure!(lo < hi, "{key}: [{lo}, {hi}) is empty");
                    Ok((lo, hi))
                }
                _ => bail!("{key}: expected [LO, HI]"),
            }
        };
        let bos = match v.get("bos") {
            None | Some(Value::Null) => None,
            Some(x) => Some(id(x, "bos")?),
        };
        let markers = v
            .get("markers")
            .and_then(Value::as_array)
            .context("markers: expected a list of token ids")?
            .iter()
            .map(|x| id(x, "markers"))
            .collect::<Result<Vec<_>>>()?;
        ensure!(!markers.is_empty(), "markers: the list is empty");
        let max_len = v
            .get("max_len")
            .and_then(Value::as_u64)
            .context("max_len: expected a positive integer")? as usize;
        Ok(Self {
            bos,
            haystack: range("haystack")?,
            markers,
            values: range("values")?,
            max_len,
        })
    }

    /// Every id the task uses is below `vocab`.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        let top = [self.haystack.1, self.values.1]
            .into_iter()
            .map(|x| x as usize)
            .chain(
                self.markers
                    .iter()
                    .chain(&self.bos)
                    .map(|&x| x as usize + 1),
            )
            .max()
            .unwrap_or(0);
        ensure!(
            top <= vocab,
            "the task uses token ids up to {} but the model's vocabulary has {vocab}",
            top - 1
        );
        Ok(())
    }

    /// The case of `len` tokens with the needle at `depth`, and its answer.
    pub fn case(&self, len: usize, depth: f64, rng: &mut SplitMix64) -> Result<(Vec<u32>, u32)> {
        let head = usize::from(self.bos.is_some());
        ensure!(
            len >= head + 3,
            "a case needs at least {} tokens, got {len}",
            head + 3
        );
        ensure!(
            (0.0..=1.0).contains(&depth),
            "depth {depth} is not in [0, 1]"
        );
        let m = self.markers[rng.below(self.markers.len() as u64) as usize];
        let v = self.values.0 + rng.below(u64::from(self.values.1 - self.values.0)) as u32;
        let span = u64::from(self.haystack.1 - self.haystack.0);
        let mut t = Vec::with_capacity(len);
        t.extend(self.bos);
        t.extend((head..len - 1).map(|_| self.haystack.0 + rng.below(span) as u32));
        let at = head + ((depth * (len - 3) as f64).round_ties_even() as usize).min(len - 3 - head);
        t[at] = m;
        t[at + 1] = v;
        t.push(m);
        Ok((t, v))
    }
}

/// SplitMix64 (Steele, Lea and Flood): the cases' generator, simple enough to reimplement
/// anywhere.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (the modulo bias is below 2⁻³² for the ranges a task uses).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// The generator of one cell's trial: its seed mixes the run's seed with the length, the
    /// depth's index and the trial.
    pub fn for_case(seed: u64, len: usize, depth_index: usize, trial: usize) -> Self {
        let mut s = Self::new(seed);
        for x in [len as u64, depth_index as u64, trial as u64] {
            s.0 ^= s.next_u64() ^ x;
        }
        Self(s.next_u64())
    }
}

/// `1K` = 1024, `1M` = 1024², or a plain number.
pub fn parse_length(s: &str) -> Result<usize> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    let n: usize = num
        .parse()
        .with_context(|| format!("length {s:?}: want a number, optionally with K or M"))?;
    Ok(n * mult)
}

fn show_length(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{}K", n >> 10)
    } else {
        n.to_string()
    }
}

/// Where the cases run.
enum Runner {
    Local(Box<Model>, AttentionMode),
    Cluster(Box<ClusterRunner>),
}

/// Generate jobs through a coordinator.
struct ClusterRunner {
    rt: tokio::runtime::Runtime,
    client: client::Client,
    model: String,
    attention: proto::AttentionMode,
}

impl Runner {
    /// The first greedy token after `tokens`.
    fn answer(&mut self, tokens: &[u32], id: u64) -> Result<u32> {
        match self {
            Self::Local(model, attention) => {
                let comm = in_process(1, Duration::from_secs(3600));
                let plan = ShardPlan::new(tokens.len(), 1, Sharding::Zigzag)?;
                let job = JobOptions {
                    id,
                    attention: *attention,
                    piece_rows: 0,
                };
                let (_, logits) = ShardedSequence::prefill(model, &comm[0], &plan, tokens, job)?;
                Ok(argmax(&logits))
            }
            Self::Cluster(c) => c.rt.block_on(async {
                let (client, model, attention) = (&mut c.client, &c.model, c.attention);
                let spec = proto::JobSpec {
                    model: model.clone(),
                    mode: proto::JobMode::Generate as i32,
                    max_new_tokens: 1,
                    sampling: Some(proto::Sampling {
                        temperature: 0.0,
                        top_p: 1.0,
                        seed: 0,
                    }),
                    attention: attention as i32,
                    priority: 0,
                    input_length: 0,
                };
                match run_job(client, spec, tokens).await? {
                    JobResult::Tokens(t) => t.first().copied().context("the job generated nothing"),
                    JobResult::Scores(_) => bail!("the job returned scores"),
                }
            }),
        }
    }
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn niah(a: NiahArgs) -> Result<()> {
    let lengths = a
        .lengths
        .iter()
        .map(|s| parse_length(s))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        !lengths.is_empty() && !a.depths.is_empty(),
        "no lengths or no depths"
    );
    ensure!(a.trials > 0, "--trials must be at least 1");
    for &d in &a.depths {
        ensure!((0.0..=1.0).contains(&d), "--depths: {d} is not in [0, 1]");
    }
    let task_path = match (&a.task, &a.target.model) {
        (Some(t), _) => t.clone(),
        (None, Some(m)) => m.join("needle.json"),
        (None, None) => bail!("--task is needed with --addr (the model's needle.json)"),
    };
    let task = Task::read(&task_path)?;
    for &l in &lengths {
        if l > task.max_len {
            eprintln!(
                "warning: length {l} is beyond the task's max_len {}",
                task.max_len
            );
        }
    }
    let t = &a.target;
    let mut runner = match (&t.model, &t.addr) {
        (Some(dir), _) => {
            let (model, _) = crate::load_model(dir, t.weights)?;
            task.check_vocab(model.config.vocab_size)?;
            Runner::Local(Box::new(model), t.pattern.mode(t.attention))
        }
        (None, Some(addr)) => {
            let rt = runtime()?;
            let (client, model) = rt.block_on(t.connect(addr))?;
            let attention = t.proto_attention();
            Runner::Cluster(Box::new(ClusterRunner {
                rt,
                client,
                model,
                attention,
            }))
        }
        (None, None) => bail!("--model or --addr"),
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let total = (lengths.len() * a.depths.len() * a.trials) as u64;
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} cases {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut cells = Vec::new();
    let mut recall = vec![vec![0.0; lengths.len()]; a.depths.len()];
    let mut id = 0u64;
    for (li, &len) in lengths.iter().enumerate() {
        let (mut hits_l, mut n_l, mut secs_l) = (0usize, 0usize, 0f64);
        for (di, &depth) in a.depths.iter().enumerate() {
            let (mut answers, mut expected) = (Vec::new(), Vec::new());
            let t = Instant::now();
            for trial in 0..a.trials {
                bar.set_message(format!("L={} depth {depth}", show_length(len)));
                let mut rng = SplitMix64::for_case(a.seed, len, di, trial);
                let (tokens, v) = task.case(len, depth, &mut rng)?;
                id += 1;
                answers.push(runner.answer(&tokens, id)?);
                expected.push(v);
                bar.inc(1);
            }
            let secs = t.elapsed().as_secs_f64();
            let hits = answers
                .iter()
                .zip(&expected)
                .filter(|(a, b)| a == b)
                .count();
            recall[di][li] = hits as f64 / a.trials as f64;
            hits_l += hits;
            n_l += a.trials;
            secs_l += secs;
            cells.push(json!({
                "length": len, "depth": depth, "trials": a.trials, "hits": hits,
                "answers": answers, "expected": expected, "wall_secs": secs,
                "tokens_per_sec": (len * a.trials) as f64 / secs.max(1e-9),
            }));
        }
        let line = format!(
            "L={:>5}: recall {hits_l}/{n_l} ({:.1}%), {:.1} s, {:.0} tokens/s",
            show_length(len),
            100.0 * hits_l as f64 / n_l as f64,
            secs_l,
            (len * n_l) as f64 / secs_l.max(1e-9)
        );
        bar.suspend(|| println!("{line}"));
    }
    bar.finish_and_clear();
    let results = json!({
        "task": task_path.display().to_string(),
        "model": a.target.model.as_ref().map(|m| m.display().to_string()),
        "addr": a.target.addr,
        "attention": format!("{:?}", a.target.attention),
        "seed": a.seed,
        "cells": cells,
    });
    let path = a.out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let png = crate::heatmap::render(
        &lengths.iter().map(|&l| show_length(l)).collect::<Vec<_>>(),
        &a.depths.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        &recall,
        "NEEDLE RECALL (%)",
        &format!(
            "{} TRIALS PER CELL, SEED {}, {:?} ATTENTION",
            a.trials, a.seed, a.target.attention
        ),
    );
    let img = a.out.join("niah.png");
    std::fs::write(&img, png).with_context(|| format!("writing {}", img.display()))?;
    println!("wrote {} and {}", path.display(), img.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        Task::from_json(
            &json!({"bos": null, "haystack": [64, 256], "markers": [2, 3],
            "values": [8, 64], "max_len": 1048576}),
        )
        .unwrap()
    }

    #[test]
    fn a_case_follows_the_documented_layout() {
        let t = task();
        for (len, depth, at) in [(10, 0.0, 0), (10, 1.0, 7), (10, 0.5, 4), (1000, 0.37, 369)] {
            let (c, v) = t.case(len, depth, &mut SplitMix64::new(7)).unwrap();
            assert_eq!(c.len(), len);
            let m = c[len - 1];
            assert!(t.markers.contains(&m));
            assert_eq!((c[at], c[at + 1]), (m, v), "len {len} depth {depth}");
            assert!((8..64).contains(&v));
            let others = c[..len - 1]
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != at && i != at + 1);
            for (_, &x) in others {
                assert!((64..256).contains(&x));
            }
        }
        // round(0.5 · 7) = 4 (ties to even, as Python); with a BOS the needle moves one on and
        // depth 1 is clamped so the value fits.
        let mut b = t.clone();
        b.bos = Some(1);
        let (c, v) = b.case(10, 1.0, &mut SplitMix64::new(1)).unwrap();
        assert_eq!((c[0], c[7], c[8], c[9]), (1, c[9], v, c[9]));
        assert!(t.case(2, 0.5, &mut SplitMix64::new(1)).is_err());
    }

    #[test]
    fn cases_are_reproducible_and_differ_by_cell() {
        let t = task();
        let c = |s, l, d, k| {
            t.case(l, 0.5, &mut SplitMix64::for_case(s, l, d, k))
                .unwrap()
        };
        assert_eq!(c(1, 100, 2, 3), c(1, 100, 2, 3));
        assert_ne!(c(1, 100, 2, 3), c(2, 100, 2, 3));
        assert_ne!(c(1, 100, 2, 3), c(1, 100, 1, 3));
        assert_ne!(c(1, 100, 2, 3), c(1, 100, 2, 4));
        // SplitMix64's published first output for seed 0.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn tasks_and_lengths_are_checked() {
        assert_eq!(parse_length("1K").unwrap(), 1024);
        assert_eq!(parse_length("1M").unwrap(), 1 << 20);
        assert_eq!(parse_length("300").unwrap(), 300);
        assert!(parse_length("big").is_err());
        assert_eq!(show_length(256 << 10), "256K");
        let bad = |v: Value| Task::from_json(&v).unwrap_err().to_string();
        assert!(
            bad(json!({"haystack": [5, 5], "markers": [1], "values": [1, 2], "max_len": 9}))
                .contains("haystack")
        );
        assert!(
            bad(json!({"haystack": [5, 9], "markers": [], "values": [1, 2], "max_len": 9}))
                .contains("markers")
        );
        assert!(
            task()
                .check_vocab(200)
                .unwrap_err()
                .to_string()
                .contains("255")
        );
        task().check_vocab(256).unwrap();
    }
}
