"""Where a run's workers go: `scaling` resolved against the cluster's resources, as one pure function.

`resolve_placement(scaling, batch_size, nodes)` takes the spec's `scaling` section, the global batch and a
resource map of the cluster's live nodes (`[{"CPU": 16, "GPU": 1}, ...]`, what `ray.nodes()` reports) and
returns how many workers to start, whether each holds a GPU and how many CPUs each reserves. It imports
neither Ray nor torch, so the rules are unit-tested over fake clusters (tests/trainer/test_placement.py).

The rules (docs/scaling.md, "Workers and devices"):
- `use_gpu: null` (default) trains on GPUs whenever the cluster has at least one. Asking for more GPU workers
  than the cluster has GPUs is an error naming `scaling.num_workers` — never a silent fall-back to CPUs.
- `use_gpu: true` asks for GPUs even if none are up yet: Ray waits for the autoscaler to add them
  (trainer/run.py bounds that wait), so on an autoscaling GPU cluster set it explicitly.
- `use_gpu: false` trains on CPUs.
- `num_workers: {min, max}` (elastic): Ray Train starts with as many as it can place (at least `min`) and grows
  towards `max`; with `use_gpu: null` the cluster must hold `min` GPU workers now. CPUs per CPU worker: 1 on auto.
- `num_workers: auto` (default) is one worker per GPU, at most `max_workers` (and as many as divide the global
  batch evenly); on CPUs it is one worker, since DDP between CPU processes on one machine only splits the
  same cores.
- `cpus_per_worker: auto`: CPU workers share the CPUs of the largest node that are not reserved yet (the
  Ray Job's driver holds some; all of them under a bare `python -m trainer.run`); a GPU worker gets its node's
  CPUs per GPU, one CPU of the node left to the driver, at most 8 (the data path is on the GPU).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from trainer.spec import ScalingSpec, WorkerRange

GPU_WORKER_MAX_CPUS = 8


class PlacementError(ValueError):
    """The spec's scaling cannot be met on this cluster; `field` is the spec field to change."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Placement:
    num_workers: int  # elastic: the most (min_workers..num_workers, as Ray Train can place them)
    use_gpu: bool
    cpus_per_worker: float
    reason: str  # one line for logs: why these numbers
    min_workers: int | None = None  # elastic workers only (scaling.num_workers {min, max})

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cluster_totals(nodes: Sequence[Mapping[str, float]]) -> tuple[float, float]:
    """(CPUs, GPUs) over all nodes."""
    return sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes)


