#!/usr/bin/env bash
# The project's one test command (the README's): installs what a fresh machine lacks, checks
# formatting and lints, then runs every test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the build or the tests need: procps for `kill -STOP` in the communicator's
# fault tests, protobuf-compiler (protoc) for the gRPC code generated from proto/ (ours and
# etcd-client's), etcd-server for the membership tests, which start their own etcd, and openssl
# for the certificates of the TLS etcd test.
APT_PACKAGES=(procps protobuf-compiler etcd-server openssl)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

cargo fmt --all -- --check
# The control plane never links the engine: the coordinator builds without the model's weight
# code, the parallel forward, the CUDA crate or their kernels.
coordinator_deps=$(cargo tree -p ringmoe-coordinator -e normal,build --prefix none --locked)
engine='^(ringmoe-(model|parallel|cuda|core|comm|worker)|gemm|cudarc) '
if grep -Eq "$engine" <<<"$coordinator_deps"; then
  echo "ringmoe-coordinator links engine crates:" >&2
  grep -E "$engine" <<<"$coordinator_deps" | sort -u >&2
  exit 1
fi
cargo clippy --workspace --all-targets --locked -- -D warnings
# The NCCL transport and the CUDA backend must keep compiling without CUDA (cudarc loads the
# libraries at run time).
cargo clippy -p ringmoe-comm -p ringmoe-cuda -p ringmoe-worker -p ringmoe --features cuda --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast
