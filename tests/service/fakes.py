"""A fake Ray Jobs API for unit tests: records submissions and lets a test decide how each one ends."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from service.engine.rayjobs import Placement, RayJobInfo, RayUnavailable


@dataclass
class FakeJob:
    entrypoint: str
    num_cpus: float
    env_vars: dict[str, str]
    metadata: dict[str, str]
    status: str = "PENDING"
    exit_code: int | None = None
    message: str = ""
    logs: str = ""
    resources: dict[str, float] | None = None


@dataclass
class FakeRay:
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    down: bool = False
    stopped: list[str] = field(default_factory=list)
    placements: dict[str, Placement] = field(default_factory=dict)  # by submission id; absent: unknown
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _check(self) -> None:
        if self.down:
            raise RayUnavailable("fake Ray is down")

    def submit(
        self,
        submission_id: str,
        entrypoint: str,
        *,
        num_cpus: float,
        env_vars: dict[str, str],
        metadata: dict[str, str],
        resources: dict[str, float] | None = None,
    ) -> None:
        self._check()
        with self.lock:
            if submission_id in self.jobs:
                return  # like RayJobsClient: a duplicate submission id is "already submitted"
            self.jobs[submission_id] = FakeJob(
                entrypoint,
                num_cpus,
                env_vars,
                metadata,
                logs="".join(f"line {i}\n" for i in range(1, 11)),
                resources=resources,
            )

    def info(self, submission_id: str) -> RayJobInfo | None:
        self._check()
        j = self.jobs.get(submission_id)
        return RayJobInfo(j.status, j.message, j.exit_code, driver_job_id=submission_id) if j else None

    def placement(self, info: RayJobInfo) -> Placement | None:
        return self.placements.get(info.driver_job_id or "")

    def stop(self, submission_id: str) -> bool:
        self._check()
        j = self.jobs.get(submission_id)
        if j is None or j.status in {"STOPPED", "SUCCEEDED", "FAILED"}:
            return False
        j.status = "STOPPED"
        self.stopped.append(submission_id)
        return True

    def logs(self, submission_id: str) -> str:
        self._check()
        j = self.jobs.get(submission_id)
        return j.logs if j else ""

    def delete(self, submission_id: str) -> None:
        self.jobs.pop(submission_id, None)

    def ping(self) -> str:
        self._check()
        return "2.60.0"

    # --- test controls ---
    def set(self, submission_id: str, status: str, exit_code: int | None = None, message: str = "") -> None:
        j = self.jobs[submission_id]
        j.status, j.exit_code, j.message = status, exit_code, message

    def forget(self, submission_id: str) -> None:
        """As if the head restarted and lost its job table."""
        self.jobs.pop(submission_id, None)
