"""GET /v1/jobs/{id}/events: a server-sent-events stream of one job — what the dashboard draws from, and
what any client can follow instead of polling.

Events (each `data:` is one JSON object):
- `state`: the job's view (as GET /v1/jobs/{id}, without the spec), first on connect and again whenever its
  state, epoch, attempts or message change;
- `epoch`: one finished epoch's metrics line (metrics.jsonl), every finished epoch once, in order — on
  connect the ones already finished, then each new one;
- `end`: the job reached a terminal state (sent after its last `state`); the stream then closes.
A comment line every 15 s keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

import objstore
from service import jobdir
from service.api.deps import JobDep, RunnerDep, SettingsDep, StoreDep
from service.api.openapi import COMMON_ERRORS, errors
from service.views import JobFiles, job_view
from trainer.contract import EpochMetrics

router = APIRouter(tags=["jobs"], responses=COMMON_ERRORS)

KEEPALIVE_S = 15.0


def sse(event: str, data: object, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "events `state`, `epoch` and `end` (see the module docs)",
        },
        **errors(404),
    },
)
async def job_events(
    job: JobDep, request: Request, store: StoreDep, runner: RunnerDep, settings: SettingsDep
) -> StreamingResponse:
    """Follow a job live: `state` on every change, `epoch` per finished epoch, `end` when it is over."""
    job_dir = runner.job_dir(job.id)

    async def stream() -> AsyncIterator[str]:
        seq, last_epoch, last_key, last_sent = 0, 0, None, time.monotonic()
        current = job
        while True:
            if await request.is_disconnected():
                return
            metrics: list[EpochMetrics] | None = None
            if current.state.value != "QUEUED":
                try:
                    metrics = await asyncio.to_thread(jobdir.read_metrics, job_dir)
                except objstore.StorageUnavailable:
                    metrics = None  # say nothing new until storage answers again; the state still flows
            for m in metrics or []:
                if m.epoch > last_epoch:
                    seq += 1
                    yield sse("epoch", m.model_dump(mode="json"), seq)
                    last_epoch, last_sent = m.epoch, time.monotonic()
            # progress, latest metrics and best so far from the metrics just read: fresher than the store's,
            # which the reconciler updates on its own schedule
            view = job_view(current, JobFiles(metrics=metrics)).model_dump(mode="json")
            key = (view["state"], view["progress"]["epoch"], view["attempts"], view["message"])
            if key != last_key:
                seq += 1
                yield sse("state", view, seq)
                last_key, last_sent = key, time.monotonic()
            if current.state.is_terminal():
                yield sse("end", {"state": current.state.value})
                return
            if time.monotonic() - last_sent > KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            await asyncio.sleep(settings.events_poll_s)
            fresh = await asyncio.to_thread(store.get, job.id)
            if fresh is None:  # deleted meanwhile
                yield sse("end", {"state": "DELETED"})
                return
            current = fresh

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
