"""CLI pieces that need no server: spec files + --set, config lookup, and `best` refusing a download whose
sha256 does not match the server's header (the e2e tests cover the CLI against a real service)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from service.client import config, http
from service.client.cli import common, main, models, render, submit, watch
from service.client.cli import logs as logs_cmd


def parse(*argv: str):
    return main.build_parser().parse_args(list(argv))


def test_submit_body_from_preset_and_file(tmp_path: Path) -> None:
    assert submit._load_body(
        parse("submit", "--preset", "debug", "--set", "optim.epochs=3", "--set", "data.train=/x")
    ) == {"preset": "debug", "overrides": {"optim.epochs": 3, "data.train": "/x"}}
    f = tmp_path / "job.yaml"
    f.write_text("preset: debug\noverrides:\n  optim.epochs: 5\n")
    assert submit._load_body(parse("submit", str(f), "--set", "optim.lr=0.1")) == {
        "preset": "debug",
        "overrides": {"optim.epochs": 5, "optim.lr": 0.1},
    }
    g = tmp_path / "full.json"
    g.write_text(json.dumps({"optim": {"epochs": 5}}))
    assert submit._load_body(parse("submit", str(g), "--set", "optim.lr=0.1")) == {"optim": {"epochs": 5, "lr": 0.1}}
    with pytest.raises(SystemExit) as usage:  # a malformed --set is a usage error
        parse("submit", "--preset", "debug", "--set", "nonsense")
    assert usage.value.code == common.EXIT_USAGE
    with pytest.raises(SystemExit):
        parse("submit")  # a file or --preset is required


def test_token_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAINCTL_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "admin-token").write_text("tok-file\n")
    assert common.token(parse("list", "--data-dir", str(tmp_path / "data"))) == "tok-file"
    monkeypatch.setenv("TRAINCTL_TOKEN", "tok-env")
    assert common.token(parse("list", "--data-dir", str(tmp_path / "data"))) == "tok-env"
    monkeypatch.delenv("TRAINCTL_TOKEN")
    config.config_path().parent.mkdir(parents=True)  # the older {"url", "token"} form: profile "default"
    config.config_path().write_text(json.dumps({"url": "http://h:1", "token": "tok-cfg"}))
    monkeypatch.delenv("TRAINCTL_URL", raising=False)
    args = parse("list", "--data-dir", str(tmp_path / "nowhere"))
    assert common.token(args) == "tok-cfg" and common.url(args) == "http://h:1"


@pytest.mark.parametrize("announced_ok", [True, False])
def test_best_verifies_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, announced_ok: bool
) -> None:
    payload = b"checkpoint-bytes" * 1000
    sha = hashlib.sha256(payload).hexdigest() if announced_ok else "0" * 64

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=payload, headers={"X-Checkpoint-SHA256": sha})

    monkeypatch.setattr(
        common,
        "client",
        lambda args, timeout=30, retry=True: http.TrainctlClient(
            "http://test", None, transport=httpx.MockTransport(handler)
        ),
    )
    out = tmp_path / "best.pt"
    args = parse("best", "job1", "-o", str(out))
    if announced_ok:
        assert models.cmd_best(args) == 0 and out.read_bytes() == payload
    else:
        with pytest.raises(common.CliError, match="CHECKSUM MISMATCH"):
            models.cmd_best(args)
        assert not out.exists()
    assert not (tmp_path / "best.pt.part").exists()


def test_errors_are_printed_with_fields(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    body = {
        "error": {
            "code": "invalid_spec",
            "message": "1 invalid field(s)",
            "details": [{"field": "optim.lr", "message": "Input should be greater than 0"}],
        }
    }
    monkeypatch.setattr(
        common,
        "client",
        lambda args, timeout=30, retry=True: http.TrainctlClient(
            "http://test", None, transport=httpx.MockTransport(lambda r: httpx.Response(422, json=body))
        ),
    )
    with pytest.raises(SystemExit) as exc:
        main.main(["submit", "--preset", "debug", "--set", "optim.lr=-1"])
    assert exc.value.code == common.EXIT_INVALID
    assert "optim.lr: Input should be greater than 0" in capsys.readouterr().err


def test_unreachable_service_names_the_url(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from tests.plugins.ray_cluster import free_port

    with pytest.raises(SystemExit) as exc:
        main.main(["list", "--url", f"http://127.0.0.1:{free_port()}", "--token", "x", "--retry-for", "0"])
    assert exc.value.code == common.EXIT_UNREACHABLE and "cannot reach trainctl" in capsys.readouterr().err


class FakeService:
    """Scripted answers for GET /v1/jobs/{id} and /logs: the job advances one step per status request."""

    def __init__(self, states: list[str], logs: list[str], final_message: str | None = None) -> None:
        self.states, self.logs, self.step, self.final_message = states, logs, 0, final_message

    def handler(self, request: httpx.Request) -> httpx.Response:
        i = min(self.step, len(self.states) - 1)
        if request.url.path.endswith("/logs"):
            return httpx.Response(200, text=self.logs[min(i, len(self.logs) - 1)])
        self.step += 1
        state = self.states[i]
        return httpx.Response(
            200,
            json={
                "id": "j1",
                "owner": "admin",
                "state": state,
                "attempts": 1,
                "ray_submission_id": "j1-1",
                "progress": {"epoch": i, "epochs": 3, "eta_seconds": 4.0},
                "metrics": {"val_acc": 0.1 * i},
                "best_val_acc": 0.1 * i,
                "message": self.final_message if state in common.TERMINAL else None,
                "created_at": "2026-01-01T00:00:00Z",
                "updated_at": "2026-01-01T00:00:00Z",
            },
        )


def _use(monkeypatch: pytest.MonkeyPatch, fake: FakeService) -> None:
    monkeypatch.setattr(
        common,
        "client",
        lambda args, timeout=30, retry=True: http.TrainctlClient(
            "http://test", None, transport=httpx.MockTransport(fake.handler)
        ),
    )
    monkeypatch.setattr(watch.time, "sleep", lambda s: None)


@pytest.mark.parametrize("final,code", [("SUCCEEDED", 0), ("FAILED", 1), ("CANCELLED", 3)])
def test_watch_exit_code_is_the_final_state(monkeypatch: pytest.MonkeyPatch, capsys, final: str, code: int) -> None:
    _use(monkeypatch, FakeService(["QUEUED", "RUNNING", "RUNNING", final], [""], final_message="why"))
    assert watch.cmd_watch(parse("watch", "j1", "--interval", "0")) == code
    out = capsys.readouterr().out
    assert "RUNNING   epoch 1/3" in out and f"{final:<9} epoch 3/3" in out


def test_logs_follow_prints_each_line_once(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    logs = ["a\n", "a\nb\n", "a\nb\nc\n", "a\nb\nc\nd\n"]
    _use(monkeypatch, FakeService(["RUNNING", "RUNNING", "SUCCEEDED"], logs))
    assert logs_cmd.cmd_logs(parse("logs", "j1", "-f")) == 0
    assert capsys.readouterr().out.splitlines() == ["a", "b", "c"]


class SinceService(FakeService):
    """A server that answers `?since=` with only the new bytes and says its log's size (X-Log-Size)."""

    requested: list[str | None]

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/logs"):
            i = min(self.step, len(self.states) - 1)
            full = self.logs[min(i, len(self.logs) - 1)].encode()
            since = int(request.url.params.get("since", "0"))
            self.requested.append(request.url.params.get("since"))
            return httpx.Response(200, content=full[since:], headers={"X-Log-Size": str(len(full))})
        return super().handler(request)


