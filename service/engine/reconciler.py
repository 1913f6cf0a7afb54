"""The background task that keeps the store in step with Ray: every `interval` seconds (or at once when
woken, e.g. after a submission) it runs `Runner.reconcile_once` in a worker thread. Started and stopped by
the app's lifespan.

With several API replicas on one database only the replica holding the leader lock (service/engine/leader.py)
reconciles; the others try to take the lock every interval and so take over within about one interval
after the leader dies. (Submissions to a follower wait for the leader's next pass.)"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from service.engine.leader import LeaderLock
from service.engine.runner import Runner

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, runner: Runner, interval_s: float, leader: LeaderLock | None = None) -> None:
        self.runner, self.interval_s = runner, interval_s
        self.leader = leader or LeaderLock(runner.store.engine)
        self.on_pass: Callable[[float], None] | None = None  # told each pass's duration (metrics)
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="trainctl-reconciler")

    def wake(self) -> None:
        """Ask for a pass now; safe to call from any thread."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the pass in progress (a worker thread cannot be interrupted, and the store must not
        be closed under it); cancel only if that pass hangs longer than `timeout_s`."""
        if self._task is None:
            return
        self._stopping = True
        self.wake()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=timeout_s)
        except TimeoutError:
            log.warning("reconcile pass still running after %.0fs; abandoning it", timeout_s)
            self._task.cancel()
        except asyncio.CancelledError:
            pass
        self._task = None
        await asyncio.to_thread(self.leader.release)

    @property
    def is_leader(self) -> bool:
        return self.leader.held

    def _pass(self) -> None:
        was = self.leader.held
        if not self.leader.acquire():
            if was:
                log.warning("lost the reconciler lock; another replica reconciles now")
            return
        if not was:
            log.info("this replica now leads reconciliation")
        t0 = time.perf_counter()
        try:
            self.runner.reconcile_once(still_leader=self.leader.acquire)
        finally:
            if self.on_pass is not None:
                self.on_pass(time.perf_counter() - t0)

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            self._wake.clear()
            try:
                # A pass that is already running in its thread finishes even when we are cancelled: the
                # store's transactions keep it consistent either way.
                await asyncio.to_thread(self._pass)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must survive anything one pass hits
                log.exception("reconcile pass failed")
            if self._stopping:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass
