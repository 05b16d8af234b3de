//! `ringmoe submit`: uploads a job (or follows one, `--watch`), shows its progress, prints the
//! result as text, ids or JSON, and follows the job across a lost coordinator.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use ringmoe_proto::client::{self, Input, JobResult};
use ringmoe_proto::proto::{self, JobPhase};

use crate::cluster_cmd::{LimitOpts, TelemetryOpts, runtime};
use crate::forward::read_input_ids;
use crate::security_opts::{ClientTokenOpts, TlsOpts};

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ModeArg {
    Generate,
    Score,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum AttnArg {
    Dense,
    AShape,
    VerticalSlash,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The coordinator's address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// A UTF-8 text file (the coordinator tokenizes it).
    #[arg(
        long,
        conflicts_with_all = ["token_ids", "watch"],
        required_unless_present_any = ["token_ids", "watch"]
    )]
    file: Option<PathBuf>,
    /// Follow job ID (submitted earlier, by this or another client with the same token) to its
    /// end and print its result, instead of submitting one.
    #[arg(long, conflicts_with = "token_ids")]
    watch: Option<u64>,
    /// How long to keep reconnecting, in seconds, when the coordinator goes away while a job
    /// is followed (the job is stored there and goes on when it is back).
    #[arg(long, default_value_t = 300)]
    reconnect_secs: u64,
    /// A safetensors file with int64 `input_ids` [1, L] (as `forward` takes).
    #[arg(long)]
    token_ids: Option<PathBuf>,
    /// The model to run (default: the coordinator's only model).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, value_enum, default_value = "generate")]
    mode: ModeArg,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: u32,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "dense")]
    attention: AttnArg,
    /// Higher runs first.
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Print one JSON object (job id, final state, result: `tokens` and `text`, or `nll`)
    /// instead of text.
    #[arg(long)]
    json: bool,
    /// Print a generate job's token ids instead of its text.
    #[arg(long, conflicts_with = "json")]
    ids: bool,
    /// Tokens (or text bytes) per upload message.
    #[arg(long, default_value_t = client::UPLOAD_CHUNK)]
    chunk: usize,
    #[command(flatten)]
    token: ClientTokenOpts,
    #[command(flatten)]
    limits: LimitOpts,
    #[command(flatten)]
    tls: TlsOpts,
    #[command(flatten)]
    telemetry: TelemetryOpts,
}

fn phase_name(p: JobPhase) -> &'static str {
    match p {
        JobPhase::Queued => "queued",
        JobPhase::Loading => "loading",
        JobPhase::Prefill => "prefill",
        JobPhase::Decode => "decode",
        JobPhase::Done => "done",
        JobPhase::Failed => "failed",
        JobPhase::Cancelled => "cancelled",
        JobPhase::Retrying => "retrying",
        JobPhase::Unspecified => "unknown",
    }
}

fn bar(mp: &MultiProgress, len: u64, label: &str, hidden: bool) -> ProgressBar {
    let b = if hidden {
        ProgressBar::hidden()
    } else {
        mp.add(ProgressBar::new(len))
    };
    b.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_prefix(label.to_string());
    b
}

/// The job's input; `None` with `--watch` (nothing to upload).
fn read_input(a: &SubmitArgs) -> Result<Option<Input>> {
    match (&a.file, &a.token_ids, a.watch) {
        (Some(f), None, None) => Ok(Some(Input::Text(
            std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
        ))),
        (None, Some(t), None) => Ok(Some(Input::Tokens(read_input_ids(t)?))),
        (None, None, Some(_)) => Ok(None),
        _ => bail!("give exactly one of --file, --token-ids and --watch"),
    }
}

/// A new connection to the coordinator at `addr`, retried with backoff (200 ms to 5 s) for up
/// to `within`.
async fn reconnect(
    addr: &str,
    max: usize,
    token: Option<&str>,
    tls: Option<&ringmoe_proto::tls::Tls>,
    within: Duration,
) -> Result<client::Client> {
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        tokio::time::sleep(pause).await;
        match client::connect_with(addr, max, token, tls).await {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() < within => {
                tracing::debug!(error = %e.message(), "reconnecting");
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => bail!(
                "the coordinator at {addr} did not come back in {within:?}: {}",
                e.message()
            ),
        }
    }
}

/// Whether a failed call means the coordinator went away (so the job may be followed again
/// once it is back), rather than that it refused something.
fn coordinator_lost(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
}

