"""GET /metrics: Prometheus text format, for the admin token only: its series carry job ids and owner names,
which the API shows a user only for their own jobs (docs/security.md). Prometheus sends the token with
`authorization: {credentials_file: ...}` (cluster/prometheus/prometheus.yml)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import AdminDep
from service.api.openapi import errors

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}, **errors(401, 403)})
def metrics(request: Request, _admin: AdminDep) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
