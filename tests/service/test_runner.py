"""The runner over a fake Ray and real local storage: the queue, cancellation, and how a run's end is
reconciled (success, user error, storage outage, infrastructure failure → resubmission)."""

from __future__ import annotations

import json
import shlex
import sys

from tests.service.conftest import Api


def submit(api: Api, **overrides) -> str:
    body = {"preset": "debug", "overrides": {"optim.epochs": 2, **overrides}}
    resp = api.post(body)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def state(api: Api, job_id: str) -> dict:
    return api.get(f"/v1/jobs/{job_id}").json()


def write_summary(api: Api, job_id: str, **fields) -> None:
    summary = {"state": "failed", "best_val_acc": None, "best_checkpoint": None, "epochs_completed": 0,
               "error": None, "error_kind": None, **fields}
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
    assert fake.env_vars == {"TRAINCTL_S3_ENDPOINT": "http://127.0.0.1:8333"}
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
    job_id = submit(api, **{"checkpoint.max_restarts": 2})
    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    api.reconcile()
    # 1: the driver died without a summary
    api.ray.set(f"{job_id}-1", "FAILED", exit_code=-9, message="driver killed")
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "STARTING" and job["attempts"] == 2 and job["ray_submission_id"] == f"{job_id}-2"
    assert "driver killed" in job["attempt_log"][1]["reason"]
    assert api.ray.jobs[f"{job_id}-2"].entrypoint == api.ray.jobs[f"{job_id}-1"].entrypoint  # same job dir
    # 2: the head restarted and forgot the job
    api.ray.forget(f"{job_id}-2")
    api.reconcile()
    job = state(api, job_id)
    assert job["attempts"] == 3 and "no record" in job["attempt_log"][2]["reason"]
    # 3: an infra error reported by the trainer; no restarts left
    write_summary(api, job_id, error="worker group died", error_kind="infra")
    api.ray.set(f"{job_id}-3", "FAILED", exit_code=1)
    api.reconcile()
    job = state(api, job_id)
    assert job["state"] == "FAILED" and job["attempts"] == 3 and "after 3 attempt(s)" in job["message"]
    assert [e["attempt"] for e in job["attempt_log"]] == [1, 2, 3]


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
