//! `ringmoe eval nll`: per-token negative log-likelihood of one long input by position, as
//! Gemini 1.5 plots it (cumulative average NLL against position, log-log). On a synthetic
//! document whose first `--segment` tokens come again at its end, the NLL of the second copy
//! falls if the model retrieves across the document's length.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use ringmoe_comm::in_process;
use ringmoe_model::nll_of;
use ringmoe_parallel::{JobOptions, ShardPlan, Sharding, prefill_shard};
use ringmoe_proto::client::JobResult;
use ringmoe_proto::proto;
use serde_json::json;

use crate::cluster_cmd::runtime;
use crate::eval_cmd::{EvalTarget, SplitMix64, Task, parse_length, run_job};
use crate::forward::read_input_ids;

#[derive(Args, Debug)]
pub struct NllArgs {
    /// Where it runs (with --addr, the input is one score job).
    #[command(flatten)]
    target: EvalTarget,
    /// The input: a safetensors file with int64 `input_ids` [1, L].
    #[arg(
        long,
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    token_ids: Option<PathBuf>,
    /// The input: a synthetic document of this many tokens (`64K`, `1M`), haystack tokens of
    /// the task (`--task`) whose first `--segment` tokens repeat at its end.
    #[arg(long)]
    synthetic: Option<String>,
    /// The repeated segment's length.
    #[arg(long, default_value_t = 256)]
    segment: usize,
    /// The task whose haystack range the synthetic document draws from (default: the model
    /// directory's needle.json).
    #[arg(long)]
    task: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where nll.json and nll.png go.
    #[arg(long, default_value = "nll")]
    out: PathBuf,
}

/// The synthetic document: `len` haystack tokens, the first `segment` again at the end.
pub fn synthetic(task: &Task, len: usize, segment: usize, seed: u64) -> Result<Vec<u32>> {
    ensure!(
        segment >= 1 && 2 * segment <= len,
        "a document of {len} tokens cannot hold a segment of {segment} twice"
    );
    let mut rng = SplitMix64::new(seed);
    let span = u64::from(task.haystack.1 - task.haystack.0);
    let mut t: Vec<u32> = (0..len - segment)
        .map(|_| task.haystack.0 + rng.below(span) as u32)
        .collect();
    t.extend_from_within(..segment);
    Ok(t)
}

/// Log-spaced position buckets over `n` NLL values (position `i` is the token at `i + 1`):
/// `(first, last, mean)` per bucket, about 8 per doubling.
pub fn buckets(nll: &[f32]) -> Vec<(usize, usize, f64)> {
    let mut out = Vec::new();
    let mut start = 0usize;
    while start < nll.len() {
        let end = ((start as f64 + 1.0) * 2f64.powf(1.0 / 8.0)).ceil() as usize;
        let end = end.max(start + 1).min(nll.len());
        let part = &nll[start..end];
        let mean = part.iter().map(|&x| f64::from(x)).sum::<f64>() / part.len() as f64;
        out.push((start + 1, end, mean));
        start = end;
    }
    out
}

/// The cumulative average NLL at each bucket's last position.
pub fn cumulative(nll: &[f32], buckets: &[(usize, usize, f64)]) -> Vec<(usize, f64)> {
    let mut sum = 0f64;
    let mut i = 0;
    buckets
        .iter()
        .map(|&(_, last, _)| {
            while i < last {
                sum += f64::from(nll[i]);
                i += 1;
            }
            (last, sum / last as f64)
        })
        .collect()
}

