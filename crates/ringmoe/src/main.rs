//! The `ringmoe` command line: `generate`, `score`, `forward` and `bench` (engine and communicator).

mod cluster_cmd;
mod comm_bench;
mod decode_bench;
mod eval_cmd;
mod eval_nll;
mod forward;
mod gpu_check;
mod heatmap;
mod moe_bench;
mod rebalance_bench;
mod ring_bench;
mod security_opts;
mod status_cmd;
mod submit_cmd;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};
use ringmoe_core::WeightPrecision;
use ringmoe_core::testing::{XorShift, rand_vec};
use ringmoe_model::{
    ExpertSelection, GenerationConfig, LoadOptions, Model, ModelConfig, Sampler, SamplingParams,
    TextStream, Tokenizer, generate,
};

#[derive(Parser)]
#[command(
    name = "ringmoe",
    version,
    about = "Mixture-of-Experts inference over very long contexts"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt, printing tokens as they come; timings go to stderr.
    Generate(GenerateArgs),
    /// Mean negative log-likelihood per token and perplexity of a text file.
    Score(ScoreArgs),
    /// Logits for every position of `input_ids` from a safetensors file, written to another.
    Forward(forward::ForwardArgs),
    /// One rank of `forward --transport tcp` (started by it; not for direct use).
    #[command(hide = true)]
    ForwardRank(forward::ForwardRankArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Long-context evaluations: needle-in-a-haystack recall.
    #[command(subcommand)]
    Eval(eval_cmd::EvalCmd),
    /// Coordinator and N workers on this machine: the cluster with nothing else installed.
    Serve(cluster_cmd::ServeArgs),
    /// Submit a job to a coordinator, follow its progress and print the result.
    Submit(submit_cmd::SubmitArgs),
    /// Exits 0 when a server's `grpc.health.v1` reports it serving (a container health check).
    Health(cluster_cmd::HealthArgs),
    /// The cluster as the coordinator sees it: workers, expert placements and load, the queue.
    Status(status_cmd::StatusArgs),
    /// The cluster's coordinator: accepts jobs over gRPC and drives them over the workers.
    Coordinator(cluster_cmd::CoordinatorArgs),
    /// A cluster worker: registers with the coordinator and runs its part of jobs.
    Worker(cluster_cmd::WorkerArgs),
    /// Client tokens for `--auth-tokens-file`.
    #[command(subcommand)]
    Token(security_opts::TokenCmd),
    /// Checks the CUDA kernels against the CPU ones and times attention (needs `--features cuda`
    /// and an NVIDIA GPU; see scripts/gpu-check.sh).
    GpuCheck(gpu_check::GpuCheckArgs),
}

/// `--weights`: the precision a CPU engine holds its matrices in.
#[derive(Args, Clone, Copy, Debug)]
pub(crate) struct WeightsOpts {
    /// Matrices in CPU memory: `native` (as the checkpoint stores them: bf16 stays bf16), `f32`,
    /// `bf16`, or `q8` (int8 blocks of 32 with an f16 scale, quantised at load). Norms, biases
    /// and routers stay f32. A GPU uses --precision instead.
    #[arg(long = "weights", default_value = "native")]
    pub(crate) weights: WeightPrecision,
}

