#!/usr/bin/env bash
# Issues 15 (part 2) and 23 (item 5) in one call on a CUDA machine (budget: 8 minutes, so a rerun fits a
# 15-minute lease):
#   1. the `gpu`-marked tests (the loop on CUDA in bf16 and fp32 with compile=default, recorded in numerics; a
#      checkpoint evaluated offline on CUDA reproduces its val_acc; `devices` names the GPU; too many GPU
#      workers fail naming the field);
#   2. bench/step_overhead.py on CUDA: a step's time at batch 2 on a tiny model (the per-step overhead) against
#      a bare hand-written step, and the aten ops each dispatches;
#   3. bench/throughput.py on CUDA: the paper model's training images/s per GPU at batch 512 and 1024, bf16 +
#      channels_last, compile off and default (GPU_CHECK_COMPILE_MODES), through `python -m trainer.run`'s
#      Ray Train path and without Ray (the Ray overhead as a ratio);
#   4. the `fast` preset end to end through `python -m trainer.run` on the CIFAR-10 parquet (45,000 train /
#      5,000 val): wall seconds to val_acc 0.80, 0.85, 0.90.
#
# The GPU machine has Python 3.12, torch and CUDA but no Ray, and reaches nothing outside: everything comes from
# the ignored folder .gpu/ of this checkout, copied there ONCE beforehand (it travels with the working tree when
# the run names it in `carry`; 44 MB of the 64 MiB a call may carry):
#     mkdir -p .gpu && cp ../shared/device/ray-site-cp312.tar.xz ../shared/datasets/cifar10-jpeg/train.parquet .gpu/
# then, on the GPU machine, from the repository root:
#     bash bench/gpu_check.sh                   # results in $OUT (the device tool's output folder) or .gpu/out
# This script copies nothing at run time; it unpacks the tarball into /tmp and puts it on PYTHONPATH.
# Each step has its own time limit (GPU_CHECK_*_S, seconds) so one slow step cannot starve the others; the
# figures go to bench/RESULTS.md by hand, with the GPU's name and this command.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/.gpu/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TESTS_S=${GPU_CHECK_TESTS_S:-140}
STEP_S=${GPU_CHECK_STEP_S:-25}
BENCH_S=${GPU_CHECK_BENCH_S:-190}
FAST_S=${GPU_CHECK_FAST_S:-105}
COMPILE_MODES=${GPU_CHECK_COMPILE_MODES:-off,default}  # add reduce-overhead (CUDA graphs) when time allows
DATA=$REPO/.gpu/train.parquet
TARBALL=$REPO/.gpu/ray-site-cp312.tar.xz
started=$(date +%s)
say() { echo "=== [$(( $(date +%s) - started ))s] $*"; }

for f in "$TARBALL" "$DATA"; do
  [ -f "$f" ] || { echo "missing $f: copy it into .gpu/ first (see the top of this script)"; exit 2; }
done
SITE=/tmp/trainctl-ray-site
if "$PY" -c "import ray, pydantic" 2>/dev/null; then
  say "$PY already has Ray: not unpacking the tarball"
else
  if [ ! -f "$SITE/.unpacked" ]; then
    say "unpacking $(basename "$TARBALL") into $SITE"
    mkdir -p "$SITE" && tar xJf "$TARBALL" -C "$SITE" && touch "$SITE/.unpacked" || exit 2
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 TRAINCTL_TEST_PARQUET=$DATA
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/trainctl-inductor}  # shared by every step
unset RAY_ADDRESS

say "machine"
nvidia-smi -L 2>&1 | tee "$OUT/machine.txt"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/machine.txt"
import os, platform, torch, ray
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, ray {ray.__version__}, "
      f"{os.cpu_count()} CPUs")
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
EOF

status=0
say "1/4 gpu-marked tests (limit ${TESTS_S}s)"
timeout -k 10 "$TESTS_S" "$PY" -m pytest --noconftest -p no:cacheprovider -m gpu tests/trainer/test_gpu.py -q -rs \
  -o addopts="" 2>&1 | tee "$OUT/gpu_tests.log"
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || { echo "gpu tests: exit $rc"; status=1; }

say "2/4 per-step overhead on CUDA (limit ${STEP_S}s)"
timeout -k 5 "$STEP_S" "$PY" bench/step_overhead.py --device cuda --batch 2 --steps 25 --repeats 20 \
  --json-out "$OUT/step_overhead.json" 2>&1 | tee "$OUT/step_overhead.log"
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || { echo "step overhead: exit $rc"; status=1; }

say "3/4 throughput on CUDA, compile ${COMPILE_MODES} (limit ${BENCH_S}s)"
timeout -k 10 "$BENCH_S" "$PY" bench/throughput.py --skip-cpu --data "$DATA" --cuda-batches 512,1024 \
  --cuda-compile-modes "$COMPILE_MODES" --json-out "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || { echo "throughput: exit $rc"; status=1; }

say "4/4 fast preset to 0.80/0.85/0.90 val_acc (limit ${FAST_S}s)"
timeout -k 10 "$FAST_S" "$PY" bench/time_to_accuracy.py --preset fast --data "$DATA" \
  --milestones 0.80,0.85,0.90 --timeout $((FAST_S - 15)) 2>&1 | tee "$OUT/fast.log"
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || { echo "fast preset: exit $rc"; status=1; }

say "done (exit $status); logs in $OUT"
exit $status
