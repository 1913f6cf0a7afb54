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
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    # extra="forbid": a misspelt field is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    widths: list[PositiveInt] = Field(default=[32, 64, 256, 256], min_length=1, max_length=8)
    blocks: list[PositiveInt] = Field(default=[2, 2, 2, 2], min_length=1, max_length=8)
    activation: Literal["mish", "relu"] = "mish"
    se: bool = True
    se_reduction: PositiveInt = 16
    dropout: Fraction = 0.5
    num_classes: int = Field(default=10, ge=2, le=1000)


class DataSpec(Section):
    # An absolute path, a `~/` path, or a storage URI (file://, s3://). `auto` picks the reader from
    # what is there: *.parquet → parquet, a directory holding data_batch_1 → cifar10-python, an empty or
    # missing local directory → torchvision (downloads CIFAR-10 into it).
    train: str = Field(default="~/.cache/trainctl/cifar10", min_length=1)
    test: str | None = None
    format: Literal["auto", "cifar10-python", "parquet", "torchvision"] = "auto"
    val_fraction: float = Field(default=0.1, ge=0.0, le=0.5)
    max_train_images: PositiveInt | None = None


class OptimSpec(Section):
    lr: float = Field(default=0.05, gt=0.0, le=10.0)
    momentum: Fraction = 0.9
    nesterov: bool = False
    weight_decay: float = Field(default=1e-3, ge=0.0, le=1.0)
    label_smoothing: Fraction = 0.1
    batch_size: int = Field(default=512, ge=1, le=65536, description="global batch, split over workers")
    epochs: int = Field(default=200, ge=1, le=10000)


class ScheduleSpec(Section):
    kind: Literal["cosine", "cosine_warm_restarts", "onecycle", "constant"] = "cosine_warm_restarts"
    t0: PositiveInt = Field(default=10, description="epochs in the first warm-restart cycle")
    t_mult: PositiveInt = Field(default=2, description="each warm-restart cycle is this many times longer")
    warmup_fraction: float = Field(default=0.15, ge=0.0, lt=1.0, description="onecycle's rising part")


class ScalingSpec(Section):
    num_workers: int = Field(default=2, ge=1, le=1024)
    # None = use GPUs when the cluster has one per worker, else CPUs.
    use_gpu: bool | None = None
    cpus_per_worker: float = Field(default=1.0, gt=0.0, le=256.0)
    # Extra Ray resources each worker reserves, e.g. {"trainslot": 1} to spread workers over nodes that
    # advertise one slot each, or {"accelerator_type:A10G": 0.001} to pin a GPU type.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)

    @field_validator("resources_per_worker")
    @classmethod
    def _no_builtin_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU", "memory"):
                raise ValueError(f"{name!r} is set by cpus_per_worker/use_gpu, not resources_per_worker")
            if amount <= 0:
                raise ValueError(f"resource {name!r} must be positive, got {amount}")
        return value


class CheckpointSpec(Section):
    every_epochs: PositiveInt = 1
    keep_best: PositiveInt = Field(default=2, le=100, description="best by val_acc; the latest is kept too")
    max_failures: int = Field(default=2, ge=0, le=100, description="worker-group restarts inside one run")
    max_restarts: int = Field(default=2, ge=0, le=100, description="resubmissions after a driver/infra failure")


# --- searches (Ray Tune) ------------------------------------------------------------------------


class LogUniform(Section):
    loguniform: tuple[float, float]


class Uniform(Section):
    uniform: tuple[float, float]


class RandInt(Section):
    randint: tuple[int, int]


class Choice(Section):
    choice: list[Any] = Field(min_length=1)


class Grid(Section):
    grid: list[Any] = Field(min_length=1)


Distribution = LogUniform | Uniform | RandInt | Choice | Grid


class AshaSpec(Section):
    kind: Literal["asha"] = "asha"
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(default=2.0, gt=1.0)
    max_t: PositiveInt | None = Field(default=None, description="epochs; default: optim.epochs")


class NoScheduler(Section):
    kind: Literal["none"] = "none"


class SearchSpec(Section):
    space: dict[str, Distribution] = Field(min_length=1)
    num_samples: int = Field(default=4, ge=1, le=10000)
    metric: Literal["val_acc", "val_loss", "train_loss", "train_acc"] = "val_acc"
    mode: Literal["max", "min"] = "max"
    scheduler: Annotated[AshaSpec | NoScheduler, Field(discriminator="kind")] = AshaSpec()
    max_concurrent_trials: PositiveInt = 1
    seed: int = 0

    def total_trials(self) -> int:
        """Tune's count: every grid combination, num_samples times."""
        combos = 1
        for dist in self.space.values():
            if isinstance(dist, Grid):
                combos *= len(dist.grid)
        return self.num_samples * combos


# --- the job spec ---------------------------------------------------------------------------------


