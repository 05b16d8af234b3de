//! Expert parallelism on device buffers over NCCL: the device counterpart of
//! `ringmoe_parallel::moe_parallel`, with the same dispatch decisions (the shared
//! [`assign_slots`]: same replica per slot, same capacity drops), the same per-expert grouping
//! and the same combine order, so a GPU group routes exactly like a CPU group.
//!
//! NCCL needs every receive size before a transfer, so one layer is:
//! 1. **Header.** One `all_to_all_v` of `u32` words: to every peer `[version lo, version hi,
//!    experts, counts of micro-batch 0 per expert, counts of micro-batch 1 …]`. Downloaded to the
//!    host and checked like the host frames (placement version, expert count, hosted experts).
//!    This is the layer's one device → host wait besides the router's top-k.
//! 2. **Dispatch.** Per micro-batch, the rows for all peers are gathered on the device (grouped
//!    by destination, then expert ascending, token order within) and sent by `all_to_all_v` on
//!    the NCCL stream.
//! 3. **Compute.** Received rows are permuted expert-major (sources in rank order within an
//!    expert) by a gather, run through the grouped gate/up GEMM, SwiGLU and the grouped down
//!    GEMM, and permuted back into each source's order; the reverse `all_to_all_v` returns them.
//! 4. **Combine.** The owner sums each token's expert outputs times their gate weights in
//!    increasing expert id; a dropped slot reads a zero row kept past the returned ones.
//!
//! Transfers run on NCCL's stream and kernels on the compute stream, ordered per buffer by
//! cudarc's events. The host waits (bounded by the communicator's timeout) for the header, and
//! for each dispatch before enqueuing its compute; with `overlap` the second micro-batch's
//! dispatch is in flight while the first computes, and the first's return while the second
//! computes (two-batch overlap).

use std::time::Instant;

use ringmoe_comm::nccl::NcclCommunicator;
use ringmoe_model::moe::Routing;
use ringmoe_parallel::{DROPPED, ExpertParallel, MoeStats, assign_slots};

use crate::device::{CudaBackend, DeviceTensor, DeviceWeight};
use crate::dispatch::{DispatchPlan, expert_major, parse_headers};
use crate::{CudaError, Result};

/// One expert's fused `[gate; up]` and `down` weights on this GPU.
pub(crate) struct ExpertRef<'a> {
    pub gate_up: &'a DeviceWeight,
    pub down: &'a DeviceWeight,
}

