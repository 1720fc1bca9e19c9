#!/usr/bin/env bash
# Starts the background-job worker (FiftyOne delegated operations) beside the Streamlit app,
# both on 127.0.0.1; stopping the app (Ctrl-C) stops the worker too.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-8501}"
DATA_ROOT="${VIGIL_DATA_ROOT:-$PWD/datasets}"
mkdir -p "$DATA_ROOT"
LOG="$DATA_ROOT/worker.log"
.venv/bin/python -m core worker >"$LOG" 2>&1 &
WORKER=$!
trap 'kill $WORKER 2>/dev/null || true' EXIT INT TERM
# Let the worker bring up the embedded MongoDB first: two processes starting it at once race.
for _ in $(seq 1 120); do
  grep -q "worker ready" "$LOG" 2>/dev/null && break
  kill -0 $WORKER 2>/dev/null || { echo "the job worker failed to start; see $LOG" >&2; tail -20 "$LOG" >&2; exit 1; }
  sleep 0.5
done
echo "Vigil: http://127.0.0.1:${PORT}  (job worker log: $LOG)"
.venv/bin/streamlit run app.py --server.address "${VIGIL_ADDRESS:-127.0.0.1}" --server.port "$PORT" \
  --server.headless true --browser.gatherUsageStats false
