"""The job store, through SQLAlchemy 2: a SQLite file under the data dir by default, or PostgreSQL
(`TRAINCTL_DATABASE_URL=postgresql+psycopg://...`), with the same code for both.

Every write runs in its own transaction, and every read-check-write is atomic in the database itself, not
in this process, so several API replicas can share one PostgreSQL: `Store.transition` (the only function
that changes a job's state) locks the row (`SELECT ... FOR UPDATE`; on SQLite the write transaction is
`BEGIN IMMEDIATE`, which takes the database's write lock up front) and applies the change as a
compare-and-set (`UPDATE ... WHERE state = <what we read>`), so the reconciler and a concurrent cancel, in
any process, can never both win, and a terminal state is never left.

The schema is owned by the Alembic migrations in service/engine/migrations (`create_schema` upgrades to head).
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError
from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, CursorResult, Engine, Result, Row, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql import Select

from service.common.lru import Lru
from service.engine.readcache import ReadCache
from service.engine.states import ACTIVE, TERMINAL, InvalidTransition, JobNotFound, JobState, can_transition
from trainer.spec import JobSpec

log = logging.getLogger("trainctl")


class Base(DeclarativeBase):
    pass


class JobModel(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner_id", "idempotency_key", name="uq_owner_id_idempotency_key"),)

    # An integer primary key gives a strict submission order for the queue; `id` is what users see.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)  # index: the list's `since` filter
    updated_at: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[str] = mapped_column(Text)  # the resolved JobSpec, JSON
    ray_submission_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    attempt_log: Mapped[str] = mapped_column(Text, default="[]")  # JSON list, one entry per attempt
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    best_val_acc: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)  # a sort key
    last_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Labels people search by (migration 0003): a free name, a project, tags. The tags are kept twice:
    # as JSON here for reading, and one row each in job_tags, whose index the tag filter uses.
    name: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    project: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    tags: Mapped[str] = mapped_column(Text, default="[]")
    parent: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # resubmitted from this job
    # Who may see and change the job: the owner id of the token that submitted it (never the name, which a
    # new token may reuse). NULL: a job whose token was gone when owner ids were introduced (admin only).
    owner_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # The estimate made at submission (service/common/estimate.py's Estimate, JSON); NULL before estimates existed.
    estimate: Mapped[str | None] = mapped_column(Text, nullable=True)


class JobTagModel(Base):
    __tablename__ = "job_tags"

    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class TokenModel(Base):
    __tablename__ = "tokens"
    __table_args__ = (UniqueConstraint("owner_id", name="uq_tokens_owner_id"),)

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; the token itself is never stored
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # unix time; None: never
    # A stable id made with the token and never reused: jobs belong to it, so a token re-created under the
    # same name starts with no jobs.
    owner_id: Mapped[str] = mapped_column(String(64))
    # Dashboard sessions issued before this time are void (logout ends them on every replica).
    sessions_not_before: Mapped[float | None] = mapped_column(Float, nullable=True)


@dataclass(frozen=True)
class TokenInfo:
    name: str
    is_admin: bool
    created_at: float
    expires_at: float | None


def parse_stored_spec(stored: str | dict[str, Any]) -> tuple[JobSpec, str | None]:
    """A stored spec (JSON text or its dict) as a JobSpec, and None; or, for a spec written by an older
    version that no longer validates, the closest valid JobSpec (each failing field back at its default)
    and a message naming those fields. Reading a job never fails over its spec: the job stays listable and
    deletable, and the runner fails such a job rather than start (or restart) it with a changed spec."""
    try:
        return (
            JobSpec.model_validate_json(stored) if isinstance(stored, str) else JobSpec.model_validate(stored)
        ), None
    except ValidationError as exc:
        first = exc
    try:
        data: Any = json.loads(stored) if isinstance(stored, str) else json.loads(json.dumps(stored))
    except ValueError:
        data = None
    if not isinstance(data, dict):
        data = {}
    reset: list[str] = []
    spec = JobSpec()
    for _ in range(20):  # each round drops the fields that failed; a few rounds settle any real spec
        try:
            spec = JobSpec.model_validate(data)
            break
        except ValidationError as exc:
            if not _drop_failing(data, exc, reset):
                reset = []  # nothing left to drop: every field at its default
                break
    fields = "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in first.errors(include_url=False)[:10]
    )
    message = (
        f"the stored spec no longer validates ({fields}), so it is read with "
        f"{', '.join(reset) if reset else 'every field'} dropped or back at the default; "
        "the job cannot start or restart: resubmit it with a valid spec"
    )
    return spec, message


def _drop_failing(data: dict[str, Any], exc: ValidationError, reset: list[str]) -> bool:
    """Remove from `data` the field each error names (the deepest mapping key on its path); when every such
    key is gone already (a cross-field error naming a field now at its default), the section holding it.
    False when nothing was left to remove."""
    exact: dict[str, tuple[dict[str, Any], str]] = {}
    enclosing: dict[str, tuple[dict[str, Any], str]] = {}
    for error in exc.errors(include_url=False):
        node: Any = data
        path: list[str] = []
        target: tuple[dict[str, Any], str] | None = None
        found = True
        for key in error["loc"]:
            if not isinstance(node, dict) or not isinstance(key, str):
                break  # inside a list or a value: the whole field that holds it goes
            if key not in node:
                found = False
                break
            target = (node, key)
            path.append(key)
            node = node[key]
        if target is not None:
            (exact if found else enclosing)[".".join(path)] = target
    chosen = exact or enclosing
    for dotted, (parent, key) in chosen.items():
        if key in parent:
            del parent[key]
            reset.append(dotted)
    return bool(chosen)


@dataclass(frozen=True)
class TokenIdentity:
    """Who a valid token is: its name, role, the owner id its jobs carry, and when its sessions were ended."""

    name: str
    is_admin: bool
    owner_id: str
    sessions_not_before: float | None


def new_owner_id() -> str:
    # ':' cannot occur in a token name, so an owner id never equals one.
    return "id:" + secrets.token_hex(16)


@dataclass(frozen=True)
class Job:
    """A snapshot of one job row (no live ORM object escapes the store). `spec` is validated when the
    snapshot is made; `spec_error` says why a stored spec from an older version did not validate
    (see `parse_stored_spec`), else None."""

    seq: int
    id: str
    owner: str
    created_at: float
    updated_at: float
    state: JobState
    spec: JobSpec
    ray_submission_id: str | None
    attempts: int
    attempt_log: list[dict[str, Any]]
    message: str | None
    best_val_acc: float | None
    last_epoch: int | None
    cancel_requested: bool
    idempotency_key: str | None = field(default=None, repr=False)
    request_hash: str | None = field(default=None, repr=False)
    spec_error: str | None = None
    name: str | None = None
    project: str | None = None
    tags: list[str] = field(default_factory=list)
    parent: str | None = None
    owner_id: str | None = field(default=None, repr=False)
    estimate: str | None = field(default=None, repr=False)  # JSON, as stored: parsed where it is shown

    @classmethod
    def of(cls, m: JobModel) -> Job:
        spec, spec_error = parse_stored_spec(m.spec)
        return cls(
            seq=m.seq,
            id=m.id,
            owner=m.owner,
            created_at=m.created_at,
            updated_at=m.updated_at,
            state=JobState(m.state),
            spec=spec,
            ray_submission_id=m.ray_submission_id,
            attempts=m.attempts,
            attempt_log=json.loads(m.attempt_log or "[]"),
            message=m.message,
            best_val_acc=m.best_val_acc,
            last_epoch=m.last_epoch,
            cancel_requested=m.cancel_requested,
            idempotency_key=m.idempotency_key,
            request_hash=m.request_hash,
            spec_error=spec_error,
            name=m.name,
            project=m.project,
            tags=json.loads(m.tags or "[]"),
            parent=m.parent,
            owner_id=m.owner_id,
            estimate=m.estimate,
        )


@dataclass(frozen=True)
class Labels:
    """What a person names a job by (validated by the API: lengths, no control characters, at most 32 tags)."""

    name: str | None = None
    project: str | None = None
    tags: tuple[str, ...] = ()
    parent: str | None = None


SORT_KEYS = ("created", "name", "best_val_acc")


@dataclass(frozen=True)
class JobFilter:
    """`Store.list`'s search: every given condition must hold. `tags`: all of them; `name`: a substring
    (case-insensitive); `since`: created at or after (unix time)."""

    tags: tuple[str, ...] = ()
    project: str | None = None
    name: str | None = None
    since: float | None = None
    sort: str = "created"


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"this Idempotency-Key was already used for job {job_id} with a different body")
        self.job_id = job_id


class NotCached(Exception):
    """A read inside `Store.cached_only()` that the read cache could not answer: retry it where blocking on
    the database is allowed."""


class TokenNameTaken(Exception):
    pass


def new_job_id() -> str:
    # 16 random bytes: unguessable, URL-safe, and short enough to read in a terminal. Never a leading
    # '-' (about one id in 64 would have one), which a command line takes for an option.
    while True:
        job_id = secrets.token_urlsafe(16)
        if not job_id.startswith("-"):
            return job_id


# Columns `update` may change; `state` only changes through `transition`.
_UPDATABLE = {
    "ray_submission_id",
    "attempts",
    "attempt_log",
    "message",
    "best_val_acc",
    "last_epoch",
    "cancel_requested",
}


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    if "attempt_log" in out:
        out["attempt_log"] = json.dumps(out["attempt_log"])
    return out


def _label_columns(labels: Labels) -> dict[str, Any]:
    return {
        "name": labels.name,
        "project": labels.project,
        "tags": json.dumps(list(labels.tags)),
        "parent": labels.parent,
    }


def _rowcount(result: Result[Any]) -> int:
    """How many rows an UPDATE matched (its result is a CursorResult, typed as a plain Result)."""
    return int(cast(CursorResult[Any], result).rowcount)


def sqlite_url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


def redact_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str) -> Engine:
    """An engine for `url`. SQLite: WAL (readers never block the writer), a busy timeout, and write
    transactions that start with BEGIN IMMEDIATE (see `Store`); PostgreSQL: pre-pinged pooled connections."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # A deferred transaction that reads and then writes cannot wait for another process's writer
            # (SQLITE_BUSY at once); IMMEDIATE takes the write lock first and waits for it (busy_timeout).
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("trainctl_write") else "BEGIN")

        return engine
    if u.get_backend_name() != "postgresql":
        raise ValueError(
            f"unsupported database URL {redact_url(url)}: use sqlite:///path or "
            "postgresql+psycopg://user:password@host:port/dbname"
        )
    return create_engine(u, pool_pre_ping=True, pool_size=10, max_overflow=20)


