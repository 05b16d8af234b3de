//! Expert parallelism: the routed experts of a sparse layer run on the workers that host them.
//!
//! Written once ([`moe_parallel_on`]) over any [`Backend`] and [`Collective`]: the host path
//! ([`moe_parallel`]: the CPU backend over the TCP or in-process communicator) and the GPU path
//! (`ringmoe-cuda`: device buffers over NCCL) run this code with the one protocol of
//! [`crate::dispatch`]. On every rank, for one sparse layer:
//! 1. **Assign.** Each routing slot (token, k-th choice) goes to one replica of its expert
//!    ([`Placement::choose`]); slots past an optional per-expert capacity are dropped and counted.
//! 2. **Header.** One all-to-all of `u32` words: to every peer `[version lo, version hi,
//!    experts, counts of micro-batch 0 per expert, counts of micro-batch 1 …]`. Each receiver
//!    checks every header (placement version, expert count, that it hosts and loaded every
//!    expert named) before any row moves; the counts size every receive (NCCL needs them).
//! 3. **Dispatch.** Per micro-batch, the rows for each worker, grouped by expert (ascending) and
//!    in token order within an expert, go out in one all-to-all. The gate weight stays with the
//!    token's owner, which applies it in the combine: sending it would cost a value per row and
//!    change nothing.
//! 4. **Compute.** A receiver permutes the rows of all sources expert-major (sources in rank
//!    order within an expert), runs its local experts over them in one grouped pass, permutes
//!    the results back and returns each source its rows in the order they came.
//! 5. **Combine.** The owner sums each token's expert outputs times their gate weights in
//!    increasing expert id ([`ringmoe_model::moe::combine_plan`], the order of the
//!    single-process combine); a dropped slot reads nothing.
//!
//! With `overlap`, a rank's tokens are split into two micro-batches, both dispatches are posted
//! before either is waited for, and batch A's results are posted back before batch B is computed,
//! so one batch's transfers are in flight while the other computes (two-batch overlap). Every
//! rank uses two micro-batches then, even if it holds fewer than two tokens, so the collectives
//! line up.

use std::sync::Arc;
use std::time::Instant;

use ringmoe_comm::{Communicator, Kind, Tag};
use ringmoe_core::{Backend, Cpu, Tensor};
use ringmoe_model::Model;
use ringmoe_model::moe::{ExpertSet, Routing, expert_compute};

