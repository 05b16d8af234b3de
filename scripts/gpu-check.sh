#!/usr/bin/env bash
# The GPU checks of the CUDA backend, on a machine with an NVIDIA GPU, its driver, and Python with
# PyTorch and NVIDIA's CUDA wheels (nvidia-cuda-nvrtc, nvidia-cublas, nvidia-nccl):
#
#   1. `ringmoe gpu-check`: every CUDA kernel (GEMM f32 and bf16, grouped expert GEMM, RMSNorm,
#      RoPE, SwiGLU, router top-k, attention out/lse) against the CPU kernels, with tolerances,
#      then the attention kernel's TFLOP/s;
#   2. PyTorch's scaled_dot_product_attention on the same shapes (scripts/sdpa_bench.py);
#   3. NCCL with one rank: ring sendrecv and all_to_all_v on device buffers (`bench comm`).
#      Several ranks need several GPUs: `ringmoe bench comm --transport nccl --ranks N`.
#
# Usage: scripts/gpu-check.sh [RINGMOE_BINARY]   (default target/release/ringmoe, which must be
# built with `cargo build --release -p ringmoe --features cuda`; the GPU machine needs no Rust).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/ringmoe}
SHAPES=${SHAPES:-4096:32:8:128,16384:32:8:128,32768:32:8:128}

# cudarc loads libnvrtc.so.12 and libcublas.so.12 by name; NCCL's wheel ships libnccl.so.2,
# which cudarc does not look for, hence the symlink.
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
LIBDIR=$(mktemp -d)
trap 'rm -rf "$LIBDIR"' EXIT
[ -e "$SITE/nvidia/nccl/lib/libnccl.so.2" ] && ln -sf "$SITE/nvidia/nccl/lib/libnccl.so.2" "$LIBDIR/libnccl.so"
NV_LIBS=$(find "$SITE/nvidia" -maxdepth 2 -name lib -type d 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="$LIBDIR:$NV_LIBS${LD_LIBRARY_PATH:-}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "== kernels vs CPU, attention timing"
"$BIN" gpu-check --attention "$SHAPES"
echo "== PyTorch SDPA on the same shapes"
python3 scripts/sdpa_bench.py --attention "$SHAPES"
echo "== NCCL, one rank"
"$BIN" bench comm --transport nccl --ranks 1 --bytes 1M,16M,64M --iters 20
