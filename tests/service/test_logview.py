"""`trainctl logs` shows the trainer's lines, not Ray's dumps (service/client/logview.py), on real captured Ray text."""

from __future__ import annotations

from pathlib import Path

from service.client.logview import LogView, epoch_line, trainer_lines

# A real driver log of a 1-worker debug run (Ray 2.60), cut to its start and its last epoch.
ONE_RANK = (Path(__file__).parent / "data" / "ray-driver-1rank.log").read_text()

# A real driver log of a 2-worker DDP run with MLflow tracking (python -m trainer.run's own output: Ray's
# colour codes still in it), from tests/trainer/test_run.py's trained_job.
TWO_RANKS_REAL = (Path(__file__).parent / "data" / "ray-driver-2ranks-ansi.log").read_text()

# Two workers, in Ray's formats (the lines of ONE_RANK with a second worker's beside them), and a failure.
TWO_RANKS = """\
(TrainController pid=1402) Started training worker group of size 2:
(TrainController pid=1402) - (ip=192.0.2.2, pid=1510) world_rank=0, local_rank=0, node_rank=0
(TrainController pid=1402) - (ip=192.0.2.3, pid=1511) world_rank=1, local_rank=0, node_rank=1
(RayTrainWorker pid=1510) Moving model to device: cpu
(RayTrainWorker pid=1511, ip=192.0.2.3) Moving model to device: cpu
(RayTrainWorker pid=1510) devices: cpu (1 threads) AMD EPYC; numerics: fp32
(RayTrainWorker pid=1511, ip=192.0.2.3) devices: cpu (1 threads) AMD EPYC; numerics: fp32
(RayTrainWorker pid=1510) Reporting training result 1: TrainingReport(checkpoint=None, metrics={'epoch': 1, \
'train_loss': 1.9, 'val_acc': 0.39, 'numerics': {'precision': 'fp32'}}, validation=False) from rank 0
(RayTrainWorker pid=1511, ip=192.0.2.3) Reporting training result 1: TrainingReport(checkpoint=None, \
metrics={'epoch': 1, 'train_loss': 1.8, 'val_acc': 0.39}, validation=False) from rank 1
(RayTrainWorker pid=1511, ip=192.0.2.3) /work/trainer/loop.py:80: UserWarning: rank 1 saw a NaN
(TrainController pid=1402) [2026-12-06 04:42:06,226 E 1402 1435] core_worker.cc:2465: Actor with class name: 'X'
2026-12-06 04:43:00,001 trainer.run ERROR job failed (oom): Traceback (most recent call last):
  File "/work/trainer/run.py", line 250, in main
RuntimeError: CUDA out of memory
2026-12-06 04:43:00,100\tINFO worker.py:2029 -- shutting down
2026-12-06 04:43:00,200\tERROR worker.py:2100 -- the job's driver exited with 1
"""


def test_one_rank_run_reads_as_the_trainers_lines() -> None:
    shown = trainer_lines(ONE_RANK).splitlines()
    assert shown[0].endswith(
        "trainer.fit INFO placement: 1 CPU worker(s) (scaling.num_workers; "
        "scaling.use_gpu=false), 1 CPU(s) each (scaling.cpus_per_worker)"
    )
    assert shown[1].startswith("devices: cpu (1 threads")
    assert shown[-1] == (
        "epoch 14: train_loss 0.8253  train_acc 0.8496  val_loss 0.2139  val_acc 1  test_loss 0.6823  "
        "test_acc 1  lr 0.05  images/s 828"
    )
    text = "\n".join(shown)
    for ray_noise in (
        "TrainingReport",
        "Checkpoint successfully",
        "job_manager.py",
        "Running entrypoint",
        "core_worker.cc",
        "Requesting resources",
        "pid=",
    ):
        assert ray_noise not in text
    assert max(map(len, shown)) < 200 < max(map(len, ONE_RANK.splitlines()))


def test_rank_zero_only_unless_all_ranks() -> None:
    shown = trainer_lines(TWO_RANKS).splitlines()
    assert shown[:2] == ["devices: cpu (1 threads) AMD EPYC; numerics: fp32", "epoch 1: train_loss 1.9  val_acc 0.39"]
    assert not any("rank 1" in line or "1.8" in line for line in shown)
    # The trainer's error with its traceback and Ray's own ERROR stay; Ray's INFO and glog lines go.
    assert shown[2:] == [
        "2026-12-06 04:43:00,001 trainer.run ERROR job failed (oom): Traceback (most recent call last):",
        '  File "/work/trainer/run.py", line 250, in main',
        "RuntimeError: CUDA out of memory",
        "2026-12-06 04:43:00,200\tERROR worker.py:2100 -- the job's driver exited with 1",
    ]
    every = trainer_lines(TWO_RANKS, all_ranks=True).splitlines()
    assert every[:5] == [
        "[rank 0] devices: cpu (1 threads) AMD EPYC; numerics: fp32",
        "[rank 1] devices: cpu (1 threads) AMD EPYC; numerics: fp32",
        "[rank 0] epoch 1: train_loss 1.9  val_acc 0.39",
        "[rank 1] epoch 1: train_loss 1.8  val_acc 0.39",
        "[rank 1] /work/trainer/loop.py:80: UserWarning: rank 1 saw a NaN",
    ]


def test_a_real_two_worker_log_with_colours() -> None:
    assert "\x1b[36m(RayTrainWorker pid=" in TWO_RANKS_REAL and "from rank 1" in TWO_RANKS_REAL
    shown = trainer_lines(TWO_RANKS_REAL).splitlines()
    assert [line.split(":")[0] for line in shown if line.startswith("epoch ")] == ["epoch 1", "epoch 2", "epoch 3"]
    assert shown[-1].startswith('{"state":"succeeded"') and "trainer.tracking INFO logged to MLflow" in shown[-2]
    assert not any("\x1b" in line or "mlflow.store.db.utils" in line or "pid=" in line for line in shown)
    every = trainer_lines(TWO_RANKS_REAL, all_ranks=True).splitlines()
    assert [line[:16] for line in every if "] epoch " in line] == [
        f"[rank {r}] epoch {e}" for e in (1, 2, 3) for r in (0, 1)
    ]


def test_fed_in_pieces_as_when_following() -> None:
    """Split at every 97th byte (mid-line, mid-report): the same lines as the whole text at once."""
    view = LogView()
    pieces = [ONE_RANK[i : i + 97] for i in range(0, len(ONE_RANK), 97)]
    assert "".join(view.feed(p) for p in pieces) + view.flush() == trainer_lines(ONE_RANK)


def test_a_report_cut_short_keeps_what_it_has() -> None:
    assert epoch_line("3", "'epoch': 3, 'train_loss': 0.5, 'val_a") == "epoch 3: train_loss 0.5"
    assert epoch_line("4", "") == "epoch 4: "


def test_plain_text_and_attempt_headers_are_kept() -> None:
    text = "=== attempt 1 (j-1): head lost ===\nhello\n2026-12-06 04:41:50,059\tINFO job_manager.py:1 -- x\nnext\n"
    assert trainer_lines(text) == "=== attempt 1 (j-1): head lost ===\nhello\n"
