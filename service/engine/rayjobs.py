"""The service's narrow view of the Ray Jobs API (JobSubmissionClient), so the runner can be tested with a
fake and the rest of the service never imports Ray.

All calls block (the SDK uses `requests`): call them from a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

log = logging.getLogger(__name__)


class RayUnavailable(RuntimeError):
    """The Ray cluster (its Jobs API) could not be reached."""


class RayJobStatus(str, Enum):
    """A Ray job's status: ray.job_submission.JobStatus, mirrored so the service need not import Ray."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value

    def is_terminal(self) -> bool:
        """A terminal status is never left."""
        return self in (RayJobStatus.STOPPED, RayJobStatus.SUCCEEDED, RayJobStatus.FAILED)


@dataclass(frozen=True)
class RayJobInfo:
    status: RayJobStatus
    message: str | None = None
    exit_code: int | None = None  # the driver's exit code once it ended
    driver_job_id: str | None = None  # Ray's own job id (hex) once the driver connected to the cluster

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", RayJobStatus(str(self.status)))  # also from Ray's own enum or a str


@dataclass(frozen=True)
class Placement:
    """Where a running driver's workers stand: `placed` once one of its placement groups is created (its
    training workers hold their resources); else what its pending groups need and what the cluster has free."""

    placed: bool
    needs: dict[str, float]
    free: dict[str, float]
    note: str | None = None  # why nothing is placed when nothing is pending either

    def waiting_text(self) -> str | None:
        """`waiting for resources: needs 8 CPU, 5.5 free` (None once placed)."""
        if self.placed:
            return None
        if not self.needs:
            return self.note or "starting: the driver runs, its workers are not placed yet"
        wants = ", ".join(
            f"{_num(v)} {k}" + (f", {_num(self.free.get(k, 0.0))} free" if self.free else "")
            for k, v in sorted(self.needs.items())
            if k in ("CPU", "GPU") or not k.startswith(("memory", "object_store", "bundle", "node:"))
        )
        return f"waiting for resources: needs {wants or 'resources'}"


def _num(v: float) -> str:
    return f"{v:g}"


class RayJobs(Protocol):
    def submit(
        self,
        submission_id: str,
        entrypoint: str,
        *,
        num_cpus: float,
        env_vars: dict[str, str],
        metadata: dict[str, str],
        resources: dict[str, float] | None = None,
    ) -> None: ...
    def info(self, submission_id: str) -> RayJobInfo | None: ...  # None: Ray has no such job
    def stop(self, submission_id: str) -> bool: ...  # False: it had already ended
    def logs(self, submission_id: str) -> str: ...
    def delete(self, submission_id: str) -> None: ...
    def ping(self) -> str: ...  # the cluster's Ray version
    def placement(self, info: RayJobInfo) -> Placement | None: ...  # None: cannot tell


def _not_found(exc: Exception) -> bool:
    text = str(exc)
    return "status code 404" in text or "does not exist" in text


def _already_exists(exc: Exception) -> bool:
    return "already exists" in str(exc)


