"""A secret key kept in a file under the data dir: the dashboard's session key (service/ui/session.py) and
the key that signs job records (service/engine/records.py). Shared here so the engine needs nothing of the UI."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def load_or_create_secret(path: Path) -> bytes:
    """The key in `path` (mode 0600), created on first use, so a restart keeps sessions and signatures valid."""
    if path.exists():
        raw = path.read_text().strip()
        if len(raw) >= 32:
            return raw.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    return key.encode()
