"""Issue 10, tried as an attacker with an ordinary user token: each attack is refused with a 4xx naming the
field or the limit (and loses nothing), over the real app, SQLite and local storage with a fake Ray."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

import pytest

from service.engine.runner import fair_queue, over_time_limit
from service.engine.states import JobState
from service.engine.store import Job
from tests.service.conftest import DEBUG_JOB, Api
from trainer.spec import JobSpec


def error(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    return body["error"]


def fields(resp) -> list[str]:
    return [d["field"] for d in error(resp)["details"]]


def user_token(api: Api, name: str = "mallory", **extra) -> str:
    resp = api.client.post("/v1/tokens", json={"name": name, **extra}, headers=api.headers())
    assert resp.status_code == 201, resp.text
    return resp.json()["token"]


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    """A data root holding one real file, and an api whose TRAINCTL_DATA_ROOTS is that root."""
    root = tmp_path / "datasets"
    root.mkdir()
    (root / "train.parquet").write_bytes(b"PAR1")
    return root


@pytest.fixture
def rapi(make_api, roots: Path) -> Api:
    return make_api(data_roots=str(roots))


def submit_data(api: Api, train: str, token: str | None = None, **more) -> object:
    return api.post(
        {"preset": "debug", "overrides": {"data.train": train, **more}}, headers=api.headers(token) if token else {}
    )


# --- 1. data only from where the operator allows ------------------------------------------------------------


def test_data_outside_the_roots_is_a_422_naming_the_field(rapi: Api, roots: Path, tmp_path: Path) -> None:
    token = user_token(rapi)
    outside = tmp_path / "elsewhere.parquet"
    outside.write_bytes(b"PAR1")
    (roots / "escape").symlink_to(tmp_path)  # a symlink inside the root pointing out of it
    for train in (
        "/etc/passwd",
        str(outside),
        f"{roots}/../elsewhere.parquet",
        f"file://{outside}",
        f"file://{roots}/../elsewhere.parquet",
        f"{roots}/escape/elsewhere.parquet",
        "s3://someone-elses-bucket/train.parquet",
        "~/../../etc/passwd",
    ):
        resp = submit_data(rapi, train, token)
        assert resp.status_code == 422, (train, resp.text)
        assert fields(resp) == ["data.train"], (train, resp.text)
        assert "outside the data roots" in resp.text and "TRAINCTL_DATA_ROOTS" in resp.text
    resp = submit_data(rapi, str(roots / "train.parquet"), token, **{"data.test": "/etc/shadow"})
    assert resp.status_code == 422 and fields(resp) == ["data.test"], resp.text
    assert rapi.client.get("/v1/jobs", headers=rapi.headers()).json()["total"] == 0  # nothing half-written


def test_data_inside_the_roots_is_accepted(rapi: Api, roots: Path) -> None:
    for train in (str(roots / "train.parquet"), f"file://{roots}/train.parquet", f"{roots}/sub/../train.parquet"):
        resp = submit_data(rapi, train)
        assert resp.status_code == 201, (train, resp.text)


def test_relative_and_missing_data_paths_are_422(rapi: Api, roots: Path) -> None:
    resp = submit_data(rapi, "datasets/train.parquet")
    assert resp.status_code == 422 and fields(resp) == ["data.train"] and "relative" in resp.text
    resp = submit_data(rapi, str(roots / "missing.parquet"))
    assert resp.status_code == 422 and fields(resp) == ["data.train"] and "does not exist" in resp.text


def test_default_roots_hold_the_data_dir_and_the_download_cache(api: Api) -> None:
    assert api.settings.allowed_data_roots == [
        str(api.settings.data_dir / "datasets"),
        str(Path("~/.cache/trainctl").expanduser()),
    ]
    # the default data.train is a (maybe missing) torchvision download directory in the cache: accepted
    assert api.post(DEBUG_JOB).status_code == 201
    resp = submit_data(api, "/etc/passwd")
    assert resp.status_code == 422 and fields(resp) == ["data.train"]


def test_a_search_cannot_route_round_the_data_roots(rapi: Api) -> None:
    resp = rapi.post(
        {
            "preset": "debug",
            "overrides": {"search": {"space": {"data.train": {"choice": ["/etc/passwd"]}}, "num_samples": 1}},
        }
    )
    assert resp.status_code == 422 and "search.space.data.train" in fields(resp), resp.text


def test_the_driver_gets_the_roots_to_check_again(rapi: Api, roots: Path) -> None:
    job_id = submit_data(rapi, str(roots / "train.parquet")).json()["id"]
    rapi.reconcile()
    assert rapi.ray.jobs[f"{job_id}-1"].env_vars["TRAINCTL_DATA_ROOTS"] == str(roots)


# --- 4. downloads only from the job's own prefix, hash required ----------------------------------------------


def _finished_job(api: Api) -> tuple[str, Path]:
    job_id = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()
    return job_id, api.job_dir(job_id)


def _summary(job_dir: Path, uri: str, sha: str | None, size: int | None) -> None:
    (job_dir / "summary.json").write_text(
        json.dumps(
            {
                "state": "succeeded",
                "best_val_acc": 0.5,
                "best_checkpoint": uri,
                "best_checkpoint_sha256": sha,
                "best_checkpoint_size": size,
            }
        )
    )


def test_a_summary_pointing_outside_the_job_is_a_502(api: Api, tmp_path: Path) -> None:
    token_file = api.settings.admin_token_path
    secret = token_file.read_bytes()
    job_id, job_dir = _finished_job(api)
    sha = hashlib.sha256(secret).hexdigest()
    (job_dir / "link.pt").symlink_to(token_file)
    for uri in (
        str(token_file),
        f"file://{token_file}",
        "../../../admin-token",
        str(job_dir / "link.pt"),
        str(job_dir / ".." / ".." / ".." / "admin-token"),
    ):
        _summary(job_dir, uri, sha, len(secret))  # even with the right hash and size
        resp = api.get(f"/v1/jobs/{job_id}/checkpoints/best")
        assert resp.status_code == 502, (uri, resp.text)
        assert error(resp)["code"] == "checkpoint_corrupt" and secret not in resp.content
        assert "outside the job's storage prefix" in resp.text


def test_a_checkpoint_without_a_recorded_hash_is_a_502(api: Api) -> None:
    job_id, job_dir = _finished_job(api)
    ckpt = job_dir / job_id / "epoch_0001" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    _summary(job_dir, str(ckpt), None, 7)
    resp = api.get(f"/v1/jobs/{job_id}/checkpoints/best")
    assert resp.status_code == 502 and error(resp)["code"] == "checkpoint_corrupt" and "sha256" in resp.text
    _summary(job_dir, str(ckpt), hashlib.sha256(b"weights").hexdigest(), 7)
    assert api.get(f"/v1/jobs/{job_id}/checkpoints/best").content == b"weights"


# --- 5. quotas and limits -----------------------------------------------------------------------------------


def test_a_burst_hits_the_per_owner_quota_while_another_user_still_starts(make_api) -> None:
    api = make_api(max_concurrent_jobs=5)
    alice, bob = user_token(api, "alice"), user_token(api, "bob")
    codes = []
    for _ in range(15):
        codes.append(api.post(DEBUG_JOB, headers=api.headers(alice)).status_code)
        api.reconcile()
    assert codes == [201] * 14 + [429], codes  # 4 active + 10 queued
    resp = api.post(DEBUG_JOB, headers=api.headers(alice))
    assert resp.status_code == 429 and int(resp.headers["retry-after"]) > 0
    err = error(resp)
    assert err["code"] == "quota_exceeded" and "TRAINCTL_MAX_QUEUED_JOBS_PER_OWNER" in err["message"]
    assert err["details"]["max_active_jobs_per_owner"] == 4 and err["details"]["queued"] == 10
    bob_job = api.post(DEBUG_JOB, headers=api.headers(bob)).json()["id"]
    api.reconcile()
    # alice holds 4 slots (her limit), the 5th goes to bob although alice queued 10 jobs before him
    assert api.get(f"/v1/jobs/{bob_job}", headers=api.headers(bob)).json()["state"] == "STARTING"
    states = [
        j["state"]
        for j in api.client.get("/v1/jobs", params={"owner": "alice", "limit": 100}, headers=api.headers()).json()[
            "jobs"
        ]
    ]
    assert states.count("STARTING") == 4 and states.count("QUEUED") == 10


def test_a_repeated_idempotency_key_is_not_refused_at_the_quota(make_api) -> None:
    api = make_api(max_active_jobs_per_owner=1, max_queued_jobs_per_owner=0)
    first = api.post(DEBUG_JOB, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 201
    assert api.post(DEBUG_JOB).status_code == 429
    again = api.post(DEBUG_JOB, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]


def _job(seq: int, owner: str, state: JobState = JobState.QUEUED) -> Job:
    return Job(
        seq=seq,
        id=f"j{seq}",
        owner=owner,
        created_at=0,
        updated_at=0,
        state=state,
        spec=JobSpec(),
        ray_submission_id=None,
        attempts=0,
        attempt_log=[],
        message=None,
        best_val_acc=None,
        last_epoch=None,
        cancel_requested=False,
    )


def test_fair_queue_is_round_robin_over_owners() -> None:
    queued = [_job(1, "a"), _job(2, "a"), _job(3, "a"), _job(4, "b"), _job(5, "a"), _job(6, "c"), _job(7, "b")]
    assert [j.id for j in fair_queue(queued, [], 10)] == ["j1", "j4", "j6", "j2", "j7", "j3", "j5"]
    # an owner at their active limit is skipped; one with one slot left gets one job
    active = [_job(10, "a", JobState.RUNNING), _job(11, "b", JobState.RUNNING), _job(12, "b", JobState.RUNNING)]
    assert [j.id for j in fair_queue(queued, active, 2)] == ["j1", "j6"]


def test_request_bodies_over_the_limit_are_413(api: Api) -> None:
    big = {"preset": "debug", "overrides": {"optim.epochs": 2}, "pad": "x" * (1 << 20)}
    resp = api.post(big)
    assert resp.status_code == 413 and error(resp)["code"] == "too_large" and "max_body_bytes" in resp.text

    def chunks():  # no Content-Length: counted as it streams in
        yield b'{"preset": "debug", "overrides": {"x": "'
        for _ in range(20):
            yield b"y" * 65536
        yield b'"}}'

    resp = api.client.post("/v1/jobs", content=chunks(), headers={**api.headers(), "Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text
    assert api.client.get("/v1/jobs", headers=api.headers()).json()["total"] == 0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"model.widths": [1_000_000_000], "model.blocks": [1]}, "model.widths.0"),  # the driver builds it on the head
        ({"model.widths": [4096, 4096, 4096, 4096]}, "model.widths"),  # 1.3 G parameters
        ({"model.blocks": [10_000, 10_000, 10_000, 10_000]}, "model.blocks.0"),  # over 64 per stage
        ({"checkpoint.max_restarts": 11}, "checkpoint.max_restarts"),
        ({"scaling.resources_per_worker": {"node:__internal_head__": 0.001}}, "scaling.resources_per_worker"),
        ({"scaling.resources_per_worker": {"node:127.0.0.1": 1}}, "scaling.resources_per_worker"),
        ({"scaling.resources_per_worker": {"trainctl_driver": 1}}, "scaling.resources_per_worker"),
        ({"scaling.resources_per_worker": {"GPU": 1}}, "scaling.resources_per_worker"),
        ({"scaling.resources_per_worker": {"memory": 1e9}}, "scaling.resources_per_worker"),
        ({"limits.max_hours": 100}, "limits.max_hours"),  # over TRAINCTL_MAX_JOB_HOURS=72
        (
            {
                "search": {
                    "space": {
                        "optim.lr": {"grid": [0.1 + i / 1e4 for i in range(1000)]},
                        "optim.weight_decay": {"grid": [i / 1e6 for i in range(1000)]},
                        "optim.momentum": {"grid": [i / 1e4 for i in range(1000)]},
                        "optim.label_smoothing": {"grid": [i / 1e4 for i in range(1000)]},
                    },
                    "num_samples": 1,
                }
            },
            "search.num_samples",
        ),  # a 10^12-trial grid
        ({"search": {"space": {"optim.lr": {"grid": [0.01, 0.02]}}, "num_samples": 200}}, "search.num_samples"),
    ],
)
def test_limits_are_422_naming_the_field(api: Api, overrides: dict, field: str) -> None:
    token = user_token(api)
    started = time.monotonic()
    resp = api.post({"preset": "debug", "overrides": overrides}, headers=api.headers(token))
    assert time.monotonic() - started < 30  # refused quickly, not after enumerating the search
    assert resp.status_code == 422, resp.text
    assert field in fields(resp), resp.text


def test_operator_limits_come_from_settings(make_api) -> None:
    api = make_api(max_model_parameters=100_000, max_search_trials=2, max_job_hours=1)
    resp = api.post({"preset": "paper", "overrides": {"data.train": "~/.cache/trainctl/cifar10"}})
    assert resp.status_code == 422 and {"model.widths", "model.blocks"} <= set(fields(resp))
    assert "TRAINCTL_MAX_MODEL_PARAMETERS" in resp.text
    resp = api.post({"preset": "debug", "overrides": {"limits.max_hours": 2}})
    assert resp.status_code == 422 and fields(resp) == ["limits.max_hours"]
    assert api.post({"preset": "debug", "overrides": {"limits.max_hours": 0.5}}).status_code == 201


def test_a_job_past_its_time_limit_ends_failed(api: Api) -> None:
    job_id = api.post({"preset": "debug", "overrides": {"limits.max_hours": 0.0002}}).json()["id"]  # 0.72 s
    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    api.reconcile()
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "RUNNING"
    time.sleep(1.0)
    api.reconcile()
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "FAILED" and job["message"].startswith("time limit"), job
    assert api.ray.jobs[f"{job_id}-1"].status == "STOPPED"


def test_over_time_limit_counts_from_the_first_submission() -> None:
    job = _job(1, "a", JobState.RUNNING)
    assert over_time_limit(job, 72, time.time()) is None  # never submitted: no clock yet
    job = Job(
        **{
            **job.__dict__,
            "spec": JobSpec.model_validate({"limits": {"max_hours": 1}}),
            "attempt_log": [{"submitted_at": 1000.0}, {"submitted_at": 5000.0}],
        }
    )
    assert over_time_limit(job, 72, 1000.0 + 3599) is None
    assert over_time_limit(job, 72, 1000.0 + 3601) == 1
    assert over_time_limit(job, 0.5, 1000.0 + 1801) == 0.5  # the service's cap wins


@pytest.mark.parametrize(
    "params",
    [{"offset": "1e20"}, {"offset": str(10**20)}, {"offset": "-1"}, {"limit": str(10**30)}, {"tail": str(10**20)}],
)
def test_integer_query_parameters_are_bounded(api: Api, params: dict) -> None:
    job_id = api.post(DEBUG_JOB).json()["id"]
    path = f"/v1/jobs/{job_id}/logs" if "tail" in params else "/v1/jobs"
    resp = api.get(path, params=params)
    assert resp.status_code == 422, resp.text


# --- 6. no secrets in Ray's runtime env -----------------------------------------------------------------------


def test_no_secret_reaches_the_ray_job(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIASECRETKEY",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
        "AWS_SESSION_TOKEN": "aws-session-value",
        "TRAINCTL_TOKEN": api.token,
        "RAY_AUTH_TOKEN": "ray-token-value",
    }
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    job_id = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()
    fake = api.ray.jobs[f"{job_id}-1"]
    recorded = json.dumps({"env": fake.env_vars, "entrypoint": fake.entrypoint, "metadata": fake.metadata})
    for value in secrets.values():
        assert value not in recorded
    assert fake.env_vars["AWS_REGION"] == "eu-west-1"


# --- 7. tokens and roles ----------------------------------------------------------------------------------------


def test_tokens_can_be_listed_and_revoked(api: Api) -> None:
    token = user_token(api, "bob")
    assert api.client.get("/v1/jobs", headers=api.headers(token)).status_code == 200
    listed = api.client.get("/v1/tokens", headers=api.headers()).json()["tokens"]
    assert {t["name"]: t["is_admin"] for t in listed} == {"admin": True, "bob": False}
    assert token not in json.dumps(listed) and api.token not in json.dumps(listed)
    # users may not manage tokens
    for method, path in (("GET", "/v1/tokens"), ("POST", "/v1/tokens"), ("DELETE", "/v1/tokens/admin")):
        resp = api.client.request(method, path, headers=api.headers(token), json={"name": "x"})
        assert resp.status_code == 403, (method, path, resp.text)
    assert api.client.delete("/v1/tokens/bob", headers=api.headers()).status_code == 204
    resp = api.client.get("/v1/jobs", headers=api.headers(token))
    assert resp.status_code == 401
    assert api.client.delete("/v1/tokens/bob", headers=api.headers()).status_code == 404
    assert api.client.delete("/v1/tokens/admin", headers=api.headers()).status_code == 409  # no self-lockout


def test_tokens_expire(api: Api) -> None:
    token = user_token(api, "temp", expires_in_s=1)
    listed = {t["name"]: t for t in api.client.get("/v1/tokens", headers=api.headers()).json()["tokens"]}
    assert listed["temp"]["expires_at"] and not listed["temp"]["expired"]
    assert api.client.get("/v1/jobs", headers=api.headers(token)).status_code == 200
    time.sleep(1.2)
    assert api.client.get("/v1/jobs", headers=api.headers(token)).status_code == 401
    assert {t["name"]: t for t in api.client.get("/v1/tokens", headers=api.headers()).json()["tokens"]}["temp"][
        "expired"
    ]


def test_the_admin_sees_cancels_and_deletes_every_job_users_only_their_own(api: Api) -> None:
    alice, bob = user_token(api, "alice"), user_token(api, "bob")
    a_job = api.post(DEBUG_JOB, headers=api.headers(alice)).json()["id"]
    b_job = api.post(DEBUG_JOB, headers=api.headers(bob)).json()["id"]
    assert api.client.get(f"/v1/jobs/{a_job}", headers=api.headers(bob)).status_code == 404
    assert api.client.post(f"/v1/jobs/{a_job}/cancel", headers=api.headers(bob)).status_code == 404
    resp = api.client.get("/v1/jobs", params={"owner": "alice"}, headers=api.headers(bob))
    assert resp.status_code == 403
    assert [j["id"] for j in api.client.get("/v1/jobs", headers=api.headers(bob)).json()["jobs"]] == [b_job]
    everyone = api.client.get("/v1/jobs", headers=api.headers()).json()["jobs"]
    assert {(j["id"], j["owner"]) for j in everyone} == {(a_job, "alice"), (b_job, "bob")}
    only_alice = api.client.get("/v1/jobs", params={"owner": "alice"}, headers=api.headers()).json()["jobs"]
    assert [j["id"] for j in only_alice] == [a_job]
    assert api.client.get(f"/v1/jobs/{a_job}", headers=api.headers()).json()["owner"] == "alice"
    resp = api.client.post(f"/v1/jobs/{a_job}/cancel", headers=api.headers())
    assert resp.status_code == 200 and resp.json()["state"] == "CANCELLED"
    assert api.client.delete(f"/v1/jobs/{a_job}", headers=api.headers()).status_code == 204


def test_a_missing_admin_token_file_is_recreated_and_the_old_token_revoked(make_api) -> None:
    api = make_api()
    old = api.token
    api.settings.admin_token_path.unlink()
    again = make_api()  # a restart on the same data dir
    new = again.settings.admin_token_path.read_text().strip()
    assert new and new != old
    assert again.client.get("/v1/jobs", headers=again.headers(old)).status_code == 401
    assert again.client.get("/v1/jobs", headers=again.headers(new)).status_code == 200
    assert make_api().settings.admin_token_path.read_text().strip() == new  # kept while the file exists


def test_the_token_table_gains_expires_at_on_an_old_database(tmp_path: Path) -> None:
    """A database made by the first migration (before tokens could expire) keeps its tokens and gains
    tokens.expires_at (migration 0002) when a newer service opens it."""
    from sqlalchemy import text

    from service.engine.migrate import FIRST_REVISION, upgrade
    from service.engine.store import Store, make_engine, sqlite_url

    url = sqlite_url(tmp_path / "old.db")
    engine = make_engine(url)
    upgrade(engine, FIRST_REVISION)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tokens VALUES ('old', 'h', 0, 1.0)"))
    engine.dispose()
    store = Store(url)
    store.create_schema()
    assert store.token_owner("h") == ("old", False) and store.list_tokens()[0].expires_at is None
    store.close()


# --- 8. hardening -----------------------------------------------------------------------------------------------


def test_files_are_owner_only(api: Api) -> None:
    def mode(p: Path) -> int:
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(api.settings.data_dir) == 0o700 and mode(api.settings.admin_token_path) == 0o600
    if api.settings.store_url.startswith("sqlite"):  # PostgreSQL keeps its files in its own data dir
        assert mode(api.settings.db_path) == 0o600
    job_id = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()
    spec = api.job_dir(job_id) / "spec.json"
    assert mode(spec) & 0o077 == 0 and mode(spec.parent) & 0o077 == 0


def test_logs_are_a_bounded_tail_and_since_gives_only_what_is_new(api: Api) -> None:
    from service.api.jobs import log_window

    job_id = api.post(DEBUG_JOB).json()["id"]
    api.reconcile()
    api.ray.jobs[f"{job_id}-1"].logs = "".join(f"line {i}\n" for i in range(1, 11))
    r = api.get(f"/v1/jobs/{job_id}/logs")
    size = int(r.headers["x-log-size"])
    assert r.text.startswith("line 1\n") and size == len(r.text.encode())
    api.ray.jobs[f"{job_id}-1"].logs += "line 11\n"
    r = api.get(f"/v1/jobs/{job_id}/logs", params={"since": size})
    assert r.text == "line 11\n" and int(r.headers["x-log-size"]) == size + 8
    assert api.get(f"/v1/jobs/{job_id}/logs", params={"since": size, "tail": 1}).text == "line 11\n"
    # a huge log: only its last MAX_LOG_BYTES travel
    api.ray.jobs[f"{job_id}-1"].logs = "x" * (3 << 20) + "END\n"
    r = api.get(f"/v1/jobs/{job_id}/logs")
    assert len(r.content) == 1 << 20 and r.text.endswith("END\n") and r.headers["x-log-truncated"] == "true"
    assert log_window("ab\ncd\n", tail=None, since=99) == ("ab\ncd\n", 6, False)  # a new attempt's log
    assert log_window("ab\ncd\n", tail=1, since=None) == ("cd\n", 6, False)


def test_serve_refuses_no_auth_off_loopback(tmp_path: Path) -> None:
    import subprocess

    from tests.service.conftest import TRAINCTL

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINCTL_", "RAY_ADDRESS"))}
    out = subprocess.run(
        [TRAINCTL, "serve", "--no-auth", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "d")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0 and "loopback" in out.stderr, (out.stdout, out.stderr)
    assert "Ray head up" not in out.stdout  # refused before starting anything


def test_token_expiry_durations() -> None:
    import argparse

    from service.client.cli.common import parse_duration

    assert [parse_duration(x) for x in ("90", "90s", "30m", "12h", "7d", "2w")] == [
        90,
        90,
        1800,
        43200,
        604800,
        1209600,
    ]
    for bad in ("", "x", "-5m", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


# --- issue 21 (items 1-3, 5, 6): no hang, no memory blow-up, no echo, exact loopback, bounded labels ---------


def test_a_huge_block_count_is_a_422_in_milliseconds(api: Api) -> None:
    token = user_token(api)
    for overrides in (
        {"model.blocks": [1, 1, 1, 10**12]},  # the parameter count used to loop for days in the API thread
        {"model.widths": [1, 1, 1, 1], "model.blocks": [1, 1, 1, 2_000_000], "model.se_reduction": 1},
        {"model.widths": [1, 1, 1, 1], "model.blocks": [64, 64, 64, 64], "model.se_reduction": 1},
    ):
        started = time.perf_counter()
        resp = api.post({"preset": "debug", "overrides": overrides}, headers=api.headers(token))
        assert time.perf_counter() - started < 1.0, overrides
        assert resp.status_code == 422 and any(f.startswith("model.blocks") for f in fields(resp)), resp.text
    assert api.client.get("/v1/jobs", headers=api.headers()).json()["total"] == 0


ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)  # 9^9 = 387 M strings from ~300 bytes, once anything walks it


@pytest.mark.parametrize(
    "text, hint",
    [
        (ALIAS_BOMB, "anchors"),
        ("scaling.num_workers: *nothing\n", "aliases"),
        ("optim.lr: " + "[" * 5000 + "]" * 5000, "deeper"),
        ("optim.epochs: " + "9" * 10_000, "converted"),
        ("!!python/object/apply:os.system ['true']", "constructor"),
    ],
)
def test_yaml_bombs_on_the_submit_form_are_a_short_422(api: Api, text: str, hint: str) -> None:
    from tests.service.test_ui import csrf_of, login

    login(api)
    csrf = csrf_of(api.client.get("/ui/submit").text)
    started = time.perf_counter()
    resp = api.client.post(
        "/ui/api/submit", json={"preset": "debug", "overrides_yaml": text}, headers={"X-CSRF-Token": csrf}
    )
    assert time.perf_counter() - started < 2.0
    assert resp.status_code == 422 and fields(resp) == ["overrides"], resp.text
    assert hint in resp.text and len(resp.content) < 1000, resp.text[:2000]


def test_errors_never_echo_more_than_a_prefix_of_a_bad_value(api: Api) -> None:
    for overrides in (
        {"scaling.num_workers": "x" * 900_000},  # (the message quotes the value: a prefix only)
        {"x" * 900_000: 1},  # an unknown path: the field name is cut too
        {"data.train": "/" + "y" * 900_000},
        {"search": {"space": {"optim.lr": {"choice": [["z" * 20] * 10] * 1000}}}},  # thousands of errors
    ):
        resp = api.post({"preset": "debug", "overrides": overrides})
        assert resp.status_code == 422, resp.text[:500]
        assert len(resp.content) < 20_000 and "x" * 300 not in resp.text and "y" * 300 not in resp.text
    resp = api.post({"preset": "debug", "overrides": {"data.train": "relative/" + "w" * 5000}})
    assert resp.status_code == 422 and len(resp.content) < 2000
    # the ordinary, short messages are unchanged
    resp = api.post({"preset": "debug", "overrides": {"scaling.num_workers": "many"}})
    assert "got 'many'" in resp.text


@pytest.mark.parametrize(
    "host, ok",
    [
        ("127.0.0.1:8000", True),
        ("127.0.0.2", True),
        ("localhost:8000", True),
        ("[::1]:8000", True),
        ("127.attacker.example", False),  # any name starting "127." used to pass: DNS rebinding
        ("127.attacker.example:8000", False),
        ("127.0.0.1.nip.io", False),
        ("localhost.attacker.example", False),
        ("127.1", False),
        ("localhost:notaport", False),
        ("[::1]evil", False),
    ],
)
def test_no_auth_answers_only_exact_loopback_hosts(make_api, host: str, ok: bool) -> None:
    api = make_api(auth=False)
    resp = api.client.get("/v1/jobs", headers={"Host": host})
    assert resp.status_code == (200 if ok else 400), (host, resp.text)


def test_metric_labels_stay_bounded_whatever_clients_send(api: Api) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def series() -> set[tuple]:
        text = api.get("/metrics").text
        return {
            tuple(sorted(s.labels.items()))
            for fam in text_string_to_metric_families(text)
            if fam.name == "trainctl_http_request_duration_seconds"
            for s in fam.samples
            if s.name.endswith("_count")
        }

    job_id = api.post(DEBUG_JOB).json()["id"]
    for i in range(3):
        api.client.request(f"MADEUP{i}", "/v1/jobs", headers=api.headers())
        api.client.request(f"X{i}", f"/random/{i}")
        api.get(f"/no/such/path/{i}")
        api.get(f"/ui/static/nothing-{i}.css")
        api.get(f"/v1/jobs/{job_id}x{i}")
    series()  # (the first scrape adds its own series)
    first = series()
    for i in range(3, 30):  # ten times as many made-up methods and paths: not one new series
        api.client.request(f"MADEUP{i}", "/v1/jobs", headers=api.headers())
        api.client.request(f"X{i}", f"/random/{i}")
        api.get(f"/no/such/path/{i}")
        api.get(f"/ui/static/nothing-{i}.css")
        api.get(f"/v1/jobs/{job_id}x{i}")
    after = series()
    assert after == first, after - first
    methods = {dict(s)["method"] for s in after}
    routes = {dict(s)["route"] for s in after}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"} and "other" in methods
    assert "unmatched" in routes and "/v1/jobs/{job_id}" in routes
    assert not any("random" in r or "nothing" in r or job_id in r for r in routes), routes


# --- issue 21 item 13: one download folder, never a download per made-up folder ---------------------------------


def test_a_missing_cache_folder_is_not_a_download(api: Api) -> None:
    token = user_token(api)
    for train in ("~/.cache/trainctl/cifar10-sec-b-test-missing", "~/.cache/trainctl/a/b/c"):
        resp = submit_data(api, train, token)
        assert resp.status_code == 422 and fields(resp) == ["data.train"], resp.text
        assert "does not exist" in resp.text
    resp = submit_data(api, "~/.cache/trainctl/a", token, **{"data.format": "torchvision"})
    assert resp.status_code == 422 and fields(resp) == ["data.train"], resp.text
    assert "downloads CIFAR-10 only into ~/.cache/trainctl/cifar10" in resp.text
    # the one download folder is still accepted, missing or not, in either format
    assert submit_data(api, "~/.cache/trainctl/cifar10", token).status_code == 201
    assert submit_data(api, "~/.cache/trainctl/cifar10", token, **{"data.format": "torchvision"}).status_code == 201


# --- issue 21 item 9: expensive requests ------------------------------------------------------------------------


def _state(api: Api):
    return api.client.app.state.trainctl


def test_a_plot_is_rendered_once_per_epoch(api: Api) -> None:
    from tests.service.test_ui import running_job, write_metrics

    job_id = running_job(api)
    write_metrics(api, job_id, range(1, 2))
    cache = _state(api).plot_cache
    first = api.get(f"/v1/jobs/{job_id}/plots/curves.png")
    for _ in range(5):
        again = api.get(f"/v1/jobs/{job_id}/plots/curves.png")
        assert again.status_code == 200 and again.content == first.content
    assert cache.renders == 1
    write_metrics(api, job_id, range(1, 3))  # a new epoch: drawn again, once
    assert api.get(f"/v1/jobs/{job_id}/plots/curves.png").content != first.content
    api.get(f"/v1/jobs/{job_id}/plots/curves.png")
    assert cache.renders == 2


def test_healthz_answers_while_slow_requests_fill_every_pool(make_api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The slow pool full (plots), the threads of the plain `def` routes all taken (one token left, held by a
    storage read): /healthz still answers at once, and one more plot is a 503 with Retry-After."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import anyio.to_thread

    from service.engine import jobdir
    from tests.service.test_ui import running_job, write_metrics

    api = make_api(slow_workers=1, slow_queue=1)
    job_id = running_job(api)
    write_metrics(api, job_id, range(1, 2))
    release = threading.Event()
    real_read = jobdir.read_metrics

    def slow_read(job_dir):
        release.wait(20)
        return real_read(job_dir)

    monkeypatch.setattr(jobdir, "read_metrics", slow_read)

    def one_token() -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1

    pool = _state(api).slow
    with ThreadPoolExecutor(3) as threads:
        try:
            plots = [threads.submit(api.get, f"/v1/jobs/{job_id}/plots/curves.png") for _ in range(2)]
            _wait_for(lambda: pool.in_use == 2)
            busy = api.get(f"/v1/jobs/{job_id}/plots/lr.png")
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "busy", busy.text
            assert busy.headers["Retry-After"] and "TRAINCTL_SLOW_WORKERS" in busy.text
            api.client.portal.call(one_token)
            metrics = threads.submit(api.get, f"/v1/jobs/{job_id}/metrics")  # a `def` route: takes the token
            time.sleep(0.3)
            assert not metrics.done()
            started = time.monotonic()
            health = api.client.get("/healthz", timeout=5)
            assert health.status_code in (200, 503) and health.json()["status"] in ("ok", "degraded")
            assert time.monotonic() - started < 3
        finally:
            release.set()
        assert [f.result().status_code for f in plots] == [200, 200] and metrics.result().status_code == 200
    assert pool.in_use == 0


def _open_stream(api: Api, job_id: str, token: str) -> list:
    import json as json_

    events, name = [], None
    with api.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=api.headers(token)) as r:
        if r.status_code != 200:
            return [("status", r.status_code)]
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json_.loads(line[6:])))
    return events


def _wait_for(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_event_streams_are_capped_per_owner_and_in_all(make_api) -> None:
    from concurrent.futures import ThreadPoolExecutor

    api = make_api(events_poll_s=0.05, max_event_streams_per_owner=1, max_event_streams=2)
    alice, bob = user_token(api, "alice"), user_token(api, "bob")
    jobs = {
        who: api.post({"preset": "debug"}, headers=api.headers(tok)).json()["id"]
        for who, tok in (("a", alice), ("b", bob))
    }
    api.reconcile()
    slots = _state(api).streams
    with ThreadPoolExecutor(2) as threads:
        try:
            first = threads.submit(_open_stream, api, jobs["a"], alice)
            _wait_for(lambda: slots.total == 1)
            again = api.client.get(f"/v1/jobs/{jobs['a']}/events", headers=api.headers(alice))
            assert again.status_code == 429 and again.headers["Retry-After"], again.text
            assert error(again)["code"] == "too_many_streams" and "MAX_EVENT_STREAMS_PER_OWNER" in again.text
            second = threads.submit(_open_stream, api, jobs["b"], bob)  # another owner: within the total
            _wait_for(lambda: slots.total == 2)
            admin_job = api.post({"preset": "debug"}).json()["id"]
            full = api.client.get(f"/v1/jobs/{admin_job}/events", headers=api.headers())
            assert full.status_code == 429 and "TRAINCTL_MAX_EVENT_STREAMS" in full.text, full.text
        finally:  # the streams end with their jobs, and give their slots back
            for job_id in jobs.values():
                assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers()).status_code == 200
        assert first.result(timeout=10)[-1] == ("end", {"state": "CANCELLED"})
        assert second.result(timeout=10)[-1] == ("end", {"state": "CANCELLED"})
    assert slots.total == 0 and slots.by_owner == {}


# --- issue 21 item 11: identity ---------------------------------------------------------------------------------


def test_a_recreated_token_name_never_inherits_jobs(api: Api) -> None:
    old = user_token(api, "mallory")
    job = api.post({"preset": "debug"}, headers={**api.headers(old), "Idempotency-Key": "k1"}).json()
    assert api.client.delete("/v1/tokens/mallory", headers=api.headers()).status_code == 204
    new = user_token(api, "mallory")  # the same name, another person
    assert api.get("/v1/jobs", headers=api.headers(new)).json()["total"] == 0
    for method, path in (("GET", ""), ("GET", "/logs"), ("POST", "/cancel"), ("DELETE", "")):
        resp = api.client.request(method, f"/v1/jobs/{job['id']}{path}", headers=api.headers(new))
        assert resp.status_code == 404, (method, path, resp.text)
    # the old holder's Idempotency-Key does not hand back the old job either
    mine = api.post({"preset": "debug"}, headers={**api.headers(new), "Idempotency-Key": "k1"})
    assert mine.status_code == 201 and mine.json()["id"] != job["id"]
    # the admin still sees both, under the name
    listed = api.get("/v1/jobs?owner=mallory").json()
    assert {j["id"] for j in listed["jobs"]} == {job["id"], mine.json()["id"]}


def test_logout_ends_the_session_on_the_server(api: Api) -> None:
    from tests.service.test_ui import csrf_of, login

    assert login(api).status_code == 303
    stolen = api.client.cookies["trainctl_session"]  # e.g. copied off the machine before the logout
    csrf = csrf_of(api.client.get("/ui/").text)
    r = api.client.post(
        "/ui/logout",
        content=f"csrf={csrf}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    api.client.cookies.clear()
    api.client.cookies.set("trainctl_session", stolen)
    assert api.client.get("/v1/jobs").status_code == 401
    assert api.client.get("/ui/", follow_redirects=False).status_code == 303
    api.client.cookies.clear()
    time.sleep(0.01)
    assert login(api).status_code == 303  # signing in again works at once
    assert api.client.get("/v1/jobs").status_code == 200


def test_an_open_event_stream_ends_when_its_token_is_revoked(make_api) -> None:
    from concurrent.futures import ThreadPoolExecutor

    api = make_api(events_poll_s=0.05)
    token = user_token(api, "eve")
    job_id = api.post({"preset": "debug"}, headers=api.headers(token)).json()["id"]
    slots = _state(api).streams
    with ThreadPoolExecutor(1) as threads:
        stream = threads.submit(_open_stream, api, job_id, token)
        _wait_for(lambda: slots.total == 1)
        assert api.client.delete("/v1/tokens/eve", headers=api.headers()).status_code == 204
        events = stream.result(timeout=10)
    assert events[-1] == ("end", {"reason": "token_revoked"}) and slots.total == 0
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "QUEUED"  # the job itself goes on


# --- issue 21 item 12: quotas across replicas -------------------------------------------------------------------


def test_the_quota_holds_across_replicas(make_api) -> None:
    """Two API replicas on one database, 16 parallel submissions from one user: exactly the quota is
    accepted (checked inside the inserting transaction under a per-owner database lock, not a process lock)."""
    from concurrent.futures import ThreadPoolExecutor

    one = make_api(max_active_jobs_per_owner=1, max_queued_jobs_per_owner=2)
    two = make_api(max_active_jobs_per_owner=1, max_queued_jobs_per_owner=2)
    token = user_token(one, "burst")
    with ThreadPoolExecutor(16) as threads:
        answers = list(
            threads.map(
                lambda i: (one if i % 2 else two).post(
                    {"preset": "debug"}, headers=(one if i % 2 else two).headers(token)
                ),
                range(16),
            )
        )
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 3 + [429] * 13, codes
    assert one.get("/v1/jobs", headers=one.headers(token)).json()["total"] == 3
