#!/usr/bin/env bash
# Starts the background-job worker (FiftyOne delegated operations) beside the Streamlit app,
# both on 127.0.0.1; stopping the app (Ctrl-C) stops the worker too.
set -euo pipefail
cd "$(dirname "$0")/.."
export FIFTYONE_PLUGINS_DIR="${FIFTYONE_PLUGINS_DIR:-$PWD/plugins}"
PORT="${PORT:-8501}"
.venv/bin/python -m core worker &
WORKER=$!
trap 'kill $WORKER 2>/dev/null || true' EXIT INT TERM
echo "Vigil: http://127.0.0.1:${PORT}"
.venv/bin/streamlit run app.py --server.address 127.0.0.1 --server.port "$PORT" --server.headless true \
  --browser.gatherUsageStats false
