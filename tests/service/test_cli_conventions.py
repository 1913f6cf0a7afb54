"""The CLI's conventions (issue 26 item 7): one exit code per kind of failure, JSON errors under --json, choices
checked here with "did you mean", retries with backoff and Retry-After, and `watch` on the event stream with
polling as the fallback. Unit tests over httpx's MockTransport, and `watch` against the real app served on a
loopback port (Ray faked: these tests are about the client)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.client import http
from service.client.cli import common, main
from service.settings import load_settings
from tests.plugins.ray_cluster import free_port
from tests.service.fakes import FakeRay

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main.main(argv)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def answering(
    monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]
) -> list[httpx.Request]:
    """Every command's client talks to `handler` (with the command's own retry policy); the requests made."""
    seen: list[httpx.Request] = []
    real = http.TrainctlClient

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    monkeypatch.setattr(
        common,
        "TrainctlClient",
        lambda url, token, **kw: real(url, token, **{**kw, "transport": httpx.MockTransport(record)}),
    )
    return seen


def api_error(status: int, code: str, message: str = "m", details: Any = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "details": details}})


# --- exit codes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer,code",
    [
        (api_error(404, "not_found", "no such job"), common.EXIT_NOT_FOUND),
        (api_error(401, "unauthorized"), common.EXIT_UNAUTHORIZED),
        (api_error(403, "forbidden"), common.EXIT_UNAUTHORIZED),
        (api_error(400, "bad_request"), common.EXIT_INVALID),
        (api_error(409, "job_not_finished"), common.EXIT_INVALID),
        (api_error(422, "invalid_request"), common.EXIT_INVALID),
        (api_error(500, "internal_error"), common.EXIT_SERVER),
        (api_error(503, "ray_unavailable"), common.EXIT_SERVER),
    ],
)
def test_each_kind_of_failure_has_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], answer: httpx.Response, code: int
) -> None:
    answering(monkeypatch, lambda request: answer)
    rc, _, err = run(["status", "j1", "--url", "http://test", "--token", "t", "--retry-for", "0"], capsys)
    assert rc == code, err


def test_cannot_connect_has_its_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["list", "--url", f"http://127.0.0.1:{free_port()}", "--retry-for", "0"], capsys)
    assert rc == common.EXIT_UNREACHABLE and "cannot reach trainctl" in err


def test_the_exit_codes_are_documented_in_help_and_docs() -> None:
    codes = {
        0: "success",
        1: "FAILED",
        2: "usage",
        3: "CANCELLED",
        common.EXIT_LOST_CONTACT: "lost contact",
        common.EXIT_ERROR: "other",
        common.EXIT_NOT_FOUND: "not found",
        common.EXIT_UNAUTHORIZED: "unauthorized",
        common.EXIT_INVALID: "invalid request",
        common.EXIT_SERVER: "server error",
        common.EXIT_UNREACHABLE: "cannot connect",
    }
    assert len(codes) == 11
    epilog = main.build_parser().epilog or ""
    for code, words in codes.items():
        assert re.search(rf"\b{code} [^,]*{words}", epilog), (code, epilog)
    table = (REPO / "docs" / "service.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.*) \|$", table, re.M))
    for code, words in codes.items():
        assert words.lower() in rows[str(code)].lower(), (code, rows.get(str(code)))


# --- JSON errors ------------------------------------------------------------------------------------------------


def test_json_errors_carry_the_servers_code_message_and_fields(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fields = [{"field": "optim.lr", "message": "Input should be greater than 0"}]
    answering(monkeypatch, lambda request: api_error(422, "invalid_spec", "1 invalid field(s)", fields))
    rc, out, err = run(["resubmit", "j1", "--set", "optim.lr=-1", "--json", "--url", "http://test"], capsys)
    assert rc == common.EXIT_INVALID and out == ""
    assert json.loads(err) == {"error": {"code": "invalid_spec", "message": "1 invalid field(s)", "fields": fields}}
    answering(monkeypatch, lambda request: api_error(404, "not_found", "no such job"))
    rc, _, err = run(["status", "nope", "--json", "--url", "http://test"], capsys)
    assert rc == common.EXIT_NOT_FOUND
    assert json.loads(err) == {"error": {"code": "not_found", "message": "no such job", "fields": []}}


def test_json_errors_for_usage_and_local_validation(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["list", "--state", "runing", "--json"], capsys)
    assert rc == 2 and out == ""
    error = json.loads(err)["error"]
    assert error["code"] == "usage" and "did you mean 'running'?" in error["message"] and error["fields"] == []
    rc, _, err = run(["submit", "--preset", "debug", "--set", "optim.lr=-1", "--dry-run", "--json"], capsys)
    error = json.loads(err)["error"]
    assert rc == common.EXIT_INVALID and error["code"] == "invalid_spec"
    assert [f["field"] for f in error["fields"]] == ["optim.lr"]


# --- choices checked here, before any request -------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,suggestion",
    [
        (["list", "--state", "bogus"], None),
        (["list", "--state", "SUCEEDED"], "succeeded"),
        (["list", "--sort", "best_val"], "best_val_acc"),
        (["export", "j1", "--format", "onnxx"], "onnx"),
        (["submit", "--preset", "papr"], "paper"),
        (["plot", "j1", "-o", "out", "--only", "curves,confusoin"], "confusion"),
        (["submit", "--preset", "debug", "--set", "nonsense"], None),
        (["completion", "tcsh"], None),
    ],
)
def test_bad_choices_are_usage_errors_without_a_request(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    argv: list[str],
    suggestion: str | None,
) -> None:
    monkeypatch.chdir(tmp_path)
    seen = answering(monkeypatch, lambda request: httpx.Response(500))
    rc, out, err = run([*argv, "--url", "http://test"], capsys)
    assert rc == common.EXIT_USAGE and seen == [] and out == "", err
    if suggestion:
        assert f"did you mean {suggestion!r}?" in err, err
    assert "service/" not in err and ".py" not in err  # no internal path


def test_state_choices_are_the_services_states() -> None:
    from service.states import JobState

    assert common.JOB_STATES == tuple(s.value.lower() for s in JobState)


# --- retries ----------------------------------------------------------------------------------------------------


class Script:
    """Answers in order (an exception instance is raised), then 200s; records each request and each sleep."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if self.answers else httpx.Response(201, json={"id": "j2", "state": "QUEUED"})
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    clock = [1000.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(http.time, "sleep", sleep)
    monkeypatch.setattr(http.time, "monotonic", lambda: clock[0])
    return slept


def client(script: Script, total_s: float = 10.0) -> http.TrainctlClient:
    return http.TrainctlClient(
        "http://test", None, transport=httpx.MockTransport(script), retry=http.Retry(total_s=total_s)
    )


def test_connect_errors_and_refusals_are_retried_with_backoff_and_retry_after(sleeps: list[float]) -> None:
    script = Script(
        httpx.ConnectError("refused"),
        httpx.ConnectError("refused"),
        httpx.Response(503, headers={"Retry-After": "3"}, json={"error": {"code": "busy", "message": "m"}}),
        httpx.Response(429, headers={"Retry-After": "0"}),
        httpx.Response(200, json={"id": "j1"}),
    )
    assert client(script).job("j1") == {"id": "j1"}
    assert len(script.requests) == 5
    assert sleeps == [0.5, 1.0, 3.0, 4.0]  # doubling; Retry-After when it asks for longer


def test_retries_stop_within_the_budget(sleeps: list[float]) -> None:
    script = Script(*[httpx.ConnectError("refused")] * 100)
    with pytest.raises(http.ClientError) as exc:
        client(script, total_s=10).jobs()
    assert exc.value.unreachable and sum(sleeps) <= 10 and len(script.requests) == len(sleeps) + 1
    far = Script(httpx.Response(503, headers={"Retry-After": "60"}))  # asks for longer than the budget
    with pytest.raises(http.ClientError) as exc:
        client(far, total_s=10).jobs()
    assert exc.value.status == 503 and len(far.requests) == 1


def test_a_post_that_may_have_been_applied_is_retried_only_when_safe_to_repeat(sleeps: list[float]) -> None:
    # a proxy's 502 after a resubmit: the job may exist; a second POST could make another one. Not retried.
    proxy_502 = httpx.Response(502, text="<html>Bad Gateway</html>")
    script = Script(proxy_502)
    with pytest.raises(http.ClientError) as exc:
        client(script).resubmit("j1", {})
    assert exc.value.status == 502 and len(script.requests) == 1
    # ... but a refusal (503/429: nothing was done) or a connection never made is retried for it
    script = Script(httpx.ConnectError("refused"), httpx.Response(503))
    assert client(script).resubmit("j1", {})["id"] == "j2" and len(script.requests) == 3
    # submit always carries an Idempotency-Key, the same on every try: repeating it returns the same job
    script = Script(proxy_502, httpx.ReadError("connection reset"))
    assert client(script).submit({"preset": "debug"})["id"] == "j2" and len(script.requests) == 3
    keys = {r.headers["Idempotency-Key"] for r in script.requests}
    assert len(keys) == 1 and keys.pop().startswith("trainctl-")
    # the service's own 502 (a corrupt checkpoint) is an answer, not a gateway's: never retried
    script = Script(httpx.Response(502, json={"error": {"code": "checkpoint_corrupt", "message": "sha256"}}))
    with pytest.raises(http.ClientError) as exc:
        client(script).job("j1")
    assert exc.value.code == "checkpoint_corrupt" and len(script.requests) == 1


def test_without_a_retry_policy_nothing_is_retried(sleeps: list[float]) -> None:
    script = Script(httpx.ConnectError("refused"))
    with pytest.raises(http.ClientError):
        http.TrainctlClient("http://test", None, transport=httpx.MockTransport(script)).job("j1")
    assert len(script.requests) == 1 and sleeps == []


# --- watch: the event stream, and polling when there is none ----------------------------------------------------


class Served:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def post(self, path: str, body: Any = None) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def submit(self) -> str:
        created = self.post("/v1/jobs", {"preset": "debug", "overrides": {"optim.epochs": 1}})
        assert created.status_code == 201, created.text
        return str(created.json()["id"])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """The real app over HTTP on a free loopback port (SQLite, local storage; Ray faked); one event stream at
    a time, polled every 0.1 s."""
    settings = load_settings(
        data_dir=tmp_path / "data",
        ray_address="http://127.0.0.1:1",
        reconcile_interval_s=3600,
        events_poll_s=0.1,
        max_event_streams=1,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, ray=FakeRay()), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    try:
        yield Served(f"http://127.0.0.1:{port}", settings.admin_token_path.read_text().strip())
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def recording(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths every CLI request goes to (over real HTTP)."""
    paths: list[str] = []
    real = http.TrainctlClient

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            paths.append(request.url.path)
            return super().handle_request(request)

    monkeypatch.setattr(
        common, "TrainctlClient", lambda url, token, **kw: real(url, token, **{**kw, "transport": Recording()})
    )
    return paths


def test_watch_follows_the_event_stream_to_the_end(
    served: Served, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = served.submit()
    paths = recording(monkeypatch)
    # cancel it while `watch` follows: the stream pushes the change, and its `end`
    timer = threading.Timer(1.0, lambda: served.post(f"/v1/jobs/{job_id}/cancel"))
    timer.start()
    try:
        rc, out, err = run(["watch", job_id, "--url", served.url, "--token", served.token], capsys)
    finally:
        timer.join()
    assert rc == 3, err  # CANCELLED
    lines = out.splitlines()
    assert not lines[0].startswith("CANCELLED") and lines[-1] == "CANCELLED: cancelled by user", out
    assert paths == [f"/v1/jobs/{job_id}/events"]  # one stream, no poll


def test_watch_polls_when_the_stream_is_unavailable(
    served: Served, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = served.submit()
    other = served.submit()
    served.post(f"/v1/jobs/{job_id}/cancel")
    # the service's only stream slot is taken (TRAINCTL_MAX_EVENT_STREAMS=1): the next one is a 429
    with httpx.stream(
        "GET", f"{served.url}/v1/jobs/{other}/events", headers={"Authorization": f"Bearer {served.token}"}
    ) as held:
        lines = held.iter_lines()  # kept: a dropped iterator closes the stream
        assert held.status_code == 200 and next(lines).startswith("id:")
        paths = recording(monkeypatch)
        rc, out, err = run(["watch", job_id, "--url", served.url, "--token", served.token, "-v"], capsys)
    assert rc == 3 and out.startswith("CANCELLED"), err
    assert paths == [f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}"], (paths, out, err)
    assert "no event stream" in err and "polling every 2s" in err
    # --poll asks for no stream at all; an unknown job is still "not found" either way
    paths.clear()
    assert run(["watch", job_id, "--poll", "--url", served.url, "--token", served.token], capsys)[0] == 3
    assert paths == [f"/v1/jobs/{job_id}"]
    rc, _, err = run(["watch", "no-such-job", "--url", served.url, "--token", served.token], capsys)
    assert rc == common.EXIT_NOT_FOUND and "not_found" in err
