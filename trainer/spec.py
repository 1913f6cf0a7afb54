"""The job spec: the one contract between users, the control plane and the Ray workers.

This module imports only pydantic and the standard library, so the service can validate specs without
pulling in torch or Ray. Only JSON crosses into Ray; the worker re-validates it with the same class.

A spec is written as a preset plus dotted-path overrides (`resolve("debug", {"optim.epochs": 3})`);
the *resolved* spec is what gets stored and run, so a stored job never depends on a preset that changed.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import reprlib
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]

# Hard ceilings every spec obeys, in the service and again in the driver that re-validates it: a spec must
# not be able to make the driver (on the cluster's head) build a model that exhausts its memory, nor make
# Tune enumerate an endless search. Operators can set lower limits in the service (TRAINCTL_MAX_*).
MAX_PARAMETERS = 200_000_000  # the paper's model has 4.6 M
MAX_MACS = 50_000_000_000  # multiply-accumulates per 32x32 image; the paper's model: ~0.6 G
MAX_TRIALS = 10_000
MAX_SEARCH_VALUES = 1_000  # values in one choice/grid list
MAX_SEARCH_VALUES_TOTAL = 2_000  # in all of a search's choice/grid lists (each is validated at submission)
# Depth, bounded on its own: a model of width-1 stages is small in parameters but 2,000,000 blocks of it
# are 20 M torch modules (gigabytes of Python objects on the head before any parameter counts).
MAX_WIDTH = 4096  # channels in one stage; the paper's widest is 256
MAX_BLOCKS_PER_STAGE = 64  # ResNet-152's deepest stage has 36
MAX_BLOCKS = 128  # residual blocks in all stages together (two 3x3 convolutions each)
MAX_STAGES = 8
MAX_EPOCHS = 10_000
MAX_SEARCH_PATHS = 32  # fields one search may vary
MAX_TEXT = 4096  # a path or URI (Linux's PATH_MAX)
MAX_ECHO = 200  # characters of a bad value an error message may quote
MAX_ERRORS = 50  # field errors one answer lists
# Ray's own resource names: a spec must not claim the head node's slot, the driver's slot, or set CPU/GPU/
# memory behind cpus_per_worker's back.
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory", "trainctl_driver")
RESERVED_RESOURCE_PREFIXES = ("node:",)


_ECHO = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_ECHO.maxlevel, _ECHO.maxtuple, _ECHO.maxlist, _ECHO.maxdict, _ECHO.maxset = 2, 4, 4, 4, 4
_ECHO.maxstring, _ECHO.maxlong, _ECHO.maxother = 60, 40, 60


def short(value: Any) -> str:
    """A bad value as an error may quote it: at most MAX_ECHO characters, and computed in bounded time (reprlib
    stops at a few items and levels), so a huge or deeply shared value never becomes a huge message."""
    text = _ECHO.repr(value)
    return text if len(text) <= MAX_ECHO else text[: MAX_ECHO - 3] + "..."


def _auto_or(kind: type, low: float, high: float, low_open: bool = False) -> Any:
    """A number in [low, high] (low excluded if low_open) or the string "auto", with one error message
    naming both (a plain union would report one error per member, under odd field names)."""
    check = _auto_or_check(kind, low, high, low_open)
    return Annotated[kind | Literal["auto"], PlainValidator(check, json_schema_input_type=kind | Literal["auto"])]


def _auto_or_check(kind: type, low: float, high: float, low_open: bool = False) -> typing.Callable[[Any], Any]:
    bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"

    def check(value: Any) -> Any:
        if value == "auto":
            return "auto"
        ok_type = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (kind is float or float(value).is_integer())
        )
        if not ok_type or not ((value > low if low_open else value >= low) and value <= high):
            raise ValueError(
                f'must be "auto" or {"an integer" if kind is int else "a number"} {bound}, got {short(value)}'
            )
        return kind(value)

    return check


class Section(BaseModel):
    # extra="forbid": a misspelt field is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    # Every number bounded here, before any work: the cost below is arithmetic on these, and the model that
    # the driver builds (on the cluster's head) is only ever one that passed.
    widths: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(
        default=[32, 64, 256, 256], min_length=1, max_length=MAX_STAGES
    )
    # at most MAX_BLOCKS in all (the cross-field check below)
    blocks: list[Annotated[int, Field(ge=1, le=MAX_BLOCKS_PER_STAGE)]] = Field(
        default=[2, 2, 2, 2], min_length=1, max_length=MAX_STAGES
    )
    activation: Literal["mish", "relu"] = "mish"
    se: bool = True
    se_reduction: int = Field(default=16, ge=1, le=MAX_WIDTH)
    dropout: Fraction = 0.5
    num_classes: int = Field(default=10, ge=2, le=1000)
    # Goyal et al. 2017 ("Accurate, large minibatch SGD"): each residual block starts as the identity, which
    # lets a short run take a large lr from its first steps. Initialisation only: same parameters, same network.
    zero_init_residual: bool = Field(
        default=False, description="start each block's last BatchNorm scale at 0 (the block begins as its shortcut)"
    )
    # airbench's patch whitening (trainer/whiten.py): the stem's filters start as the principal directions of
    # the training images' 3×3 patches, scaled to unit variance. Initialisation only, like the above.
    whiten_stem: bool = Field(
        default=False, description="start the stem convolution as a whitening of the training images' patches"
    )


class AugmentSpec(Section):
    """Training-time augmentation, batched on the device (trainer/augment.py), in the notebook's order:
    crop → flip → AutoAugment → RandomErasing → normalise. Evaluation images are only normalised."""

    crop: bool = Field(default=True, description="RandomCrop(32, padding 4), zero padding")
    # A short run underfits: a smaller shift (airbench's 2 pixels) leaves more of each image to learn from.
    crop_padding: int = Field(default=4, ge=1, le=4, description="the crop's largest shift in pixels (padding)")
    flip: bool = Field(default=True, description="RandomHorizontalFlip(p 0.5)")
    # airbench's alternating flip: the first epoch flips a random half of the images, each later epoch flips
    # exactly those the previous one did not, so every pair of epochs shows every image both ways (a random
    # coin per epoch repeats an image's side half the time). Pure function of seed and epoch: resume is exact.
    flip_alternate: bool = Field(default=False, description="flip each image the other way than the epoch before")
    autoaugment: bool = Field(default=False, description="AutoAugment, ImageNet policy, one sub-policy per image")
    random_erasing: bool = Field(default=False, description="RandomErasing after AutoAugment, value 0")
    erasing_p: float = Field(default=0.5, ge=0.0, le=1.0)
    erasing_scale: tuple[float, float] = (0.02, 0.33)
    erasing_ratio: tuple[float, float] = (0.3, 3.3)

    @model_validator(mode="after")
    def _ranges(self) -> AugmentSpec:
        lo, hi = self.erasing_scale
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"erasing_scale {self.erasing_scale} must satisfy 0 < low <= high < 1")
        lo, hi = self.erasing_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"erasing_ratio {self.erasing_ratio} must satisfy 0 < low <= high")
        return self


class DataSpec(Section):
    # An absolute path, a `~/` path, or a storage URI (file://, s3://). `auto` picks the reader from
    # what is there: *.parquet → parquet, a directory holding data_batch_1 → cifar10-python, an empty or
    # missing local directory → torchvision (downloads CIFAR-10 into it).
    train: str = Field(default="~/.cache/trainctl/cifar10", min_length=1, max_length=MAX_TEXT)
    test: str | None = Field(default=None, max_length=MAX_TEXT)
    format: Literal["auto", "cifar10-python", "parquet", "torchvision"] = "auto"
    val_fraction: float = Field(default=0.1, ge=0.0, le=0.5)
    max_train_images: int | None = Field(default=None, ge=1, le=1_000_000_000)
    # With no data.test, a CIFAR-10 python directory (or the torchvision download) as data.train supplies
    # its own test_batch. 0 = never evaluate the test split during training.
    test_every_epochs: int = Field(
        default=1, ge=0, le=10000, description="evaluate the test split every N epochs (0: never)"
    )
    augment: AugmentSpec = AugmentSpec()


class OptimSpec(Section):
    lr: float = Field(default=0.05, gt=0.0, le=10.0)
    momentum: Fraction = 0.9
    nesterov: bool = False
    weight_decay: float = Field(default=1e-3, ge=0.0, le=1.0)
    # False: weight decay only on conv/linear weights. Decaying BatchNorm's scale and shift (and biases) only
    # pulls them towards 0, which a normalised network does not need (the fast CIFAR-10 recipes leave them out).
    decay_norm_and_bias: bool = Field(default=True, description="apply weight_decay to BatchNorm and bias too")
    # An exponential moving average of the weights, updated every step: what is evaluated and checkpointed
    # as the model (the live weights ride along in the checkpoint to resume from). 0 = off.
    ema_decay: Fraction = Field(default=0.0, description="EMA of the weights per step (0: off; e.g. 0.99)")
    # Lookahead (trainer/lookahead.py): every k steps the live weights are pulled back towards slow weights that
    # trail them, by a pull that grows over the run as airbench94's. 0 = off; airbench uses 5.
    lookahead_steps: int = Field(default=0, ge=0, le=10_000, description="lookahead every k steps (0: off)")
    label_smoothing: Fraction = 0.1
    batch_size: int = Field(default=512, ge=1, le=65536, description="global batch, split over workers")
    epochs: int = Field(default=200, ge=1, le=MAX_EPOCHS)
    # {epoch: weight decay from that epoch on}, e.g. {85: 1e-4}: the notebook's switch after its crash.
    weight_decay_milestones: dict[
        Annotated[int, Field(ge=1, le=MAX_EPOCHS)], Annotated[float, Field(ge=0.0, le=1.0)]
    ] = Field(default_factory=dict, max_length=100)
    # At each milestone, start with empty momentum buffers (the notebook built a fresh SGD there).
    fresh_momentum_at_milestones: bool = False


class ScheduleSpec(Section):
    kind: Literal["cosine", "cosine_warm_restarts", "onecycle", "constant"] = "cosine_warm_restarts"
    t0: int = Field(default=10, ge=1, le=MAX_EPOCHS, description="epochs in the first warm-restart cycle")
    t_mult: int = Field(default=2, ge=1, le=100, description="each warm-restart cycle is this many times longer")
    warmup_fraction: float = Field(default=0.15, ge=0.0, lt=1.0, description="onecycle's rising part")
    # batch: the lr changes every optimizer step (fractional epochs); epoch: once per epoch, as
    # torch's scheduler.step() called at the end of each epoch (the notebook).
    step_per: Literal["batch", "epoch"] = "batch"
    # Epochs at which the schedule starts over as if new (the notebook's fresh scheduler at epoch 85).
    restart_epochs: list[Annotated[int, Field(ge=1, le=MAX_EPOCHS)]] = Field(default_factory=list, max_length=100)


MAX_WORKERS = 1024


class WorkerRange(Section):
    """Elastic workers (`num_workers: {min: 1, max: 3}`): Ray Train starts with as many as can be placed (at
    least `min`) and grows towards `max` as capacity arrives, shrinking when a worker is lost. The global batch
    stays fixed, so every count in [min, max] must divide optim.batch_size (docs/scaling.md, "Elastic workers")."""

    min: int = Field(ge=1, le=MAX_WORKERS, description="fewest workers the run trains with")
    max: int = Field(ge=1, le=MAX_WORKERS, description="most workers the run grows to (at most scaling.max_workers)")

    def __str__(self) -> str:
        return f"{self.min}-{self.max}"


_count_or_auto = _auto_or_check(int, 1, MAX_WORKERS)


def _workers(value: Any) -> Any:
    """scaling.num_workers: "auto", an integer in [1, MAX_WORKERS], or {min, max} (elastic). One validator with
    one message, so a bad value is reported once under scaling.num_workers rather than once per union member."""
    if isinstance(value, WorkerRange):
        return value
    if isinstance(value, dict):
        try:
            workers = WorkerRange.model_validate(value)
        except ValidationError as exc:
            why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors()[:4])
            raise ValueError(f"elastic workers must look like {{min: N, max: M}} with 1 <= N <= M: {why}") from None
        if workers.min > workers.max:
            raise ValueError(f"min ({workers.min}) must not exceed max ({workers.max})")
        return workers
    try:
        return _count_or_auto(value)
    except ValueError as exc:
        raise ValueError(f"{exc}, or {{min: N, max: M}} for elastic workers") from None


class ScalingSpec(Section):
    # Resolved against the cluster when the run starts (trainer/placement.py, docs/scaling.md):
    # "auto" = one worker per GPU (at most max_workers) when the cluster has GPUs, else one CPU worker;
    # {min, max} = elastic (WorkerRange).
    num_workers: Annotated[
        int | Literal["auto"] | WorkerRange,
        PlainValidator(_workers, json_schema_input_type=int | Literal["auto"] | WorkerRange),
    ] = Field(default="auto", description='a number, "auto", or {min, max} for elastic workers')
    max_workers: int = Field(
        default=8, ge=1, le=MAX_WORKERS, description="cap on num_workers=auto and on an elastic num_workers.max"
    )
    # How often Ray Train considers growing an elastic worker group (its elastic_resize_monitor_interval_s;
    # Ray's default is 60 s). Each resize restarts the workers from the latest checkpoint, so a short interval
    # on a cluster whose capacity comes and goes costs repeated epochs.
    resize_interval_s: float = Field(
        default=60.0, ge=1.0, le=3600.0, description="elastic workers: seconds between checks for more capacity"
    )
    # None = GPUs whenever the cluster has at least one (asking for more than it has is an error naming
    # scaling.num_workers, never a silent CPU run); true = GPUs, waiting for the autoscaler; false = CPUs.
    use_gpu: bool | None = None
    # "auto" = the CPUs the worker can get: its node's CPUs (per GPU on GPU nodes) less one for the driver.
    cpus_per_worker: _auto_or(float, 0, 256, low_open=True) = "auto"  # type: ignore[valid-type]
    # GPUs each worker reserves when it trains on GPUs (a node type must have that many: the service refuses
    # more than TRAINCTL_MAX_GPUS_PER_NODE).
    gpus_per_worker: int = Field(default=1, ge=1, le=16, description="GPUs each GPU worker reserves")
    # How workers share nodes: null = Ray's default (packed where they fit); 1 = one worker per node
    # (placement STRICT_SPREAD); equal to num_workers = all workers on one node (STRICT_PACK), e.g. 4 workers
    # of 1 GPU on one 4-GPU node instead of four 1-GPU nodes. Other values can't be placed exactly.
    workers_per_node: int | None = Field(
        default=None, ge=1, le=1024, description="null: Ray's default; 1: one per node; num_workers: one node"
    )
    # Extra Ray resources each worker reserves, e.g. {"trainslot": 1} to spread workers over nodes that
    # advertise one slot each, or {"accelerator_type:A10G": 0.001} to pin a GPU type.
    resources_per_worker: dict[Annotated[str, Field(min_length=1, max_length=200)], float] = Field(
        default_factory=dict, max_length=16
    )

    @field_serializer("num_workers")
    def _dump_workers(self, value: int | str | WorkerRange) -> int | str | dict[str, int]:
        # (pydantic's own serializer for a PlainValidator'd union warns on the model member)
        return value.model_dump() if isinstance(value, WorkerRange) else value

    @field_validator("resources_per_worker")
    @classmethod
    def _no_builtin_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU", "memory"):
                raise ValueError(f"{name!r} is set by cpus_per_worker/use_gpu, not resources_per_worker")
            if name in RESERVED_RESOURCES or name.startswith(RESERVED_RESOURCE_PREFIXES):
                raise ValueError(
                    f"{short(name)} is a resource name reserved by Ray or trainctl; "
                    "use a custom resource your nodes advertise"
                )
            if not 0 < amount <= 1_000_000:
                raise ValueError(f"resource {short(name)} must be positive and at most 1,000,000, got {amount}")
        return value


def _check_elastic(s: ScalingSpec, o: OptimSpec, fail: typing.Callable[[tuple[str, ...], Any, str], None]) -> None:
    """An elastic range must stay under scaling.max_workers, and (the rule that keeps the recipe's meaning:
    a fixed global batch) every worker count in it must divide optim.batch_size."""
    assert isinstance(s.num_workers, WorkerRange)
    low, high = s.num_workers.min, s.num_workers.max
    if high > s.max_workers:
        fail(
            ("scaling", "num_workers", "max"),
            high,
            f"must not exceed scaling.max_workers={s.max_workers} (raise scaling.max_workers or lower max)",
        )
        return
    misfits = [n for n in range(low, high + 1) if o.batch_size % n]
    if misfits:
        multiple = math.lcm(*range(low, high + 1))
        fail(
            ("optim", "batch_size"),
            o.batch_size,
            f"the global batch stays fixed when elastic workers come and go, so every worker count in "
            f"scaling.num_workers {low}..{high} must divide it; {short(misfits)} do not: use a multiple of {multiple}"
            " or a narrower range",
        )


class CheckpointSpec(Section):
    every_epochs: int = Field(default=1, ge=1, le=MAX_EPOCHS)
    keep_best: PositiveInt = Field(default=2, le=100, description="best by val_acc; the latest is kept too")
    max_failures: int = Field(default=2, ge=0, le=100, description="worker-group restarts inside one run")
    max_restarts: int = Field(default=2, ge=0, le=10, description="resubmissions after a driver/infra failure")
    max_infra_failures: int = Field(
        default=5,
        ge=0,
        le=100,
        description="worker-group restarts inside one run after a worker node or host was lost (an "
        "infrastructure loss: charged here, never to max_failures or max_restarts)",
    )


class LimitsSpec(Section):
    max_hours: float = Field(
        default=72.0,
        gt=0.0,
        le=24 * 365,
        description="wall-clock limit from the first submission; then the job ends FAILED "
        "(the service may cap it lower)",
    )
    max_cost: float | None = Field(
        default=None,
        ge=0.0,
        le=1e9,
        description="refuse the job at submission when its estimated cost (the service's configured prices, "
        "TRAINCTL_PRICES) is higher; null: no budget",
    )


# --- searches (Ray Tune) ------------------------------------------------------------------------


class LogUniform(Section):
    loguniform: tuple[float, float]


class Uniform(Section):
    uniform: tuple[float, float]


class RandInt(Section):
    randint: tuple[Annotated[int, Field(ge=-(2**53), le=2**53)], Annotated[int, Field(ge=-(2**53), le=2**53)]]


# A search varies single values (checked against the field later): never a nested structure, never a long text.
SearchValue = Annotated[
    None | bool | int | float | Annotated[str, Field(max_length=MAX_TEXT)], Field(union_mode="smart")
]


class Choice(Section):
    choice: list[SearchValue] = Field(min_length=1, max_length=MAX_SEARCH_VALUES)


class Grid(Section):
    grid: list[SearchValue] = Field(min_length=1, max_length=MAX_SEARCH_VALUES)


Distribution = LogUniform | Uniform | RandInt | Choice | Grid


class AshaSpec(Section):
    kind: Literal["asha"] = "asha"
    grace_period: int = Field(default=1, ge=1, le=MAX_EPOCHS)
    reduction_factor: float = Field(default=2.0, gt=1.0, le=100.0)
    max_t: int | None = Field(default=None, ge=1, le=MAX_EPOCHS, description="epochs; default: optim.epochs")


class NoScheduler(Section):
    kind: Literal["none"] = "none"


# How trials pick their values: `random` samples each distribution (grid entries are crossed with the samples),
# `grid` tries every combination of `grid` entries only, `optuna` is Optuna's TPE sampler, which learns from the
# trials already reported (all but `grid` distributions; it works with ASHA's early stopping).
SearchAlgorithm = Literal["random", "grid", "optuna"]


class SearchSpec(Section):
    space: dict[Annotated[str, Field(max_length=200)], Distribution] = Field(min_length=1, max_length=MAX_SEARCH_PATHS)
    algorithm: SearchAlgorithm = "random"
    num_samples: int = Field(default=4, ge=1, le=MAX_TRIALS)
    metric: Literal["val_acc", "val_loss", "train_loss", "train_acc"] = "val_acc"
    mode: Literal["max", "min"] = "max"
    scheduler: Annotated[AshaSpec | NoScheduler, Field(discriminator="kind")] = AshaSpec()
    max_concurrent_trials: int = Field(default=1, ge=1, le=1024)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    def total_trials(self) -> int:
        """Tune's count: every grid combination, num_samples times."""
        combos = 1
        for dist in self.space.values():
            if isinstance(dist, Grid):
                combos *= len(dist.grid)
        return self.num_samples * combos


