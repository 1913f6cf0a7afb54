"""The job directory as types: the one definition the trainer writes and the service reads.

A job owns `<storage root>/jobs/<job id>/` (docs/architecture.md). Every file the trainer writes there is a
model below; writers build the model (so what they write is validated) and dump it with `to_json()` /
`metrics_jsonl()`, readers parse with the tolerant `parse_*` functions, which never raise on what a crash or
another version can leave behind:

- a torn last line of metrics.jsonl (a writer caught mid-write) is skipped, a repeated epoch keeps its
  last line;
- a file written by an older version lacks newer fields: those have defaults;
- a file written by a newer version has fields this version does not know: they are ignored
  (`extra="ignore"`), never an error;
- a file that is not JSON at all reads as missing (None / empty), to be read again next time.

To add a field: add it to the model with a default (`None`, `0`, `[]`...) so older files still read, then
write it in the trainer. The service, the API's views and the CSV columns pick it up from here.

Like trainer/spec.py, this module imports only pydantic and the standard library: the service (which never
loads torch) and the Ray workers both import it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum, IntEnum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# --- the file names -------------------------------------------------------------------------------------

SPEC = "spec.json"  # the resolved JobSpec (trainer/spec.py), written by the service
METRICS = "metrics.jsonl"  # EpochMetrics, one line per epoch
MANIFEST = "manifest.json"  # Manifest
SUMMARY = "summary.json"  # Summary
TRIALS = "trials.json"  # [TrialRow], searches only
TRIALS_DIR = "trials"  # a search's trials/<trial id>/ hold a single run's files each
ARTIFACTS_DIR = "artifacts"  # exported models (trainer/export.py) and their index
ARTIFACTS = "artifacts/artifacts.json"  # ArtifactIndex
CONFUSION = "confusion.json"  # Confusion: the best checkpoint's confusion matrix, written when a run ends
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files (scalars per epoch, the confusion matrix at the end)
ATTEMPTS = "attempts.json"  # Attempts: the fence (trainer/fence.py); every worker-group start of a run appends one
INFRA_LOSSES = "infra_losses.jsonl"  # InfraLoss, one line per lost node/host (trainer/infra.py writes it)

# Each export format (trainer/spec.py ExportFormat) → its file under ARTIFACTS_DIR (trainer/export.py writes
# it, `trainctl export` downloads it).
EXPORT_FILES: dict[str, str] = {"safetensors": "model.safetensors", "pt2": "model.pt2", "onnx": "model.onnx"}

# --- the environment a job's driver and workers get ------------------------------------------------------

# The operator's data roots: the service forwards its own (its settings) with every job, and the driver checks
# the spec's data paths against them again (trainer/dataroots.py).
DATA_ROOTS_ENV = "TRAINCTL_DATA_ROOTS"
# For tests only: seconds every rank sleeps after each optimizer step (unset or 0 everywhere else). The fault
# tests need a job that is still running when the fault lands (a host crashed, serve restarted, storage down,
# a node added); a paced job of a few steps per epoch stays running on a few CPU seconds, where one padded
# with thousands of training images spent a minute of a 2-core machine's CPU training for nothing.
STEP_PAUSE_ENV = "TRAINCTL_STEP_PAUSE_S"
MAX_STEP_PAUSE_S = 10.0
# The allow-list of non-secret settings forwarded into a job's runtime env (service → driver → every Ray
# worker). Credentials (AWS keys, session tokens, any trainctl token) never go there, because Ray shows a
# runtime env on its dashboard: workers get them from the standard AWS chain on their node.
FORWARDED_ENV = (
    "TRAINCTL_S3_ENDPOINT",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "TRAINCTL_STORAGE_RETRY_SECONDS",
    DATA_ROOTS_ENV,
    STEP_PAUSE_ENV,
)


def step_pause_s(environ: Mapping[str, str]) -> float:
    """STEP_PAUSE_ENV's value in seconds (0 when unset or empty); a value that is not a number in
    [0, MAX_STEP_PAUSE_S] is refused with the variable's name."""
    text = environ.get(STEP_PAUSE_ENV, "").strip()
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= MAX_STEP_PAUSE_S:
        raise ValueError(f"{STEP_PAUSE_ENV}={text!r}: expected seconds between 0 and {MAX_STEP_PAUSE_S:g}")
    return value


SearchMode = Literal["max", "min"]
BestRule = Literal["val_acc", "final_epoch"]


# --- exit codes and error kinds --------------------------------------------------------------------------


