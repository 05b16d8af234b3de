//! The coordinator's metrics: what happened (jobs by outcome, retries, phase durations,
//! throughput, placement versions, expert imbalance), recorded as it happens, and what is
//! (queue, running jobs, workers, the autoscaling signal), refreshed at each scrape.

use std::sync::{Arc, Weak};
use std::time::Instant;

use ringmoe_membership::WorkerRecord;
use ringmoe_proto::proto;
use ringmoe_telemetry::metrics::{self, CollectorGuard};

use crate::balance::LoadReading;
use crate::output::{JobOutput, Outcome};
use crate::runtime::Runtime;
use crate::store::{JobMode, JobSpec, JobState};

/// A job's trace root: from submission (or recovery) to its end; its fields are filled in
/// as they become known.
pub(crate) fn job_span() -> tracing::Span {
    use tracing::field::Empty;
    tracing::info_span!(
        parent: None,
        "job",
        "job.id" = Empty,
        model = Empty,
        mode = Empty,
        tokens = Empty,
        recovered = Empty,
        outcome = Empty,
    )
}

pub(crate) fn mode(spec: &JobSpec) -> &'static str {
    match spec.mode {
        JobMode::Generate { .. } => "generate",
        JobMode::Score => "score",
    }
}

/// A job reached a final state.
pub(crate) fn job_finished(spec: &JobSpec, state: &JobState) {
    let outcome = match state {
        JobState::Done => "done",
        JobState::Cancelled => "cancelled",
        _ => "failed",
    };
    metrics::counter(
        "ringmoe_jobs_total",
        "Jobs finished, by model, mode and outcome (done, failed, cancelled).",
        &[
            ("model", &spec.model),
            ("mode", mode(spec)),
            ("outcome", outcome),
        ],
        1.0,
    );
}

/// A run failed and the job runs again; `reason` is the retry policy's text.
pub(crate) fn retried(reason: &str) {
    let kind = if reason.starts_with("lost worker") {
        "worker_lost"
    } else {
        "other"
    };
    metrics::counter(
        "ringmoe_retries_total",
        "Job re-runs after a failed run, by reason.",
        &[("reason", kind)],
        1.0,
    );
}

/// A run produced `out` for a job of `input_len` tokens.
pub(crate) fn run_done(spec: &JobSpec, input_len: usize, out: &JobOutput) {
    let t = &out.timings;
    for (phase, secs) in [
        ("load", t.load_secs),
        ("prefill", t.prefill_secs),
        ("decode", t.decode_secs),
    ] {
        if phase == "decode" && matches!(spec.mode, JobMode::Score) {
            continue;
        }
        metrics::observe(
            "ringmoe_job_duration_seconds",
            "Seconds a job's successful run spent per phase (load: placement, data plane and upload).",
            &[("phase", phase)],
            secs,
        );
    }
    let model = [("model", spec.model.as_str())];
    if t.prefill_secs > 0.0 {
        metrics::gauge(
            "ringmoe_prefill_tokens_per_second",
            "Prefill throughput of the model's last job (input tokens / prefill seconds).",
            &model,
            input_len as f64 / t.prefill_secs,
        );
    }
    if let Outcome::Generated { tokens } = &out.outcome
        && t.decode_secs > 0.0
        && tokens.len() > 1
    {
        // The first token comes from the prefill's logits.
        metrics::gauge(
            "ringmoe_decode_tokens_per_second",
            "Decode throughput of the model's last generate job (tokens after the first / decode seconds).",
            &model,
            (tokens.len() - 1) as f64 / t.decode_secs,
        );
    }
}

/// A placement version became known (published by this coordinator, or found at start).
pub(crate) fn placement(model: &str, version: u64) {
    metrics::gauge(
        "ringmoe_placement_version",
        "The expert placement version in use, by model.",
        &[("model", model)],
        version as f64,
    );
}

