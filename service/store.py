"""The job store: one SQLite file under the data dir, accessed through SQLAlchemy 2.

Every write runs in its own transaction. `Store.transition` is the only function that changes a job's
state: it checks the transition table in `service.states` and applies it as a compare-and-set
(`UPDATE ... WHERE state = <what we read>`), so the reconciler and a concurrent cancel can never both
win, and a terminal state is never left.
"""

from __future__ import annotations

import builtins
import json
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from service.states import ACTIVE, TERMINAL, InvalidTransition, JobNotFound, JobState, can_transition


class Base(DeclarativeBase):
    pass


class JobModel(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="uq_owner_idempotency_key"),)

    # An integer primary key gives a strict submission order for the queue; `id` is what users see.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[str] = mapped_column(Text)  # the resolved JobSpec, JSON
    ray_submission_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    attempt_log: Mapped[str] = mapped_column(Text, default="[]")  # JSON list, one entry per attempt
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    best_val_acc: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)


class TokenModel(Base):
    __tablename__ = "tokens"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; the token itself is never stored
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class Job:
    """A snapshot of one job row (no live ORM object escapes the store)."""

    seq: int
    id: str
    owner: str
    created_at: float
    updated_at: float
    state: JobState
    spec: dict[str, Any]
    ray_submission_id: str | None
    attempts: int
    attempt_log: list[dict[str, Any]]
    message: str | None
    best_val_acc: float | None
    last_epoch: int | None
    cancel_requested: bool
    idempotency_key: str | None = field(default=None, repr=False)
    request_hash: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, m: JobModel) -> Job:
        return cls(seq=m.seq, id=m.id, owner=m.owner, created_at=m.created_at, updated_at=m.updated_at,
                   state=JobState(m.state), spec=json.loads(m.spec), ray_submission_id=m.ray_submission_id,
                   attempts=m.attempts, attempt_log=json.loads(m.attempt_log or "[]"), message=m.message,
                   best_val_acc=m.best_val_acc, last_epoch=m.last_epoch, cancel_requested=m.cancel_requested,
                   idempotency_key=m.idempotency_key, request_hash=m.request_hash)


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"this Idempotency-Key was already used for job {job_id} with a different body")
        self.job_id = job_id


class TokenNameTaken(Exception):
    pass


def new_job_id() -> str:
    # 16 random bytes: unguessable, URL-safe, and short enough to read in a terminal.
    return secrets.token_urlsafe(16)


# Columns `update` may change; `state` only changes through `transition`.
_UPDATABLE = {"ray_submission_id", "attempts", "attempt_log", "message", "best_val_acc", "last_epoch",
              "cancel_requested"}


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    if "attempt_log" in out:
        out["attempt_log"] = json.dumps(out["attempt_log"])
    return out


def _rowcount(result: Result[Any]) -> int:
    """How many rows an UPDATE matched (its result is a CursorResult, typed as a plain Result)."""
    return int(cast(CursorResult[Any], result).rowcount)


