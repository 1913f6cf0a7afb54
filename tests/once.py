"""Build an expensive read-only fixture once per test session, also when pytest-xdist runs it on several workers.

`make test` runs the tests one at a time on 3 xdist workers, so a module fixture such as a trained Ray Train
job used to be built on every worker that ran one of its tests: the same 2-worker training three times. The
first worker to ask builds it under a lock in a folder of this session's that every worker sees; the others
wait there and get the same path. Only for fixtures that tests read and never change.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)` makes the fixture in an empty `folder` and returns a path in it. Built at most once
    per session across xdist workers; a build that fails is tried again by the next worker to ask (each
    try gets a fresh folder), so every worker reports the failure itself."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    # basetemp is <session dir>/popen-gwN on an xdist worker: its parent is this session's alone, shared by
    # its workers (pytest removes old session dirs itself).
    shared = tmp_path_factory.getbasetemp().parent / "built-once"
    shared.mkdir(exist_ok=True)
    built = shared / f"{name}.path"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this worker dies
        if built.exists():
            return Path(built.read_text())
        result = build(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=shared)))
        built.write_text(str(result))
        return result
