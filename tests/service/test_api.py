"""The HTTP API over a fake Ray: validation (422 naming each field), auth, ownership, idempotency, and the
JSON error shape. Nothing a client sends may produce a 500."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest

from tests.service.conftest import DEBUG_JOB, Api, metrics_line


def error(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"]), body
    return body["error"]


# (body, field that must be named)
MALFORMED = [
    ({"preset": "debug", "overrides": {"optim.lr": -1}}, "optim.lr"),
    ({"preset": "debug", "overrides": {"optim.lr": "fast"}}, "optim.lr"),
    ({"preset": "debug", "overrides": {"optim.epochs": 0}}, "optim.epochs"),
    ({"preset": "debug", "overrides": {"optim.bogus": 1}}, "optim.bogus"),
    ({"preset": "nope"}, "preset"),
    ({"preset": "debug", "overrides": {"scaling.num_workers": 3}}, "optim.batch_size"),  # 64 % 3 != 0
    ({"preset": "debug", "overrides": {"model.dropout": 1.5}}, "model.dropout"),
    ({"preset": "debug", "overrides": {"model.activation": "gelu"}}, "model.activation"),
    ({"preset": "debug", "overrides": {"model.blocks": [1, 1]}}, "model.blocks"),
    ({"preset": "debug", "overrides": {"precision": "fp8"}}, "precision"),
    ({"preset": "debug", "overrides": {"data.val_fraction": 0.9}}, "data.val_fraction"),
    ({"preset": "debug", "overrides": {"optim.lr.x": 1}}, "optim.lr.x"),
    ({"preset": "debug", "overrides": "optim.lr=1"}, "overrides"),
    ({"preset": "debug", "extra": 1}, "extra"),
    ({"optim": {"epochs": -5}}, "optim.epochs"),
    ({"optim": {"momentum": 1.0}, "scaling": {"num_workers": 0}}, "scaling.num_workers"),
    ({"unknown_section": {}}, "unknown_section"),
    ({"checkpoint": {"max_restarts": -1}}, "checkpoint.max_restarts"),
    ({"search": {"space": {"optim.nope": {"choice": [1]}}}}, "search.space.optim.nope"),
    ({"search": {"algorithm": "optuna", "space": {"optim.lr": {"grid": [0.1, 0.2]}}}}, "search.space.optim.lr"),
    ({"tracking": {"mlflow": {"tracking_uri": "sqlite:////tmp/elsewhere/mlflow.db"}}}, "tracking.mlflow.tracking_uri"),
    ({"tracking": {"mlflow": {"tracking_uri": "https://mlflow.example.com"}}}, "tracking.mlflow.tracking_uri"),
    ({"tracking": {"wandb": {"mode": "online"}}}, "tracking.wandb.mode"),
    ({"tracking": {"wandb": {"dir": "/tmp/elsewhere/wandb"}}}, "tracking.wandb.dir"),
    ({"tracking": {"wandb": {"dir": "wandb-runs"}}}, "tracking.wandb.dir"),
    ({"tracking": {"wandb": {"project": "p" * 129}}}, "tracking.wandb.project"),
    ({"notify": {"webhook": "file:///etc/passwd"}}, "notify.webhook"),
    ({"search": {"algorithm": "tpe", "space": {"optim.lr": {"grid": [0.1]}}}}, "search.algorithm"),
]


@pytest.mark.parametrize("body,field", MALFORMED, ids=[f for _, f in MALFORMED])
def test_malformed_specs_are_422_naming_the_field(api: Api, body: dict, field: str) -> None:
    resp = api.post(body)
    assert resp.status_code == 422, resp.text
    err = error(resp)
    assert err["code"] in ("invalid_spec", "invalid_request")
    fields = [d["field"] for d in err["details"]]
    assert field in fields, (field, err)
    assert all(d["message"] for d in err["details"])
    assert "Traceback" not in resp.text


@pytest.mark.parametrize(
    "raw,ctype",
    [
        ("{not json", "application/json"),
        ("[1, 2]", "application/json"),
        ("null", "application/json"),
        ("preset=debug", "text/plain"),
        ("", None),
    ],
)
def test_bodies_that_are_not_a_json_object_are_422(api: Api, raw: str, ctype: str | None) -> None:
    headers = {**api.headers(), **({"Content-Type": ctype} if ctype else {})}
    resp = api.client.post("/v1/jobs", content=raw, headers=headers)
    assert resp.status_code == 422, resp.text
    assert error(resp)["details"]


def test_submit_returns_the_resolved_spec(api: Api) -> None:
    resp = api.post({"preset": "debug", "overrides": {"optim.epochs": 3}})
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["state"] == "QUEUED" and job["owner"] == "admin" and job["attempts"] == 0
    assert job["spec"]["optim"]["epochs"] == 3 and job["spec"]["scaling"]["num_workers"] == 2
    assert job["progress"] == {"epoch": 0, "epochs": 3, "eta_seconds": None}
    full = api.post({"optim": {"epochs": 4, "batch_size": 64}, "scaling": {"num_workers": 2}})
    assert full.status_code == 201 and full.json()["spec"]["optim"]["epochs"] == 4


def test_a_tracking_store_under_the_data_roots_is_accepted(api: Api) -> None:
    store = f"sqlite:///{api.settings.data_dir}/datasets/mlflow/mlflow.db"
    resp = api.post({"preset": "debug", "overrides": {"tracking": {"mlflow": {"tracking_uri": store}}}})
    assert resp.status_code == 201, resp.text
    assert resp.json()["spec"]["tracking"]["mlflow"] == {"tracking_uri": store, "experiment": "trainctl"}
    wandb_dir = f"{api.settings.data_dir}/datasets/wandb"
    resp = api.post({"preset": "debug", "overrides": {"tracking": {"wandb": {"project": "cifar", "dir": wandb_dir}}}})
    assert resp.status_code == 201, resp.text
    assert resp.json()["spec"]["tracking"]["wandb"] == {"project": "cifar", "mode": "offline", "dir": wandb_dir}


def test_auth(api: Api) -> None:
    assert error(api.client.get("/v1/jobs"))["code"] == "unauthorized"
    resp = api.client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert api.client.get("/v1/jobs", headers={"Authorization": f"Basic {api.token}"}).status_code == 401
    assert api.client.post("/v1/jobs", json=DEBUG_JOB).status_code == 401
    assert api.get("/v1/jobs").status_code == 200
    # only the hash is stored; the file is private
    mode = stat.S_IMODE(api.settings.admin_token_path.stat().st_mode)
    assert mode == 0o600
    if api.settings.store_url.startswith("sqlite"):
        db = b"".join(p.read_bytes() for p in api.settings.data_dir.glob("trainctl.db*"))  # + WAL
        assert api.token.encode() not in db and hashlib.sha256(api.token.encode()).hexdigest().encode() in db
    else:
        from sqlalchemy import create_engine, text

        engine = create_engine(api.settings.store_url)
        with engine.connect() as conn:
            hashes = [r[0] for r in conn.execute(text("SELECT token_hash FROM tokens"))]
        engine.dispose()
        assert api.token not in hashes and hashlib.sha256(api.token.encode()).hexdigest() in hashes


def test_other_owners_jobs_are_404(api: Api) -> None:
    job_id = api.post(DEBUG_JOB).json()["id"]
    resp = api.client.post("/v1/tokens", json={"name": "bob"}, headers=api.headers())
    assert resp.status_code == 201
    bob = resp.json()["token"]
    for method, path in [
        ("GET", ""),
        ("GET", "/metrics"),
        ("GET", "/logs"),
        ("POST", "/cancel"),
        ("GET", "/checkpoints"),
        ("GET", "/checkpoints/best"),
        ("DELETE", ""),
    ]:
        r = api.client.request(method, f"/v1/jobs/{job_id}{path}", headers=api.headers(bob))
        assert r.status_code == 404 and error(r)["code"] == "not_found", (method, path, r.text)
    assert api.get("/v1/jobs", headers=api.headers(bob)).json()["total"] == 0
    # bob is not admin: cannot mint tokens; names are unique
    assert api.client.post("/v1/tokens", json={"name": "eve"}, headers=api.headers(bob)).status_code == 403
    assert api.client.post("/v1/tokens", json={"name": "bob"}, headers=api.headers()).status_code == 409
    assert api.client.post("/v1/tokens", json={"name": "a b"}, headers=api.headers()).status_code == 422


def test_idempotency_key(api: Api) -> None:
    h = {"Idempotency-Key": "abc-1"}
    first = api.post(DEBUG_JOB, headers=h)
    reordered = {"overrides": {"optim.epochs": 2}, "preset": "debug"}
    again = api.post(reordered, headers=h)
    assert first.status_code == again.status_code == 201 and first.json()["id"] == again.json()["id"]
    conflict = api.post({"preset": "debug", "overrides": {"optim.epochs": 3}}, headers=h)
    assert conflict.status_code == 409 and error(conflict)["code"] == "idempotency_conflict"
    assert api.get("/v1/jobs").json()["total"] == 1
    assert api.post(DEBUG_JOB).json()["id"] != first.json()["id"]  # no key: a new job


def test_list_filter_and_pagination(api: Api) -> None:
    ids = [api.post(DEBUG_JOB).json()["id"] for _ in range(3)]
    api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=api.headers())
    page = api.get("/v1/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    assert [j["id"] for j in api.get("/v1/jobs", params={"state": "CANCELLED"}).json()["jobs"]] == [ids[0]]
    both = api.get("/v1/jobs", params=[("state", "cancelled"), ("state", "QUEUED")]).json()
    assert both["total"] == 3
    bad = api.get("/v1/jobs", params={"state": "DONE", "limit": 0})
    assert bad.status_code == 422 and {d["field"] for d in error(bad)["details"]} == {"query.state.0", "query.limit"}


def test_cancel_queued_is_idempotent_and_final(api: Api) -> None:
    job_id = api.post(DEBUG_JOB).json()["id"]
    for _ in range(2):
        resp = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())
        assert resp.status_code == 200 and resp.json()["state"] == "CANCELLED"
    api.reconcile()
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "CANCELLED"
    assert api.ray.jobs == {}  # never submitted


def test_delete(api: Api) -> None:
    job_id = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()  # submitted: writes spec.json
    assert (api.job_dir(job_id) / "spec.json").exists()
    resp = api.client.delete(f"/v1/jobs/{job_id}", headers=api.headers())
    assert resp.status_code == 409 and error(resp)["code"] == "job_not_finished"
    api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert api.client.delete(f"/v1/jobs/{job_id}", headers=api.headers()).status_code == 204
    assert not api.job_dir(job_id).exists()
    assert api.get(f"/v1/jobs/{job_id}").status_code == 404
    assert api.client.delete(f"/v1/jobs/{job_id}", headers=api.headers()).status_code == 404


def test_unknown_routes_and_methods_use_the_error_shape(api: Api) -> None:
    assert error(api.get("/v1/nope"))["code"] == "not_found"
    r = api.client.put("/v1/jobs", headers=api.headers())
    assert r.status_code == 405 and error(r)["code"] == "method_not_allowed"
    assert api.get("/v1/jobs/x" * 40).status_code in (404, 422)


def test_unexpected_errors_are_a_generic_500(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(api.runner.store, "list", boom)
    resp = api.get("/v1/jobs")
    assert resp.status_code == 500 and error(resp)["code"] == "internal_error"
    assert "secret" not in resp.text and "Traceback" not in resp.text


def test_healthz_names_what_is_down_to_the_admin_only(api: Api) -> None:
    resp = api.client.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
    api.ray.down = True
    resp = api.client.get("/healthz")
    # unauthenticated: only ok/degraded, never the error text (Ray address, S3 endpoint, bucket)
    assert resp.status_code == 503 and resp.json() == {"status": "degraded"}
    resp = api.client.get("/healthz", headers=api.headers())
    assert resp.status_code == 503 and resp.json()["down"] == ["ray"]


def test_ray_down_is_503_not_500(api: Api) -> None:
    job_id = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()
    api.ray.down = True
    resp = api.get(f"/v1/jobs/{job_id}/logs")
    assert resp.status_code == 503 and error(resp)["code"] == "ray_unavailable"
    api.reconcile()  # survives, learns nothing
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "STARTING"


def test_no_auth_mode(make_api) -> None:
    api = make_api(auth=False)
    resp = api.client.post("/v1/jobs", json=DEBUG_JOB, headers={"Host": "127.0.0.1:8000"})
    assert resp.status_code == 201 and resp.json()["owner"] == "local"
    assert not api.settings.admin_token_path.exists()
    assert api.client.get("/v1/jobs", headers={"Host": "localhost:8000"}).status_code == 200
    # DNS rebinding: a page on evil.example (resolving to 127.0.0.1) must not drive an unauthenticated API
    resp = api.client.post("/v1/jobs", json=DEBUG_JOB, headers={"Host": "evil.example:8000"})
    assert resp.status_code == 400 and error(resp)["code"] == "bad_host"
    assert api.client.get("/v1/jobs", headers={"Host": "testserver"}).status_code == 400


def test_no_auth_only_on_a_loopback_host(make_api) -> None:
    with pytest.raises(ValueError, match="loopback"):
        make_api(auth=False, host="0.0.0.0")


def test_openapi_docs(api: Api) -> None:
    assert api.client.get("/docs").status_code == 200
    paths = api.client.get("/openapi.json").json()["paths"]
    assert "/v1/jobs/{job_id}/checkpoints/best" in paths


def test_metrics_logs_checkpoints(api: Api) -> None:
    job_id = api.post({"preset": "debug", "overrides": {"optim.epochs": 5}}).json()["id"]
    assert api.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"] == []
    r = api.get(f"/v1/jobs/{job_id}/checkpoints/best")
    assert r.status_code == 409 and error(r)["code"] == "no_checkpoint"
    api.reconcile()
    d = api.job_dir(job_id)
    rows = [
        {
            "epoch": e,
            "train_loss": 1.0,
            "train_acc": 0.1,
            "val_loss": 1.0,
            "val_acc": 0.1 * e,
            "lr": 0.05,
            "images_per_s": 100.0,
            "epoch_seconds": 4.0,
            "time": 1e9 + e,
            "resumed": e == 2,
            "node_ids": ["n1", "n2"],
        }
        for e in (1, 2)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 3, "tor')
    sub = f"{job_id}-1"
    api.ray.set(sub, "RUNNING")
    api.reconcile()
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "RUNNING" and job["progress"]["epoch"] == 2 and job["metrics"]["val_acc"] == 0.2
    assert job["progress"] == {"epoch": 2, "epochs": 5, "eta_seconds": 12.0}  # 3 epochs x 4 s left
    assert job["best_val_acc"] == 0.2
    m = api.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"]
    assert [r["epoch"] for r in m] == [1, 2]
    csv = api.get(f"/v1/jobs/{job_id}/metrics", params={"format": "csv"})
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.strip().splitlines()
    assert lines[0].startswith("epoch,train_loss") and len(lines) == 3 and "n1;n2" in lines[1]
    assert api.get(f"/v1/jobs/{job_id}/logs", params={"tail": 2}).text == "line 9\nline 10\n"
    # checkpoints
    ckpt = d / job_id / "epoch_0002" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    payload = b"x" * 3_000_000
    ckpt.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    (d / "manifest.json").write_text(
        json.dumps(
            {
                "checkpoints": [{"epoch": 2, "val_acc": 0.2, "uri": str(ckpt), "sha256": sha, "size": len(payload)}],
                "latest_epoch": 2,
            }
        )
    )
    assert api.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"] == [
        {"epoch": 2, "val_acc": 0.2, "size": len(payload), "sha256": sha}
    ]
    r = api.get(f"/v1/jobs/{job_id}/checkpoints/best")
    assert r.status_code == 200 and r.headers["x-checkpoint-sha256"] == sha and r.content == payload
    ckpt.write_bytes(payload[:-1] + b"y")  # corrupted in storage
    r = api.get(f"/v1/jobs/{job_id}/checkpoints/best")
    assert r.status_code == 502 and error(r)["code"] == "checkpoint_corrupt"
    ckpt.unlink()
    r = api.get(f"/v1/jobs/{job_id}/checkpoints/best")
    assert r.status_code == 502 and error(r)["code"] == "checkpoint_corrupt"


def test_random_bodies_never_500(api: Api) -> None:
    """A seeded fuzz over override paths and values: every answer is 201 or 422, never a 500."""
    import random

    rng = random.Random(1234)
    paths = [
        "optim.lr",
        "optim.epochs",
        "model.widths",
        "model.widths.0",
        "model",
        "scaling.num_workers",
        "search",
        "search.space",
        "search.space.optim.lr",
        "seed",
        "seed.x",
        "",
        ".",
        "data.train",
        "checkpoint.max_restarts",
        "precision",
        "channels_last",
        "schedule.kind",
        "x" * 300,
    ]
    values = [
        None,
        True,
        0,
        -1,
        1,
        3,
        2**70,
        1e308,
        0.5,
        "",
        "x",
        [],
        [1, 2],
        [[1]],
        {},
        {"a": 1},
        {"choice": [0.1, 0.2]},
        {"loguniform": [0, 1]},
        {"randint": [5, 1]},
        {"grid": []},
        {"optim.lr": {"uniform": [0.1, 0.01]}},
        {"space": {"optim.lr": {"choice": ["a"]}}},
    ]
    for _ in range(300):
        overrides = {rng.choice(paths): rng.choice(values) for _ in range(rng.randint(1, 3))}
        body = rng.choice(
            [
                {"preset": rng.choice(["debug", "paper", None, "nope"]), "overrides": overrides},
                {k.split(".")[0] or "k": v for k, v in overrides.items()},
            ]
        )
        resp = api.post(body)
        assert resp.status_code in (201, 422), (body, resp.text)
        if resp.status_code == 422:
            assert error(resp)["details"], body


def test_our_own_validation_bugs_are_500_not_422(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValidationError from one of our response models is a server bug, not the client's bad spec."""
    from service.api import jobs

    def broken_view(*a, **k):
        from service.api.schemas import Progress

        return Progress(epoch="not a number", epochs=None, eta_seconds=None)

    monkeypatch.setattr(jobs, "job_view", broken_view)
    resp = api.post(DEBUG_JOB)
    assert resp.status_code == 500 and error(resp)["code"] == "internal_error"


