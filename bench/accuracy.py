"""Time to accuracy of a preset: train through `python -m trainer.run` and print each epoch as it ends.

    .venv/bin/python bench/accuracy.py --preset fast --epochs 5
    .venv/bin/python bench/accuracy.py --preset paper --wall-seconds 1500   # how far in a fixed wall time
    .venv/bin/python bench/accuracy.py --augment-cost                        # AutoAugment + erasing, img/s
    .venv/bin/python bench/accuracy.py --compare fast,paper,notebook         # each in the first one's time
    .venv/bin/python bench/accuracy.py --preset fast --holdout-test 5000     # scored on 5,000 images set apart

A benchmark, not a test: it asserts nothing, it prints what it measured. The job runs as the service would
run it (a `python -m trainer.run` subprocess on a private local Ray, the job dir under ./data/bench/), with
one Ray Train worker holding every core of this machine unless --set says otherwise. Each epoch line gives
the wall seconds since the job started (Ray start-up and data decoding included), that epoch's own seconds,
images/s, train/val/test accuracy. With --wall-seconds the job is stopped after that long and the last
finished epoch is what the preset reached in that time. --compare runs its first preset to the end and each
other one for the first one's wall seconds, every one scored on the same held-out 10 % (data.val_fraction
0.1, seed 0: `paper` and `notebook` train on all images by default and have no held-out score otherwise).
With --holdout-test N the parquet is split once into two files under data/bench/ (its last N rows, which
are shuffled, as the test split; the rest to train on, with no validation split, so the final epoch is the
run's model): every epoch is then scored on test images that no run trains on or picks a checkpoint by, and
the final test pass also reports flip test-time augmentation (`tta: flip`), separately.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.spec import PRESETS, parse_override, resolve  # noqa: E402

DEFAULT_DATA = ROOT.parent.parent / "shared" / "datasets" / "cifar10-jpeg" / "train.parquet"
if not DEFAULT_DATA.exists():  # a checkout next to ../shared (the layout README describes)
    DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg" / "train.parquet"


def fmt(value: Any) -> str:
    return "   -  " if value is None else f"{value:.4f}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:  # rank 0 is rewriting the file right now
            break
    return lines


def holdout_split(data: Path, n_test: int) -> tuple[Path, Path]:
    """(train, test) parquet files: `data` without / with its last `n_test` rows, written once."""
    import pyarrow.parquet as pq

    folder = ROOT / "data" / "bench" / f"{data.stem}-holdout-{n_test}"
    train, test = folder / "train.parquet", folder / "test.parquet"
    if not (train.exists() and test.exists()):
        table = pq.read_table(data)
        if not 0 < n_test < table.num_rows:
            raise SystemExit(f"--holdout-test {n_test}: give 1..{table.num_rows - 1} ({data} has {table.num_rows})")
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(0, table.num_rows - n_test), train)
        pq.write_table(table.slice(table.num_rows - n_test), test)
    return train, test


def run_preset(
    args: argparse.Namespace,
    preset: str,
    epochs: int | None,
    wall_seconds: float | None,
    extra: dict[str, Any] | None = None,
) -> tuple[int, float, list[dict[str, Any]]]:
    """Train `preset` once; (exit code, wall seconds, its metrics lines)."""
    cpus = os.cpu_count() or 1
    overrides: dict[str, Any] = {
        "data.train": str(args.data),
        "scaling.num_workers": 1,
        "scaling.cpus_per_worker": cpus,
        "scaling.use_gpu": None,
    }
    if args.holdout_test:
        train, test = holdout_split(Path(args.data), args.holdout_test)
        overrides.update({"data.train": str(train), "data.test": str(test), "data.val_fraction": 0.0, "tta": "flip"})
    if epochs is not None:
        overrides["optim.epochs"] = epochs
    overrides.update(extra or {})
    overrides.update(dict(parse_override(s) for s in args.set))
    spec = resolve(preset, overrides)
    job_dir = Path(args.job_dir or ROOT / "data" / "bench" / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    job_dir.mkdir(parents=True, exist_ok=False)
    (job_dir / "spec.json").write_text(spec.to_json())
    print(
        f"preset {preset}: {spec.optim.epochs} epochs, batch {spec.optim.batch_size}, "
        f"{spec.schedule.kind} lr {spec.optim.lr}, wd {spec.optim.weight_decay}, precision {spec.precision}, "
        f"augment {spec.data.augment.model_dump()}; data {spec.data.train} (val_fraction "
        f"{spec.data.val_fraction}); {spec.scaling.cpus_per_worker} of {cpus} CPUs; --set {' '.join(args.set) or '-'}; "
        f"job dir {job_dir}",
        flush=True,
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.run", "--job-dir", str(job_dir)],
        cwd=ROOT,
        env=env,
        stdout=open(job_dir / "trainer.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    print(
        f"{'epoch':>5} {'wall_s':>8} {'epoch_s':>8} {'img/s':>7} {'lr':>7} {'train_acc':>9} {'val_acc':>8} "
        f"{'test_acc':>8}",
        flush=True,
    )
    shown, stopped = 0, False
    while True:
        done = proc.poll() is not None
        lines = read_metrics(job_dir / "metrics.jsonl")
        for m in lines[shown:]:
            print(
                f"{m['epoch']:>5} {m['time'] - started:>8.1f} {m['epoch_seconds']:>8.1f} "
                f"{m['images_per_s']:>7.1f} {m['lr']:>7.4f} {fmt(m['train_acc']):>9} "
                f"{fmt(m['val_acc'] if spec.data.val_fraction else None):>8} {fmt(m.get('test_acc')):>8}",
                flush=True,
            )
        shown = max(shown, len(lines))
        if done:
            break
        if wall_seconds and time.time() - started > wall_seconds:
            os.killpg(proc.pid, signal.SIGTERM)  # the trainer's own process group only
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            stopped = True
            break
        time.sleep(2)
    wall = time.time() - started
    if stopped:
        print(
            f"stopped after {wall:.0f} s (wall limit {wall_seconds:.0f} s); reached epoch "
            f"{lines[-1]['epoch'] if lines else 0}",
            flush=True,
        )
        return 0, wall, lines
    summary_path = job_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    keys = (
        "state",
        "best_val_acc",
        "best_checkpoint_rule",
        "final_test_acc",
        "best_checkpoint_test_acc",
        "best_checkpoint_tta_acc",
        "epochs_completed",
        "num_parameters",
    )
    print(
        json.dumps({"exit_code": proc.returncode, "wall_seconds": round(wall, 1), **{k: summary.get(k) for k in keys}}),
        flush=True,
    )
    return proc.returncode or 0, wall, lines


def compare(args: argparse.Namespace) -> int:
    """The first preset to its end, then each other one for as many wall seconds; one table at the end."""
    presets = [p.strip() for p in args.compare.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if len(presets) < 2 or unknown:
        print(f"--compare: give two or more of {sorted(PRESETS)} (unknown: {unknown})", file=sys.stderr)
        return 2
    held_out = {"data.val_fraction": 0.1}
    rows = []
    budget: float | None = None
    for preset in presets:
        # --epochs is the first preset's; the others keep their own schedules (cut by the wall time)
        code, wall, lines = run_preset(args, preset, args.epochs if budget is None else None, budget, held_out)
        if budget is None:
            if code != 0:
                print(f"{preset} failed (exit {code}); no wall time to compare against", file=sys.stderr)
                return code
            budget = wall
        last = lines[-1] if lines else {}
        best = max((m["val_acc"] for m in lines if m.get("val_acc") is not None), default=None)
        rows.append((preset, wall, last.get("epoch", 0), last.get("val_acc"), best))
    print(f"\nsame wall time ({budget:.0f} s, the first preset's), val accuracy on the same 10 % held out:")
    print(f"{'preset':<10} {'wall_s':>7} {'epochs':>6} {'last val_acc':>12} {'best val_acc':>12}")
    for preset, wall, epochs, last_acc, best_acc in rows:
        print(f"{preset:<10} {wall:>7.0f} {epochs:>6} {fmt(last_acc):>12} {fmt(best_acc):>12}")
    return 0


def augment_cost(args: argparse.Namespace) -> int:
    """Images/s of the training data path alone (crop + flip vs + AutoAugment + RandomErasing) and of a full
    training step with each, on one process holding every core."""
    import torch
    import torch.nn.functional as F

    from trainer.data import DeviceData, load
    from trainer.model import build_model
    from trainer.precision import autocast, resolve_precision

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    data = load(str(args.data), limit=args.images)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = {
        "crop+flip": {"data.augment.autoaugment": False, "data.augment.random_erasing": False},
        "crop+flip+autoaugment+erasing": {"data.augment.autoaugment": True, "data.augment.random_erasing": True},
    }
    results: dict[str, dict[str, float]] = {}
    for name, extra in configs.items():
        spec = resolve("notebook", {"optim.batch_size": 256, **extra})
        dd = DeviceData(data, device, True, spec.data.augment)
        rates = []
        for epoch in range(1, 4):
            t0, n = time.perf_counter(), 0
            for x, _ in dd.train_batches(epoch, 0, 0, 1, 256):
                n += len(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(n / (time.perf_counter() - t0))
        model = build_model(spec.model).to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        dtype = resolve_precision(spec, device)
        t0, n = time.perf_counter(), 0
        for x, y in dd.train_batches(9, 0, 0, 1, 256):
            with autocast(device, dtype):
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[name] = {"augment_images_per_s": max(rates), "train_images_per_s": n / (time.perf_counter() - t0)}
        print(
            f"{name:<32} data path {max(rates):9.1f} img/s   "
            f"training step incl. data {results[name]['train_images_per_s']:7.1f} img/s",
            flush=True,
        )
    base, full = results["crop+flip"], results["crop+flip+autoaugment+erasing"]
    print(
        f"training throughput ratio (with AutoAugment + erasing / crop + flip): "
        f"{full['train_images_per_s'] / base['train_images_per_s']:.3f} on {device.type}, {len(data)} images, "
        f"{threads} threads"
    )
    print(json.dumps(results))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fast")
    parser.add_argument("--epochs", type=int, help="default: the preset's optim.epochs")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="training data (default: the shared parquet)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="extra spec overrides")
    parser.add_argument("--job-dir", help="default: ./data/bench/<preset>-<time>")
    parser.add_argument("--wall-seconds", type=float, help="stop the job after this many seconds")
    parser.add_argument("--augment-cost", action="store_true", help="measure the augmentation's cost instead")
    parser.add_argument("--compare", metavar="P1,P2,...", help="P1 to its end, the others in P1's wall time")
    parser.add_argument("--images", type=int, default=5120, help="images for --augment-cost")
    parser.add_argument("--holdout-test", type=int, metavar="N", help="score on the parquet's last N images, unseen")
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"dataset {args.data} not found (pass --data)", file=sys.stderr)
        return 2
    if args.augment_cost:
        return augment_cost(args)
    if args.compare:
        return compare(args)
    return run_preset(args, args.preset, args.epochs, args.wall_seconds)[0]


if __name__ == "__main__":
    sys.exit(main())