class ExitCode(IntEnum):
    """`python -m trainer.run`'s exit status."""

    OK = 0
    FAILED = 1  # anything else (infrastructure): worth a retry
    USER = 2  # the spec or data is wrong: never worth a retry
    STORAGE = 3  # storage stayed unreachable


class ErrorKind(str, Enum):
    """Why a run failed (summary.json's `error_kind`)."""

    USER = "user"  # the spec or data is wrong: do not retry
    STORAGE = "storage"  # storage unreachable
    INFRA = "infra"  # anything else

    def __str__(self) -> str:
        return self.value

    @property
    def exit_code(self) -> ExitCode:
        return {ErrorKind.USER: ExitCode.USER, ErrorKind.STORAGE: ExitCode.STORAGE}.get(self, ExitCode.FAILED)


class RunState(str, Enum):
    """summary.json's `state`."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


class TrialState(str, Enum):
    """A search trial's state in trials.json."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    STOPPED_EARLY = "stopped_early"  # stopped by the scheduler (ASHA): not a failure
    FAILED = "failed"
    CANCELLED = "cancelled"  # never written by the trainer: the service's view of a trial its ended job stopped

    def __str__(self) -> str:
        return self.value

    def is_finished(self) -> bool:
        return self in (TrialState.SUCCEEDED, TrialState.STOPPED_EARLY, TrialState.FAILED, TrialState.CANCELLED)


# --- the records ------------------------------------------------------------------------------------------


class Record(BaseModel):
    """A job-directory record. Unknown fields (a newer writer's) are ignored when read."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


class NumericsRecord(Record):
    """The precision and memory layout a run trains in, and how they were chosen (trainer/precision.py)."""

    precision: str = Field(description="bf16 (autocast) | fp32")
    channels_last: bool
    chosen_by: str = Field(
        default="spec",
        description="spec (set explicitly) | rule (auto, one candidate) | "
        "measured (auto: the fastest of the timed candidates)",
    )
    images_per_s: dict[str, float] = Field(default_factory=dict, description="each timed candidate's images/s")
    compile: str = Field(
        default="off",
        description="the torch.compile mode that ran: off | default | max-autotune-no-cudagraphs | reduce-overhead "
        "(reduce-overhead = CUDA graphs: on a CPU it runs as default)",
    )


class InfraLoss(Record):
    """A worker node or host lost mid-run (trainer/infra.py): an infrastructure loss, which Ray Train's
    restart from the last checkpoint recovers without charging checkpoint.max_failures or max_restarts.
    The controller writes it when it decides to restart (infra_losses.jsonl); the restarted run's first
    epoch carries it in metrics.jsonl with where it resumed."""

    time: float = Field(description="unix time the loss was recognised")
    host: str | None = Field(default=None, description="the lost node's address, when Ray named it")
    node_id: str | None = Field(default=None, description="the lost node's Ray node id, when Ray named it")
    lost_at_epoch: int = Field(ge=1, description="the epoch that was running when the node was lost")
    checkpoint_epoch: int = Field(default=0, ge=0, description="the newest checkpoint's epoch then (0: none)")
    error: str = Field(default="", description="Ray's reason, one line")
    resumed_from_epoch: int | None = Field(
        default=None, description="the checkpoint epoch the restarted run resumed from (0: from scratch)"
    )
    replacement: bool | None = Field(
        default=None, description="the restarted run uses a node the lost run did not (a replacement host)"
    )

    def describe(self) -> str:
        """One line for the job's view: 'worker host 10.0.0.3 lost at epoch 3; resumed from epoch 2 on a
        replacement host'."""
        where = f"worker host {self.host}" if self.host else f"worker node {self.node_id or '(unknown)'}"
        text = f"{where} lost at epoch {self.lost_at_epoch}"
        if self.resumed_from_epoch is None:
            return f"{text}; restarting from the checkpoint of epoch {self.checkpoint_epoch}"
        resumed = f"epoch {self.resumed_from_epoch}" if self.resumed_from_epoch else "the start (no checkpoint)"
        on = {True: " on a replacement host", False: " on the remaining hosts", None: ""}[self.replacement]
        return f"{text}; resumed from {resumed}{on}"


