"""ASGI guards in front of every route: a request body limit (413) and, for a service running without
authentication, a Host-header check (DNS rebinding: a web page on evil.example whose name resolves to
127.0.0.1 must not be able to drive the API from a browser)."""

from __future__ import annotations

import ipaddress
import json
from typing import Any


def is_loopback(host: str) -> bool:
    """Exactly `localhost`, a literal IPv4 address in 127.0.0.0/8 (four decimal parts) or ::1 (bracketed or
    not). Never by prefix: `127.attacker.example` is a name anyone can point at 127.0.0.1 (DNS rebinding)."""
    host = host.strip().lower()
    if host == "localhost":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)  # strict: no "127.1", no names, no zone ids
    except ValueError:
        return False
    return address.is_loopback


def host_header_name(value: str) -> str | None:
    """The host name of a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`), or None when it is not one
    of those shapes (a port must be digits)."""
    if value.startswith("["):
        name, sep, rest = value.partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name + "]"
    name, sep, port = value.partition(":")
    if sep and not port.isdigit():
        return None
    return name


async def _refuse(send: Any, status: int, code: str, message: str, details: Any = None) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "details": details}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a body over `max_bytes`: by its Content-Length at once, or while a chunked body streams in
    (the app never holds more than the limit)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is over this service's limit of {self.max_bytes} bytes (TRAINCTL_MAX_BODY_BYTES)"
        details = {"limit": "max_body_bytes", "max_bytes": self.max_bytes}
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_large = int(value) > self.max_bytes
                except ValueError:
                    too_large = False
                if too_large:
                    await _refuse(send, 413, "too_large", message, details)
                    return
        # Read the body here (it is at most max_bytes), then replay it to the app.
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([msg], receive), send)
                return
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await _refuse(send, 413, "too_large", message, details)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        await self.app(
            scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive), send
        )


def _replay(messages: list[Any], receive: Any) -> Any:
    pending = list(messages)

    async def replayed() -> Any:
        return pending.pop(0) if pending else await receive()

    return replayed


class LoopbackHostOnly:
    """400 unless the Host header names a loopback address (with any port)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = ""
            for name, value in scope.get("headers", []):
                if name == b"host":
                    host = value.decode("latin-1")
                    break
            hostname = host_header_name(host)
            if hostname is None or not is_loopback(hostname):
                await _refuse(
                    send,
                    400,
                    "bad_host",
                    "this service runs without authentication and answers only requests addressed to "
                    "a loopback host (127.0.0.1, localhost)",
                    {"host": host[:100]},
                )
                return
        await self.app(scope, receive, send)
