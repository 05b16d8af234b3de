#!/usr/bin/env bash
# ringmoe vs llama.cpp on the same bench checkpoint, at the same weight precision, in one run
# with alternating rounds (docs/performance.md, "CPU weights: bf16 and q8").
#
# Builds llama.cpp's llama-bench from the sources vendored in PyPI's llama-cpp-python sdist
# (CPU backend, -march=native), writes the bench model with `ringmoe bench make-model`, converts
# it to GGUF at f32, bf16 and Q8_0 (scripts/bench_llamacpp.py, with llama.cpp's own gguf-py),
# then alternates llama-bench and `ringmoe bench prefill`/`bench decode` and prints medians and
# ratios. Not part of CI: the llama.cpp build takes ~15 minutes on 2 cores.
#
# Usage: scripts/bench_llamacpp.sh [--rounds 5] [--threads 2] [--precisions f32,bf16,q8] [--json]
# Environment: LLAMACPP_DIR (work directory, default target/llamacpp), LLAMACPP_VERSION
# (llama-cpp-python version, default 0.3.36).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${LLAMACPP_DIR:-$ROOT/target/llamacpp}
VERSION=${LLAMACPP_VERSION:-0.3.36}
mkdir -p "$WORK"

# 1. Tools: a venv with cmake and ninja (wheels), numpy, and llama.cpp's gguf-py from the sdist.
if [ ! -x "$WORK/venv/bin/python" ]; then
    python3 -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install --quiet --upgrade pip
    "$WORK/venv/bin/pip" install --quiet cmake ninja numpy
fi
PY=$WORK/venv/bin/python

# 2. llama.cpp sources: the sdist of llama-cpp-python vendors a pinned llama.cpp.
SRC=$WORK/llama_cpp_python-$VERSION
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    "$WORK/venv/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -d "$WORK"
    tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
fi
LLAMA=$SRC/vendor/llama.cpp
"$WORK/venv/bin/pip" install --quiet "$LLAMA/gguf-py"

# 3. llama-bench, CPU backend, tuned for this machine.
BENCH=$WORK/build/bin/llama-bench
if [ ! -x "$BENCH" ]; then
    "$WORK/venv/bin/cmake" -S "$LLAMA" -B "$WORK/build" -G Ninja \
        -DCMAKE_MAKE_PROGRAM="$WORK/venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
    "$WORK/venv/bin/cmake" --build "$WORK/build" --target llama-bench -j "$(nproc)"
fi
(cd "$LLAMA" && echo "llama.cpp commit: $(git rev-parse --short HEAD 2>/dev/null || grep -m1 -o 'b[0-9]\{4,\}' "$SRC/CMakeLists.txt" 2>/dev/null || echo "vendored in llama-cpp-python $VERSION")")

# 4. ringmoe and the bench checkpoint (f32; the GGUFs are converted from it).
cargo build --release -p ringmoe
RINGMOE=$ROOT/target/release/ringmoe
MODEL=$WORK/bench-model
[ -f "$MODEL/model.safetensors" ] || "$RINGMOE" bench make-model --out "$MODEL"
[ -f "$WORK/bench-model-bf16/model.safetensors" ] || "$RINGMOE" bench make-model --out "$WORK/bench-model-bf16" --dtype bf16

# 5. Convert and race.
exec "$PY" "$ROOT/scripts/bench_llamacpp.py" --llama-bench "$BENCH" --ringmoe "$RINGMOE" \
    --model "$MODEL" --model-bf16 "$WORK/bench-model-bf16" --work "$WORK" "$@"