def _scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    assert api.client.get("/metrics").status_code == 401  # job ids and owners: the admin's only
    resp = api.client.get("/metrics", headers=api.headers())
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain"), resp.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(resp.text)
        for s in fam.samples
    }


def test_prometheus_metrics_parse_and_move_when_a_job_finishes(api: Api) -> None:
    before = _scrape(api)
    assert before[("trainctl_jobs", (("state", "SUCCEEDED"),))] == 0
    job_id = api.post({"preset": "debug", "overrides": {"optim.epochs": 2}}).json()["id"]
    queued = api.post(DEBUG_JOB).json()["id"]
    api.post(DEBUG_JOB)
    m = _scrape(api)
    assert m[("trainctl_jobs", (("state", "QUEUED"),))] == 3
    assert m[("trainctl_queue_depth", (("owner", "admin"),))] == 3
    api.reconcile()  # two slots: two jobs start
    sub = f"{job_id}-1"
    api.ray.set(sub, "RUNNING")
    job_dir = api.job_dir(job_id)
    (job_dir / "metrics.jsonl").write_text(metrics_line(1, 0.4, images_per_s=1234.5))
    api.reconcile()
    m = _scrape(api)
    labels = (("job_id", job_id), ("owner", "admin"))
    assert m[("trainctl_job_epochs_finished", labels)] == 1
    assert m[("trainctl_job_train_images_per_second", labels)] == 1234.5
    assert m[("trainctl_jobs", (("state", "RUNNING"),))] == 1
    assert m[("trainctl_queue_depth", (("owner", "admin"),))] == 1
    assert m[("trainctl_reconciler_leader", ())] in (0, 1)
    # The run succeeds: the counts move, the job's progress series go away.
    (job_dir / "summary.json").write_text('{"state": "succeeded", "best_val_acc": 0.4, "epochs_completed": 1}')
    api.ray.set(sub, "SUCCEEDED", exit_code=0)
    api.reconcile()
    after = _scrape(api)
    assert after[("trainctl_jobs", (("state", "SUCCEEDED"),))] == 1
    assert ("trainctl_job_epochs_finished", labels) not in after
    assert ("trainctl_job_train_images_per_second", labels) not in after
    # Latency histograms are labelled by route template, never by a raw job id.
    assert (
        after[
            (
                "trainctl_http_request_duration_seconds_count",
                (("method", "POST"), ("route", "/v1/jobs"), ("status", "201")),
            )
        ]
        == 3
    )
    routes = {dict(k[1]).get("route") for k in after if k[0].startswith("trainctl_http_request")}
    assert "/metrics" in routes and not any(job_id in (r or "") for r in routes)
    # Ray refusing a submission is counted (nothing active, one job waiting).
    for job in api.get("/v1/jobs").json()["jobs"]:
        api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers())
    assert queued and api.post(DEBUG_JOB).status_code == 201
    assert after[("trainctl_ray_submission_errors_total", ())] == 0
    api.ray.down = True
    api.reconcile()
    assert _scrape(api)[("trainctl_ray_submission_errors_total", ())] == 1