class RayJobsClient:
    """RayJobs over a real cluster. `address` is a Jobs API URL (http://host:8265), a GCS address
    (host:6379, resolved to the dashboard through GCS), or "" to let Ray auto-detect a local cluster."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Any:
        from ray.job_submission import JobSubmissionClient  # imported late: the service starts fast

        # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its `address` argument;
        # point the override at our configured address while it resolves, so an unrelated RAY_ADDRESS in
        # the environment cannot send our jobs to another cluster.
        saved = os.environ.get("RAY_API_SERVER_ADDRESS")
        try:
            if self.address:
                os.environ["RAY_API_SERVER_ADDRESS"] = self.address
            return JobSubmissionClient(self.address or None)
        except Exception as exc:  # any failure to connect means "unreachable" to callers
            raise RayUnavailable(f"cannot reach the Ray Jobs API at {self.address or '(auto-detect)'}: {exc}") from exc
        finally:
            if saved is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = saved

    def _call(self, what: str, fn: Any) -> Any:
        client = self._get()
        try:
            return fn(client)
        except RuntimeError as exc:
            # A 5xx is the cluster not being ready ("No available agent to submit job, please try again
            # later" right after a head starts): transient, like a connection error.
            if re.search(r"status code 5\d\d", str(exc)):
                raise RayUnavailable(f"Ray Jobs API error while trying to {what}: {exc}") from exc
            raise  # the job server answered (404, 400, ...): the caller decides
        except Exception as exc:  # connection errors: drop the client, reconnect next time
            with self._lock:
                self._client = None
            raise RayUnavailable(f"Ray Jobs API unreachable while trying to {what}: {exc}") from exc

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
        runtime_env = {"env_vars": env_vars} if env_vars else None
        try:
            self._call(
                "submit a job",
                lambda c: c.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    entrypoint_num_cpus=num_cpus,
                    entrypoint_resources=resources or None,
                    runtime_env=runtime_env,
                    metadata=metadata,
                ),
            )
        except RuntimeError as exc:
            if not _already_exists(exc):  # a retry after a lost response: it is submitted, fine
                raise

    def info(self, submission_id: str) -> RayJobInfo | None:
        try:
            d = self._call("get a job's status", lambda c: c.get_job_info(submission_id))
        except RuntimeError as exc:
            if _not_found(exc):
                return None
            raise
        return RayJobInfo(
            status=RayJobStatus(str(d.status)),
            message=d.message,
            exit_code=getattr(d, "driver_exit_code", None),
            driver_job_id=getattr(d, "job_id", None),
        )

    def stop(self, submission_id: str) -> bool:
        try:
            return bool(self._call("stop a job", lambda c: c.stop_job(submission_id)))
        except RuntimeError as exc:
            if _not_found(exc):
                return False
            raise

    def logs(self, submission_id: str) -> str:
        try:
            return str(self._call("read a job's logs", lambda c: c.get_job_logs(submission_id)))
        except RuntimeError as exc:
            if _not_found(exc):
                return ""
            raise

    def delete(self, submission_id: str) -> None:
        try:
            self._call("delete a job", lambda c: c.delete_job(submission_id))
        except RuntimeError as exc:
            log.debug("Ray job %s not deleted: %s", submission_id, exc)

    def ping(self) -> str:
        return str(self._call("read the cluster version", lambda c: c.get_version()))

    def placement(self, info: RayJobInfo) -> Placement | None:
        """The driver's placement groups (Ray's state API, through the dashboard with our client's auth) and
        the cluster's free resources. None when Ray cannot tell: callers then go by the job status alone."""
        if info.status != "RUNNING":
            return None
        if not info.driver_job_id:
            return Placement(False, {}, {}, note="starting: the driver is connecting to the cluster")
        try:
            groups = self._get_json(
                "/api/v0/placement_groups",
                {
                    "detail": "1",
                    "limit": "1000",
                    "filter_keys": "creator_job_id",
                    "filter_predicates": "=",
                    "filter_values": info.driver_job_id,
                },
            )["data"]["result"]["result"]
            if any(g.get("state") == "CREATED" for g in groups):
                return Placement(True, {}, {})
            needs: dict[str, float] = {}
            for g in groups:
                if g.get("state") == "PENDING":
                    for b in g.get("bundles") or []:
                        for k, v in (b.get("unit_resources") or {}).items():
                            needs[k] = needs.get(k, 0.0) + float(v)
            return Placement(False, needs, self._free_resources())
        except Exception as exc:  # noqa: BLE001 - an optional detail: never fail a reconcile pass for it
            log.debug("placement of %s unknown: %s", info.driver_job_id, exc)
            return None

    def _free_resources(self) -> dict[str, float]:
        """What the cluster has free, or {} where the dashboard does not say (its cluster_status has no
        loadMetricsReport under autoscaler v2, which `ray up` turns on): the wait is reported all the same."""
        try:
            usage = self._get_json("/api/cluster_status", {})["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
            return {k: float(total) - float(used) for k, (used, total) in usage.items()}
        except Exception as exc:  # noqa: BLE001 - an optional detail of an optional detail
            log.debug("free resources unknown: %s", exc)
            return {}

    def _get_json(self, path: str, params: dict[str, str]) -> Any:
        from urllib.parse import urlencode

        def get(c: Any) -> Any:
            resp = c._do_request("GET", path + ("?" + urlencode(params) if params else ""))
            resp.raise_for_status()
            return resp.json()

        return self._call("read the cluster state", get)