/// Max over mean of the rows each worker computed per layer, and over the layers weighed by
/// their rows (`layer="all"`: the figure the rebalance policy compares with its threshold), from
/// a reading of the workers' load windows.
pub(crate) fn expert_imbalance(r: &LoadReading) {
    let per_layer = r.per_layer_worker();
    let help = "Max over mean of the expert rows each worker computed, per layer, over the \
                workers' load window (1 = balanced; layer=\"all\": weighed by each layer's rows).";
    for (l, w) in per_layer.iter().enumerate() {
        if w.iter().sum::<f64>() > 0.0 {
            metrics::gauge(
                "ringmoe_expert_imbalance",
                help,
                &[("model", &r.model), ("layer", &l.to_string())],
                ringmoe_plan::layered_imbalance(std::slice::from_ref(w)),
            );
        }
    }
    if r.total() > 0 {
        metrics::gauge(
            "ringmoe_expert_imbalance",
            help,
            &[("model", &r.model), ("layer", "all")],
            ringmoe_plan::layered_imbalance(&per_layer),
        );
    }
}

/// A rebalance every worker acknowledged: the bytes they read and how long it took.
pub(crate) fn rebalanced(model: &str, bytes_read: u64, secs: f64) {
    metrics::counter(
        "ringmoe_rebalances_total",
        "Expert placements republished because the measured load was imbalanced.",
        &[("model", model)],
        1.0,
    );
    metrics::gauge(
        "ringmoe_rebalance_bytes_read",
        "Bytes the workers read from the checkpoint for the latest rebalance (only the experts \
         that moved).",
        &[("model", model)],
        bytes_read as f64,
    );
    metrics::gauge(
        "ringmoe_rebalance_seconds",
        "Seconds from publishing the latest rebalance to every worker's acknowledgement.",
        &[("model", model)],
        secs,
    );
}

/// How the cluster is scaled: what `desired_workers` weighs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Scale {
    pub min_workers: usize,
    /// `--group-workers` (0: one group, one job at a time).
    pub group_workers: usize,
    /// `--max-workers` (0: no cap).
    pub max_workers: usize,
}

/// Workers wanted for the unfinished jobs (`jobs`: tokens of K/V and bytes per token, queued
/// and running). Each job needs enough workers for its K/V (spread over workers of
/// `worker_budget` bytes; one per job without a worker to learn the budget from). With one
/// group (`group_workers` 0) jobs run one at a time, so the largest job decides; with groups of
/// G, every job can run at once on a group of its own (at least G workers): their sum. Never
/// fewer than `min_workers`, never more than `max_workers` (when set).
pub(crate) fn desired_workers(
    scale: Scale,
    jobs: &[(u64, u64)],
    worker_budget: Option<u64>,
) -> u64 {
    let per_job = jobs.iter().map(|&(tokens, per_token)| match worker_budget {
        Some(b) => {
            let fit = (b / per_token.max(1)).max(1);
            tokens.div_ceil(fit)
        }
        None => 1,
    });
    let need = match scale.group_workers {
        0 => per_job.max().unwrap_or(0),
        g => per_job.map(|n| n.max(g as u64)).sum(),
    };
    let d = need.max(scale.min_workers as u64);
    match scale.max_workers {
        0 => d,
        max => d.min(max as u64),
    }
}

/// Registers the scrape-time gauges of `rt` (held weakly: a stopped coordinator reports
/// nothing).
pub(crate) fn collector(rt: &Arc<Runtime>) -> CollectorGuard {
    let weak: Weak<Runtime> = Arc::downgrade(rt);
    metrics::on_scrape(move || {
        if let Some(rt) = weak.upgrade() {
            scrape(&rt);
        }
    })
}

/// The queue, the running jobs, the workers and the autoscaling signal, as the metrics and the
/// status RPC report them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Figures {
    pub queued: u64,
    pub tokens_queued: u64,
    pub running: u64,
    pub desired_workers: u64,
    pub live: Vec<WorkerRecord>,
    pub excluded: usize,
}