def test_job_record_is_mirrored_into_the_job_directory(api: Api) -> None:
    import json as _json

    job_id = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()
    record = _json.loads((api.job_dir(job_id) / "record.json").read_text())
    assert record["id"] == job_id and record["owner"] == "admin" and record["state"] == "STARTING"
    assert record["attempts"] == 1 and record["attempt_log"][0]["submission_id"] == f"{job_id}-1"
    api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert _json.loads((api.job_dir(job_id) / "record.json").read_text())["state"] == "CANCELLED"


def test_alert_rules_and_scrape_config_name_metrics_the_service_exports(api: Api) -> None:
    """cluster/prometheus/: valid YAML of the expected shape, and every trainctl_* series an alert uses is
    one that /metrics really exports (a renamed metric would silently disable an alert)."""
    import re
    from pathlib import Path

    import yaml
    from prometheus_client.parser import text_string_to_metric_families

    root = Path(__file__).resolve().parents[2] / "cluster" / "prometheus"
    config = yaml.safe_load((root / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and config["rule_files"] == ["alerts.yml"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    rules = [r for g in yaml.safe_load((root / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert len(rules) >= 6 and all({"alert", "expr", "annotations"} <= set(r) for r in rules)
    # A job in every state, one running with progress: every family is present in the scrape.
    job_id = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    (api.job_dir(job_id) / "metrics.jsonl").write_text(metrics_line(1, 0.1))
    api.reconcile()
    for _ in range(2):  # the second slot fills, the last one waits in the queue
        api.post(DEBUG_JOB)
    api.reconcile()
    exported = {
        s.name
        for fam in text_string_to_metric_families(api.client.get("/metrics", headers=api.headers()).text)
        for s in fam.samples
    }
    used = {name for r in rules for name in re.findall(r"\btrainctl_[a-z_]+", r["expr"])}
    assert used and used <= exported, used - exported