# The two reads every poll makes, prepared once (building a statement costs more than running it here).
_JOB_BY_ID = select(JobModel.__table__).where(JobModel.id == bindparam("job_id"))
_TOKEN_OWNER = select(TokenModel.name, TokenModel.is_admin, TokenModel.expires_at).where(
    TokenModel.token_hash == bindparam("token_hash")
)
_TOKEN_IDENTITY = select(
    TokenModel.name, TokenModel.is_admin, TokenModel.owner_id, TokenModel.sessions_not_before, TokenModel.expires_at
).where(TokenModel.token_hash == bindparam("token_hash"))
# A status poll's two reads in one round trip (on PostgreSQL each is a wait on the network and a pass through
# the driver): the token's row, with the job's row joined on the job id (NULLs when there is no such job). The
# job's columns come first, under the model's names, so the row reads as a job row (`Job.of`); the token's are
# labelled `token_*`. No row at all: no such token.
_JOB_COLUMNS = len(JobModel.__table__.columns)
_IDENTITY_AND_JOB = (
    select(JobModel.__table__, *(c.label(f"token_{c.name}") for c in _TOKEN_IDENTITY.selected_columns))
    .select_from(TokenModel.__table__.outerjoin(JobModel.__table__, JobModel.id == bindparam("job_id")))
    .where(TokenModel.token_hash == bindparam("token_hash"))
)


