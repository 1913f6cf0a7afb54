"""Stop a server's process group if the test session dies without its teardown (SIGKILL, a CI timeout):
a tiny watchdog process polls the pytest process and, once pytest is gone, sends the group SIGTERM (so a
`trainctl serve` can stop the Ray head it started), then SIGKILL after a grace period."""

from __future__ import annotations

import os
import subprocess
import sys

_WATCHDOG = """
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
while True:
    time.sleep(1)
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        break
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        sys.exit(0)
for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 0)):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        break
    deadline = time.time() + grace
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            sys.exit(0)
        time.sleep(0.5)
"""


def reap_with_session(process_group: int) -> subprocess.Popen:
    """Start the watchdog for `process_group`; it exits by itself when the group is gone."""
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(process_group)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