class Store:
    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{db_path}", connect_args={"check_same_thread": False,
                                                                           "timeout": 30})

        @event.listens_for(self.engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the reconciler's writes
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite serialises writers anyway; this lock keeps read-check-write sequences in this process atomic
        # without relying on SQLite's deferred-transaction upgrade behaviour.
        self._write_lock = threading.RLock()

    def create_schema(self) -> None:
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # --- jobs -------------------------------------------------------------------------------------------

    def create_job(self, owner: str, spec: dict[str, Any], idempotency_key: str | None = None,
                   request_hash: str | None = None) -> tuple[Job, bool]:
        """Insert a QUEUED job. With an idempotency key already used by this owner: the earlier job
        (created=False) when the request hash matches, else IdempotencyConflict."""
        for _ in range(2):  # a second round only when another process inserted the same key meanwhile
            try:
                with self._write_lock, self._sessions.begin() as s:
                    if idempotency_key is not None:
                        existing = s.scalar(select(JobModel).where(JobModel.owner == owner,
                                                                   JobModel.idempotency_key == idempotency_key))
                        if existing is not None:
                            if existing.request_hash != request_hash:
                                raise IdempotencyConflict(existing.id)
                            return Job.of(existing), False
                    now = time.time()
                    m = JobModel(id=new_job_id(), owner=owner, created_at=now, updated_at=now,
                                 state=JobState.QUEUED.value, spec=json.dumps(spec), attempts=0,
                                 attempt_log="[]", cancel_requested=False, idempotency_key=idempotency_key,
                                 request_hash=request_hash)
                    s.add(m)
                    s.flush()
                    return Job.of(m), True
            except IntegrityError:
                if idempotency_key is None:
                    raise
        raise RuntimeError("could not create the job: idempotency key kept colliding")

    def get(self, job_id: str) -> Job | None:
        with self._sessions() as s:
            m = s.scalar(select(JobModel).where(JobModel.id == job_id))
            return Job.of(m) if m else None

    def list(self, owner: str | None = None, states: Iterable[JobState] | None = None, limit: int = 50,
             offset: int = 0) -> tuple[list[Job], int]:
        """(page, total) in submission order, newest first."""
        q = select(JobModel)
        if owner is not None:
            q = q.where(JobModel.owner == owner)
        if states is not None:
            q = q.where(JobModel.state.in_([st.value for st in states]))
        with self._sessions() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
            rows = s.scalars(q.order_by(JobModel.seq.desc()).limit(limit).offset(offset)).all()
            return [Job.of(m) for m in rows], total

    def queued_in_order(self) -> builtins.list[Job]:  # builtins: `list` here is the method above
        with self._sessions() as s:
            rows = s.scalars(select(JobModel).where(JobModel.state == JobState.QUEUED.value)
                             .order_by(JobModel.seq)).all()
            return [Job.of(m) for m in rows]

    def active(self) -> builtins.list[Job]:
        """Jobs holding a slot (STARTING, RUNNING), oldest first."""
        with self._sessions() as s:
            rows = s.scalars(select(JobModel).where(JobModel.state.in_([st.value for st in ACTIVE]))
                             .order_by(JobModel.seq)).all()
            return [Job.of(m) for m in rows]

    def transition(self, job_id: str, new: JobState, *, expect: Iterable[JobState] | None = None,
                   **fields: Any) -> Job:
        """Move a job to `new` (and set `fields`) in one transaction. Raises InvalidTransition when the
        table forbids it (always from a terminal state) or the job is not in one of `expect`;
        JobNotFound when the job does not exist."""
        bad = set(fields) - _UPDATABLE
        if bad:
            raise ValueError(f"cannot set {sorted(bad)} through transition()")
        with self._write_lock, self._sessions.begin() as s:
            m = s.scalar(select(JobModel).where(JobModel.id == job_id))
            if m is None:
                raise JobNotFound(job_id)
            old = JobState(m.state)
            if (expect is not None and old not in set(expect)) or not can_transition(old, new):
                raise InvalidTransition(job_id, old, new)
            result = s.execute(update(JobModel).where(JobModel.id == job_id, JobModel.state == old.value)
                               .values(state=new.value, updated_at=time.time(), **_encode(fields)))
            if _rowcount(result) != 1:  # changed under us (another process): let the caller re-read
                raise InvalidTransition(job_id, old, new)
            s.flush()
            s.refresh(m)
            return Job.of(m)

    def update(self, job_id: str, **fields: Any) -> Job | None:
        """Set non-state fields of a job that is not terminal (a finished job's record is final).
        None when the job is gone or already terminal."""
        bad = set(fields) - _UPDATABLE
        if bad:
            raise ValueError(f"cannot set {sorted(bad)} through update(); use transition()")
        with self._write_lock, self._sessions.begin() as s:
            result = s.execute(update(JobModel)
                               .where(JobModel.id == job_id,
                                      JobModel.state.not_in([st.value for st in TERMINAL]))
                               .values(updated_at=time.time(), **_encode(fields)))
            if _rowcount(result) != 1:
                return None
            m = s.scalar(select(JobModel).where(JobModel.id == job_id))
            return Job.of(m) if m else None

    def delete(self, job_id: str) -> bool:
        """Delete a terminal job's record. False when it is missing or not terminal."""
        with self._write_lock, self._sessions.begin() as s:
            m = s.scalar(select(JobModel).where(JobModel.id == job_id))
            if m is None or not JobState(m.state).is_terminal():
                return False
            s.delete(m)
            return True

    # --- tokens -----------------------------------------------------------------------------------------

    def add_token(self, name: str, token_hash: str, is_admin: bool = False) -> None:
        with self._write_lock, self._sessions.begin() as s:
            if s.get(TokenModel, name) is not None:
                raise TokenNameTaken(name)
            s.add(TokenModel(name=name, token_hash=token_hash, is_admin=is_admin, created_at=time.time()))

    def token_owner(self, token_hash: str) -> tuple[str, bool] | None:
        """(name, is_admin) for a token hash, or None."""
        with self._sessions() as s:
            m = s.scalar(select(TokenModel).where(TokenModel.token_hash == token_hash))
            return (m.name, m.is_admin) if m else None

    def has_admin_token(self) -> bool:
        with self._sessions() as s:
            return (s.scalar(select(func.count()).select_from(TokenModel).where(TokenModel.is_admin)) or 0) > 0
