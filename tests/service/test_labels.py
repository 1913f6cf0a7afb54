"""Job labels (name, project, tags), the list's filters and sort keys, strict query parameters, and resubmit:
in the store and through the HTTP API, on SQLite and PostgreSQL (database_url)."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import text

from service.engine.states import JobState
from service.engine.store import JobFilter, Labels, Store
from tests.service.conftest import DEBUG_JOB, Api
from trainer.spec import JobSpec

SPEC = JobSpec()  # the store takes a validated spec (service/engine/store.py)


@pytest.fixture
def store(database_url: str) -> Store:
    s = Store(database_url)
    s.create_schema()
    yield s
    s.close()


def _ids(jobs) -> list[str]:
    return [j.id for j in jobs]


def test_store_filters_by_tags_project_name_since_and_sorts(store: Store) -> None:
    a, _ = store.create_job("alice", SPEC, labels=Labels("resnet lr_0.1", "cifar", ("base", "lr")))
    b, _ = store.create_job("alice", SPEC, labels=Labels("resnet lr 0.01", "cifar", ("lr",)))
    c, _ = store.create_job("alice", SPEC, labels=Labels("adam 100%", "other", ("base",)))
    d, _ = store.create_job("alice", SPEC)  # no labels at all
    store.create_job("bob", SPEC, labels=Labels("resnet", "cifar", ("base", "lr")))  # another owner's
    assert store.get(a.id).tags == ["base", "lr"] and store.get(a.id).project == "cifar"

    def ids(**where) -> list[str]:
        return _ids(store.list(owner="alice", where=JobFilter(**where))[0])

    assert ids() == [d.id, c.id, b.id, a.id]  # newest first
    assert ids(tags=("base",)) == [c.id, a.id]
    assert ids(tags=("base", "lr")) == [a.id]  # every tag given
    assert ids(tags=("nope",)) == []
    assert ids(project="cifar") == [b.id, a.id]
    assert ids(name="RESNET") == [b.id, a.id]  # substring, any case
    assert ids(name="lr_") == [a.id]  # LIKE's wildcards are literal
    assert ids(name="100%") == [c.id]
    assert ids(name="resnet", tags=("base",)) == [a.id]
    assert ids(since=time.time() + 60) == []
    assert ids(since=c.created_at) == [d.id, c.id]
    assert ids(sort="name") == [c.id, b.id, a.id, d.id]  # A-Z, unnamed last
    store.transition(b.id, JobState.CANCELLED, best_val_acc=0.7)
    store.transition(c.id, JobState.CANCELLED, best_val_acc=0.9)
    assert ids(sort="best_val_acc") == [c.id, b.id, d.id, a.id]  # highest first; none: newest first
    page, total = store.list(owner="alice", limit=1, where=JobFilter(tags=("base",)))
    assert total == 2 and len(page) == 1
    with pytest.raises(ValueError, match="sort"):
        store.list(where=JobFilter(sort="bogus"))
    # Deleting a job deletes its tag rows (SQLite does not enforce the foreign key's cascade here).
    assert store.delete(c.id)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM job_tags WHERE job_id = :i"), {"i": c.id}).scalar() == 0


def test_tag_and_project_filters_use_indexes(store: Store) -> None:
    if store.dialect != "sqlite":
        pytest.skip("the query plan is checked on SQLite; PostgreSQL's planner picks by table statistics")
    store.create_job("alice", SPEC, labels=Labels(None, "p", ("t",)))
    with store.engine.connect() as conn:
        plan = " ".join(
            str(r[-1])
            for r in conn.execute(
                text(
                    "EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE project = 'p' AND id IN "
                    "(SELECT job_id FROM job_tags WHERE tag = 't') ORDER BY seq DESC"
                )
            )
        )
    assert "ix_job_tags_tag" in plan and ("ix_jobs_project" in plan or "ix_jobs_id" in plan), plan


# --- the HTTP API ---------------------------------------------------------------------------------------------


def _submit(api: Api, **labels) -> dict:
    resp = api.post({**DEBUG_JOB, **labels})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_labels_are_stored_shown_and_filter_the_list(api: Api) -> None:
    one = _submit(api, name="baseline run", project="cifar", tags=["base", "sgd"])
    assert (one["name"], one["project"], one["tags"], one["parent"]) == ("baseline run", "cifar", ["base", "sgd"], None)
    assert api.get(f"/v1/jobs/{one['id']}").json()["tags"] == ["base", "sgd"]
    two = _submit(api, name="adam", project="cifar", tags=["sgd"])
    full = api.post({"optim": {"epochs": 1}, "name": "full spec", "tags": ["x"]})  # labels beside a full spec
    assert full.status_code == 201 and full.json()["name"] == "full spec", full.text

    def listed(query: str) -> list[str]:
        resp = api.get(f"/v1/jobs?{query}")
        assert resp.status_code == 200, resp.text
        return [j["name"] for j in resp.json()["jobs"]]

    assert listed("tag=sgd") == ["adam", "baseline run"]
    assert listed("tag=sgd&tag=base") == ["baseline run"]
    assert listed("project=cifar&name=ADA") == ["adam"]
    assert listed("sort=name") == ["adam", "baseline run", "full spec"]
    assert listed("since=2000-01-01T00:00:00Z&state=queued&tag=x") == ["full spec"]
    assert listed("since=4102444800") == []  # unix seconds (2100)
    assert two["id"] in [j["id"] for j in api.get("/v1/jobs?tag=sgd").json()["jobs"]]


@pytest.mark.parametrize(
    "labels,field",
    [
        ({"tags": ["x" * 65]}, "tags.0"),
        ({"tags": ["ok", "new\nline"]}, "tags.1"),
        ({"tags": ["\x1b[31mred"]}, "tags.0"),
        ({"tags": [f"t{i}" for i in range(33)]}, "tags"),
        ({"tags": ["ok"], "labels": 1}, "labels"),
        ({"tags": "base"}, "tags"),
        ({"name": "x" * 129}, "name"),
        ({"name": " padded"}, "name"),
        ({"project": "a\tb"}, "project"),
    ],
    ids=["long-tag", "newline", "escape", "33-tags", "unknown-key", "not-a-list", "long-name", "padded", "tab"],
)
def test_bad_labels_are_422_naming_the_field(api: Api, labels: dict, field: str) -> None:
    resp = api.post({**DEBUG_JOB, **labels})
    assert resp.status_code == 422, resp.text
    assert field in [d["field"] for d in resp.json()["error"]["details"]], resp.json()
    assert api.get("/v1/jobs").json()["total"] == 0  # nothing half-written


@pytest.mark.parametrize(
    "path,field",
    [
        ("/v1/jobs?q=debug", "query.q"),
        ("/v1/jobs?tga=x&tag=y", "query.tga"),
        ("/v1/jobs?sort=bogus", "query.sort"),
        ("/v1/jobs?since=yesterday", "query.since"),
        ("/v1/tokens?bogus=1", "query.bogus"),
    ],
)
def test_unknown_query_parameters_and_bad_values_are_422_naming_them(api: Api, path: str, field: str) -> None:
    resp = api.get(path)
    assert resp.status_code == 422, resp.text
    assert field in [d["field"] for d in resp.json()["error"]["details"]], resp.json()


def test_unknown_query_parameter_on_a_job_route(api: Api) -> None:
    job = _submit(api)
    resp = api.get(f"/v1/jobs/{job['id']}/logs?tial=3")
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"] == "query.tial", resp.text
    assert api.get(f"/v1/jobs/{job['id']}/metrics?format=csv").status_code == 200  # an alias is known
    # the PNGs are exempt: the dashboard's <img> adds a cache buster (409: no epoch yet, not 422)
    assert api.get(f"/v1/jobs/{job['id']}/plots/confusion.png?t=1").status_code == 409


def test_resubmit_applies_overrides_and_records_the_parent(api: Api) -> None:
    first = _submit(api, name="base", project="cifar", tags=["a"])
    resp = api.client.post(
        f"/v1/jobs/{first['id']}/resubmit",
        json={"overrides": {"optim.lr": 0.01}, "name": "lower lr"},
        headers=api.headers(),
    )
    assert resp.status_code == 201, resp.text
    second = resp.json()
    assert second["parent"] == first["id"] and second["id"] != first["id"]
    assert second["name"] == "lower lr" and (second["project"], second["tags"]) == ("cifar", ["a"])  # inherited
    assert second["spec"]["optim"]["lr"] == 0.01
    assert {**second["spec"], "optim": None} == {**first["spec"], "optim": None}  # nothing else changed
    assert resp.headers["Location"] == f"/v1/jobs/{second['id']}"
    bad = api.client.post(
        f"/v1/jobs/{first['id']}/resubmit", json={"overrides": {"optim.lr": -1}}, headers=api.headers()
    )
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "optim.lr", bad.text
    bad = api.client.post(f"/v1/jobs/{first['id']}/resubmit", json={"tags": ["a\n"]}, headers=api.headers())
    assert bad.status_code == 422 and "tags.0" in bad.text, bad.text
    missing = api.client.post("/v1/jobs/nope/resubmit", json={}, headers=api.headers())
    assert missing.status_code == 404
    assert api.get("/v1/jobs").json()["total"] == 2


# --- the CLI, through the real app (in process) ---------------------------------------------------------------


@pytest.fixture
def cli_on(api: Api, monkeypatch: pytest.MonkeyPatch):
    from service.client import http
    from service.client.cli import common, main

    monkeypatch.setattr(
        common,
        "client",
        lambda args, timeout=30, retry=True: http.TrainctlClient(
            "http://testserver", api.token, transport=api.client._transport
        ),
    )

    def run(*argv: str) -> int:
        with pytest.raises(SystemExit) as exc:
            main.main(list(argv))
        return int(exc.value.code)

    return run


def test_cli_submit_list_filters_and_resubmit(api: Api, cli_on, capsys) -> None:
    assert cli_on("submit", "--preset", "debug", "--name", "base", "--project", "cifar", "--tag", "a", "-q") == 0
    first = capsys.readouterr().out.strip()
    assert cli_on("submit", "--preset", "debug", "--name", "other", "--tag", "a", "--tag", "b", "-q") == 0
    capsys.readouterr()
    assert cli_on("list", "--tag", "a", "--tag", "b", "--json") == 0
    assert [j["name"] for j in json.loads(capsys.readouterr().out)["jobs"]] == ["other"]
    assert cli_on("list", "--project", "cifar", "--since", "1h", "--sort", "name") == 0
    out = capsys.readouterr().out
    assert "base" in out and "#a" in out and "other" not in out
    assert cli_on("resubmit", first, "--set", "optim.lr=0.02", "--name", "base lr 0.02", "--json") == 0
    child = json.loads(capsys.readouterr().out)
    assert child["parent"] == first and child["spec"]["optim"]["lr"] == 0.02 and child["tags"] == ["a"]
    assert cli_on("status", child["id"]) == 0
    out = capsys.readouterr().out
    assert f"parent    {first}" in out and "project cifar" in out
    assert cli_on("submit", "--preset", "debug", "--tag", "x" * 65) == 8  # invalid request
    assert "tags.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a --since that is neither a duration nor a date: usage error
        from service.client.cli import main

        main.main(["list", "--since", "yesterday"])
    assert exc.value.code == 2


# --- the dashboard's pages (their script is exercised in Chromium: tests/service/test_browser.py) --------------


def test_dashboard_shows_labels_parent_resubmit_and_compare_pages(api: Api) -> None:
    from tests.service.test_ui import login

    login(api)
    first = _submit(api, name="base <b>", project="cifar", tags=["t1"])
    child = api.client.post(f"/v1/jobs/{first['id']}/resubmit", json={}, headers=api.headers()).json()
    page = api.client.get(f"/ui/jobs/{child['id']}")
    assert page.status_code == 200
    assert "base &lt;b&gt;" in page.text and '<span class="tag">t1</span>' in page.text  # escaped
    assert f'id="job-parent" href="/ui/jobs/{first["id"]}"' in page.text and 'id="resubmit-button"' in page.text
    rows = api.client.get("/ui/api/jobs").json()["jobs"]
    assert [(r["name"], r["project"], r["tags"]) for r in rows] == [("base <b>", "cifar", ["t1"])] * 2
    compare = api.client.get(f"/ui/compare?ids={first['id']},{child['id']}")
    assert compare.status_code == 200 and f'data-ids="{first["id"]},{child["id"]}"' in compare.text
    assert 'id="compare-button"' in api.client.get("/ui/").text
