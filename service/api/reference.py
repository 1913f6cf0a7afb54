"""The paper beside every run: the authors' notebook's test accuracy per epoch, as a reference line.

The paper gives no per-epoch figures; the notebook that produced its numbers printed its test accuracy on
CIFAR-10's `test_batch` after every epoch (docs/paper.md, "The notebook's curve"). Only the epochs below
were read from its saved outputs, so the reference is a set of points, never interpolated: a notebook that
restarts its schedule every 10, 20, 40 ... epochs is not a straight line between them.

A run is compared with the reference when it trains the paper's network (the `model` section at its
defaults: `paper`, `notebook` and `fast` do) on 10 classes, at the run's latest epoch that has a reference
point, on the run's test accuracy at that epoch (else its validation accuracy, and the view says which).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from trainer.contract import EpochMetrics
from trainer.spec import JobSpec, ModelSpec

NAME = "authors' notebook"
# epoch -> test accuracy (weight decay 1e-3 until epoch 84, then 1e-4 with a restarted schedule)
NOTEBOOK_TEST_ACC: dict[int, float] = {
    1: 0.488,
    2: 0.569,
    3: 0.631,
    5: 0.704,
    8: 0.802,
    10: 0.823,
    20: 0.812,
    68: 0.908,
    84: 0.848,
    93: 0.940,
    113: 0.945,
    152: 0.948,
}


class Standing(BaseModel):
    epoch: int = Field(description="the run's latest epoch that has a reference point")
    metric: Literal["test_acc", "val_acc"] = Field(description="the run's figure compared (test where measured)")
    run_acc: float
    reference_acc: float
    delta_points: float = Field(description="run minus reference, in percentage points (+ = ahead)")
    text: str


class ReferenceView(BaseModel):
    name: str = NAME
    points: list[tuple[int, float]] = Field(description="[epoch, test accuracy] of the reference")
    standing: Standing | None = Field(default=None, description="None until the run has a comparable epoch")


PAPER_MODEL = ModelSpec()


def applies_to(spec: JobSpec | Mapping[str, Any]) -> bool:
    """The reference is the paper's network's: only a single run of that network (on 10 classes) is compared
    with it (a search's trials each have their own curve)."""
    if isinstance(spec, JobSpec):
        return spec.model == PAPER_MODEL and spec.search is None
    return spec.get("model") == PAPER_MODEL.model_dump(mode="json") and spec.get("search") is None


def standing(metrics: Sequence[EpochMetrics]) -> Standing | None:
    for m in sorted(metrics, key=lambda m: m.epoch, reverse=True):
        reference = NOTEBOOK_TEST_ACC.get(m.epoch)
        if reference is None:
            continue
        metric: Literal["test_acc", "val_acc"] = "test_acc" if m.test_acc is not None else "val_acc"
        run = m.test_acc if m.test_acc is not None else m.val_acc
        if run is None:
            continue
        delta = round((run - reference) * 100, 2)
        word = "ahead of" if delta > 0 else "behind" if delta < 0 else "level with"
        text = (
            f"epoch {m.epoch}: {metric.removesuffix('_acc')} {run * 100:.1f} % vs the {NAME}'s test "
            f"{reference * 100:.1f} % ({delta:+.1f} points, {word} it)"
        )
        return Standing(
            epoch=m.epoch, metric=metric, run_acc=run, reference_acc=reference, delta_points=delta, text=text
        )
    return None


def reference_view(spec: JobSpec | Mapping[str, Any], metrics: Sequence[EpochMetrics] | None) -> ReferenceView | None:
    if not applies_to(spec):
        return None
    return ReferenceView(points=sorted(NOTEBOOK_TEST_ACC.items()), standing=standing(metrics or []))
