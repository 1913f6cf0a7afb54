"""How long a job will take and what it will cost, before it runs (issue 30): a pure function, no I/O.

`estimate(spec, history, benchmarks, prices)` turns a validated JobSpec into an `Estimate`. Every figure
carries its `basis`, the one place it came from:

- ``history: N past jobs with the same key``: the median of this service's finished jobs whose `EstimateKey`
  equals the spec's (service/api/history.py collects them from the store);
- ``benchmark: bench/RESULTS.md <row>``: one of the project's own measured figures (`BENCHMARKS`) for the
  same model shape, batch, precision and device;
- ``settings: ...`` / ``spec: ...``: read from the operator's settings or the spec itself;
- ``unknown: <why>``: nothing to go on. Such a figure's value is None: an estimate never invents a number.

The key (`EstimateKey`), exactly: two jobs share it when all of these are equal:

- model shape: model.widths, model.blocks, model.se (and se_reduction when se), model.activation;
- precision: the spec's `precision` (auto | bf16 | fp32) and `compile` mode, as asked for;
- batch size: optim.batch_size (the global batch);
- data size class: data.max_train_images when set, else data.train (the same files: the same size), with
  data.val_fraction (what an epoch holds out);
- device model and count: what each rank trained on (metrics.jsonl's `devices`, the `cuda:N ` index
  dropped) and how many ranks there were.

What is left out of the key on purpose: the learning rate, schedule and augmentation (crop/flip cost
nothing measurable; AutoAugment + RandomErasing cost ~2 % on the CPU, bench/RESULTS.md), checkpoint
settings, seeds. A search is not estimated (its time depends on how its scheduler stops trials).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field

from trainer.spec import JobSpec

UNKNOWN = "unknown"


class Figure(BaseModel):
    """One estimated number and where it came from. `value` is None exactly when `basis` starts with
    "unknown"."""

    model_config = ConfigDict(frozen=True)

    value: float | None
    basis: str = Field(
        description='"history: N past jobs with the same key", "benchmark: bench/RESULTS.md '
        '<row>", "settings: ...", "spec: ..." or "unknown: <why>"'
    )

    @classmethod
    def unknown(cls, why: str) -> Figure:
        return cls(value=None, basis=f"{UNKNOWN}: {why}")

    @property
    def known(self) -> bool:
        return self.value is not None


class EstimateKey(BaseModel):
    """What two jobs must share for one's measured speed to predict the other's (see the module doc)."""

    model_config = ConfigDict(frozen=True)

    model: str
    precision: str
    batch_size: int
    data: str
    device: str | None = Field(default=None, description="device model, e.g. NVIDIA A10G; None: not known yet")
    device_count: int | None = None

    def without_device(self) -> EstimateKey:
        return self.model_copy(update={"device": None, "device_count": None})


def spec_key(spec: JobSpec) -> EstimateKey:
    """The key's spec half (device unknown until the placement is)."""
    m, d = spec.model, spec.data
    model = f"widths={m.widths} blocks={m.blocks} se={m.se_reduction if m.se else 'off'} act={m.activation}"
    data = f"max_train_images={d.max_train_images}" if d.max_train_images is not None else f"train={d.train}"
    return EstimateKey(
        model=model,
        precision=f"{spec.precision} compile={spec.compile}",
        batch_size=spec.optim.batch_size,
        data=f"{data} val_fraction={d.val_fraction:g}",
    )


def device_model(device: str) -> str:
    """'cuda:0 NVIDIA H100 80GB HBM3' → 'NVIDIA H100 80GB HBM3'; a CPU's description stays whole."""
    head, _, rest = device.partition(" ")
    return rest if head.startswith("cuda:") and rest else device


def same_device(a: str, b: str) -> bool:
    """An operator's short name (``NVIDIA A10G``, ``A10G``) matches the full name torch reports."""
    x, y = a.strip().lower(), b.strip().lower()
    return bool(x) and bool(y) and (x == y or x in y or y in x)


@dataclass(frozen=True)
class HistoryRow:
    """What one finished job measured (service/api/history.py builds these from the store and metrics.jsonl)."""

    job_id: str
    key: EstimateKey  # with device and device_count
    images_per_s: float  # median over its epochs
    epoch_seconds: float  # median over its epochs (training + evaluation)
    startup_seconds: float | None  # first epoch's start − the first attempt's submission to Ray
    finished_at: float
    finish_seconds: float | None = None  # the job's end − its last epoch's end (final test pass, exports, ...)


