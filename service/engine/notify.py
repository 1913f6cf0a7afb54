"""Webhook alerts: a small JSON POST when a job ends FAILED, SUCCEEDED or CANCELLED (spec `notify`, or the
operator's default TRAINCTL_NOTIFY_WEBHOOK for jobs without one).

A webhook is an outbound request the service makes on a user's behalf, so:
- only http(s) URLs (the spec checks the scheme) to hosts the operator allows (TRAINCTL_WEBHOOK_HOSTS: host or
  host:port entries, `*` for any; empty: user webhooks are refused at submission with a 422 on notify.webhook);
- redirects are not followed (a redirect could lead anywhere the allow-list does not);
- the state machine never waits: a transition only puts the call on a bounded queue, which one background
  thread sends with a timeout and a few retries (connect errors, 5xx, 429), then drops with a warning.
Which replica sends: the one whose transition committed (Store.on_transition), so each transition once.
"""

from __future__ import annotations

import logging
import queue
import threading
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from service.common.settings import Settings
from service.engine.store import Job
from trainer.spec import JobSpec, NotifySpec

log = logging.getLogger("trainctl.notify")

MAX_PENDING = 1000  # calls waiting to be sent; past it new ones are dropped (and logged), never blocking


def host_allowed(url: str, allowed: list[str]) -> bool:
    """Whether `url`'s host (or host:port, the scheme's default port when none is given) is in `allowed`."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host:
        return False
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:  # a port that is not a number
        return False
    entries = {a.strip().lower() for a in allowed if a.strip()}
    return "*" in entries or host in entries or f"{host}:{port}" in entries or f"[{host}]:{port}" in entries


def webhook_problem(spec_notify: NotifySpec | None, settings: Settings) -> str | None:
    """Why this service refuses the spec's webhook (for a 422 on notify.webhook), or None."""
    if spec_notify is None:
        return None
    if not settings.allowed_webhook_hosts:
        return "this service sends no webhooks to users' URLs; the operator allows hosts with TRAINCTL_WEBHOOK_HOSTS"
    if not host_allowed(spec_notify.webhook, settings.allowed_webhook_hosts):
        host = urlsplit(spec_notify.webhook).hostname or "?"
        return (
            f"host {host!r} is not one this service sends webhooks to "
            f"({', '.join(settings.allowed_webhook_hosts)}; TRAINCTL_WEBHOOK_HOSTS)"
        )
    return None


def shown_webhook(url: str) -> str:
    """The webhook URL as views and logs show it: a token rides in the userinfo or the query string
    (`https://user:TOKEN@host/...`, `...?token=TOKEN`), so both are masked (`***`); the query's keys stay,
    so the reader still sees which parameters it carries. The stored spec keeps the URL whole for sending."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"  # (the spec checked the URL; never shown half-parsed)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if "@" in parts.netloc:
        netloc = "***@" + netloc
    # `key=value` keeps its key; a piece without `=` (`?abc123`) may be the token itself.
    query = "&".join(f"{p.split('=', 1)[0]}=***" if "=" in p else "***" for p in parts.query.split("&") if p)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def shown_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as the job view, the dashboard and compare show it to whoever may read the job: its webhook
    masked (shown_webhook)."""
    dump = spec.model_dump(mode="json")
    if spec.notify is not None:
        dump["notify"]["webhook"] = shown_webhook(spec.notify.webhook)
    return dump


class _MaskedUrls(logging.Filter):
    """httpx logs every request's full URL at INFO (`HTTP Request: POST https://host/hook?token=...`), which the
    service's log would keep: masked as in views (shown_webhook)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(shown_webhook(str(a)) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


logging.getLogger("httpx").addFilter(_MaskedUrls())


def body(job: Job) -> dict[str, Any]:
    """What the webhook receives: enough to act on, nothing of the spec (it may hold paths users keep private)."""
    return {
        "event": f"job.{job.state.value.lower()}",
        "job_id": job.id,
        "state": job.state.value,
        "owner": job.owner,
        "message": job.message,
        "best_val_acc": job.best_val_acc,
        "epochs_completed": job.last_epoch,
        "attempts": job.attempts,
        "at": datetime.fromtimestamp(job.updated_at, UTC).isoformat(),
    }


class Notifier:
    """Sends webhook calls from one background thread (start/stop with the app)."""

    def __init__(
        self,
        settings: Settings,
        *,
        timeout_s: float | None = None,
        attempts: int | None = None,
        backoff_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.default = settings.default_notify
        self.timeout_s = timeout_s if timeout_s is not None else settings.webhook_timeout_s
        self.attempts = attempts if attempts is not None else settings.webhook_attempts
        self.backoff_s = backoff_s if backoff_s is not None else settings.webhook_backoff_s
        self.sent = 0  # calls answered 2xx (observability and tests)
        self.dropped = 0  # calls given up on: queue full, retries spent, or a host no longer allowed
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(maxsize=MAX_PENDING)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="trainctl-notify", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is queued for up to `timeout_s`, then stop (a call still retrying is abandoned)."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        self._stopping.set()
        self._thread = None

    def transitioned(self, job: Job) -> None:
        """Store.on_transition: queue the call if this transition is one the job (or the default) asks for.
        Never raises, never blocks."""
        try:
            notify = job.spec.notify or self.default
            if notify is None or job.state.value not in notify.on:
                return
            self._queue.put_nowait((notify.webhook, body(job)))
        except queue.Full:
            self.dropped += 1
            log.warning(
                "job %s: webhook queue full (%d calls); this %s alert is dropped", job.id, MAX_PENDING, job.state
            )
        except Exception:
            log.exception("job %s: could not queue its webhook", job.id)

    def _work(self) -> None:
        with httpx.Client(timeout=self.timeout_s, follow_redirects=False) as client:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                url, payload = item
                self._send(client, url, payload)

    def _send(self, client: httpx.Client, url: str, payload: dict[str, Any]) -> None:
        host = urlsplit(url).hostname
        # Checked again at send time: the default is the operator's own, but the allow-list may have changed.
        if url != (self.default.webhook if self.default else None) and not host_allowed(
            url, self.settings.allowed_webhook_hosts
        ):
            self.dropped += 1
            log.warning("job %s: webhook host %s is no longer allowed; not sent", payload["job_id"], host)
            return
        problem = "?"
        for attempt in range(1, self.attempts + 1):
            try:
                resp = client.post(url, json=payload, headers={"User-Agent": "trainctl-webhook"})
                if resp.is_success:
                    self.sent += 1
                    return
                problem = f"HTTP {resp.status_code}"
                if resp.status_code < 500 and resp.status_code != 429:
                    break  # the receiver refuses it: asking again will not help
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            if attempt < self.attempts and self._stopping.wait(self.backoff_s * 2 ** (attempt - 1)):
                break
        self.dropped += 1
        log.warning(
            "job %s: webhook to %s not delivered (%s after %d attempt(s))", payload["job_id"], host, problem, attempt
        )
