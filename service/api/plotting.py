"""PNG pictures of a job, rendered with matplotlib's Agg backend (no display, no torch):

- `curves_png`: loss and accuracy per epoch side by side, train vs val (and test where the run measured
  it) — the paper's Figures 1 and 2 — with the authors' notebook's test accuracy as a dashed reference for
  runs of the paper's network (service/api/reference.py);
- `lr_png`: the learning rate at the end of each epoch;
- `confusion_png`: the confusion matrix of confusion.json, rows normalised, with per-class accuracy.

Figures are built with the object API (Figure + FigureCanvasAgg), never pyplot: pyplot keeps global state
and is not safe in the threadpool that serves requests. matplotlib is imported on first use, so loading
the app stays quick.
"""

from __future__ import annotations

import io
from typing import Any

SERIES = {
    "loss": (("train_loss", "train"), ("val_loss", "val"), ("test_loss", "test")),
    "accuracy": (("train_acc", "train"), ("val_acc", "val"), ("test_acc", "test")),
}
COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c", "reference": "#555555"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def _points(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(m["epoch"], float(m[key])) for m in metrics if isinstance(m.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def curves_png(
    metrics: list[dict[str, Any]], title: str = "", reference: tuple[str, list[tuple[int, float]]] | None = None
) -> bytes:
    """`reference`: (name, [(epoch, test accuracy)]) drawn as dashed points on the accuracy axes, up to the
    run's last epoch (so a short run is not squeezed against a 150-epoch reference)."""
    fig = _figure(11, 4.2)
    last = max((m["epoch"] for m in metrics), default=0)
    for ax, (name, series) in zip(fig.subplots(1, 2), SERIES.items(), strict=True):
        if name == "accuracy" and reference is not None:
            ref = [(e, a * 100) for e, a in reference[1] if e <= last]
            if ref:
                ax.plot(
                    [e for e, _ in ref],
                    [a for _, a in ref],
                    linestyle="--",
                    marker="x",
                    color=COLORS["reference"],
                    label=f"{reference[0]} (test)",
                )
        for key, label in series:
            xs, ys = _points(metrics, key)
            if xs:
                ax.plot(
                    xs,
                    [y * 100 for y in ys] if name == "accuracy" else ys,
                    marker="o",
                    markersize=3,
                    color=COLORS[label],
                    label=f"{label} {name}",
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)" if name == "accuracy" else "loss")
        ax.set_title(f"training vs testing {name}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return _png(fig)


def lr_png(metrics: list[dict[str, Any]], title: str = "") -> bytes:
    fig = _figure(7, 3.6)
    ax = fig.subplots()
    xs, ys = _points(metrics, "lr")
    ax.plot(xs, ys, marker="o", markersize=3, color="#9467bd")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate (end of epoch)")
    ax.set_title(title or "learning rate")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def confusion_png(confusion: dict[str, Any]) -> bytes:
    """`confusion` as in confusion.json: `matrix` (rows = true class, columns = predicted), `classes`,
    `split`, `accuracy`."""
    import numpy as np

    matrix = np.asarray(confusion["matrix"], dtype=float)
    classes = list(confusion.get("classes") or [str(i) for i in range(len(matrix))])
    totals = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    per_class = np.diag(norm)
    fig = _figure(8, 7)
    ax = fig.subplots()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), [f"{c} {a * 100:.1f}%" for c, a in zip(classes, per_class, strict=True)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (per-class accuracy)")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    f"{int(matrix[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    acc = confusion.get("accuracy")
    split = confusion.get("split", "?")
    ax.set_title(
        f"confusion matrix on the {split} split" + (f" — accuracy {acc * 100:.2f}%" if acc is not None else "")
    )
    return _png(fig)


def compare_png(runs: list[tuple[str, dict[str, list[float | None]]]], title: str = "") -> bytes:
    """Several runs overlaid (service/api/comparison.py's series, one (label, series) each): accuracy (test where the
    run measured it, else val) and loss (val/test solid where measured, train dashed)."""
    fig = _figure(11, 4.2)
    acc_ax, loss_ax = fig.subplots(1, 2)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    for (name, series), color in zip(runs, colors * 2, strict=False):
        epochs = series.get("epoch") or []
        acc_key = "test_acc" if any(v is not None for v in series.get("test_acc") or []) else "val_acc"
        loss_key = "test_loss" if any(v is not None for v in series.get("test_loss") or []) else "val_loss"
        for ax, key, style, scale in (
            (acc_ax, acc_key, "-", 100.0),
            (loss_ax, loss_key, "-", 1.0),
            (loss_ax, "train_loss", "--", 1.0),
        ):
            pts = [(e, v * scale) for e, v in zip(epochs, series.get(key) or [], strict=False) if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, marker="o", markersize=3, color=color, label=f"{name} {key}")
    for ax, ylabel in ((acc_ax, "accuracy (%)"), (loss_ax, "loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend(loc="best", fontsize=7)
    acc_ax.set_title("accuracy (test, else val)")
    loss_ax.set_title("loss (val/test solid, train dashed)")
    if title:
        fig.suptitle(title)
    return _png(fig)