@dataclass(frozen=True)
class Benchmark:
    """A measured figure from bench/RESULTS.md, for one model shape, batch, precision and device."""

    row: str  # how the estimate cites it
    model: str  # spec_key(...).model of the model it measured
    batch_size: int
    precisions: tuple[str, ...]  # spec precisions it stands for
    device: str  # matched with same_device() against the device model
    device_count: int
    images_per_s: float
    startup_seconds: float | None = None
    eval_fraction: float | None = None  # evaluation time per epoch / training time per epoch
    finish_seconds: float | None = None  # after the last epoch: the final test pass, exports, the summary
    node_cpus: float | None = None  # a CPU figure holds only for a node with this many CPUs


_PAPER_MODEL = "widths=[32, 64, 256, 256] blocks=[2, 2, 2, 2] se=16 act=mish"
_CPU = "cpu (2 threads, bf16 AVX512-BF16) AMD EPYC"
# The project's own measurements (bench/RESULTS.md, "CPU — this project's 2-core machine", quiet machine).
# start-up 59.5 s = the `fast` run's first epoch end 382.9 s − its epoch 323.4 s; evaluation 4.3 % = (323.4 s −
# 45,000 images / 145.1 img/s) / (45,000 / 145.1); finish 26.6 s = its 1,739 s in all − its last epoch's end
# at 1,712.4 s. No GPU figure is recorded there yet: none is listed.
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        row='bench/RESULTS.md "CPU — this project\'s 2-core machine": trainctl, precision=auto (bf16), 158.8 img/s',
        model=_PAPER_MODEL,
        batch_size=256,
        precisions=("auto compile=off", "bf16 compile=off"),
        device=_CPU,
        device_count=1,
        images_per_s=158.8,
        startup_seconds=59.5,
        eval_fraction=0.043,
        finish_seconds=26.6,
        node_cpus=2,
    ),
    Benchmark(
        row='bench/RESULTS.md "CPU — this project\'s 2-core machine": trainctl, precision=fp32, 106.5 img/s',
        model=_PAPER_MODEL,
        batch_size=256,
        precisions=("fp32 compile=off",),
        device=_CPU,
        device_count=1,
        images_per_s=106.5,
        startup_seconds=59.5,
        eval_fraction=0.043,
        finish_seconds=26.6,
        node_cpus=2,
    ),
)


class NodeType(BaseModel):
    """A worker node type the operator configured (TRAINCTL_NODE_TYPES), e.g. cluster/gpu.yaml's gpu.1xa10g."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(gt=0, le=100_000)
    gpus: int = Field(default=0, ge=0, le=1024)
    device: str | None = Field(
        default=None, max_length=200, description="the accelerator (or CPU) model, e.g. NVIDIA A10G"
    )


@dataclass(frozen=True)
class Pricing:
    """The operator's settings an estimate uses: node types and prices per node-hour."""

    node_types: Mapping[str, NodeType]
    prices: Mapping[str, float]  # node type → $/h
    sources: tuple[str, ...] = ()  # the settings these came from, e.g. ("TRAINCTL_NODE_TYPES", "TRAINCTL_PRICES")


NO_PRICING = Pricing(node_types={}, prices={})


class LimitCheck(BaseModel):
    field: str
    result: str = Field(description="ok | exceeded | unchecked")
    refuses: bool = Field(default=False, description="the submission is refused over this check (422)")
    message: str


class Estimate(BaseModel):
    key: EstimateKey
    node_type: str | None = Field(description="None: not known (no TRAINCTL_NODE_TYPES)")
    node_type_basis: str
    nodes: Figure
    workers: Figure
    images_per_s: Figure
    startup_seconds: Figure
    epoch_seconds: Figure = Field(description="training plus evaluation, per epoch")
    epochs: int
    finish_seconds: Figure = Field(
        description="after the last epoch until the job ended: the final test pass, exports, the summary"
    )
    wall_seconds: Figure = Field(description="start-up + epochs x epoch_seconds + finish")
    gpu_hours: Figure
    cpu_hours: Figure
    cost: Figure = Field(description="in the currency of TRAINCTL_PRICES")
    settings: list[str] = Field(description="the operator settings this estimate used")
    checks: list[LimitCheck] = Field(default_factory=list, description="the spec's limits against this estimate")


