"""trainer/contract.py: writers validate what they write; readers tolerate torn, old and newer files."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from trainer import contract
from trainer.contract import (
    CheckpointEntry,
    EpochMetrics,
    ErrorKind,
    ExitCode,
    Manifest,
    RunState,
    SearchOutcome,
    Summary,
    TrialCounts,
    TrialRow,
    TrialState,
)


def metrics(epoch: int, val_acc: float = 0.5, **extra: object) -> EpochMetrics:
    return EpochMetrics(
        epoch=epoch,
        train_loss=1.0,
        train_acc=0.4,
        val_loss=1.1,
        val_acc=val_acc,
        lr=0.05,
        images_per_s=100.0,
        epoch_seconds=2.0,
        time=1e9 + epoch,
        **extra,
    )


# --- writers validate ------------------------------------------------------------------------------------


def test_writers_reject_what_readers_could_not_use():
    with pytest.raises(ValidationError, match="epoch"):
        metrics(0)  # epochs are 1-based
    with pytest.raises(ValidationError, match="val_acc"):
        EpochMetrics(
            epoch=1,
            train_loss=1.0,
            train_acc=0.4,
            val_loss=None,
            val_acc="high",
            lr=0.05,
            images_per_s=1.0,
            epoch_seconds=1.0,
            time=0.0,
        )
    with pytest.raises(ValidationError, match="sha256"):
        CheckpointEntry(epoch=1, val_acc=0.1, uri="/x", size=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="state"):
        Summary(state="done")
    summary = Summary(state=RunState.SUCCEEDED)
    with pytest.raises(ValidationError, match="epochs_completed"):
        summary.epochs_completed = "three"  # type: ignore[assignment]  # assignments are validated too
    with pytest.raises(ValidationError, match="trial_id"):
        TrialRow(trial_id="")


def test_written_files_read_back_equal():
    rows = [metrics(1), metrics(2, resumed=True, node_ids=["a", "b"])]
    assert contract.parse_metrics(contract.metrics_jsonl(rows)) == rows
    manifest = Manifest(
        checkpoints=[CheckpointEntry(epoch=2, val_acc=0.5, uri="/r/e2/checkpoint.pt", sha256="ab", size=7)],
        latest_epoch=2,
    )
    assert contract.parse_manifest(manifest.to_json()) == manifest
    trials = [TrialRow(trial_id="t1", config={"optim.lr": 0.1}, state=TrialState.RUNNING, epochs=1)]
    assert contract.parse_trials(contract.trials_json(trials)) == trials
    assert json.loads(contract.trials_json(trials))[0]["state"] == "running"


def test_a_single_runs_summary_leaves_out_the_search_fields():
    summary = Summary(state=RunState.FAILED, error="boom", error_kind=ErrorKind.USER)
    on_disk = json.loads(summary.to_json())
    assert on_disk["state"] == "failed" and on_disk["error_kind"] == "user" and on_disk["test_acc"] is None
    assert not {"best_trial", "best_config", "search_metric", "best_metric", "trials"} & set(on_disk)
    search = summary.with_search(
        SearchOutcome(
            best_trial="t1",
            best_config={"optim.lr": 0.1},
            search_metric="val_acc",
            best_metric=0.4,
            trials=TrialCounts(total=2, stopped_early=1, failed=0),
        )
    )
    on_disk = json.loads(search.to_json())
    assert on_disk["best_trial"] == "t1" and on_disk["trials"] == {"total": 2, "stopped_early": 1, "failed": 0}
    assert contract.parse_summary(search.to_json()) == search


def test_exit_codes_and_error_kinds():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3]
    assert ErrorKind.USER.exit_code is ExitCode.USER and ErrorKind.STORAGE.exit_code is ExitCode.STORAGE
    assert ErrorKind.INFRA.exit_code is ExitCode.FAILED


# --- readers tolerate ------------------------------------------------------------------------------------


def test_metrics_reader_skips_a_torn_last_line_and_keeps_each_epoch_once():
    text = contract.metrics_jsonl([metrics(1), metrics(2, 0.4), metrics(2, 0.6)]) + '{"epoch": 3, "train_lo'
    rows = contract.parse_metrics(text)
    assert [(m.epoch, m.val_acc) for m in rows] == [(1, 0.5), (2, 0.6)]  # a repeated epoch keeps its last line
    assert contract.parse_metrics("") == [] and contract.parse_metrics(None) == []
    assert contract.parse_metrics('not json\n[1, 2]\n{"epoch": "x"}\n\n') == []


def test_metrics_reader_reads_older_and_newer_lines():
    old = {
        "epoch": 1,
        "train_loss": 1.0,
        "train_acc": 0.4,
        "val_loss": None,
        "val_acc": 0.3,
        "lr": 0.05,
        "images_per_s": 10.0,
        "epoch_seconds": 3.0,
        "time": 1e9,
    }  # before `resumed` and `node_ids`
    new = {**old, "epoch": 2, "resumed": True, "node_ids": ["n"], "confusion": [[1, 0], [0, 1]]}  # a later field
    rows = contract.parse_metrics(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    assert [m.epoch for m in rows] == [1, 2]
    assert rows[0].resumed is False and rows[0].node_ids == [] and rows[0].val_loss is None
    assert rows[1].resumed is True and not hasattr(rows[1], "confusion")


def test_manifest_reader_tolerates_damage():
    good = {"epoch": 1, "val_acc": 0.2, "uri": "/r/e1/checkpoint.pt", "sha256": "a", "size": 3}
    text = json.dumps(
        {
            "checkpoints": [good, {"epoch": 2, "uri": "/r/e2"}, "junk"],
            "latest_epoch": 2,
            "written_by": "a later version",
        }
    )
    manifest = contract.parse_manifest(text)
    assert manifest is not None and [e.epoch for e in manifest.checkpoints] == [1] and manifest.latest_epoch == 2
    assert contract.parse_manifest('{"checkpoints": [') is None  # caught mid-write: read again later
    assert contract.parse_manifest(None) is None and contract.parse_manifest("[]") is None
    assert contract.parse_manifest("{}") == Manifest()


def test_summary_reader_tolerates_old_files_and_unknown_kinds():
    old = {
        "state": "succeeded",
        "best_val_acc": 0.3,
        "best_checkpoint": "/r/x.pt",
        "epochs_completed": 2,
        "error": None,
        "error_kind": None,
    }  # before num_parameters, test_acc, wall_seconds
    summary = contract.parse_summary(json.dumps(old))
    assert summary is not None and summary.succeeded() and summary.test_acc is None
    later = contract.parse_summary(json.dumps({"state": "failed", "error_kind": "quota", "devices": ["cuda:0"]}))
    assert later is not None and later.error_kind is ErrorKind.INFRA  # unknown kind: retried like infra
    assert contract.parse_summary('{"state": "succ') is None and contract.parse_summary('{"state": "odd"}') is None


def test_trials_reader_keeps_the_valid_rows():
    text = json.dumps(
        [
            {"trial_id": "a", "state": "succeeded", "best_metric": 0.3, "epochs": 3},
            {"config": {}},
            {"trial_id": "b"},
            "junk",
        ]
    )
    rows = contract.parse_trials(text)
    assert [r.trial_id for r in rows] == ["a", "b"] and rows[1].state is TrialState.PENDING
    assert contract.parse_trials('{"a": 1}') == [] and contract.parse_trials("[{") == []


# --- best so far ----------------------------------------------------------------------------------------


def test_best_is_computed_one_way():
    assert contract.best_so_far([]) is None
    assert contract.best_so_far([metrics(1, 0.2), metrics(2, 0.5), metrics(3, 0.4)]) == 0.5
    entries = [
        CheckpointEntry(epoch=e, val_acc=a, uri=f"/{e}", sha256="x", size=1) for e, a in ((1, 0.5), (2, 0.3), (3, 0.5))
    ]
    assert Manifest(checkpoints=entries).best().epoch == 3  # a tie goes to the later epoch
    assert Manifest(checkpoints=entries).latest().epoch == 3 and Manifest().best() is None


@pytest.mark.parametrize("mode, expected", [("max", "b"), ("min", "a")])
def test_best_trial_ignores_failed_and_unscored_trials(mode, expected):
    rows = [
        TrialRow(trial_id="a", state=TrialState.SUCCEEDED, best_metric=0.2),
        TrialRow(trial_id="b", state=TrialState.STOPPED_EARLY, best_metric=0.6),
        TrialRow(trial_id="c", state=TrialState.FAILED, best_metric=0.9 if mode == "max" else 0.1),
        TrialRow(trial_id="d", state=TrialState.RUNNING),
    ]
    best = contract.best_trial(rows, mode)
    assert best is not None and best.trial_id == expected
    assert contract.best_trial([], mode) is None
    assert contract.better(0.5, None, mode) and not contract.better(None, 0.5, mode)
