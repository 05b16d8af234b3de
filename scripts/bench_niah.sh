#!/usr/bin/env bash
# Million-token needle jobs through a cluster of processes on this machine: a coordinator and P
# workers (separate processes, so each worker's peak RSS is its own), the needle model, and
# `ringmoe eval niah --addr` submitting generate jobs over gRPC. Prints, per P, the recall, the
# wall time per case and every worker's peak RSS (VmHWM), and the single process's answers and
# time for the same cases. Not part of CI (a 1M case takes a while on 2 cores).
#
# Usage: scripts/bench_niah.sh [--lengths 1M] [--depths 0.5] [--trials 1] [--workers "1 2 4"]
#                              [--model tests/fixtures/needle-moe] [--bin target/release/ringmoe]
#                              [--keep DIR] [--no-local] [--text]
# --keep DIR copies every run's results.json and niah.png to DIR/local and DIR/p<P>; --no-local
# skips the single-process run (and the comparison with it). --text also sends, per P and length,
# one case (depth 0.5) as text through `ringmoe submit --file` (scripts/niah_text_case.py writes
# it from the model's needle.json and tokenizer.json; the coordinator tokenizes it) and checks
# the answer's text.
set -euo pipefail
cd "$(dirname "$0")/.."

lengths=1M depths=0.5 trials=1 workers="1 2 4"
model=tests/fixtures/needle-moe bin=target/release/ringmoe keep="" local=1 text=0
while [ $# -gt 0 ]; do
  case "$1" in
    --lengths) lengths=$2; shift 2 ;;
    --depths) depths=$2; shift 2 ;;
    --trials) trials=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --no-local) local=0; shift ;;
    --text) text=1; shift ;;
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

save() { # RUN_DIR NAME
  if [ -n "$keep" ]; then mkdir -p "$keep/$2" && cp "$1/results.json" "$1/niah.png" "$keep/$2/"; fi
}

if [ "$local" = 1 ]; then
  echo "== one process"
  /usr/bin/time -f "one process: peak RSS %M KiB, %e s" \
    "$bin" eval niah --model "$model" "${cases[@]}" --out "$work/local" 2>&1 | grep -v '^\s*$'
  save "$work/local" local
fi

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
  if [ "$text" = 1 ]; then
    for l in ${lengths//,/ }; do
      n=$(python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$l")
      want=$(python3 scripts/niah_text_case.py "$model" "$n" 0.5 1 "$work/case.txt")
      t0=$(date +%s.%N)
      got=$("$bin" submit --addr "$addr" --file "$work/case.txt" --max-new-tokens 1 --json |
        python3 -c "import json, sys; print(json.load(sys.stdin)['text'].strip())")
      t1=$(date +%s.%N)
      printf 'text L=%s (%s bytes): answer %s, expected %s, %.1f s end to end\n' \
        "$l" "$(stat -c %s "$work/case.txt")" "$got" "$want" "$(echo "$t1 - $t0" | bc)"
    done
  fi
  for i in "${!wp[@]}"; do
    echo "worker $i: peak RSS $(awk '/VmHWM/ {print $2, $3}' "/proc/${wp[$i]}/status")"
  done
  echo "coordinator: peak RSS $(awk '/VmHWM/ {print $2, $3}' "/proc/${pids[-$((p + 1))]}/status")"
  save "$d" "p$p"
  # Where each job's time went, as the coordinator stored it: connecting, placing and sending
  # the shards (load), the prefill, the decode. The client's upload comes before them. The eval
  # submits the cells in order (lengths, then depths, then trials), so job ids group by length.
  python3 - "$d/store" "$lengths" "$depths" "$trials" <<'EOF'
import json, pathlib, sys
store, lengths, depths, trials = sys.argv[1:]
files = [f for f in pathlib.Path(store).rglob("result.json") if f.parent.name.isdigit()]
files.sort(key=lambda f: int(f.parent.name))
per = len(depths.split(",")) * int(trials)
for i, l in enumerate(lengths.split(",")):
    rows = [json.loads(f.read_text())["timings"] for f in files[i * per:(i + 1) * per]]
    if not rows:
        break
    med = lambda k: sorted(r[k] for r in rows)[len(rows) // 2]
    print(f"jobs L={l}: median load {med('load_secs'):.2f} s, prefill {med('prefill_secs'):.2f} s, "
          f"decode {med('decode_secs'):.2f} s over {len(rows)} runs")
EOF
  if [ "$local" = 1 ]; then
    if ! python3 - "$work/local/results.json" "$d/results.json" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
key = lambda r: [(c["length"], c["depth"], c["answers"]) for c in r["cells"]]
sys.exit(0 if key(a) == key(b) else 1)
EOF
    then echo "the cluster's answers differ from the single process's" >&2; exit 1; fi
    echo "answers identical to the single process's"
  fi
  for q in "${wp[@]}" "${pids[-$((p + 1))]}"; do kill "$q" 2>/dev/null || true; done
  wait 2>/dev/null || true
done
