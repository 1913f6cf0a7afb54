"""Where to connect and with which token: flags, environment, a profile of the config file, and the files a
running `trainctl serve` leaves in its data dir.

The first that gives a URL wins (the token follows the same order):
1. the `url`/`token` arguments (`--url`, `--token`);
2. TRAINCTL_URL / TRAINCTL_TOKEN;
3. a profile of the config file (`trainctl login` writes it): the one named by the `profile` argument
   (`--profile`) or TRAINCTL_PROFILE, else the file's default profile. A profile's token is sent only to that
   profile's URL: with a URL from 1 or 2 naming another server, the token comes from what follows;
4. the data dir (the `data_dir` argument, TRAINCTL_DATA_DIR, default ./data): the loopback URL a running
   `trainctl serve` recorded in serve.json, and its admin-token;
5. http://127.0.0.1:8000, and no token.

The config file is `config.json` in the platform's user config folder (platformdirs: $XDG_CONFIG_HOME/trainctl
or ~/.config/trainctl on Linux): `{"default": NAME, "profiles": {NAME: {"url": ..., "token": ...}}}`, mode
0600. A file of the older form `{"url", "token"}` reads as one profile named "default".

The data dir defaults to ./data of the current directory, which anyone may have written (a cloned repository,
a shared folder): its serve.json and admin-token are used only when they are the user's own (owned by this
user, in a folder of this user's, neither writable by others) and serve.json names a loopback URL — so a
planted ./data/serve.json can never send the user's token to another host. The config file is read only on
the same terms. `url_source`/`token_source` say where each came from (and what was ignored); the CLI prints
them with --verbose and on errors.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import platformdirs

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_PROFILE = "default"


class ProfileError(ValueError):
    """A profile that was asked for by name (--profile, TRAINCTL_PROFILE) and is not in the config file."""


def config_path() -> Path:
    """The config file: read at each call, so XDG_CONFIG_HOME set later is honoured."""
    return Path(platformdirs.user_config_dir("trainctl", appauthor=False)) / "config.json"


def load_config(path: Path | None = None) -> dict[str, Any]:
    """The config file as {"default": name or None, "profiles": {name: {"url", "token"}}}; empty when it is
    missing, unreadable, not the user's own or not JSON (the old {"url", "token"} form: profile "default")."""
    path = path or config_path()
    empty: dict[str, Any] = {"default": None, "profiles": {}}
    if untrusted_file(path) is not None:
        return empty
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return empty
    if not isinstance(data, dict):
        return empty
    if "profiles" not in data:  # the older single-server form
        legacy = {k: v for k, v in data.items() if k in ("url", "token") and isinstance(v, str)}
        return {"default": DEFAULT_PROFILE, "profiles": {DEFAULT_PROFILE: legacy}} if legacy else empty
    profiles = data.get("profiles")
    profiles = {
        str(name): {k: v for k, v in p.items() if k in ("url", "token") and isinstance(v, str)}
        for name, p in (profiles.items() if isinstance(profiles, dict) else [])
        if isinstance(p, dict)
    }
    default = data.get("default")
    return {"default": default if isinstance(default, str) else None, "profiles": profiles}


def save_config(config: dict[str, Any], path: Path | None = None) -> Path:
    """Write the config file atomically, readable by the user alone (0600, its folder 0700)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class Profile:
    name: str
    url: str | None
    token: str | None
    how: str  # how it was chosen, for the source texts


def selected_profile(profile: str | None = None) -> Profile | None:
    """The profile in use: named by `profile` or TRAINCTL_PROFILE (ProfileError when the file lacks it), else
    the config file's default; None when there is none."""
    config = load_config()
    name, how = profile, "--profile"
    if not name and os.environ.get("TRAINCTL_PROFILE"):
        name, how = os.environ["TRAINCTL_PROFILE"], "TRAINCTL_PROFILE"
    if name:
        if name not in config["profiles"]:
            known = ", ".join(sorted(config["profiles"])) or "none"
            raise ProfileError(
                f"no profile {name!r} ({how}) in {config_path()} (profiles: {known}); "
                f"add it with `trainctl login URL --profile {name}`"
            )
    else:
        name, how = config["default"], "the default profile"
        if not name or name not in config["profiles"]:
            return None
    p = config["profiles"][name]
    url = p.get("url")
    return Profile(name, url.rstrip("/") if url else None, p.get("token") or None, how)


def selected_profile_name(profile: str | None = None) -> str | None:
    """The name of the profile that would be used (without checking that the file has it)."""
    return profile or os.environ.get("TRAINCTL_PROFILE") or load_config()["default"]


def _profile_text(p: Profile) -> str:
    return f"profile {p.name!r} ({p.how}) in {config_path()}"


def resolve_url(url: str | None = None, data_dir: str | None = None, profile: str | None = None) -> str:
    return url_source(url, data_dir, profile)[0]


def url_source(url: str | None = None, data_dir: str | None = None, profile: str | None = None) -> tuple[str, str]:
    """(the URL to use, where it came from — with any serve.json that was ignored, and why)."""
    if url:
        return url.rstrip("/"), "the url argument (--url)"
    if os.environ.get("TRAINCTL_URL"):
        return os.environ["TRAINCTL_URL"].rstrip("/"), "TRAINCTL_URL"
    chosen = selected_profile(profile)
    if chosen is not None and chosen.url:
        return chosen.url, _profile_text(chosen)
    record = _data_dir(data_dir) / "serve.json"
    served, why_not = _served_url(record)
    if served:
        return served.rstrip("/"), str(record)
    ignored = f" (ignored {record}: {why_not})" if why_not else ""
    return DEFAULT_URL, f"the default{ignored}"


def configured_url(url: str | None = None, data_dir: str | None = None, profile: str | None = None) -> str | None:
    """The service URL when one is configured (a flag, TRAINCTL_URL, a profile, or a running `serve`'s
    serve.json); None when only the default would be tried."""
    found, source = url_source(url, data_dir, profile)
    return None if source.startswith("the default") else found


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


def resolve_token(
    token: str | None = None, data_dir: str | None = None, profile: str | None = None, url: str | None = None
) -> str | None:
    return token_source(token, data_dir, profile, url)[0]


def token_source(
    token: str | None = None, data_dir: str | None = None, profile: str | None = None, url: str | None = None
) -> tuple[str | None, str]:
    """(the token to send or None, where it came from — never the token itself). `url`: the --url given, if
    any (a profile's token goes only to that profile's URL)."""
    if token:
        return token, "the token argument (--token)"
    if os.environ.get("TRAINCTL_TOKEN"):
        return os.environ["TRAINCTL_TOKEN"], "TRAINCTL_TOKEN"
    chosen = selected_profile(profile)
    skipped = ""
    if chosen is not None and chosen.token:
        target = resolve_url(url, data_dir, profile)
        if chosen.url is None or target == chosen.url:  # a profile without a URL (the older form) binds none
            return chosen.token, _profile_text(chosen)
        skipped = f" (not {_profile_text(chosen)}: its token is for {chosen.url}, not {target})"
    path = _data_dir(data_dir) / "admin-token"
    why_not = untrusted_file(path)
    if why_not is None:
        try:
            return path.read_text().strip(), f"{path}{skipped}"
        except OSError:
            why_not = "unreadable"
    ignored = f" (ignored {path}: {why_not})" if why_not != "missing" else ""
    return None, f"none{ignored}{skipped}"