pub fn run(a: NllArgs) -> Result<()> {
    let tokens = match (&a.token_ids, &a.synthetic) {
        (Some(f), _) => read_input_ids(f)?,
        (None, Some(len)) => {
            let path = match (&a.task, &a.target.model) {
                (Some(t), _) => t.clone(),
                (None, Some(m)) => m.join("needle.json"),
                (None, None) => bail!("--synthetic with --addr needs --task"),
            };
            synthetic(&Task::read(&path)?, parse_length(len)?, a.segment, a.seed)?
        }
        (None, None) => bail!("--token-ids or --synthetic"),
    };
    ensure!(tokens.len() >= 2, "scoring needs at least 2 tokens");
    let t = Instant::now();
    let tg = &a.target;
    let nll: Vec<f32> = match (&tg.model, &tg.addr) {
        (Some(dir), _) => {
            let (model, _) = crate::load_model(dir, tg.weights)?;
            let comm = in_process(1, Duration::from_secs(24 * 3600));
            let plan = ShardPlan::new(tokens.len(), 1, Sharding::Contiguous)?;
            let job = JobOptions {
                id: 1,
                attention: tg.pattern.mode(tg.attention),
                piece_rows: 0,
            };
            let out = prefill_shard(&model, &comm[0], &plan, &tokens, job)?;
            let vocab = model.config.vocab_size;
            let n = tokens.len() - 1;
            let mut nll = Vec::with_capacity(n);
            for s in (0..n).step_by(512) {
                let e = (s + 512).min(n);
                let logits = model.logits(&out.hidden.rows(s, e)?)?;
                for (i, row) in logits.as_slice().chunks(vocab).enumerate() {
                    nll.push(nll_of(row, tokens[s + i + 1] as usize));
                }
            }
            nll
        }
        (None, Some(addr)) => {
            let rt = runtime()?;
            rt.block_on(async {
                let (mut c, model) = tg.connect(addr).await?;
                let spec = proto::JobSpec {
                    model,
                    mode: proto::JobMode::Score as i32,
                    attention: tg.proto_attention() as i32,
                    ..Default::default()
                };
                match run_job(&mut c, spec, &tokens).await? {
                    JobResult::Scores(s) => Ok(s),
                    JobResult::Tokens(_) => bail!("the score job returned tokens"),
                }
            })?
        }
        (None, None) => bail!("--model or --addr"),
    };
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        nll.len() == tokens.len() - 1,
        "{} NLL values for {} tokens",
        nll.len(),
        tokens.len()
    );
    let b = buckets(&nll);
    let cum = cumulative(&nll, &b);
    let mean = |r: std::ops::Range<usize>| -> f64 {
        nll[r.clone()].iter().map(|&x| f64::from(x)).sum::<f64>() / r.len().max(1) as f64
    };
    let n = nll.len();
    let copy = a.synthetic.as_ref().map(|_| {
        // The second copy's tokens after its first (which nothing predicts).
        let first = tokens.len() - a.segment;
        (mean(first..n), mean(0..first.saturating_sub(1)))
    });
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let result = json!({
        "tokens": tokens.len(),
        "attention": format!("{:?}", a.target.attention),
        "wall_secs": secs,
        "mean_nll": mean(0..n),
        "buckets": b.iter().map(|&(f, l, m)| json!({"first": f, "last": l, "mean_nll": m})).collect::<Vec<_>>(),
        "cumulative": cum.iter().map(|&(p, m)| json!({"position": p, "mean_nll": m})).collect::<Vec<_>>(),
        "segment": a.synthetic.as_ref().map(|_| a.segment),
        "copy_mean_nll": copy.map(|c| c.0),
        "rest_mean_nll": copy.map(|c| c.1),
    });
    let path = a.out.join("nll.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let png = crate::heatmap::render_lines(
        "NLL BY POSITION",
        &[
            (
                &b.iter().map(|&(_, l, m)| (l as f64, m)).collect::<Vec<_>>(),
                [70, 110, 200],
            ),
            (
                &cum.iter().map(|&(p, m)| (p as f64, m)).collect::<Vec<_>>(),
                [200, 60, 60],
            ),
        ],
        "BLUE: BUCKET MEAN, RED: CUMULATIVE MEAN (LOG-LOG)",
    );
    let img = a.out.join("nll.png");
    std::fs::write(&img, png).with_context(|| format!("writing {}", img.display()))?;
    println!(
        "{} tokens in {secs:.1} s: mean NLL {:.4}",
        tokens.len(),
        mean(0..n)
    );
    if let Some((c, r)) = copy {
        println!(
            "repeated segment of {} at distance {}: NLL {c:.4} on the copy, {r:.4} elsewhere",
            a.segment,
            tokens.len() - a.segment
        );
    }
    println!("wrote {} and {}", path.display(), img.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synthetic_document_repeats_its_first_segment_at_the_end() {
        let task = Task::from_json(&json!({"bos": null, "haystack": [64, 256], "markers": [2],
            "values": [8, 64], "max_len": 1024}))
        .unwrap();
        let d = synthetic(&task, 100, 10, 3).unwrap();
        assert_eq!(d.len(), 100);
        assert_eq!(d[..10], d[90..]);
        assert!(d.iter().all(|t| (64..256).contains(t)));
        assert!(synthetic(&task, 10, 6, 3).is_err());
    }

    #[test]
    fn buckets_cover_every_position_once_and_the_cumulative_mean_is_exact() {
        let nll: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        let b = buckets(&nll);
        assert_eq!(b[0].0, 1);
        assert_eq!(b.last().unwrap().1, 1000);
        assert!(b.windows(2).all(|w| w[0].1 + 1 == w[1].0));
        assert!(b.len() > 40 && b.len() < 100, "{} buckets", b.len());
        let c = cumulative(&nll, &b);
        let want = nll.iter().map(|&x| f64::from(x)).sum::<f64>() / 1000.0;
        assert!((c.last().unwrap().1 - want).abs() < 1e-12);
    }
}
