//! What ring attention actually allocates: a counting global allocator measures the peak of live
//! heap bytes while 8 in-process ranks run the ring, against a budget that is O(L/P) per rank —
//! the rank's own K/V, the copy it sends, the block arriving, and its query-sized buffers. A
//! design that gathered every K/V block on each rank would need P times the K/V per rank.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Result, ensure};
use ringmoe_comm::local::on_every_rank;
use ringmoe_comm::{Kind, Tag, in_process};
use ringmoe_core::attention::AttentionParams;
use ringmoe_core::testing::rand_vec;
use ringmoe_parallel::{AttentionMode, RingStats, ShardPlan, Sharding, ring_attention_mode};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the system allocator with the caller's arguments unchanged,
// so the `GlobalAlloc` contract holds exactly as it does for `System`; the counters are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this `layout` (the caller's guarantee).
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn ring_attention_allocates_o_of_l_over_p_per_rank() -> Result<()> {
    let (len, world) = (16 * 1024, 8);
    let params = AttentionParams {
        n_heads: 2,
        n_kv_heads: 2,
        head_dim: 64,
        scale: 0.125,
        causal: true,
    };
    let w = params.n_kv_heads * params.head_dim;
    let plan = ShardPlan::new(len, world, Sharding::Zigzag)?;
    let comms = in_process(world, Duration::from_secs(60));
    let inputs: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..world)
        .map(|r| {
            let n = plan.positions(r).len();
            let seed = r as u64 * 3;
            (
                rand_vec(n * w, seed, 1.0),
                rand_vec(n * w, seed + 1, 1.0),
                rand_vec(n * w, seed + 2, 1.0),
            )
        })
        .collect();
    let baseline = LIVE.load(Ordering::SeqCst);
    PEAK.store(baseline, Ordering::SeqCst);
    let stats = on_every_rank(&comms, |c| -> Result<RingStats> {
        let (q, k, v) = &inputs[c.rank()];
        let tag = Tag::new(1, 0, 0, Kind::Ring);
        let (out, stats) =
            ring_attention_mode(c, &plan, &params, &AttentionMode::Dense, q, k, v, tag)?;
        drop(out);
        Ok(stats)
    })
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let peak = PEAK.load(Ordering::SeqCst) - baseline;

    // Per rank: a K/V block (k and v) and a query-sized buffer, for its L/P tokens.
    let block = (len / world) * w * 4 * 2;
    let qbuf = (len / world) * w * 4;
    for (r, s) in stats.iter().enumerate() {
        ensure!(
            s.peak_block_bytes as usize <= 3 * block,
            "rank {r} held {} bytes of K/V blocks at once (3 blocks: {})",
            s.peak_block_bytes,
            3 * block
        );
    }
    // Four blocks (the k/v copies handed over, which become the block in hand; the copy being
    // sent; the block arriving; one of slack) and three query-sized buffers (running output, a
    // block's partial output, the kernel's per-tile outputs), per rank; plus 4 MiB for
    // thread-local scratch.
    let budget = world * (4 * block + 3 * qbuf) + (4 << 20);
    let gather_all = world * world * block;
    ensure!(
        peak <= budget,
        "peak live heap {peak} B over {world} ranks exceeds the O(L/P) budget {budget} B"
    );
    ensure!(budget < gather_all, "the budget must tell O(L/P) from O(L)");
    eprintln!("peak {peak} B, budget {budget} B, gather-all would hold {gather_all} B");
    Ok(())
}
