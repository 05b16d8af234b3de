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
use ringmoe_model::{Checkpoint, LoadOptions, LogitsFor, Model};
use ringmoe_parallel::{ShardPlan, Sharding, prefill_shard};

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
}

#[derive(Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    job: ForwardJob,
    /// `tcp` runs one OS process per rank on 127.0.0.1.
    #[arg(long, value_enum, default_value = "inproc")]
    transport: Transport,
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

/// This rank's logits rows (its positions, in order).
fn rank_logits(
    model: &Model,
    comm: &Communicator,
    plan: &ShardPlan,
    ids: &[u32],
) -> Result<Vec<f32>> {
    let out = prefill_shard(model, comm, plan, &plan.tokens_for(comm.rank(), ids)?, 1)?;
    Ok(model.logits(&out.hidden)?.into_vec())
}

pub fn run(args: ForwardArgs) -> Result<()> {
    let (a, transport) = (args.job, args.transport);
    ensure!(a.seq_shards >= 1, "--seq-shards must be at least 1");
    match (a.seq_shards, transport) {
        (1, Transport::Inproc) => {
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
            let per_rank = on_every_rank(&comms, |c| rank_logits(&model, c, &plan, &ids))
                .into_iter()
                .collect::<Result<Vec<_>>>()?;
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
                vec![
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
                ]
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
    let rows = rank_logits(&model, &comm, &plan, &ids)?;
    let vocab = model.config.vocab_size;
    let tag = Tag::new(1, u32::MAX, 0, Kind::Data);
    if rank == 0 {
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
