"""tests/ports.py: ports that a stopped server gets back, because the kernel never hands them out itself."""

from __future__ import annotations

import socket

from tests.ports import ephemeral_range, stable_port


def test_a_stable_port_is_free_and_below_the_ephemeral_range() -> None:
    low, high = ephemeral_range()
    assert 1024 <= low <= high
    ports = {stable_port() for _ in range(20)}
    assert all(p < low for p in ports) and len(ports) > 1  # picked at random, not one fixed port
    port = ports.pop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free when it was handed out


def test_an_outgoing_connection_never_takes_a_stable_port() -> None:
    """What the restart of a stopped server relies on: connect() without bind gets an ephemeral port."""
    low, high = ephemeral_range()
    with socket.socket() as server:
        server.bind(("127.0.0.1", stable_port()))
        server.listen()
        clients = [socket.create_connection(server.getsockname()) for _ in range(20)]
        try:
            assert all(low <= c.getsockname()[1] <= high for c in clients)
        finally:
            for c in clients:
                c.close()
