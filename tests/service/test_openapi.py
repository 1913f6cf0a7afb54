"""/openapi.json tells the truth: the bearer scheme, the typed submit body, the real error shape and codes;
and a client generated from it by a third-party generator (openapi-python-client) submits and reads a job."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.api.errors import _HTTP_CODES
from service.common.settings import load_settings
from service.server.app import create_app
from tests.service.conftest import Api
from tests.service.fakes import FakeRay
from tests.service.loopback import serve_on_loopback


@pytest.fixture
def schema(api: Api) -> dict[str, Any]:
    return api.client.get("/openapi.json").json()


def test_bearer_scheme_is_declared_on_every_v1_route(schema: dict[str, Any]) -> None:
    bearer = schema["components"]["securitySchemes"]["bearer"]
    assert bearer == {"type": "http", "scheme": "bearer", "description": bearer["description"]}
    for path, item in schema["paths"].items():
        for method, op in item.items():
            if path.startswith("/v1/"):
                assert op.get("security") == [{"bearer": []}], f"{method.upper()} {path}"


def test_submit_body_shows_every_spec_field_with_its_bounds(schema: dict[str, Any]) -> None:
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = {alt["$ref"].rsplit("/", 1)[1] for alt in body["oneOf"]}
    assert refs == {"JobSpec", "PresetRequest"}
    components = schema["components"]["schemas"]
    assert {"model", "data", "optim", "schedule", "scaling", "checkpoint"} <= set(components["JobSpec"]["properties"])
    lr = components["OptimSpec"]["properties"]["lr"]
    assert lr.get("exclusiveMinimum") == 0 or lr.get("minimum") is not None


def test_errors_are_documented_in_their_real_shape(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components and "ErrorBody" in components
    ops = {(m, p): op for p, item in schema["paths"].items() for m, op in item.items()}
    for (method, path), op in ops.items():
        for status, resp in op["responses"].items():
            if status.startswith(("4", "5")):
                ref = resp["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorBody"), f"{method} {path} {status}"
    assert {"401", "404", "422"} <= set(ops[("get", "/v1/jobs/{job_id}")]["responses"])
    assert {"409", "413", "429"} <= set(ops[("post", "/v1/jobs")]["responses"])
    assert "502" in ops[("get", "/v1/jobs/{job_id}/checkpoints/best")]["responses"]


def test_operation_ids_are_readable_and_unique(schema: dict[str, Any]) -> None:
    ids = {(m, p): op["operationId"] for p, item in schema["paths"].items() for m, op in item.items()}
    assert ids[("post", "/v1/jobs")] == "submitJob" and ids[("get", "/v1/jobs/{job_id}")] == "getJob"
    assert ids[("get", "/v1/jobs")] == "listJobs" and ids[("post", "/v1/jobs/{job_id}/resubmit")] == "resubmitJob"
    assert len(set(ids.values())) == len(ids)
    assert all(re.fullmatch(r"[a-z]+(?:[A-Z0-9][a-z0-9]*)*", i) for i in ids.values()), ids


def test_spec_fields_are_described_and_enums_declared(schema: dict[str, Any]) -> None:
    from trainer.spec import PRESETS, JobSpec, field_descriptions

    components = schema["components"]["schemas"]
    props = components["JobSpec"]["properties"]
    assert set(props) == set(JobSpec.model_fields) and len(props) >= 13
    for name, prop in props.items():
        assert prop.get("description"), f"JobSpec.{name} has no description"
        assert prop["description"] == field_descriptions()[name]  # the same text `trainer describe` prints
    preset = components["PresetRequest"]["properties"]["preset"]
    assert {"type": "string", "enum": sorted(PRESETS)} in preset["anyOf"]
    assert "invalid_spec" in components["ErrorDetail"]["properties"]["code"]["enum"]
    for name in ("JobView", "PresetRequest", "ErrorBody"):
        assert components[name].get("examples"), f"{name} has no example"


def test_every_error_code_the_service_answers_is_in_the_enum() -> None:
    from service.api.openapi import ERROR_CODES

    found: set[str] = set()
    for path in (Path(__file__).resolve().parents[2] / "service").rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r'(?:ApiError|error_response|_refuse)\(\s*(?:send,\s*)?\d+,\s*"([a-z_]+)"', text))
    found |= set(_HTTP_CODES.values())
    assert found and found <= set(ERROR_CODES), sorted(found - set(ERROR_CODES))


def test_the_document_is_valid_openapi(schema: dict[str, Any]) -> None:
    from openapi_spec_validator import validate

    validate(schema)  # raises, naming the bad part


def test_created_job_has_a_location(api: Api) -> None:
    resp = api.post({"preset": "debug", "overrides": {"optim.epochs": 1}})  # data: the default cache root
    assert resp.status_code == 201 and resp.headers["location"] == f"/v1/jobs/{resp.json()['id']}"


def test_unknown_override_is_named_whole_with_a_suggestion(api: Api) -> None:
    resp = api.post({"preset": "debug", "overrides": {"optim.lrr": 0.1, "no.such.field": 1}})
    assert resp.status_code == 422
    fields = {d["field"]: d["message"] for d in resp.json()["error"]["details"]}
    assert "did you mean 'optim.lr'?" in fields["optim.lrr"] and "no.such.field" in fields


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    settings = load_settings(data_dir=tmp_path / "data", ray_address="http://127.0.0.1:1", reconcile_interval_s=3600)
    app = create_app(settings, ray=FakeRay())
    with serve_on_loopback(app) as url:
        yield url, settings.admin_token_path.read_text().strip(), app.openapi()


@pytest.mark.slow
def test_a_generated_client_submits_and_reads_a_job(
    served: tuple[str, str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    assert generator, "openapi-python-client comes with the dev extra"
    url, token, schema = served
    (tmp_path / "openapi.json").write_text(json.dumps(schema))
    gen = subprocess.run(
        [generator, "generate", "--path", "openapi.json", "--meta", "none", "--output-path", "trainctl_api"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gen.returncode == 0, gen.stdout + gen.stderr
    assert "Unable to process schema" not in gen.stdout + gen.stderr
    monkeypatch.syspath_prepend(str(tmp_path))
    client_mod = importlib.import_module("trainctl_api.client")
    submit = importlib.import_module("trainctl_api.api.jobs.submit_job")  # operationId submitJob
    get_job = importlib.import_module("trainctl_api.api.jobs.get_job")
    models = importlib.import_module("trainctl_api.models")

    api = client_mod.AuthenticatedClient(base_url=url, token=token)
    body = models.PresetRequest(
        preset="debug", overrides=models.PresetRequestOverrides.from_dict({"optim.epochs": 2})
    )  # data.train: the default, in the default data roots
    created = submit.sync_detailed(client=api, body=body)
    assert created.status_code == 201, created.content
    job = get_job.sync(created.parsed.id, client=api)
    assert isinstance(job, models.JobView) and job.id == created.parsed.id
    assert job.spec["optim"]["epochs"] == 2

    denied = get_job.sync_detailed(created.parsed.id, client=client_mod.AuthenticatedClient(base_url=url, token="x"))
    assert denied.status_code == 401 and isinstance(denied.parsed, models.ErrorBody)
    assert denied.parsed.error.code == "unauthorized"


def _check_declared(schema: dict[str, Any], method: str, template: str, resp: Any) -> None:
    declared = schema["paths"][template][method]["responses"]
    assert str(resp.status_code) in declared, (
        f"{method.upper()} {template} answered {resp.status_code}, which /openapi.json does not declare "
        f"({sorted(declared)}): {resp.text[:200]}"
    )


def test_events_plots_and_tokens_declare_every_status_they_return(api: Api, schema: dict[str, Any]) -> None:
    """The codes schemathesis found undeclared: 401/404 on events and plots, 400 on POST /v1/tokens."""
    job_id = api.post({"preset": "debug", "overrides": {"optim.epochs": 1}}).json()["id"]  # QUEUED: nothing to plot
    seen: set[tuple[str, int]] = set()

    def call(method: str, template: str, path: str, token: str | None = None, **kw: Any) -> None:
        headers = {**(api.headers(token) if token != "" else {}), **kw.pop("headers", {})}
        resp = api.client.request(method, path, headers=headers, **kw)
        _check_declared(schema, method, template, resp)
        seen.add((template, resp.status_code))

    events, plot, tokens = "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/plots/{name}.png", "/v1/tokens"
    call("get", events, f"/v1/jobs/{job_id}/events", token="")  # no token: 401
    call("get", events, "/v1/jobs/no-such-job/events")  # 404
    call("get", plot, f"/v1/jobs/{job_id}/plots/curves.png", token="")  # 401
    call("get", plot, "/v1/jobs/no-such-job/plots/curves.png")  # 404
    call("get", plot, f"/v1/jobs/{job_id}/plots/curves.png")  # 409: no finished epoch
    call("get", plot, f"/v1/jobs/{job_id}/plots/other.png")  # 422: no such plot
    call("post", tokens, tokens, token="", json={"name": "bob"})  # 401
    call("post", tokens, tokens, content=b'{"name": "\xff"}', headers={"content-type": "application/json"})  # 400
    call("post", tokens, tokens, json={"name": "not a name!"})  # 422
    created = api.client.post(tokens, json={"name": "bob"}, headers=api.headers())
    _check_declared(schema, "post", tokens, created)  # 201
    call("post", tokens, tokens, json={"name": "bob"})  # 409: taken
    call("post", tokens, tokens, token=created.json()["token"], json={"name": "eve"})  # 403: not the admin
    assert {s for t, s in seen if t == events} == {401, 404}
    assert {s for t, s in seen if t == plot} == {401, 404, 409, 422}
    assert {s for t, s in seen if t == tokens} == {400, 401, 403, 409, 422}