pub(crate) fn figures(rt: &Runtime) -> Figures {
    let (mut queued, mut tokens_queued, mut running) = (0u64, 0u64, 0u64);
    let mut demand = Vec::new();
    if let Ok(jobs) = rt.jobs.lock() {
        for j in jobs.values() {
            let phase = j.progress.borrow().progress.phase();
            let new = match j.spec.mode {
                JobMode::Generate { max_new_tokens, .. } => u64::from(max_new_tokens),
                JobMode::Score => 0,
            };
            let per_token = rt
                .models
                .get(&j.spec.model)
                .map_or(1, |m| m.kv_bytes_per_token());
            match phase {
                proto::JobPhase::Queued => {
                    queued += 1;
                    tokens_queued += j.input_len as u64;
                }
                proto::JobPhase::Loading
                | proto::JobPhase::Prefill
                | proto::JobPhase::Decode
                | proto::JobPhase::Retrying => running += 1,
                _ => continue,
            }
            demand.push((j.input_len as u64 + new, per_token));
        }
    }
    let (live, excluded): (Vec<WorkerRecord>, usize) =
        rt.machine_view(Instant::now()).unwrap_or_default();
    let budget = live.iter().map(|w| w.kv_budget_bytes).min();
    Figures {
        queued,
        tokens_queued,
        running,
        desired_workers: desired_workers(
            Scale {
                min_workers: rt.cfg.min_workers,
                group_workers: rt.cfg.group_workers,
                max_workers: rt.cfg.max_workers,
            },
            &demand,
            budget,
        ),
        live,
        excluded,
    }
}

fn scrape(rt: &Runtime) {
    let f = figures(rt);
    let g = |name, help, v: u64| metrics::gauge(name, help, &[], v as f64);
    g(
        "ringmoe_jobs_queued",
        "Jobs waiting in the queue.",
        f.queued,
    );
    g(
        "ringmoe_tokens_queued",
        "Input tokens of the jobs waiting in the queue.",
        f.tokens_queued,
    );
    g(
        "ringmoe_jobs_running",
        "Jobs being run (loading, prefill, decode or between retries).",
        f.running,
    );
    for (state, n) in [("live", f.live.len()), ("excluded", f.excluded)] {
        metrics::gauge(
            "ringmoe_workers",
            "Registered workers, by state (live: schedulable; excluded: found dead after a failed run).",
            &[("state", state)],
            n as f64,
        );
    }
    g(
        "ringmoe_desired_workers",
        "Workers the unfinished jobs want: the K/V of the largest (one group), or a group (or its K/V) for every job (--group-workers); at least --min-workers, at most --max-workers. The autoscaling signal.",
        f.desired_workers,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_workers_follow_the_largest_job_or_the_groups_and_the_floor() {
        // 1 KiB per token, workers of 1 MiB: 1024 tokens each.
        let per = 1024;
        let budget = Some(1 << 20);
        let one = |min| Scale {
            min_workers: min,
            ..Scale::default()
        };
        assert_eq!(desired_workers(one(1), &[], budget), 1);
        assert_eq!(desired_workers(one(2), &[(10, per)], budget), 2);
        assert_eq!(desired_workers(one(1), &[(1024, per)], budget), 1);
        assert_eq!(desired_workers(one(1), &[(1025, per)], budget), 2);
        assert_eq!(
            desired_workers(one(1), &[(100, per), (5000, per)], budget),
            5
        );
        assert_eq!(desired_workers(one(0), &[(5000, per)], None), 1);
        assert_eq!(desired_workers(one(0), &[], None), 0);
        // Groups of 2: every job its own group (a long one as many workers as its K/V needs),
        // capped by --max-workers.
        let groups = Scale {
            min_workers: 1,
            group_workers: 2,
            max_workers: 0,
        };
        let three_small = [(10, per); 3];
        assert_eq!(desired_workers(groups, &three_small, budget), 6);
        assert_eq!(
            desired_workers(groups, &[(10, per), (5000, per)], budget),
            7
        );
        assert_eq!(desired_workers(groups, &[], budget), 1);
        let capped = Scale {
            max_workers: 4,
            ..groups
        };
        assert_eq!(desired_workers(capped, &three_small, budget), 4);
    }
}
