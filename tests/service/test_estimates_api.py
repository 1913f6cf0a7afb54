"""POST /v1/estimates, the estimate stored at submission, estimate vs actual in the view, and the guard
rails on limits.max_hours / limits.max_cost (both store backends, over a fake Ray)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from service.api import history
from service.client import http
from service.client.cli import common, main
from tests.service.conftest import Api

JOB = {"preset": "debug", "overrides": {"optim.epochs": 4}}
DEVICE = "cpu (2 threads, no native bf16) Test CPU"
NODE_TYPES = json.dumps({"cpu.small": {"cpus": 2, "device": "Test CPU"}})


@pytest.fixture(autouse=True)
def _fresh_history() -> None:
    history.clear()  # a job id/version never repeats, but keep tests independent of each other's reads


def _estimate(api: Api, body: Any) -> Any:
    return api.client.post("/v1/estimates", json=body, headers=api.headers())


def _run_to_success(
    api: Api, body: Any, epoch_s: float = 5.0, ips: float = 200.0, startup: float = 12.0, finish: float = 3.0
) -> str:
    """Submit `body`, let the fake Ray run it: metrics.jsonl as the trainer writes it, then SUCCEEDED."""
    job = api.post(body).json()
    api.reconcile()  # STARTING: attempt 1 submitted to Ray now
    # As if submitted to Ray start-up + 4 epochs + finish ago: the job's actual wall time is then that long.
    log = api.runner.store.get(job["id"]).attempt_log
    submitted = time.time() - startup - 4 * epoch_s - finish
    api.runner.store.update(job["id"], attempt_log=[{**log[0], "submitted_at": submitted}])
    lines = []
    for epoch in range(1, 5):
        lines.append(
            json.dumps(
                {
                    "epoch": epoch,
                    "train_loss": 1.0,
                    "train_acc": 0.1,
                    "val_loss": 1.0,
                    "val_acc": 0.3,
                    "lr": 0.05,
                    "images_per_s": ips,
                    "epoch_seconds": epoch_s,
                    "time": submitted + startup + epoch * epoch_s,
                    "devices": [DEVICE, DEVICE],
                }
            )
        )
    (api.job_dir(job["id"]) / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (api.job_dir(job["id"]) / "summary.json").write_text('{"state": "succeeded", "epochs_completed": 4}')
    api.ray.set(f"{job['id']}-1", "SUCCEEDED", exit_code=0)
    api.reconcile()
    assert api.get(f"/v1/jobs/{job['id']}").json()["state"] == "SUCCEEDED"
    return str(job["id"])


def test_without_history_the_estimate_is_unknown_and_never_blocks(api: Api) -> None:
    r = _estimate(api, {**JOB, "overrides": {**JOB["overrides"], "limits.max_hours": 0.001}})
    assert r.status_code == 200, r.text
    est = r.json()
    assert est["wall_seconds"] == {"value": None, "basis": est["wall_seconds"]["basis"]}
    assert est["wall_seconds"]["basis"].startswith("unknown: no finished job with this key")
    assert est["workers"]["value"] == 2 and est["settings"] == []
    assert est["checks"][0]["result"] == "unchecked" and not est["checks"][0]["refuses"]
    job = api.post({**JOB, "overrides": {**JOB["overrides"], "limits.max_hours": 0.001}})
    assert job.status_code == 201, job.text
    assert job.json()["estimate"]["checks"][0]["message"].startswith("could not check limits.max_hours")


def test_history_estimates_the_next_job_and_the_view_shows_estimate_vs_actual(api: Api) -> None:
    first = _run_to_success(api, JOB)
    est = _estimate(api, JOB).json()
    assert est["images_per_s"] == {"value": 200.0, "basis": "history: 1 past job with the same key"}
    assert est["startup_seconds"]["value"] == pytest.approx(12.0, abs=0.2)
    assert est["finish_seconds"]["value"] == pytest.approx(3.0, abs=0.3)
    assert est["wall_seconds"]["value"] == pytest.approx(12.0 + 4 * 5.0 + 3.0, abs=0.4)
    assert est["key"]["device"] == DEVICE and est["key"]["device_count"] == 2
    # The first job had no history: its stored estimate is unknown, and its view shows what it took.
    view = api.get(f"/v1/jobs/{first}").json()["estimate"]
    assert view["estimated_wall_seconds"] is None
    assert view["actual_wall_seconds"] == pytest.approx(12.0 + 4 * 5.0 + 3.0, abs=2.0)
    assert view["actual_images_per_s"] == 200.0 and view["wall_error"] is None
    # The second job is estimated from the first, and compared with what it took.
    second = _run_to_success(api, JOB, epoch_s=6.0, ips=160.0)
    view = api.get(f"/v1/jobs/{second}").json()["estimate"]
    assert view["estimated_images_per_s"] == 200.0 and view["actual_images_per_s"] == 160.0
    assert view["images_per_s_error"] == pytest.approx(0.25)
    assert view["wall_error"] == pytest.approx((35.0 - 39.0) / 39.0, abs=0.06) and view["detail"]["epochs"] == 4
    listed = api.get("/v1/jobs").json()["jobs"][0]["estimate"]
    assert listed["estimated_wall_seconds"] == view["estimated_wall_seconds"] and listed["detail"] is None


def test_an_estimate_over_the_limits_is_refused_at_submission(make_api: Any) -> None:
    api = make_api(node_types=NODE_TYPES, prices='{"cpu.small": 3.6}')
    _run_to_success(api, JOB)  # 12 s start-up + 4 x 5 s + 3 s on one cpu.small node at 3.6/h
    before = api.get("/v1/jobs").json()["total"]
    over_time = {**JOB, "overrides": {**JOB["overrides"], "limits.max_hours": 0.005}}
    r = api.post(over_time)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert [d["field"] for d in err["details"]] == ["limits.max_hours"]
    assert "estimated wall time 0.01 h (history: 1 past job with the same key)" in err["details"][0]["message"]
    over_cost = {**JOB, "overrides": {**JOB["overrides"], "limits.max_cost": 0.01}}
    r = api.post(over_cost)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "limits.max_cost", r.text
    assert "estimated cost 0.04" in r.json()["error"]["details"][0]["message"]
    assert api.get("/v1/jobs").json()["total"] == before  # nothing half-written
    within = api.post({**JOB, "overrides": {**JOB["overrides"], "limits.max_cost": 1.0}})
    assert within.status_code == 201, within.text
    checks = within.json()["estimate"]["checks"]
    assert [(c["field"], c["result"]) for c in checks] == [("limits.max_hours", "ok"), ("limits.max_cost", "ok")]
    est = _estimate(api, JOB).json()
    assert est["node_type"] == "cpu.small" and est["settings"] == ["TRAINCTL_NODE_TYPES", "TRAINCTL_PRICES"]
    assert est["cost"]["value"] == pytest.approx(35.0 / 3600 * 3.6, abs=0.001)


def test_a_budget_on_a_service_without_prices_is_refused(api: Api) -> None:
    body = {**JOB, "overrides": {**JOB["overrides"], "limits.max_cost": 5}}
    r = api.post(body)
    assert r.status_code == 422
    detail = r.json()["error"]["details"][0]
    assert detail["field"] == "limits.max_cost" and "TRAINCTL_PRICES" in detail["message"]
    est = _estimate(api, body).json()
    assert est["checks"][-1]["field"] == "limits.max_cost" and est["checks"][-1]["refuses"] is True


def test_the_estimate_route_validates_like_submission(api: Api) -> None:
    r = _estimate(api, {"preset": "debug", "overrides": {"optim.epochs": -1}})
    assert r.status_code == 422 and "optim.epochs" in r.text
    r = _estimate(api, {"preset": "debug", "overrides": {"limits.max_cost": -1}})
    assert r.status_code == 422 and "limits.max_cost" in r.text
    assert api.client.post("/v1/estimates", json=JOB).status_code == 401
    assert api.get("/v1/jobs").json()["total"] == 0  # an estimate creates nothing
    started = time.time()
    assert _estimate(api, JOB).status_code == 200
    assert time.time() - started < 5


def _cli_through(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """`trainctl` against this test's app (the TestClient's transport: real routes, no socket)."""
    monkeypatch.setattr(
        common,
        "client",
        lambda args, timeout=30, retry=True: http.TrainctlClient(
            "http://testserver", api.token, transport=api.client._transport
        ),
    )
    monkeypatch.setenv("XDG_CONFIG_HOME", str(api.settings.data_dir / "no-config"))
    monkeypatch.delenv("TRAINCTL_URL", raising=False)


def _main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main.main(argv)
    return int(exc.value.code or 0)


def test_cli_dry_run_asks_the_service_and_list_status_show_estimate_vs_elapsed(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _cli_through(api, monkeypatch)
    first = _run_to_success(api, JOB)
    argv = ["submit", "--preset", "debug", "--set", "optim.epochs=4", "--dry-run", "--data-dir", "/nonexistent"]
    assert _main([*argv, "--url", "http://testserver"]) == 0
    out = capsys.readouterr().out
    assert "# wall time  35s" in out and "history: 1 past job with the same key" in out
    assert _main(argv) == 0  # no service configured: the offline dry run says it has no history
    assert "# no estimate: no service configured" in capsys.readouterr().out
    assert _main(["list", "--url", "http://testserver"]) == 0
    listed = capsys.readouterr().out
    assert "EST / ELAPSED" in listed and re.search(rf"{re.escape(first)} .* \? / 3[5-7]s ", listed), listed
    second = api.post(JOB).json()["id"]
    assert _main(["status", second, "--url", "http://testserver"]) == 0
    status = capsys.readouterr().out
    assert "time      estimated 35s, elapsed ?  (estimate: history: 1 past job with the same key)" in status


def test_the_submit_form_shows_the_estimate_before_submitting(api: Api) -> None:
    from tests.service.test_ui import csrf_of, login

    _run_to_success(api, JOB)
    login(api)
    page = api.client.get("/ui/submit").text
    assert 'id="estimate-figures"' in page and page.index('id="estimate"') < page.index('id="submit-button"')
    token = csrf_of(page)
    form = {"preset": "debug", "overrides_yaml": "optim.epochs: 4\n"}
    assert api.client.post("/ui/api/estimate", json=form).status_code == 403  # no CSRF token
    r = api.client.post("/ui/api/estimate", json=form, headers={"X-CSRF-Token": token})
    assert r.status_code == 200, r.text
    assert r.json()["wall_seconds"]["basis"] == "history: 1 past job with the same key"
    r = api.client.post(
        "/ui/api/estimate", json={**form, "overrides_yaml": "optim: [x"}, headers={"X-CSRF-Token": token}
    )
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "overrides"
    assert api.get("/v1/jobs").json()["total"] == 1  # the estimate submitted nothing


def test_history_reads_each_finished_job_once_and_a_few_per_estimate(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(2):
        _run_to_success(api, JOB)
    history.clear()
    monkeypatch.setattr(history, "MAX_READS", 1)
    reads: list[str] = []
    real = history.jobdir.read_metrics
    monkeypatch.setattr(history.jobdir, "read_metrics", lambda d: reads.append(d) or real(d))
    store, job_dir = api.runner.store, api.runner.job_dir
    assert len(history.collect(store, job_dir)) == 1 and len(reads) == 1
    assert len(history.collect(store, job_dir)) == 2 and len(reads) == 2
    assert len(history.collect(store, job_dir)) == 2 and len(reads) == 2  # finished jobs are read once


def test_serve_refuses_a_bad_price_naming_the_setting(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRAINCTL_NODE_TYPES", NODE_TYPES)
    monkeypatch.setenv("TRAINCTL_PRICES", '{"cpu.small": "cheap"}')
    assert _main(["serve", "--data-dir", str(tmp_path / "data")]) == common.EXIT_ERROR
    err = capsys.readouterr().err
    assert "TRAINCTL_PRICES['cpu.small']: a price per node-hour must be a number >= 0, got 'cheap'" in err
    assert not (tmp_path / "data").exists()  # nothing started, nothing written


def test_the_estimate_route_is_documented(api: Api) -> None:
    op = api.client.get("/openapi.json").json()["paths"]["/v1/estimates"]["post"]
    assert "oneOf" in op["requestBody"]["content"]["application/json"]["schema"]  # a submission's body
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Estimate"}
    assert {"401", "422"} <= set(op["responses"])


def test_a_running_job_whose_pace_passes_its_time_limit_is_flagged(make_api) -> None:
    """Issue 30 item 5: a RUNNING job whose measured pace (ETA) takes it past limits.max_hours is flagged in its
    view (and so in the event stream's `state` events) well before the runner stops it; one in time is not."""
    import json as _json

    from tests.service.test_ui import read_events, rows, running_job

    api = make_api(events_poll_s=0.05)
    slow = api.post({"preset": "debug", "overrides": {"optim.epochs": 100, "limits.max_hours": 0.01}}).json()["id"]
    fine = running_job(api, epochs=4)
    api.reconcile()
    api.ray.set(f"{slow}-1", "RUNNING")
    api.reconcile()
    for job_id in (slow, fine):
        d = api.job_dir(job_id)
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.jsonl").write_text(
            "".join(_json.dumps({**r, "epoch_seconds": 3.0}) + "\n" for r in rows(range(1, 3)))
        )

    view = api.get(f"/v1/jobs/{slow}").json()
    assert view["state"] == "RUNNING" and view["progress"]["eta_seconds"] == 294.0  # 98 epochs x 3 s
    warning = view["time_limit_warning"]
    assert "limits.max_hours=0.01 h" in warning and "of 100" in warning, warning
    stop_epoch = int(warning.split("around epoch ")[1].split()[0])
    assert 2 <= stop_epoch <= 14  # 36 s of limit at 3 s an epoch, less the time already run
    assert api.get(f"/v1/jobs/{fine}").json()["time_limit_warning"] is None  # 72 h is plenty
    assert all(j["time_limit_warning"] is None for j in api.get("/v1/jobs").json()["jobs"])  # lists read no files

    # the event stream's `state` events carry it too, while the job runs (cancelled meanwhile, so it ends)
    import threading
    import time

    def cancel_soon() -> None:
        time.sleep(0.5)
        api.client.post(f"/v1/jobs/{slow}/cancel", headers=api.headers())

    t = threading.Thread(target=cancel_soon)
    t.start()
    states = [d for n, d in read_events(api, slow) if n == "state"]
    t.join()
    assert states[0]["state"] == "RUNNING" and "limits.max_hours=0.01 h" in states[0]["time_limit_warning"]
    assert states[-1]["state"] == "CANCELLED" and states[-1]["time_limit_warning"] is None
