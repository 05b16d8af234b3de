#!/usr/bin/env bash
# Control-plane TLS on vs off (docs/performance.md): two `serve --workers 2` on the Mixtral
# fixture, one with mTLS on every gRPC hop (a CA and a 127.0.0.1 certificate made here by
# openssl), and a 32,768-token score job on each, in alternating rounds after a warm-up each.
#   scripts/tls_overhead.sh [BIN] [ROUNDS]     (BIN default target/release/ringmoe)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/release/ringmoe}")
ROUNDS=${2:-4}
FIX=$(realpath tests/fixtures/mixtral-tiny)
W=$(mktemp -d)
cd "$W"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 -days 2 -subj /CN=ca "${ec[@]}" -keyout ca.key -out ca.crt 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n' > ext.cnf
openssl req -new -subj /CN=ringmoe "${ec[@]}" -keyout tls.key -out tls.csr 2>/dev/null
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf -out tls.crt 2>/dev/null
python3 - <<'PY'
import json, struct
ids = [(i * 7919 + 13) % 384 for i in range(32768)]
h = json.dumps({"input_ids": {"dtype": "I64", "shape": [1, len(ids)], "data_offsets": [0, 8 * len(ids)]}}).encode()
open("ids.safetensors", "wb").write(struct.pack("<Q", len(h)) + h + b"".join(struct.pack("<q", i) for i in ids))
PY
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P1=127.0.0.1:$(port); P2=127.0.0.1:$(port)
T=(--tls-cert tls.crt --tls-key tls.key --tls-ca ca.crt)
"$BIN" serve --model "$FIX" --workers 2 --addr "$P1" --no-http --no-metrics --store s1 >/dev/null 2>plain.log &
S1=$!
"$BIN" serve --model "$FIX" --workers 2 --addr "$P2" --no-http --no-metrics --store s2 "${T[@]}" >/dev/null 2>tls.log &
S2=$!
trap 'kill $S1 $S2 2>/dev/null; rm -rf "$W"' EXIT
sleep 3
job() { # ADDR [TLS FLAGS]: seconds from submit to result
  local a=$1; shift
  local t0; t0=$(date +%s.%N)
  "$BIN" submit --addr "$a" --token-ids ids.safetensors --mode score --json "$@" >/dev/null
  python3 -c "import time; print(f'{time.time() - $t0:.3f}')"
}
job "$P1" >/dev/null; job "$P2" "${T[@]}" >/dev/null
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then a=$(job "$P1"); b=$(job "$P2" "${T[@]}"); else b=$(job "$P2" "${T[@]}"); a=$(job "$P1"); fi
  echo "round $r: plain ${a}s, mTLS ${b}s (load $(cut -d' ' -f1-3 /proc/loadavg))"
done
