"""One real local Ray head per test session, shared by every test that needs Ray.

Started the way `trainctl serve` starts its own (service/server/localray.py: `ray start --head --block` in its own
process group on 127.0.0.1, dashboard and Jobs API on 127.0.0.1, free ports throughout), with token auth
explicitly disabled so the head and every client agree (Ray 2.60 turns it on by itself otherwise). 6 logical
CPUs on this 2-core machine: a 2-worker DDP run, its driver and a Tune trial's leaked placement group all
fit. Stopped by process group at the end (or by the reaper if pytest dies), never by name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from service.server.localray import LocalRayHead, free_port  # noqa: F401 - free_port is re-exported for tests
from tests.plugins.reaper import reap_with_session

RAY_CPUS = 6

# Ray Train's controller looks at its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and
# only then sees that training finished or a worker died, so every Ray Train run of a test waited up to 2 s
# more at its end (and per restart). Set here, when pytest loads this plugin and before any head or driver
# starts, so the session's head, every `trainctl serve` head and every driver inherit it (Ray passes it on
# from the driver to the controller actor). A shorter period only makes the same checks more often.
#
# LEAN_RAY_ENV: the suite's time is CPU on 2 cores, and most of it is Ray's own processes (bench/RESULTS.md, "Where
# the suite's CPU goes"). Neither setting changes what a test checks: no test reads Ray's own metrics (trainctl's
# /metrics are its own), and the workers a raylet prestarts for its first driver run the default runtime env,
# which no trainctl job uses (trainer/run.py gives every driver env vars), so they were only ever idle.
LEAN_RAY_ENV = {
    "RAY_enable_metrics_collection": "0",
    "RAY_prestart_worker_first_driver": "0",
}
TEST_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", **LEAN_RAY_ENV}
for _name, _value in TEST_RAY_ENV.items():
    os.environ.setdefault(_name, _value)


@dataclass(frozen=True)
class RayHead:
    address: str  # GCS address, for ray.init / RAY_ADDRESS
    dashboard_url: str  # Jobs API
    temp_dir: str

    def env(self) -> dict[str, str]:
        """Environment for a process that should attach to this cluster."""
        return {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled"}


# The session head's own settings (not the drivers', not the other clusters'): Ray Train's preemption watcher, an
# actor per worker group (~1.2 CPU-s to start, 48 CPU-s of one suite run by process accounting), marks the ranks on
# a draining node as preempted. This head is one node and nothing drains it, so here it only costs; the
# multi-node clusters of tests/cluster/ and `trainctl serve`'s heads keep Ray's default.
SESSION_HEAD_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    local = LocalRayHead.start(num_cpus=RAY_CPUS, auth_mode="disabled", extra_env=SESSION_HEAD_ENV)
    reap_with_session(local.proc.pid)
    head = RayHead(local.gcs_address, local.dashboard_url, local.temp_dir)
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = head.address
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield head
    finally:
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
        local.stop(grace_s=5)  # a throwaway cluster: 5 s for the raylet to stop its workers is plenty