impl WeightsOpts {
    pub(crate) fn to_args(self) -> Vec<String> {
        vec!["--weights".into(), self.weights.to_string()]
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    weights: WeightsOpts,
    #[arg(
        long,
        conflicts_with = "prompt_file",
        required_unless_present = "prompt_file"
    )]
    prompt: Option<String>,
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Where the single-process engine runs: `cpu`, or `cuda:N` (a build with `--features cuda`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeviceArg {
    Cpu,
    Cuda(usize),
}

pub(crate) fn parse_device(s: &str) -> Result<DeviceArg, String> {
    match s {
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" => Ok(DeviceArg::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceArg::Cuda)
            .ok_or_else(|| format!("{s:?}: want cpu, cuda or cuda:N")),
    }
}

/// The engine on the chosen device.
enum Engine {
    Cpu(Box<Model>),
    Cuda(Box<ringmoe_cuda::CudaModel>),
}

impl Engine {
    fn load(
        dir: &Path,
        device: DeviceArg,
        precision: ringmoe_cuda::Precision,
        weights: WeightsOpts,
    ) -> Result<Self> {
        Ok(match device {
            DeviceArg::Cpu => Self::Cpu(Box::new(load_model(dir, weights)?.0)),
            DeviceArg::Cuda(i) => {
                let b = std::sync::Arc::new(ringmoe_cuda::CudaBackend::new(i)?);
                Self::Cuda(Box::new(
                    ringmoe_cuda::load_model(b, dir, &ExpertSelection::All, precision)
                        .with_context(|| format!("loading model from {}", dir.display()))?,
                ))
            }
        })
    }

    fn score(&self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(match self {
            Self::Cpu(m) => m.score(ids)?,
            Self::Cuda(m) => m.score(ids)?,
        })
    }

    fn prefill(&self, ids: &[u32]) -> Result<()> {
        match self {
            Self::Cpu(m) => m.prefill(ids)?,
            Self::Cuda(m) => m.prefill(ids)?,
        };
        Ok(())
    }
}

#[derive(Args)]
struct ScoreArgs {
    #[arg(long)]
    model: PathBuf,
    /// `cpu`, or `cuda:N` (needs a `--features cuda` build).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceArg,
    /// Weight precision on a GPU: bf16 (serving) or f32 (parity).
    #[arg(long, default_value = "bf16")]
    precision: ringmoe_cuda::Precision,
    #[command(flatten)]
    weights: WeightsOpts,
    /// UTF-8 text to score.
    #[arg(long)]
    file: PathBuf,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Prefill throughput on random token ids (logits for the last position only).
    Prefill(BenchPrefillArgs),
    /// Grouped expert GEMM (gate/up GEMM, SwiGLU, down GEMM) over equally loaded experts.
    Experts(BenchExpertsArgs),
    /// Greedy decode tokens/s on the CPU, and the weight bytes/s that is against a memory copy.
    Decode(decode_bench::DecodeArgs),
    /// Writes the bench model (random Mixtral, 355 M parameters) as a checkpoint directory.
    MakeModel(decode_bench::MakeModelArgs),
    /// Communicator throughput: all_to_all_v and ring sendrecv, like nccl-tests' all_to_all_perf.
    Comm(comm_bench::CommArgs),
    /// Ring attention vs single-rank attention over the same sequence.
    Ring(ring_bench::RingArgs),
    /// A MoE layer's experts over W ranks (expert parallelism) vs one rank holding them all.
    Moe(moe_bench::MoeArgs),
    /// A worker's incremental expert move after a rebalance vs a full reload.
    Rebalance(rebalance_bench::RebalanceArgs),
    /// One rank of `bench comm --transport tcp` (started by it; not for direct use).
    #[command(hide = true)]
    CommRank(comm_bench::CommRankArgs),
}

#[derive(Args)]
struct BenchExpertsArgs {
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Rows per expert (2048 tokens × top-2 over 8 experts = 512).
    #[arg(long, default_value_t = 512)]
    rows: usize,
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    #[arg(long, default_value_t = 2816)]
    intermediate: usize,
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchPrefillArgs {
    #[arg(long)]
    model: PathBuf,
    /// `cpu`, or `cuda:N` (needs a `--features cuda` build).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceArg,
    /// Weight precision on a GPU: bf16 (serving) or f32 (parity).
    #[arg(long, default_value = "bf16")]
    precision: ringmoe_cuda::Precision,
    #[command(flatten)]
    weights: WeightsOpts,
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Untimed full-size runs first (allocator and page warm-up), as a long-running server is.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Score(a) => cmd_score(a),
        Cmd::Forward(a) => forward::run(a),
        Cmd::ForwardRank(a) => forward::run_rank(a),
        Cmd::Bench(BenchCmd::Prefill(a)) => cmd_bench_prefill(a),
        Cmd::Bench(BenchCmd::Experts(a)) => cmd_bench_experts(a),
        Cmd::Bench(BenchCmd::Decode(a)) => decode_bench::run_decode(a),
        Cmd::Bench(BenchCmd::MakeModel(a)) => decode_bench::run_make_model(a),
        Cmd::Bench(BenchCmd::Comm(a)) => comm_bench::run(a),
        Cmd::Bench(BenchCmd::Ring(a)) => ring_bench::run(a),
        Cmd::Bench(BenchCmd::Moe(a)) => moe_bench::run(a),
        Cmd::Bench(BenchCmd::Rebalance(a)) => rebalance_bench::run(a),
        Cmd::Bench(BenchCmd::CommRank(a)) => comm_bench::run_rank(a),
        Cmd::Serve(a) => cluster_cmd::serve(a),
        Cmd::Submit(a) => submit_cmd::submit(a),
        Cmd::Health(a) => cluster_cmd::health(a),
        Cmd::Status(a) => status_cmd::status(a),
        Cmd::Eval(c) => eval_cmd::run(c),
        Cmd::Coordinator(a) => cluster_cmd::coordinator(a),
        Cmd::Worker(a) => cluster_cmd::worker(a),
        Cmd::Token(security_opts::TokenCmd::New(a)) => security_opts::token_new(a),
        Cmd::GpuCheck(a) => gpu_check::run(a),
    }
}

fn load_model(dir: &Path, weights: WeightsOpts) -> Result<(Model, f64)> {
    let t = Instant::now();
    let opts = LoadOptions {
        weights: weights.weights,
        ..LoadOptions::default()
    };
    let model =
        Model::load(dir, &opts).with_context(|| format!("loading model from {}", dir.display()))?;
    Ok((model, t.elapsed().as_secs_f64()))
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let (model, load_secs) = load_model(&a.model, a.weights)?;
    let tok = Tokenizer::from_dir(&a.model)?;
    let prompt = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => bail!("give --prompt or --prompt-file"),
    };
    let ids = tok.encode(&prompt, true)?;
    let gen_cfg = GenerationConfig::from_dir(&a.model)?;
    let eos = match &gen_cfg {
        Some(g) if !g.eos_token_ids.is_empty() => g.eos_token_ids.clone(),
        _ => model.config.eos_token_ids.clone(),
    };
    let mut sampler = Sampler::new(SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    })?;
    let mut stream = TextStream::default();
    let mut stdout = std::io::stdout().lock();
    let (_, stats) = generate(&model, &ids, a.max_new_tokens, &mut sampler, &eos, |id| {
        if let Some(piece) = stream.push(&tok, id)? {
            // A closed stdout (e.g. `| head`) must not abort generation with a panic.
            let _ = write!(stdout, "{piece}").and_then(|_| stdout.flush());
        }
        Ok(())
    })?;
    if let Some(rest) = stream.finish(&tok)? {
        let _ = write!(stdout, "{rest}");
    }
    let _ = writeln!(stdout);
    eprintln!("load time      = {:>9.2} ms", load_secs * 1e3);
    eprintln!(
        "prefill        = {:>9.2} ms / {:>5} tokens ({:>9.2} tokens/s)",
        stats.prefill_secs * 1e3,
        stats.prompt_tokens,
        stats.prefill_tokens_per_sec()
    );
    eprintln!(
        "decode         = {:>9.2} ms / {:>5} tokens ({:>9.2} tokens/s)",
        stats.decode_secs * 1e3,
        stats.generated_tokens.saturating_sub(1),
        stats.decode_tokens_per_sec()
    );
    Ok(())
}

