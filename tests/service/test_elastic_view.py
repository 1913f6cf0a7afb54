"""Elastic workers in the service, over a fake Ray: a bad `scaling.num_workers: {min, max}` is a 422 naming
the field before anything reaches Ray, and the worker count over time (from metrics.jsonl) is in the job
view, the dashboard's job page and `trainctl watch`'s line."""

from __future__ import annotations

import json

from service.client.cli.render import progress_line
from tests.service.conftest import Api, metrics_line

ELASTIC = {"scaling.num_workers": {"min": 1, "max": 3}, "optim.batch_size": 48}

BAD = [
    ({"scaling.num_workers": {"min": 0, "max": 2}}, "scaling.num_workers"),
    ({"scaling.num_workers": {"min": 2, "max": 1}}, "scaling.num_workers"),
    ({"scaling.num_workers": {"min": 1, "max": 9}, "optim.batch_size": 2520}, "scaling.num_workers.max"),
    ({"scaling.num_workers": {"min": 1, "max": 3}}, "optim.batch_size"),  # the debug preset's 64: 3 does not divide
]


def test_bad_elastic_workers_are_422_naming_the_field_and_never_reach_ray(api: Api) -> None:
    for overrides, field in BAD:  # one test, not one per case: each case costs a service start-up otherwise
        resp = api.post({"preset": "debug", "overrides": overrides})
        assert resp.status_code == 422, resp.text
        details = resp.json()["error"]["details"]
        assert field in [d["field"] for d in details], details
    api.reconcile()
    assert api.get("/v1/jobs").json()["total"] == 0 and not api.ray.jobs


def _epoch(epoch: int, workers: int) -> str:
    line = json.loads(metrics_line(epoch, 0.1 * epoch))
    return json.dumps({**line, "workers": workers, "global_batch": 48, "global_step": 11 * epoch}) + "\n"


def _login(api: Api) -> None:
    api.client.post(
        "/ui/login",
        content=f"token={api.token}&next=/ui/",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )


def test_the_worker_count_over_time_is_in_the_view_the_page_and_watch(api: Api) -> None:
    job_id = api.post({"preset": "debug", "overrides": {**ELASTIC, "optim.epochs": 5}}).json()["id"]
    _login(api)
    # before the first epoch: no spans, and the page shows the range the spec asks for
    view = api.get(f"/v1/jobs/{job_id}").json()
    assert view["workers"] is None and "workers" not in progress_line(view)
    assert '<dd id="workers">1-3, elastic</dd>' in api.client.get(f"/ui/jobs/{job_id}").text

    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    (api.job_dir(job_id) / "metrics.jsonl").write_text("".join(_epoch(e, w) for e, w in ((1, 2), (2, 2), (3, 3))))
    api.reconcile()
    view = api.get(f"/v1/jobs/{job_id}").json()
    assert view["workers"] == [
        {"first_epoch": 1, "last_epoch": 2, "workers": 2},
        {"first_epoch": 3, "last_epoch": 3, "workers": 3},
    ]
    assert view["metrics"]["workers"] == 3 and view["metrics"]["global_batch"] == 48
    assert "workers 2→3" in progress_line(view)
    html = api.client.get(f"/ui/jobs/{job_id}").text
    assert '<dd id="workers">2 (epochs 1-2) → 3 (epoch 3)</dd>' in html, html
