#!/usr/bin/env bash
# Data-plane TLS on vs off (docs/performance.md). First `bench comm` over TCP, 4 rank processes
# on 127.0.0.1, plaintext and with TLS on every link (a CA and a certificate made here by
# openssl, as `worker --data-tls` runs it), in alternating rounds: GB/s per size and the ratios.
# Then a 32,768-token score job on two clusters (a coordinator and 2 worker processes each, all
# with mTLS on the control plane; one cluster's workers with --data-tls), alternating: seconds
# from submit to result.
#   scripts/data_tls_bench.sh [BIN] [ROUNDS] [SIZES]  (default target/release/ringmoe 3 1M,16M,64M)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/release/ringmoe}")
ROUNDS=${2:-3}
SIZES=${3:-1M,16M,64M}
W=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; rm -rf "$W"' EXIT
FIX=$(realpath tests/fixtures/mixtral-tiny)
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 -days 2 -subj /CN=ca "${ec[@]}" -keyout "$W/ca.key" -out "$W/ca.crt" 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n' > "$W/ext.cnf"
openssl req -new -subj /CN=ringmoe "${ec[@]}" -keyout "$W/tls.key" -out "$W/tls.csr" 2>/dev/null
openssl x509 -req -in "$W/tls.csr" -CA "$W/ca.crt" -CAkey "$W/ca.key" -CAcreateserial -days 2 \
  -extfile "$W/ext.cnf" -out "$W/tls.crt" 2>/dev/null
T=(--tls-cert "$W/tls.crt" --tls-key "$W/tls.key" --tls-ca "$W/ca.crt")
run() { "$BIN" bench comm --transport tcp --ranks 4 --bytes "$SIZES" --iters 30 --json "$@"; }
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then run > "$W/plain.$r"; run "${T[@]}" > "$W/tls.$r"
  else run "${T[@]}" > "$W/tls.$r"; run > "$W/plain.$r"; fi
  echo "round $r done (load $(cut -d' ' -f1-3 /proc/loadavg))"
done
python3 - "$W" "$ROUNDS" <<'PY'
import json, statistics, sys
w, rounds = sys.argv[1], int(sys.argv[2])
def load(kind):
    return [json.load(open(f"{w}/{kind}.{r}"))["rows"] for r in range(1, rounds + 1)]
plain, tls = load("plain"), load("tls")
print("| bytes per rank | a2a plain | a2a TLS | TLS/plain | ring plain | ring TLS | TLS/plain |")
print("|---|---|---|---|---|---|---|")
for i, row in enumerate(plain[0]):
    m = lambda runs, k: statistics.median(r[i][k] for r in runs)
    ap, at = m(plain, "all_to_all_v_gbps"), m(tls, "all_to_all_v_gbps")
    rp, rt = m(plain, "ring_sendrecv_gbps"), m(tls, "ring_sendrecv_gbps")
    mib = row["bytes_per_rank"] >> 20
    print(f"| {mib} MiB | {ap:.2f} GB/s | {at:.2f} GB/s | {at/ap:.2f} | {rp:.2f} GB/s | {rt:.2f} GB/s | {rt/rp:.2f} |")
PY

# The job: two clusters, mTLS on every gRPC hop in both; data-plane TLS in the second.
python3 - "$W/ids.safetensors" <<'PY'
import json, struct, sys
ids = [(i * 7919 + 13) % 384 for i in range(32768)]
h = json.dumps({"input_ids": {"dtype": "I64", "shape": [1, len(ids)], "data_offsets": [0, 8 * len(ids)]}}).encode()
open(sys.argv[1], "wb").write(struct.pack("<Q", len(h)) + h + b"".join(struct.pack("<q", i) for i in ids))
PY
cluster() { # NAME [WORKER FLAGS]: starts a coordinator and 2 workers, prints the address
  local name=$1; shift
  "$BIN" coordinator --addr 127.0.0.1:0 --model "m=$FIX" --min-workers 2 --store "$W/$name-store" \
    "${T[@]}" > "$W/$name.out" 2> "$W/$name.log" &
  PIDS+=($!)
  local addr=""
  for _ in $(seq 1 100); do
    addr=$(sed -n 's/^listening on //p' "$W/$name.out" | head -1)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  for i in 1 2; do
    "$BIN" worker --coordinator "$addr" "${T[@]}" "$@" > "$W/$name-w$i.out" 2> "$W/$name-w$i.log" &
    PIDS+=($!)
  done
  echo "$addr"
}
A=$(cluster plain)
B=$(cluster tls --data-tls)
sleep 3
job() { # ADDR: seconds from submit to result
  local t0; t0=$(date +%s.%N)
  "$BIN" submit --addr "$1" --model m --token-ids "$W/ids.safetensors" --mode score --json \
    --tls-cert "$W/tls.crt" --tls-key "$W/tls.key" --tls-ca "$W/ca.crt" > /dev/null
  python3 -c "import time; print(f'{time.time() - $t0:.3f}')"
}
job "$A" > /dev/null; job "$B" > /dev/null
echo "| round | plain data plane | TLS data plane | load average (1/5/15 min) |"
echo "|---|---|---|---|"
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then a=$(job "$A"); b=$(job "$B"); else b=$(job "$B"); a=$(job "$A"); fi
  echo "| $r | $a | $b | $(cut -d' ' -f1-3 /proc/loadavg) |"
done
grep -q "data_tls=true" "$W/tls-w1.log" || { echo "the TLS cluster's workers ran no job over data-plane TLS" >&2; exit 1; }
