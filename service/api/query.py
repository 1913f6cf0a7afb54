"""Unknown query parameters are an error, not silently ignored: `GET /v1/jobs?tga=x` would otherwise answer
200 with every job, and the caller would believe the list was filtered."""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from service.api.errors import ApiError

_ATTR = "_trainctl_query_names"  # kept on the route itself: it lives exactly as long as its names are right


def _declared(route: APIRoute) -> frozenset[str]:
    known: frozenset[str] | None = getattr(route, _ATTR, None)
    if known is None:
        known = frozenset(_query_names(route.dependant))
        setattr(route, _ATTR, known)
    return known


def _query_names(dependant: Dependant) -> set[str]:
    """The route's query parameters and those of its dependencies, at any depth."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def reject_unknown_query(request: Request) -> None:
    """A router dependency: 422 naming each query parameter the route does not take (`query.NAME`, as FastAPI
    names a bad value of a known one). `async`, though it never awaits: a plain `def` dependency costs every
    /v1 request a threadpool hand-off."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    unknown = sorted(set(request.query_params) - _declared(route))
    if unknown:
        accepted = ", ".join(sorted(_declared(route))) or "none"
        raise ApiError(
            422,
            "invalid_request",
            f"unknown query parameter(s) {', '.join(unknown)}; this route takes: {accepted}",
            [
                {"field": f"query.{name}", "message": f"unknown query parameter (accepted: {accepted})"}
                for name in unknown
            ],
        )