use crate::dispatch::{ExchangePlan, expert_major, parse_headers};
use crate::{Collective, LoadTracker, ParallelError, Placement, Result};

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
    pub fn check<B: Backend, C: Collective<B>>(&self, model: &Model<B>, comm: &C) -> Result<()> {
        self.check_loaded(
            (model.config.num_layers, model.config.moe.num_experts),
            comm.world_size(),
            comm.rank(),
            &model.loaded_experts(),
        )
    }

    /// [`Self::check`] for any backend's model: `(layers, experts)` of the model, the group's
    /// size, this rank, and the experts this rank loaded per sparse layer.
    pub fn check_loaded(
        &self,
        (layers, experts): (usize, usize),
        world: usize,
        me: usize,
        loaded: &[(usize, Vec<usize>)],
    ) -> Result<()> {
        let p = &self.placement;
        p.check_shape(layers, experts, world)?;
        for (l, have) in loaded {
            if let Some(e) = p.hosted(*l, me).into_iter().find(|e| !have.contains(e)) {
                return Err(ParallelError::Plan(ringmoe_plan::PlanError::Placement(
                    format!(
                        "placement version {} puts expert {e} of layer {l} on worker {me}, but \
                         this worker did not load it (loaded: {have:?}); load the worker with \
                         the placement's selection",
                        p.version
                    ),
                )));
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

/// One MoE layer's routed experts over the group on the host: [`moe_parallel_on`] with the CPU
/// backend, `x` being `[tokens, hidden]` rows and `experts` this rank's experts of the layer.
/// Returns the gate-weighted expert output of this rank's tokens (`[tokens, hidden]`). Every
/// rank calls this for the same layer and tag.
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
    let tokens = routing.tokens();
    if x.len() != tokens * hidden {
        return Err(ParallelError::Dispatch(format!(
            "layer {layer}: {} input values for {tokens} tokens of hidden size {hidden}",
            x.len()
        )));
    }
    let x = Tensor::from_vec(x.to_vec(), [tokens, hidden])?;
    let loaded = |e: usize| experts.get(e).is_ok();
    let mut compute = |rows: &Tensor, groups: &[(usize, usize)]| -> Result<Tensor> {
        let y = expert_compute(rows.as_slice(), hidden, groups, experts)?;
        Ok(Tensor::from_vec(y, rows.shape().to_vec())?)
    };
    let (y, stats) = moe_parallel_on(
        &Cpu,
        comm,
        ep,
        (layer, experts.experts.len()),
        &loaded,
        &x,
        routing,
        tag,
        &mut compute,
    )?;
    Ok((y.into_vec(), stats))
}

/// This rank's experts over rows grouped per expert: `(rows, groups)` where `groups` lists
/// `(expert, rows)` in row order; the results in the same row order.
pub type ExpertCompute<'a, B> =
    dyn FnMut(&<B as Backend>::Act, &[(usize, usize)]) -> Result<<B as Backend>::Act> + 'a;

/// One MoE layer's routed experts over the group, on any backend: assign, header, dispatch,
/// compute, combine (see the module doc). `(layer, n)`: the layer and its expert count;
/// `loaded(e)`: whether this rank holds expert `e`; `x`: this rank's `[tokens, hidden]` rows;
/// `compute(rows, groups)`: this rank's experts over rows grouped per expert (`groups` lists
/// `(expert, rows)` in row order), results in the same order. Returns the gate-weighted expert
/// output of this rank's tokens and the layer's figures (`compute_secs` is the time `compute`
/// took to return, which on an asynchronous device is the time to enqueue it).
#[allow(clippy::too_many_arguments)]
pub fn moe_parallel_on<B, C>(
    b: &B,
    comm: &C,
    ep: &ExpertParallel,
    (layer, n): (usize, usize),
    loaded: &dyn Fn(usize) -> bool,
    x: &B::Act,
    routing: &Routing,
    tag: Tag,
    compute: &mut ExpertCompute<'_, B>,
) -> Result<(B::Act, MoeStats)>
where
    B: Backend,
    C: Collective<B>,
{
    let (tokens, hidden) = b.dims(x)?;
    let (world, me, k) = (comm.world_size(), comm.rank(), routing.top_k);
    if routing.tokens() != tokens || routing.weights.len() != routing.expert_ids.len() {
        return Err(ParallelError::Dispatch(format!(
            "layer {layer}: routing of {} slots (top-{k}) for {tokens} rows of input",
            routing.expert_ids.len()
        )));
    }
    let dest = assign_slots(ep, layer, n, routing, me)?;
    let mut stats = MoeStats {
        slots: (tokens * k) as u64,
        dropped: dest.iter().filter(|&&d| d == DROPPED).count() as u64,
        ..MoeStats::default()
    };
    let plan = ExchangePlan::new(routing, &dest, world, ep.overlap);
    let nb = plan.batches.len();
    // Tag steps: the header, then each micro-batch's dispatch and combine.
    let step = |i: usize, kind: Kind| Tag {
        step: tag.step.wrapping_mul(3).wrapping_add(i as u32),
        kind,
        ..tag
    };

    // Headers: what every source sends this rank, per batch and expert.
    let width = plan.header_width(n);
    let t = Instant::now();
    let got = comm.exchange_words(
        b,
        step(0, Kind::Dispatch),
        &plan.header(ep.placement.version, n, routing),
        width,
    )?;
    stats.wait_secs += t.elapsed().as_secs_f64();
    stats.bytes_sent += ((world - 1) * width * 4) as u64;
    // recv[batch][source][expert]: rows this rank computes.
    let recv = parse_headers(&ep.placement, layer, me, n, loaded, &got, nb)?;

    // Dispatch every batch.
    let mut flights = Vec::with_capacity(nb);
    for (bi, counts) in recv.iter().enumerate() {
        let send = b.gather_rows(x, &plan.send_tokens(bi))?;
        let send_rows = plan.send_rows(bi);
        let recv_rows: Vec<usize> = counts.iter().map(|c| c.iter().sum()).collect();
        for (w, &r) in send_rows.iter().enumerate() {
            if w != me {
                stats.rows_remote += r as u64;
                stats.bytes_sent += (r * hidden * 4) as u64;
            }
        }
        let f = comm.start_rows(
            b,
            step(1 + bi, Kind::Dispatch),
            send,
            &send_rows,
            &recv_rows,
        )?;
        flights.push((f, send_rows, recv_rows));
    }

    // Compute each batch as its rows arrive and post the results back.
    let mut returns = Vec::with_capacity(nb);
    for (bi, (f, send_rows, recv_rows)) in flights.into_iter().enumerate() {
        let t = Instant::now();
        let incoming = comm.finish_rows(b, f)?;
        stats.wait_secs += t.elapsed().as_secs_f64();
        let results = if recv_rows.iter().sum::<usize>() == 0 {
            b.zeros(0, hidden)?
        } else {
            let em = expert_major(&recv[bi]);
            for &(e, total) in &em.groups {
                ep.load.record(layer, e, me, total as u64);
            }
            let xg = b.gather_rows(&incoming, &em.perm)?;
            drop(incoming);
            let t = Instant::now();
            let yg = compute(&xg, &em.groups)?;
            stats.compute_secs += t.elapsed().as_secs_f64();
            stats.rows_computed += em.perm.len() as u64;
            // Back to arrival order.
            b.gather_rows(&yg, &em.inverse)?
        };
        for (w, &r) in recv_rows.iter().enumerate() {
            if w != me {
                stats.bytes_sent += (r * hidden * 4) as u64;
            }
        }
        let f = comm.start_rows(
            b,
            step(1 + bi, Kind::Combine),
            results,
            &recv_rows,
            &send_rows,
        )?;
        returns.push(f);
    }

    // Combine each batch, in increasing expert id per token.
    let mut outs = Vec::with_capacity(nb);
    for (bi, f) in returns.into_iter().enumerate() {
        let t = Instant::now();
        let back = comm.finish_rows(b, f)?;
        stats.wait_secs += t.elapsed().as_secs_f64();
        let (rows, ws) = plan.combine_rows(bi, routing);
        outs.push(b.combine(&back, &rows, &ws, k)?);
    }
    let out = if outs.len() == 1 {
        outs.pop()
            .ok_or_else(|| ParallelError::Dispatch("no micro-batch".into()))?
    } else {
        b.concat_rows(&outs)?
    };
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
