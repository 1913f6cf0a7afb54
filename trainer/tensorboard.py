"""TensorBoard event files for a run: `<run dir>/tensorboard/` (the job dir for a single run, each trial's
dir for a search), so `tensorboard --logdir <job dir>` shows every run.

tensorboardX's synchronous `EventsWriter` writes into a local temporary directory and each write is mirrored
into the run's directory through `objstore` (a local path or S3 alike): event files are small and
append-only, so re-uploading the whole file after each epoch is cheap and keeps the copy in storage complete
at every moment. (Its `SummaryWriter` queues events to a background thread and its flush() does not wait for
that queue, so an upload right after an epoch could miss the epoch.)

A resumed run writes a new event file with `purge_step` = its first epoch: TensorBoard then drops the
earlier file's events from that epoch on, so an epoch that ran twice is shown once.

TensorBoard must never fail a training run: every failure here is logged once and the log goes quiet.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

import objstore
from trainer import contract
from trainer.contract import EpochMetrics

log = logging.getLogger(__name__)

# metrics.jsonl field -> TensorBoard tag; grouped like the paper's figures (train vs val/test per chart).
TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "test_loss": "loss/test",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "test_acc": "accuracy/test",
    "lr": "lr",
    "images_per_s": "throughput/images_per_s",
    "epoch_seconds": "time/epoch_seconds",
}
NOT_SCALARS = {"epoch", "time", "resumed"}


def scalars(metrics: EpochMetrics) -> dict[str, float]:
    """The tags and values one epoch writes: every numeric metrics field (a field added later to
    EpochMetrics appears as `other/<name>`), none for a value the epoch does not have (val_loss null)."""
    out = {}
    for key, value in metrics.model_dump().items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[TAGS.get(key, f"other/{key}")] = float(value)
    return out


LOCAL_PREFIX = "trainctl-tb-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_local_dirs(tmp: str | None = None) -> list[str]:
    """Remove the local directories of writers whose process is gone (a worker killed by a fault or a
    restart never reaches close()); a directory of a live process, or one not named by this module, stays."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    for name in os.listdir(tmp):
        pid_text = name[len(LOCAL_PREFIX) :].split("-", 1)[0]
        if name.startswith(LOCAL_PREFIX) and pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
            removed.append(name)
    return removed


class EventLog:
    def __init__(self, run_dir: str, purge_step: int | None = None) -> None:
        self.dest = objstore.join(run_dir, contract.TENSORBOARD_DIR)
        # The pid in the name lets a later writer on this machine clean up after a killed one.
        self._local = tempfile.mkdtemp(prefix=f"{LOCAL_PREFIX}{os.getpid()}-")
        self._writer: Any = None
        try:
            remove_stale_local_dirs()  # inside the try: housekeeping must not fail training either
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            # The suffix keeps two writers started in the same second apart, in the order they started
            # (TensorBoard reads the files in name order, and a resume's purge must come after what it purges).
            self._writer = EventsWriter(
                os.path.join(self._local, "events"), filename_suffix=f".{time.time_ns():020d}.{os.getpid()}"
            )
            if purge_step is not None:  # as tensorboardX's SummaryWriter(purge_step=...) marks a restart
                self._writer.write_event(Event(step=purge_step, file_version="brain.Event:2"))
                self._writer.write_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            self._fail("cannot start TensorBoard event files", exc)

    def _fail(self, what: str, exc: BaseException) -> None:
        log.warning("%s (training goes on without them): %s", what, exc)
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    def epoch(self, metrics: EpochMetrics) -> None:
        """One finished epoch's scalars at step = epoch, then the files go to storage."""
        if self._writer is None:
            return
        try:
            from tensorboardX import summary

            for tag, value in scalars(metrics).items():
                self._write(metrics.epoch, summary.scalar(tag, value))
            self.sync()
        except Exception as exc:  # noqa: BLE001
            self._fail("cannot write TensorBoard event files", exc)

    def confusion(self, confusion: contract.Confusion, step: int) -> None:
        """The confusion matrix as an image (rows = true class, white → blue = 0 → 100 % of the row)."""
        if self._writer is None:
            return
        try:
            from tensorboardX import summary

            self._write(
                step,
                summary.image(
                    f"confusion_matrix/{confusion.split}", confusion_image(confusion.matrix), dataformats="HWC"
                ),
            )
            for name, acc in confusion.per_class_accuracy().items():
                if acc is not None:
                    self._write(step, summary.scalar(f"per_class_accuracy_{confusion.split}/{name}", acc))
            self.sync()
        except Exception as exc:  # noqa: BLE001
            self._fail("cannot write the confusion matrix to TensorBoard", exc)

    def _write(self, step: int, summary: Any) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self._writer.write_event(Event(wall_time=time.time(), step=step, summary=summary))

    def sync(self) -> None:
        self._writer.flush()
        for name in sorted(os.listdir(self._local)):
            with open(os.path.join(self._local, name), "rb") as f:
                objstore.write_bytes(objstore.join(self.dest, name), f.read())

    def close(self) -> None:
        if self._writer is not None:
            try:
                self.sync()
                self._writer.close()
            except Exception as exc:  # noqa: BLE001
                self._fail("cannot finish TensorBoard event files", exc)
        shutil.rmtree(self._local, ignore_errors=True)


def confusion_image(matrix: list[list[int]], cell: int = 24) -> np.ndarray:
    """An HWC uint8 heatmap of the row-normalised matrix, `cell` pixels per entry, with a 1-pixel grid."""
    m = np.asarray(matrix, dtype=np.float64)
    totals = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = (white + (blue - white) * frac[..., None]).astype(np.uint8)
    image = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    image[::cell, :, :] = 200
    image[:, ::cell, :] = 200
    return image
