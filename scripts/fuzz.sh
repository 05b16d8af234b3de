#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600) with cargo fuzz (libFuzzer; needs a nightly
# toolchain and `cargo install cargo-fuzz`), starting from and adding to fuzz/corpus/<target>.
# Crashes land in fuzz/artifacts/<target>/: fix them, then copy the input into the corpus,
# where `cargo nextest run -p ringmoe-fuzz` replays it on stable in every test run.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(wire safetensors config tokenizer shard_header openai upload)
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "cargo fuzz needs a nightly toolchain (rustup toolchain install nightly); the corpora are replayed on stable by the ringmoe-fuzz tests" >&2
  exit 2
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in "${targets[@]}"; do
  echo "== $t: ${secs}s"
  # -rss_limit_mb: a target allocating without bound is a finding too.
  cargo +nightly fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1
done