def resolve_placement(
    scaling: ScalingSpec, batch_size: int, nodes: Sequence[Mapping[str, float]], available_cpus: float | None = None
) -> Placement:
    """Workers, device kind and CPUs per worker for `scaling` on a cluster of `nodes` (total resources per
    node) of which `available_cpus` CPUs are not reserved now (None: unknown; see the module doc)."""
    _, total_gpus = cluster_totals(nodes)
    per_worker = scaling.gpus_per_worker
    gpus = int(total_gpus) // per_worker  # GPU workers the cluster holds now (fractional GPUs are not workers)
    if scaling.use_gpu is False:
        use_gpu, why = False, "scaling.use_gpu=false"
    elif scaling.use_gpu is True:
        use_gpu, why = True, "scaling.use_gpu=true"
    else:
        use_gpu = gpus >= 1
        why = f"the cluster has {gpus} GPU(s)" if use_gpu else "the cluster has no GPU"

    if scaling.num_workers == "auto":
        if use_gpu:
            cap = max(1, min(gpus, scaling.max_workers))
            workers = _largest_divisor_at_most(batch_size, cap)
            how = f"auto: one per GPU, at most scaling.max_workers={scaling.max_workers}"
            if workers < cap:
                how += f", and {workers} divide optim.batch_size={batch_size} evenly"
        else:
            workers, how = 1, "auto: one CPU worker"
    elif isinstance(scaling.num_workers, WorkerRange):
        workers, least = scaling.num_workers.max, scaling.num_workers.min
        how = f"elastic: scaling.num_workers {least}..{workers}, as many as can be placed"
        if use_gpu and scaling.use_gpu is None and least > gpus:
            raise PlacementError(
                "scaling.num_workers",
                f"asks for at least {least} workers with {per_worker} GPU(s) each, but the cluster has "
                f"{int(total_gpus)} GPU(s): lower scaling.num_workers.min to at most {gpus}, or set "
                "scaling.use_gpu to true to wait for more GPUs (autoscaler), or to false to train on CPUs",
            )
    else:
        workers, how = int(scaling.num_workers), "scaling.num_workers"
        if use_gpu and scaling.use_gpu is None and workers > gpus:
            raise PlacementError(
                "scaling.num_workers",
                f"asks for {workers} workers with {per_worker} GPU(s) each, but the cluster has "
                f"{int(total_gpus)} GPU(s): set "
                f'scaling.num_workers to at most {gpus} (or "auto"), or scaling.use_gpu to true to wait for '
                f"more GPUs (autoscaler), or to false to train on CPUs",
            )
    if use_gpu and gpus < workers:
        how += f"; waiting for {(workers - gpus) * per_worker} more GPU(s) (autoscaler)"

    elastic = isinstance(scaling.num_workers, WorkerRange)
    if scaling.cpus_per_worker == "auto" and elastic and not use_gpu:
        # Elastic CPU workers land on nodes that may not exist yet: the free CPUs of today's largest node
        # say nothing about them, so each reserves one (set scaling.cpus_per_worker for more).
        cpus, cpu_how = 1.0, "auto: 1 for elastic CPU workers"
    elif scaling.cpus_per_worker == "auto":
        cpus = _auto_cpus(nodes, use_gpu, workers, available_cpus, per_worker)
        cpu_how = "auto"
    else:
        cpus, cpu_how = float(scaling.cpus_per_worker), "scaling.cpus_per_worker"
    device = "GPU" if use_gpu else "CPU"
    reason = f"{workers} {device} worker(s) ({how}; {why}), {cpus:g} CPU(s) each ({cpu_how})"
    fewest = scaling.num_workers.min if isinstance(scaling.num_workers, WorkerRange) else None
    return Placement(num_workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus, reason=reason, min_workers=fewest)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return next(d for d in range(min(cap, n), 0, -1) if n % d == 0)


def _auto_cpus(
    nodes: Sequence[Mapping[str, float]],
    use_gpu: bool,
    workers: int,
    available_cpus: float | None,
    gpus_per_worker: int = 1,
) -> float:
    if use_gpu:
        per_gpu = [(n.get("CPU", 0.0) - 1) / n["GPU"] for n in nodes if n.get("GPU", 0.0) >= gpus_per_worker]
        # A GPU node yet to come (autoscaler) has unknown CPUs: 1 always fits.
        share = min(per_gpu) * gpus_per_worker if per_gpu else 1
        return float(min(GPU_WORKER_MAX_CPUS, max(1, math.floor(share))))
    largest = max((n.get("CPU", 0.0) for n in nodes), default=1.0)
    free = largest - 1 if available_cpus is None else min(largest, available_cpus)
    return float(max(1, math.floor(free / workers)))


def worker_resources(scaling: ScalingSpec, where: Placement) -> dict[str, float]:
    """The Ray resources one worker reserves (its placement-group bundle): CPUs, GPUs, the spec's extras."""
    bundle = {"CPU": where.cpus_per_worker, **scaling.resources_per_worker}
    if where.use_gpu:
        bundle["GPU"] = float(scaling.gpus_per_worker)
    return bundle


def placement_strategy(scaling: ScalingSpec) -> str:
    """Ray's placement strategy for the workers' bundles: `scaling.workers_per_node` 1 = one per node,
    N (= num_workers, checked by the spec) = all on one node, null = Ray's default (PACK: together where
    they fit, spread otherwise)."""
    if scaling.workers_per_node is None:
        return "PACK"
    return "STRICT_SPREAD" if scaling.workers_per_node == 1 else "STRICT_PACK"
