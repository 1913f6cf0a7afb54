#!/usr/bin/env bash
# The README's first command (`make demo`): start trainctl on the embedded default — a local Ray head on
# 127.0.0.1 and storage under ./data — submit examples/demo.yaml, watch it, fetch and verify its best
# checkpoint, evaluate it, and stop everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${TRAINCTL_DATA_DIR:-$PWD/data}
PORT=${TRAINCTL_PORT:-8000}
DATASET=${DEMO_DATASET:-$(cd .. && pwd)/shared/datasets/cifar10-jpeg/train.parquet}
if [ ! -f "$DATASET" ]; then
  echo "demo dataset not found: $DATASET (set DEMO_DATASET to a CIFAR-10 parquet or python directory)" >&2
  exit 2
fi
export TRAINCTL_URL="http://127.0.0.1:$PORT" TRAINCTL_DATA_DIR="$DATA_DIR"

trainctl serve --data-dir "$DATA_DIR" --port "$PORT" &
SERVE_PID=$!
# `trainctl down` stops serve and its local Ray head (which outlives serve by design).
stop_service() { trainctl down --data-dir "$DATA_DIR" || true; wait "$SERVE_PID" 2>/dev/null || true; }
trap stop_service EXIT

for _ in $(seq 1 120); do
  curl -fs "$TRAINCTL_URL/healthz" >/dev/null 2>&1 && break
  kill -0 "$SERVE_PID" 2>/dev/null || { echo "trainctl serve exited" >&2; exit 1; }
  sleep 1
done

t0=$(date +%s.%N)
JOB=$(trainctl submit examples/demo.yaml --set "data.train=$DATASET" -q)
echo "submitted job $JOB"
# time to RUNNING (the Ray job's driver started), for the record
until trainctl status "$JOB" --json | python -c 'import json,sys; s=json.load(sys.stdin)["state"]; sys.exit(s == "QUEUED" or s == "STARTING")'; do
  sleep 0.2
done
t_running=$(date +%s.%N)
trainctl watch "$JOB"
t1=$(date +%s.%N)
trainctl status "$JOB"
trainctl best "$JOB" -o "$DATA_DIR/best-$JOB.pt"
python -m trainer evaluate --checkpoint "$DATA_DIR/best-$JOB.pt" --split val
python - "$t0" "$t_running" "$t1" "$JOB" "$DATA_DIR" <<'PY'
import sys
t0, t_running, t1 = map(float, sys.argv[1:4])
print(f"demo job {sys.argv[4]}: POST → RUNNING {t_running - t0:.1f} s, POST → SUCCEEDED {t1 - t0:.1f} s; "
      f"best checkpoint at {sys.argv[5]}/best-{sys.argv[4]}.pt")
PY
