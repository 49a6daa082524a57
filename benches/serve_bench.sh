#!/usr/bin/env bash
# Throughput and latency of `fluxrt serve` at 1, 4 and 16 concurrent clients, with batching off
# (--max-batch 1) and on (--max-batch 4), and the server's peak RSS (VmHWM) under that load.
#
#   cargo build --release && bash benches/serve_bench.sh [REQUESTS_PER_LEVEL] [WIDTH] [HEIGHT]
#
# Requests go to the native endpoint, whose JSON answers carry the server-side run time, so each line also
# shows the run time per batch size (minimums are robust to other load on the machine).
#
# Loopback only. Extra server flags can be passed in SERVE_FLAGS (e.g. "--workers 2 --threads 1").
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-120}
W=${2:-256}
H=${3:-$W}
BIN=${BIN:-target/release/fluxrt}
PORT=${PORT:-18181}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }

for BATCH in 1 4; do
  LOG=$(mktemp)
  # shellcheck disable=SC2086
  "$BIN" serve --port "$PORT" --max-batch "$BATCH" --max-queue 64 ${SERVE_FLAGS:-} 2>"$LOG" &
  PID=$!
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
    sleep 0.1
  done
  for C in 1 4 16; do
    printf 'max_batch=%s ' "$BATCH"
    python3 benches/serve_load.py --url "http://127.0.0.1:$PORT" -c "$C" -n "$N" --path /v1/generate \
      --body "{\"prompt\": \"a lighthouse at dusk\", \"width\": $W, \"height\": $H}"
  done
  echo "max_batch=$BATCH server peak RSS: $(grep VmHWM /proc/$PID/status)"
  curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^fluxrt_batch_(requests|images)_(sum|count)' | tr '\n' ' '
  echo
  kill -TERM "$PID"
  wait "$PID" && echo "max_batch=$BATCH server exited 0 on SIGTERM"
  rm -f "$LOG"
done
