"""A real PostgreSQL server for the tests (Debian's `postgresql` package: initdb + pg_ctl), one per session.

It runs on a free 127.0.0.1 port from a temporary directory, as a non-root user (PostgreSQL refuses to run
as root: under root the package's own `postgres` system user runs it), with password auth. Every test gets
its own fresh database (`postgres_url`). Stopped by the postmaster's PID at the end (the reaper SIGTERMs it
if pytest dies). `start_postgres` is also used by bench/api_load.py.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import pytest

from service.server.localray import free_port

SUPERUSER = "trainctl"


def pg_bindir() -> Path | None:
    """Debian keeps the server binaries in /usr/lib/postgresql/<major>/bin (not on PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@dataclass
class PostgresServer:
    port: int
    password: str
    root: Path
    proc: subprocess.Popen
    _dbs: count[int] = field(default_factory=lambda: count(1))

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._dbs)}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, password=self.password, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT) of the postmaster we started, then its directory."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql (.ci/run does this)")
    user: str | None = None
    if os.geteuid() == 0:
        user = "postgres"  # the package's dedicated system user
        pwd.getpwnam(user)
    root = Path(tempfile.mkdtemp(prefix="trainctl-pg-"))
    password = secrets.token_hex(16)
    (root / "pw").write_text(password)
    if user:
        info = pwd.getpwnam(user)
        os.chmod(root, 0o700)
        for p in (root, root / "pw"):
            os.chown(p, info.pw_uid, info.pw_gid)
    data = root / "data"
    subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            SUPERUSER,
            f"--pwfile={root / 'pw'}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ],
        user=user,
        check=True,
        capture_output=True,
        cwd=root,
    )
    port = free_port()
    # The postmaster directly (not `pg_ctl start`, which daemonises): we hold its PID and stop exactly it.
    log = open(root / "postgres.log", "ab")
    proc = subprocess.Popen(
        [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(root),
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ],
        user=user,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
        start_new_session=True,
    )
    server = PostgresServer(port, password, root, proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited {proc.returncode}:\n{(root / 'postgres.log').read_text()[-3000:]}")
        ready = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True)
        if ready.returncode == 0:
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError("postgres did not accept connections within 60 s")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    from tests.plugins.reaper import reap_with_session

    server = start_postgres()
    reap_with_session(server.proc.pid)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    return postgres.create_database()
