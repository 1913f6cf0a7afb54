"""Webhook alerts (spec `notify`, service/engine/notify.py): received by a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.common.settings import load_settings
from service.engine.notify import host_allowed, shown_webhook
from tests.service.conftest import DEBUG_JOB, Api


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Webhooks do not depend on the job store: SQLite only (no second run of each test on PostgreSQL)."""
    return f"sqlite:///{tmp_path / 'data' / 'trainctl.db'}"


class Receiver:
    """A real HTTP server: records each POST; answers the scripted statuses in turn (then 200), after `delay_s`."""

    def __init__(self) -> None:
        self.calls: queue.Queue[dict[str, Any]] = queue.Queue()
        self.statuses: list[int] = []
        self.delay_s = 0.0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(receiver.delay_s)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.calls.put(
                    {"path": self.path, "status": status, "body": json.loads(data), "agent": self.headers["User-Agent"]}
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.calls.get(timeout=timeout)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def submit(api: Api, notify: dict[str, Any] | None) -> str:
    body = {**DEBUG_JOB, "overrides": {**DEBUG_JOB["overrides"], **({"notify": notify} if notify else {})}}
    resp = api.post(body)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def cancel(api: Api, job_id: str) -> None:
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers()).status_code == 200


def test_failed_and_cancelled_jobs_call_the_webhook(make_api, receiver: Receiver) -> None:
    api = make_api(webhook_hosts="127.0.0.1")
    failing = submit(api, {"webhook": receiver.url, "on": ["FAILED", "CANCELLED"]})
    api.reconcile()  # QUEUED -> STARTING: not a state it asked for
    api.ray.set(f"{failing}-1", "FAILED", exit_code=2)
    api.reconcile()
    call = receiver.next()
    assert call["path"] == "/hook" and call["agent"] == "trainctl-webhook"
    body = call["body"]
    assert body["event"] == "job.failed" and body["job_id"] == failing and body["state"] == "FAILED"
    assert body["attempts"] == 1 and "not retried" in body["message"] and body["at"].endswith("+00:00")
    assert set(body) == {  # small, and nothing of the spec
        "event",
        "job_id",
        "state",
        "owner",
        "message",
        "best_val_acc",
        "epochs_completed",
        "attempts",
        "at",
    }
    cancelled = submit(api, {"webhook": receiver.url, "on": ["CANCELLED"]})
    cancel(api, cancelled)
    assert receiver.next()["body"]["state"] == "CANCELLED"
    quiet = submit(api, {"webhook": receiver.url, "on": ["SUCCEEDED"]})
    cancel(api, quiet)
    with pytest.raises(queue.Empty):
        receiver.next(timeout=1.0)


def test_the_operators_default_webhook(make_api, receiver: Receiver) -> None:
    api = make_api(notify_webhook=receiver.url, notify_on="cancelled")  # no allow-list needed: the operator's own
    cancel(api, submit(api, None))
    assert receiver.next()["body"]["state"] == "CANCELLED"


def test_a_webhook_token_is_masked_wherever_the_job_is_shown(
    make_api, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # A token in the query string or the userinfo reaches the receiver, never the job's readers or the log.
    from tests.service.test_ui import login

    caplog.set_level(logging.INFO)
    api = make_api(webhook_hosts="127.0.0.1")
    host = receiver.url.split("/")[2]
    secret_url = f"http://hookuser:s3cretpw@{host}/hook?token=s3cret123&channel=ml"
    job_id = submit(api, {"webhook": secret_url, "on": ["CANCELLED"]})
    other = submit(api, None)
    shown = f"http://***@{host}/hook?token=***&channel=***"
    view = api.get(f"/v1/jobs/{job_id}").json()
    assert view["spec"]["notify"]["webhook"] == shown
    compared = api.get(f"/v1/compare?ids={job_id},{other}")
    assert compared.status_code == 200 and "s3cret" not in compared.text
    login(api)
    page = api.client.get(f"/ui/jobs/{job_id}").text
    assert "s3cret" not in page and "token=***" in page
    child = api.client.post(f"/v1/jobs/{job_id}/resubmit", json={}, headers=api.headers()).json()
    assert child["spec"]["notify"]["webhook"] == shown  # the new job keeps the real URL (stored), shown masked
    cancel(api, child["id"])
    call = receiver.next()
    assert call["path"] == "/hook?token=s3cret123&channel=ml" and call["body"]["job_id"] == child["id"]
    # httpx's own line for the webhook (the test client's requests log "HTTP Request: POST" lines too)
    assert until(lambda: f"@{host}/hook" in caplog.text)
    assert "s3cret" not in caplog.text and f"http://***@{host}/hook?token=***&channel=***" in caplog.text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.example.com/services/x", "https://hooks.example.com/services/x"),
        ("https://hooks.example.com/x?token=abc&b=2#frag", "https://hooks.example.com/x?token=***&b=***"),
        ("https://user:pw@example.com:8443/x", "https://***@example.com:8443/x"),
        ("https://example.com/x?bare-token&k=", "https://example.com/x?***&k=***"),
    ],
)
def test_shown_webhook(url: str, shown: str) -> None:
    assert shown_webhook(url) == shown