fn cmd_score(a: ScoreArgs) -> Result<()> {
    let model = Engine::load(&a.model, a.device, a.precision, a.weights)?;
    let tok = Tokenizer::from_dir(&a.model)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let ids = tok.encode(&text, true)?;
    let t = Instant::now();
    let nll = model.score(&ids)?;
    let mean = nll.iter().map(|&x| x as f64).sum::<f64>() / nll.len() as f64;
    println!("tokens           {}", ids.len());
    println!("scored tokens    {}", nll.len());
    println!("mean NLL/token   {mean:.6}");
    println!("perplexity       {:.6}", mean.exp());
    eprintln!(
        "time             {:.2} s ({:.1} tokens/s)",
        t.elapsed().as_secs_f64(),
        ids.len() as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_bench_prefill(a: BenchPrefillArgs) -> Result<()> {
    ensure!(
        a.tokens > 0 && a.repeat > 0,
        "--tokens and --repeat must be positive"
    );
    let t = Instant::now();
    let model = Engine::load(&a.model, a.device, a.precision, a.weights)?;
    let load_secs = t.elapsed().as_secs_f64();
    let vocab = ModelConfig::from_dir(&a.model)?.vocab_size as u64;
    let ids: Vec<u32> = XorShift::new(a.seed)
        .take(a.tokens)
        .map(|s| (s % vocab) as u32)
        .collect();
    for _ in 0..a.warmup {
        model.prefill(&ids)?;
    }
    let mut rates = Vec::new();
    for _ in 0..a.repeat {
        let t = Instant::now();
        model.prefill(&ids)?;
        rates.push(a.tokens as f64 / t.elapsed().as_secs_f64());
    }
    let best = rates.iter().copied().fold(0.0, f64::max);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"tokens": a.tokens, "load_secs": load_secs, "tokens_per_sec": rates, "best_tokens_per_sec": best, "threads": rayon_threads()})
        );
    } else {
        for (i, r) in rates.iter().enumerate() {
            println!("run {i}: {r:.1} tokens/s");
        }
        println!(
            "best: {best:.1} tokens/s at {} tokens ({} threads)",
            a.tokens,
            rayon_threads()
        );
    }
    Ok(())
}

fn cmd_bench_experts(a: BenchExpertsArgs) -> Result<()> {
    use ringmoe_model::moe::{ExpertSet, ExpertWeights, expert_compute};
    ensure!(
        a.experts > 0 && a.rows > 0 && a.repeat > 0,
        "--experts, --rows and --repeat must be positive"
    );
    let (h, i) = (a.hidden, a.intermediate);
    let mut seed = 0;
    let mut rand = |n: usize| {
        seed += 1;
        rand_vec(n, seed, 0.5)
    };
    let set = ExpertSet {
        layer: 0,
        experts: (0..a.experts)
            .map(|_| ExpertWeights::from_f32(h, i, rand(2 * i * h), rand(h * i)).map(Some))
            .collect::<Result<_, _>>()?,
    };
    let x = rand(a.experts * a.rows * h);
    let groups: Vec<(usize, usize)> = (0..a.experts).map(|e| (e, a.rows)).collect();
    let flops = 6.0 * (a.experts * a.rows * h * i) as f64;
    let mut gflops = Vec::new();
    for _ in 0..a.repeat {
        let t = Instant::now();
        expert_compute(&x, h, &groups, &set)?;
        gflops.push(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    let best = gflops.iter().copied().fold(0.0, f64::max);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"gflops": gflops, "best_gflops": best, "threads": rayon_threads()})
        );
    } else {
        println!(
            "expert GEMM: best {best:.1} GFLOP/s over {} experts x {} rows (hidden {h}, intermediate {i})",
            a.experts, a.rows
        );
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
