#!/usr/bin/env bash
# Server-Sent Events at the shell level: `curl -N` against `ringmoe serve` receives a chat
# stream as incremental events — the assistant's role first, text pieces as they decode, a
# finish_reason, then `data: [DONE]` — and the first event arrives before the last.
#   scripts/http_sse_test.sh target/debug/ringmoe
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/debug/ringmoe}")
tmp=$(mktemp -d)
"$BIN" serve --model tests/fixtures/mixtral-tiny --workers 2 --addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
  --http-addr 127.0.0.1:0 --store "$tmp/jobs" >"$tmp/out" 2>"$tmp/log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 300); do
  grep -q '^http api on ' "$tmp/out" && break
  kill -0 $pid 2>/dev/null || { cat "$tmp/log" >&2; exit 1; }
  sleep 0.1
done
base=$(sed -n 's/^http api on //p' "$tmp/out")
curl -sSN --fail-with-body "$base/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model": "mixtral-tiny", "messages": [{"role": "user", "content": "Tell me a story"}],
       "max_tokens": 96, "temperature": 0, "stream": true}' |
  while IFS= read -r line; do
    if [ -n "$line" ]; then printf '%s %s\n' "$(date +%s%N)" "$line"; fi
  done >"$tmp/events"
events=$(grep -c ' data: ' "$tmp/events" || true)
texts=$(grep -c '"content":"[^"]' "$tmp/events" || true)
first=$(head -n1 "$tmp/events" | cut -d' ' -f1)
last=$(tail -n1 "$tmp/events" | cut -d' ' -f1)
fail() { echo "SSE check failed: $*" >&2; cat "$tmp/events" >&2; exit 1; }
head -n1 "$tmp/events" | grep -q '"role":"assistant"' || fail "the first event is not the assistant's role"
tail -n1 "$tmp/events" | grep -q ' data: \[DONE\]$' || fail "the stream does not end with data: [DONE]"
grep -q '"finish_reason":"\(length\|stop\)"' "$tmp/events" || fail "no finish_reason"
[ "$texts" -ge 3 ] || fail "only $texts text events"
[ "$last" -gt "$first" ] || fail "every event arrived at once"
echo "SSE: $events events ($texts with text) over $(( (last - first) / 1000000 )) ms, ending with [DONE]"
