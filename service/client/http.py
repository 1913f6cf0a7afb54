"""The HTTP client of the trainctl API: one endpoint and token, every route as a method, and errors a person can
read (ClientError, with the HTTP status). Where to connect and with which token: service/client/config.py.

    from service.client import TrainctlClient, resolve_token, resolve_url
    api = TrainctlClient(resolve_url(), resolve_token())
    job = api.submit({"preset": "debug", "overrides": {"data.train": "/data/train.parquet"}})
    print(api.job(job["id"])["state"])
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

# Answers a restarting or overloaded service gives; worth waiting out (a 500 is a bug, never retried).
TRANSIENT_STATUSES = frozenset({502, 503, 504})


class ClientError(Exception):
    """Something the user should read: an API error with its fields, or an unreachable service.

    `status` is the HTTP status (None when there was no answer); `transient` is True for a refused connection,
    a time-out or a 502/503/504: the service may be back in a moment (a restart, say)."""

    def __init__(self, message: str, status: int | None = None, *, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


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
        lines.append("  (set TRAINCTL_TOKEN, or run where <data dir>/admin-token is readable)")
    return "\n".join(lines)


def raise_for_error(resp: httpx.Response) -> httpx.Response:
    if not resp.is_success:
        raise ClientError(error_text(resp), resp.status_code, transient=resp.status_code in TRANSIENT_STATUSES)
    return resp


class TrainctlClient:
    """One API endpoint and token. Every call raises ClientError with a readable text on failure."""

    def __init__(
        self, url: str, token: str | None, *, timeout: float = 30, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
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
        )

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return raise_for_error(self.http.request(method, path, **kw))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    @contextmanager
    def stream(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        """A streamed response that is already known to be a success."""
        try:
            with self.http.stream(method, path, **kw) as resp:
                if not resp.is_success:
                    resp.read()
                    raise_for_error(resp)
                yield resp
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    # --- the routes ---------------------------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/jobs", json=body, headers=headers).json()  # type: ignore[no-any-return]

    def estimate(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/estimates: the time and cost estimate of a submission's body (nothing is created)."""
        return self.request("POST", "/v1/estimates", json=body).json()  # type: ignore[no-any-return]

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
        try:
            resp = self.http.get(f"/v1/jobs/{job_id}", headers=headers)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if resp.status_code == 304 and last:
            return json.loads(last[2])  # type: ignore[no-any-return]
        raise_for_error(resp)
        etag = resp.headers.get("etag")
        self._last_job = (job_id, etag, resp.text) if etag else None
        return resp.json()  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel").json()  # type: ignore[no-any-return]

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
