"""The HTTP client of the trainctl API: one endpoint and token, every route as a method, and errors a person can
read (ClientError, with the HTTP status). Where to connect and with which token: service/client/config.py.

    from service.client import TrainctlClient, resolve_token, resolve_url
    api = TrainctlClient(resolve_url(), resolve_token())
    job = api.submit({"preset": "debug", "overrides": {"data.train": "/data/train.parquet"}})
    print(api.job(job["id"])["state"])
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# Answers a restarting or overloaded service gives; worth waiting out (a 500 is a bug, never retried).
TRANSIENT_STATUSES = frozenset({502, 503, 504})
# Answers that say the request was refused before anything was done (429: a limit; 503: the service cannot
# take it now): retried for any method. 502/504 come from a proxy that may have passed the request on, and
# the service may have acted on it: retried only for requests that are safe to repeat.
REFUSED_STATUSES = frozenset({429, 503})
AMBIGUOUS_STATUSES = frozenset({502, 504})


class ClientError(Exception):
    """Something the user should read: an API error with its fields, or an unreachable service.

    `status` is the HTTP status (None when there was no answer); `transient` is True for a refused connection,
    a time-out or a 502/503/504: the service may be back in a moment (a restart, say). `code` is the API's
    error code (or the CLI's own: `usage`, `unreachable`, ...), `reason` its message and `fields` its field
    errors ([{"field", "message"}], empty when it named none). `exit_code` overrides the CLI's exit code."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        *,
        transient: bool = False,
        code: str | None = None,
        reason: str | None = None,
        fields: list[dict[str, str]] | None = None,
        unreachable: bool = False,
        exit_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient
        self.code = code or ("unreachable" if unreachable else "error")
        self.reason = reason or message
        self.fields = fields or []
        self.unreachable = unreachable
        self.exit_code = exit_code


def error_text(resp: httpx.Response) -> str:
    """The API's `{"error": {code, message, details}}` as lines a person reads; field errors one per line."""
    try:
        err = resp.json()["error"]
        details = err.get("details")
        if isinstance(details, list):
            lines = [f"{err['code']}:"]
            lines += [f"  {d.get('field')}: {d.get('message')}" for d in details if isinstance(d, dict)]
        else:
            lines = [f"{err['code']}: {err['message']}"]
            if details:
                lines.append(f"  {json.dumps(details)}")
    except (ValueError, KeyError, TypeError):
        lines = [f"HTTP {resp.status_code}: {resp.text[:500]}"]
    if resp.status_code == 401:
        lines.append(
            "  (log in with `trainctl login URL --token ...`, set TRAINCTL_TOKEN, or run where "
            "<data dir>/admin-token is readable)"
        )
    return "\n".join(lines)


def _error_parts(resp: httpx.Response) -> tuple[str, str, list[dict[str, str]]]:
    """(code, message, field errors) of an API error answer; for one that is not the API's JSON (a proxy's
    page), `http_<status>` and the start of its text."""
    try:
        err = resp.json()["error"]
        details = err.get("details")
        fields = [
            {"field": str(d.get("field")), "message": str(d.get("message"))}
            for d in (details if isinstance(details, list) else [])
            if isinstance(d, dict)
        ]
        return str(err["code"]), str(err["message"]), fields
    except (ValueError, KeyError, TypeError):
        return f"http_{resp.status_code}", resp.text[:500] or resp.reason_phrase, []


def _error(resp: httpx.Response) -> ClientError:
    code, reason, fields = _error_parts(resp)
    return ClientError(
        error_text(resp),
        resp.status_code,
        transient=resp.status_code in TRANSIENT_STATUSES,
        code=code,
        reason=reason,
        fields=fields,
    )


def raise_for_error(resp: httpx.Response) -> httpx.Response:
    if not resp.is_success:
        raise _error(resp)
    return resp


@dataclass(frozen=True)
class Retry:
    """Retrying a one-shot request: a connection that could not be made, and a 429/503 (refused before anything
    was done), for any request; a 502/504 or a connection that broke after the request was sent, only for a
    request that is safe to repeat (`safe`: GETs, and POSTs the service treats as idempotent, such as a
    submission with an Idempotency-Key). Waits double from `first_delay_s` up to `max_delay_s`, at least what
    a Retry-After asks for, and stop once the next wait would end past `total_s` from the first try."""

    total_s: float = 10.0
    first_delay_s: float = 0.5
    max_delay_s: float = 4.0
    on_retry: Callable[[ClientError, float], None] | None = None  # told each error and the wait before a retry


def retry_after_s(resp: httpx.Response) -> float | None:
    """The answer's Retry-After in seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = resp.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class TrainctlClient:
    """One API endpoint and token. Every call raises ClientError with a readable text on failure; with
    `retry`, transient failures are retried first (see Retry)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout: float = 30,
        transport: httpx.BaseTransport | None = None,
        retry: Retry | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self.retry = retry
        self._last_job: tuple[str, str, str] | None = None  # (job id, ETag, body) of the last `job` answer

    def __enter__(self) -> TrainctlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _unreachable(self, exc: httpx.TransportError) -> ClientError:
        return ClientError(
            f"cannot reach trainctl at {self.url} ({exc}); is `trainctl serve` running? (set TRAINCTL_URL)",
            transient=True,
            unreachable=True,
        )

    def send(self, request: httpx.Request, *, safe: bool, stream: bool = False) -> httpx.Response:
        """Send `request`, retried as `self.retry` allows (`safe`: it may be repeated even after the service
        may have acted on it); the answer, whatever its status. Raises ClientError when the service cannot be
        reached, or when the last answer is one to retry."""
        retry = self.retry
        deadline = time.monotonic() + (retry.total_s if retry else 0.0)
        delay = retry.first_delay_s if retry else 0.0
        while True:
            wait: float | None = delay
            try:
                resp = self.http.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent
                error = self._unreachable(exc)
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as exc:  # sent; maybe acted on
                error = self._unreachable(exc)
                if not safe:
                    raise error from exc
            except httpx.TransportError as exc:  # a time-out after waiting the whole `timeout`: not again
                raise self._unreachable(exc) from exc
            else:
                status = resp.status_code
                if status not in REFUSED_STATUSES and not (safe and status in AMBIGUOUS_STATUSES):
                    return resp
                resp.read()
                resp.close()
                if status in AMBIGUOUS_STATUSES and not _error_parts(resp)[0].startswith("http_"):
                    return resp  # the service's own 502 (a corrupt checkpoint): an answer, not a proxy's
                error = _error(resp)
                asked = retry_after_s(resp)
                if asked is not None and asked > deadline - time.monotonic():
                    wait = None  # it asks for longer than is left to wait: say so now
                else:
                    wait = max(delay, asked or 0.0)
            if retry is None or wait is None or time.monotonic() + wait > deadline:
                raise error
            if retry.on_retry is not None:
                retry.on_retry(error, wait)
            time.sleep(wait)
            delay = min(delay * 2, retry.max_delay_s)

    def request(self, method: str, path: str, *, safe: bool | None = None, **kw: Any) -> httpx.Response:
        """A request; `safe` (default: True for GET/HEAD) says whether it may be repeated after the service may
        have acted on it (see Retry)."""
        request = self.http.build_request(method, path, **kw)
        return raise_for_error(self.send(request, safe=method in ("GET", "HEAD") if safe is None else safe))

    @contextmanager
    def stream(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        """A streamed response that is already known to be a success."""
        request = self.http.build_request(method, path, **kw)
        resp = self.send(request, safe=method in ("GET", "HEAD"), stream=True)
        try:
            if not resp.is_success:
                resp.read()
                raise_for_error(resp)
            yield resp
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        finally:
            resp.close()

    def events(self, job_id: str, read_timeout_s: float = 45.0) -> Iterator[tuple[str, Any]]:
        """GET /v1/jobs/{id}/events: each (event, data) as the service sends it, until the stream closes. The
        service sends a comment every 15 s, so `read_timeout_s` of silence means the connection is gone.
        Raises ClientError as `request` does, and (not transient) when the answer is not an event stream."""
        timeout = httpx.Timeout(self.http.timeout.connect, read=read_timeout_s)
        request = self.http.build_request(
            "GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}, timeout=timeout
        )
        resp = self.send(request, safe=True, stream=True)
        try:
            if not resp.is_success:
                resp.read()
                raise_for_error(resp)
            if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                raise ClientError(
                    f"{request.url.path} is not an event stream here", resp.status_code, code="no_event_stream"
                )
            event, data, delivered = "message", [], False
            for line in resp.iter_lines():
                if line.startswith(":"):  # a keep-alive comment
                    continue
                if line:
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "event":
                        event = value
                    elif field == "data":
                        data.append(value)
                    continue
                if data:  # a blank line ends an event
                    try:
                        delivered = True
                        yield event, json.loads("\n".join(data))
                    except ValueError:
                        raise ClientError(
                            "the event stream sent something that is not JSON", code="bad_event"
                        ) from None
                event, data = "message", []
        except httpx.ReadTimeout as exc:
            if not delivered:  # the service sends the job at once: something between buffers the stream
                raise ClientError("the event stream sent nothing (a buffering proxy?)", code="stream_silent") from exc
            raise self._unreachable(exc) from exc
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        finally:
            resp.close()

    # --- the routes ---------------------------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/jobs, always with an Idempotency-Key (a new random one unless given): so it is safe to
        repeat, and a retry after an answer that may hide a created job (a proxy's 502, a connection that
        broke after sending) returns that job instead of submitting a second one."""
        headers = {"Idempotency-Key": idempotency_key or f"trainctl-{uuid.uuid4()}"}
        resp = self.request("POST", "/v1/jobs", json=body, headers=headers, safe=True)
        return resp.json()  # type: ignore[no-any-return]

    def estimate(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/estimates: the time and cost estimate of a submission's body (nothing is created)."""
        return self.request("POST", "/v1/estimates", json=body, safe=True).json()  # type: ignore[no-any-return]

    def jobs(
        self,
        *,
        limit: int = 50,
        offset: int = 0,
        states: list[str] | None = None,
        owner: str | None = None,
        tags: list[str] | None = None,
        project: str | None = None,
        name: str | None = None,
        since: str | None = None,
        sort: str | None = None,
    ) -> dict[str, Any]:
        """A page of jobs; filters as GET /v1/jobs takes them (only those given are sent, so an older server
        that lacks a filter answers a 422 naming it rather than an unfiltered list)."""
        params: list[tuple[str, Any]] = [("limit", limit), ("offset", offset)]
        for key, value in (("owner", owner), ("project", project), ("name", name), ("since", since), ("sort", sort)):
            if value:
                params.append((key, value))
        params += [("state", s.upper()) for s in states or []]
        params += [("tag", t) for t in tags or []]
        return self.request("GET", "/v1/jobs", params=params).json()  # type: ignore[no-any-return]

    def resubmit(self, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/resubmit", json=body).json()  # type: ignore[no-any-return]

    def compare_png(self, job_ids: list[str]) -> bytes:
        return self.request("GET", "/v1/compare.png", params={"ids": ",".join(job_ids)}).content

    def compare(self, job_ids: list[str]) -> dict[str, Any]:
        return self.request("GET", "/v1/compare", params={"ids": ",".join(job_ids)}).json()  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's view. Polling the same job again (`watch`) sends the last answer's ETag: while the job is
        unchanged the service answers an empty 304 and this returns the answer it already has."""
        last = self._last_job if self._last_job and self._last_job[0] == job_id else None
        headers = {"If-None-Match": last[1]} if last else {}
        resp = self.send(self.http.build_request("GET", f"/v1/jobs/{job_id}", headers=headers), safe=True)
        if resp.status_code == 304 and last:
            return json.loads(last[2])  # type: ignore[no-any-return]
        raise_for_error(resp)
        etag = resp.headers.get("etag")
        self._last_job = (job_id, etag, resp.text) if etag else None
        return resp.json()  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        # idempotent on the service: cancelling a cancelled job answers the job again
        return self.request("POST", f"/v1/jobs/{job_id}/cancel", safe=True).json()  # type: ignore[no-any-return]

    def delete(self, job_id: str) -> None:
        self.request("DELETE", f"/v1/jobs/{job_id}")

    def logs(self, job_id: str, tail: int | None = None, attempt: int | None = None) -> str:
        params = {k: v for k, v in (("tail", tail), ("attempt", attempt)) if v is not None}
        return self.request("GET", f"/v1/jobs/{job_id}/logs", params=params).text

    def logs_since(
        self, job_id: str, since: int, tail: int | None = None, attempt: int | None = None
    ) -> tuple[str, int | None]:
        """What the log (of every attempt, or of one) gained after byte `since`, and its size now (None from a
        server that does not say: then the caller compares whole logs)."""
        params: dict[str, int] = {"since": since}
        if tail is not None:
            params["tail"] = tail
        if attempt is not None:
            params["attempt"] = attempt
        resp = self.request("GET", f"/v1/jobs/{job_id}/logs", params=params)
        size = resp.headers.get("x-log-size")
        return resp.text, int(size) if size and size.isdigit() else None

    def metrics(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/metrics").json()  # type: ignore[no-any-return]

    def metrics_csv(self, job_id: str) -> str:
        return self.request("GET", f"/v1/jobs/{job_id}/metrics", params={"format": "csv"}).text

    def checkpoints(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/checkpoints").json()  # type: ignore[no-any-return]

    def trials(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/trials").json()  # type: ignore[no-any-return]

    def plot(self, job_id: str, name: str) -> bytes | None:
        """One of the job's PNGs (curves, lr, confusion); None while there is nothing to draw (409)."""
        try:
            return self.request("GET", f"/v1/jobs/{job_id}/plots/{name}.png").content
        except ClientError as exc:
            if exc.status == 409:
                return None
            raise

    def create_token(self, name: str, expires_in_s: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if expires_in_s is not None:
            body["expires_in_s"] = expires_in_s
        return self.request("POST", "/v1/tokens", json=body).json()  # type: ignore[no-any-return]

    def tokens(self) -> dict[str, Any]:
        return self.request("GET", "/v1/tokens").json()  # type: ignore[no-any-return]

    def revoke_token(self, name: str) -> None:
        self.request("DELETE", f"/v1/tokens/{name}")

    def artifacts(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/artifacts").json()  # type: ignore[no-any-return]

    def download_best(self, job_id: str, out: Path | None = None) -> tuple[str, int, Path]:
        """The best checkpoint, verified (see _download), to `out` (default: the server's name for it,
        `<id>-epochN.pt`, in the working directory). Returns (sha256, size, path)."""
        return self._download(f"/v1/jobs/{job_id}/checkpoints/best", "X-Checkpoint-SHA256", out, f"{job_id}-best.pt")

    def download_artifact(self, job_id: str, name: str, out: Path) -> tuple[str, int]:
        """An exported model (model.safetensors, model.pt2), verified (see _download)."""
        sha256, size, _ = self._download(f"/v1/jobs/{job_id}/artifacts/{name}", "X-Artifact-SHA256", out, name)
        return sha256, size

    def _download(self, path: str, sha_header: str, out: Path | None, fallback_name: str) -> tuple[str, int, Path]:
        """Download to `<out>.part`, check its sha256 against the one the server announced, and only then move it
        to `out` (None: the name in Content-Disposition, else `fallback_name`); a mismatch deletes it and
        raises. Returns (sha256, size, path)."""
        digest, size = hashlib.sha256(), 0
        part: Path | None = None
        try:
            with self.stream("GET", path) as resp:
                expected = resp.headers.get(sha_header)
                if out is None:
                    out = Path(_attachment_name(resp.headers.get("Content-Disposition")) or fallback_name)
                part = out.with_name(out.name + ".part")
                with open(part, "wb") as f:
                    for chunk in resp.iter_bytes(1 << 20):
                        f.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
        except BaseException:
            if part is not None:
                part.unlink(missing_ok=True)
            raise
        assert out is not None and part is not None
        actual = digest.hexdigest()
        if not expected or actual != expected:
            part.unlink(missing_ok=True)
            raise ClientError(
                f"CHECKSUM MISMATCH: the server announced sha256 {expected}, the download has "
                f"{actual}; {out} was NOT written. Try again; if it persists the stored file "
                "is damaged."
            )
        os.replace(part, out)
        return actual, size, out


def _attachment_name(disposition: str | None) -> str | None:
    """The file name of `attachment; filename="x.pt"`, reduced to a bare name (never a path)."""
    m = re.search(r'filename="?([^";]+)"?', disposition or "")
    name = os.path.basename(m.group(1)) if m else ""
    return name if name and not name.startswith(".") else None