class EpochMetrics(Record):
    """One line of metrics.jsonl: one finished epoch, written by rank 0 after every epoch (all-reduced
    over the ranks). Accuracies are fractions 0..1."""

    epoch: int = Field(ge=1, description="1-based")
    train_loss: float
    train_acc: float
    val_loss: float | None = Field(description="null when there is no validation split")
    val_acc: float = Field(description="0 when there is no validation split")
    lr: float = Field(description="the learning rate at the end of the epoch")
    images_per_s: float = Field(description="training images per second over all ranks")
    epoch_seconds: float = Field(description="training plus evaluation")
    time: float = Field(description="unix time the epoch ended")
    resumed: bool = Field(default=False, description="the first epoch after resuming from a checkpoint")
    node_ids: list[str] = Field(default_factory=list, description="every rank's Ray node id")
    devices: list[str] = Field(
        default_factory=list,
        description="what every rank trains on, rank 0 first, e.g. "
        "'cuda:0 NVIDIA H100 80GB HBM3' or 'cpu (2 threads, bf16 AMX) Intel(R) Xeon(R) ...'; when the ranks "
        "run on several hosts, each ends with its host's address: '... on 10.0.0.2'",
    )
    numerics: NumericsRecord | None = Field(default=None, description="precision and layout in use")
    # The test split (data.test, or data.train's own test_batch) every data.test_every_epochs and at the
    # last epoch; null on other epochs and when there is no test split. test_loss uses the training
    # criterion (label smoothing included), so it compares with train_loss as the paper's Figure 1 does.
    test_loss: float | None = None
    test_acc: float | None = None
    # The recipe's position under elastic workers (docs/scaling.md, "Elastic workers"): the worker count can
    # change between epochs, the global batch and the schedule's step count never depend on it.
    workers: int | None = Field(default=None, description="DDP ranks that trained this epoch")
    global_batch: int | None = Field(default=None, description="images per optimizer step over all ranks")
    global_step: int | None = Field(default=None, description="optimizer steps since the run began, this epoch's last")
    attempt: int | None = Field(
        default=None,
        description="the worker-group attempt that wrote this line (attempts.json); null in files written before "
        "attempts were recorded",
    )
    infra_losses: list[InfraLoss] = Field(
        default_factory=list,
        description="the first epoch after a restart only: the lost nodes/hosts that restart recovered from",
    )

    def scalars(self) -> dict[str, float]:
        """The numeric fields (what a checkpoint keeps of its epoch's metrics)."""
        return {k: v for k, v in self.model_dump().items() if isinstance(v, (int, float))}


# The metrics CSV's columns, in this order (list fields are joined with ';', objects written as JSON).
METRIC_COLUMNS: list[str] = list(EpochMetrics.model_fields)


class CheckpointEntry(Record):
    """A checkpoint in manifest.json: listed only once fully uploaded, with what verifies it."""

    epoch: int
    val_acc: float
    uri: str = Field(description="checkpoint.pt's URI")
    sha256: str
    size: int


class Manifest(Record):
    """manifest.json: the checkpoints retention still keeps, oldest first, and the newest epoch saved."""

    checkpoints: list[CheckpointEntry] = Field(default_factory=list)
    latest_epoch: int | None = None

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _drop_bad_entries(cls, value: Any) -> Any:
        # One damaged entry must not hide the others.
        if not isinstance(value, list):
            return []
        return [e for e in value if _valid(CheckpointEntry, e)]

    def best(self) -> CheckpointEntry | None:
        """The highest val_acc; the later epoch on a tie."""
        return max(self.checkpoints, key=lambda e: (e.val_acc, e.epoch), default=None)

    def latest(self) -> CheckpointEntry | None:
        return max(self.checkpoints, key=lambda e: e.epoch, default=None)


class AttemptRecord(Record):
    """One start of a run's worker group: its number and the epoch it (re)started at."""

    attempt: int = Field(ge=1)
    start_epoch: int = Field(ge=1)
    started: float = Field(default=0.0, description="unix time")
    host: str = Field(default="", description="rank 0's host address")


class Attempts(Record):
    """attempts.json, the run's fence (trainer/fence.py): every start of its worker group, oldest first. Only
    the last one may write; an epoch's metrics count only from the attempt that owns that epoch."""

    attempts: list[AttemptRecord] = Field(default_factory=list)

    @property
    def current(self) -> AttemptRecord | None:
        return self.attempts[-1] if self.attempts else None

    def owner_of(self, epoch: int) -> int | None:
        """The attempt whose result for `epoch` counts: the newest that started at or before it (a later
        attempt that restarted from an earlier epoch overrides what older ones wrote for it)."""
        owners = [a.attempt for a in self.attempts if a.start_epoch <= epoch]
        return max(owners) if owners else None

    def counts(self, row: EpochMetrics) -> bool:
        """Whether a metrics line is the owning attempt's (lines from before attempts were recorded count
        while no attempt owns their epoch). With no attempt recorded at all, every line counts."""
        if not self.attempts:
            return True
        return row.attempt == self.owner_of(row.epoch)


