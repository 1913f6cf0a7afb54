"""What /openapi.json promises, made true: the bearer scheme, the typed submit body, and the real error shape
with every status a route can return, so Swagger's "Authorize" works and a generated client knows the spec.

FastAPI documents a few things in its own way that this service does differently: the body of POST /v1/jobs
is parsed by trainer.spec (a full spec, or a preset plus overrides) rather than by FastAPI, and every error is
`{"error": {code, message, details}}` rather than `{"detail": ...}`. `install_openapi` rewrites those parts.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas import PresetRequest
from trainer.spec import PRESETS, JobSpec

BEARER = "bearer"  # the security scheme's name in /openapi.json


# Every error.code the service answers with (tests/service/test_openapi.py checks the code base against it).
ERROR_CODES = (
    "bad_host",
    "bad_request",
    "busy",
    "checkpoint_corrupt",
    "conflict",
    "csrf_failed",
    "forbidden",
    "idempotency_conflict",
    "internal_error",
    "invalid_request",
    "invalid_spec",
    "job_not_finished",
    "job_still_stopping",
    "method_not_allowed",
    "no_checkpoint",
    "no_confusion_matrix",
    "no_log",
    "no_metrics",
    "not_a_search",
    "not_found",
    "quota_exceeded",
    "ray_unavailable",
    "storage_unavailable",
    "too_large",
    "too_many_requests",
    "too_many_streams",
    "unauthorized",
    "unavailable",
    "unsupported_media_type",
)


def operation_id(route: APIRoute) -> str:
    """`submit_job` → `submitJob`: readable operationIds (and generated clients' method names)."""
    first, *rest = route.name.split("_")
    return first + "".join(word.capitalize() for word in rest)


class ErrorDetail(BaseModel):
    code: str = Field(
        description="stable, machine-readable, e.g. invalid_spec, not_found, quota_exceeded",
        json_schema_extra={"enum": list(ERROR_CODES)},
    )
    message: str = Field(description="one line a person reads")
    details: Any = Field(None, description="for 422: [{field, message}] (dotted spec paths); else context or null")


class ErrorBody(BaseModel):
    """The shape of every error this API returns."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_spec",
                        "message": "1 invalid field(s): optim.lr: Input should be greater than 0",
                        "details": [{"field": "optim.lr", "message": "Input should be greater than 0"}],
                    }
                }
            ]
        }
    )

    error: ErrorDetail


_WHY = {
    400: "the request body could not be read (e.g. not UTF-8)",
    401: "missing or invalid bearer token",
    403: "only the admin token may do this",
    404: "no such job (another owner's job answers the same)",
    409: "conflict with the job's state (see error.code)",
    413: "request body too large",
    422: "invalid request: error.details names each field ([{field, message}])",
    429: "a quota is reached; see Retry-After",
    500: "a bug: details are in the service log, never in the response",
    502: "the stored checkpoint does not match its recorded sha256/size",
    503: "Ray or storage is unreachable; try again shortly",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the error statuses it can return (install_openapi gives each the ErrorBody
    shape, whatever the route's own media type)."""
    return {s: {"description": _WHY.get(s, "error")} for s in statuses}


# Every authenticated route can answer these.
COMMON_ERRORS = errors(401, 422, 500, 503)


def _submit_body_schema() -> dict[str, Any]:
    return {
        "oneOf": [{"$ref": "#/components/schemas/PresetRequest"}, {"$ref": "#/components/schemas/JobSpec"}],
        "description": "a preset plus dotted-path overrides, or a full spec (omitted fields take defaults)",
    }


def install_openapi(app: FastAPI, *, submit_path: str = "/v1/jobs") -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for model in (JobSpec, PresetRequest, ErrorBody):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas[model.__name__] = body
        for component in schemas.values():  # a model-valued default (search.scheduler) trips client generators;
            for prop in component.get("properties", {}).values():  # the server applies it anyway
                if "oneOf" in prop and isinstance(prop.get("default"), dict):
                    del prop["default"]
        preset = schemas["PresetRequest"]["properties"]["preset"]  # an enum, though resolve() checks it
        preset["anyOf"] = [{"type": "string", "enum": sorted(PRESETS)}, {"type": "null"}]
        # FastAPI's {"detail": ...} validation error is never what this service returns.
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        for path_item in schema.get("paths", {}).values():
            for op in path_item.values():
                if "requestBody" in op:  # any route that reads a body: an unreadable one (400), a huge one (413)
                    for status in ("400", "413"):
                        op.setdefault("responses", {}).setdefault(status, {})
                for status, resp in op.get("responses", {}).items():
                    if status.startswith(("4", "5")):
                        resp["content"] = error_content
                        resp["description"] = _WHY.get(int(status), resp.get("description", "error"))
        for path in (submit_path, "/v1/estimates"):  # both read a submission's body
            post = schema["paths"].get(path, {}).get("post")
            if post is not None:
                content = post.setdefault("requestBody", {"required": True}).setdefault("content", {})
                examples = content.get("application/json", {}).get("examples")
                content["application/json"] = {
                    "schema": _submit_body_schema(),
                    **({"examples": examples} if examples else {}),
                }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
