#!/usr/bin/env bash
# Builds the CPU image (deploy/Dockerfile) with podman from local base images — no container
# registry needed — then runs `ringmoe serve` in it on the bundled tiny Mixtral and submits a
# job from outside the container with this checkout's `ringmoe`, comparing the result with the
# same job run by the single-process engine (`ringmoe score`, same binary family).
#
# Not part of scripts/test.sh: it builds the whole workspace once more inside the image (minutes)
# and needs root, podman and runc. The bases are made with mmdebstrap from Debian's packages:
#   localhost/debian:bookworm-slim      — minbase bookworm (the runtime stage)
#   localhost/rust:1.95-slim-bookworm   — the same plus gcc, libc6-dev, git, this machine's
#                                         stable Rust toolchain and its local CA certificates
#                                         (an egress proxy's, where there is one) for crates.io
#
# Usage: scripts/image_check.sh [HOST_RINGMOE]   (default target/release/ringmoe)
set -euo pipefail
cd "$(dirname "$0")/.."
HOST_BIN=${1:-target/release/ringmoe}
# This machine's kernel has hybrid cgroups, which Debian's crun refuses; runc runs them, and the
# sandbox lacks CAP_SYS_RESOURCE, so podman's default rlimits (raised to the maximum) are
# replaced by ones at or below the current limits.
PODMAN=(podman --runtime "$(command -v runc)")
LIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
work=$(mktemp -d)
cleanup() {
  "${PODMAN[@]}" rm -f ringmoe-image-check >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

if ! podman image exists localhost/debian:bookworm-slim; then
  mmdebstrap --variant=minbase --quiet bookworm - \
    | podman import --change 'CMD ["/bin/bash"]' - localhost/debian:bookworm-slim
fi
if ! podman image exists localhost/rust:1.95-slim-bookworm; then
  toolchain=$(rustc --print sysroot)
  mmdebstrap --variant=minbase --quiet --include=gcc,libc6-dev,ca-certificates,git \
    --customize-hook="cp -a '$toolchain' \"\$1/usr/local/rust\"" \
    --customize-hook='cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" 2>/dev/null || true' \
    --customize-hook='chroot "$1" update-ca-certificates' \
    bookworm - \
    | podman import \
      --change 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV CARGO_HOME=/usr/local/cargo' \
      - localhost/rust:1.95-slim-bookworm
fi

start=$(date +%s)
# Host networking for the build: the build stage fetches crates from crates.io.
# Docker's image format: OCI's has no HEALTHCHECK.
"${PODMAN[@]}" build --format docker --network=host "${LIMITS[@]}" -f deploy/Dockerfile \
  --build-arg RUST_IMAGE=localhost/rust:1.95-slim-bookworm \
  --build-arg RUNTIME_IMAGE=localhost/debian:bookworm-slim \
  -t localhost/ringmoe:check .
echo "image built in $(($(date +%s) - start))s"
"${PODMAN[@]}" image inspect localhost/ringmoe:check \
  --format 'user={{.Config.User}} entrypoint={{.Config.Entrypoint}} healthcheck={{.Config.Healthcheck.Test}} size={{.Size}}'

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"${PODMAN[@]}" run -d --name ringmoe-image-check --network=host "${LIMITS[@]}" \
  -e RINGMOE_HEALTH_ADDR="127.0.0.1:$port" \
  -v "$PWD/tests/fixtures:/models:ro" localhost/ringmoe:check \
  serve --model /models/mixtral-tiny --workers 2 --addr "127.0.0.1:$port" --store /var/lib/ringmoe/jobs
for _ in $(seq 100); do
  "${PODMAN[@]}" exec ringmoe-image-check ringmoe health --addr "127.0.0.1:$port" >/dev/null 2>&1 && break
  sleep 0.3
done
echo "health inside the container: $("${PODMAN[@]}" exec ringmoe-image-check ringmoe health --addr "127.0.0.1:$port")"
# The image's own HEALTHCHECK command.
"${PODMAN[@]}" healthcheck run ringmoe-image-check && echo "the image's HEALTHCHECK: healthy"
echo "processes: $("${PODMAN[@]}" top ringmoe-image-check user args | tail -n +2)"

echo "The quick brown fox jumps over the lazy dog." >"$work/prompt.txt"
got=$("$HOST_BIN" submit --addr "127.0.0.1:$port" --file "$work/prompt.txt" --mode score --json)
echo "from outside the container: $got"
want=$("$HOST_BIN" score --model tests/fixtures/mixtral-tiny --file "$work/prompt.txt" | awk '/mean NLL/ {print $NF}')
python3 - "$got" "$want" <<'EOF'
import json, sys
r, want = json.loads(sys.argv[1]), float(sys.argv[2])
assert r["state"] == "done", r
assert abs(r["mean_nll"] - want) <= 1e-4, (r["mean_nll"], want)
print(f"image check: the job completed in the container, mean NLL {r['mean_nll']:.6f} "
      f"(single-process engine on the host: {want:.6f})")
EOF
