"""The fence (trainer/fence.py): a worker group replaced by a newer attempt of the same run writes nothing, and
readers count an epoch only from the attempt that owns it. Local dir (unit) and real S3 (SeaweedFS)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import objstore
from trainer import contract, fence, step
from trainer.contract import AttemptRecord, Attempts, EpochMetrics


def row(epoch: int, attempt: int | None, acc: float = 0.5) -> EpochMetrics:
    return EpochMetrics(
        epoch=epoch,
        train_loss=1.0,
        train_acc=acc,
        val_loss=None,
        val_acc=0.0,
        lr=0.1,
        images_per_s=100.0,
        epoch_seconds=1.0,
        time=time.time(),
        attempt=attempt,
    )


def fenced_run(root: str) -> None:
    """Attempt 1 writes epochs 1-3; attempt 2 resumes at epoch 3 (after a partition); the old attempt 1 then
    tries to write epoch 4: it is refused and the stored metrics keep every epoch once, attempt 2's."""
    metrics = objstore.join(root, contract.METRICS)
    first = fence.claim(root, start_epoch=1, host="10.0.0.2")
    assert first == 1
    old_history = [row(1, 1), row(2, 1), row(3, 1)]
    fence.write_metrics(root, metrics, first, old_history)

    second = fence.claim(root, start_epoch=3, host="10.0.0.4")
    assert second == 2 and [a.attempt for a in fence.read(root).attempts] == [1, 2]
    history = step.read_history(metrics, 3, attempts=fence.read(root))
    assert [(m.epoch, m.attempt) for m in history] == [(1, 1), (2, 1)]
    history.append(row(3, second, acc=0.7))
    fence.write_metrics(root, metrics, second, history)
    before = objstore.read_text(metrics)

    with pytest.raises(fence.StaleAttempt, match=r"attempt 1 .* attempt 2 \(started at epoch 3 on 10\.0\.0\.4\)"):
        fence.write_metrics(root, metrics, first, [*old_history, row(4, first)])
    with pytest.raises(fence.StaleAttempt, match="refused to write checkpoint epoch_0004"):
        fence.check(root, first, "checkpoint epoch_0004")
    assert objstore.read_text(metrics) == before  # nothing written
    fence.check(root, second, "metrics")  # the current attempt goes on

    parsed = contract.parse_metrics(before, fence.read(root))
    assert [(m.epoch, m.attempt, m.train_acc) for m in parsed] == [(1, 1, 0.5), (2, 1, 0.5), (3, 2, 0.7)]


def test_a_replaced_attempt_writes_nothing_local_dir(tmp_path: Path) -> None:
    fenced_run(str(tmp_path / "job"))


@pytest.mark.s3
def test_a_replaced_attempt_writes_nothing_s3(s3_bucket_uri: str) -> None:
    fenced_run(objstore.join(s3_bucket_uri, "jobs", "j1"))
    assert objstore.exists(objstore.join(s3_bucket_uri, "jobs", "j1", contract.ATTEMPTS))


def test_readers_ignore_lines_of_attempts_that_do_not_own_their_epoch() -> None:
    attempts = Attempts(
        attempts=[
            AttemptRecord(attempt=1, start_epoch=1),
            AttemptRecord(attempt=2, start_epoch=4),
            AttemptRecord(attempt=3, start_epoch=3),  # restarted from an earlier checkpoint than attempt 2
        ]
    )
    # A stale attempt-1 line for epoch 4 that slipped in after attempt 1 was fenced, attempt 2's epoch 4
    # (superseded by attempt 3, which restarted at epoch 3), attempt 3's own lines, and a pre-fence line.
    lines = [row(1, 1), row(2, None), row(3, 2), row(3, 3), row(4, 2), row(4, 3, acc=0.9), row(4, 1, acc=0.1)]
    text = contract.metrics_jsonl(lines)
    parsed = contract.parse_metrics(text, attempts)
    assert [(m.epoch, m.attempt) for m in parsed] == [(1, 1), (3, 3), (4, 3)]
    assert parsed[-1].train_acc == 0.9
    # Without attempts (older runs, the service's plain reads) the last line of an epoch wins, as before.
    assert [m.epoch for m in contract.parse_metrics(text)] == [1, 2, 3, 4]
    # No attempt recorded: every line counts.
    assert len(contract.parse_metrics(text, Attempts())) == 4


def test_attempts_file_is_tolerant() -> None:
    assert contract.parse_attempts(None) == Attempts()
    assert contract.parse_attempts("{not json") == Attempts()
    assert contract.parse_attempts('{"attempts": [{"attempt": 1, "start_epoch": 1, "future": true}]}').current == (
        AttemptRecord(attempt=1, start_epoch=1)
    )


def test_collective_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.fit import COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S, collective_timeout_s

    monkeypatch.delenv(COLLECTIVE_TIMEOUT_ENV, raising=False)
    assert collective_timeout_s() == DEFAULT_COLLECTIVE_TIMEOUT_S
    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, "120")
    assert collective_timeout_s() == 120
    for bad in ("soon", "5", "-1"):
        monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=COLLECTIVE_TIMEOUT_ENV):
            collective_timeout_s()
