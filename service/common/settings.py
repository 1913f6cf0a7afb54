"""Service settings: environment variables with the TRAINCTL_ prefix, overridable by CLI flags.

Built by `load_settings()` when a process starts (never at import), so tests and the CLI can build as many
differently configured apps as they like.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.common.estimate import NodeType, Pricing
from trainer.spec import NotifySpec


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINCTL_", extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="SQLite store, admin token, default storage")
    # The job store. Empty: the SQLite file <data_dir>/trainctl.db (the embedded default). Production:
    # postgresql+psycopg://user:password@host:5432/trainctl, shared by any number of API replicas.
    database_url: str = ""
    storage: str = Field(default="", description="storage root URI; empty: <data_dir>/storage")
    # Either the cluster's GCS address (host:6379, ray://...) or its dashboard / Jobs API URL
    # (http://host:8265). Empty: `trainctl serve` starts a local head; the bare app lets Ray auto-detect.
    ray_address: str = ""
    # RAY_AUTH_MODE for a head that `trainctl serve` starts. Token by default: without it any local user
    # could run code as us through that head's Jobs API. (An attached cluster keeps its own setting.)
    ray_auth_mode: str = Field(default="token", pattern="^(disabled|token)$")
    # CPU priority of a head that `trainctl serve` starts, and so of every job it runs (nice, 0-19; applied to
    # the head's session too, where the kernel schedules sessions as groups). Training on the API's machine
    # takes every core it can: at normal priority status polls waited behind it (p99 66-167 ms at 200 req/s),
    # while the API needs a fraction of a core and training loses only what the API uses (bench/RESULTS.md).
    # 10, not 19: the API's weight is then ~9× the job's, which polls measured as good as 19; at 19 (~68×) a
    # job next to any other busy program on the machine all but stops.
    ray_nice: int = Field(default=10, ge=0, le=19)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_concurrent_jobs: int = Field(default=2, ge=1, le=1000)
    auth: bool = True
    # The python that runs `-m trainer.run` on the cluster; the default suits a local cluster.
    python: str = sys.executable
    entrypoint_num_cpus: float = Field(default=0.5, ge=0.0)
    # Extra Ray resources each job's driver reserves (JSON in the environment), e.g. {"trainctl_driver": 1}
    # with only the head advertising `trainctl_driver`: drivers then never run on a worker node that may go away.
    entrypoint_resources: dict[str, float] = Field(default_factory=dict)
    reconcile_interval_s: float = Field(default=2.0, gt=0.0)
    # One log line per HTTP request (uvicorn's access log). Off by default: clients poll job status several
    # times a second, and formatting and writing a line per poll was ~9 % of the event loop's busy time
    # (bench/RESULTS.md); per-route counts and latencies are in /metrics either way, and errors are logged.
    access_log: bool = False
    # PostgreSQL: status polls read a token's identity, a job and an unfiltered page of jobs from memory while
    # the database announces no change to them (LISTEN/NOTIFY, service/engine/readcache.py): no round trip per
    # poll. A change made elsewhere is seen within milliseconds, and within 3 s at worst if the notifications
    # stop; off: every poll reads the database. (SQLite: nothing to cache, reads are in-process.)
    read_cache: bool = True
    # How often GET /v1/jobs/{id}/events looks at the store and metrics.jsonl for news.
    events_poll_s: float = Field(default=1.0, gt=0.0)

    # --- what users may ask for (docs/security.md) ---
    # Comma-separated path/URI prefixes a spec's data.train/data.test must lie under (after normalising `..`,
    # symlinks, `~`, file://). Empty: <data_dir>/datasets and ~/.cache/trainctl. Add s3://bucket/prefix for data
    # in a bucket.
    data_roots: str = ""
    # Refuse at submission a data path that does not exist where the service can see it (local paths: set
    # false when the drivers run on another machine than the service and see other files).
    check_local_data: bool = True
    max_active_jobs_per_owner: int = Field(default=4, ge=1)  # STARTING/RUNNING at once
    max_queued_jobs_per_owner: int = Field(default=10, ge=0)  # QUEUED at once
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_model_parameters: int = Field(default=50_000_000, ge=1)
    max_search_trials: int = Field(default=256, ge=1)
    max_job_hours: float = Field(default=72.0, gt=0.0)  # caps a spec's limits.max_hours
    # The most GPUs one node of the cluster can have: the largest node type's (cluster/gpu.yaml: 4). A job
    # whose GPUs per node (scaling.gpus_per_worker x scaling.workers_per_node) exceed it could never be placed
    # and is refused at submission. None: not checked (a cluster whose node types this service doesn't know).
    max_gpus_per_node: int | None = Field(default=None, ge=1, le=1024)
    # --- webhook alerts (service/engine/notify.py) ---
    # Comma-separated hosts (or host:port) a spec's notify.webhook may name; `*` any. Empty: none (a spec with
    # notify is refused), since a webhook is a request this service makes on a user's behalf.
    webhook_hosts: str = ""
    # The operator's default alert for jobs whose spec has no notify section (empty: none), and its states.
    notify_webhook: str = ""
    notify_on: str = "FAILED"
    webhook_timeout_s: float = Field(default=5.0, gt=0.0, le=60.0)
    webhook_attempts: int = Field(default=3, ge=1, le=10)
    webhook_backoff_s: float = Field(default=1.0, ge=0.0, le=60.0)  # before retry n: backoff x 2^(n-1)
    # Expensive requests (docs/security.md): open event streams per owner and in all (429 past either), and
    # the bounded pool that renders plots: its threads, and how many more requests may wait for one (503).
    max_event_streams_per_owner: int = Field(default=8, ge=1)
    max_event_streams: int = Field(default=256, ge=1)
    slow_workers: int = Field(default=4, ge=1, le=256)
    slow_queue: int = Field(default=16, ge=0)

    # --- estimates (service/common/estimate.py, docs/estimates.md) ---
    # The worker node types jobs run on, as JSON or the path of a JSON file, e.g.
    # {"gpu.1xa10g": {"cpus": 4, "gpus": 1, "device": "NVIDIA A10G"}} (cluster/gpu.yaml's available_node_types).
    node_types: str = ""
    # Price per node-hour of each node type, as JSON or the path of a JSON file, e.g. {"gpu.1xa10g": 1.01}.
    # No built-in price list: without it an estimate has no cost and limits.max_cost is refused.
    prices: str = ""
    _pricing: Pricing = PrivateAttr(default_factory=lambda: Pricing(node_types={}, prices={}))

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _default_notify_is_valid(self) -> Settings:
        self.default_notify  # noqa: B018 - raises a ValueError naming the setting, at start-up rather than later
        return self

    @property
    def allowed_webhook_hosts(self) -> list[str]:
        return [h.strip() for h in self.webhook_hosts.split(",") if h.strip()]

    @property
    def default_notify(self) -> NotifySpec | None:
        if not self.notify_webhook:
            return None
        try:
            on = [s.strip().upper() for s in self.notify_on.split(",") if s.strip()]
            return NotifySpec.model_validate({"webhook": self.notify_webhook, "on": on})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"TRAINCTL_NOTIFY_WEBHOOK / TRAINCTL_NOTIFY_ON: {problems}") from None

    @model_validator(mode="after")
    def _parse_pricing(self) -> Settings:
        self._pricing = parse_pricing(self.node_types, self.prices)
        return self

    @property
    def pricing(self) -> Pricing:
        """The node types and prices estimates use (parsed and checked when the settings were built)."""
        return self._pricing

    @property
    def storage_root(self) -> str:
        return self.storage or str(self.data_dir / "storage")

    @property
    def allowed_data_roots(self) -> list[str]:
        roots = [r.strip() for r in self.data_roots.split(",") if r.strip()]
        return roots or [str(self.data_dir / "datasets"), str(Path("~/.cache/trainctl").expanduser())]

    @property
    def db_path(self) -> Path:
        return self.data_dir / "trainctl.db"

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.db_path}"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin-token"

    @property
    def session_secret_path(self) -> Path:
        """The key that signs the dashboard's session cookies."""
        return self.data_dir / "session-secret"

    @property
    def record_key_path(self) -> Path:
        """The key that signs each job's record.json (service/engine/records.py), so `trainctl reindex` can tell the
        service's records from files planted in storage. Replicas share it, like the admin token."""
        return self.data_dir / "record-key"

    @property
    def ray_token_path(self) -> Path:
        """The Ray auth token of a local head started with ray_auth_mode=token."""
        return self.data_dir / "ray-auth-token"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; `overrides` (e.g. CLI flags) win. None values are ignored."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _json_setting(name: str, text: str) -> Any:
    """A setting given as JSON, or as the path of a JSON file; ValueError naming the setting."""
    text = text.strip()
    if not text:
        return {}
    if not text.startswith(("{", "[")):  # JSON (an object, or a list: refused below), else a file's path
        try:
            text = Path(text).expanduser().read_text()
        except OSError as exc:
            raise ValueError(f"{name}: neither JSON nor a readable file ({exc.strerror}: {text})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f'{name} must be a JSON object, e.g. {{"gpu.1xa10g": ...}}')
    return data


def parse_pricing(node_types: str, prices: str) -> Pricing:
    """TRAINCTL_NODE_TYPES and TRAINCTL_PRICES, checked: every price a finite number >= 0 for a node type
    that TRAINCTL_NODE_TYPES defines. Raises ValueError naming the setting and the entry."""
    types: dict[str, NodeType] = {}
    for name, value in _json_setting("TRAINCTL_NODE_TYPES", node_types).items():
        try:
            types[name] = NodeType.model_validate(value)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(map(str, first["loc"]))
            raise ValueError(f"TRAINCTL_NODE_TYPES[{name!r}]{'.' + where if where else ''}: {first['msg']}") from None
    table: dict[str, float] = {}
    for name, value in _json_setting("TRAINCTL_PRICES", prices).items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"TRAINCTL_PRICES[{name!r}]: a price per node-hour must be a number >= 0, got {value!r}")
        if name not in types:
            known = ", ".join(sorted(types)) or "none: set TRAINCTL_NODE_TYPES"
            raise ValueError(f"TRAINCTL_PRICES[{name!r}]: unknown node type (TRAINCTL_NODE_TYPES defines {known})")
        table[name] = float(value)
    sources = tuple(n for n, v in (("TRAINCTL_NODE_TYPES", types), ("TRAINCTL_PRICES", table)) if v)
    return Pricing(node_types=types, prices=table, sources=sources)
