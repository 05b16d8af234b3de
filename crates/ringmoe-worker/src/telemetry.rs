//! The worker's spans and metrics: a span per prefill layer (with that layer's ring and
//! all-to-all traffic), and after every job its communication totals, expert rows and K/V.

use ringmoe_comm::{CommTotals, Communicator, Kind};
use ringmoe_telemetry::metrics;
use tracing::{Span, info_span};

use crate::*;

/// The `prefill` span and the span of the layer in progress.
pub(crate) struct LayerSpans {
    prefill: Option<Span>,
    layer: Option<(Span, CommTotals)>,
}

fn layer_span(parent: &Span, layer: usize) -> Span {
    info_span!(
        parent: parent,
        "layer",
        layer,
        ring_bytes = tracing::field::Empty,
        ring_wait_secs = tracing::field::Empty,
        all_to_all_bytes = tracing::field::Empty,
        all_to_all_wait_secs = tracing::field::Empty,
    )
}

impl LayerSpans {
    pub fn start(comm: &Communicator, tokens: usize, layers: usize) -> Self {
        let prefill = info_span!("prefill", tokens, layers);
        let first = layer_span(&prefill, 0);
        Self {
            layer: Some((first, comm.totals())),
            prefill: Some(prefill),
        }
    }

    /// `done` of `layers` layers are done: closes the layer span (with its traffic), opens the
    /// next, or closes the prefill after the last.
    pub fn layer_done(&mut self, done: usize, layers: usize, comm: &Communicator) {
        let now = comm.totals();
        if let Some((span, before)) = self.layer.take() {
            let d = now.since(&before);
            let (ring, disp, comb) = (
                d.get(Kind::Ring),
                d.get(Kind::Dispatch),
                d.get(Kind::Combine),
            );
            span.record("ring_bytes", ring.bytes_sent + ring.bytes_received);
            span.record("ring_wait_secs", ring.wait_secs);
            span.record(
                "all_to_all_bytes",
                disp.bytes_sent + disp.bytes_received + comb.bytes_sent + comb.bytes_received,
            );
            span.record("all_to_all_wait_secs", disp.wait_secs + comb.wait_secs);
        }
        match &self.prefill {
            Some(p) if done < layers => self.layer = Some((layer_span(p, done), now)),
            _ => self.prefill = None,
        }
    }
}

/// Describes and records a finished job part: traffic by op, the expert rows this worker
/// computed since the last job, and the job count by outcome.
pub(crate) fn job_done(run: &JobRun<'_>, totals: &CommTotals, ok: bool) {
    let loaded = run.loaded;
    for (k, t) in &totals.0 {
        let op = [("op", k.name())];
        if t.bytes_sent > 0 {
            metrics::counter(
                "ringmoe_comm_bytes_total",
                "Payload bytes this worker sent to its peers, by operation.",
                &op,
                t.bytes_sent as f64,
            );
        }
        if t.wait_secs > 0.0 {
            metrics::counter(
                "ringmoe_comm_wait_seconds_total",
                "Seconds this worker's receives waited for peers (transfer not hidden behind compute), by operation.",
                &op,
                t.wait_secs,
            );
        }
    }
    let mut reported = loaded
        .rows_reported
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    // The version's tracker counts only the rows of its model; the growth since the last job
    // part on it is this part's rows.
    let totals = loaded.load.totals();
    for ((layer, expert), rows) in totals {
        let before = reported.insert((layer, expert), rows).unwrap_or(0);
        if rows > before {
            metrics::counter(
                "ringmoe_expert_rows_total",
                "Token rows computed by the experts this worker hosts, by model, layer and expert.",
                &[
                    ("model", &loaded.name),
                    ("layer", &layer.to_string()),
                    ("expert", &expert.to_string()),
                ],
                (rows - before) as f64,
            );
        }
    }
    metrics::counter(
        "ringmoe_worker_jobs_total",
        "Job parts this worker ran, by outcome.",
        &[("outcome", if ok { "done" } else { "failed" })],
        1.0,
    );
}

/// Bytes of model weights `worker` holds (in their in-memory precision) after a load.
pub(crate) fn weight_bytes(worker: &str, precision: &str, bytes: u64) {
    metrics::gauge(
        "ringmoe_worker_weight_bytes",
        "Bytes of model weights this worker holds, in the precision they are held in.",
        &[("worker", worker), ("precision", precision)],
        bytes as f64,
    );
}

/// What the latest placement load read and how long it took (`incremental`: only the experts
/// it added were read).
pub(crate) fn placement_load(worker: &str, incremental: bool, bytes_read: u64, secs: f64) {
    let kind = if incremental { "incremental" } else { "full" };
    let labels = [("worker", worker), ("kind", kind)];
    metrics::gauge(
        "ringmoe_worker_placement_load_bytes",
        "Bytes the latest placement load of this kind read from the checkpoint.",
        &labels,
        bytes_read as f64,
    );
    metrics::gauge(
        "ringmoe_worker_placement_load_seconds",
        "Seconds the latest placement load of this kind took.",
        &labels,
        secs,
    );
    metrics::counter(
        "ringmoe_worker_placement_loads_total",
        "Placement loads, full (a whole model) or incremental (only the experts that moved).",
        &labels,
        1.0,
    );
}

/// K/V bytes a job part holds on `worker` (0 when it ends).
pub(crate) fn kv_bytes(worker: &str, bytes: u64) {
    metrics::gauge(
        "ringmoe_kv_bytes",
        "Bytes of K/V cache the job part running on this worker holds.",
        &[("worker", worker)],
        bytes as f64,
    );
}
