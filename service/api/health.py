"""GET /healthz: is the store, Ray and the storage reachable? 200 when all are, else 503.

Anyone may ask (load balancers, `make demo`), but only an authenticated admin learns which part is down and
why: the errors name the Ray address, the S3 endpoint and the bucket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

import objstore
from service.api import auth
from service.api.deps import RunnerDep, SettingsDep, StoreDep

router = APIRouter(tags=["health"])
T = TypeVar("T")

CHECK_TIMEOUT_S = 5.0
# Its own threads: neither the pool that runs the `def` routes nor the slow pool (service/api/limits.py), so a
# service busy with slow requests still answers its health check (and says what is down).
HEALTH_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="trainctl-healthz")


async def _in_pool(fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(HEALTH_POOL, fn)


async def _check(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        await asyncio.wait_for(_in_pool(fn), timeout=CHECK_TIMEOUT_S)
        return {"ok": True}
    except TimeoutError:
        return {"ok": False, "error": f"no answer within {CHECK_TIMEOUT_S:.0f}s"}
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def _storage_probe(root: str) -> None:
    fs, path = objstore.resolve(root)
    # A short retry budget: a health check must answer quickly, not ride out an outage.
    objstore.retrying(lambda: fs.get_file_info(path), f"stat {objstore.redact(root)}", budget_s=2)


@router.get("/healthz")
async def healthz(
    settings: SettingsDep,
    store: StoreDep,
    runner: RunnerDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> JSONResponse:
    store_c, ray_c, storage_c = await asyncio.gather(
        _check(store.ping), _check(runner.ray.ping), _check(lambda: _storage_probe(settings.storage_root))
    )
    checks = {"store": store_c, "ray": ray_c, "storage": storage_c}
    down = [name for name, c in checks.items() if not c["ok"]]
    body: dict[str, Any] = {"status": "ok" if not down else "degraded"}
    if not settings.auth or await _in_pool(lambda: _is_admin(store, authorization)):
        body.update(down=down, checks=checks)
    return JSONResponse(body, status_code=200 if not down else 503)


def _is_admin(store: Any, authorization: str | None) -> bool:
    try:
        principal = auth.authenticate(store, authorization)
    except Exception:  # noqa: BLE001 - the store being down must not turn a health check into a 500
        return False
    return principal is not None and principal.is_admin