@dataclass(frozen=True)
class _Placement:
    node_type: str | None
    node_type_basis: str
    nodes: Figure
    workers: Figure
    gpu: bool | None  # None: unknown
    device: str | None
    cpus_per_worker: float | None
    node_cpus: float | None = None


def _placement(spec: JobSpec, pricing: Pricing) -> _Placement:
    """Which node type and how many, from spec.scaling and the configured node types (docs/scaling.md:
    auto = one worker per GPU when the cluster has GPUs, else one CPU worker)."""
    s = spec.scaling
    cpw = s.cpus_per_worker if isinstance(s.cpus_per_worker, float | int) else None
    # elastic workers: priced at their most (max), an upper bound on what the cluster will give the job
    asked = s.num_workers if isinstance(s.num_workers, int) else getattr(s.num_workers, "max", None)
    types = pricing.node_types
    gpu_types = {n: t for n, t in types.items() if t.gpus > 0}
    cpu_types = {n: t for n, t in types.items() if t.gpus == 0}
    want_gpu = s.use_gpu if s.use_gpu is not None else (bool(gpu_types) if types else None)
    if not types:
        workers = (
            Figure(value=float(asked), basis="spec: scaling.num_workers")
            if asked is not None
            else Figure.unknown("scaling.num_workers=auto is resolved against the cluster at start")
        )
        why = "no node types configured (TRAINCTL_NODE_TYPES)"
        return _Placement(None, f"{UNKNOWN}: {why}", Figure.unknown(why), workers, want_gpu, None, cpw)
    pool = gpu_types if want_gpu else cpu_types
    if not pool:
        kind = "GPU" if want_gpu else "CPU-only"
        why = f"TRAINCTL_NODE_TYPES has no {kind} node type for scaling.use_gpu={s.use_gpu}"
        return _Placement(None, f"{UNKNOWN}: {why}", Figure.unknown(why), Figure.unknown(why), want_gpu, None, cpw)
    if want_gpu:
        # auto: one node of the largest GPU type, one worker per GPU (at most max_workers); a number: the
        # smallest type that holds it on one node, else as many of the largest as it takes.
        by_size = sorted(pool.items(), key=lambda kv: (kv[1].gpus, kv[0]))
        largest = by_size[-1]
        if asked is None:
            name, node = largest
            n_workers = min(node.gpus, s.max_workers)
            w_basis = f"spec: scaling.num_workers=auto, taken as one {name} node's GPUs (the cluster decides at start)"
        else:
            name, node = next(((n, t) for n, t in by_size if t.gpus >= asked), largest)
            n_workers = asked
            w_basis = "spec: scaling.num_workers"
        n_nodes = math.ceil(n_workers / node.gpus)
        per_worker = cpw if cpw is not None else node.cpus / node.gpus
    else:
        name, node = max(pool.items(), key=lambda kv: (kv[1].cpus, kv[0]))
        n_workers = asked if asked is not None else 1
        w_basis = (
            "spec: scaling.num_workers" if asked is not None else "spec: scaling.num_workers=auto (one CPU worker)"
        )
        per_worker = cpw if cpw is not None else max(node.cpus - 1, 1)
        n_nodes = max(1, math.ceil(n_workers * per_worker / node.cpus))
    return _Placement(
        name,
        "settings: TRAINCTL_NODE_TYPES and spec.scaling",
        Figure(value=float(n_nodes), basis=f"settings: TRAINCTL_NODE_TYPES ({name}) and spec.scaling"),
        Figure(value=float(n_workers), basis=w_basis),
        bool(want_gpu),
        node.device,
        per_worker,
        node.cpus,
    )


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def _matching_history(key: EstimateKey, placement: _Placement, history: Sequence[HistoryRow]) -> list[HistoryRow]:
    """The rows with the spec's key; the device from the placement when known, else the device the newest
    such job ran on (this service's cluster as last seen)."""
    same = [h for h in history if h.key.without_device() == key]
    if placement.device is not None:
        same = [h for h in same if h.key.device is not None and same_device(placement.device, h.key.device)]
    if placement.workers.value is not None:
        same = [h for h in same if h.key.device_count == int(placement.workers.value)]
    if not same:
        return []
    newest = max(same, key=lambda h: h.finished_at)
    return [h for h in same if h.key.device == newest.key.device and h.key.device_count == newest.key.device_count]


