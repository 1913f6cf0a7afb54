"""CLI pieces that need no server: spec files + --set, config lookup, and `best` refusing a download whose
sha256 does not match the server's header (the e2e tests cover the CLI against a real service)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from service import cli


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_submit_body_from_preset_and_file(tmp_path: Path) -> None:
    assert cli._load_body(parse("submit", "--preset", "debug", "--set", "optim.epochs=3",
                                "--set", "data.train=/x")) == {
        "preset": "debug", "overrides": {"optim.epochs": 3, "data.train": "/x"}}
    f = tmp_path / "job.yaml"
    f.write_text("preset: debug\noverrides:\n  optim.epochs: 5\n")
    assert cli._load_body(parse("submit", str(f), "--set", "optim.lr=0.1")) == {
        "preset": "debug", "overrides": {"optim.epochs": 5, "optim.lr": 0.1}}
    g = tmp_path / "full.json"
    g.write_text(json.dumps({"optim": {"epochs": 5}}))
    assert cli._load_body(parse("submit", str(g), "--set", "optim.lr=0.1")) == {"optim": {"epochs": 5, "lr": 0.1}}
    with pytest.raises(cli.CliError, match="path=value"):
        cli._load_body(parse("submit", "--preset", "debug", "--set", "nonsense"))
    with pytest.raises(SystemExit):
        parse("submit")  # a file or --preset is required


def test_token_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAINCTL_TOKEN", raising=False)
    monkeypatch.setattr(cli, "CONFIG_PATH", tmp_path / "config.json")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "admin-token").write_text("tok-file\n")
    assert cli._token(parse("list", "--data-dir", str(tmp_path / "data"))) == "tok-file"
    monkeypatch.setenv("TRAINCTL_TOKEN", "tok-env")
    assert cli._token(parse("list", "--data-dir", str(tmp_path / "data"))) == "tok-env"
    monkeypatch.delenv("TRAINCTL_TOKEN")
    (tmp_path / "config.json").write_text(json.dumps({"url": "http://h:1", "token": "tok-cfg"}))
    monkeypatch.delenv("TRAINCTL_URL", raising=False)
    args = parse("list", "--data-dir", str(tmp_path / "nowhere"))
    assert cli._token(args) == "tok-cfg" and cli._url(args) == "http://h:1"


@pytest.mark.parametrize("announced_ok", [True, False])
def test_best_verifies_the_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
                                    announced_ok: bool) -> None:
    payload = b"checkpoint-bytes" * 1000
    sha = hashlib.sha256(payload).hexdigest() if announced_ok else "0" * 64

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=payload, headers={"X-Checkpoint-SHA256": sha})

    monkeypatch.setattr(cli, "_client", lambda args, timeout=30: httpx.Client(
        base_url="http://test", transport=httpx.MockTransport(handler)))
    out = tmp_path / "best.pt"
    args = parse("best", "job1", "-o", str(out))
    if announced_ok:
        assert cli.cmd_best(args) == 0 and out.read_bytes() == payload
    else:
        with pytest.raises(cli.CliError, match="CHECKSUM MISMATCH"):
            cli.cmd_best(args)
        assert not out.exists()
    assert not (tmp_path / "best.pt.part").exists()


def test_errors_are_printed_with_fields(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    body = {"error": {"code": "invalid_spec", "message": "1 invalid field(s)",
                      "details": [{"field": "optim.lr", "message": "Input should be greater than 0"}]}}
    monkeypatch.setattr(cli, "_client", lambda args, timeout=30: httpx.Client(
        base_url="http://test", transport=httpx.MockTransport(lambda r: httpx.Response(422, json=body))))
    with pytest.raises(SystemExit) as exc:
        cli.main(["submit", "--preset", "debug", "--set", "optim.lr=-1"])
    assert exc.value.code == 1
    assert "optim.lr: Input should be greater than 0" in capsys.readouterr().err


def test_unreachable_service_names_the_url(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from tests.plugins.ray_cluster import free_port

    with pytest.raises(SystemExit) as exc:
        cli.main(["list", "--url", f"http://127.0.0.1:{free_port()}", "--token", "x"])
    assert exc.value.code == 1 and "cannot reach trainctl" in capsys.readouterr().err