class Artifact(Record):
    """An exported model in artifacts/artifacts.json: written at the end of a run from the best checkpoint."""

    name: str = Field(description="file name under artifacts/, e.g. model.pt2")
    format: Literal["safetensors", "pt2", "onnx"]
    uri: str
    sha256: str
    size: int
    epoch: int | None = Field(default=None, description="the checkpoint epoch it was exported from")


class ArtifactIndex(Record):
    """artifacts/artifacts.json."""

    artifacts: list[Artifact] = Field(default_factory=list)


class TrialCounts(Record):
    total: int
    stopped_early: int
    failed: int


class SearchOutcome(Record):
    """What a search adds to summary.json: its best trial and how its trials ended."""

    best_trial: str
    best_config: dict[str, Any]
    search_metric: str
    best_metric: float | None
    trials: TrialCounts


class Summary(Record):
    """summary.json, written by the trainer's driver at the end of a run (and of each attempt)."""

    state: RunState
    best_val_acc: float | None = None
    best_checkpoint: str | None = Field(default=None, description="URI of the best checkpoint.pt")
    best_checkpoint_sha256: str | None = None
    best_checkpoint_size: int | None = None
    epochs_completed: int = 0
    num_parameters: int | None = None
    test_acc: float | None = Field(
        default=None,
        description="the best checkpoint on the test split, if any "
        "(the same as best_checkpoint_test_acc; kept for older readers)",
    )
    # Test accuracy is the paper's headline. The best checkpoint is never chosen on it: on val_acc when
    # the run has a validation split, else the final epoch (best_checkpoint_rule says which).
    final_test_acc: float | None = Field(default=None, description="the last epoch's test_acc (the paper's figure)")
    best_checkpoint_test_acc: float | None = Field(default=None, description="the best checkpoint's test_acc")
    best_checkpoint_tta: str | None = Field(default=None, description="the spec's tta mode, when not none")
    best_checkpoint_tta_acc: float | None = Field(
        default=None, description="the best checkpoint's test accuracy under that test-time augmentation"
    )
    best_checkpoint_epoch: int | None = None
    best_checkpoint_rule: BestRule | None = Field(
        default=None, description="val_acc: the highest validation accuracy; final_epoch: no validation split"
    )
    wall_seconds: float | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    # searches only (left out of the file for single runs)
    best_trial: str | None = None
    best_config: dict[str, Any] | None = None
    search_metric: str | None = None
    best_metric: float | None = None
    trials: TrialCounts | None = None

    @field_validator("error_kind", mode="before")
    @classmethod
    def _unknown_kind_is_infra(cls, value: Any) -> Any:
        # A kind this version does not know is "anything else": retried like an infrastructure failure.
        known = {k.value for k in ErrorKind}
        return ErrorKind.INFRA if isinstance(value, str) and value not in known else value

    def succeeded(self) -> bool:
        return self.state is RunState.SUCCEEDED

    def with_search(self, outcome: SearchOutcome) -> Summary:
        return Summary.model_validate({**self.model_dump(), **outcome.model_dump()})

    def to_json(self) -> str:
        search_only = {name for name in SearchOutcome.model_fields if getattr(self, name) is None}
        return self.model_dump_json(indent=2, exclude=search_only)


class TrialRow(Record):
    """One row of trials.json: a search trial, kept current while the search runs."""

    trial_id: str = Field(min_length=1)
    config: dict[str, Any] = Field(default_factory=dict, description="the sampled values, by spec path")
    state: TrialState = TrialState.PENDING
    epochs: int = Field(default=0, description="epochs finished")
    best_metric: float | None = Field(default=None, description="the search metric's best value so far")
    stopped_early: bool = False
    error: str | None = None


class Confusion(Record):
    """confusion.json: the best checkpoint evaluated once the run ended, on the test split where the spec
    has one (data.test), else on the run's own validation split."""

    split: Literal["test", "val"]
    classes: list[str] = Field(min_length=1)
    matrix: list[list[int]] = Field(description="matrix[true][predicted] = number of images")
    accuracy: float
    n: int = Field(ge=0, description="images evaluated")
    checkpoint: str | None = Field(default=None, description="URI of the checkpoint evaluated")
    epoch: int | None = None

    @field_validator("matrix")
    @classmethod
    def _square(cls, value: list[list[int]], info: Any) -> list[list[int]]:
        classes = info.data.get("classes") or []
        if len(value) != len(classes) or any(len(row) != len(classes) for row in value):
            raise ValueError(f"matrix must be {len(classes)}x{len(classes)} (one row and column per class)")
        return value

    def per_class_accuracy(self) -> dict[str, float | None]:
        pairs = enumerate(zip(self.classes, self.matrix, strict=True))
        return {c: (row[i] / sum(row) if sum(row) else None) for i, (c, row) in pairs}


