"""POST /v1/tokens: the admin creates a token for another user (the CLI's `trainctl token create`)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service import auth
from service.api.deps import AdminDep, StoreDep
from service.api.openapi import COMMON_ERRORS, errors
from service.errors import ApiError
from service.store import TokenNameTaken

router = APIRouter(tags=["tokens"], responses=COMMON_ERRORS)


class TokenRequest(BaseModel):
    name: str = Field(pattern=auth.TOKEN_NAME.pattern, description="the owner name jobs are recorded under")


class TokenCreated(BaseModel):
    name: str
    token: str = Field(description="shown once; only its hash is stored")


@router.post("/tokens", status_code=201, response_model=TokenCreated, responses=errors(403, 409))
def create_token(body: TokenRequest, store: StoreDep, _admin: AdminDep) -> TokenCreated:
    try:
        return TokenCreated(name=body.name, token=auth.create_token(store, body.name))
    except TokenNameTaken:
        raise ApiError(409, "conflict", f"a token named {body.name!r} exists; pick another name") from None
