//! Expert parallelism: the routed experts of a sparse layer run on the workers that host them.
//!
//! On every rank, for each micro-batch of its tokens:
//! 1. **Dispatch.** Each routing slot (token, k-th choice) goes to one replica of its expert
//!    ([`Placement::choose`]); slots past an optional per-expert capacity are dropped and counted.
//!    The rows for each worker are packed grouped by expert (ascending) and in token order within
//!    an expert, behind a header `[version lo, version hi, experts, count per expert]` (u32 bit
//!    patterns in the f32 frame), and exchanged with `all_to_all_v`. The gate weight stays with
//!    the token's owner, which applies it in the combine: sending it would cost a value per row
//!    and change nothing.
//! 2. **Compute.** A receiver checks each frame (placement version, expert count, row count, that
//!    it hosts every expert named) and runs one grouped GEMM pass per local expert over the rows
//!    of all sources together, then returns each source its rows in the order they came.
//! 3. **Combine.** The owner puts the returned rows back in slot order and sums each token's
//!    expert outputs times their gate weights in increasing expert id, the order of the
//!    single-process [`ringmoe_model::moe::combine`]. A rank's own rows never touch the network.
//!
//! With `overlap`, a rank's tokens are split into two micro-batches, both dispatches are posted
//! before either is waited for, and batch A's results are posted back before batch B is computed,
//! so one batch's transfers are in flight while the other computes (two-batch overlap). Every
//! rank uses two micro-batches then, even if it holds fewer than two tokens, so the collectives
//! line up.

use std::sync::Arc;
use std::time::Instant;

use ringmoe_comm::{Communicator, Data, Kind, Payload, Tag};
use ringmoe_model::Model;
use ringmoe_model::layers::Mlp;
use ringmoe_model::moe::{ExpertSet, Routing, combine_rows, expert_compute};

use crate::{LoadTracker, ParallelError, Placement, Result};

/// How a rank runs the routed experts of every sparse layer in a distributed forward.
#[derive(Debug, Clone)]
pub struct ExpertParallel {
    /// The same version on every rank of the group.
    pub placement: Placement,
    /// Where this worker records the rows its experts compute.
    pub load: Arc<LoadTracker>,
    /// `None`: dropless. `Some(f)`: each rank sends at most `⌈f · tokens · top_k / experts⌉` rows
    /// per expert (in token order) and drops the rest.
    pub capacity_factor: Option<f32>,
    /// Two-batch overlap of dispatch/combine transfers with expert compute.
    pub overlap: bool,
}

impl ExpertParallel {
    /// Dropless, no overlap, a fresh load tracker.
    pub fn new(placement: Placement) -> Self {
        Self {
            placement,
            load: Arc::new(LoadTracker::default()),
            capacity_factor: None,
            overlap: false,
        }
    }

    /// Checks that the placement fits the model and the group, and that this rank's model holds
    /// every expert the placement puts on it.
    pub fn check(&self, model: &Model, comm: &Communicator) -> Result<()> {
        let p = &self.placement;
        p.check_shape(
            model.config.num_layers,
            model.config.moe.num_experts,
            comm.world_size(),
        )?;
        let me = comm.rank();
        for (l, layer) in model.layers().iter().enumerate() {
            if let Mlp::Sparse(m) = &layer.mlp {
                for e in p.hosted(l, me) {
                    if m.experts.get(e).is_err() {
                        return Err(ParallelError::Plan(ringmoe_plan::PlanError::Placement(
                            format!(
                                "placement version {} puts expert {e} of layer {l} on worker {me}, \
                             but this worker did not load it (loaded: {:?}); load the worker with \
                             the placement's selection",
                                p.version,
                                m.experts.loaded()
                            ),
                        )));
                    }
                }
            }
        }
        if let Some(f) = self.capacity_factor
            && !(f.is_finite() && f > 0.0)
        {
            return Err(ParallelError::Plan(ringmoe_plan::PlanError::Placement(
                format!("capacity factor must be a positive number, got {f}"),
            )));
        }
        Ok(())
    }
}

/// What one rank's expert-parallel MoE layers did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MoeStats {
    /// Expert GEMMs on this worker (for every source's rows).
    pub compute_secs: f64,
    /// Blocked waiting for dispatch or combine frames.
    pub wait_secs: f64,
    /// Routing slots of this rank's tokens.
    pub slots: u64,
    /// Of those, rows sent to another worker (the rest ran here or were dropped).
    pub rows_remote: u64,
    /// Slots dropped by the capacity limit.
    pub dropped: u64,
    /// Rows this worker's experts computed, for any source.
    pub rows_computed: u64,
    /// Bytes this rank sent to other ranks: dispatch frames (rows and headers) and results.
    pub bytes_sent: u64,
}