ExportFormat = Literal["safetensors", "pt2"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("safetensors", "pt2")


class JobSpec(Section):
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    optim: OptimSpec = OptimSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    scaling: ScalingSpec = ScalingSpec()
    # auto = bf16 autocast on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), fp32 elsewhere.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: Literal["auto"] | bool = "auto"
    compile: bool = False
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    checkpoint: CheckpointSpec = CheckpointSpec()
    search: SearchSpec | None = None
    # At the end of a run the best checkpoint is exported in these formats to <job dir>/artifacts/
    # (trainer/export.py): weights-only safetensors and a torch.export program with normalisation inside.
    exports: list[ExportFormat] = Field(default_factory=lambda: list(EXPORT_FORMATS))

    @model_validator(mode="after")
    def _cross_field_checks(self) -> JobSpec:
        errors: list[InitErrorDetails] = []

        def fail(loc: tuple[str, ...], value: Any, message: str) -> None:
            errors.append(
                InitErrorDetails(type=PydanticCustomError("cross_field", message), loc=loc, input=value)
            )

        m, o, s = self.model, self.optim, self.scaling
        if len(m.widths) != len(m.blocks):
            fail(("model", "blocks"), m.blocks,
                 f"needs one entry per stage: model.widths has {len(m.widths)}, model.blocks has {len(m.blocks)}")
        if m.se and m.se_reduction > min(m.widths):
            fail(("model", "se_reduction"), m.se_reduction,
                 f"must not exceed the smallest width ({min(m.widths)}), or the SE bottleneck has 0 channels")
        if o.batch_size % s.num_workers:
            fail(("optim", "batch_size"), o.batch_size,
                 f"the global batch must divide evenly over scaling.num_workers={s.num_workers}")
        if self.data.max_train_images is not None and self.data.max_train_images < o.batch_size:
            fail(("data", "max_train_images"), self.data.max_train_images,
                 f"must be at least optim.batch_size={o.batch_size}, or an epoch has no full batch")
        if self.search is not None:
            for path, dist in self.search.space.items():
                problem = _check_search_path(self, path, dist)
                if problem:
                    fail(("search", "space", path), path, problem)
            if isinstance(self.search.scheduler, AshaSpec) and self.search.scheduler.max_t is not None \
                    and self.search.scheduler.max_t > o.epochs:
                fail(("search", "scheduler", "max_t"), self.search.scheduler.max_t,
                     f"must not exceed optim.epochs={o.epochs}")
        if errors:
            raise ValidationError.from_exception_data("JobSpec", errors)
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def get(self, path: str) -> Any:
        """The value at a dotted path, e.g. spec.get("optim.lr")."""
        return _get_path(self.model_dump(mode="json"), path)


# --- presets and overrides --------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's stated recipe. Every value equals the field default; listing them makes it explicit.
    "paper": {
        "model": {"widths": [32, 64, 256, 256], "blocks": [2, 2, 2, 2], "activation": "mish", "se": True,
                  "se_reduction": 16, "dropout": 0.5},
        "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "label_smoothing": 0.1,
                  "batch_size": 512, "epochs": 200},
        "schedule": {"kind": "cosine_warm_restarts", "t0": 10, "t_mult": 2},
    },
    # Tiny and fast: what the tests and CI use (seconds per epoch on 2 CPU cores).
    "debug": {
        "model": {"widths": [8, 16, 32, 32], "blocks": [1, 1, 1, 1], "se_reduction": 4, "dropout": 0.1},
        "data": {"max_train_images": 512, "val_fraction": 0.25},
        "optim": {"lr": 0.05, "batch_size": 64, "epochs": 2, "weight_decay": 5e-4},
        "schedule": {"kind": "constant"},
        "scaling": {"num_workers": 2, "use_gpu": False},
        "precision": "fp32",
        "exports": [],  # an export adds seconds to every test run; the export tests ask for it
    },
}


def resolve(preset: str | None = None, overrides: dict[str, Any] | None = None,
            base: dict[str, Any] | None = None) -> JobSpec:
    """A preset (or a base spec dict), plus dotted-path overrides, validated into one full JobSpec."""
    if preset is not None and preset not in PRESETS:
        raise ValidationError.from_exception_data("JobSpec", [InitErrorDetails(
            type=PydanticCustomError("unknown_preset", "unknown preset; choose one of: {names}",
                                     {"names": ", ".join(sorted(PRESETS))}),
            loc=("preset",), input=preset)])
    data = copy.deepcopy(PRESETS[preset]) if preset else {}
    if base:
        data = _deep_merge(data, base)
    unknown = [(path, why) for path in (overrides or {}) if (why := unknown_path_reason(path))]
    if unknown:
        raise ValidationError.from_exception_data("JobSpec", [InitErrorDetails(
            type=PydanticCustomError("unknown_field", why), loc=tuple(path.split(".")), input=path)
            for path, why in unknown])
    for path, value in (overrides or {}).items():
        set_path(data, path, value)
    return JobSpec.model_validate(data)


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
            close = difflib.get_close_matches(path, known_paths(), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `python -m trainer describe`"
            return f"unknown field {key!r}{hint}"
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
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
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


def _get_path(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(path)
        node = node[key]
    return node


def _path_error(path: str, message: str) -> ValidationError:
    return ValidationError.from_exception_data("JobSpec", [InitErrorDetails(
        type=PydanticCustomError("bad_path", message),
        loc=tuple(path.split(".")), input=path)])


def _check_search_path(spec: JobSpec, path: str, dist: Distribution) -> str | None:
    """Why `path` cannot be searched with `dist`, or None when it can: the path must name a scalar
    field outside `search`, and every value the distribution can produce must validate there."""
    if path.split(".")[0] == "search":
        return "cannot search over the search section itself"
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
        samples = list(dist.choice if isinstance(dist, Choice) else dist.grid)
    base = spec.model_dump(mode="json", exclude={"search"})
    for sample in samples:
        trial = copy.deepcopy(base)
        set_path(trial, path, sample)
        try:
            JobSpec.model_validate(trial)
        except ValidationError as exc:
            first = exc.errors()[0]
            return f"value {sample!r} is invalid there: {first['msg']}"
    return None


def error_list(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as [{"field": "optim.lr", "message": "..."}], the shape the API and CLI print."""
    return [{"field": ".".join(str(p) for p in e["loc"]) or "spec", "message": e["msg"]} for e in exc.errors()]
