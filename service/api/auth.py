"""Bearer tokens. Only a token's sha256 is stored; the admin token is created on first start and written
to <data dir>/admin-token (mode 0600) — and replaced by a new one when that file is missing at a start,
which is how an operator rotates it. A file that exists while the store has no admin token is adopted
instead (an operator-provided token, e.g. a Kubernetes Secret: cluster/kuberay/). Tokens may expire;
revoking one deletes it."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from service.engine.store import Store, TokenIdentity

ADMIN = "admin"
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    name: str  # the owner name shown on jobs
    is_admin: bool
    owner_id: str = "local"  # who owns the jobs it submits (stable; never the name, which a new token may reuse)
    token_hash: str | None = None  # the token it authenticated with: streams end when it is revoked

    def still_valid(self, store: Store) -> bool:
        """Whether the token behind this principal still exists (not revoked, not expired); True without one."""
        return self.token_hash is None or store.token_identity(self.token_hash) is not None


def new_token() -> str:
    return "tc_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(store: Store, name: str, is_admin: bool = False, expires_in_s: float | None = None) -> str:
    """A new token for `name` (store.TokenNameTaken when the name exists), valid for `expires_in_s`
    seconds (None: until revoked); returns the token itself, which is never stored."""
    if not TOKEN_NAME.match(name):
        raise ValueError("token names are 1-64 characters: letters, digits, '_', '.', '-'")
    token = new_token()
    expires_at = None if expires_in_s is None else time.time() + expires_in_s
    store.add_token(name, hash_token(token), is_admin=is_admin, expires_at=expires_at)
    return token


def ensure_admin_token(store: Store, path: Path) -> str | None:
    """Make sure an admin token exists and is in `path`: when the file is missing (first start, or the
    operator deleted it to rotate the token) the old admin token is revoked and a new one written.
    Returns the new token or None."""
    if store.has_admin_token() and path.exists():
        return None
    if path.exists() and not store.has_admin_token() and (given := _token_in(path)):
        store.add_token(ADMIN, hash_token(given), is_admin=True)  # an operator's token (a mounted Secret)
        return None
    store.delete_token(ADMIN)
    token = create_token(store, ADMIN, is_admin=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: force it
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    return token


def _token_in(path: Path) -> str | None:
    """The token an operator put into `path`, or None when it is too short to be one (an empty file, a
    placeholder): such a file is replaced by a new token as before."""
    token = path.read_text(encoding="utf-8", errors="replace").strip()
    return token if len(token) >= 32 and not any(c.isspace() for c in token) else None


def authenticate(store: Store, authorization: str | None) -> Principal | None:
    """The principal for an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return principal_for(store, hash_token(token.strip()))


def principal_for(store: Store, token_hash: str) -> Principal | None:
    who = store.token_identity(token_hash)
    return holder_of(who, token_hash) if who else None


def holder_of(who: TokenIdentity, token_hash: str) -> Principal:
    """The principal of a valid token (`Store.token_identity`, `Store.identity_and_job`)."""
    return Principal(who.name, who.is_admin, who.owner_id, token_hash)
