"""Comparing runs: the shared module (service/api/comparison.py), GET /v1/compare(.png) and `trainctl compare`,
through the real app (SQLite and PostgreSQL) over a fake Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.api.comparison import flatten, parse_ids, spec_differences
from service.client import http
from service.client.cli import common, main
from tests.service.conftest import Api, metrics_line


def test_flatten_and_differences() -> None:
    assert flatten({"optim": {"lr": 0.1, "milestones": [1, 2]}, "seed": 0, "x": {}}) == {
        "optim.lr": 0.1,
        "optim.milestones": [1, 2],
        "seed": 0,
        "x": {},
    }
    diffs = spec_differences([{"optim": {"lr": 0.1, "m": 0.9}}, {"optim": {"lr": 0.01, "m": 0.9}, "extra": 1}])
    assert [(d.path, d.values) for d in diffs] == [("extra", [None, 1]), ("optim.lr", [0.1, 0.01])]
    assert parse_ids(" a, b,a ") == ["a", "b"]
    for bad in ("a", "a,a", "a,b,c,d,e,f", ""):
        with pytest.raises(ValueError, match="2 to 5"):
            parse_ids(bad)


def _two_runs(api: Api) -> tuple[str, str]:
    a = api.post({"preset": "debug", "overrides": {"optim.epochs": 3}, "name": "base"}).json()["id"]
    b = api.post({"preset": "debug", "overrides": {"optim.epochs": 3, "optim.lr": 0.01}}).json()["id"]
    api.reconcile()
    for job_id, accs in ((a, (0.3, 0.5, 0.4)), (b, (0.2, 0.6))):
        lines = "".join(metrics_line(e, acc) for e, acc in enumerate(accs, start=1))
        (api.job_dir(job_id) / "metrics.jsonl").write_text(lines)
    return a, b


def test_compare_api_json_png_and_errors(api: Api) -> None:
    a, b = _two_runs(api)
    resp = api.get(f"/v1/compare?ids={a},{b}")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    first, second = body["jobs"]
    assert (first["id"], first["name"], second["id"]) == (a, "base", b)
    assert first["final"]["val_acc"] == 0.4 and first["best"]["val_acc"] == 0.5 and first["best"]["val_acc_epoch"] == 2
    assert second["epochs_done"] == 2 and second["series"]["val_acc"] == [0.2, 0.6]
    assert first["series"]["epoch"] == [1, 2, 3]
    assert [d["path"] for d in body["spec_differences"]] == ["optim.lr"]
    lrs = body["spec_differences"][0]["values"]
    assert lrs[1] == 0.01 and lrs[0] != 0.01
    png = api.get(f"/v1/compare.png?ids={a},{b}")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG") and len(png.content) > 10_000
    for query, status, field in (
        (f"ids={a}", 422, "query.ids"),
        (f"ids={a},{a}", 422, "query.ids"),
        ("ids=a,b,c,d,e,f", 422, "query.ids"),
        (f"ids={a},{b}&sort=x", 422, "query.sort"),
    ):
        resp = api.get(f"/v1/compare?{query}")
        assert resp.status_code == status and field in [d["field"] for d in resp.json()["error"]["details"]], resp.text
    missing = api.get(f"/v1/compare?ids={a},nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


def test_compare_hides_other_owners_jobs(make_api) -> None:
    api = make_api()
    a, b = _two_runs(api)
    bob = api.client.post("/v1/tokens", json={"name": "bob"}, headers=api.headers()).json()["token"]
    mine = api.client.post("/v1/jobs", json={"preset": "debug"}, headers=api.headers(bob)).json()["id"]
    resp = api.get(f"/v1/compare?ids={mine},{a}", headers=api.headers(bob))
    assert resp.status_code == 404 and a in resp.text  # the same answer as a job that does not exist


def test_cli_compare_prints_side_by_side_and_writes_the_plot(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    a, b = _two_runs(api)
    monkeypatch.setattr(
        common,
        "client",
        lambda args, timeout=30, retry=True: http.TrainctlClient(
            "http://testserver", api.token, transport=api.client._transport
        ),
    )
    out_png = tmp_path / "cmp.png"
    with pytest.raises(SystemExit) as exc:
        main.main(["compare", a, b, "--plot", str(out_png)])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"base ({a[:6]})" in out and b in out
    assert "best val_acc         0.5000 (epoch 2)" in out
    assert "spec differences (1):" in out and "optim.lr" in out and "0.01" in out
    assert out_png.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit) as exc:
        main.main(["compare", a, "--json"])
    assert exc.value.code == common.EXIT_USAGE
    with pytest.raises(SystemExit) as exc:
        main.main(["compare", a, b, "--json"])
    assert json.loads(capsys.readouterr().out)["jobs"][0]["id"] == a
