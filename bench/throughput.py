"""Training throughput of the paper model: this trainer vs the paper notebook's plain PyTorch loop.

    .venv/bin/python bench/throughput.py [--images 2048] [--epochs 3] [--cpu-compile]
    python3 bench/throughput.py --skip-cpu --data train.parquet --cuda-batches 512,1024   # on a GPU machine

CPU (every figure from this process, so the ratios hold on a noisy shared machine): the same model (default
widths, 4.57 M parameters), global batch 256 and CPU threads for
- baseline: the notebook's loop — torchvision DataLoader, per-sample PIL RandomCrop(32, 4) /
  RandomHorizontalFlip / ToTensor / Normalize, 2 loader workers, fp32, SGD with label smoothing — run
  before AND after the trainer, the ratios taken against the faster of the two (load that comes and goes
  then cannot flatter the trainer);
- trainctl: `python -m trainer.run`'s TorchTrainer path (1 Ray Train worker holding every core) with the
  device-side data path, at precision=auto (chosen by timing, trainer/precision.py; the choice is printed),
  at fp32, and with --cpu-compile also precision=auto + torch.compile (inductor).
CUDA (where available; one GPU): the paper model's training images/s at each --cuda-batches global batch,
bf16 + channels_last, with each of --cuda-compile-modes (off and default unless given), through the same Ray
Train path and through the same step functions without Ray (trainer/step.py), so the Ray overhead is a
ratio. On CUDA each epoch is the 45,000-image CIFAR-10 training split.
Images/s is the best epoch after the first (which pays warm-up and compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data import CIFAR10_MEAN, CIFAR10_STD, load
from trainer.hardware import cpu_model, usable_cpus
from trainer.model import build_model
from trainer.spec import JobSpec, resolve

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg" / "train.parquet"
BATCH = 256


def notebook_loop(images: torch.Tensor, labels: torch.Tensor, epochs: int, threads: int) -> float:
    """The paper notebook's training loop; returns images/s of its best epoch after the first."""
    import torchvision.transforms as T
    from PIL import Image

    class NotebookDataset(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.data = images.permute(0, 2, 3, 1).numpy()  # HWC uint8, as torchvision's CIFAR10 holds it
            self.targets = labels.tolist()
            self.transform = T.Compose(
                [
                    T.RandomCrop(32, padding=4),
                    T.RandomHorizontalFlip(),
                    T.ToTensor(),
                    T.Normalize(CIFAR10_MEAN, CIFAR10_STD),
                ]
            )

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return self.transform(Image.fromarray(self.data[i])), self.targets[i]

    torch.set_num_threads(threads)
    spec = JobSpec()
    model = build_model(spec.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    loader = torch.utils.data.DataLoader(
        NotebookDataset(), batch_size=BATCH, shuffle=True, num_workers=2, drop_last=False
    )
    rates = []
    for _ in range(epochs):
        model.train()
        start, seen = time.perf_counter(), 0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        rates.append(seen / (time.perf_counter() - start))
    return max(rates[1:] or rates)


def bench_spec(data: str, images: int, epochs: int, batch: int, **overrides: object) -> JobSpec:
    return resolve(
        "paper",
        {
            "data.train": data,
            "data.max_train_images": images,
            "data.val_fraction": 0.05,
            "optim.batch_size": batch,
            "optim.epochs": epochs,
            "checkpoint.every_epochs": epochs,
            **overrides,
        },
    )


def best_epoch(lines: list[dict[str, Any]]) -> dict[str, Any]:
    best = max(lines[1:] or lines, key=lambda m: m["images_per_s"])
    return {
        "images_per_s": best["images_per_s"],
        "epoch_seconds": best["epoch_seconds"],
        "numerics": best.get("numerics"),
        "devices": best.get("devices"),
    }


def with_ray(spec: JobSpec) -> dict[str, Any]:
    """One `trainer.run` job (TorchTrainer, its placement and numerics) on a private local Ray cluster."""
    from trainer import fit as trainer_fit
    from trainer import run as trainer_run_module

    with tempfile.TemporaryDirectory() as tmp:
        job_dir = os.path.join(tmp, "bench")
        os.makedirs(job_dir)
        Path(job_dir, "spec.json").write_text(spec.to_json())
        trainer_run_module.init_ray()
        trainer_fit.fit_single(spec, job_dir)
        lines = [json.loads(x) for x in Path(job_dir, "metrics.jsonl").read_text().splitlines()]
    return best_epoch(lines)


_SPLITS: dict[tuple[Any, ...], Any] = {}


def without_ray(spec: JobSpec, device: torch.device) -> dict[str, Any]:
    """The same epochs through trainer/step.py in this process: what Ray Train's overhead is measured against."""
    from trainer import step
    from trainer.data import DeviceData, load_splits
    from trainer.hardware import describe_device
    from trainer.precision import choose_numerics

    key = (spec.data.train, spec.data.max_train_images, spec.data.val_fraction, spec.seed)
    if key not in _SPLITS:  # decoded once per process: every configuration trains on the same tensors
        _SPLITS[key] = load_splits(spec.data, spec.seed, spec.model.num_classes)
    train_set, val_set = _SPLITS[key]
    batch = spec.optim.batch_size
    torch.manual_seed(spec.seed)
    sample = train_set.take(torch.arange(min(len(train_set), batch)))
    numerics = choose_numerics(spec, device, build_model(spec.model), sample.images, sample.labels, batch)
    splits = step.Splits(
        DeviceData(train_set, device, numerics.channels_last), DeviceData(val_set, device, numerics.channels_last)
    )
    trainee = step.build(spec, device, splits.train.steps_per_epoch(batch, 1), numerics=numerics)
    ctx = step.RankContext.single(batch, device=describe_device(device))
    lines = [
        step.run_epoch(trainee, spec, splits, ctx, epoch=e, start_epoch=1).model_dump()
        for e in range(1, spec.optim.epochs + 1)
    ]
    return best_epoch(lines)


def cpu_bench(args: argparse.Namespace, cpus: int, results: dict[str, Any]) -> None:
    data = load(args.data, limit=args.images)
    pin = {"scaling.num_workers": 1, "scaling.use_gpu": False, "scaling.cpus_per_worker": cpus}
    baselines = [notebook_loop(data.images, data.labels, args.epochs, cpus)]
    print(f"notebook loop (DataLoader + per-sample PIL, fp32), before: {baselines[0]:8.1f} img/s", flush=True)
    runs = [("trainctl_auto", {"precision": "auto"}), ("trainctl_fp32", {"precision": "fp32", "channels_last": True})]
    if args.cpu_compile:
        runs.append(("trainctl_auto_compile", {"precision": "auto", "compile": "default"}))
    for name, overrides in runs:
        r = with_ray(bench_spec(args.data, args.images, args.epochs, BATCH, **pin, **overrides))
        results[name] = r["images_per_s"]
        numerics = r["numerics"] or {}
        print(
            f"trainctl {name.removeprefix('trainctl_'):<13} (Ray Train, device data path): "
            f"{r['images_per_s']:8.1f} img/s  [{r['devices'][0] if r['devices'] else '?'}; "
            f"{numerics.get('precision')}{' + channels_last' if numerics.get('channels_last') else ''}, "
            f"{numerics.get('chosen_by')}: {numerics.get('images_per_s') or '-'}]",
            flush=True,
        )
    baselines.append(notebook_loop(data.images, data.labels, args.epochs, cpus))
    print(f"notebook loop, after: {baselines[1]:8.1f} img/s", flush=True)
    results["notebook_fp32"] = max(baselines)
    results["notebook_fp32_runs"] = baselines
    for name, _ in runs:
        print(f"ratio {name}/notebook: {results[name] / results['notebook_fp32']:.2f}")
    print("(ratios against the faster notebook run; fp32's is the Ray Train + data path overhead alone)")


def cuda_bench(args: argparse.Namespace, results: dict[str, Any]) -> None:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    images = 45_000  # CIFAR-10's training split after a 5,000-image validation split
    cuda_epochs = max(args.epochs, 2)
    for batch in (int(b) for b in args.cuda_batches.split(",")):
        for compile_ in args.cuda_compile_modes.split(","):
            spec = bench_spec(
                args.data,
                images,
                cuda_epochs,
                batch,
                precision="bf16",
                channels_last=True,
                compile=compile_,
                **{"data.val_fraction": 0.1},
            )
            key = f"cuda_b{batch}_compile_{compile_}"
            plain = without_ray(spec, device)
            results[f"{key}_no_ray"] = plain["images_per_s"]
            print(
                f"{name}, batch {batch}, bf16 + channels_last, compile={compile_}, without Ray: "
                f"{plain['images_per_s']:9.0f} img/s",
                flush=True,
            )
            ray_run = with_ray(spec)  # default scaling: one worker on the GPU, by placement
            results[f"{key}_ray"] = ray_run["images_per_s"]
            ratio = ray_run["images_per_s"] / plain["images_per_s"]
            results[f"{key}_ray_ratio"] = round(ratio, 3)
            print(
                f"{name}, batch {batch}, bf16 + channels_last, compile={compile_}, Ray Train:   "
                f"{ray_run['images_per_s']:9.0f} img/s per GPU (Ray/no-Ray {ratio:.3f}; {ray_run['devices']})",
                flush=True,
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=2048, help="CPU: training images per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA figures")
    parser.add_argument("--cpu-compile", action="store_true", help="CPU: also precision=auto with torch.compile")
    parser.add_argument("--cuda-batches", default="512,1024", help="CUDA: global batch sizes to measure")
    parser.add_argument(
        "--cuda-compile-modes",
        default="off,default",
        help="CUDA: spec `compile` modes to measure (off, default, max-autotune-no-cudagraphs, reduce-overhead)",
    )
    parser.add_argument("--json-out", help="also write the results as JSON here")
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"dataset {args.data} not found (pass --data)", file=sys.stderr)
        return 2
    cpus = usable_cpus()
    print(
        f"machine: {cpus} usable CPUs ({cpu_model()}), torch {torch.__version__}, "
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        flush=True,
    )
    results: dict[str, Any] = {}
    if not args.skip_cpu:
        cpu_bench(args, cpus, results)
    if torch.cuda.is_available():
        cuda_bench(args, results)
    print(json.dumps(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