def _check_algorithm(algorithm: SearchAlgorithm, dist: Distribution) -> str | None:
    """Why `algorithm` cannot search `dist`, or None."""
    if algorithm == "optuna" and isinstance(dist, Grid):
        return "search.algorithm optuna samples its values: use choice instead of grid"
    if algorithm == "grid" and not isinstance(dist, Grid):
        return "search.algorithm grid tries listed values only: use grid (or search.algorithm random)"
    return None


# --- alerts (the service sends them; the trainer ignores this section) ----------------------------

NotifyState = Literal["FAILED", "SUCCEEDED", "CANCELLED"]
NOTIFY_STATES: tuple[NotifyState, ...] = typing.get_args(NotifyState)
MAX_URL = 2048


class NotifySpec(Section):
    """A webhook the service POSTs a small JSON body to when the job reaches one of `on` (service/engine/notify.py)."""

    webhook: str = Field(max_length=MAX_URL, description="http(s) URL; the operator allows hosts")
    on: list[NotifyState] = Field(default_factory=lambda: list(NOTIFY_STATES), min_length=1, max_length=3)

    @field_validator("webhook")
    @classmethod
    def _http_only(cls, url: str) -> str:
        scheme, sep, rest = url.partition("://")
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        if not sep or scheme.lower() not in ("http", "https") or not host or any(c.isspace() for c in url):
            raise ValueError(f"must be an http:// or https:// URL with a host, got {short(url)}")
        return url


