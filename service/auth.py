"""Bearer tokens. Only a token's sha256 is stored; the admin token is created on first start and written
once to <data dir>/admin-token (mode 0600)."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from service.store import Store

ADMIN = "admin"
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    name: str        # the owner recorded on jobs
    is_admin: bool


def new_token() -> str:
    return "tc_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(store: Store, name: str, is_admin: bool = False) -> str:
    """A new token for `name` (store.TokenNameTaken when the name exists); returns the token itself,
    which is never stored."""
    if not TOKEN_NAME.match(name):
        raise ValueError("token names are 1-64 characters: letters, digits, '_', '.', '-'")
    token = new_token()
    store.add_token(name, hash_token(token), is_admin=is_admin)
    return token


def ensure_admin_token(store: Store, path: Path) -> str | None:
    """Create the admin token unless one exists; returns the new token (to print once) or None."""
    if store.has_admin_token():
        return None
    token = create_token(store, ADMIN, is_admin=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: force it
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    return token


def authenticate(store: Store, authorization: str | None) -> Principal | None:
    """The principal for an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    owner = store.token_owner(hash_token(token.strip()))
    return Principal(*owner) if owner else None
