"""Wall seconds to each validation-accuracy milestone of one preset, end to end through `python -m trainer.run`.

    python bench/time_to_accuracy.py --preset fast --data train.parquet [--milestones 0.80,0.85,0.90]

The job uses the whole parquet with the default 10 % validation split (CIFAR-10: 45,000 train / 5,000 val),
the preset's own recipe and the default scaling (one worker per GPU). It prints, for each milestone, the
first epoch that reached it, the training seconds up to it (the sum of the epochs' `epoch_seconds`: train and
validate, what the issue's "≤ 60 s of training" counts) and the wall seconds since `trainer.run` started
(Ray start-up, data decoding and compilation included), then one JSON line for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.spec import PRESETS, parse_override, resolve  # noqa: E402


def milestones_from(metrics: list[dict[str, Any]], started: float, marks: list[float]) -> dict[str, Any]:
    """{mark: {epoch, train_seconds, wall_seconds}} for each mark reached, None for the others."""
    out: dict[str, Any] = {}
    for mark in marks:
        spent = 0.0
        out[f"{mark:.2f}"] = None
        for m in metrics:
            spent += float(m.get("epoch_seconds") or 0.0)
            if (m.get("val_acc") or 0.0) >= mark:
                out[f"{mark:.2f}"] = {
                    "epoch": m["epoch"],
                    "train_seconds": round(spent, 1),
                    "wall_seconds": round(float(m["time"]) - started, 1),
                }
                break
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--data", required=True, help="the CIFAR-10 train parquet (50,000 images)")
    parser.add_argument("--milestones", default="0.80,0.85,0.90")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="extra spec overrides")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if args.preset not in PRESETS:
        print(f"preset {args.preset!r} is not defined here (have: {', '.join(sorted(PRESETS))})", file=sys.stderr)
        return 2
    marks = [float(x) for x in args.milestones.split(",")]
    spec = resolve(
        args.preset,
        {
            "data.train": str(Path(args.data).resolve()),
            "data.val_fraction": 0.1,
            **dict(parse_override(s) for s in args.set),
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        job_dir = Path(tmp) / f"{args.preset}-to-accuracy"
        job_dir.mkdir()
        (job_dir / "spec.json").write_text(spec.to_json())
        log_path = Path(tmp) / "run.log"
        started = time.time()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "trainer.run", "--job-dir", str(job_dir)],
                cwd=REPO,
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
                },
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:  # report the milestones reached so far
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
                print(f"stopped after {args.timeout:.0f} s", file=sys.stderr)
        wall = time.time() - started
        log_tail = log_path.read_text(errors="replace")[-5000:]
        metrics_file = job_dir / "metrics.jsonl"
        metrics = (
            [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()] if metrics_file.exists() else []
        )
    if code != 0:
        print(log_tail, file=sys.stderr)
    reached = milestones_from(metrics, started, marks)
    last = metrics[-1] if metrics else {}
    print(
        f"preset {args.preset}: {len(metrics)} epochs, exit {code}, {wall:.1f} s wall in all; "
        f"devices {last.get('devices')}, numerics {json.dumps(last.get('numerics'))}"
    )
    for m in metrics:
        print(
            f"  epoch {m['epoch']:>3}  val_acc {m['val_acc']:.4f}  {m['images_per_s']:9.0f} img/s  "
            f"{m['epoch_seconds']:6.2f} s"
        )
    for mark, hit in reached.items():
        print(
            f"val_acc >= {mark}: "
            + (
                f"epoch {hit['epoch']}, {hit['train_seconds']} s of training, {hit['wall_seconds']} s wall since start"
                if hit
                else "not reached"
            )
        )
    print(
        json.dumps(
            {
                "preset": args.preset,
                "exit_code": code,
                "wall_seconds": round(wall, 1),
                "epochs": len(metrics),
                "best_val_acc": max((m["val_acc"] for m in metrics), default=None),
                "milestones": reached,
                "devices": last.get("devices"),
            }
        )
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
