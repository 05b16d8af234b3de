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
//! Nothing but the header waits on the host: transfers run on NCCL's stream and kernels on the
//! compute stream, ordered per buffer by cudarc's events, so with `overlap` the second
//! micro-batch's dispatch is in flight while the first computes (two-batch overlap).

use std::time::Instant;

use ringmoe_comm::nccl::NcclCommunicator;
use ringmoe_model::moe::Routing;
use ringmoe_parallel::{DROPPED, ExpertParallel, MoeStats, ParallelError, assign_slots};

use crate::device::{CudaBackend, DeviceTensor, DeviceWeight};
use crate::{CudaError, Result};

/// Words before the per-batch counts in a header.
const HEADER: usize = 3;

/// One expert's fused `[gate; up]` and `down` weights on this GPU.
pub(crate) struct ExpertRef<'a> {
    pub gate_up: &'a DeviceWeight,
    pub down: &'a DeviceWeight,
}

/// One layer's routed experts over the NCCL group: returns the gate-weighted expert output of
/// this rank's tokens `[tokens, hidden]`. `experts[e]` is `Some` for the experts loaded here.
/// Every rank calls this for the same layer.
#[allow(clippy::too_many_arguments)]
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
    let batches: Vec<(usize, usize)> = if ep.overlap {
        vec![(0, tokens / 2), (tokens / 2, tokens)]
    } else {
        vec![(0, tokens)]
    };
    let expert_of = |slot: u32| routing.expert_ids[slot as usize] as usize;
    // Per batch, per destination: the slots sent there, grouped by expert (stable: token order).
    let orders: Vec<Vec<Vec<u32>>> = batches
        .iter()
        .map(|&(s, e)| {
            let mut order = vec![Vec::new(); world];
            for slot in (s * k) as u32..(e * k) as u32 {
                let d = dest[slot as usize];
                if d != DROPPED {
                    order[d as usize].push(slot);
                }
            }
            for o in &mut order {
                o.sort_by_key(|&slot| expert_of(slot));
            }
            order
        })
        .collect();

    // 1. Headers: what every source sends this rank, per batch and expert.
    let width = HEADER + batches.len() * n;
    let version = ep.placement.version;
    let mut words = Vec::with_capacity(world * width);
    for w in 0..world {
        words.extend([version as u32, (version >> 32) as u32, n as u32]);
        for order in &orders {
            let mut counts = vec![0u32; n];
            for &slot in &order[w] {
                counts[expert_of(slot)] += 1;
            }
            words.extend(counts);
        }
    }
    let sent = b.upload_words(&words)?;
    let mut got = b.zero_words(world * width)?;
    let equal = vec![width; world];
    let t = Instant::now();
    let pending = comm.start_all_to_all_v(&sent, &equal, &mut got, &equal)?;
    comm.finish(pending)?;
    let got = b.download_words(&got)?;
    stats.wait_secs += t.elapsed().as_secs_f64();
    // recv[batch][source][expert]: rows this rank computes.
    let recv = check_headers(ep, layer, me, experts, &got, width, batches.len())?;

    // 2. Dispatch every batch.
    let mut flights = Vec::with_capacity(batches.len());
    for (bi, order) in orders.iter().enumerate() {
        let rows: Vec<usize> = order
            .iter()
            .flatten()
            .map(|&slot| slot as usize / k)
            .collect();
        let send = b.gather_rows(x, &rows)?;
        let send_counts: Vec<usize> = order.iter().map(|o| o.len() * hidden).collect();
        let recv_rows: Vec<usize> = recv[bi].iter().map(|c| c.iter().sum()).collect();
        let mut incoming = b.zeros(vec![recv_rows.iter().sum(), hidden])?;
        let recv_counts: Vec<usize> = recv_rows.iter().map(|r| r * hidden).collect();
        let pending = comm.start_all_to_all_v(
            send.buffer(),
            &send_counts,
            incoming.buffer_mut(),
            &recv_counts,
        )?;
        for (w, o) in order.iter().enumerate() {
            if w != me {
                stats.rows_remote += o.len() as u64;
                stats.bytes_sent += (o.len() * hidden * 4) as u64;
            }
        }
        flights.push((send, incoming, send_counts, recv_counts, pending));
    }

    // 3. Compute each batch as its rows arrive and post the results back.
    let mut returns = Vec::with_capacity(batches.len());
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
    let mut outs = Vec::with_capacity(batches.len());
    for ((&(s, e), order), (results, back, pending)) in batches.iter().zip(&orders).zip(returns) {
        let t = Instant::now();
        comm.finish(pending)?;
        stats.wait_secs += t.elapsed().as_secs_f64();
        drop(results);
        let zero_row = back.shape()[0] - 1;
        let mut row_of_slot = vec![zero_row; (e - s) * k];
        for (r, &slot) in order.iter().flatten().enumerate() {
            row_of_slot[slot as usize - s * k] = r;
        }
        let mut rows = Vec::with_capacity((e - s) * k);
        let mut ws = Vec::with_capacity((e - s) * k);
        for t in s..e {
            let mut slots: Vec<usize> = (t * k..(t + 1) * k).collect();
            slots.sort_by_key(|&slot| routing.expert_ids[slot]);
            for slot in slots {
                rows.push(row_of_slot[slot - s * k]);
                ws.push(routing.weights[slot]);
            }
        }
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

/// Parses and checks every source's header: `recv[batch][source][expert]` row counts.
fn check_headers(
    ep: &ExpertParallel,
    layer: usize,
    me: usize,
    experts: &[Option<ExpertRef<'_>>],
    got: &[u32],
    width: usize,
    batches: usize,
) -> std::result::Result<Vec<Vec<Vec<usize>>>, ParallelError> {
    let n = experts.len();
    let p = &ep.placement;
    let world = got.len() / width;
    let bad = |from: usize, msg: String| {
        ParallelError::Dispatch(format!(
            "worker {me}, layer {layer}: header from rank {from}: {msg}"
        ))
    };
    let mut recv = vec![vec![vec![0usize; n]; world]; batches];
    for (from, h) in got.chunks_exact(width).enumerate() {
        let theirs = h[0] as u64 | ((h[1] as u64) << 32);
        if theirs != p.version {
            return Err(ParallelError::StalePlacement {
                worker: me,
                peer: from,
                mine: p.version,
                theirs,
            });
        }
        if h[2] as usize != n {
            return Err(bad(
                from,
                format!("names {} experts, the layer has {n}", h[2]),
            ));
        }
        for (bi, counts) in h[HEADER..].chunks_exact(n.max(1)).enumerate().take(batches) {
            for (e, &c) in counts.iter().enumerate() {
                if c > 0 && (!p.hosts(layer, e, me) || experts[e].is_none()) {
                    return Err(bad(
                        from,
                        format!(
                            "{c} rows for expert {e}, which this worker does not host (placement \
                             version {})",
                            p.version
                        ),
                    ));
                }
                recv[bi][from][e] = c as usize;
            }
        }
    }
    Ok(recv)
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
    let (rows, hidden) = incoming.dims2("moe_parallel")?;
    if rows == 0 {
        return b.rows(incoming, 0, 0);
    }
    // Where each (source, expert) run starts in the received buffer.
    let mut start = vec![vec![0usize; experts.len()]; counts.len()];
    let mut at = 0;
    for (src, c) in counts.iter().enumerate() {
        for (e, &n) in c.iter().enumerate() {
            start[src][e] = at;
            at += n;
        }
    }
    // Expert-major permutation: perm[i] = received row of the i-th expert-major row.
    let mut perm = Vec::with_capacity(rows);
    let (mut sizes, mut gate_up, mut down) = (Vec::new(), Vec::new(), Vec::new());
    for (e, w) in experts.iter().enumerate() {
        let total: usize = counts.iter().map(|c| c[e]).sum();
        if total == 0 {
            continue;
        }
        let w = w.as_ref().ok_or_else(|| {
            invalid(format!(
                "layer {layer}: rows for expert {e}, not loaded here"
            ))
        })?;
        for (src, c) in counts.iter().enumerate() {
            perm.extend(start[src][e]..start[src][e] + c[e]);
        }
        sizes.push(total);
        gate_up.push(w.gate_up);
        down.push(w.down);
        ep.load.record(layer, e, me, total as u64);
    }
    let xg = b.gather_rows(incoming, &perm)?;
    let gu = b.grouped_linear(&xg, &sizes, &gate_up)?;
    let yg = b.grouped_linear(&b.swiglu(&gu)?, &sizes, &down)?;
    stats.rows_computed += rows as u64;
    // Back to arrival order: out[perm[i]] = yg[i].
    let mut inverse = vec![0usize; rows];
    for (i, &r) in perm.iter().enumerate() {
        inverse[r] = i;
    }
    let out = b.gather_rows(&yg, &inverse)?;
    debug_assert_eq!(out.shape(), [rows, hidden]);
    Ok(out)
}