impl MoeStats {
    pub fn add(&mut self, o: &MoeStats) {
        self.compute_secs += o.compute_secs;
        self.wait_secs += o.wait_secs;
        self.slots += o.slots;
        self.rows_remote += o.rows_remote;
        self.dropped += o.dropped;
        self.rows_computed += o.rows_computed;
        self.bytes_sent += o.bytes_sent;
    }
}

/// Marks a dropped slot in the destination list of [`assign_slots`].
pub const DROPPED: u32 = u32::MAX;
/// Header words before the per-expert counts.
const HEADER: usize = 3;

fn word(x: u32) -> f32 {
    f32::from_bits(x)
}

fn bad_frame(me: usize, from: usize, layer: usize, msg: String) -> ParallelError {
    ParallelError::Dispatch(format!(
        "worker {me}, layer {layer}: frame from rank {from}: {msg}"
    ))
}

/// One MoE layer's routed experts over the group: dispatch, compute, combine. Returns the
/// gate-weighted expert output of this rank's tokens (`[tokens, hidden]`). Every rank calls this
/// for the same layer and tag.
#[allow(clippy::too_many_arguments)]
pub fn moe_parallel(
    comm: &Communicator,
    ep: &ExpertParallel,
    layer: usize,
    experts: &ExpertSet,
    x: &[f32],
    hidden: usize,
    routing: &Routing,
    tag: Tag,
) -> Result<(Vec<f32>, MoeStats)> {
    let (tokens, k) = (routing.tokens(), routing.top_k);
    if x.len() != tokens * hidden {
        return Err(ParallelError::Dispatch(format!(
            "layer {layer}: {} input values for {tokens} tokens of hidden size {hidden}",
            x.len()
        )));
    }
    let layer_ctx = Layer {
        comm,
        ep,
        layer,
        experts,
        hidden,
    };
    let mut stats = MoeStats {
        slots: (tokens * k) as u64,
        ..MoeStats::default()
    };
    let dest = layer_ctx.assign(routing)?;
    stats.dropped = dest.iter().filter(|&&d| d == DROPPED).count() as u64;
    let batches: Vec<(usize, usize)> = if ep.overlap {
        vec![(0, tokens / 2), (tokens / 2, tokens)]
    } else {
        vec![(0, tokens)]
    };
    let micro = |b: usize, kind: Kind| Tag {
        step: tag.step.wrapping_mul(2).wrapping_add(b as u32),
        kind,
        ..tag
    };
    // Post every micro-batch's dispatch, then serve and post back each in turn.
    let mut orders = Vec::with_capacity(batches.len());
    let mut pending = Vec::with_capacity(batches.len());
    for (b, &(s, e)) in batches.iter().enumerate() {
        let (sends, order) = layer_ctx.pack(x, routing, &dest, (s, e), &mut stats);
        pending.push(comm.start_all_to_all_v(micro(b, Kind::Dispatch), sends)?);
        orders.push(order);
    }
    let mut back = Vec::with_capacity(batches.len());
    for (b, p) in pending.into_iter().enumerate() {
        let t = Instant::now();
        let frames = comm.wait_all_to_all_v(p)?;
        stats.wait_secs += t.elapsed().as_secs_f64();
        let results = layer_ctx.serve(frames, &mut stats)?;
        back.push(comm.start_all_to_all_v(micro(b, Kind::Combine), results)?);
    }
    let mut y = vec![0f32; tokens * k * hidden];
    for (p, order) in back.into_iter().zip(&orders) {
        let t = Instant::now();
        let frames = comm.wait_all_to_all_v(p)?;
        stats.wait_secs += t.elapsed().as_secs_f64();
        layer_ctx.unpack(frames, order, &mut y)?;
    }
    let keep: Vec<bool> = dest.iter().map(|&d| d != DROPPED).collect();
    let identity: Vec<u32> = (0..(tokens * k) as u32).collect();
    let out = combine_rows(&y, hidden, &identity, routing, Some(&keep))?;
    Ok((out, stats))
}

