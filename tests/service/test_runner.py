"""The runner over a fake Ray and real local storage: the queue, cancellation, and how a run's end is
reconciled (success, user error, storage outage, infrastructure failure → resubmission)."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from service.engine import runner as runner_module
from tests.service.conftest import Api


def submit(api: Api, **overrides) -> str:
    body = {"preset": "debug", "overrides": {"optim.epochs": 2, **overrides}}
    resp = api.post(body)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def state(api: Api, job_id: str) -> dict:
    return api.get(f"/v1/jobs/{job_id}").json()


def write_summary(api: Api, job_id: str, **fields) -> None:
    summary = {
        "state": "failed",
        "best_val_acc": None,
        "best_checkpoint": None,
        "epochs_completed": 0,
        "error": None,
        "error_kind": None,
        **fields,
    }
    (api.job_dir(job_id) / "summary.json").write_text(json.dumps(summary))


def test_submission_contract(api: Api, monkeypatch) -> None:
    monkeypatch.setenv("TRAINCTL_S3_ENDPOINT", "http://127.0.0.1:8333")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-forwarded")
    job_id = submit(api)
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "STARTING" and job["attempts"] == 1 and job["ray_submission_id"] == f"{job_id}-1"
    fake = api.ray.jobs[f"{job_id}-1"]
    job_dir = str(api.job_dir(job_id))
    assert shlex.split(fake.entrypoint) == [sys.executable, "-m", "trainer.run", "--job-dir", job_dir]
    assert fake.num_cpus == 0.5 and fake.resources is None
    assert fake.env_vars == {
        "TRAINCTL_S3_ENDPOINT": "http://127.0.0.1:8333",
        "TRAINCTL_DATA_ROOTS": ",".join(api.settings.allowed_data_roots),
    }
    spec = json.loads((api.job_dir(job_id) / "spec.json").read_text())
    assert spec == job["spec"] and spec["optim"]["epochs"] == 2


def test_entrypoint_resources_pin_the_driver(make_api, monkeypatch) -> None:
    monkeypatch.setenv("TRAINCTL_ENTRYPOINT_RESOURCES", '{"trainctl_driver": 1}')
    api = make_api()
    job_id = submit(api)
    api.reconcile()
    assert api.ray.jobs[f"{job_id}-1"].resources == {"trainctl_driver": 1.0}


def test_queue_respects_the_limit_and_order(make_api) -> None:
    api = make_api(max_concurrent_jobs=2)
    ids = [submit(api) for _ in range(4)]
    api.reconcile()
    assert [state(api, i)["state"] for i in ids] == ["STARTING", "STARTING", "QUEUED", "QUEUED"]
    api.client.post(f"/v1/jobs/{ids[2]}/cancel", headers=api.headers())
    api.ray.set(f"{ids[0]}-1", "RUNNING")
    api.reconcile()
    assert [state(api, i)["state"] for i in ids] == ["RUNNING", "STARTING", "CANCELLED", "QUEUED"]
    write_summary(api, ids[0], state="succeeded", best_val_acc=0.3, epochs_completed=2)
    api.ray.set(f"{ids[0]}-1", "SUCCEEDED", exit_code=0)
    api.reconcile()
    assert [state(api, i)["state"] for i in ids] == ["SUCCEEDED", "STARTING", "CANCELLED", "STARTING"]
    assert f"{ids[2]}-1" not in api.ray.jobs
    done = state(api, ids[0])
    assert done["best_val_acc"] == 0.3 and done["message"] is None


def test_cancel_running_stops_the_ray_job(api: Api) -> None:
    job_id = submit(api)
    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    api.reconcile()
    resp = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert resp.status_code == 200 and resp.json()["state"] == "CANCELLED"
    assert api.ray.stopped == [f"{job_id}-1"]
    api.reconcile()  # the STOPPED Ray job must not be mistaken for a failure to retry
    assert state(api, job_id)["state"] == "CANCELLED" and api.ray.stopped == [f"{job_id}-1"]
    assert len(api.ray.jobs) == 1


def test_cancel_while_ray_is_down_is_finished_by_the_reconciler(api: Api) -> None:
    job_id = submit(api)
    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    api.ray.down = True
    resp = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert resp.status_code == 503
    api.ray.down = False
    api.reconcile()
    assert state(api, job_id)["state"] == "CANCELLED" and api.ray.stopped == [f"{job_id}-1"]


def test_user_error_is_never_retried(api: Api) -> None:
    job_id = submit(api)
    api.reconcile()
    write_summary(api, job_id, error="data.train: no such file", error_kind="user")
    api.ray.set(f"{job_id}-1", "FAILED", exit_code=2)
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "FAILED" and job["attempts"] == 1
    assert "not retried" in job["message"] and "data.train" in job["message"]


def test_exit_code_2_without_summary_is_a_user_error(api: Api) -> None:
    job_id = submit(api)
    api.reconcile()
    api.ray.set(f"{job_id}-1", "FAILED", exit_code=2)
    api.reconcile()
    assert state(api, job_id)["state"] == "FAILED" and len(api.ray.jobs) == 1


def test_storage_error_fails_with_a_clear_message(api: Api) -> None:
    job_id = submit(api)
    api.reconcile()
    write_summary(api, job_id, error="s3 timed out", error_kind="storage")
    api.ray.set(f"{job_id}-1", "FAILED", exit_code=3)
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "FAILED" and "storage was unreachable" in job["message"] and job["attempts"] == 1


def test_infra_failures_are_resubmitted_up_to_max_restarts(api: Api) -> None:
    job_id = submit(api, **{"checkpoint.max_restarts": 1})
    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    api.reconcile()
    # 1: the driver was killed from outside (a signal): the cluster's doing, not charged to the job
    api.ray.set(f"{job_id}-1", "FAILED", exit_code=-9, message="driver killed")
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "STARTING" and job["attempts"] == 2 and job["ray_submission_id"] == f"{job_id}-2"
    assert "driver killed" in job["attempt_log"][1]["reason"] and job["attempt_log"][1]["charged"] is False
    assert api.ray.jobs[f"{job_id}-2"].entrypoint == api.ray.jobs[f"{job_id}-1"].entrypoint  # same job dir
    # 2: the head restarted and forgot the job: not charged either
    api.ray.forget(f"{job_id}-2")
    api.reconcile()
    job = state(api, job_id)
    assert job["attempts"] == 3 and "no record" in job["attempt_log"][2]["reason"]
    assert job["attempt_log"][2]["charged"] is False
    # 3: an infra error reported by the trainer (the job's own run failed): charged, 1 of 1
    write_summary(api, job_id, error="worker group died", error_kind="infra")
    api.ray.set(f"{job_id}-3", "FAILED", exit_code=1)
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "STARTING" and job["attempts"] == 4 and job["attempt_log"][3]["charged"] is True
    # 4: again, and no restart of the budget is left
    write_summary(api, job_id, error="worker group died", error_kind="infra")
    api.ray.set(f"{job_id}-4", "FAILED", exit_code=1)
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "FAILED" and job["attempts"] == 4 and "after 4 attempt(s)" in job["message"]
    assert job["message"].startswith("RuntimeError: worker group died") or "worker group died" in job["message"]
    assert [e["attempt"] for e in job["attempt_log"]] == [1, 2, 3, 4]


def test_cluster_caused_restarts_never_use_the_budget_but_are_capped(api: Api) -> None:
    from service.engine.decide import MAX_FREE_RESTARTS

    job_id = submit(api, **{"checkpoint.max_restarts": 0})
    api.reconcile()
    for attempt in range(1, MAX_FREE_RESTARTS + 1):
        api.ray.forget(f"{job_id}-{attempt}")  # the head went away under the job, again and again
        api.reconcile()
        assert state(api, job_id)["attempts"] == attempt + 1
    api.ray.forget(f"{job_id}-{MAX_FREE_RESTARTS + 1}")
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "FAILED" and job["attempts"] == MAX_FREE_RESTARTS + 1


def test_failure_message_is_one_line_of_reason(api: Api) -> None:
    job_id = submit(api)
    api.reconcile()
    traceback = (
        "TrainingFailedError: Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n"
        'Traceback (most recent call last):\n  File "/x/loop.py", line 3, in loop\n    load()\n'
        "trainer.data.DataError: /data/train.parquet: file not found\n"
    )
    write_summary(api, job_id, error=traceback, error_kind="user")
    api.ray.set(f"{job_id}-1", "FAILED", exit_code=2)
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "FAILED" and "\n" not in job["message"]
    assert job["message"].startswith("DataError: /data/train.parquet: file not found"), job["message"]


def test_stopped_by_someone_else_is_resubmitted_then_succeeds(api: Api) -> None:
    job_id = submit(api)
    api.reconcile()
    write_summary(api, job_id, error="controller lost", error_kind="infra")
    api.ray.set(f"{job_id}-1", "STOPPED")
    api.reconcile()
    job = state(api, job_id)
    assert job["attempts"] == 2 and "controller lost" in job["attempt_log"][1]["reason"]
    assert not (api.job_dir(job_id) / "summary.json").exists()  # attempt 1's summary cannot confuse attempt 2
    write_summary(api, job_id, state="succeeded", best_val_acc=0.4, epochs_completed=2)
    api.ray.set(f"{job_id}-2", "SUCCEEDED", exit_code=0)
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "SUCCEEDED" and job["best_val_acc"] == 0.4 and job["attempts"] == 2


def test_success_without_summary_fails(api: Api) -> None:
    job_id = submit(api)
    api.reconcile()
    api.ray.set(f"{job_id}-1", "SUCCEEDED", exit_code=0)
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "FAILED" and "summary.json" in job["message"]


def test_queued_jobs_wait_while_ray_is_down(api: Api) -> None:
    job_id = submit(api)
    api.ray.down = True
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "QUEUED" and "fake Ray is down" in job["message"]
    api.ray.down = False
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "STARTING" and job["message"] is None


def test_restart_of_the_service_keeps_jobs(make_api) -> None:
    api = make_api()
    job_id = submit(api)
    api.reconcile()
    api.client.__exit__(None, None, None)
    again = make_api()  # same data dir, new app
    assert again.token == api.token
    assert state(again, job_id)["state"] == "STARTING"


def test_a_submission_wakes_the_reconciler(make_api) -> None:
    """The background reconciler polls hourly here, so only the wake-up after POST can start the job."""
    import time

    api = make_api(keep_reconciler=True)
    job_id = submit(api)
    deadline = time.monotonic() + 10
    while f"{job_id}-1" not in api.ray.jobs:
        assert time.monotonic() < deadline, "POST did not wake the reconciler"
        time.sleep(0.05)
    api.client.__exit__(None, None, None)  # lifespan shutdown stops the reconciler cleanly
    assert api.client.app.state.trainctl.reconciler._task is None


def test_logs_are_kept_per_attempt_and_outlive_ray(api: Api) -> None:
    job_id = submit(api)
    r = api.get(f"/v1/jobs/{job_id}/logs")
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_log" and "QUEUED" in r.json()["error"]["message"]
    api.reconcile()
    api.ray.jobs[f"{job_id}-1"].logs = "\x1b[36m(RayTrainWorker pid=1)\x1b[0m epoch 1\n"
    api.ray.set(f"{job_id}-1", "RUNNING")
    api.reconcile()
    saved = api.job_dir(job_id) / "logs" / "attempt-1.log"
    assert saved.read_text() == "(RayTrainWorker pid=1) epoch 1\n"  # copied while it runs, colours stripped
    api.ray.forget(f"{job_id}-1")  # the head restarted: Ray's copy is gone; the job is resubmitted ...
    api.runner._log_copies.clear()  # ... by a service that restarted too (it has not seen this log yet)
    api.reconcile()
    assert saved.read_text() == "(RayTrainWorker pid=1) epoch 1\n"  # the copy is kept, not emptied
    api.ray.jobs[f"{job_id}-2"].logs = "resumed at epoch 2\n"
    write_summary(api, job_id, state="succeeded", best_val_acc=0.4, epochs_completed=2)
    api.ray.set(f"{job_id}-2", "SUCCEEDED", exit_code=0)
    api.reconcile()
    api.ray.forget(f"{job_id}-2")
    text = api.get(f"/v1/jobs/{job_id}/logs").text
    assert "(RayTrainWorker pid=1) epoch 1" in text and "resumed at epoch 2" in text
    assert text.index("=== attempt 1") < text.index("=== attempt 2")
    assert api.get(f"/v1/jobs/{job_id}/logs", params={"attempt": 2}).text == "resumed at epoch 2\n"
    (api.job_dir(job_id) / "logs" / "attempt-1.log").unlink()
    (api.job_dir(job_id) / "logs" / "attempt-2.log").unlink()
    r = api.get(f"/v1/jobs/{job_id}/logs")
    assert r.status_code == 404 and "no log was kept" in r.json()["error"]["message"]


def test_a_job_waiting_for_resources_is_not_running(api: Api) -> None:
    from service.engine.rayjobs import Placement

    job_id = submit(api)
    api.reconcile()
    sub = f"{job_id}-1"
    api.ray.placements[sub] = Placement(False, {"CPU": 2.0}, {"CPU": 1.5})
    api.ray.set(sub, "RUNNING")  # the driver runs, its workers wait for CPUs
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "STARTING" and job["message"] == "waiting for resources: needs 2 CPU, 1.5 free"
    assert job["progress"]["eta_seconds"] is None
    api.ray.placements[sub] = Placement(True, {}, {})
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "RUNNING" and job["message"] is None


def test_a_cancelled_job_that_ray_forgot_is_cancelled_not_resubmitted(api: Api) -> None:
    job_id = submit(api, **{"checkpoint.max_restarts": 2})
    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    api.ray.down = True
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers()).status_code == 503
    api.ray.down = False
    api.ray.forget(f"{job_id}-1")  # the head restarted meanwhile
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "CANCELLED" and job["attempts"] == 1 and f"{job_id}-2" not in api.ray.jobs


@pytest.mark.parametrize("val_fraction, rule", [(0.25, "val_acc"), (0.0, "final_epoch")])
def test_job_view_shows_test_accuracy_and_the_best_checkpoint_rule(make_api, val_fraction: float, rule: str) -> None:
    api = make_api()
    job_id = api.post({"preset": "debug", "overrides": {"data.val_fraction": val_fraction}}).json()["id"]
    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    api.reconcile()
    running = state(api, job_id)
    assert running["best_checkpoint_rule"] == rule and running["final_test_acc"] is None
    write_summary(
        api,
        job_id,
        state="succeeded",
        best_val_acc=0.3 if val_fraction else None,
        epochs_completed=2,
        final_test_acc=0.61,
        best_checkpoint_test_acc=0.59,
        best_checkpoint_rule=rule,
    )
    api.ray.set(f"{job_id}-1", "SUCCEEDED", exit_code=0)
    api.reconcile()
    done = state(api, job_id)
    assert done["state"] == "SUCCEEDED" and done["best_checkpoint_rule"] == rule
    assert (done["final_test_acc"], done["best_checkpoint_test_acc"]) == (0.61, 0.59)
    assert done["best_val_acc"] == (0.3 if val_fraction else None)


def _store_raw_spec(api: Api, job_id: str, raw: dict) -> None:
    """Write a stored spec as an older version might have left it (bypassing validation)."""
    from sqlalchemy import update

    from service.engine.store import JobModel

    with api.runner.store.engine.begin() as conn:
        conn.execute(update(JobModel).where(JobModel.id == job_id).values(spec=json.dumps(raw)))


def test_a_stored_spec_that_no_longer_validates_is_readable_and_never_runs(api: Api) -> None:
    job_id = submit(api)
    _store_raw_spec(api, job_id, {"optim": {"epochs": 2, "retired_knob": 1}, "seed": 3})
    view = api.get(f"/v1/jobs/{job_id}")
    assert view.status_code == 200, view.text
    assert "optim.retired_knob" in view.json()["message"] and "resubmit" in view.json()["message"]
    assert view.json()["spec"]["optim"]["epochs"] == 2 and view.json()["spec"]["seed"] == 3  # the valid rest kept
    assert api.get("/v1/jobs").status_code == 200
    assert api.get("/ui/api/jobs").status_code == 200  # the dashboard's rows
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "FAILED" and "optim.retired_knob" in job["message"], job
    assert not api.ray.jobs  # never submitted with a spec the user did not write


def test_the_spec_defaults_are_the_specs_own(api: Api) -> None:
    """The runner reads checkpoint.max_restarts from the typed spec: a spec that omits it gets spec.py's
    default (2), not a second default written in the service."""
    from service.engine.store import Job
    from trainer.spec import CheckpointSpec

    job_id = submit(api)
    _store_raw_spec(api, job_id, {"optim": {"epochs": 2}})  # no checkpoint section at all
    job = api.runner.store.get(job_id)
    assert isinstance(job, Job) and job.spec_error is None
    facts = api.runner._facts(job, None, str(api.job_dir(job_id)))  # what decide() is given
    assert facts.max_restarts == CheckpointSpec().max_restarts == 2


# --- issue 21 item 12: races --------------------------------------------------------------------------------------


def test_delete_waits_for_the_ray_driver_to_exit(api: Api, monkeypatch) -> None:
    """Cancel stops the Ray job, but Ray's stop is a signal: a delete right after must not remove the folder
    while the driver can still write into it (409 with Retry-After); once the driver is gone it deletes."""
    job_id = submit(api)
    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    api.reconcile()
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers()).json()["state"] == "CANCELLED"
    # the driver has not exited yet: Ray still says RUNNING, and a stop only signals it
    api.ray.set(f"{job_id}-1", "RUNNING")
    monkeypatch.setattr(api.ray, "stop", lambda sid: api.ray.stopped.append(sid) or True)
    (api.job_dir(job_id) / "metrics.jsonl").write_text("{}\n")
    runner = api.runner
    job = runner.store.get(job_id)
    from service.engine.runner import StillStopping

    with pytest.raises(StillStopping):
        runner.delete(job, fence_s=0.3)
    assert api.job_dir(job_id).exists() and runner.store.get(job_id) is not None  # nothing removed
    assert api.ray.stopped.count(f"{job_id}-1") >= 2  # stopped again while waiting
    api.ray.set(f"{job_id}-1", "RUNNING")
    runner.delete_fence_s = 0.3  # (10 s by default)
    resp = api.client.delete(f"/v1/jobs/{job_id}", headers=api.headers())  # the API: 409 after its wait
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "job_still_stopping", resp.text
    assert resp.headers["Retry-After"]
    api.ray.set(f"{job_id}-1", "STOPPED")  # the driver exited
    assert api.client.delete(f"/v1/jobs/{job_id}", headers=api.headers()).status_code == 204
    assert not api.job_dir(job_id).exists() and runner.store.get(job_id) is None


def test_a_replica_that_lost_leadership_stops_nothing(make_api, monkeypatch) -> None:
    """The leader lock lost mid-pass (another replica leads now): no Ray job is stopped, none started."""
    api = make_api(max_concurrent_jobs=1)
    first = submit(api, **{"limits.max_hours": 0.01})
    api.reconcile()
    api.ray.set(f"{first}-1", "RUNNING")
    api.reconcile()
    second = submit(api)
    # From here on the runner's clock is an hour ahead: `first` is over its time limit, so a leader would stop
    # it (a real wait of a fraction of a second let a loaded machine's earlier passes stop it already)
    later = runner_module.over_time_limit
    monkeypatch.setattr(runner_module, "over_time_limit", lambda job, hours, now: later(job, hours, now + 3600))
    answers = iter([True, False])  # leader when the pass starts, not any more at the first decision
    api.runner.reconcile_once(still_leader=lambda: next(answers, False))
    assert api.ray.stopped == [] and state(api, first)["state"] == "RUNNING"
    assert state(api, second)["state"] == "QUEUED" and f"{second}-1" not in api.ray.jobs
    api.runner.reconcile_once(still_leader=lambda: True)  # the leader does stop it
    assert api.ray.stopped == [f"{first}-1"] and state(api, first)["state"] == "FAILED"
