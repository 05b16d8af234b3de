#!/usr/bin/env bash
# Throughput of a stream of small jobs on 4 workers: one group (one job at a time, today's
# default) against two groups of two (--group-workers 2, two jobs at once), alternating rounds
# in one run. Each round starts `ringmoe serve --workers 4`, submits JOBS generate jobs at once
# with `ringmoe submit`, and times until the last finishes.
#
#   scripts/bench_groups.sh [JOBS] [ROUNDS]      (env: BIN, MODEL, NEW, WORDS)
#
# Not part of CI. Prints jobs/s per round and the medians' ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-16}
ROUNDS=${2:-3}
BIN=${BIN:-target/release/ringmoe}
MODEL=${MODEL:-tests/fixtures/mixtral-tiny}
NEW=${NEW:-32}
WORDS=${WORDS:-200}
[ -x "$BIN" ] || cargo build --release -p ringmoe
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT
python3 -c "
import random
random.seed(1)
w = ['the','a','model','expert','ring','token','long','context','worker','group']
print(' '.join(random.choice(w) for _ in range($WORDS)))" > "$TMP/prompt.txt"

round() { # GROUP_WORKERS -> jobs/s on stdout
    local g=$1
    local out="$TMP/serve-$g.out"
    "$BIN" serve --model "m=$MODEL" --workers 4 --group-workers "$g" --rebalance-threshold 0 \
        --addr 127.0.0.1:0 --no-http --no-metrics --store "$TMP/store-$g-$RANDOM" \
        >"$out" 2>"$TMP/serve-$g.err" &
    local pid=$!
    local addr=""
    for _ in $(seq 100); do
        addr=$(sed -n 's/^listening on //p' "$out" | head -1)
        [ -n "$addr" ] && break
        sleep 0.1
    done
    [ -n "$addr" ] || { echo "serve printed no address" >&2; cat "$TMP/serve-$g.err" >&2; exit 1; }
    # Workers registered and a placement loaded: one warm-up job.
    "$BIN" submit --addr "$addr" --file "$TMP/prompt.txt" --max-new-tokens 1 --json >/dev/null
    local t0 t1
    t0=$(date +%s.%N)
    for i in $(seq "$JOBS"); do
        "$BIN" submit --addr "$addr" --file "$TMP/prompt.txt" --max-new-tokens "$NEW" --json \
            >"$TMP/job-$g-$i.json" &
    done
    wait $(jobs -p | grep -v "^$pid\$")
    t1=$(date +%s.%N)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    python3 -c "print(f'{$JOBS / ($t1 - $t0):.3f}')"
}

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg); $JOBS jobs of ~$WORDS words + $NEW new tokens, $(nproc) cores"
one=(); two=()
for r in $(seq "$ROUNDS"); do
    a=$(round 0); b=$(round 2)
    echo "round $r: one group $a jobs/s, two groups $b jobs/s"
    one+=("$a"); two+=("$b")
done
python3 - "${one[*]}" "${two[*]}" <<'PY'
import statistics, sys
one = [float(x) for x in sys.argv[1].split()]
two = [float(x) for x in sys.argv[2].split()]
a, b = statistics.median(one), statistics.median(two)
print(f"median: one group {a:.3f} jobs/s, two groups {b:.3f} jobs/s: {b / a:.2f}x")
PY
