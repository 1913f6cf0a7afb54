"""/v1/tokens: the admin creates, lists and revokes users' tokens (the CLI's `trainctl token ...`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, Field

from service.api import auth
from service.api.deps import AdminDep, StoreDep
from service.api.errors import ApiError, not_found
from service.api.openapi import COMMON_ERRORS, errors
from service.engine.store import TokenNameTaken

router = APIRouter(tags=["tokens"], responses=COMMON_ERRORS)

MAX_EXPIRES_IN_S = 10 * 365 * 86400


class TokenRequest(BaseModel):
    name: str = Field(pattern=auth.TOKEN_NAME.pattern, description="the owner name jobs are recorded under")
    expires_in_s: float | None = Field(
        default=None, gt=0, le=MAX_EXPIRES_IN_S, description="seconds until the token stops working; omitted: never"
    )


class TokenCreated(BaseModel):
    name: str
    token: str = Field(description="shown once; only its hash is stored")
    expires_at: dt.datetime | None = None


class TokenView(BaseModel):
    name: str
    is_admin: bool
    created_at: dt.datetime
    expires_at: dt.datetime | None
    expired: bool


class TokenList(BaseModel):
    tokens: list[TokenView]


def _time(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC)


def _maybe_time(t: float | None) -> dt.datetime | None:
    return None if t is None else _time(t)


@router.post("/tokens", status_code=201, response_model=TokenCreated, responses=errors(403, 409))
def create_token(body: TokenRequest, store: StoreDep, _admin: AdminDep) -> TokenCreated:
    try:
        token = auth.create_token(store, body.name, expires_in_s=body.expires_in_s)
    except TokenNameTaken:
        raise ApiError(409, "conflict", f"a token named {body.name!r} exists; pick another name") from None
    info = next(t for t in store.list_tokens() if t.name == body.name)
    return TokenCreated(name=body.name, token=token, expires_at=_maybe_time(info.expires_at))


@router.get("/tokens", response_model=TokenList, responses=errors(403))
def list_tokens(store: StoreDep, _admin: AdminDep) -> TokenList:
    """Every token's name, role and expiry (never the token: only its hash is stored)."""
    now = dt.datetime.now(dt.UTC).timestamp()
    return TokenList(
        tokens=[
            TokenView(
                name=t.name,
                is_admin=t.is_admin,
                created_at=_time(t.created_at),
                expires_at=_maybe_time(t.expires_at),
                expired=t.expires_at is not None and t.expires_at <= now,
            )
            for t in store.list_tokens()
        ]
    )


@router.delete("/tokens/{name}", status_code=204, responses=errors(403, 404, 409))
def revoke_token(name: Annotated[str, Path(max_length=64)], store: StoreDep, admin: AdminDep) -> Response:
    """Revoke a token at once. The admin's own token is rotated by deleting <data dir>/admin-token and
    restarting the service, not here (that would lock the admin out)."""
    if name == admin.name:
        raise ApiError(
            409,
            "conflict",
            "the admin token cannot revoke itself; delete <data dir>/admin-token and restart the service to rotate it",
        )
    if not store.delete_token(name):
        raise not_found("token")
    return Response(status_code=204)
