//! `ringmoe forward`: logits for every position of `input_ids`, in one process or over a group of
//! workers — the sequence sharded over P of them (ring attention), the experts spread over all of
//! them by a placement (expert parallelism) — as in-process threads, or OS processes over TCP on
//! 127.0.0.1. The output file is the same either way: the user-visible check that sharding and
//! placement compute the same function.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::{Args, ValueEnum};
use ringmoe_comm::local::on_every_rank;
use ringmoe_comm::{Communicator, Data, Kind, Payload, Tag, TcpOptions, in_process, launch};
use ringmoe_core::sparse::{AShape, VsConfig};
use ringmoe_model::{Checkpoint, ExpertSelection, LoadOptions, LogitsFor, Model, ModelConfig};
use ringmoe_parallel::{
    AttentionMode, ExpertParallel, JobOptions, LoadSnapshot, LoadTracker, MoeStats, Placement,
    RingStats, ShardPlan, Sharding, prefill_shard_with,
};

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

/// Expert parallelism: how many workers and how the experts are spread over them.
#[derive(Args, Clone, Debug)]
pub struct ExpertOpts {
    /// Workers in the group; each hosts the experts the placement gives it and, if it is one of
    /// the first --seq-shards, a shard of the sequence. Default: --seq-shards (no expert
    /// parallelism unless --placement is given).
    #[arg(long)]
    workers: Option<usize>,
    /// contiguous, round-robin, or a placement JSON file (as `Placement::to_json` writes).
    #[arg(long)]
    placement: Option<String>,
    /// Replicate the K most loaded experts of every layer (load measured by a first pass over
    /// the same input), then compute with the new placement.
    #[arg(long, default_value_t = 0)]
    replicate_hot: usize,
    /// Drop routed rows past ⌈F · tokens · top_k / experts⌉ per expert and rank (default: dropless).
    #[arg(long)]
    capacity_factor: Option<f32>,
    /// Two-batch overlap of the expert all-to-all with expert compute.
    #[arg(long)]
    overlap: bool,
}

impl ExpertOpts {
    fn enabled(&self) -> bool {
        self.workers.is_some()
            || self.placement.is_some()
            || self.replicate_hot > 0
            || self.capacity_factor.is_some()
            || self.overlap
    }

    /// The placement named on the command line, for `world` workers.
    fn placement(&self, cfg: &ModelConfig, world: usize) -> Result<Placement> {
        let (layers, n) = (cfg.num_layers, cfg.moe.num_experts);
        let p = match self.placement.as_deref().unwrap_or("contiguous") {
            "contiguous" => Placement::contiguous(layers, n, world)?,
            "round-robin" => Placement::round_robin(layers, n, world)?,
            file => Placement::load(Path::new(file))?,
        };
        p.check_shape(cfg.num_layers, cfg.moe.num_experts, world)?;
        Ok(p)
    }

    /// The expert-parallel settings of this command line with `placement`.
    fn parallel(&self, placement: Placement) -> ExpertParallel {
        ExpertParallel {
            capacity_factor: self.capacity_factor,
            overlap: self.overlap,
            ..ExpertParallel::new(placement)
        }
    }

    /// `placement` with the --replicate-hot experts of the calibration pass's `load` replicated.
    fn replicate(
        &self,
        cfg: &ModelConfig,
        placement: &Placement,
        load: &LoadSnapshot,
        report: bool,
    ) -> Result<Placement> {
        let w = placement.workers;
        if report {
            eprintln!(
                "calibration pass: rows per worker {:?}, max/mean {:.2}",
                load.per_worker(w),
                load.imbalance(w)
            );
        }
        let per_expert = load.per_expert(cfg.num_layers, cfg.moe.num_experts);
        Ok(placement.replicate_hot(&per_expert, self.replicate_hot)?)
    }

