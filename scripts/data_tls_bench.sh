#!/usr/bin/env bash
# Data-plane TLS on vs off (docs/performance.md): `bench comm` over TCP, 4 rank processes on
# 127.0.0.1, plaintext and with TLS on every link (a CA and a certificate made here by openssl,
# as `worker --data-tls` runs it), in alternating rounds; prints GB/s per size and the ratios.
#   scripts/data_tls_bench.sh [BIN] [ROUNDS] [SIZES]  (default target/release/ringmoe 3 1M,16M,64M)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/release/ringmoe}")
ROUNDS=${2:-3}
SIZES=${3:-1M,16M,64M}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
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