/// The worker that computes each routing slot of rank `me`'s tokens in `layer` (of `n` experts),
/// or [`DROPPED`] past the capacity limit: the j-th slot (in token order) routed to expert `e`
/// goes to [`Placement::choose`]`(layer, e, j, me)`. Shared by the host and the device
/// expert-parallel paths, so both dispatch the same rows to the same replicas.
pub fn assign_slots(
    ep: &ExpertParallel,
    layer: usize,
    n: usize,
    routing: &Routing,
    me: usize,
) -> Result<Vec<u32>> {
    let cap = ep.capacity_factor.map(|f| {
        let per = f as f64 * routing.expert_ids.len() as f64 / n.max(1) as f64;
        per.ceil() as usize
    });
    let mut seen = vec![0usize; n];
    routing
        .expert_ids
        .iter()
        .enumerate()
        .map(|(slot, &e)| {
            let e = e as usize;
            let j = seen.get_mut(e).ok_or_else(|| {
                ParallelError::Dispatch(format!(
                    "layer {layer}: slot {slot} routes to expert {e}, the layer has {n}"
                ))
            })?;
            if cap.is_some_and(|c| *j >= c) {
                return Ok(DROPPED);
            }
            let w = ep.placement.choose(layer, e, *j, me)?;
            *j += 1;
            Ok(w as u32)
        })
        .collect()
}

/// Refuses a dispatch from `peer` made under another placement version than `me`'s.
pub fn check_version(placement: &Placement, me: usize, peer: usize, theirs: u64) -> Result<()> {
    if theirs != placement.version {
        return Err(ParallelError::StalePlacement {
            worker: me,
            peer,
            mine: placement.version,
            theirs,
        });
    }
    Ok(())
}

/// What the steps of one layer share.
struct Layer<'a> {
    comm: &'a Communicator,
    ep: &'a ExpertParallel,
    layer: usize,
    experts: &'a ExpertSet,
    hidden: usize,
}