def test_a_failing_receiver_is_retried_with_backoff(make_api, receiver: Receiver) -> None:
    api = make_api(
        webhook_hosts=f"127.0.0.1:{receiver.url.split(':')[2].split('/')[0]}",
        webhook_attempts=3,
        webhook_backoff_s=0.05,
    )
    receiver.statuses = [503, 502]
    cancel(api, submit(api, {"webhook": receiver.url}))
    assert [receiver.next()["status"] for _ in range(3)] == [503, 502, 200]
    assert until(lambda: api.runner.notifier.sent == 1)


def test_a_slow_receiver_never_holds_up_a_transition(make_api, receiver: Receiver) -> None:
    api = make_api(webhook_hosts="127.0.0.1", webhook_timeout_s=0.5, webhook_attempts=1)
    receiver.delay_s = 3.0
    job_id = submit(api, {"webhook": receiver.url})
    started = time.monotonic()
    cancel(api, job_id)
    took = time.monotonic() - started
    assert took < receiver.delay_s / 2, took  # the cancel answered while the receiver still sleeps
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "CANCELLED"
    assert until(lambda: api.runner.notifier.dropped == 1)  # timed out, given up, logged
    assert api.runner.notifier.sent == 0


@pytest.mark.parametrize(
    "hosts,url,reason",
    [
        ("127.0.0.1", "file:///etc/passwd", "http:// or https://"),
        ("127.0.0.1", "ftp://127.0.0.1/x", "http:// or https://"),
        ("127.0.0.1", "http://", "http:// or https://"),
        ("127.0.0.1", "http://169.254.169.254/latest", "not one this service sends webhooks to"),
        ("hooks.example.com:443", "http://hooks.example.com/x", "not one this service sends webhooks to"),
        ("", "https://hooks.example.com/x", "TRAINCTL_WEBHOOK_HOSTS"),
    ],
)
def test_bad_webhooks_are_422_naming_notify_webhook(make_api, hosts: str, url: str, reason: str) -> None:
    api = make_api(webhook_hosts=hosts)
    resp = api.post({**DEBUG_JOB, "overrides": {"notify": {"webhook": url}}})
    assert resp.status_code == 422, resp.text
    details = resp.json()["error"]["details"]
    assert [d["field"] for d in details] == ["notify.webhook"] and reason in details[0]["message"], details
    assert api.get("/v1/jobs").json()["total"] == 0  # nothing half-written


def test_notify_on_names_only_final_states(make_api) -> None:
    api = make_api(webhook_hosts="*")
    resp = api.post({**DEBUG_JOB, "overrides": {"notify": {"webhook": "https://x.example/h", "on": ["RUNNING"]}}})
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"].startswith("notify.on")


def test_host_allow_list() -> None:
    assert host_allowed("https://Hooks.Example.com/x", ["hooks.example.com"])
    assert host_allowed("https://hooks.example.com/x", ["hooks.example.com:443"])
    assert not host_allowed("http://hooks.example.com/x", ["hooks.example.com:443"])
    assert not host_allowed("http://hooks.example.com.evil.net/x", ["hooks.example.com"])
    assert not host_allowed("http://user@evil.net/x", ["user"])
    assert host_allowed("http://anything/x", ["*"]) and not host_allowed("http://x:notaport/", ["*"])


def test_a_bad_default_webhook_fails_at_start_naming_the_setting() -> None:
    with pytest.raises(ValidationError, match="TRAINCTL_NOTIFY_WEBHOOK"):
        load_settings(notify_webhook="ftp://x/")
    with pytest.raises(ValidationError, match="TRAINCTL_NOTIFY_ON"):
        load_settings(notify_webhook="https://x/", notify_on="RUNNING")