# --- experiment trackers (trainer/tracking.py; the `mlflow` and `wandb` extras) -------------------------------


def mlflow_store_path(uri: str) -> str:
    """The local path an MLflow tracking URI keeps its data at: `sqlite:///ABS/PATH.db` -> its database file,
    `file:///DIR`, `/DIR` or `~/DIR` (MLflow's file store) -> the directory. The service checks it lies under
    the data roots; anything else (a tracking server's URL) is refused."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if not path.startswith("/"):  # sqlite:////abs/path: MLflow's absolute form keeps one more slash
            raise ValueError(f"must be sqlite:////ABSOLUTE/PATH.db (four slashes), got {short(uri)}")
        return path
    if uri.startswith(("/", "~/", "file:///")):
        return uri
    raise ValueError(
        f"must be sqlite:////ABSOLUTE/PATH.db or a directory (/..., ~/..., file:///...) under the data roots, "
        f"got {short(uri)}"
    )


class MlflowSpec(Section):
    tracking_uri: str = Field(
        max_length=MAX_TEXT, description="sqlite:////ABS/PATH.db or a directory (file store), under the data roots"
    )
    experiment: str = Field(default="trainctl", min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")

    @field_validator("tracking_uri")
    @classmethod
    def _local_store(cls, uri: str) -> str:
        mlflow_store_path(uri)
        return uri


WANDB_MODES = ("offline",)


class WandbSpec(Section):
    """A W&B run kept offline, in files: `wandb sync DIR` uploads it later from a machine that may reach W&B."""

    # W&B's own rule for project names: at most 128 characters, none of / \ # ? % :
    project: str = Field(
        default="trainctl",
        min_length=1,
        max_length=128,
        pattern=r"^[^/\\#?%:\x00-\x1f]+$",
        description="the W&B project the run is synced into later",
    )
    mode: Literal["offline"] = Field(
        default="offline", description="offline only: this service never sends a run to a W&B server itself"
    )
    dir: str | None = Field(
        default=None,
        max_length=MAX_TEXT,
        description="an absolute directory under the data roots for the offline run (null: <job dir>/wandb)",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _offline_only(cls, mode: object) -> object:
        if mode not in WANDB_MODES:
            raise ValueError(
                f"must be offline, got {short(mode)}: this service never sends a run to W&B itself; "
                "`wandb sync` the offline run from a machine that may"
            )
        return mode

    @field_validator("dir")
    @classmethod
    def _absolute_local(cls, path: str | None) -> str | None:
        if path is not None and (not path.startswith("/") or "://" in path or "/../" in f"{path}/"):
            raise ValueError(f"must be an absolute local directory (/...) without '..', got {short(path)}")
        return path


class TrackingSpec(Section):
    """Where the run's params (at its start), per-epoch metrics (as rank 0 writes them) and best checkpoint (at
    its end) are logged."""

    mlflow: MlflowSpec | None = None
    wandb: WandbSpec | None = None


# --- the job spec ---------------------------------------------------------------------------------


ExportFormat = Literal["safetensors", "pt2", "onnx"]
# torch.compile's modes that matter on GPUs; "reduce-overhead" adds CUDA graphs (on a CPU it compiles as
# "default": trainer/device_settings.py). true/false are accepted for "default"/"off".
CompileMode = Literal["off", "default", "max-autotune-no-cudagraphs", "reduce-overhead"]
COMPILE_MODES: tuple[CompileMode, ...] = typing.get_args(CompileMode)
# Test-time augmentation of the run's final test pass and of `evaluate --tta`: `flip` averages the logits of
# each image and its mirror image; `flip-shift` also of both views shifted one pixel up-left and one down-right
# (airbench's mirror + translate: 6 passes). Reported beside the plain accuracy, never instead of it.
TtaMode = Literal["none", "flip", "flip-shift"]
# The default exports; onnx is asked for by name (`exports: [onnx]`): it needs the `[onnx]` extra's packages.
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("safetensors", "pt2")


class JobSpec(Section):
    """One training job. Each field's description is what `python -m trainer describe` and /openapi.json show."""

    model: ModelSpec = Field(
        default=ModelSpec(), description="the network: the paper's SE/Mish ResNet18 and its width, depth, dropout"
    )
    data: DataSpec = Field(
        default=DataSpec(),
        description="training (and optional test) data: a path or s3:// URI, its format, the validation split",
    )
    optim: OptimSpec = Field(
        default=OptimSpec(), description="the optimizer: epochs, batch size, learning rate, momentum, weight decay"
    )
    schedule: ScheduleSpec = Field(default=ScheduleSpec(), description="the learning-rate schedule")
    scaling: ScalingSpec = Field(
        default=ScalingSpec(), description="how many Ray Train workers, and whether they use GPUs"
    )
    # auto = bf16 autocast on CUDA; on CPUs with native bf16 (AMX / AVX512-BF16) whichever of bf16 and fp32
    # a few timed steps of the job's own model and batch find faster at start; fp32 elsewhere.
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto",
        description="auto: bf16 autocast on CUDA, on CPUs with native bf16 the faster of bf16/fp32 (measured at "
        "start), else fp32",
    )
    # auto = on for CUDA; on CPUs the faster memory layout by the same measurement (trainer/precision.py).
    channels_last: Literal["auto"] | bool = Field(
        default="auto", description="the channels-last memory layout; auto: on for CUDA, measured on CPUs"
    )
    compile: CompileMode = Field(
        default="off",
        description="torch.compile's mode: off, default, max-autotune-no-cudagraphs or reduce-overhead (CUDA graphs; "
        "compiles as default off CUDA)",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="the random seed of data order and initialisation")
    checkpoint: CheckpointSpec = Field(
        default=CheckpointSpec(), description="how often checkpoints are written, how many kept, restarts allowed"
    )
    limits: LimitsSpec = Field(
        default=LimitsSpec(), description="bounds on the run: max_hours of wall time from the first submission"
    )
    search: SearchSpec | None = Field(default=None, description="a Ray Tune search over this spec (null: a single run)")
    notify: NotifySpec | None = Field(
        default=None, description="a webhook called when the job ends FAILED, SUCCEEDED or CANCELLED (null: none)"
    )
    tracking: TrackingSpec | None = Field(
        default=None, description="experiment trackers the run logs to (MLflow, W&B offline; null: none)"
    )
    # At the end of a run the best checkpoint is exported in these formats to <job dir>/artifacts/
    # (trainer/export.py): weights-only safetensors and a torch.export program with normalisation inside.
    exports: list[ExportFormat] = Field(
        default_factory=lambda: list(EXPORT_FORMATS),
        max_length=len(typing.get_args(ExportFormat)),
        description="formats the best checkpoint is exported in at the end: safetensors (weights), pt2 "
        "(torch.export program), onnx (needs the [onnx] extra)",
    )
    tta: TtaMode = Field(
        default="none", description="test-time augmentation of the final test pass (summary.best_checkpoint_tta_acc)"
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_bool(cls, value: Any) -> Any:
        """Specs written before the modes existed said `compile: true` / `false`."""
        return {True: "default", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _cross_field_checks(self) -> JobSpec:
        errors: list[InitErrorDetails] = []

        def fail(loc: tuple[str, ...], value: Any, message: str) -> None:
            errors.append(InitErrorDetails(type=PydanticCustomError("cross_field", message), loc=loc, input=value))

        m, o, s = self.model, self.optim, self.scaling
        if len(m.widths) != len(m.blocks):
            fail(
                ("model", "blocks"),
                m.blocks,
                f"needs one entry per stage: model.widths has {len(m.widths)}, model.blocks has {len(m.blocks)}",
            )
        if m.se and m.se_reduction > min(m.widths):
            fail(
                ("model", "se_reduction"),
                m.se_reduction,
                f"must not exceed the smallest width ({min(m.widths)}), or the SE bottleneck has 0 channels",
            )
        if isinstance(s.num_workers, int) and o.batch_size % s.num_workers:
            fail(
                ("optim", "batch_size"),
                o.batch_size,
                f"the global batch must divide evenly over scaling.num_workers={s.num_workers}",
            )
        if isinstance(s.num_workers, WorkerRange):
            _check_elastic(s, o, fail)
        if s.workers_per_node not in (None, 1) and s.workers_per_node != s.num_workers:
            fail(
                ("scaling", "workers_per_node"),
                s.workers_per_node,
                "must be 1 (one worker per node) or equal to an explicit scaling.num_workers (all on one node), "
                f"not {s.workers_per_node} with scaling.num_workers={s.num_workers}",
            )
        if self.data.max_train_images is not None and self.data.max_train_images < o.batch_size:
            fail(
                ("data", "max_train_images"),
                self.data.max_train_images,
                f"must be at least optim.batch_size={o.batch_size}, or an epoch has no full batch",
            )
        if sum(m.blocks) > MAX_BLOCKS:
            fail(
                ("model", "blocks"),
                m.blocks,
                f"the model is too deep: {sum(m.blocks)} residual blocks in all, the limit is {MAX_BLOCKS}",
            )
        params, macs = model_cost(m)
        if params > MAX_PARAMETERS or macs > MAX_MACS:
            what = (
                f"{params:,} parameters (limit {MAX_PARAMETERS:,})"
                if params > MAX_PARAMETERS
                else f"{macs:,} multiply-accumulates per image (limit {MAX_MACS:,})"
            )
            for loc, value in ((("model", "widths"), m.widths), (("model", "blocks"), m.blocks)):
                fail(loc, value, f"the model is too large: {what}; use smaller model.widths or fewer model.blocks")
        for epoch in sorted(o.weight_decay_milestones):
            if epoch > o.epochs:
                fail(
                    ("optim", "weight_decay_milestones"),
                    epoch,
                    f"milestone epoch {epoch} is after the last epoch (optim.epochs={o.epochs})",
                )
        for epoch in self.schedule.restart_epochs:
            if epoch > o.epochs or epoch == 1:
                fail(
                    ("schedule", "restart_epochs"),
                    epoch,
                    f"restart epoch {epoch} must lie in 2..optim.epochs={o.epochs}",
                )
        if self.search is not None:
            if self.search.total_trials() > MAX_TRIALS:
                fail(
                    ("search", "num_samples"),
                    self.search.num_samples,
                    f"the search has {self.search.total_trials():,} trials (num_samples x grid combinations); "
                    f"the limit is {MAX_TRIALS:,}",
                )
            listed = sum(
                len(d.choice if isinstance(d, Choice) else d.grid)
                for d in self.search.space.values()
                if isinstance(d, (Choice, Grid))
            )
            if listed > MAX_SEARCH_VALUES_TOTAL:  # each value is validated below: bound that work too
                fail(
                    ("search", "space"),
                    listed,
                    f"the search lists {listed:,} choice/grid values in all; the limit is {MAX_SEARCH_VALUES_TOTAL:,}",
                )
            else:
                for path, dist in self.search.space.items():
                    problem = _check_search_path(self, path, dist) or _check_algorithm(self.search.algorithm, dist)
                    if problem:
                        fail(("search", "space", path), path, problem)
            if (
                isinstance(self.search.scheduler, AshaSpec)
                and self.search.scheduler.max_t is not None
                and self.search.scheduler.max_t > o.epochs
            ):
                fail(
                    ("search", "scheduler", "max_t"),
                    self.search.scheduler.max_t,
                    f"must not exceed optim.epochs={o.epochs}",
                )
        if errors:
            raise ValidationError.from_exception_data("JobSpec", errors)
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def get(self, path: str) -> Any:
        """The value at a dotted path, e.g. spec.get("optim.lr")."""
        return _get_path(self.model_dump(mode="json"), path)


def model_cost(m: ModelSpec) -> tuple[int, int]:
    """(trainable parameters, multiply-accumulates per 32x32 image) of trainer/model.py's ResNet for `m`,
    computed without building it (exact for the parameters: tests/trainer/test_model.py checks).

    Closed form: a stage is its first block (which may change the width and the resolution) plus n-1
    identical blocks, so the cost takes one step per stage whatever `blocks` says."""
    first = m.widths[0]
    params = 3 * first * 9 + 2 * first
    res = 32
    macs = res * res * 3 * first * 9
    in_ch = first

    def block(c_in: int, width: int, stride: int, out_res: int) -> tuple[int, int]:
        p = c_in * width * 9 + 2 * width + width * width * 9 + 2 * width
        a = out_res * out_res * (c_in * width * 9 + width * width * 9)
        if m.se:
            hidden = width // m.se_reduction
            p += width * hidden + hidden + hidden * width + width
            a += 2 * width * hidden
        if stride != 1 or c_in != width:  # the projection shortcut
            p += c_in * width + 2 * width
            a += out_res * out_res * c_in * width
        return p, a

    # strict=False: a length mismatch is reported as its own error (model.blocks)
    for i, (width, n) in enumerate(zip(m.widths, m.blocks, strict=False)):
        stride = 2 if i > 0 else 1  # stage 1 keeps 32x32; each later stage's first block halves it
        out_res = (res - 1) // stride + 1
        p_first, a_first = block(in_ch, width, stride, out_res)
        in_ch, res = width, out_res
        p_rest, a_rest = block(width, width, 1, res)  # stride 1, width unchanged: no shortcut projection
        params += p_first + (n - 1) * p_rest
        macs += a_first + (n - 1) * a_rest
    params += in_ch * m.num_classes + m.num_classes
    macs += in_ch * m.num_classes
    return params, macs


# --- presets and overrides --------------------------------------------------------------------------

# Each preset lists every field that makes it the recipe it names (docs/paper.md, field by field).
PAPER_MODEL: dict[str, Any] = {
    "widths": [32, 64, 256, 256],
    "blocks": [2, 2, 2, 2],
    "activation": "mish",
    "se": True,
    "se_reduction": 16,
    "dropout": 0.5,
    "num_classes": 10,
}
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's text as written: batch 512, wd 1e-3 throughout, crop + flip, 200 epochs on all 50,000
    # training images, the test split every epoch; its figure is the final epoch's test accuracy.
    "paper": {
        "model": PAPER_MODEL,
        "data": {
            "val_fraction": 0.0,
            "test_every_epochs": 1,
            "augment": {"crop": True, "flip": True, "autoaugment": False, "random_erasing": False},
        },
        "optim": {
            "lr": 0.05,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 1e-3,
            "label_smoothing": 0.1,
            "batch_size": 512,
            "epochs": 200,
        },
        "schedule": {"kind": "cosine_warm_restarts", "t0": 10, "t_mult": 2, "step_per": "batch"},
    },
    # What the authors' notebook ran (DL-FINAL_CODE.ipynb): batch 256, crop → flip → AutoAugment (ImageNet)
    # → RandomErasing(p 0.5, value 0), warm restarts stepped once per epoch, wd 1e-3 then 1e-4 from epoch
    # 85 with a fresh optimizer and scheduler (its restart after a crash), no validation split.
    "notebook": {
        "model": PAPER_MODEL,
        "data": {
            "val_fraction": 0.0,
            "test_every_epochs": 1,
            "augment": {
                "crop": True,
                "flip": True,
                "autoaugment": True,
                "random_erasing": True,
                "erasing_p": 0.5,
                "erasing_scale": [0.02, 0.33],
                "erasing_ratio": [0.3, 3.3],
            },
        },
        "optim": {
            "lr": 0.05,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 1e-3,
            "label_smoothing": 0.1,
            "batch_size": 256,
            "epochs": 200,
            "weight_decay_milestones": {85: 1e-4},
            "fresh_momentum_at_milestones": True,
        },
        "schedule": {
            "kind": "cosine_warm_restarts",
            "t0": 10,
            "t_mult": 2,
            "step_per": "epoch",
            "restart_epochs": [85],
        },
    },
    # The same network (4,570,934 parameters) to the best accuracy in few epochs: one-cycle with a short
    # warm-up, Nesterov, a larger peak lr at batch 256, lighter weight decay, bf16 autocast where native; a 10 %
    # validation split chooses the best checkpoint honestly. docs/paper.md justifies each choice.
    "fast": {
        "model": PAPER_MODEL,
        "data": {
            "val_fraction": 0.1,
            "test_every_epochs": 1,
            "augment": {"crop": True, "flip": True, "autoaugment": False, "random_erasing": False},
        },
        "optim": {
            "lr": 0.2,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 5e-4,
            "label_smoothing": 0.1,
            "batch_size": 256,
            "epochs": 5,
        },
        "schedule": {"kind": "onecycle", "warmup_fraction": 0.2, "step_per": "batch"},
        "precision": "auto",
    },
    # Tiny and fast: what the tests and CI use (seconds per epoch on 2 CPU cores).
    "debug": {
        "model": {"widths": [8, 16, 32, 32], "blocks": [1, 1, 1, 1], "se_reduction": 4, "dropout": 0.1},
        "data": {"max_train_images": 512, "val_fraction": 0.25},
        "optim": {"lr": 0.05, "batch_size": 64, "epochs": 2, "weight_decay": 5e-4},
        "schedule": {"kind": "constant"},
        # Pinned: the tests run 2-worker DDP on CPUs, one thread each, whatever the cluster has.
        "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1},
        "precision": "fp32",
        "exports": [],  # an export adds seconds to every test run; the export tests ask for it
    },
}


def resolve(
    preset: str | None = None, overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None
) -> JobSpec:
    """A preset (or a base spec dict), plus dotted-path overrides, validated into one full JobSpec."""
    if preset is not None and preset not in PRESETS:
        raise ValidationError.from_exception_data(
            "JobSpec",
            [
                InitErrorDetails(
                    type=PydanticCustomError(
                        "unknown_preset",
                        "unknown preset; choose one of: {names}",
                        {"names": ", ".join(sorted(PRESETS))},
                    ),
                    loc=("preset",),
                    input=preset,
                )
            ],
        )
    data = copy.deepcopy(PRESETS[preset]) if preset else {}
    if base:
        data = _deep_merge(data, base)
    # An unknown path is reported whole (with the closest field) next to every other field error, not set.
    unknown: list[InitErrorDetails] = []
    for path, value in (overrides or {}).items():
        why = unknown_path_reason(path)
        if why:
            unknown.append(
                InitErrorDetails(type=PydanticCustomError("unknown_field", why), loc=tuple(path.split(".")), input=path)
            )
        else:
            merge_path(data, path, value)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        if not unknown:
            raise
        unknown += [
            InitErrorDetails(type=PydanticCustomError(e["type"], e["msg"]), loc=e["loc"], input=e["input"])
            for e in exc.errors()
        ]
    if unknown:
        raise ValidationError.from_exception_data("JobSpec", unknown)
    return spec


def _section_of(annotation: Any) -> type[Section] | None:
    """The Section class a field holds (also inside Optional[...]), or None for a plain value or mapping."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


def known_paths(model: type[Section] | None = None, prefix: str = "") -> list[str]:
    """Every dotted path a spec has, e.g. "optim.lr" (mappings such as `search.space` end the walk)."""
    out = []
    for name, field in (model or JobSpec).model_fields.items():
        out.append(prefix + name)
        section = _section_of(field.annotation)
        if section is not None:
            out += known_paths(section, f"{prefix}{name}.")
    return out


def unknown_path_reason(path: str) -> str | None:
    """Why an override path names no spec field (with the closest valid path), or None when it does; so
    `no.such.field` is reported as itself rather than as `no`, and `optim.lrr` suggests `optim.lr`."""
    model: type[Section] | None = JobSpec
    for key in path.split("."):
        if model is None:  # inside a free-form mapping (resources_per_worker, search.space): any key goes
            return None
        if key not in model.model_fields:
            # (no fuzzy match for a path longer than any real one: difflib's time grows with its length)
            close = difflib.get_close_matches(path, known_paths(), n=1, cutoff=0.6) if len(path) <= 200 else []
            hint = f"; did you mean {close[0]!r}?" if close else "; see `python -m trainer describe`"
            return f"unknown field {short(key)}{hint}"
        model = _section_of(model.model_fields[key].annotation)
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=0.1` → ("optim.lr", 0.1). The value is read as JSON when it parses, else as a string."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ValueError(f"override {text!r} must look like path=value, e.g. optim.lr=0.1")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path.strip(), value


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `value` at a dotted path in a plain spec dict, creating sections on the way."""
    *parents, leaf = path.split(".")
    node = data
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise _path_error(path, f"{key!r} is not a section")
        node = child
    node[leaf] = value


def _section_at(path: list[str]) -> type[BaseModel] | None:
    """The Section class a path names (`optim`, `search.scheduler`...), or None for a plain field — a
    dict-valued field such as `scaling.resources_per_worker` is a value, not a section."""
    model: type[BaseModel] | None = JobSpec
    for key in path:
        field = model.model_fields.get(key) if model is not None else None
        if field is None:
            return None
        candidates = [a for a in getattr(field.annotation, "__args__", ()) if a is not type(None)] or [field.annotation]
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, Section)]
        model = sections[0] if len(sections) == 1 else None
    return model