impl Layer<'_> {
    fn num_experts(&self) -> usize {
        self.experts.experts.len()
    }

    /// The worker of every routing slot (or [`DROPPED`]).
    fn assign(&self, routing: &Routing) -> Result<Vec<u32>> {
        assign_slots(
            self.ep,
            self.layer,
            self.num_experts(),
            routing,
            self.comm.rank(),
        )
    }

    /// The frames of tokens `s..e` for every worker, and the slots each frame's rows belong to.
    fn pack(
        &self,
        x: &[f32],
        routing: &Routing,
        dest: &[u32],
        (s, e): (usize, usize),
        stats: &mut MoeStats,
    ) -> (Vec<Payload>, Vec<Vec<u32>>) {
        let (world, me, h, n, k) = (
            self.comm.world_size(),
            self.comm.rank(),
            self.hidden,
            self.num_experts(),
            routing.top_k,
        );
        let expert_of = |slot: u32| routing.expert_ids[slot as usize] as usize;
        let mut order: Vec<Vec<u32>> = vec![Vec::new(); world];
        for slot in (s * k) as u32..(e * k) as u32 {
            let d = dest[slot as usize];
            if d != DROPPED {
                order[d as usize].push(slot);
            }
        }
        let version = self.ep.placement.version;
        let sends = order
            .iter_mut()
            .enumerate()
            .map(|(w, slots)| {
                // Stable: token order within an expert.
                slots.sort_by_key(|&slot| expert_of(slot));
                let mut frame = Vec::with_capacity(HEADER + n + slots.len() * h);
                frame.extend([
                    word(version as u32),
                    word((version >> 32) as u32),
                    word(n as u32),
                ]);
                let mut counts = vec![0u32; n];
                for &slot in slots.iter() {
                    counts[expert_of(slot)] += 1;
                }
                frame.extend(counts.into_iter().map(word));
                for &slot in slots.iter() {
                    let t = slot as usize / k;
                    frame.extend_from_slice(&x[t * h..(t + 1) * h]);
                }
                if w != me {
                    stats.rows_remote += slots.len() as u64;
                    stats.bytes_sent += (frame.len() * 4) as u64;
                }
                Payload {
                    shape: vec![frame.len()],
                    data: Data::F32(frame),
                }
            })
            .collect();
        (sends, order)
    }

    /// Checks every source's frame, runs the local experts over all their rows and returns each
    /// source its results in its own row order.
    fn serve(&self, frames: Vec<Payload>, stats: &mut MoeStats) -> Result<Vec<Payload>> {
        let (me, h, n, l) = (
            self.comm.rank(),
            self.hidden,
            self.num_experts(),
            self.layer,
        );
        let placement = &self.ep.placement;
        // Per source: rows per expert and the rows themselves.
        let mut parsed: Vec<(Vec<usize>, Vec<f32>)> = Vec::with_capacity(frames.len());
        for (from, p) in frames.into_iter().enumerate() {
            let desc = p.describe();
            let v = p
                .into_f32()
                .ok_or_else(|| bad_frame(me, from, l, format!("expected F32, got {desc}")))?;
            if v.len() < HEADER {
                return Err(bad_frame(
                    me,
                    from,
                    l,
                    format!("{desc} is shorter than its header"),
                ));
            }
            let theirs = v[0].to_bits() as u64 | ((v[1].to_bits() as u64) << 32);
            check_version(placement, me, from, theirs)?;
            let experts = v[2].to_bits() as usize;
            if experts != n || v.len() < HEADER + n {
                return Err(bad_frame(
                    me,
                    from,
                    l,
                    format!("header names {experts} experts, the layer has {n}"),
                ));
            }
            let counts: Vec<usize> = v[HEADER..HEADER + n]
                .iter()
                .map(|c| c.to_bits() as usize)
                .collect();
            let rows: usize = counts.iter().sum();
            if v.len() != HEADER + n + rows * h {
                return Err(bad_frame(
                    me,
                    from,
                    l,
                    format!(
                        "header counts {rows} rows of {h}, the frame carries {} values",
                        v.len() - HEADER - n
                    ),
                ));
            }
            for (e, &c) in counts.iter().enumerate() {
                if c > 0 && (!placement.hosts(l, e, me) || self.experts.get(e).is_err()) {
                    return Err(bad_frame(
                        me,
                        from,
                        l,
                        format!(
                            "{c} rows for expert {e}, which this worker does not host                              (placement version {} hosts it on workers {:?})",
                            placement.version,
                            placement
                                .replicas(l, e)
                                .map(|rs| rs.iter().map(|r| r.worker).collect::<Vec<_>>())
                                .unwrap_or_default()
                        ),
                    ));
                }
            }
            // The rows stay in the received buffer, after the header (no copy).
            parsed.push((counts, v));
        }
        // Where each (source, expert) run starts in its source's frame.
        let body = HEADER + n;
        let starts: Vec<Vec<usize>> = parsed
            .iter()
            .map(|(c, _)| {
                c.iter()
                    .scan(body, |acc, &x| {
                        let s = *acc;
                        *acc += x * h;
                        Some(s)
                    })
                    .collect()
            })
            .collect();
        let mut groups = Vec::new();
        let rows_in: usize = parsed.iter().map(|(c, _)| c.iter().sum::<usize>()).sum();
        let mut input = Vec::with_capacity(rows_in * h);
        for e in 0..n {
            let total: usize = parsed.iter().map(|(c, _)| c[e]).sum();
            if total == 0 {
                continue;
            }
            groups.push((e, total));
            for ((c, rows), st) in parsed.iter().zip(&starts) {
                input.extend_from_slice(&rows[st[e]..st[e] + c[e] * h]);
            }
            self.ep.load.record(l, e, me, total as u64);
        }
        let t = Instant::now();
        let y = expert_compute(&input, h, &groups, self.experts)?;
        stats.compute_secs += t.elapsed().as_secs_f64();
        stats.rows_computed += groups.iter().map(|g| g.1 as u64).sum::<u64>();
        // Hand each source back its rows: expert by expert, sources in order within an expert.
        let mut out: Vec<Vec<f32>> = parsed
            .iter()
            .map(|(c, _)| Vec::with_capacity(c.iter().sum::<usize>() * h))
            .collect();
        let mut at = 0;
        for &(e, _) in &groups {
            for ((c, _), o) in parsed.iter().zip(out.iter_mut()) {
                o.extend_from_slice(&y[at * h..(at + c[e]) * h]);
                at += c[e];
            }
        }
        Ok(out
            .into_iter()
            .enumerate()
            .map(|(w, o)| {
                if w != me {
                    stats.bytes_sent += (o.len() * 4) as u64;
                }
                Payload {
                    shape: vec![o.len() / h.max(1), h],
                    data: Data::F32(o),
                }
            })
            .collect())
    }

    /// Writes the rows each worker returned into slot order.
    fn unpack(&self, frames: Vec<Payload>, order: &[Vec<u32>], y: &mut [f32]) -> Result<()> {
        let (me, h, l) = (self.comm.rank(), self.hidden, self.layer);
        for (w, (p, slots)) in frames.into_iter().zip(order).enumerate() {
            let desc = p.describe();
            let v = p
                .into_f32()
                .filter(|v| v.len() == slots.len() * h)
                .ok_or_else(|| {
                    bad_frame(
                        me,
                        w,
                        l,
                        format!("results are {desc}, expected F32[{}, {h}]", slots.len()),
                    )
                })?;
            for (row, &slot) in v.chunks_exact(h.max(1)).zip(slots) {
                let s = slot as usize;
                y[s * h..(s + 1) * h].copy_from_slice(row);
            }
        }
        Ok(())
    }
}
