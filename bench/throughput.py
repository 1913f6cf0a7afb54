"""Training throughput of the paper model: this trainer vs the paper notebook's plain PyTorch loop.

    .venv/bin/python bench/throughput.py [--images 2048] [--epochs 3]

Both run in this process's machine at the same time of day, with the same model (default widths, 4.57 M
parameters), global batch 256 and CPU threads, so their ratio is meaningful on a noisy machine:
- baseline: the notebook's loop — torchvision DataLoader, per-sample PIL RandomCrop(32, 4) /
  RandomHorizontalFlip / ToTensor / Normalize, 2 loader workers, fp32, SGD with label smoothing;
- trainctl: `python -m trainer.run`'s TorchTrainer path (1 Ray Train worker holding every core), with the
  device-side data path, at precision=auto (bf16 where the CPU has native bf16) and at fp32.
Images/s is the best epoch after the first (which pays warm-up): the best of a few is robust to other load
on a shared machine, and every configuration gets the same treatment. Where CUDA is available it also runs
the trainer on one GPU with bf16 + channels_last, with and without torch.compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data import CIFAR10_MEAN, CIFAR10_STD, load
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
            self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                        T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return self.transform(Image.fromarray(self.data[i])), self.targets[i]

    torch.set_num_threads(threads)
    spec = JobSpec()
    model = build_model(spec.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    loader = torch.utils.data.DataLoader(NotebookDataset(), batch_size=BATCH, shuffle=True, num_workers=2,
                                         drop_last=False)
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


def trainer_run(data: str, images: int, epochs: int, cpus: int, **overrides: object) -> dict[str, float]:
    """One `trainer.run` job on a private local Ray cluster; images/s of its best epoch after the first."""
    from trainer import fit as trainer_fit
    from trainer import run as trainer_run_module
    spec = resolve("paper", {"data.train": data, "data.max_train_images": images, "data.val_fraction": 0.05,
                             "optim.batch_size": BATCH, "optim.epochs": epochs, "scaling.num_workers": 1,
                             "scaling.cpus_per_worker": cpus, "checkpoint.every_epochs": epochs, **overrides})
    with tempfile.TemporaryDirectory() as tmp:
        job_dir = os.path.join(tmp, "bench")
        os.makedirs(job_dir)
        Path(job_dir, "spec.json").write_text(spec.to_json())
        trainer_run_module.init_ray()
        trainer_fit.fit_single(spec, job_dir)
        lines = [json.loads(x) for x in Path(job_dir, "metrics.jsonl").read_text().splitlines()]
    best = max(lines[1:] or lines, key=lambda m: m["images_per_s"])
    return {"images_per_s": best["images_per_s"], "epoch_seconds": best["epoch_seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=2048, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU figures")
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"dataset {args.data} not found (pass --data)", file=sys.stderr)
        return 2
    cpus = os.cpu_count() or 1
    print(f"machine: {cpus} CPUs, torch {torch.__version__}, "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    results: dict[str, float] = {}
    if not args.skip_cpu:
        data = load(args.data, limit=args.images)
        results["notebook_fp32"] = notebook_loop(data.images, data.labels, args.epochs, cpus)
        print(f"notebook loop (DataLoader + per-sample PIL, fp32): {results['notebook_fp32']:8.1f} img/s")
        for name, precision in (("trainctl_auto", "auto"), ("trainctl_fp32", "fp32")):
            r = trainer_run(args.data, args.images, args.epochs, cpus, precision=precision,
                            **{"scaling.use_gpu": False})
            results[name] = r["images_per_s"]
            print(f"trainctl, precision={precision:<5} (Ray Train, device data path): {r['images_per_s']:8.1f} img/s")
        print(f"ratio trainctl(auto)/notebook: {results['trainctl_auto'] / results['notebook_fp32']:.2f}")
        print(f"ratio trainctl(fp32)/notebook: {results['trainctl_fp32'] / results['notebook_fp32']:.2f}"
              "  (Ray Train + data path overhead alone; must not be below 1.0)")
    if torch.cuda.is_available():
        gpu_images = max(args.images, 45000)
        name = torch.cuda.get_device_name(0)
        for compile_ in (False, True):
            r = trainer_run(args.data, gpu_images, max(args.epochs, 3), 4, precision="bf16", channels_last=True,
                            compile=compile_, **{"scaling.use_gpu": True, "optim.batch_size": 512})
            results[f"gpu_compile_{compile_}"] = r["images_per_s"]
            print(f"{name}, bf16 + channels_last, compile={compile_}: {r['images_per_s']:9.1f} img/s per GPU "
                  f"({r['epoch_seconds']:.2f} s per {gpu_images}-image epoch incl. validation)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