def _valid_identity(
    name: str, is_admin: bool, owner_id: str, sessions_not_before: float | None, expires_at: float | None
) -> TokenIdentity | None:
    """The identity a token row (`_TOKEN_IDENTITY`'s columns, in order) grants, or None once it has expired."""
    if expires_at is not None and expires_at <= time.time():
        return None
    return TokenIdentity(name, bool(is_admin), owner_id, sessions_not_before)


@functools.lru_cache(maxsize=64)
def _list_queries(by_owner: bool, by_owner_id: bool, states: frozenset[str] | None) -> tuple[Select[Any], Select[Any]]:
    """(count, page) for Store.list, prepared once per filter shape; owner, owner id, limit and offset are
    parameters. The page carries the count too, as a last column `total` (an uncorrelated subquery the database
    evaluates once): one round trip for a page that has rows; `count` alone answers a page past the end."""
    q = select(JobModel.__table__)
    if by_owner:
        q = q.where(JobModel.owner == bindparam("owner"))
    if by_owner_id:
        q = q.where(JobModel.owner_id == bindparam("owner_id"))
    if states is not None:
        q = q.where(JobModel.state.in_(sorted(states)))
    count = select(func.count()).select_from(q.subquery())
    page = (
        q.add_columns(count.scalar_subquery().label("total"))
        .order_by(JobModel.seq.desc())
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )
    return count, page


SNAPSHOTS = 2048  # Job snapshots kept for unchanged rows (a list page is 50 to 500)