def _matching_benchmark(key: EstimateKey, placement: _Placement, benchmarks: Sequence[Benchmark]) -> Benchmark | None:
    if placement.device is None or placement.workers.value is None:
        return None
    for b in benchmarks:
        if (
            b.model == key.model
            and b.batch_size == key.batch_size
            and key.precision in b.precisions
            and same_device(placement.device, b.device)
            and b.device_count == int(placement.workers.value)
            and (b.node_cpus is None or b.node_cpus == placement.node_cpus)
        ):
            return b
    return None


def _images_per_epoch(spec: JobSpec) -> int | None:
    """Training images per epoch when the spec alone says (max_train_images); else the dataset decides."""
    return spec.data.max_train_images


def _hours(wall: Figure, per: Figure, what: str) -> Figure:
    if wall.value is None:
        return Figure(value=None, basis=wall.basis)
    if per.value is None:
        return Figure(value=None, basis=per.basis)
    return Figure(value=round(wall.value / 3600 * per.value, 6), basis=f"wall_seconds x {what}")


def estimate(
    spec: JobSpec,
    history: Sequence[HistoryRow] = (),
    benchmarks: Sequence[Benchmark] = BENCHMARKS,
    pricing: Pricing = NO_PRICING,
) -> Estimate:
    """The estimate for a validated spec (see the module doc for the key and the bases)."""
    key = spec_key(spec)
    place = _placement(spec, pricing)
    epochs = spec.optim.epochs
    rows = _matching_history(key, place, history) if spec.search is None else []
    bench = _matching_benchmark(key, place, benchmarks) if spec.search is None and not rows else None
    device, count = place.device, int(place.workers.value) if place.workers.value is not None else None
    if spec.search is not None:
        why = "a search's time depends on how its scheduler stops trials: not estimated"
        ips = startup = per_epoch = finish = Figure.unknown(why)
    elif rows:
        basis = f"history: {len(rows)} past job{'s' if len(rows) != 1 else ''} with the same key"
        device, count = rows[0].key.device, rows[0].key.device_count
        ips = Figure(value=round(_median(h.images_per_s for h in rows), 1), basis=basis)
        per_epoch = Figure(value=round(_median(h.epoch_seconds for h in rows), 2), basis=basis)
        starts = [h.startup_seconds for h in rows if h.startup_seconds is not None]
        startup = (
            Figure(value=round(_median(starts), 1), basis=basis)
            if starts
            else Figure.unknown("no past job with this key recorded its start-up")
        )
        ends = [h.finish_seconds for h in rows if h.finish_seconds is not None]
        finish = (
            Figure(value=round(_median(ends), 1), basis=basis)
            if ends
            else Figure.unknown("no past job with this key recorded its end")
        )
        if place.workers.value is None:
            place = replace(place, workers=Figure(value=float(count or 0), basis=basis))
        if place.gpu is None and device is not None:  # the device it ran on says whether it had GPUs
            place = replace(place, gpu=not device.startswith("cpu"))
    elif bench is not None:
        basis = f"benchmark: {bench.row}"
        ips = Figure(value=bench.images_per_s, basis=basis)
        startup = (
            Figure(value=bench.startup_seconds, basis=basis)
            if bench.startup_seconds is not None
            else Figure.unknown("the benchmark row has no start-up time")
        )
        finish = (
            Figure(value=bench.finish_seconds, basis=basis)
            if bench.finish_seconds is not None
            else Figure.unknown("the benchmark row has no time after its last epoch")
        )
        n = _images_per_epoch(spec)
        if n is None:
            per_epoch = Figure.unknown(
                "images per epoch depend on the dataset's size: set data.max_train_images, or run one job first"
            )
        else:
            train_s = n / bench.images_per_s
            per_epoch = Figure(value=round(train_s * (1 + (bench.eval_fraction or 0.0)), 2), basis=basis)
    else:
        why = "no finished job with this key" + (
            f" on {place.device}" if place.device else " (and no device known: no TRAINCTL_NODE_TYPES)"
        )
        ips = startup = per_epoch = finish = Figure.unknown(why + ", and no benchmark figure for it")
    key = key.model_copy(update={"device": device, "device_count": count})
    parts = (startup, per_epoch, finish)
    if all(p.value is not None for p in parts):
        total = (startup.value or 0.0) + epochs * (per_epoch.value or 0.0) + (finish.value or 0.0)
        wall = Figure(value=round(total, 1), basis=per_epoch.basis)
    else:
        wall = Figure(value=None, basis=next(p for p in parts if p.value is None).basis)
    gpus = (
        place.workers
        if place.gpu
        else Figure(value=0.0, basis="CPU workers")
        if place.gpu is False
        else Figure.unknown("whether the job gets GPUs is decided by the cluster (scaling.use_gpu unset)")
    )
    gpu_hours = _hours(wall, gpus, "GPU workers")
    cpus = (
        Figure(value=place.workers.value * place.cpus_per_worker, basis="workers x CPUs per worker")
        if place.workers.value is not None and place.cpus_per_worker is not None
        else Figure.unknown("CPUs per worker are resolved at start (scaling.cpus_per_worker=auto, no node type)")
    )
    cpu_hours = _hours(wall, cpus, "CPUs")
    cost = _cost(wall, place, pricing)
    return Estimate(
        key=key,
        node_type=place.node_type,
        node_type_basis=place.node_type_basis,
        nodes=place.nodes,
        workers=place.workers,
        images_per_s=ips,
        startup_seconds=startup,
        epoch_seconds=per_epoch,
        epochs=epochs,
        finish_seconds=finish,
        wall_seconds=wall,
        gpu_hours=gpu_hours,
        cpu_hours=cpu_hours,
        cost=cost,
        settings=list(pricing.sources),
    )


