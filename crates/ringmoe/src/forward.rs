//! `ringmoe forward`: logits for every position of `input_ids`, in one process or with the sequence
//! sharded over P ranks (ring attention) — in-process threads, or OS processes over TCP on
//! 127.0.0.1. The output file is the same either way: the user-visible check that sharding
//! computes the same function.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::{Args, ValueEnum};
use ringmoe_comm::local::on_every_rank;
use ringmoe_comm::{Communicator, Data, Kind, Payload, Tag, TcpOptions, in_process, launch};
use ringmoe_core::sparse::{AShape, VsConfig};
use ringmoe_model::{Checkpoint, LoadOptions, LogitsFor, Model};
use ringmoe_parallel::{AttentionMode, JobOptions, RingStats, ShardPlan, Sharding, prefill_shard};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Inproc,
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ShardingArg {
    Zigzag,
    Contiguous,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttentionArg {
    Dense,
    /// Sinks plus a local window (StreamingLLM / MInference's A-shape).
    AShape,
    /// Per-head vertical columns and diagonals estimated from the last queries (MInference).
    VerticalSlash,
}

/// Settings of the sparse patterns (defaults: MInference's, sized for 128K+ contexts).
#[derive(Args, Clone, Debug)]
pub struct PatternOpts {
    /// a-shape and vertical-slash: keys at positions below this are always attended to.
    #[arg(long)]
    sink: Option<usize>,
    /// a-shape: window of keys ending at the query; vertical-slash: diagonals always kept.
    #[arg(long)]
    local: Option<usize>,
    /// vertical-slash: columns kept per head.
    #[arg(long)]
    vertical: Option<usize>,
    /// vertical-slash: diagonals kept per head.
    #[arg(long)]
    slash: Option<usize>,
    /// vertical-slash: last queries used to estimate the pattern.
    #[arg(long)]
    last_q: Option<usize>,
}

impl PatternOpts {
    pub fn mode(&self, which: AttentionArg) -> AttentionMode {
        match which {
            AttentionArg::Dense => AttentionMode::Dense,
            AttentionArg::AShape => {
                let d = AShape::default();
                AttentionMode::AShape(AShape {
                    sink: self.sink.unwrap_or(d.sink),
                    local: self.local.unwrap_or(d.local),
                })
            }
            AttentionArg::VerticalSlash => {
                let d = VsConfig::default();
                AttentionMode::VerticalSlash(VsConfig {
                    last_q: self.last_q.unwrap_or(d.last_q),
                    vertical: self.vertical.unwrap_or(d.vertical),
                    slash: self.slash.unwrap_or(d.slash),
                    sink: self.sink.unwrap_or(d.sink),
                    local: self.local.unwrap_or(d.local),
                })
            }
        }
    }

    /// The same settings as command-line arguments, for the rank processes.
    fn to_args(&self) -> Vec<String> {
        let named = [
            ("--sink", self.sink),
            ("--local", self.local),
            ("--vertical", self.vertical),
            ("--slash", self.slash),
            ("--last-q", self.last_q),
        ];
        named
            .into_iter()
            .filter_map(|(flag, val)| val.map(|x| [flag.to_string(), x.to_string()]))
            .flatten()
            .collect()
    }
}

/// How prefill attends: dense (exact, the default) or a sparse pattern with its settings.
#[derive(Args, Clone, Debug)]
pub struct AttentionOpts {
    #[arg(long, value_enum, default_value = "dense")]
    attention: AttentionArg,
    #[command(flatten)]
    pattern: PatternOpts,
}

impl AttentionOpts {
    pub fn mode(&self) -> AttentionMode {
        self.pattern.mode(self.attention)
    }

    fn to_args(&self) -> Vec<String> {
        let name = self
            .attention
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        let mut v = vec!["--attention".to_string(), name];
        v.extend(self.pattern.to_args());
        v
    }
}

impl From<ShardingArg> for Sharding {
    fn from(s: ShardingArg) -> Self {
        match s {
            ShardingArg::Zigzag => Sharding::Zigzag,
            ShardingArg::Contiguous => Sharding::Contiguous,
        }
    }
}

/// What to compute; shared by `forward` and the hidden per-rank command it starts.
#[derive(Args, Clone)]
pub struct ForwardJob {
    #[arg(long)]
    model: PathBuf,
    /// safetensors file with an int64 tensor `input_ids` of shape [1, L].
    #[arg(long)]
    input_ids: PathBuf,
    /// Output safetensors file; gets f32 `logits` of shape [1, L, vocab].
    #[arg(long)]
    out: PathBuf,
    /// Ranks the sequence is sharded over (ring attention); 1 is the single-process engine.
    #[arg(long, default_value_t = 1)]
    seq_shards: usize,
    #[arg(long, value_enum, default_value = "zigzag")]
    sharding: ShardingArg,
    #[command(flatten)]
    attention: AttentionOpts,
}

#[derive(Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    job: ForwardJob,
    /// `tcp` runs one OS process per rank on 127.0.0.1.
    #[arg(long, value_enum, default_value = "inproc")]
    transport: Transport,
    /// A logits file from another run (or from transformers) to compare the output with: prints
    /// the largest and mean |Δ| and how often the top token agrees.
    #[arg(long)]
    compare: Option<PathBuf>,
}