    fn to_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(w) = self.workers {
            v.extend(["--workers".to_string(), w.to_string()]);
        }
        if let Some(p) = &self.placement {
            v.extend(["--placement".to_string(), p.clone()]);
        }
        v.extend([
            "--replicate-hot".to_string(),
            self.replicate_hot.to_string(),
        ]);
        if let Some(f) = self.capacity_factor {
            v.extend(["--capacity-factor".to_string(), f.to_string()]);
        }
        if self.overlap {
            v.push("--overlap".into());
        }
        v
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
    #[command(flatten)]
    experts: ExpertOpts,
    #[command(flatten)]
    weights: crate::WeightsOpts,
}

impl ForwardJob {
    fn world(&self) -> usize {
        self.experts.workers.unwrap_or(self.seq_shards)
    }

    fn check(&self) -> Result<()> {
        ensure!(self.seq_shards >= 1, "--seq-shards must be at least 1");
        ensure!(
            self.seq_shards <= self.world(),
            "--seq-shards {} is more than --workers {}",
            self.seq_shards,
            self.world()
        );
        Ok(())
    }

    fn plan(&self, len: usize) -> Result<ShardPlan> {
        Ok(ShardPlan::with_active(
            len,
            self.world(),
            self.seq_shards,
            self.sharding.into(),
        )?)
    }
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

fn load(model: &Path, input_ids: &Path, weights: crate::WeightsOpts) -> Result<(Model, Vec<u32>)> {
    let opts = LoadOptions {
        weights: weights.weights,
        ..LoadOptions::default()
    };
    let m = Model::load(model, &opts)
        .with_context(|| format!("loading model from {}", model.display()))?;
    let ids = read_input_ids(input_ids)?;
    ensure!(!ids.is_empty(), "input_ids is empty");
    m.check_tokens(&ids)?;
    Ok((m, ids))
}

/// What one rank computed: its logits rows (its positions, in order) and its figures.
struct RankOut {
    rows: Vec<f32>,
    attention: RingStats,
    moe: MoeStats,
}

/// This rank's prefill and logits.
fn rank_logits(
    model: &Model,
    comm: &Communicator,
    plan: &ShardPlan,
    ids: &[u32],
    attention: AttentionMode,
    experts: Option<&ExpertParallel>,
) -> Result<RankOut> {
    let job = JobOptions {
        id: 1,
        attention,
        piece_rows: 0,
    };
    let mine = plan.tokens_for(comm.rank(), ids)?;
    let out = prefill_shard_with(model, comm, plan, &mine, job, experts)?;
    Ok(RankOut {
        rows: model.logits(&out.hidden)?.into_vec(),
        attention: out.attention,
        moe: out.moe,
    })
}

/// The model `worker` loads: the dense weights and the experts `placement` gives it.
fn load_worker(
    dir: &Path,
    placement: Option<&Placement>,
    worker: usize,
    weights: crate::WeightsOpts,
) -> Result<Model> {
    let opts = LoadOptions {
        experts: placement.map_or(ExpertSelection::All, |p| p.selection(worker)),
        weights: weights.weights,
    };
    Model::load(dir, &opts).with_context(|| format!("loading model from {}", dir.display()))
}

/// One line on stderr about the expert all-to-all and the load of each worker.
fn report_experts(placement: &Placement, per_rank: &[MoeStats], load: &LoadSnapshot) {
    let mut t = MoeStats::default();
    per_rank.iter().for_each(|s| t.add(s));
    let per_worker = load.per_worker(placement.workers);
    eprintln!(
        "experts: placement version {} over {} workers; {} of {} routed rows computed on another \
         worker, {:.2} MiB moved, {} dropped; rows per worker {per_worker:?}, max/mean {:.2}",
        placement.version,
        placement.workers,
        t.rows_remote,
        t.slots,
        t.bytes_sent as f64 / (1 << 20) as f64,
        t.dropped,
        load.imbalance(placement.workers),
    );
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
    a.check()?;
    let mode = a.attention.mode();
    let world = a.world();
    match transport {
        Transport::Inproc if world == 1 && mode == AttentionMode::Dense && !a.experts.enabled() => {
            let (model, ids) = load(&a.model, &a.input_ids, a.weights)?;
            let out = model.forward(&ids, &mut model.new_cache(), LogitsFor::All)?;
            write_logits(
                &a.out,
                out.logits.as_slice(),
                ids.len(),
                model.config.vocab_size,
            )
        }
        Transport::Inproc => {
            let ids = read_input_ids(&a.input_ids)?;
            ensure!(!ids.is_empty(), "input_ids is empty");
            let plan = a.plan(ids.len())?;
            let comms = in_process(world, Duration::from_secs(600));
            let (models, ep) = if a.experts.enabled() {
                let cfg = ModelConfig::from_dir(&a.model)?;
                let mut placement = a.experts.placement(&cfg, world)?;
                if a.experts.replicate_hot > 0 {
                    let load = Arc::new(LoadTracker::default());
                    let models = (0..world)
                        .map(|w| load_worker(&a.model, Some(&placement), w, a.weights))
                        .collect::<Result<Vec<_>>>()?;
                    models[0].check_tokens(&ids)?;
                    let ep = ExpertParallel {
                        load: load.clone(),
                        ..ExpertParallel::new(placement.clone())
                    };
                    on_every_rank(&comms, |c| {
                        rank_logits(&models[c.rank()], c, &plan, &ids, mode, Some(&ep))
                    })
                    .into_iter()
                    .collect::<Result<Vec<_>>>()?;
                    placement = a
                        .experts
                        .replicate(&cfg, &placement, &load.snapshot(), true)?;
                }
                let ep = a.experts.parallel(placement);
                let models = (0..world)
                    .map(|w| load_worker(&a.model, Some(&ep.placement), w, a.weights))
                    .collect::<Result<Vec<_>>>()?;
                (models, Some(ep))
            } else {
                (vec![load_worker(&a.model, None, 0, a.weights)?], None)
            };
            models[0].check_tokens(&ids)?;
            let model_of = |r: usize| &models[r.min(models.len() - 1)];
            let outs = on_every_rank(&comms, |c| {
                rank_logits(model_of(c.rank()), c, &plan, &ids, mode, ep.as_ref())
            })
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
            let stats: Vec<RingStats> = outs.iter().map(|o| o.attention).collect();
            report_attention(&models[0], ids.len(), &stats);
            if let Some(ep) = &ep {
                let moe: Vec<MoeStats> = outs.iter().map(|o| o.moe).collect();
                report_experts(&ep.placement, &moe, &ep.load.snapshot());
            }
            let vocab = models[0].config.vocab_size;
            let rows: Vec<Vec<f32>> = outs.into_iter().map(|o| o.rows).collect();
            write_logits(&a.out, &plan.unshard_rows(&rows, vocab)?, ids.len(), vocab)
        }
        Transport::Tcp => {
            let exe = std::env::current_exe()?;
            let path = |p: &Path| p.to_string_lossy().into_owned();
            let sharding = format!("{:?}", a.sharding).to_lowercase();
            let ranks = launch::spawn_ranks(&exe, world, |r| {
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
                    a.seq_shards.to_string(),
                    "--sharding".into(),
                    sharding.clone(),
                ];
                args.extend(a.attention.to_args());
                args.extend(a.weights.to_args());
                if a.experts.enabled() {
                    args.extend(a.experts.to_args());
                }
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

/// Every rank's load snapshot, merged (the same on every rank).
fn gather_load(comm: &Communicator, tag: Tag, load: &LoadTracker) -> Result<LoadSnapshot> {
    let mine = load.snapshot().to_i64();
    let n = mine.len();
    let mut all = LoadSnapshot::default();
    for (r, p) in comm
        .all_gather(
            tag,
            Payload {
                shape: vec![n],
                data: Data::I64(mine),
            },
        )?
        .into_iter()
        .enumerate()
    {
        let snap = match &p.data {
            Data::I64(v) => LoadSnapshot::from_i64(v),
            _ => None,
        }
        .with_context(|| format!("rank {r} sent a malformed load snapshot: {}", p.describe()))?;
        all.merge(&snap);
    }
    Ok(all)
}

pub fn run_rank(args: ForwardRankArgs) -> Result<()> {
    let (a, rank) = (args.job, args.rank);
    a.check()?;
    let world = a.world();
    let comm = launch::join_tcp(rank, &TcpOptions::default(), Duration::from_secs(600))?;
    let ids = read_input_ids(&a.input_ids)?;
    ensure!(!ids.is_empty(), "input_ids is empty");
    let plan = a.plan(ids.len())?;
    let mode = a.attention.mode();
    let ep = if a.experts.enabled() {
        let cfg = ModelConfig::from_dir(&a.model)?;
        let mut placement = a.experts.placement(&cfg, world)?;
        if a.experts.replicate_hot > 0 {
            // Every rank measures, gathers the same totals and derives the same new placement.
            let model = load_worker(&a.model, Some(&placement), rank, a.weights)?;
            model.check_tokens(&ids)?;
            let ep = ExpertParallel::new(placement.clone());
            rank_logits(&model, &comm, &plan, &ids, mode, Some(&ep))?;
            let snap = gather_load(&comm, Tag::new(1, u32::MAX, 2, Kind::AllGather), &ep.load)?;
            placement = a.experts.replicate(&cfg, &placement, &snap, rank == 0)?;
        }
        Some(a.experts.parallel(placement))
    } else {
        None
    };
    let model = load_worker(&a.model, ep.as_ref().map(|e| &e.placement), rank, a.weights)?;
    model.check_tokens(&ids)?;
    let out = rank_logits(&model, &comm, &plan, &ids, mode, ep.as_ref())?;
    let vocab = model.config.vocab_size;
    let tag = Tag::new(1, u32::MAX, 0, Kind::Data);
    let (s, m) = (out.attention, out.moe);
    let figures = vec![
        s.pairs_scored as i64,
        s.bytes_sent as i64,
        s.estimate_secs.to_bits() as i64,
        m.slots as i64,
        m.rows_remote as i64,
        m.dropped as i64,
        m.bytes_sent as i64,
    ];
    let gathered = comm.all_gather(
        Tag::new(1, u32::MAX, 1, Kind::AllGather),
        Payload {
            shape: vec![figures.len()],
            data: Data::I64(figures),
        },
    )?;
    let load = match &ep {
        Some(ep) => Some(gather_load(
            &comm,
            Tag::new(1, u32::MAX, 3, Kind::AllGather),
            &ep.load,
        )?),
        None => None,
    };
    if rank == 0 {
        let (per_rank, moe): (Vec<RingStats>, Vec<MoeStats>) = gathered
            .iter()
            .filter_map(|p| match &p.data {
                Data::I64(v) if v.len() == 7 => Some((
                    RingStats {
                        pairs_scored: v[0] as u64,
                        bytes_sent: v[1] as u64,
                        estimate_secs: f64::from_bits(v[2] as u64),
                        ..RingStats::default()
                    },
                    MoeStats {
                        slots: v[3] as u64,
                        rows_remote: v[4] as u64,
                        dropped: v[5] as u64,
                        bytes_sent: v[6] as u64,
                        ..MoeStats::default()
                    },
                )),
                _ => None,
            })
            .unzip();
        report_attention(&model, ids.len(), &per_rank);
        if let (Some(ep), Some(load)) = (&ep, &load) {
            report_experts(&ep.placement, &moe, load);
        }
        let mut per_rank = vec![out.rows];
        for r in 1..world {
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
        let rows = out.rows;
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