# --- parsing (tolerant) and writing ----------------------------------------------------------------------

R = TypeVar("R", bound=BaseModel)


def _valid(model: type[BaseModel], data: Any) -> bool:
    try:
        model.model_validate(data)
    except ValidationError:
        return False
    return True


def _json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None  # written by a non-atomic writer and caught half-way: read it again next time


def _parse(model: type[R], text: str | None) -> R | None:
    data = _json(text)
    if not isinstance(data, dict):
        return None
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


def parse_summary(text: str | None) -> Summary | None:
    """summary.json's text (None: no file) → Summary, or None when it is missing or unreadable."""
    return _parse(Summary, text)


def parse_manifest(text: str | None) -> Manifest | None:
    """manifest.json's text → Manifest, or None when it is missing or unreadable."""
    return _parse(Manifest, text)


def parse_artifacts(text: str | None) -> ArtifactIndex:
    """artifacts/artifacts.json's text → the index (empty when missing or unreadable)."""
    return _parse(ArtifactIndex, text) or ArtifactIndex()


def parse_confusion(text: str | None) -> Confusion | None:
    """confusion.json's text → Confusion, or None when it is missing or unreadable."""
    return _parse(Confusion, text)


def parse_trials(text: str | None) -> list[TrialRow]:
    """trials.json's text → its valid rows ([] when missing or unreadable)."""
    data = _json(text)
    if not isinstance(data, list):
        return []
    rows = []
    for item in data:
        try:
            rows.append(TrialRow.model_validate(item))
        except ValidationError:
            continue
    return rows


def parse_metrics_row(data: Any) -> EpochMetrics | None:
    """One metrics record (a parsed line, or a dict Ray Tune forwarded) → EpochMetrics, or None."""
    try:
        return EpochMetrics.model_validate(data)
    except ValidationError:
        return None


def parse_attempts(text: str | None) -> Attempts:
    """attempts.json's text → Attempts (empty when missing or unreadable)."""
    return _parse(Attempts, text) or Attempts()


def parse_metrics(text: str | None, attempts: Attempts | None = None) -> list[EpochMetrics]:
    """metrics.jsonl's text → every epoch once, ascending. A torn or invalid line is skipped; a repeated
    epoch keeps its last line. With the run's `attempts`, a line that its epoch's owning attempt did not
    write (a fenced-off writer's that slipped through) is ignored."""
    by_epoch: dict[int, EpochMetrics] = {}
    for line in (text or "").splitlines():
        row = parse_metrics_row(_json(line)) if line.strip() else None
        if row is not None and (attempts is None or attempts.counts(row)):
            by_epoch[row.epoch] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def parse_infra_losses(text: str | None) -> list[InfraLoss]:
    """infra_losses.jsonl's text → its valid lines, in order (a torn or invalid line is skipped)."""
    rows = []
    for line in (text or "").splitlines():
        data = _json(line) if line.strip() else None
        if isinstance(data, dict) and _valid(InfraLoss, data):
            rows.append(InfraLoss.model_validate(data))
    return rows


def metrics_jsonl(rows: Iterable[EpochMetrics]) -> str:
    return "".join(row.model_dump_json() + "\n" for row in rows)


def trials_json(rows: Iterable[TrialRow]) -> str:
    return json.dumps([row.model_dump(mode="json") for row in rows], indent=2)


# --- "best" -----------------------------------------------------------------------------------------------


def best_so_far(metrics: Sequence[EpochMetrics]) -> float | None:
    """The best val_acc of the epochs so far (None before the first)."""
    return max((m.val_acc for m in metrics), default=None)


def better(a: float | None, b: float | None, mode: SearchMode) -> bool:
    """Is `a` strictly better than `b` under `mode`? A value beats no value."""
    if b is None:
        return a is not None
    if a is None:
        return False
    return a > b if mode == "max" else a < b


def best_trial(rows: Iterable[TrialRow], mode: SearchMode) -> TrialRow | None:
    """The trial with the best `best_metric` (the first on a tie); failed trials never count."""
    best: TrialRow | None = None
    for row in rows:
        if row.state is not TrialState.FAILED and better(row.best_metric, best.best_metric if best else None, mode):
            best = row
    return best


# The one folder torchvision downloads CIFAR-10 into (`data.format: torchvision`, or a missing data.train): any
# other missing folder is an error at submission and in the driver, never another 170 MB download.
TORCHVISION_DOWNLOAD_DIR = "~/.cache/trainctl/cifar10"