/// One rank of `forward --transport tcp` (started by it; not for direct use).
#[derive(Args)]
pub struct ForwardRankArgs {
    #[command(flatten)]
    job: ForwardJob,
    #[arg(long)]
    rank: usize,
}

/// Reads `input_ids` ([1, L] int64) from a safetensors file.
pub fn read_input_ids(path: &Path) -> Result<Vec<u32>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let ckpt = Checkpoint::open_files(dir, &[path.to_path_buf()])?;
    let (vals, shape) = ckpt
        .load_i64("input_ids")
        .with_context(|| format!("reading input_ids from {}", path.display()))?;
    ensure!(
        shape.len() == 2 && shape[0] == 1,
        "input_ids must have shape [1, L], got {shape:?}"
    );
    vals.into_iter()
        .enumerate()
        .map(|(i, v)| {
            u32::try_from(v).with_context(|| format!("input_ids[0, {i}] = {v} is not a token id"))
        })
        .collect()
}

fn write_logits(path: &Path, logits: &[f32], len: usize, vocab: usize) -> Result<()> {
    let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, len, vocab], &bytes)?;
    safetensors::serialize_to_file([("logits", view)], None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote logits [1, {len}, {vocab}] to {}", path.display());
    Ok(())
}

fn load(model: &Path, input_ids: &Path) -> Result<(Model, Vec<u32>)> {
    let m = Model::load(model, &LoadOptions::default())
        .with_context(|| format!("loading model from {}", model.display()))?;
    let ids = read_input_ids(input_ids)?;
    ensure!(!ids.is_empty(), "input_ids is empty");
    m.check_tokens(&ids)?;
    Ok((m, ids))
}

/// This rank's logits rows (its positions, in order) and its attention figures.
fn rank_logits(
    model: &Model,
    comm: &Communicator,
    plan: &ShardPlan,
    ids: &[u32],
    attention: AttentionMode,
) -> Result<(Vec<f32>, RingStats)> {
    let job = JobOptions { id: 1, attention };
    let out = prefill_shard(model, comm, plan, &plan.tokens_for(comm.rank(), ids)?, job)?;
    Ok((model.logits(&out.hidden)?.into_vec(), out.attention))
}

/// One line on stderr: the attention work against causal attention's pairs, and what moved.
fn report_attention(model: &Model, len: usize, per_rank: &[RingStats]) {
    let mut total = RingStats::default();
    per_rank.iter().for_each(|s| total.add(s));
    let causal =
        (len * (len + 1) / 2) as f64 * model.config.num_heads as f64 * model.layers().len() as f64;
    eprintln!(
        "attention: {} (query, key) pairs scored = {:.4} of causal attention's {causal:.0}; \
         {:.2} MiB of K/V sent between ranks; pattern estimate {:.3} s",
        total.pairs_scored,
        total.pairs_scored as f64 / causal,
        total.bytes_sent as f64 / (1 << 20) as f64,
        total.estimate_secs,
    );
}

/// Prints how far the logits in `out` are from those in `reference` (same shape).
fn compare(out: &Path, reference: &Path) -> Result<()> {
    let read = |p: &Path| -> Result<(Vec<f32>, Vec<usize>)> {
        let dir = p.parent().unwrap_or(Path::new("."));
        let ck = Checkpoint::open_files(dir, &[p.to_path_buf()])?;
        let shape = ck
            .meta("logits")
            .with_context(|| format!("{} has no `logits`", p.display()))?
            .shape
            .clone();
        Ok((ck.load("logits", &shape)?.into_vec(), shape))
    };
    let (a, sa) = read(out)?;
    let (b, sb) = read(reference)?;
    ensure!(
        sa == sb,
        "logits shapes differ: {sa:?} vs {sb:?} in {}",
        reference.display()
    );
    let vocab = sa.last().copied().unwrap_or(1).max(1);
    let (mut max, mut sum) = (0f32, 0f64);
    for (x, y) in a.iter().zip(&b) {
        max = max.max((x - y).abs());
        sum += f64::from((x - y).abs());
    }
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |m, (i, &x)| if x > m.1 { (i, x) } else { m },
            )
            .0
    };
    let rows = a.len() / vocab;
    let same = a
        .chunks(vocab)
        .zip(b.chunks(vocab))
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    println!(
        "vs {}: max |Δ| {max:.3e}, mean |Δ| {:.3e}, top-1 agrees at {same}/{rows} positions",
        reference.display(),
        sum / a.len().max(1) as f64
    );
    Ok(())
}

