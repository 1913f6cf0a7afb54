"""Where to connect and with which token: flags, environment, the config file's profiles, and the files a
running `trainctl serve` leaves in its data dir.

Where to connect: the `url` argument, else TRAINCTL_URL, else the URL a running `trainctl serve` recorded in
<data dir>/serve.json, else ~/.config/trainctl/config.json {"url", "token"},
else http://127.0.0.1:8000. The token: the `token` argument, else TRAINCTL_TOKEN, else <data dir>/admin-token
(data dir from the argument / TRAINCTL_DATA_DIR, default ./data), else the config file.

The data dir defaults to ./data of the current directory, which anyone may have written (a cloned repository,
a shared folder): its serve.json and admin-token are used only when they are the user's own (owned by this
user, in a folder of this user's, neither writable by others) and serve.json names a loopback URL — so a
planted ./data/serve.json can never send the user's token to another host. `url_source`/`token_source`
say where each came from (and what was ignored); the CLI prints them with --verbose and on errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

CONFIG_PATH = Path("~/.config/trainctl/config.json").expanduser()


DEFAULT_URL = "http://127.0.0.1:8000"


def load_config(path: Path | None = None) -> dict[str, Any]:
    try:
        data = json.loads((path or CONFIG_PATH).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def resolve_url(url: str | None = None, data_dir: str | None = None) -> str:
    return url_source(url, data_dir)[0]


def url_source(url: str | None = None, data_dir: str | None = None) -> tuple[str, str]:
    """(the URL to use, where it came from — with any serve.json that was ignored, and why)."""
    if url:
        return url.rstrip("/"), "the url argument (--url)"
    if os.environ.get("TRAINCTL_URL"):
        return os.environ["TRAINCTL_URL"].rstrip("/"), "TRAINCTL_URL"
    record = _data_dir(data_dir) / "serve.json"
    served, why_not = _served_url(record)
    if served:
        return served.rstrip("/"), str(record)
    ignored = f" (ignored {record}: {why_not})" if why_not else ""
    configured = load_config().get("url")
    if isinstance(configured, str) and configured:
        return configured.rstrip("/"), f"{CONFIG_PATH}{ignored}"
    return DEFAULT_URL, f"the default{ignored}"


def configured_url(url: str | None = None, data_dir: str | None = None) -> str | None:
    """The service URL when one is configured (a flag, TRAINCTL_URL, a running `serve`'s serve.json, or the
    config file); None when only the default would be tried."""
    found = url or os.environ.get("TRAINCTL_URL") or served_url(data_dir) or load_config().get("url")
    return found.rstrip("/") if isinstance(found, str) and found else None


def served_url(data_dir: str | None = None) -> str | None:
    """The URL `trainctl serve` recorded in its data dir (<data dir>/serve.json) while it runs, so a
    `serve --port N` is found by the CLI run with the same data dir; None unless the record is trusted."""
    return _served_url(_data_dir(data_dir) / "serve.json")[0]


def _data_dir(data_dir: str | None) -> Path:
    return Path(data_dir or os.environ.get("TRAINCTL_DATA_DIR") or "data").expanduser()


def untrusted_file(path: Path) -> str | None:
    """Why `path` is not the user's own file (None when it is): it and its folder must belong to this user
    and be writable by nobody else. An existing-file check, not a permission system: enough that a file
    someone else planted where the CLI looks is ignored."""
    try:
        st, folder = path.stat(), path.parent.stat()
    except OSError:
        return "missing"
    uid = os.getuid()
    if st.st_uid != uid or folder.st_uid != uid:
        return f"owned by uid {st.st_uid if st.st_uid != uid else folder.st_uid}, not by you (uid {uid})"
    if st.st_mode & 0o022 or folder.st_mode & 0o022:
        return "writable by other users"
    return None


def _served_url(record: Path) -> tuple[str | None, str | None]:
    """(url, None) for a trusted serve.json; (None, why it was ignored) for an untrusted one; (None, None)
    when there is none."""
    if not record.exists():
        return None, None
    why_not = untrusted_file(record)
    if why_not:
        return None, why_not
    try:
        url = json.loads(record.read_text()).get("url")
    except (OSError, ValueError, AttributeError):
        return None, "not a serve record"
    if not isinstance(url, str) or not url.startswith("http"):
        return None, "not a serve record"
    if not _is_loopback_url(url):
        return None, f"it names {url}, not a loopback address (pass --url or set TRAINCTL_URL for that)"
    return url, None


def _is_loopback_url(url: str) -> bool:
    try:
        host = httpx.URL(url).host
    except (httpx.InvalidURL, ValueError):
        return False
    return host in ("127.0.0.1", "::1", "localhost")


def resolve_token(token: str | None = None, data_dir: str | None = None) -> str | None:
    return token_source(token, data_dir)[0]


def token_source(token: str | None = None, data_dir: str | None = None) -> tuple[str | None, str]:
    """(the token to send or None, where it came from — never the token itself)."""
    if token:
        return token, "the token argument (--token)"
    if os.environ.get("TRAINCTL_TOKEN"):
        return os.environ["TRAINCTL_TOKEN"], "TRAINCTL_TOKEN"
    path = _data_dir(data_dir) / "admin-token"
    why_not = untrusted_file(path)
    if why_not is None:
        try:
            return path.read_text().strip(), str(path)
        except OSError:
            why_not = "unreadable"
    ignored = f" (ignored {path}: {why_not})" if why_not != "missing" else ""
    configured = load_config().get("token")
    if isinstance(configured, str) and configured:
        return configured, f"{CONFIG_PATH}{ignored}"
    return None, f"none{ignored}"