def merge_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Apply one override: a value for a section (`optim: {lr: 0.1}`) merges into what the preset set
    there, field by field and recursively; any other value replaces the field. So `{"optim": {"lr": 0.1}}`
    on the debug preset changes lr and keeps debug's epochs and batch size, exactly like `optim.lr`."""
    parts = path.split(".")
    if isinstance(value, dict) and _section_at(parts) is not None:
        try:
            current = _get_path(data, path)
        except KeyError:
            current = None
        if isinstance(current, dict):
            for key, sub in value.items():
                merge_path(data, f"{path}.{key}", sub)
            return
    set_path(data, path, value)


def _get_path(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(path)
        node = node[key]
    return node


def _path_error(path: str, message: str) -> ValidationError:
    return ValidationError.from_exception_data(
        "JobSpec",
        [InitErrorDetails(type=PydanticCustomError("bad_path", message), loc=tuple(path.split(".")), input=path)],
    )


def _check_search_path(spec: JobSpec, path: str, dist: Distribution) -> str | None:
    """Why `path` cannot be searched with `dist`, or None when it can: the path must name a scalar
    field outside `search`, and every value the distribution can produce must validate there."""
    if path.split(".")[0] == "search":
        return "cannot search over the search section itself"
    if path.split(".")[0] in ("data", "limits"):
        # data paths are checked against the operator's data roots once, at submission and in the driver;
        # a search must not be a way round that check (nor round the job's time limit)
        return f"cannot search over the {path.split('.')[0]} section"
    try:
        current = spec.get(path)
    except KeyError:
        return f"{path!r} is not a field of the job spec"
    if isinstance(current, (dict, list)):
        return f"{path!r} is a section or list, not a single value"
    if isinstance(dist, (LogUniform, Uniform)):
        low, high = dist.loguniform if isinstance(dist, LogUniform) else dist.uniform
        if not low < high or (isinstance(dist, LogUniform) and (low <= 0 or not math.isfinite(high))):
            return f"bad range [{low}, {high}]: need low < high (and low > 0 for loguniform)"
        samples: list[Any] = [low, high]
    elif isinstance(dist, RandInt):
        low, high = dist.randint
        if not low < high:
            return f"bad range [{low}, {high}]: need low < high (high is exclusive)"
        samples = [low, high - 1]
    else:
        # each distinct value once (by type too: True == 1 but validates differently)
        samples = list({(type(v), v): v for v in (dist.choice if isinstance(dist, Choice) else dist.grid)}.values())
    base = spec.model_dump(mode="json", exclude={"search"})
    for sample in samples:
        trial = _replaced(base, path.split("."), sample)
        try:
            JobSpec.model_validate(trial)
        except ValidationError as exc:
            first = exc.errors()[0]
            return f"value {short(sample)} is invalid there: {first['msg']}"
    return None


def _replaced(data: dict[str, Any], keys: list[str], value: Any) -> dict[str, Any]:
    """`data` with the value at `keys` replaced, copying only the dicts on the way (not the whole spec)."""
    out = dict(data)
    out[keys[0]] = value if len(keys) == 1 else _replaced(data.get(keys[0]) or {}, keys[1:], value)
    return out


def field_descriptions() -> dict[str, str]:
    """JobSpec's fields and what each means (the descriptions /openapi.json shows)."""
    return {name: f.description or "" for name, f in JobSpec.model_fields.items()}


def error_list(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as [{"field": "optim.lr", "message": "..."}], the shape the API and CLI print."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)  # never the bad value
    out = [
        {"field": _clip(".".join(str(p) for p in e["loc"]) or "spec"), "message": _clip(e["msg"], 1000)}
        for e in errors[:MAX_ERRORS]
    ]
    if len(errors) > MAX_ERRORS:
        out.append({"field": "spec", "message": f"and {len(errors) - MAX_ERRORS:,} more errors"})
    return out


def _clip(text: str, limit: int = MAX_ECHO) -> str:
    """A message or field name cut to `limit` characters: every error reaches the user with bounded size."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
