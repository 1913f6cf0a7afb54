#!/usr/bin/env bash
# The README's first command (`make demo`): start trainctl on the embedded default — a local Ray head on
# 127.0.0.1 and storage under ./data — submit examples/demo.yaml, watch it, fetch and verify its best
# checkpoint, evaluate it, and stop everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${TRAINCTL_DATA_DIR:-$PWD/data}
PORT=${TRAINCTL_PORT:-8000}
# The dataset: DEMO_DATASET if set; else the shared CIFAR-10 parquet beside this checkout; else CIFAR-10
# downloaded once by torchvision into ~/.cache/trainctl/cifar10 (README: "Datasets").
SHARED_PARQUET=$(cd .. && pwd)/shared/datasets/cifar10-jpeg/train.parquet
CACHE=${TRAINCTL_CIFAR10_CACHE:-$HOME/.cache/trainctl/cifar10}
if [ -n "${DEMO_DATASET:-}" ]; then
  DATASET=$DEMO_DATASET
  [ -e "$DATASET" ] || { echo "DEMO_DATASET=$DATASET does not exist" >&2; exit 2; }
elif [ -f "$SHARED_PARQUET" ]; then
  DATASET=$SHARED_PARQUET
else
  DATASET=$CACHE
  python - "$CACHE" <<'PY' || exit 2
import sys
from pathlib import Path
root = Path(sys.argv[1])
if (root / "cifar-10-batches-py" / "data_batch_1").exists():
    sys.exit(0)
print(f"downloading CIFAR-10 (170 MB) with torchvision into {root} ...", flush=True)
try:
    import torchvision
    torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    torchvision.datasets.CIFAR10(str(root), train=False, download=True)
except Exception as exc:  # offline, proxy, disk full: say what to do instead
    print(f"could not download CIFAR-10 ({type(exc).__name__}: {exc}).\n"
          "Offline? Point DEMO_DATASET at a CIFAR-10 copy: the python version's folder "
          "(cifar-10-batches-py, from https://www.cs.toronto.edu/~kriz/cifar.html) or a Hugging Face "
          "style parquet (columns img{bytes}, label).", file=sys.stderr)
    sys.exit(2)
PY
  DATASET=$CACHE/cifar-10-batches-py
fi
echo "demo dataset: $DATASET"
export TRAINCTL_URL="http://127.0.0.1:$PORT" TRAINCTL_DATA_DIR="$DATA_DIR"

trainctl serve --data-dir "$DATA_DIR" --port "$PORT" &
SERVE_PID=$!
stop_service() { kill -TERM "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null || true; }
trap stop_service EXIT

for _ in $(seq 1 120); do
  curl -fs "$TRAINCTL_URL/healthz" >/dev/null 2>&1 && break
  kill -0 "$SERVE_PID" 2>/dev/null || { echo "trainctl serve exited" >&2; exit 1; }
  sleep 1
done

echo "trainctl dashboard: $TRAINCTL_URL/ui/ — sign in with the token in $DATA_DIR/admin-token"
t0=$(date +%s.%N)
JOB=$(trainctl submit examples/demo.yaml --set "data.train=$DATASET" -q)
echo "submitted job $JOB — watch it at $TRAINCTL_URL/ui/jobs/$JOB"
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