/// One layer's routed experts over the NCCL group: returns the gate-weighted expert output of
/// this rank's tokens `[tokens, hidden]`. `experts[e]` is `Some` for the experts loaded here.
/// Every rank calls this for the same layer. `MoeStats::compute_secs` is host time to enqueue
/// the expert kernels (they run asynchronously); `wait_secs` is host time blocked on transfers.
pub(crate) fn moe_parallel(
    b: &CudaBackend,
    comm: &NcclCommunicator,
    ep: &ExpertParallel,
    layer: usize,
    experts: &[Option<ExpertRef<'_>>],
    x: &DeviceTensor,
    routing: &Routing,
) -> Result<(DeviceTensor, MoeStats)> {
    let (tokens, hidden) = x.dims2("moe_parallel")?;
    let (world, me, n, k) = (comm.world_size(), comm.rank(), experts.len(), routing.top_k);
    if routing.tokens() != tokens {
        return Err(invalid(format!(
            "layer {layer}: routing for {} tokens, {tokens} rows of input",
            routing.tokens()
        )));
    }
    let dest = assign_slots(ep, layer, n, routing, me)?;
    let mut stats = MoeStats {
        slots: (tokens * k) as u64,
        dropped: dest.iter().filter(|&&d| d == DROPPED).count() as u64,
        ..MoeStats::default()
    };
    let plan = DispatchPlan::new(routing, &dest, world, ep.overlap);
    let nb = plan.batches.len();

    // 1. Headers: what every source sends this rank, per batch and expert.
    let width = plan.header_width(n);
    let sent = b.upload_words(&plan.header(ep.placement.version, n, routing))?;
    let mut got = b.zero_words(world * width)?;
    let equal = vec![width; world];
    let t = Instant::now();
    let pending = comm.start_all_to_all_v(&sent, &equal, &mut got, &equal)?;
    comm.finish(pending)?;
    let got = b.download_words(&got)?;
    stats.wait_secs += t.elapsed().as_secs_f64();
    let loaded = |e: usize| experts.get(e).is_some_and(Option::is_some);
    // recv[batch][source][expert]: rows this rank computes.
    let recv = parse_headers(
        &ep.placement,
        layer,
        me,
        n,
        loaded,
        &got[..world * width],
        nb,
    )?;

    // 2. Dispatch every batch.
    let mut flights = Vec::with_capacity(nb);
    for (bi, counts) in recv.iter().enumerate() {
        let send = b.gather_rows(x, &plan.send_tokens(bi))?;
        let sent_rows = plan.send_rows(bi);
        let send_counts: Vec<usize> = sent_rows.iter().map(|r| r * hidden).collect();
        let recv_rows: Vec<usize> = counts.iter().map(|c| c.iter().sum()).collect();
        let mut incoming = b.zeros(vec![recv_rows.iter().sum(), hidden])?;
        let recv_counts: Vec<usize> = recv_rows.iter().map(|r| r * hidden).collect();
        let pending = comm.start_all_to_all_v(
            send.buffer(),
            &send_counts,
            incoming.buffer_mut(),
            &recv_counts,
        )?;
        for (w, &r) in sent_rows.iter().enumerate() {
            if w != me {
                stats.rows_remote += r as u64;
                stats.bytes_sent += (r * hidden * 4) as u64;
            }
        }
        flights.push((send, incoming, send_counts, recv_counts, pending));
    }

    // 3. Compute each batch as its rows arrive and post the results back.
    let mut returns = Vec::with_capacity(nb);
    for (bi, (send, incoming, send_counts, recv_counts, pending)) in flights.into_iter().enumerate()
    {
        let t = Instant::now();
        comm.finish(pending)?;
        stats.wait_secs += t.elapsed().as_secs_f64();
        drop(send);
        let t = Instant::now();
        let results = compute(b, ep, layer, me, experts, &incoming, &recv[bi], &mut stats)?;
        stats.compute_secs += t.elapsed().as_secs_f64();
        for (w, c) in recv_counts.iter().enumerate() {
            if w != me {
                stats.bytes_sent += (c * 4) as u64;
            }
        }
        // One zero row past the returned ones: dropped slots read it.
        let sent_rows = send_counts.iter().sum::<usize>() / hidden.max(1);
        let mut back = b.zeros(vec![sent_rows + 1, hidden])?;
        let pending = comm.start_all_to_all_v(
            results.buffer(),
            &recv_counts,
            back.buffer_mut(),
            &send_counts,
        )?;
        returns.push((results, back, pending));
    }

    // 4. Combine per batch, in increasing expert id per token.
    let mut outs = Vec::with_capacity(nb);
    for (bi, (results, back, pending)) in returns.into_iter().enumerate() {
        let t = Instant::now();
        comm.finish(pending)?;
        stats.wait_secs += t.elapsed().as_secs_f64();
        drop(results);
        let (rows, ws) = plan.combine_rows(bi, routing);
        outs.push(b.combine(&back, &rows, &ws, k)?);
    }
    let out = if outs.len() == 1 {
        outs.pop().ok_or_else(|| invalid("no micro-batch".into()))?
    } else {
        b.concat_rows(&outs)?
    };
    Ok((out, stats))
}

fn invalid(msg: String) -> CudaError {
    CudaError::Invalid {
        op: "moe_parallel",
        msg,
    }
}

/// The local experts over one batch's received rows (`counts[source][expert]`, each source's rows
/// grouped by expert): returns the outputs in the order the rows came.
#[allow(clippy::too_many_arguments)]
fn compute(
    b: &CudaBackend,
    ep: &ExpertParallel,
    layer: usize,
    me: usize,
    experts: &[Option<ExpertRef<'_>>],
    incoming: &DeviceTensor,
    counts: &[Vec<usize>],
    stats: &mut MoeStats,
) -> Result<DeviceTensor> {
    let rows = incoming.dims2("moe_parallel")?.0;
    if rows == 0 {
        return b.rows(incoming, 0, 0);
    }
    let em = expert_major(counts);
    let (mut sizes, mut gate_up, mut down) = (Vec::new(), Vec::new(), Vec::new());
    for &(e, total) in &em.groups {
        let w = experts.get(e).and_then(Option::as_ref).ok_or_else(|| {
            invalid(format!(
                "layer {layer}: rows for expert {e}, not loaded here"
            ))
        })?;
        sizes.push(total);
        gate_up.push(w.gate_up);
        down.push(w.down);
        ep.load.record(layer, e, me, total as u64);
    }
    let xg = b.gather_rows(incoming, &em.perm)?;
    let gu = b.grouped_linear(&xg, &sizes, &gate_up)?;
    let yg = b.grouped_linear(&b.swiglu(&gu)?, &sizes, &down)?;
    stats.rows_computed += rows as u64;
    // Back to arrival order.
    b.gather_rows(&yg, &em.inverse)
}
