//! Ring attention on device buffers over NCCL: each rank holds its shard's queries and K/V; in P
//! steps every K/V block visits every rank. At each step the next block's transfer is enqueued on
//! the NCCL stream *before* the attention kernel on the current block is launched on the compute
//! stream, so transfer and compute overlap; cudarc's per-buffer events make the kernel that reads
//! the received block wait for its transfer, and nothing else waits. Partial results are merged
//! exactly by `(out, lse)` on the device. Positions travel with the plan, not the wire: every rank
//! knows every block's positions (`blocks[r]`), so only K and V move, packed in one buffer.

use ringmoe_comm::nccl::NcclCommunicator;
use ringmoe_core::AttentionParams;

use crate::device::{CudaBackend, DeviceTensor};
use crate::{CudaError, Result};

/// This rank's `(out, lse)` for queries `q` at `q_pos` against the K/V blocks of every rank of
/// `comm`: `k`, `v` are this rank's block (`[blocks[rank].len(), kv_heads, head_dim]`), `blocks[r]`
/// the key positions rank `r` holds. The causal mask is by absolute position.
#[allow(clippy::too_many_arguments)]
pub fn ring_attention(
    b: &CudaBackend,
    comm: &NcclCommunicator,
    p: &AttentionParams,
    q: &DeviceTensor,
    q_pos: &[usize],
    k: &DeviceTensor,
    v: &DeviceTensor,
    blocks: &[Vec<usize>],
) -> Result<(DeviceTensor, DeviceTensor)> {
    let (world, rank) = (comm.world_size(), comm.rank());
    let width = p.n_kv_heads * p.head_dim;
    if blocks.len() != world || k.len() != blocks[rank].len() * width {
        return Err(CudaError::Invalid {
            op: "ring_attention",
            msg: format!(
                "{} blocks for {world} ranks; rank {rank}'s K {:?} for {} positions of width {width}",
                blocks.len(),
                k.shape(),
                blocks.get(rank).map_or(0, Vec::len)
            ),
        });
    }
    let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
    let mut cur = b.pack_kv(k, v)?;
    let mut acc: Option<(DeviceTensor, DeviceTensor)> = None;
    for step in 0..world {
        let owner = (rank + world - step) % world;
        let incoming = if step + 1 < world {
            let from = (rank + world - step - 1) % world;
            let mut buf = b.zeros(vec![2, blocks[from].len() * width])?;
            let pending = comm.start_sendrecv(next, cur.buffer(), prev, buf.buffer_mut())?;
            Some((buf, pending))
        } else {
            None
        };
        let (o, l) = b.attention_packed(p, q, q_pos, &cur, &blocks[owner])?;
        acc = Some(match acc {
            None => (o, l),
            Some((mut ao, mut al)) => {
                b.merge_attention(&mut ao, &mut al, &o, &l)?;
                (ao, al)
            }
        });
        if let Some((buf, pending)) = incoming {
            comm.finish(pending)?;
            cur = buf;
        }
    }
    acc.ok_or_else(|| CudaError::Invalid {
        op: "ring_attention",
        msg: "a group of zero ranks".into(),
    })
}
