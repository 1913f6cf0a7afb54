"""Prometheus metrics (`GET /metrics`, prometheus-client's text format), one registry per app.

Job counts come from the database at scrape time, so every replica reports the same cluster-wide numbers
(aggregate with max(), not sum()). Per-job training progress (epochs, images/s) and reconcile timings come
from the replica that leads reconciliation (`trainctl_reconciler_leader` == 1); see docs/service.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from service.engine.reconciler import Reconciler
    from service.engine.runner import Runner

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _StoreCollector(Collector):
    """Metrics read when scraped: jobs by state, queue depth per owner, per-job progress, leadership."""

    def __init__(self, runner: Runner, reconciler: Reconciler) -> None:
        self.runner, self.reconciler = runner, reconciler

    def collect(self) -> Iterator[Metric]:
        store = self.runner.store
        jobs = GaugeMetricFamily("trainctl_jobs", "Jobs in the database by state", labels=["state"])
        for state, n in store.counts_by_state().items():
            jobs.add_metric([state.value], n)
        yield jobs
        queue = GaugeMetricFamily("trainctl_queue_depth", "QUEUED jobs per owner", labels=["owner"])
        for owner, n in sorted(store.queued_by_owner().items()):
            queue.add_metric([owner], n)
        yield queue
        epochs = GaugeMetricFamily(
            "trainctl_job_epochs_finished", "Epochs finished by each active job", labels=["job_id", "owner"]
        )
        ips = GaugeMetricFamily(
            "trainctl_job_train_images_per_second",
            "Training images/s of each active job's latest epoch (leading replica)",
            labels=["job_id", "owner"],
        )
        for job in store.active():
            epochs.add_metric([job.id, job.owner], job.last_epoch or 0)
            rate = self.runner.images_per_s.get(job.id)
            if rate is not None:
                ips.add_metric([job.id, job.owner], rate)
        yield epochs
        yield ips
        yield CounterMetricFamily(
            "trainctl_ray_submission_errors",
            "Ray refused or failed a job submission",
            value=self.runner.submission_errors,
        )
        yield GaugeMetricFamily(
            "trainctl_reconciler_leader",
            "1 on the replica that reconciles, else 0",
            value=1 if self.reconciler.is_leader else 0,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_latency = Histogram(
            "trainctl_http_request_duration_seconds",
            "HTTP request latency by route",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_pass = Histogram(
            "trainctl_reconcile_pass_duration_seconds",
            "Duration of one reconcile pass (leading replica)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )

        self._collector: _StoreCollector | None = None

    def attach(self, runner: Runner, reconciler: Reconciler) -> None:
        self.detach()
        self._collector = _StoreCollector(runner, reconciler)
        self.registry.register(self._collector)
        reconciler.on_pass = self.reconcile_pass.observe

    def detach(self) -> None:
        if self._collector is not None:
            self.registry.unregister(self._collector)
            self._collector = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def middleware(self, app: Any) -> Any:
        """An ASGI middleware that times every request, labelled by the route's template (/v1/jobs/{job_id}),
        never the raw path. Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware
        runs each request in a task group with memory streams, a large share of a status poll's CPU."""
        histogram = self.http_latency

        async def timed(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            t0, observed = time.perf_counter(), False

            def observe(status: int) -> None:
                nonlocal observed
                if not observed:  # until the response starts: a stream's (events) length is not latency
                    observed = True
                    labels = (method_label(scope["method"]), route_template(scope), status_label(status))
                    histogram.labels(*labels).observe(time.perf_counter() - t0)

            async def send_status(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    observe(message["status"])
                await send(message)

            try:
                await app(scope, receive, send_status)
            finally:
                observe(500)  # it raised before answering (the outer error handler answers 500)

        return timed


# Label values come from a fixed set, whatever a client sends: every distinct value is a new series kept
# for the life of the process, so a made-up method or path per request would grow /metrics without limit.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else "other"


def route_template(scope: MutableMapping[str, Any]) -> str:
    """/v1/jobs/{job_id} for /v1/jobs/AbC: the matched path with its parameters put back as names, never the raw
    path; "unmatched" for a path no route matched (404s must not create series). The result must end with the
    route's own template (which FastAPI keeps without the router's prefix); when it does not (a parameter
    spanning segments, or one whose value equals a literal segment) the route's own template is the label."""
    template = getattr(scope.get("route"), "path_format", None)
    if not isinstance(template, str) or not template:
        return UNMATCHED
    values = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    rebuilt = "/".join(f"{{{values[seg]}}}" if seg in values else seg for seg in str(scope["path"]).split("/"))
    return rebuilt if rebuilt.endswith(template) else template
