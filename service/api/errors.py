"""One error shape for every failure: {"error": {"code", "message", "details"}}.

Handlers turn request validation errors, spec validation errors (pydantic's ValidationError from
trainer.spec.resolve), HTTP errors and our own ApiError into that shape; the catch-all logs the exception
and answers a generic 500, so no stack trace ever reaches a client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import objstore
from service.engine.rayjobs import RayUnavailable
from service.engine.states import JobNotFound
from trainer.spec import MAX_ECHO, MAX_ERRORS, error_list

log = logging.getLogger(__name__)

# Models whose ValidationError describes the client's request (their titles are the class names).
CLIENT_MODELS = frozenset({"JobSpec", "PresetRequest"})


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


def not_found(what: str = "job") -> ApiError:
    return ApiError(404, "not_found", f"no such {what}")


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "details": details}}, status_code=status, headers=headers
    )


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


def _request_error_fields(exc: RequestValidationError) -> list[dict[str, str]]:
    out = []
    for e in exc.errors()[:MAX_ERRORS]:
        if e.get("type") == "json_invalid":  # loc is ("body", <character offset>): say so in words
            pos = e["loc"][-1] if e.get("loc") else "?"
            reason = (e.get("ctx") or {}).get("error", "")
            out.append({"field": "body", "message": f"invalid JSON at character {pos}: {reason}".rstrip(": ")})
            continue
        loc = [str(p) for p in e.get("loc", ())]
        if loc and loc[0] == "body":  # the body is the spec: name fields as "optim.lr", not "body.optim.lr"
            loc = loc[1:]
        # Only the message: pydantic's `input` (the bad value itself, maybe megabytes) is never echoed, and a
        # field name made of a client's keys is cut short like any quoted value.
        out.append({"field": _clip(".".join(loc) or "body", MAX_ECHO), "message": _clip(str(e.get("msg", "invalid")))})
    return out


def _clip(text: str, limit: int = 1000) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _request_error_fields(exc)
        return error_response(422, "invalid_request", _summary(details), details)

    @app.exception_handler(ValidationError)
    async def _spec_invalid(request: Request, exc: ValidationError) -> JSONResponse:
        # Only a spec (or the preset/overrides wrapper) the client sent is the client's fault; any other
        # model failing validation is a bug of ours and must not be blamed on the request.
        if exc.title not in CLIENT_MODELS:
            return await _unexpected(request, exc)
        details = error_list(exc)
        return error_response(422, "invalid_spec", _summary(details), details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(JobNotFound)
    async def _job_gone(_: Request, exc: JobNotFound) -> JSONResponse:
        # e.g. deleted between the route loading it and the runner acting on it
        return error_response(404, "not_found", "no such job")

    @app.exception_handler(RayUnavailable)
    async def _ray_down(_: Request, exc: RayUnavailable) -> JSONResponse:
        log.warning("%s", exc)
        return error_response(503, "ray_unavailable", "the Ray cluster is unreachable; try again shortly")

    @app.exception_handler(objstore.StorageUnavailable)
    async def _storage_down(_: Request, exc: objstore.StorageUnavailable) -> JSONResponse:
        log.warning("%s", exc)
        return error_response(503, "storage_unavailable", "job storage is unreachable; try again shortly")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "internal server error; the service log has details")


def _summary(details: list[dict[str, str]]) -> str:
    shown = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
    more = f" (and {len(details) - 5} more)" if len(details) > 5 else ""
    return f"{len(details)} invalid field(s): {shown}{more}"
