"""service/server/startup.py: the start-up steps `trainctl serve` and the app's lifespan share."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from service.common.settings import load_settings
from service.server import startup


def test_prepare_makes_a_private_data_dir_a_schema_and_one_admin_token(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data")
    said: list[str] = []
    startup.prepare(settings, say=said.append, warn=said.append).close()
    assert stat.S_IMODE(settings.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(settings.admin_token_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.db_path.stat().st_mode) == 0o600
    token = settings.admin_token_path.read_text()
    assert any("a new admin token is in" in s for s in said) and not any(token.strip() in s for s in said)
    said.clear()
    store = startup.prepare(settings, say=said.append, warn=said.append)  # again: idempotent
    try:
        assert settings.admin_token_path.read_text() == token and any("the admin token is in" in s for s in said)
        assert store.has_admin_token()
    finally:
        store.close()


def test_prepare_refuses_before_touching_anything(tmp_path: Path) -> None:
    open_off_loopback = load_settings(data_dir=tmp_path / "a", auth=False, host="0.0.0.0")
    with pytest.raises(startup.StartupRefused, match="loopback"):
        startup.prepare(open_off_loopback)
    assert not (tmp_path / "a").exists()
    bad_db = load_settings(data_dir=tmp_path / "b", database_url="postgresql+psycopg://u:secret@127.0.0.1:1/none")
    with pytest.raises(startup.StartupRefused, match="cannot open the job database") as err:
        startup.prepare(bad_db)
    assert "secret" not in str(err.value)  # the password never reaches a log


def test_no_auth_on_loopback_warns(tmp_path: Path) -> None:
    warned: list[str] = []
    startup.prepare(load_settings(data_dir=tmp_path / "d", auth=False), warn=warned.append).close()
    assert any("NO AUTHENTICATION" in w for w in warned)
