"""Ports for test servers that are stopped and started again on the same port (an S3 outage, a serve restart).

A port from bind(0) lies in the kernel's ephemeral range, the one it hands to every socket that connects
without binding. While such a server was down, any process's outgoing connection could be given its port as
the local end, and the restart failed with "address already in use": seen once in a full suite, where the
S3 server of one pytest worker could not come back after an outage test and 5 tests lost it. The kernel never
hands out a port outside that range, so a port picked below it can only be taken by another explicit pick.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# How far below the ephemeral range to look: far more ports than a suite's servers need at once.
SPAN = 12000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def stable_port(ip: str = "127.0.0.1") -> int:
    """A port free on `ip` now, below the ephemeral range: it stays free while its server is down."""
    low = ephemeral_range()[0]
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - SPAN), low)
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port on {ip} in the {SPAN} ports below the ephemeral range ({low})")
