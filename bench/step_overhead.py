"""Per-step overhead of the training loop: a tiny model at a tiny batch, so a step's time is mostly Python
and op dispatch rather than arithmetic (issue 23).

    .venv/bin/python bench/step_overhead.py [--steps 25] [--repeats 40] [--batch 2] [--device cpu] [--profile]

Four figures, all from this process (so their ratios hold on a loaded machine), each the best of
--repeats short epochs of --steps steps, interleaved (the least disturbed epoch of each):
- bare:     a hand-written step on one fixed batch: forward, cross-entropy (the spec's label smoothing),
            zero_grad, backward, SGD step (torch's default SGD); bare_foreach: the same with SGD(foreach=True),
            as trainer/step.py builds it;
- data:     trainer/data.py's batches alone (shard, gather, random crop + flip, normalise);
- trainctl: trainer/step.py's train_epoch (data path, autocast context, scheduler, metrics on the device).
It prints microseconds per step, trainctl/bare, and trainctl − bare − data (the loop's own overhead), and
the aten ops each variant dispatches per step (a count no load on the machine changes).
--profile adds torch.profiler's top ops of the trainctl epoch (self CPU time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import step
from trainer.data import Dataset, DeviceData
from trainer.hardware import cpu_model
from trainer.model import build_model
from trainer.spec import JobSpec, resolve

TINY = {"model.widths": [2], "model.blocks": [1], "model.se_reduction": 1}


def tiny_spec(batch: int) -> JobSpec:
    return resolve(
        "debug",
        {"optim.epochs": 1000, "optim.batch_size": batch, "scaling.num_workers": 1, "precision": "fp32", **TINY},
    )


def dataset(n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(spec: JobSpec, device: torch.device, batch: int, foreach: bool | None = None) -> Callable[[int], float]:
    """The plainest loop there is, on one batch already on the device (torch's default SGD: a Python loop
    over the parameters on a CPU; foreach=True: one multi-tensor kernel per op). Returns run(steps) ->
    seconds per step."""
    torch.manual_seed(0)
    model = build_model(spec.model).to(device).train()
    o = spec.optim
    opt = torch.optim.SGD(
        model.parameters(),
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
        foreach=foreach,
    )
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.arange(batch, device=device) % 10

    def run(steps: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y, label_smoothing=o.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        return (time.perf_counter() - start) / steps

    return run


def data_epoch(data: DeviceData, device: torch.device, steps: int, batch: int, epoch: int) -> float:
    sync(device)
    start = time.perf_counter()
    for _x, _y in data.train_batches(epoch, 0, 0, 1, batch):
        pass
    sync(device)
    return (time.perf_counter() - start) / steps


def trainctl_epoch(trainee: step.Trainee, spec: JobSpec, data: DeviceData, steps: int, epoch: int) -> float:
    ctx = step.RankContext.single(spec.optim.batch_size)
    sync(trainee.device)
    start = time.perf_counter()
    step.train_epoch(trainee, data, spec.optim, ctx, epoch=epoch, seed=0)
    return (time.perf_counter() - start) / steps  # train_epoch synchronises a CUDA device itself


def variants(
    spec: JobSpec, device: torch.device, args: argparse.Namespace, data: DeviceData, trainee: step.Trainee
) -> dict[str, Callable[[int], float]]:
    """Each variant as run(epoch) -> seconds per step of one epoch of --steps steps."""
    bare, bare_foreach = bare_loop(spec, device, args.batch), bare_loop(spec, device, args.batch, foreach=True)
    return {
        "bare": lambda _epoch: bare(args.steps),
        "bare_foreach": lambda _epoch: bare_foreach(args.steps),
        "data": lambda epoch: data_epoch(data, device, args.steps, args.batch, epoch),
        "trainctl": lambda epoch: trainctl_epoch(trainee, spec, data, args.steps, epoch),
    }


def count_ops(
    spec: JobSpec, device: torch.device, args: argparse.Namespace, data: DeviceData, trainee: step.Trainee
) -> dict[str, float]:
    """aten ops dispatched per step by each variant (forward, backward and update included): what each
    step asks of the dispatcher, a figure no load on the machine can change."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Count.n += 1
            return func(*args, **(kwargs or {}))

    out = {}
    for name, run in variants(spec, device, args, data, trainee).items():
        Count.n = 0
        with Count():
            run(1)
        out[name] = round(Count.n / args.steps, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: the overhead, not the arithmetic)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = tiny_spec(args.batch)
    data = DeviceData(dataset(args.steps * args.batch), device, False, spec.data.augment)
    trainee = step.build(spec, device, args.steps)
    print(
        f"machine: {cpu_model()}, {args.threads} thread(s), device {device}, torch {torch.__version__}; tiny model "
        f"{sum(p.numel() for p in trainee.model.parameters())} parameters, batch {args.batch}, {args.steps} steps",
        flush=True,
    )
    timed = variants(spec, device, args, data, trainee)
    runs: dict[str, list[float]] = {k: [] for k in timed}
    for epoch in range(1, args.repeats + 2):  # the first round warms up and is dropped; interleaved against load
        for k, run in timed.items():
            seconds = run(epoch)
            if epoch > 1:
                runs[k].append(seconds)
    ops = count_ops(spec, device, args, data, trainee)
    best = {k: min(v) for k, v in runs.items()}
    result: dict[str, Any] = {f"{k}_us": round(v * 1e6, 1) for k, v in best.items()}
    result["median_us"] = {k: round(statistics.median(v) * 1e6, 1) for k, v in runs.items()}
    result["aten_ops_per_step"] = ops
    result["trainctl_over_bare"] = round(best["trainctl"] / best["bare"], 2)
    result["loop_overhead_us"] = round((best["trainctl"] - best["bare"] - best["data"]) * 1e6, 1)
    for k in runs:
        print(
            f"{k:<12} {best[k] * 1e6:8.1f} µs/step (best of {args.repeats}; median {result['median_us'][k]:.1f}); "
            f"{ops[k]:6.1f} aten ops/step"
        )
    print(
        f"trainctl/bare {result['trainctl_over_bare']:.2f}; trainctl − bare − data = "
        f"{result['loop_overhead_us']:.1f} µs/step (the loop's own: autocast, scheduler, metrics)"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainctl_epoch(trainee, spec, data, args.steps, args.repeats + 2)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