def test_logs_follow_fetches_only_what_is_new(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    logs = ["a\n", "a\nb\n", "a\nb\nc\n", "a\nb\nc\nd\n"]
    fake = SinceService(["RUNNING", "RUNNING", "SUCCEEDED"], logs)
    fake.requested = []
    _use(monkeypatch, fake)
    assert logs_cmd.cmd_logs(parse("logs", "j1", "-f")) == 0
    assert capsys.readouterr().out.splitlines() == ["a", "b", "c"]
    assert fake.requested == ["0", "4", "6"]  # each poll asks from the bytes already printed


def test_no_job_outcome_shares_argparse_usage_exit_code() -> None:
    outcomes = {*common.WATCH_EXIT.values(), common.EXIT_LOST_CONTACT}
    errors = {
        common.EXIT_ERROR,
        common.EXIT_NOT_FOUND,
        common.EXIT_UNAUTHORIZED,
        common.EXIT_INVALID,
        common.EXIT_SERVER,
        common.EXIT_UNREACHABLE,
    }
    assert common.EXIT_USAGE == 2 and 2 not in outcomes | errors and len(outcomes | errors) == 10


class FlakyService(FakeService):
    """A FakeService that, for its first `outages` status requests, is down (connection refused or 503)."""

    def __init__(self, outages: list[str], *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.outages = outages

    def handler(self, request: httpx.Request) -> httpx.Response:
        if self.outages and not request.url.path.endswith("/logs"):
            kind = self.outages.pop(0)
            if kind == "refused":
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(503, json={"error": {"code": "unavailable", "message": "restarting"}})
        return super().handler(request)


def test_watch_follows_through_an_api_restart(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _use(monkeypatch, FlakyService(["refused", "refused", "503"], ["RUNNING", "RUNNING", "SUCCEEDED"], [""]))
    assert watch.cmd_watch(parse("watch", "j1", "--interval", "0")) == 0
    captured = capsys.readouterr()
    assert "lost contact with the service" in captured.err and "contact restored" in captured.err
    assert "SUCCEEDED" in captured.out


def test_watch_gives_up_with_its_own_exit_code(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    clock = iter(range(0, 10_000, 7))
    _use(monkeypatch, FlakyService(["refused"] * 100, ["RUNNING"], [""]))
    monkeypatch.setattr(watch.time, "monotonic", lambda: float(next(clock)))
    assert watch.cmd_watch(parse("watch", "j1", "--interval", "0", "--patience", "30")) == common.EXIT_LOST_CONTACT
    assert "gave up: no answer from the service for 30s" in capsys.readouterr().err


def test_watch_does_not_retry_a_missing_job(monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"error": {"code": "not_found", "message": "no job j1"}}
    monkeypatch.setattr(
        common,
        "client",
        lambda args, timeout=30, retry=True: http.TrainctlClient(
            "http://test", None, transport=httpx.MockTransport(lambda r: httpx.Response(404, json=body))
        ),
    )
    with pytest.raises(common.CliError, match="not_found"):
        watch.cmd_watch(parse("watch", "j1", "--interval", "0"))


def test_submit_follow_ends_with_the_jobs_exit_code(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    fake = FakeService(["QUEUED", "RUNNING", "CANCELLED"], [""])
    original = fake.handler

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(201, json={"id": "j1", "state": "QUEUED"})
        return original(request)

    fake.handler = handler  # type: ignore[method-assign]
    _use(monkeypatch, fake)
    assert submit.cmd_submit(parse("submit", "--preset", "debug", "--follow", "--interval", "0")) == 3
    assert "submitted job j1" in capsys.readouterr().out


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("trainctl ")


def test_watch_prints_the_devices_once(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def job(state: str, epoch: int, devices: list[str] | None) -> dict:
        return {
            "id": "j1",
            "state": state,
            "progress": {"epoch": epoch, "epochs": 3, "eta_seconds": None},
            "metrics": {"val_acc": 0.5} if epoch else None,
            "best_val_acc": None,
            "message": None,
            "devices": devices,
            "numerics": {
                "precision": "bf16",
                "channels_last": True,
                "chosen_by": "measured",
                "images_per_s": {"bf16": 170.0, "fp32": 100.0},
            }
            if devices
            else None,
        }

    devs = ["cpu (1 threads, bf16 AVX512-BF16) AMD EPYC"] * 2
    answers = iter(
        [job("RUNNING", 0, None), job("RUNNING", 1, devs), job("RUNNING", 2, devs), job("SUCCEEDED", 3, devs)]
    )
    monkeypatch.setattr(
        common,
        "client",
        lambda args, timeout=30, retry=True: http.TrainctlClient(
            "http://test", None, transport=httpx.MockTransport(lambda r: httpx.Response(200, json=next(answers)))
        ),
    )
    with pytest.raises(SystemExit) as exit_:
        main.main(["watch", "j1", "--interval", "0"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.count("devices: ") == 1, out
    assert f"devices: {devs[0]}, {devs[1]} · bf16 + channels_last (measured: bf16 170.0 img/s, fp32 100.0 img/s)" in out
    assert "epoch 3/3" in out


def test_an_id_starting_with_a_dash_is_taken_as_the_id() -> None:
    dashed = "-Xb3kQ9pLm2Nr7Tv0Yw1Zq"
    for argv, extra in [
        (["status", dashed], {}),
        (["best", dashed, "-o", "x.pt"], {"output": "x.pt"}),
        (["logs", "--tail", "5", dashed, "-f"], {"tail": 5, "follow": True}),
        (["watch", "--", dashed], {}),
    ]:
        args = main.build_parser().parse_args(main._ids_as_positionals(main.build_parser(), argv))
        assert args.id == dashed and all(getattr(args, k) == v for k, v in extra.items()), argv
    assert main._ids_as_positionals(main.build_parser(), ["list", "--json"]) == ["list", "--json"]


def test_the_url_serve_recorded_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAINCTL_URL", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    tmp_path.chmod(0o700)
    (tmp_path / "serve.json").write_text(json.dumps({"url": "http://127.0.0.1:8123", "pid": 1}))
    assert common.url(parse("list", "--data-dir", str(tmp_path))) == "http://127.0.0.1:8123"
    assert common.url(parse("list", "--data-dir", str(tmp_path), "--url", "http://h:1")) == "http://h:1"
    assert common.url(parse("list", "--data-dir", str(tmp_path / "other"))) == config.DEFAULT_URL


def test_progress_line_shows_test_accuracy_and_the_best_rule() -> None:
    base = {"state": "SUCCEEDED", "progress": {"epoch": 3, "epochs": 3}, "metrics": {"val_acc": 0.0, "test_acc": 0.61}}
    line = render.progress_line(
        {
            **base,
            "best_val_acc": None,
            "best_checkpoint_rule": "final_epoch",
            "final_test_acc": 0.61,
            "best_checkpoint_test_acc": 0.61,
        }
    )
    assert "best = final epoch (no val split)" in line and "final test_acc 0.6100" in line
    assert "best-ckpt test_acc 0.6100" in line
    line = render.progress_line({**base, "best_val_acc": 0.5, "best_checkpoint_rule": "val_acc"})
    assert "best 0.5000" in line and "final test_acc" not in line


def _export_service(exports: list[str], checkpoint: bytes | None = None, job: str = "job1"):
    """A scripted server for `trainctl export`: job `job` whose run exported `exports` (their files absent
    here, so only the not-exported path is scripted) and whose best checkpoint is `checkpoint`."""

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if not path.startswith(f"/v1/jobs/{job}"):
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no such job"}})
        if path == f"/v1/jobs/{job}/artifacts":
            return httpx.Response(200, json={"job_id": job, "artifacts": []})
        if path.startswith(f"/v1/jobs/{job}/artifacts/"):
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no artifact"}})
        if path == f"/v1/jobs/{job}/checkpoints/best" and checkpoint is not None:
            sha = hashlib.sha256(checkpoint).hexdigest()
            return httpx.Response(200, content=checkpoint, headers={"X-Checkpoint-SHA256": sha})
        if path == f"/v1/jobs/{job}":
            return httpx.Response(200, json={"id": job, "spec": {"exports": exports}})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})

    return lambda args, timeout=30, retry=True: http.TrainctlClient(
        "http://test", None, transport=httpx.MockTransport(handler)
    )


def test_export_of_a_job_that_exported_nothing_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the trainer installed here, `trainctl export` on a debug-preset job (exports: []) names the
    spec field and both ways to get the model."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    monkeypatch.setattr(common, "client", _export_service([]))
    with pytest.raises(common.CliError) as err:
        models.cmd_export(parse("export", "job1", "-o", str(tmp_path / "m.pt2")))
    message = str(err.value)
    assert "has no pt2 export: its spec's `exports` is []" in message
    assert "pip install 'trainctl[train]'" in message and "--set 'exports=[\"pt2\"]'" in message
    assert not (tmp_path / "m.pt2").exists()
    with pytest.raises(http.ClientError, match="no such job"):  # an unknown job stays an unknown job
        models.cmd_export(parse("export", "other", "-o", str(tmp_path / "m.pt2")))


def test_logs_show_the_trainers_lines_raw_and_all_ranks(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from tests.service.test_logview import ONE_RANK, TWO_RANKS

    one = SinceService(["RUNNING", "SUCCEEDED"], [ONE_RANK])
    one.requested = []
    _use(monkeypatch, one)
    assert logs_cmd.cmd_logs(parse("logs", "j1", "--tail", "1")) == 0
    assert capsys.readouterr().out.startswith("epoch 14: train_loss 0.8253")
    assert logs_cmd.cmd_logs(parse("logs", "j1", "--raw")) == 0
    assert capsys.readouterr().out == ONE_RANK
    fake = SinceService(["RUNNING", "RUNNING", "SUCCEEDED"], [TWO_RANKS[:700], TWO_RANKS])
    fake.requested = []
    _use(monkeypatch, fake)
    assert logs_cmd.cmd_logs(parse("logs", "j1", "-f", "--all-ranks")) == 0  # the first poll ends mid-line
    out = capsys.readouterr().out.splitlines()
    assert "[rank 1] epoch 1: train_loss 1.8  val_acc 0.39" in out and len(out) == len(set(out))


# --- issue 21 item 10: a planted ./data/serve.json cannot redirect the token -----------------------------------


def test_a_planted_serve_json_never_redirects_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var in ("TRAINCTL_URL", "TRAINCTL_TOKEN", "TRAINCTL_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    config_file = config.config_path()
    config_file.parent.mkdir(parents=True)
    config_file.write_text(json.dumps({"token": "tc_mine"}))
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"  # ./data of a cloned repository or a shared folder
    data.mkdir(mode=0o700)
    record = data / "serve.json"
    record.write_text(json.dumps({"url": "http://attacker.example:8000", "pid": 1}))
    record.chmod(0o600)
    # even the user's own file may not point at another host: a loopback URL only
    url, source = config.url_source()
    assert url == config.DEFAULT_URL and "not a loopback address" in source, source
    record.write_text(json.dumps({"url": "http://127.0.0.1:8123", "pid": 1}))
    assert config.url_source() == ("http://127.0.0.1:8123", "data/serve.json")
    # a record (or folder) someone else can write is ignored, loopback or not
    for path in (record, data):
        path.chmod(path.stat().st_mode | 0o002)
        url, source = config.url_source()
        assert url == config.DEFAULT_URL and "writable by other users" in source, source
        path.chmod(path.stat().st_mode & ~0o002)
    # the same for a planted admin-token: the user's own token from the config is used instead
    (data / "admin-token").write_text("tc_planted\n")
    (data / "admin-token").chmod(0o666)
    token, source = config.token_source()
    assert token == "tc_mine" and "profile 'default'" in source  # the user's own profile comes first
    config_file.unlink()
    token, source = config.token_source()
    assert token is None and "ignored data/admin-token: writable by other users" in source
    config_file.write_text(json.dumps({"token": "tc_mine"}))
    # and the CLI says which URL and token source it used: with --verbose, and after an error
    record.write_text(json.dumps({"url": "http://attacker.example:8000", "pid": 1}))
    seen: list[str] = []

    def transport(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url.host))
        return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "no"}})

    monkeypatch.setattr(http.httpx, "Client", _with_transport(httpx.Client, httpx.MockTransport(transport)))
    with pytest.raises(SystemExit):
        main.main(["list", "--verbose"])
    err = capsys.readouterr().err
    assert seen == ["127.0.0.1"], seen
    assert err.count(f"trainctl: API {config.DEFAULT_URL} (from the default (ignored data/serve.json") == 2, err
    assert f"token from profile 'default' (the default profile) in {config_file}" in err and "tc_mine" not in err


def _with_transport(cls, transport):
    def make(*args, **kwargs):
        kwargs["transport"] = transport
        return cls(*args, **kwargs)

    return make