pub fn submit(a: SubmitArgs) -> Result<()> {
    let rt = runtime()?;
    let _in_rt = rt.enter();
    let _telemetry = a.telemetry.init("ringmoe-submit", "warn")?;
    let input = read_input(&a)?;
    // With tracing on, the job's trace starts here: the coordinator continues it.
    let span = tracing::info_span!("submit", file = ?a.file);
    rt.block_on(tracing::Instrument::instrument(
        submit_async(a, input),
        span,
    ))
}

async fn submit_async(a: SubmitArgs, input: Option<Input>) -> Result<()> {
    let max = a.limits.max_message_bytes;
    let token = a.token.token()?;
    let tls = a.tls.load(false)?;
    let mut c = client::connect_with(&a.addr, max, token.as_deref(), tls.as_ref()).await?;
    let quiet = a.json;
    let mp = MultiProgress::new();
    let id = match input {
        None => a.watch.context("--watch or an input")?,
        Some(input) => upload(&a, &mut c, input, &mp).await?,
    };
    let (mut prefill, mut decode): (Option<ProgressBar>, Option<ProgressBar>) = (None, None);
    // Plain output shows the answer as it is decoded (WatchJob's text pieces), on stdout.
    let live_text = !a.json && !a.ids;
    // What stdout shows of the run's text, and what the current watch has received: after a
    // reconnect the coordinator sends the run's text from its start again, and only what goes
    // past what was printed is printed.
    let mut streamed = String::new();
    let reconnect_for = Duration::from_secs(a.reconnect_secs);
    // When the coordinator was first lost: reconnecting stops `reconnect_for` after that.
    let mut lost_at: Option<std::time::Instant> = None;
    let last = loop {
        let mut session = String::new();
        let watched = client::watch(&mut c, id, |p| {
            if live_text && !p.new_text.is_empty() {
                session.push_str(&p.new_text);
                if session.len() > streamed.len()
                    && session.is_char_boundary(streamed.len())
                    && session.starts_with(streamed.as_str())
                {
                    let new = &session[streamed.len()..];
                    mp.suspend(|| {
                        use std::io::Write;
                        print!("{new}");
                        let _ = std::io::stdout().flush();
                    });
                    streamed = session.clone();
                }
            }
            match p.phase() {
                JobPhase::Prefill => {
                    let b =
                        prefill.get_or_insert_with(|| bar(&mp, p.tokens_total, "prefill", quiet));
                    b.set_length(p.tokens_total.max(1));
                    b.set_position(p.tokens_done);
                    b.set_message(format!(
                        "layer {}/{} · {:.0} tok/s · ETA {:.0}s · {} workers",
                        p.layer, p.layers, p.tokens_per_sec, p.eta_secs, p.workers
                    ));
                }
                JobPhase::Retrying => {
                    if !streamed.is_empty() {
                        // The re-run decodes from the first token again.
                        mp.suspend(|| println!());
                        streamed.clear();
                    }
                    session.clear();
                    let _ = mp.println(format!("retrying: {}", p.message));
                    // The re-run starts its phases over.
                    for b in [prefill.take(), decode.take()].into_iter().flatten() {
                        b.abandon();
                    }
                }
                JobPhase::Decode => {
                    if let Some(b) = &prefill {
                        b.finish();
                    }
                    let b = decode.get_or_insert_with(|| bar(&mp, p.tokens_total, "decode", quiet));
                    b.set_position(p.tokens_done);
                    b.set_message(format!("{:.1} tok/s", p.tokens_per_sec));
                }
                _ => {}
            }
        })
        .await;
        match watched {
            Ok(last) => break last,
            Err(s) if coordinator_lost(&s) => {
                let later = format!(
                    "follow it later with `ringmoe submit --watch {id} --addr {}`",
                    a.addr
                );
                // On stderr even with --json or without a terminal (bars may be hidden).
                mp.suspend(|| {
                    eprintln!(
                        "lost the coordinator at {} while following job {id} ({}): the job is \
                         stored there and goes on when it is back; reconnecting for up to {}s \
                         (or {later})",
                        a.addr,
                        s.message(),
                        reconnect_for.as_secs()
                    )
                });
                let left = reconnect_for.saturating_sub(
                    lost_at
                        .get_or_insert_with(std::time::Instant::now)
                        .elapsed(),
                );
                c = reconnect(&a.addr, max, token.as_deref(), tls.as_ref(), left)
                    .await
                    .with_context(|| format!("job {id} is stored on the coordinator; {later}"))?;
                mp.suspend(|| eprintln!("reconnected to {}; following job {id}", a.addr));
            }
            Err(s) => return Err(status_error(s)),
        }
    };
    for b in [prefill, decode].into_iter().flatten() {
        b.finish();
    }
    let phase = last.phase();
    if phase != JobPhase::Done {
        if a.json {
            println!(
                "{}",
                serde_json::json!({"job_id": id, "state": phase_name(phase), "message": last.message})
            );
        }
        bail!("job {id} {}: {}", phase_name(phase), last.message);
    }
    let (result, text) = client::result_with_text(&mut c, id)
        .await
        .map_err(status_error)?;
    if a.json {
        let mut o = serde_json::json!({"job_id": id, "state": "done"});
        match result {
            JobResult::Tokens(t) => {
                o["tokens"] = serde_json::json!(t);
                o["text"] = serde_json::json!(text);
            }
            JobResult::Scores(n) => {
                let mean = n.iter().map(|&x| x as f64).sum::<f64>() / n.len().max(1) as f64;
                o["nll"] = serde_json::json!(n);
                o["mean_nll"] = serde_json::json!(mean);
            }
        }
        println!("{o}");
    } else {
        match result {
            JobResult::Tokens(t) => {
                // The status line on stderr: stdout is the answer alone.
                eprintln!("job {id} done: {} tokens generated", t.len());
                match text {
                    // Already on stdout, as it was decoded.
                    Some(text) if live_text && streamed == text => println!(),
                    Some(text) if !a.ids => {
                        if !streamed.is_empty() {
                            eprintln!("\n(the streamed text differs from the result; the result:)");
                        }
                        println!("{text}")
                    }
                    _ => {
                        if !a.ids {
                            eprintln!("(the model has no tokenizer: token ids)");
                        }
                        println!(
                            "{}",
                            t.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
                        );
                    }
                }
            }
            JobResult::Scores(n) => {
                let mean = n.iter().map(|&x| x as f64).sum::<f64>() / n.len().max(1) as f64;
                println!(
                    "job {id} done: {} tokens scored, mean NLL {mean:.4}, perplexity {:.3}",
                    n.len(),
                    mean.exp()
                );
            }
        }
    }
    Ok(())
}

