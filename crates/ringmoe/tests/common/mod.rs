//! What several integration tests of the binary share.

pub mod procs;

use anyhow::Result;
use ringmoe_model::{LogitsFor, Model};
use ringmoe_proto::client::{self, Input};
use ringmoe_proto::proto;

/// Single-process reference: per-token NLL and `n` greedy tokens.
pub fn reference(model: &Model, ids: &[u32], n: usize) -> Result<(Vec<f32>, Vec<u32>)> {
    let mut cache = model.new_cache();
    let (hidden, _) = model.forward_hidden(ids, &mut cache)?;
    let vocab = model.config.vocab_size;
    let mut nll = Vec::with_capacity(ids.len() - 1);
    for s in (0..ids.len() - 1).step_by(512) {
        let e = (s + 512).min(ids.len() - 1);
        let logits = model.logits(&hidden.rows(s, e)?)?;
        for (i, row) in logits.as_slice().chunks(vocab).enumerate() {
            nll.push(ringmoe_model::model::nll_of(row, ids[s + i + 1] as usize));
        }
    }
    let last = ids.len() - 1;
    let mut logits = model.logits(&hidden.rows(last, last + 1)?)?.into_vec();
    let mut out = Vec::new();
    loop {
        let next = argmax(&logits);
        out.push(next);
        if out.len() == n {
            return Ok((nll, out));
        }
        logits = model
            .forward(&[next], &mut cache, LogitsFor::Last)?
            .logits
            .into_vec();
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Submits `ids` and opens the job's progress stream.
pub async fn submit_watching(
    addr: &str,
    spec: proto::JobSpec,
    ids: &[u32],
) -> Result<(client::Client, u64, tonic::Streaming<proto::JobProgress>)> {
    let mut cl = client::connect(addr, 64 << 20).await?;
    let id = client::submit(
        &mut cl,
        spec,
        Input::Tokens(ids.to_vec()),
        client::UPLOAD_CHUNK,
        |_| {},
    )
    .await?
    .job_id;
    let s = cl
        .watch_job(proto::WatchJobRequest { job_id: id })
        .await?
        .into_inner();
    Ok((cl, id, s))
}
