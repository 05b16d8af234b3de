#!/usr/bin/env bash
# The GPU checks of the CUDA backend, on a machine with an NVIDIA GPU, its driver, and Python with
# PyTorch and NVIDIA's CUDA wheels (nvidia-cuda-nvrtc, nvidia-cublas, nvidia-nccl):
#
#   1. `ringmoe gpu-check`:
#      - every CUDA kernel (GEMM f32 and bf16, grouped expert GEMM bf16 and f32, RMSNorm, RoPE,
#        SwiGLU, router top-k, gather, MoE combine, attention out/lse, the (out, lse) merge)
#        against the CPU kernels, with tolerances;
#      - the fixture parity tests on the CUDA model (tests/fixtures: Mixtral, Qwen3-MoE,
#        Qwen2-MoE, a bf16 Mixtral): logits against transformers' at L = 1, 7, 64, 300, and
#        token-by-token decode through the device K/V cache; f32 weights within 1e-3, bf16 within
#        1e-2 (relative to the largest reference logit); router ids;
#      - ring attention over NCCL with P = --ring-ranks (default 1) against the CPU;
#      - the attention kernel's TFLOP/s, and prefill / MoE-layer tokens/s of the bench model;
#   2. PyTorch's scaled_dot_product_attention on the same shapes (scripts/sdpa_bench.py);
#   3. NCCL with one rank: ring sendrecv and all_to_all_v on device buffers (`bench comm`);
#   4. the cluster on GPU workers: a coordinator and RING_RANKS `worker --device cuda:r --precision
#      f32` processes run a score job and a greedy generate job on the Mixtral fixture; the same
#      jobs on CPU workers are the reference (NLLs within 1e-3, the same tokens).
#
# On a machine with N GPUs, the multi-rank NCCL checks are
#   RING_RANKS=N scripts/gpu-check.sh            (ring attention, rank r on GPU r, zigzag shards)
#   ringmoe bench comm --transport nccl --ranks N
#
# Usage: scripts/gpu-check.sh [RINGMOE_BINARY]   (default target/release/ringmoe, which must be
# built with `cargo build --release -p ringmoe --features cuda`; the GPU machine needs no Rust).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/ringmoe}
SHAPES=${SHAPES:-4096:32:8:128,16384:32:8:128,32768:32:8:128}
RING_RANKS=${RING_RANKS:-1}

# cudarc loads libnvrtc.so.12 and libcublas.so.12 by name; NCCL's wheel ships libnccl.so.2,
# which cudarc does not look for, hence the symlink.
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
LIBDIR=$(mktemp -d)
trap 'rm -rf "$LIBDIR"' EXIT
[ -e "$SITE/nvidia/nccl/lib/libnccl.so.2" ] && ln -sf "$SITE/nvidia/nccl/lib/libnccl.so.2" "$LIBDIR/libnccl.so"
NV_LIBS=$(find "$SITE/nvidia" -maxdepth 2 -name lib -type d 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="$LIBDIR:$NV_LIBS${LD_LIBRARY_PATH:-}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "== kernels vs CPU, CUDA model vs transformers (fixtures), NCCL ring attention, timings"
"$BIN" gpu-check --attention "$SHAPES" --ring-ranks "$RING_RANKS"
echo "== PyTorch SDPA on the same shapes"
python3 scripts/sdpa_bench.py --attention "$SHAPES"
echo "== NCCL, one rank"
"$BIN" bench comm --transport nccl --ranks 1 --bytes 1M,16M,64M --iters 20

echo "== the cluster on $RING_RANKS GPU worker(s) vs CPU workers (Mixtral fixture)"
WORK=$(mktemp -d)
trap 'rm -rf "$LIBDIR" "$WORK"; kill $(jobs -p) 2>/dev/null || true' EXIT
head -c 3000 README.md > "$WORK/text.txt"
cluster() { # DEVICE_PREFIX OUT_PREFIX: coordinator + RING_RANKS workers, a score and a generate job
  local dev=$1 out=$2 pids=()
  "$BIN" coordinator --addr 127.0.0.1:0 --store "$WORK/store-$dev" --model tests/fixtures/mixtral-tiny \
    --min-workers "$RING_RANKS" > "$WORK/coord-$dev.out" 2> "$WORK/coord-$dev.err" &
  pids+=($!)
  for _ in $(seq 50); do [ -s "$WORK/coord-$dev.out" ] && break; sleep 0.2; done
  local addr
  addr=$(head -1 "$WORK/coord-$dev.out" | awk '{print $NF}')   # "listening on HOST:PORT"
  for r in $(seq 0 $((RING_RANKS - 1))); do
    local d=cpu
    [ "$dev" = cuda ] && d=cuda:$r
    "$BIN" worker --coordinator "$addr" --device "$d" --precision f32 2> "$WORK/worker-$dev-$r.err" > /dev/null &
    pids+=($!)
  done
  sleep 2
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null || { tail -n 5 "$WORK"/*-"$dev"*.err; echo "a $dev process exited"; return 1; }
  done
  # A job waits for --min-workers: bound the wait if a worker dies later.
  timeout 900 "$BIN" submit --addr "$addr" --json --file "$WORK/text.txt" --mode score > "$out-score.json"
  timeout 900 "$BIN" submit --addr "$addr" --json --file "$WORK/text.txt" --max-new-tokens 32 > "$out-gen.json"
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
cluster cpu "$WORK/cpu"
cluster cuda "$WORK/cuda"
python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
load = lambda n: json.load(open(f"{w}/{n}.json"))
cs, gs, cg, gg = load("cpu-score"), load("cuda-score"), load("cpu-gen"), load("cuda-gen")
assert cs["state"] == gs["state"] == cg["state"] == gg["state"] == "done", (cs["state"], gs["state"])
d = max(abs(a - b) for a, b in zip(cs["nll"], gs["nll"]))
same = cg["tokens"] == gg["tokens"]
print(f"score: {len(gs['nll'])} NLLs, max |GPU - CPU| = {d:.3e} (tolerance 1e-3); "
      f"generate: {len(gg['tokens'])} greedy tokens, {'identical' if same else 'DIFFERENT'}")
sys.exit(0 if d <= 1e-3 and same and len(cs["nll"]) == len(gs["nll"]) else 1)
PY