/// `named`, else the coordinator's only model; `flag` is the option that names one.
pub(crate) async fn model_to_run(
    c: &mut client::Client,
    named: Option<&str>,
    flag: &str,
) -> Result<String> {
    if let Some(m) = named {
        return Ok(m.to_string());
    }
    let l = c.list_jobs(proto::ListJobsRequest {}).await?.into_inner();
    match l.models.as_slice() {
        [one] => Ok(one.clone()),
        many => bail!(
            "the coordinator serves {} models ({}); say which with {flag}",
            many.len(),
            many.join(", ")
        ),
    }
}

/// Uploads `input` as a new job (the spec from `a`'s flags) with an upload progress bar;
/// returns its id.
async fn upload(
    a: &SubmitArgs,
    c: &mut client::Client,
    input: Input,
    mp: &MultiProgress,
) -> Result<u64> {
    let quiet = a.json;
    let model = model_to_run(c, a.model.as_deref(), "--model").await?;
    let spec = proto::JobSpec {
        model,
        mode: match a.mode {
            ModeArg::Generate => proto::JobMode::Generate,
            ModeArg::Score => proto::JobMode::Score,
        } as i32,
        max_new_tokens: a.max_new_tokens,
        sampling: Some(proto::Sampling {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        }),
        attention: match a.attention {
            AttnArg::Dense => proto::AttentionMode::Dense,
            AttnArg::AShape => proto::AttentionMode::AShape,
            AttnArg::VerticalSlash => proto::AttentionMode::VerticalSlash,
        } as i32,
        priority: a.priority,
        input_length: 0,
    };
    let unit = if matches!(input, Input::Text(_)) {
        "bytes"
    } else {
        "tokens"
    };
    let up = bar(mp, input_len(&input), "upload", quiet);
    up.set_message(unit);
    let up2 = up.clone();
    let mut meta = tonic::metadata::MetadataMap::new();
    ringmoe_telemetry::propagate::TraceHeaders::current().apply(&mut meta);
    let ack = client::submit_with(c, spec, input, a.chunk, move |n| up2.set_position(n), meta)
        .await
        .map_err(status_error)?;
    up.finish_with_message(format!("{unit}: job {} accepted", ack.job_id));
    Ok(ack.job_id)
}

fn input_len(i: &Input) -> u64 {
    match i {
        Input::Tokens(t) => t.len() as u64,
        Input::Text(b) => b.len() as u64,
    }
}

/// A gRPC status as an error that names its code.
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