def _cost(wall: Figure, place: _Placement, pricing: Pricing) -> Figure:
    if not pricing.prices:
        return Figure.unknown("no prices configured (TRAINCTL_PRICES)")
    if place.node_type is None:
        return Figure(value=None, basis=place.node_type_basis)
    price = pricing.prices.get(place.node_type)
    if price is None:
        return Figure.unknown(f"TRAINCTL_PRICES has no price for node type {place.node_type}")
    if wall.value is None:
        return Figure(value=None, basis=wall.basis)
    if place.nodes.value is None:
        return Figure(value=None, basis=place.nodes.basis)
    value = round(wall.value / 3600 * place.nodes.value * price, 6)
    return Figure(value=value, basis=f"{wall.basis}; settings: TRAINCTL_PRICES {place.node_type} {price:g}/h")


def check_limits(spec: JobSpec, est: Estimate, priced: bool) -> tuple[list[LimitCheck], list[dict[str, str]]]:
    """(the checks to show, the refusals as [{field, message}]) of limits.max_hours and limits.max_cost
    against the estimate. An unknown figure never refuses: its check says it could not check. `priced`:
    does this service have prices (a budget on a service without prices is refused: it can never be
    checked)."""
    checks: list[LimitCheck] = []
    refusals: list[dict[str, str]] = []
    limits = spec.limits
    wall = est.wall_seconds
    if wall.value is None:
        checks.append(
            LimitCheck(
                field="limits.max_hours",
                result="unchecked",
                message=f"could not check limits.max_hours={limits.max_hours:g} h: the wall time is {wall.basis}",
            )
        )
    else:
        hours = wall.value / 3600
        over = hours > limits.max_hours
        message = (
            f"estimated wall time {hours:.2f} h ({wall.basis}) "
            f"{'exceeds' if over else 'is within'} limits.max_hours={limits.max_hours:g} h"
        )
        checks.append(
            LimitCheck(field="limits.max_hours", result="exceeded" if over else "ok", refuses=over, message=message)
        )
        if over:
            refusals.append({"field": "limits.max_hours", "message": message})
    if limits.max_cost is not None:
        if not priced:
            message = (
                f"limits.max_cost={limits.max_cost:g} cannot be checked: this service has no prices configured "
                "(the operator sets TRAINCTL_PRICES); remove limits.max_cost"
            )
            checks.append(LimitCheck(field="limits.max_cost", result="unchecked", refuses=True, message=message))
            refusals.append({"field": "limits.max_cost", "message": message})
        elif est.cost.value is None:
            checks.append(
                LimitCheck(
                    field="limits.max_cost",
                    result="unchecked",
                    message=f"could not check limits.max_cost={limits.max_cost:g}: the cost is {est.cost.basis}",
                )
            )
        else:
            over = est.cost.value > limits.max_cost
            message = (
                f"estimated cost {est.cost.value:.2f} ({est.cost.basis}) "
                f"{'exceeds' if over else 'is within'} limits.max_cost={limits.max_cost:g}"
            )
            checks.append(
                LimitCheck(field="limits.max_cost", result="exceeded" if over else "ok", refuses=over, message=message)
            )
            if over:
                refusals.append({"field": "limits.max_cost", "message": message})
    return checks, refusals
