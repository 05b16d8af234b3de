//! Between the wire types (`proto`) and the store's and the coordinator core's types.

use ringmoe_proto::proto;

use crate::machine::Report;
use crate::store::{JobId, JobMode, JobSpec, JobState};

/// The store's name of an attention mode, checked.
pub fn attention_name(m: i32) -> Result<&'static str, String> {
    match proto::AttentionMode::try_from(m) {
        Ok(proto::AttentionMode::Unspecified | proto::AttentionMode::Dense) => Ok("dense"),
        Ok(proto::AttentionMode::AShape) => Ok("a-shape"),
        Ok(proto::AttentionMode::VerticalSlash) => Ok("vertical-slash"),
        Err(_) => Err(format!("unknown attention mode {m}")),
    }
}

pub fn attention_proto(name: &str) -> proto::AttentionMode {
    match name {
        "a-shape" => proto::AttentionMode::AShape,
        "vertical-slash" => proto::AttentionMode::VerticalSlash,
        _ => proto::AttentionMode::Dense,
    }
}

/// A client's spec as the store keeps it; the error says what is wrong with it.
pub fn spec_from_proto(p: &proto::JobSpec) -> Result<JobSpec, String> {
    if p.model.is_empty() {
        return Err("the job spec names no model".into());
    }
    let mode = match proto::JobMode::try_from(p.mode) {
        Ok(proto::JobMode::Generate) => {
            let s = p.sampling.unwrap_or_default();
            if !(s.temperature.is_finite() && s.temperature >= 0.0) {
                return Err(format!("temperature must be ≥ 0, got {}", s.temperature));
            }
            if !(s.top_p.is_finite() && (0.0..=1.0).contains(&s.top_p)) {
                return Err(format!("top_p must be in [0, 1], got {}", s.top_p));
            }
            if p.max_new_tokens == 0 {
                return Err("generate mode needs max_new_tokens ≥ 1".into());
            }
            JobMode::Generate {
                max_new_tokens: p.max_new_tokens,
                temperature: s.temperature,
                top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
                seed: s.seed,
            }
        }
        Ok(proto::JobMode::Score) => JobMode::Score,
        Ok(proto::JobMode::Unspecified) => {
            return Err("the job spec gives no mode (generate or score)".into());
        }
        Err(_) => return Err(format!("unknown job mode {}", p.mode)),
    };
    Ok(JobSpec {
        model: p.model.clone(),
        mode,
        attention: attention_name(p.attention)?.to_string(),
        priority: p.priority,
        owner: None,
    })
}

pub fn mode_proto(m: &JobMode) -> proto::JobMode {
    match m {
        JobMode::Generate { .. } => proto::JobMode::Generate,
        JobMode::Score => proto::JobMode::Score,
    }
}

pub fn phase_of(s: &JobState) -> proto::JobPhase {
    match s {
        JobState::Queued => proto::JobPhase::Queued,
        // A run starts by loading: placement, shards.
        JobState::Running { .. } | JobState::Loading => proto::JobPhase::Loading,
        JobState::Prefill { .. } => proto::JobPhase::Prefill,
        JobState::Decode { .. } => proto::JobPhase::Decode,
        JobState::Retrying { .. } => proto::JobPhase::Retrying,
        JobState::Done => proto::JobPhase::Done,
        JobState::Failed { .. } => proto::JobPhase::Failed,
        JobState::Cancelled => proto::JobPhase::Cancelled,
    }
}

/// Whether a phase is final.
pub fn phase_finished(p: proto::JobPhase) -> bool {
    matches!(
        p,
        proto::JobPhase::Done | proto::JobPhase::Failed | proto::JobPhase::Cancelled
    )
}

/// What a watcher sees of job `id` in `state`, with the run's figures.
pub fn progress(id: JobId, state: &JobState, r: &Report) -> proto::JobProgress {
    let mut p = proto::JobProgress {
        job_id: id,
        phase: phase_of(state) as i32,
        workers: r.workers,
        tokens_done: r.tokens_done,
        tokens_total: r.tokens_total,
        tokens_per_sec: r.tokens_per_sec,
        eta_secs: r.eta_secs,
        message: r.message.clone(),
        ..Default::default()
    };
    match state {
        JobState::Prefill { layer, layers } => {
            p.layer = *layer;
            p.layers = *layers;
        }
        JobState::Failed { message } => p.message = message.clone(),
        JobState::Retrying { reason, .. } if p.message.is_empty() => p.message = reason.clone(),
        _ => {}
    }
    p
}
