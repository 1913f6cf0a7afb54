"""TensorBoard event files and the confusion matrix: trainer/tensorboard.py in-process, then a real Ray run
(synthetic CIFAR files with a test split) whose `tensorboard/` is read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.trainer.cifar_files import write_cifar_python
from tests.trainer.jobs import ONE_WORKER, log_tail, make_job_dir, read_jsonl, run
from trainer.contract import Confusion, EpochMetrics
from trainer.tensorboard import LOCAL_PREFIX, TAGS, EventLog, confusion_image, remove_stale_local_dirs, scalars


def accumulator(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def epoch_row(epoch: int, val_loss: float | None = 1.0) -> EpochMetrics:
    return EpochMetrics(
        epoch=epoch,
        train_loss=2.0 / epoch,
        train_acc=0.1 * epoch,
        val_loss=val_loss,
        val_acc=0.09 * epoch,
        lr=0.05,
        images_per_s=100.0,
        epoch_seconds=1.0,
        time=1.7e9 + epoch,
        node_ids=["n"],
    )


def test_scalars_cover_every_numeric_metric() -> None:
    tags = scalars(epoch_row(2))
    assert set(tags) == {
        TAGS[k] for k in ("train_loss", "val_loss", "train_acc", "val_acc", "lr", "images_per_s", "epoch_seconds")
    }
    assert "loss/val" not in scalars(epoch_row(2, val_loss=None))  # no validation split: no point


def test_event_log_one_point_per_epoch_and_a_resume_purges(tmp_path: Path) -> None:
    log = EventLog(str(tmp_path))
    for e in (1, 2, 3):
        log.epoch(epoch_row(e))
    log.close()
    acc = accumulator(tmp_path / "tensorboard")
    assert [s.step for s in acc.Scalars("loss/train")] == [1, 2, 3]
    # a resumed run redoes epoch 3 (its checkpoint was epoch 2) and goes on
    log = EventLog(str(tmp_path), purge_step=3)
    for e in (3, 4):
        log.epoch(epoch_row(e))
    log.close()
    acc = accumulator(tmp_path / "tensorboard")
    assert [s.step for s in acc.Scalars("accuracy/val")] == [1, 2, 3, 4]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2


def test_a_killed_writers_local_dir_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that was a process and is no more
    dead = tmp_path / f"{LOCAL_PREFIX}{gone.pid}-abc"
    live = tmp_path / f"{LOCAL_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{LOCAL_PREFIX}notapid"
    for d in (dead, live, other):
        d.mkdir()
        (d / "events").write_bytes(b"x")
    assert remove_stale_local_dirs(str(tmp_path)) == [dead.name]
    assert not dead.exists() and live.exists() and other.exists()


def test_confusion_image_and_tags(tmp_path: Path) -> None:
    matrix = (np.eye(3, dtype=int) * 8 + 1).tolist()
    conf = Confusion(split="test", classes=["a", "b", "c"], matrix=matrix, accuracy=27 / 33, n=33)
    image = confusion_image(conf.matrix, cell=10)
    assert image.shape == (30, 30, 3) and image.dtype == np.uint8
    assert image[15, 15].sum() < image[15, 25].sum()  # the diagonal is darker than an off-diagonal cell
    log = EventLog(str(tmp_path))
    log.confusion(conf, step=5)
    log.close()
    acc = accumulator(tmp_path / "tensorboard")
    assert acc.Tags()["images"] == ["confusion_matrix/test"]
    assert acc.Scalars("per_class_accuracy_test/a")[0].value == pytest.approx(9 / 11)  # row [9, 1, 1]
    with pytest.raises(ValueError, match="3x3"):
        Confusion(split="val", classes=["a", "b", "c"], matrix=[[1, 2]], accuracy=0.5, n=3)


def test_an_unwritable_destination_never_fails_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    log = EventLog(str(blocker))  # <file>/tensorboard/ cannot be created
    log.epoch(epoch_row(1))  # logged, not raised
    log.epoch(epoch_row(2))
    log.close()


@pytest.mark.ray
def test_a_run_writes_tensorboard_and_its_confusion_matrix(ray_head, tmp_path: Path) -> None:
    data = write_cifar_python(tmp_path / "cifar", per_batch=60)
    job_dir = make_job_dir(
        tmp_path, "tb", {"data.train": str(data), "data.test": str(data), "optim.epochs": 3, **ONE_WORKER}
    )
    assert run(job_dir, ray_head.env()) == 0, log_tail(job_dir)
    metrics = read_jsonl(job_dir / "metrics.jsonl")
    acc = accumulator(job_dir / "tensorboard")
    expected = {
        TAGS[k] for k in ("train_loss", "val_loss", "train_acc", "val_acc", "lr", "images_per_s", "epoch_seconds")
    }
    assert expected <= set(acc.Tags()["scalars"])
    for tag in expected:  # one scalar per metric per epoch
        assert [s.step for s in acc.Scalars(tag)] == [1, 2, 3], tag
    assert [s.value for s in acc.Scalars("accuracy/val")] == pytest.approx([m["val_acc"] for m in metrics])
    assert acc.Tags()["images"] == ["confusion_matrix/test"]

    confusion = Confusion.model_validate_json((job_dir / "confusion.json").read_text())
    summary = json.loads((job_dir / "summary.json").read_text())
    assert confusion.split == "test" and confusion.n == 60 and sum(map(sum, confusion.matrix)) == 60
    assert confusion.checkpoint == summary["best_checkpoint"]
    assert confusion.accuracy == pytest.approx(summary["test_acc"])
