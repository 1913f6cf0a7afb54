"""A real Ray Tune search (ASHA over optim.lr) through `python -m trainer.run`."""

from __future__ import annotations

import json
import time

import pytest

from tests.trainer.jobs import ONE_WORKER, log_tail, make_job_dir, read_jsonl, run
from trainer.evaluate import evaluate_checkpoint

pytestmark = pytest.mark.ray

# A good learning rate, one that cannot learn in 3 epochs, then another good one, in a row: ASHA's rung at
# epoch 2 compares each later trial with the ones before, so the hopeless one is stopped early and the last
# one, above the rung's median, goes on. (Every trial is a Ray Train run of ~20 CPU-s: three show both.)
SEARCH = {
    "space": {"optim.lr": {"grid": [0.1, 1e-6, 0.05]}},
    "num_samples": 1,
    "scheduler": {"kind": "asha", "grace_period": 2, "reduction_factor": 2, "max_t": 3},
    "max_concurrent_trials": 1,
}


def test_asha_search_runs_trials_in_a_row_and_promotes_the_best(ray_head, cifar_parquet, tmp_path):
    job_dir = make_job_dir(
        tmp_path,
        "search",
        {"data.train": str(cifar_parquet), "optim.epochs": 3, "data.max_train_images": 1024, "search": SEARCH},
    )
    started = time.monotonic()
    assert run(job_dir, ray_head.env(), timeout=540) == 0, log_tail(job_dir)
    print(f"search wall time: {time.monotonic() - started:.1f} s")
    trials = json.loads((job_dir / "trials.json").read_text())
    summary = json.loads((job_dir / "summary.json").read_text())
    assert len(trials) == 3 and all(t["state"] in ("succeeded", "stopped_early") for t in trials), trials
    assert sorted(t["config"]["optim.lr"] for t in trials) == sorted(SEARCH["space"]["optim.lr"]["grid"])
    by_lr = {t["config"]["optim.lr"]: t for t in trials}
    assert by_lr[1e-6]["stopped_early"] and not by_lr[0.1]["stopped_early"], trials
    assert not by_lr[0.05]["stopped_early"], trials  # above the rung's median: promoted to the end
    best = max(trials, key=lambda t: t["best_metric"])
    assert summary["best_trial"] == best["trial_id"] and summary["state"] == "succeeded"
    assert summary["best_config"]["optim.lr"] in (0.1, 0.05)
    # the job's best checkpoint is the best trial's, and evaluates to its reported metric
    assert f"/trials/{best['trial_id']}/" in summary["best_checkpoint"]
    assert summary["best_val_acc"] == pytest.approx(best["best_metric"])
    result = evaluate_checkpoint(summary["best_checkpoint"], split="val")
    assert abs(result["accuracy"] - summary["best_val_acc"]) <= 0.005
    trial_metrics = read_jsonl(job_dir / "trials" / best["trial_id"] / "metrics.jsonl")
    assert [m["epoch"] for m in trial_metrics] == [1, 2, 3]


def test_optuna_search_with_asha(ray_head, cifar_parquet, tmp_path):
    """search.algorithm optuna: Optuna's TPE (seeded) picks each trial's values, ASHA can stop trials early."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    search = {
        "algorithm": "optuna",
        "space": {"optim.lr": {"loguniform": [1e-4, 0.2]}},
        "num_samples": 2,
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 2},
        "seed": 7,
    }
    job_dir = make_job_dir(
        tmp_path,
        "optuna",
        {
            "data.train": str(cifar_parquet),
            "optim.epochs": 2,
            "data.max_train_images": 512,
            **ONE_WORKER,  # the subject is Optuna's values; the ASHA test above keeps 2-worker trials
            "search": search,
        },
    )
    started = time.monotonic()
    assert run(job_dir, ray_head.env(), timeout=400) == 0, log_tail(job_dir)
    print(f"optuna search wall time: {time.monotonic() - started:.1f} s")
    trials = json.loads((job_dir / "trials.json").read_text())
    summary = json.loads((job_dir / "summary.json").read_text())
    assert len(trials) == 2 and all(t["state"] in ("succeeded", "stopped_early") for t in trials), trials
    # The values are Optuna's: the same seeded sampler, asked alone, proposes the same learning rates.
    sampler = OptunaSearch(seed=7)
    sampler.set_search_properties("val_acc", "max", {"optim.lr": tune.loguniform(1e-4, 0.2)})
    expected = [sampler.suggest(str(i))["optim.lr"] for i in range(2)]
    assert sorted(t["config"]["optim.lr"] for t in trials) == pytest.approx(sorted(expected)), (trials, expected)
    best = max(trials, key=lambda t: t["best_metric"])
    assert summary["state"] == "succeeded" and summary["best_trial"] == best["trial_id"]