class Store:
    """`url_or_path`: a SQLAlchemy URL, or a Path to a SQLite file."""

    def __init__(self, url_or_path: str | Path) -> None:
        self.url = sqlite_url(url_or_path) if isinstance(url_or_path, Path) else url_or_path
        self.engine = make_engine(self.url)
        self.dialect = self.engine.dialect.name  # "sqlite" | "postgresql"
        self._session_factory = sessionmaker(self.engine, expire_on_commit=False)
        # Transactions that write: BEGIN IMMEDIATE on SQLite (the option is ignored elsewhere).
        self._writes = sessionmaker(self.engine.execution_options(trainctl_write=True), expire_on_commit=False)
        self._snapshots: Lru[Job] = Lru(SNAPSHOTS)
        self._pinned = threading.local()  # .conn: this thread's connection inside `one_connection`; .kept
        self._kept: builtins.list[Connection] = []  # the connections `one_connection(kept=True)` opened
        # Called with the new snapshot after every committed transition (the runner mirrors the record into
        # the job directory, from which `trainctl reindex` rebuilds a lost database). Must not raise.
        self.on_transition: Callable[[Job], None] | None = None
        # The status path's reads kept while the database says nothing changed (`cache_reads`); None: off.
        self.read_cache: ReadCache | None = None
        self._feed: Any = None  # the ChangeFeed that keeps read_cache current

    def create_schema(self) -> None:
        """Bring the schema to the newest migration (creates it in an empty database)."""
        from service.engine.migrate import upgrade

        upgrade(self.engine)

    def cache_reads(self) -> None:
        """On PostgreSQL: serve the status path's reads (a token's identity, a polled job, an unfiltered page
        of jobs) from memory while the database announces no change to them (service/engine/readcache.py, fed
        by service/engine/changefeed.py's LISTEN thread). For the API process, which polls hit; call once.
        Nothing on SQLite, where a read is no round trip and nothing announces changes."""
        if self.dialect != "postgresql" or self._feed is not None:
            return
        from service.engine.changefeed import TRIGGERS, ChangeFeed, psycopg_dsn  # psycopg: only for PostgreSQL

        with self.engine.connect() as conn:
            found = set(conn.scalars(text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")))
        if missing := sorted(set(TRIGGERS) - found):
            # Nothing would announce those tables' changes: a cache would serve stale rows for ever.
            log.warning("read cache off: the database lacks the triggers %s (run `trainctl db upgrade`)", missing)
            return
        self.read_cache = ReadCache()
        self._feed = ChangeFeed(psycopg_dsn(self.url), self.read_cache)
        self._feed.start()

    def _forget(self, *payloads: str) -> None:
        """What this process just committed, forgotten at once (the database's announcement follows
        milliseconds later): a client reads its own change on its next poll to this replica."""
        if self.read_cache is not None:
            for payload in payloads:
                self.read_cache.changed(payload)

    def close(self) -> None:
        if self._feed is not None:
            self._feed.stop()
        for conn in self._kept:
            conn.close()
        self.engine.dispose()

    @contextmanager
    def one_connection(self, kept: bool = False) -> Iterator[None]:
        """The status-path reads inside (get, list, token checks) share one connection and one read
        transaction: one checkout instead of one per read (on PostgreSQL each checkout is also a pre-ping
        round trip, and each return a rollback). For this thread only; nests. `kept`: this thread's own
        connection, opened once and kept outside the pool — for the event loop, whose inline polls must never
        wait for a pooled connection held by worker threads, and for the API's poll threads, which so skip the
        pool's checkout (on PostgreSQL a pre-ping round trip) and return (a rollback) on every poll."""
        if getattr(self._pinned, "conn", None) is not None:
            yield
            return
        if not kept:
            with self.engine.connect() as conn:
                self._pinned.conn = conn
                try:
                    yield
                finally:
                    self._pinned.conn = None
            return
        kept_conn: Connection | None = getattr(self._pinned, "kept", None)
        if kept_conn is None or kept_conn.closed or kept_conn.invalidated:
            kept_conn = self._pinned.kept = self.engine.connect()
            if self.dialect == "postgresql":
                # Only reads run here, each a statement of its own: no BEGIN before them, no ROLLBACK after
                # (two of a poll's four round trips to the server)
                kept_conn = kept_conn.execution_options(isolation_level="AUTOCOMMIT")
            self._kept.append(kept_conn)
        conn = kept_conn
        self._pinned.conn = conn
        try:
            yield
        finally:
            self._pinned.conn = None
            conn.rollback()  # ends the read transaction: the next poll sees what was committed meanwhile

    @contextmanager
    def cached_only(self) -> Iterator[None]:
        """Reads inside (this thread only) must be answered by the read cache: one that would reach the
        database raises NotCached instead, before it connects. The event loop tries a status poll this way,
        and hands it to a poll thread only when that fails (service/api/deps.py `run_poll`)."""
        self._pinned.cached_only = True
        try:
            yield
        finally:
            self._pinned.cached_only = False

    def _check_may_read(self) -> None:
        if getattr(self._pinned, "cached_only", False):
            raise NotCached

    def _reading(self) -> AbstractContextManager[Connection]:
        self._check_may_read()
        conn: Connection | None = getattr(self._pinned, "conn", None)
        return nullcontext(conn) if conn is not None else self.engine.connect()

    def _sessions(self) -> Session:
        self._check_may_read()
        return self._session_factory()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # --- jobs -------------------------------------------------------------------------------------------

    def create_job(
        self,
        owner: str,
        spec: JobSpec,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        labels: Labels | None = None,
        *,
        owner_id: str | None = None,
        quota: Callable[[dict[JobState, int]], None] | None = None,
        estimate: str | None = None,
    ) -> tuple[Job, bool]:
        """Insert a QUEUED job for `owner` (the name shown) and `owner_id` (who may see it; default the
        name). With an idempotency key already used by this owner: the earlier job (created=False) when the
        request hash matches, else IdempotencyConflict. `quota` is called with the owner's job counts by
        state inside the inserting transaction, after taking a per-owner lock in the database, and may
        raise to refuse: so the quota holds however many API replicas insert at once. `estimate`: the
        submission's Estimate (service/common/estimate.py) as JSON."""
        owner_id = owner_id or owner
        for _ in range(2):  # a second round only when another process inserted the same key meanwhile
            try:
                with self._writes.begin() as s:
                    if idempotency_key is not None:
                        existing = s.scalar(
                            select(JobModel).where(
                                JobModel.owner_id == owner_id, JobModel.idempotency_key == idempotency_key
                            )
                        )
                        if existing is not None:
                            if existing.request_hash != request_hash:
                                raise IdempotencyConflict(existing.id)
                            return Job.of(existing), False
                    if quota is not None:
                        self._lock_owner(s, owner_id)
                        rows = s.execute(
                            select(JobModel.state, func.count())
                            .where(JobModel.owner_id == owner_id)
                            .group_by(JobModel.state)
                        ).all()
                        quota({JobState(state): n for state, n in rows})
                    now = time.time()
                    m = JobModel(
                        id=new_job_id(),
                        owner=owner,
                        created_at=now,
                        updated_at=now,
                        state=JobState.QUEUED.value,
                        spec=spec.model_dump_json(),
                        attempts=0,
                        attempt_log="[]",
                        cancel_requested=False,
                        idempotency_key=idempotency_key,
                        request_hash=request_hash,
                        **_label_columns(labels or Labels()),
                        owner_id=owner_id,
                        estimate=estimate,
                    )
                    s.add(m)
                    s.flush()
                    s.add_all(JobTagModel(job_id=m.id, tag=t) for t in (labels or Labels()).tags)
                    created = Job.of(m)
                self._forget("j:" + created.id)  # committed: cached pages of jobs lack it
                return created, True
            except IntegrityError:
                if idempotency_key is None:
                    raise
        raise RuntimeError("could not create the job: idempotency key kept colliding")

    def _lock_owner(self, s: Any, owner_id: str) -> None:
        """Serialise one owner's inserts across processes until the transaction ends: a PostgreSQL advisory
        transaction lock keyed by the owner id (SQLite's BEGIN IMMEDIATE already holds the write lock)."""
        if self.dialect == "postgresql":
            key = int.from_bytes(hashlib.sha256(owner_id.encode()).digest()[:8], "big", signed=True)
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    def get(self, job_id: str, *, cached: bool = False) -> Job | None:
        """The job, or None. `cached`: from the read cache when it holds it (`cache_reads`) — for what clients
        poll (the dashboard's job reads, event streams); the engine's own decisions read the database."""
        # Every poll reads its job: a prepared Core query through a pooled connection costs a fraction of an
        # ORM load, and an unchanged row's snapshot is not rebuilt (`_snapshot`).
        cache = self.read_cache if cached else None
        stamp = cache.stamp() if cache is not None else None
        if cache is not None and stamp is not None:
            if (job := cache.jobs.get(job_id)) is not None:
                cache.hits += 1
                return job
        with self._reading() as conn:
            row = conn.execute(_JOB_BY_ID, {"job_id": job_id}).first()
        if row is None:
            return None
        job = self._snapshot(row)
        if cache is not None and stamp is not None:
            cache.put(stamp, cache.jobs, job_id, job)
        return job

    def identity_and_job(self, token_hash: str, job_id: str) -> tuple[TokenIdentity | None, Job | None]:
        """A status poll's reads in one round trip: who holds the token (None when it does not exist or has
        expired, and then no job either) and the job (None when there is none). From the read cache when it
        holds both (`cache_reads`; a token's expiry is checked on every read), as `token_identity`."""
        cache = self.read_cache
        stamp = cache.stamp() if cache is not None else None
        if cache is not None and stamp is not None:
            identity, job = cache.tokens.get(token_hash), cache.jobs.get(job_id)
            if identity is not None and job is not None:
                cache.hits += 1
                who = _valid_identity(*identity)
                return (who, job) if who is not None else (None, None)
        with self._reading() as conn:
            row = conn.execute(_IDENTITY_AND_JOB, {"token_hash": token_hash, "job_id": job_id}).first()
        if row is None:
            return None, None
        identity = tuple(row[_JOB_COLUMNS:])
        job = self._snapshot(row, _JOB_COLUMNS) if row.id is not None else None
        if cache is not None and stamp is not None:
            cache.put(stamp, cache.tokens, token_hash, identity)  # kept expired too: expiry is checked per read
            if job is not None:
                cache.put(stamp, cache.jobs, job_id, job)
        who = _valid_identity(*identity)
        return (who, job) if who is not None else (None, None)

    def _snapshot(self, row: Row[Any], columns: int | None = None) -> Job:
        """The Job for a jobs-table row (its first `columns` columns: a row that carries more, such as a
        list page's total), shared with earlier reads of the same row. Keyed on the row's job columns (their
        content, not the id), so a row another replica changed never maps to an old snapshot; shared
        snapshots are read-only, as Job (frozen) already says: never change their spec or attempt_log."""
        # a plain tuple: hashed and compared in C (a Row compares in Python)
        key = tuple(row) if columns is None else tuple(row[:columns])
        job = self._snapshots.get(key)
        if job is None:
            job = Job.of(cast(JobModel, row))  # a row has the model's attribute names
            self._snapshots.put(key, job)
        return job

    def list(
        self,
        owner: str | None = None,
        states: Iterable[JobState] | None = None,
        limit: int = 50,
        offset: int = 0,
        where: JobFilter | None = None,
        *,
        owner_id: str | None = None,
    ) -> tuple[list[Job], int]:
        """(page, total), newest first by default (`where.sort`: created, name A-Z, best_val_acc highest
        first; ties newest first); `owner` filters by the name shown, `owner_id` by who owns the job. Every
        condition is an indexed column (the name substring scans the rows the other conditions leave)."""
        where = where or JobFilter()
        if where == JobFilter():  # the status path: a prepared query per filter shape (_list_queries)
            count, page = _list_queries(
                owner is not None,
                owner_id is not None,
                None if states is None else frozenset(st.value for st in states),
            )
            params = {"owner": owner, "owner_id": owner_id, "limit": limit, "offset": offset}
            cache = self.read_cache
            stamp = cache.stamp() if cache is not None else None
            key = (owner, owner_id, None if states is None else frozenset(states), limit, offset)
            if cache is not None and stamp is not None:
                if (hit := cache.pages.get(key)) is not None:
                    cache.hits += 1
                    return list(hit[0]), hit[1]
            with self._reading() as conn:
                rows = conn.execute(page, params).all()
                if not rows:  # past the end (or no job at all): the page says no total
                    result: tuple[list[Job], int] = [], conn.scalar(count, params) or 0
                else:
                    result = [self._snapshot(row, _JOB_COLUMNS) for row in rows], rows[0].total
            if cache is not None and stamp is not None:
                cache.put(stamp, cache.pages, key, (list(result[0]), result[1]))
            return result
        q = select(JobModel)
        if owner is not None:
            q = q.where(JobModel.owner == owner)
        if owner_id is not None:
            q = q.where(JobModel.owner_id == owner_id)
        if states is not None:
            q = q.where(JobModel.state.in_([st.value for st in states]))
        for tag in where.tags:
            q = q.where(JobModel.id.in_(select(JobTagModel.job_id).where(JobTagModel.tag == tag)))
        if where.project is not None:
            q = q.where(JobModel.project == where.project)
        if where.name:
            pattern = "%" + where.name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            q = q.where(JobModel.name.ilike(pattern, escape="\\"))
        if where.since is not None:
            q = q.where(JobModel.created_at >= where.since)
        if where.sort not in SORT_KEYS:
            raise ValueError(f"unknown sort key {where.sort!r}: one of {', '.join(SORT_KEYS)}")
        orders: dict[str, list[Any]] = {
            "created": [JobModel.seq.desc()],
            "name": [JobModel.name.asc().nulls_last(), JobModel.seq.desc()],
            "best_val_acc": [JobModel.best_val_acc.desc().nulls_last(), JobModel.seq.desc()],
        }
        order = orders[where.sort]
        with self._sessions() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
            models = s.scalars(q.order_by(*order).limit(limit).offset(offset)).all()
            return [Job.of(m) for m in models], total

    def count_by_state(self, owner: str) -> dict[JobState, int]:
        """How many jobs `owner` has in each state (states with none are absent)."""
        with self._sessions() as s:
            rows = s.execute(
                select(JobModel.state, func.count()).where(JobModel.owner == owner).group_by(JobModel.state)
            ).all()
            return {JobState(state): n for state, n in rows}

    def by_idempotency_key(self, owner_id: str, key: str) -> Job | None:
        with self._sessions() as s:
            m = s.scalar(select(JobModel).where(JobModel.owner_id == owner_id, JobModel.idempotency_key == key))
            return Job.of(m) if m else None

    def queued_in_order(self) -> builtins.list[Job]:  # builtins: `list` here is the method above
        with self._sessions() as s:
            rows = s.scalars(
                select(JobModel).where(JobModel.state == JobState.QUEUED.value).order_by(JobModel.seq)
            ).all()
            return [Job.of(m) for m in rows]

    def active(self) -> builtins.list[Job]:
        """Jobs holding a slot (STARTING, RUNNING), oldest first."""
        with self._sessions() as s:
            rows = s.scalars(
                select(JobModel).where(JobModel.state.in_([st.value for st in ACTIVE])).order_by(JobModel.seq)
            ).all()
            return [Job.of(m) for m in rows]

    def transition(self, job_id: str, new: JobState, *, expect: Iterable[JobState] | None = None, **fields: Any) -> Job:
        """Move a job to `new` (and set `fields`) in one transaction. Raises InvalidTransition when the
        table forbids it (always from a terminal state) or the job is not in one of `expect`;
        JobNotFound when the job does not exist."""
        bad = set(fields) - _UPDATABLE
        if bad:
            raise ValueError(f"cannot set {sorted(bad)} through transition()")
        with self._writes.begin() as s:
            m = s.scalar(select(JobModel).where(JobModel.id == job_id).with_for_update())
            if m is None:
                raise JobNotFound(job_id)
            old = JobState(m.state)
            if (expect is not None and old not in set(expect)) or not can_transition(old, new):
                raise InvalidTransition(job_id, old, new)
            result = s.execute(
                update(JobModel)
                .where(JobModel.id == job_id, JobModel.state == old.value)
                .values(state=new.value, updated_at=time.time(), **_encode(fields))
            )
            if _rowcount(result) != 1:  # changed under us (cannot happen under the row lock; kept as the CAS)
                raise InvalidTransition(job_id, old, new)
            s.flush()
            s.refresh(m)
            job = Job.of(m)
        self._forget("j:" + job_id)
        if self.on_transition is not None:
            self.on_transition(job)
        return job

    def update(self, job_id: str, **fields: Any) -> Job | None:
        """Set non-state fields of a job that is not terminal (a finished job's record is final).
        None when the job is gone or already terminal."""
        bad = set(fields) - _UPDATABLE
        if bad:
            raise ValueError(f"cannot set {sorted(bad)} through update(); use transition()")
        with self._writes.begin() as s:
            result = s.execute(
                update(JobModel)
                .where(JobModel.id == job_id, JobModel.state.not_in([st.value for st in TERMINAL]))
                .values(updated_at=time.time(), **_encode(fields))
            )
            if _rowcount(result) != 1:
                return None
            m = s.scalar(select(JobModel).where(JobModel.id == job_id))
            job = Job.of(m) if m else None
        self._forget("j:" + job_id)
        return job

    def delete(self, job_id: str) -> bool:
        """Delete a terminal job's record (and its tag rows). False when it is missing or not terminal."""
        with self._writes.begin() as s:
            result = s.execute(
                delete(JobModel).where(JobModel.id == job_id, JobModel.state.in_([st.value for st in TERMINAL]))
            )
            if _rowcount(result) != 1:
                return False
            # Explicitly: SQLite enforces ON DELETE CASCADE only with PRAGMA foreign_keys, which is off here.
            s.execute(delete(JobTagModel).where(JobTagModel.job_id == job_id))
        self._forget("j:" + job_id)
        return True

    def import_job(self, job: Job) -> bool:
        """Insert a record rebuilt from storage (`trainctl reindex`), keeping its id, owner, state and
        history. False (and nothing changes) when a job with that id exists."""
        row = {
            f: getattr(job, f)
            for f in (
                "id",
                "owner",
                "created_at",
                "updated_at",
                "ray_submission_id",
                "attempts",
                "message",
                "best_val_acc",
                "last_epoch",
                "cancel_requested",
                "idempotency_key",
                "request_hash",
                "owner_id",
                "estimate",
            )
        }
        row.update(_label_columns(Labels(job.name, job.project, tuple(job.tags), job.parent)))
        try:
            with self._writes.begin() as s:
                if s.scalar(select(JobModel.seq).where(JobModel.id == job.id)) is not None:
                    return False
                s.add(
                    JobModel(
                        **row,
                        state=job.state.value,
                        spec=job.spec.model_dump_json(),
                        attempt_log=json.dumps(job.attempt_log),
                    )
                )
                s.flush()
                s.add_all(JobTagModel(job_id=job.id, tag=t) for t in dict.fromkeys(job.tags))
            self._forget("j:" + job.id)
            return True
        except IntegrityError:  # the same id inserted meanwhile, or its idempotency key is taken
            return False

    def counts_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, 0 when none)."""
        with self._sessions() as s:
            rows = s.execute(select(JobModel.state, func.count()).group_by(JobModel.state)).all()
        counts = {st: 0 for st in JobState}
        for state, n in rows:
            counts[JobState(state)] = n
        return counts

    def queued_by_owner(self) -> dict[str, int]:
        with self._sessions() as s:
            rows = s.execute(
                select(JobModel.owner, func.count())
                .where(JobModel.state == JobState.QUEUED.value)
                .group_by(JobModel.owner)
            ).all()
        return {owner: n for owner, n in rows}

    # --- tokens -----------------------------------------------------------------------------------------

    def add_token(self, name: str, token_hash: str, is_admin: bool = False, expires_at: float | None = None) -> str:
        """Store a token (its hash) under `name` with a new owner id, which it returns."""
        owner_id = new_owner_id()
        try:
            with self._writes.begin() as s:
                if s.get(TokenModel, name) is not None:
                    raise TokenNameTaken(name)
                s.add(
                    TokenModel(
                        name=name,
                        token_hash=token_hash,
                        is_admin=is_admin,
                        created_at=time.time(),
                        expires_at=expires_at,
                        owner_id=owner_id,
                    )
                )
            return owner_id
        except IntegrityError:  # another replica added the same name between our read and our insert
            with self._sessions() as s:
                if s.get(TokenModel, name) is not None:
                    raise TokenNameTaken(name) from None
            raise

    def token_owner(self, token_hash: str) -> tuple[str, bool] | None:
        """(name, is_admin) for a token hash that exists and has not expired, or None."""
        # Every request authenticates: one plain row through a pooled connection (a quarter of an ORM load),
        # and no cache, so a revoked token is refused at once by every replica.
        with self._reading() as conn:
            row = conn.execute(_TOKEN_OWNER, {"token_hash": token_hash}).first()
        if row is None or (row.expires_at is not None and row.expires_at <= time.time()):
            return None
        return row.name, bool(row.is_admin)

    def token_identity(self, token_hash: str) -> TokenIdentity | None:
        """Who holds a token hash that exists and has not expired, or None. Read by every authenticated
        request: from the read cache where `cache_reads` turned it on (a revoked token is forgotten there as the
        database announces the revocation, milliseconds later, on every replica), else a prepared Core query on
        a pooled connection, a fraction of an ORM session's load."""
        cache = self.read_cache
        stamp = cache.stamp() if cache is not None else None
        if cache is not None and stamp is not None and (identity := cache.tokens.get(token_hash)) is not None:
            cache.hits += 1
            return _valid_identity(*identity)
        with self._reading() as conn:
            row = conn.execute(_TOKEN_IDENTITY, {"token_hash": token_hash}).first()
        if row is None:
            return None
        if cache is not None and stamp is not None:
            cache.put(stamp, cache.tokens, token_hash, tuple(row))
        return _valid_identity(*row)

    def end_sessions(self, token_hash: str, now: float | None = None) -> bool:
        """Void every dashboard session of this token issued until now (logout, on every replica)."""
        with self._writes.begin() as s:
            result = s.execute(
                update(TokenModel)
                .where(TokenModel.token_hash == token_hash)
                .values(sessions_not_before=time.time() if now is None else now)
            )
            ended = _rowcount(result) == 1
        self._forget("t:" + token_hash)
        return ended

    def list_tokens(self) -> builtins.list[TokenInfo]:
        with self._sessions() as s:
            return [
                TokenInfo(m.name, m.is_admin, m.created_at, m.expires_at)
                for m in s.scalars(select(TokenModel).order_by(TokenModel.name)).all()
            ]

    def delete_token(self, name: str) -> bool:
        """Revoke a token: it stops working at once. False when there is none by that name."""
        with self._writes.begin() as s:
            m = s.get(TokenModel, name)
            if m is None:
                return False
            token_hash = m.token_hash
            s.delete(m)
        self._forget("t:" + token_hash)
        return True

    def has_admin_token(self) -> bool:
        with self._sessions() as s:
            return (s.scalar(select(func.count()).select_from(TokenModel).where(TokenModel.is_admin)) or 0) > 0
