"""The CLI's conventions (issue 26 item 7): one exit code per kind of failure, JSON errors under --json, choices
checked here with "did you mean", retries with backoff and Retry-After, and `watch` on the event stream with
polling as the fallback. Unit tests over httpx's MockTransport, and `watch` against the real app served on a
loopback port (Ray faked: these tests are about the client)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.client import http
from service.client.cli import common, main
from service.common.settings import load_settings
from service.server.app import create_app
from tests.plugins.ray_cluster import free_port
from tests.service.fakes import FakeRay
from tests.service.loopback import serve_on_loopback

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
    from service.engine.states import JobState

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
    with serve_on_loopback(create_app(settings, ray=FakeRay())) as url:
        yield Served(url, settings.admin_token_path.read_text().strip())


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


# --- login, profiles, logout --------------------------------------------------------------------------------------


def test_the_callers_config_is_never_read_by_the_tests() -> None:
    from service.client import config

    assert not config.config_path().is_relative_to(Path.home() / ".config")


def test_login_writes_a_private_profile_that_later_commands_use(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.client import config

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no ./data to discover
    path = tmp_path / "xdg" / "trainctl" / "config.json"
    assert config.config_path() == path
    # a wrong token is refused by the service, and nothing is written
    rc, _, err = run(["login", served.url, "--token", "wrong"], capsys)
    assert rc == common.EXIT_UNAUTHORIZED and not path.exists(), err
    rc, out, err = run(["login", served.url + "/", "--token", served.token, "--profile", "local"], capsys)
    assert rc == 0 and "'local' (the default)" in out and served.token not in out + err, err
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o077 == 0
    saved = json.loads(path.read_text())
    assert saved == {"default": "local", "profiles": {"local": {"url": served.url, "token": served.token}}}
    # no --url, no --token: the default profile's
    job_id = served.submit()
    rc, out, err = run(["status", job_id, "--json"], capsys)
    assert rc == 0 and json.loads(out)["id"] == job_id, err
    # a second profile (the token read from stdin) does not take the default unless asked
    monkeypatch.setattr("sys.stdin", _Stdin("tc_other\n"))
    rc, out, _ = run(["login", "http://127.0.0.1:9", "--token", "-", "--profile", "other", "--no-verify"], capsys)
    assert rc == 0 and "the default stays 'local'" in out
    assert json.loads(path.read_text())["profiles"]["other"] == {"url": "http://127.0.0.1:9", "token": "tc_other"}
    # --profile / TRAINCTL_PROFILE pick one; an unknown name is a usage error naming the known ones
    rc, _, err = run(["status", job_id, "--profile", "other", "--retry-for", "0"], capsys)
    assert rc == common.EXIT_UNREACHABLE and "127.0.0.1:9" in err
    monkeypatch.setenv("TRAINCTL_PROFILE", "local")
    assert run(["status", job_id], capsys)[0] == 0
    rc, _, err = run(["status", job_id, "--profile", "nope"], capsys)
    assert rc == 2 and "no profile 'nope'" in err and "local, other" in err
    # a profile's token goes only to its own URL: with --url naming another server, it is not sent
    rc, _, err = run(["status", job_id, "--profile", "other", "--url", served.url, "-v"], capsys)
    assert rc == common.EXIT_UNAUTHORIZED and "its token is for http://127.0.0.1:9" in err, err
    # flags and environment come before the profile
    monkeypatch.setenv("TRAINCTL_URL", "http://127.0.0.1:9")
    rc, _, err = run(["status", job_id, "--retry-for", "0"], capsys)
    assert rc == common.EXIT_UNREACHABLE, err
    monkeypatch.delenv("TRAINCTL_URL")
    monkeypatch.delenv("TRAINCTL_PROFILE")
    rc, out, _ = run(["profiles"], capsys)
    assert out.splitlines() == [f"* local            {served.url}", "  other            http://127.0.0.1:9"]
    assert served.token not in out
    # logout forgets the token here (the default profile unless --profile names one)
    rc, out, _ = run(["logout"], capsys)
    assert rc == 0 and "forgot profile 'local'" in out and "token revoke" in out
    assert json.loads(path.read_text()) == {
        "default": None,
        "profiles": {"other": {"url": "http://127.0.0.1:9", "token": "tc_other"}},
    }
    assert run(["logout"], capsys)[0] == 2  # no default profile left


class _Stdin:
    def __init__(self, text: str) -> None:
        self.text = text

    def isatty(self) -> bool:
        return False

    def readline(self) -> str:
        return self.text


def test_the_older_config_form_still_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.client import config

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    config.config_path().parent.mkdir()
    config.config_path().write_text(json.dumps({"url": "http://h:1/", "token": "t"}))
    assert config.url_source(data_dir=str(tmp_path / "none"))[0] == "http://h:1"
    assert config.resolve_token(data_dir=str(tmp_path / "none")) == "t"
    config.config_path().chmod(0o666)  # writable by others: ignored, like a planted serve.json
    assert config.resolve_token(data_dir=str(tmp_path / "none")) is None


# --- completion -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_name_every_command(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, script, _ = run(["completion", shell], capsys)
    assert rc == 0 and "shtab" in script
    commands = ["submit", "resubmit", "list", "status", "watch", "logs", "compare", "export", "login", "token"]
    for command in commands:
        assert command in script, (shell, command)
    assert "succeeded" in script  # list --state's choices


def test_bash_completion_is_valid_and_completes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import subprocess

    script = tmp_path / "trainctl.bash"
    script.write_text(run(["completion", "bash"], capsys)[1])
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        probe = (
            f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE='{line}'; "
            'COMP_POINT=${#COMP_LINE}; _shtab_trainctl; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.split()

    assert complete("trainctl", "wa") == ["watch"]
    assert complete("trainctl", "list", "--state", "su") == ["succeeded"]
    assert "--profile" in complete("trainctl", "status", "--pro")


def test_the_cli_loads_no_server_code() -> None:
    """The client package stands alone (`pip install trainctl-ray`): loading `trainctl` loads none of the control
    plane's packages or modules (`serve`, `db`, `reindex` import theirs when run)."""
    import subprocess
    import sys

    code = (
        "import sys, service.client.cli.main; "
        "heavy = {'fastapi', 'starlette', 'sqlalchemy', 'alembic', 'uvicorn', 'ray', 'torch', 'pyarrow'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or "
        "(m.startswith('service.') and not m.startswith('service.client') and m != 'service.logview')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_watch_polls_when_a_proxy_buffers_the_stream(capsys: pytest.CaptureFixture[str]) -> None:
    """A stream that opens but sends nothing (the service sends the job at once) is given up for polling."""
    from service.client.cli import watch

    class Silent(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            raise httpx.ReadTimeout("nothing came")

    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path.endswith("/events"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Silent())
        return httpx.Response(200, json={"id": "j1", "state": "SUCCEEDED", "progress": {"epoch": 1, "epochs": 1}})

    api = http.TrainctlClient("http://test", None, transport=httpx.MockTransport(handler))
    assert watch.follow(api, "j1", interval=0, patience=5, as_json=False, verbose=True) == 0
    assert paths == ["/v1/jobs/j1/events", "/v1/jobs/j1"]
    assert "sent nothing" in capsys.readouterr().err
