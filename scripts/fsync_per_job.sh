#!/usr/bin/env bash
# Counts the fsync calls `ringmoe serve` makes over one 32K-token generate job (the job store's
# durability cost), with strace. Usage: scripts/fsync_per_job.sh [BINARY] (default
# target/release/ringmoe). Needs strace and python3. Prints the strace summary and the job's
# wall time; docs/performance.md has the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
B=$(realpath "${1:-target/release/ringmoe}")
command -v strace >/dev/null || { echo "needs strace (apt-get install strace)" >&2; exit 1; }
D=$(mktemp -d)
trap 'pkill -INT -f "serve --model $D/model" 2>/dev/null || true; rm -rf "$D"' EXIT
# The Mixtral fixture with a 64K position limit (RoPE is computed, so the weights are the same).
cp -r tests/fixtures/mixtral-tiny "$D/model"
rm -f "$D/model/reference.safetensors"
python3 - "$D" <<'PY'
import json, random, struct, sys
d = sys.argv[1]
c = json.load(open(f"{d}/model/config.json")); c["max_position_embeddings"] = 65536
json.dump(c, open(f"{d}/model/config.json", "w"))
random.seed(1); n = 32 * 1024
data = b"".join(struct.pack("<q", random.randrange(10, 384)) for _ in range(n))
hdr = json.dumps({"input_ids": {"dtype": "I64", "shape": [1, n], "data_offsets": [0, len(data)]}}).encode()
hdr += b" " * ((8 - len(hdr) % 8) % 8)
open(f"{d}/ids.safetensors", "wb").write(struct.pack("<Q", len(hdr)) + hdr + data)
PY
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
strace -f -qq -c -e trace=fsync,fdatasync -o "$D/strace.txt" "$B" serve --model "$D/model" \
  --workers 2 --addr "127.0.0.1:$PORT" --store "$D/store" >"$D/serve.out" 2>"$D/serve.log" &
SP=$!
for _ in $(seq 1 150); do grep -q listening "$D/serve.out" 2>/dev/null && break; sleep 0.2; done
start=$(date +%s.%N)
"$B" submit --addr "127.0.0.1:$PORT" --token-ids "$D/ids.safetensors" --max-new-tokens 64 --json >"$D/result.json"
end=$(date +%s.%N)
pkill -INT -f "serve --model $D/model" || true
wait "$SP" || true
cat "$D/strace.txt"
python3 -c "import json,sys; r=json.load(open('$D/result.json')); print(len(r['tokens']), 'tokens generated')"
echo "job wall time: $(python3 -c "print(round($end - $start, 2))") s"
