"""GET /v1/jobs/{id}/events: a server-sent-events stream of one job — what the dashboard draws from, and
what any client can follow instead of polling.

Events (each `data:` is one JSON object):
- `state`: the job's view (as GET /v1/jobs/{id}, without the spec), first on connect and again whenever its
  state, epoch, attempts or message change;
- `epoch`: one finished epoch's metrics line (metrics.jsonl), every finished epoch once, in order — on
  connect the ones already finished, then each new one;
- `end`: the job reached a terminal state (sent after its last `state`), was deleted, or the token that
  opened the stream was revoked or expired (`{"reason": "token_revoked"}`, checked at every poll); the
  stream then closes.
A comment line every 15 s keeps proxies from closing an idle stream. Streams are limited per owner and in
all (TRAINCTL_MAX_EVENT_STREAMS_PER_OWNER, TRAINCTL_MAX_EVENT_STREAMS): past either, a 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

import objstore
from service.api.deps import JobDep, PrincipalDep, RunnerDep, SettingsDep, StoreDep, StreamSlotsDep
from service.api.limits import StreamSlot
from service.api.openapi import COMMON_ERRORS, errors
from service.api.views import JobFiles, job_view
from service.engine import jobdir
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
        429: {"description": "too many event streams open (for this owner, or in all); see Retry-After"},
    },
)
async def job_events(
    job: JobDep,
    request: Request,
    store: StoreDep,
    runner: RunnerDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    slots: StreamSlotsDep,
) -> StreamingResponse:
    """Follow a job live: `state` on every change, `epoch` per finished epoch, `end` when it is over."""
    job_dir = runner.job_dir(job.id)
    slot = slots.acquire(principal.owner_id)

    async def stream() -> AsyncIterator[str]:
        try:
            async for chunk in events():
                yield chunk
        finally:
            slot.release()

    async def events() -> AsyncIterator[str]:
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
            if not await asyncio.to_thread(principal.still_valid, store):
                yield sse("end", {"reason": "token_revoked"})
                return
            fresh = await asyncio.to_thread(functools.partial(store.get, job.id, cached=True))
            if fresh is None:  # deleted meanwhile
                yield sse("end", {"state": "DELETED"})
                return
            current = fresh

    return _SlotStream(
        slot,
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


class _SlotStream(StreamingResponse):
    """Gives the stream's slot back when the response ends, however it ends (even when the client left
    before the stream's first chunk, so the generator's own `finally` never ran)."""

    def __init__(self, slot: StreamSlot, content: AsyncIterator[str], **kw: Any) -> None:
        super().__init__(content, **kw)
        self._slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()
