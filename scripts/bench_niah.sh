#!/usr/bin/env bash
# Million-token needle jobs through a cluster of processes on this machine: a coordinator and P
# workers (separate processes, so each worker's peak RSS is its own), the needle model, and
# `ringmoe eval niah --addr` submitting generate jobs over gRPC. Prints, per P, the recall, the
# wall time per case and every worker's peak RSS (VmHWM), and the single process's answers and
# time for the same cases. Not part of CI (a 1M case takes a while on 2 cores).
#
# Usage: scripts/bench_niah.sh [--lengths 1M] [--depths 0.5] [--trials 1] [--workers "1 2 4"]
#                              [--model tests/fixtures/needle-moe] [--bin target/release/ringmoe]
set -euo pipefail
cd "$(dirname "$0")/.."

lengths=1M depths=0.5 trials=1 workers="1 2 4"
model=tests/fixtures/needle-moe bin=target/release/ringmoe
while [ $# -gt 0 ]; do
  case "$1" in
    --lengths) lengths=$2; shift 2 ;;
    --depths) depths=$2; shift 2 ;;
    --trials) trials=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$bin" ] || cargo build --release -p ringmoe
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cases=(--lengths "$lengths" --depths "$depths" --trials "$trials" --seed 1)
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo); load $(cut -d' ' -f1-3 /proc/loadavg)"

# The first line a server prints is `listening on ADDR`.
listen() { # LOG
  for _ in $(seq 300); do
    a=$(sed -n 's/^listening on //p' "$1" | head -1)
    [ -n "$a" ] && { echo "$a"; return; }
    sleep 0.1
  done
  echo "no address in $1" >&2; exit 1
}

echo "== one process"
/usr/bin/time -f "one process: peak RSS %M KiB, %e s" \
  "$bin" eval niah --model "$model" "${cases[@]}" --out "$work/local" 2>&1 | grep -v '^\s*$'

for p in $workers; do
  echo "== coordinator + $p workers"
  d="$work/p$p"; mkdir -p "$d"
  "$bin" coordinator --addr 127.0.0.1:0 --store "$d/store" --model "needle=$model" \
    --min-workers "$p" >"$d/coordinator.out" 2>"$d/coordinator.log" &
  pids+=($!)
  addr=$(listen "$d/coordinator.out")
  wp=()
  for i in $(seq "$p"); do
    "$bin" worker --coordinator "$addr" >"$d/w$i.out" 2>"$d/w$i.log" &
    pids+=($!); wp+=($!)
  done
  "$bin" eval niah --addr "$addr" --task "$model/needle.json" "${cases[@]}" --out "$d" | grep -v '^wrote'
  for i in "${!wp[@]}"; do
    echo "worker $i: peak RSS $(awk '/VmHWM/ {print $2, $3}' "/proc/${wp[$i]}/status")"
  done
  echo "coordinator: peak RSS $(awk '/VmHWM/ {print $2, $3}' "/proc/${pids[-$((p + 1))]}/status")"
  if ! python3 - "$work/local/results.json" "$d/results.json" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
key = lambda r: [(c["length"], c["depth"], c["answers"]) for c in r["cells"]]
sys.exit(0 if key(a) == key(b) else 1)
EOF
  then echo "the cluster's answers differ from the single process's" >&2; exit 1; fi
  echo "answers identical to the single process's"
  for q in "${wp[@]}" "${pids[-$((p + 1))]}"; do kill "$q" 2>/dev/null || true; done
  wait 2>/dev/null || true
done
