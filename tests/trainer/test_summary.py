"""summary.json's test-accuracy fields and which rule chose the best checkpoint (no Ray: a job dir on disk)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from trainer import contract
from trainer.contract import CheckpointEntry, EpochMetrics, Manifest
from trainer.run import absolute_job_dir, summarize
from trainer.spec import resolve


def job_dir(tmp_path: Path, val_accs: list[float], test_accs: list[float]) -> Path:
    rows = [
        EpochMetrics(
            epoch=e,
            train_loss=1.0,
            train_acc=0.5,
            val_loss=None if not v else 1.0,
            val_acc=v,
            lr=0.1,
            images_per_s=1.0,
            epoch_seconds=1.0,
            time=0.0,
            test_loss=1.2,
            test_acc=t,
        )
        for e, (v, t) in enumerate(zip(val_accs, test_accs, strict=True), start=1)
    ]
    (tmp_path / contract.METRICS).write_text(contract.metrics_jsonl(rows))
    entries = [
        CheckpointEntry(
            epoch=m.epoch, val_acc=m.val_acc, uri=f"/x/epoch_{m.epoch}/checkpoint.pt", sha256="0" * 64, size=1
        )
        for m in rows
    ]
    (tmp_path / contract.MANIFEST).write_text(Manifest(checkpoints=entries, latest_epoch=len(rows)).to_json())
    return tmp_path


def test_best_is_chosen_on_validation_never_on_test(tmp_path):
    d = job_dir(tmp_path, val_accs=[0.5, 0.7, 0.6], test_accs=[0.9, 0.4, 0.55])
    spec = resolve("debug", {"optim.epochs": 3})
    s = summarize(spec, str(d), time.time(), None, None)
    assert (s.best_checkpoint_epoch, s.best_checkpoint_rule, s.best_val_acc) == (2, "val_acc", 0.7)
    assert s.best_checkpoint_test_acc == 0.4 and s.final_test_acc == 0.55  # not the test-best 0.9
    on_disk = json.loads(s.to_json())
    assert on_disk["final_test_acc"] == 0.55 and on_disk["best_checkpoint_rule"] == "val_acc"


def test_without_a_validation_split_the_best_is_the_final_epoch(tmp_path):
    d = job_dir(tmp_path, val_accs=[0.0, 0.0, 0.0], test_accs=[0.3, 0.8, 0.6])
    spec = resolve("debug", {"optim.epochs": 3, "data.val_fraction": 0.0})
    s = summarize(spec, str(d), time.time(), None, None)
    assert (s.best_checkpoint_epoch, s.best_checkpoint_rule, s.best_val_acc) == (3, "final_epoch", None)
    assert s.best_checkpoint_test_acc == s.final_test_acc == 0.6


def test_an_unfinished_run_has_no_final_test_acc(tmp_path):
    d = job_dir(tmp_path, val_accs=[0.5, 0.6], test_accs=[0.5, 0.6])
    s = summarize(resolve("debug", {"optim.epochs": 3}), str(d), time.time(), RuntimeError("x"), None)
    assert s.final_test_acc is None and s.best_checkpoint_test_acc is None


def test_ray_ranks_checkpoints_like_the_summary(tmp_path):
    # Ray Train's retention must agree with the rule: by val_acc with a validation split, else by epoch.
    from trainer.fit import run_config

    with_val = run_config(resolve("fast"), str(tmp_path), "a").checkpoint_config
    without = run_config(resolve("paper"), str(tmp_path), "b").checkpoint_config
    assert (with_val.checkpoint_score_attribute, without.checkpoint_score_attribute) == ("val_acc", "epoch")


def test_a_relative_job_dir_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    # Ray Train workers run in a directory of Ray's: a relative job dir would put metrics.jsonl there
    monkeypatch.chdir(tmp_path)
    assert absolute_job_dir("data/bench/run1/") == str(tmp_path / "data" / "bench" / "run1")
    for given in ("/abs/job", "~/jobs/j1", "s3://bucket/jobs/j1", "file:///srv/jobs/j1"):
        assert absolute_job_dir(given + "/") == given