pub fn run(args: ForwardArgs) -> Result<()> {
    let (out, reference) = (args.job.out.clone(), args.compare.clone());
    forward(args)?;
    match reference {
        Some(r) => compare(&out, &r),
        None => Ok(()),
    }
}

fn forward(args: ForwardArgs) -> Result<()> {
    let (a, transport) = (args.job, args.transport);
    ensure!(a.seq_shards >= 1, "--seq-shards must be at least 1");
    let mode = a.attention.mode();
    match (a.seq_shards, transport) {
        (1, Transport::Inproc) if mode == AttentionMode::Dense => {
            let (model, ids) = load(&a.model, &a.input_ids)?;
            let out = model.forward(&ids, &mut model.new_cache(), LogitsFor::All)?;
            write_logits(
                &a.out,
                out.logits.as_slice(),
                ids.len(),
                model.config.vocab_size,
            )
        }
        (p, Transport::Inproc) => {
            let (model, ids) = load(&a.model, &a.input_ids)?;
            let plan = ShardPlan::new(ids.len(), p, a.sharding.into())?;
            let comms = in_process(p, Duration::from_secs(600));
            let (per_rank, stats): (Vec<_>, Vec<_>) =
                on_every_rank(&comms, |c| rank_logits(&model, c, &plan, &ids, mode))
                    .into_iter()
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .unzip();
            report_attention(&model, ids.len(), &stats);
            let vocab = model.config.vocab_size;
            write_logits(
                &a.out,
                &plan.unshard_rows(&per_rank, vocab)?,
                ids.len(),
                vocab,
            )
        }
        (p, Transport::Tcp) => {
            let exe = std::env::current_exe()?;
            let path = |p: &Path| p.to_string_lossy().into_owned();
            let sharding = format!("{:?}", a.sharding).to_lowercase();
            let ranks = launch::spawn_ranks(&exe, p, |r| {
                let mut args = vec![
                    "forward-rank".into(),
                    "--model".into(),
                    path(&a.model),
                    "--input-ids".into(),
                    path(&a.input_ids),
                    "--out".into(),
                    path(&a.out),
                    "--rank".into(),
                    r.to_string(),
                    "--seq-shards".into(),
                    p.to_string(),
                    "--sharding".into(),
                    sharding.clone(),
                ];
                args.extend(a.attention.to_args());
                args
            })?;
            for (r, mut proc_) in ranks.into_iter().enumerate() {
                let status = proc_.child.wait()?;
                ensure!(
                    status.success(),
                    "rank {r} failed ({status}); its error is above"
                );
            }
            Ok(())
        }
    }
}

pub fn run_rank(args: ForwardRankArgs) -> Result<()> {
    let (a, rank) = (args.job, args.rank);
    let comm = launch::join_tcp(rank, &TcpOptions::default(), Duration::from_secs(600))?;
    let (model, ids) = load(&a.model, &a.input_ids)?;
    let plan = ShardPlan::new(ids.len(), a.seq_shards, a.sharding.into())?;
    let (rows, stats) = rank_logits(&model, &comm, &plan, &ids, a.attention.mode())?;
    let vocab = model.config.vocab_size;
    let tag = Tag::new(1, u32::MAX, 0, Kind::Data);
    let figures = vec![
        stats.pairs_scored as i64,
        stats.bytes_sent as i64,
        stats.estimate_secs.to_bits() as i64,
    ];
    let gathered = comm.all_gather(
        Tag::new(1, u32::MAX, 1, Kind::AllGather),
        Payload {
            shape: vec![3],
            data: Data::I64(figures),
        },
    )?;
    if rank == 0 {
        let per_rank: Vec<RingStats> = gathered
            .iter()
            .filter_map(|p| match &p.data {
                Data::I64(v) if v.len() == 3 => Some(RingStats {
                    pairs_scored: v[0] as u64,
                    bytes_sent: v[1] as u64,
                    estimate_secs: f64::from_bits(v[2] as u64),
                    ..RingStats::default()
                }),
                _ => None,
            })
            .collect();
        report_attention(&model, ids.len(), &per_rank);
        let mut per_rank = vec![rows];
        for r in 1..a.seq_shards {
            per_rank.push(
                comm.recv(r, tag)?
                    .into_f32()
                    .context("logits rows must be f32")?,
            );
        }
        write_logits(
            &a.out,
            &plan.unshard_rows(&per_rank, vocab)?,
            ids.len(),
            vocab,
        )?;
    } else {
        let n = rows.len() / vocab.max(1);
        comm.send(
            0,
            tag,
            Payload {
                shape: vec![n, vocab],
                data: Data::F32(rows),
            },
        )?;
    }
    Ok(())
}
