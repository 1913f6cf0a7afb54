"""Storage URIs → pyarrow filesystems: the one place in trainctl that parses a storage URI.

A storage location is a local path (`/data/x`, `~/x`, `file:///data/x`) or `s3://bucket/prefix`. S3's
endpoint and credentials come from the environment, never from the URI (so URIs can be logged, stored and
returned by the API without leaking secrets):

    TRAINCTL_S3_ENDPOINT   e.g. http://127.0.0.1:8333 (empty: AWS)
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION

Every read and write goes through `retrying`, so a storage outage costs bounded time and then raises
`StorageUnavailable` — a caller never hangs and never mistakes an outage for "file missing".
"""

from __future__ import annotations

import os
import random
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")

# Total time one operation may spend retrying before it reports the storage as unreachable.
DEFAULT_RETRY_BUDGET_S = float(os.environ.get("TRAINCTL_STORAGE_RETRY_SECONDS", "30"))


class StorageUnavailable(RuntimeError):
    """Storage did not answer within the retry budget."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a storage URI or local path."""
    if is_s3(uri):
        parsed = urllib.parse.urlparse(uri)
        if parsed.query or "@" in parsed.netloc:
            raise ValueError(f"storage URI {redact(uri)!r}: put the endpoint in TRAINCTL_S3_ENDPOINT and "
                             "credentials in AWS_* variables, not in the URI")
        path = (parsed.netloc + parsed.path).rstrip("/")
        return s3_filesystem(), path
    if uri.startswith("file://"):
        uri = urllib.parse.urlparse(uri).path
    if "://" in uri:
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("TRAINCTL_S3_ENDPOINT", "").strip()
    kwargs: dict[str, object] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "allow_bucket_creation": True,
        # Fail fast per request; `retrying` owns the overall budget.
        "connect_timeout": 3,
        "request_timeout": 10,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2),
    }
    if endpoint:
        parsed = urllib.parse.urlparse(endpoint if "://" in endpoint else "http://" + endpoint)
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "http"
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"], kwargs["secret_key"] = key, secret
    return pafs.S3FileSystem(**kwargs)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def redact(uri: str) -> str:
    """A URI safe to log: userinfo and query strings removed."""
    parsed = urllib.parse.urlparse(uri)
    if not parsed.scheme:
        return uri
    netloc = parsed.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunparse((parsed.scheme, netloc, parsed.path, "", "", ""))


# --- retries ------------------------------------------------------------------------------------------

def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    text = str(exc).lower()
    markers = ("connect", "timeout", "timed out", "unreachable", "curl", "network", "broken pipe",
               "connection reset", "503", "502", "500", "slowdown", "temporarily")
    return isinstance(exc, OSError) and any(m in text for m in markers)


def retrying(fn: Callable[[], T], what: str, budget_s: float | None = None) -> T:
    """Run `fn`, retrying transient storage errors with jittered exponential backoff for at most
    `budget_s` seconds, then raise StorageUnavailable naming `what`."""
    budget = DEFAULT_RETRY_BUDGET_S if budget_s is None else budget_s
    deadline, delay = time.monotonic() + budget, 0.2
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not _is_transient(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise StorageUnavailable(f"storage unreachable for {budget:.0f}s while trying to {what}: {exc}") \
                    from exc
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)


# --- small file operations (whole files; checkpoints are streamed) -----------------------------------------

def ensure_dir(uri: str) -> None:
    fs, path = resolve(uri)
    retrying(lambda: fs.create_dir(path, recursive=True), f"create {redact(uri)}")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    info = retrying(lambda: fs.get_file_info(path), f"stat {redact(uri)}")
    return info.type != pafs.FileType.NotFound


def size(uri: str) -> int:
    fs, path = resolve(uri)
    info = retrying(lambda: fs.get_file_info(path), f"stat {redact(uri)}")
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(uri)
    return int(info.size)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()
    return retrying(read, f"read {redact(uri)}")


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Local files are written to a temporary name and renamed, so readers never see
    half a file; an S3 PUT is atomic by itself."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]

    def write() -> None:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(parent, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{random.randrange(1 << 30)}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    retrying(write, f"write {redact(uri)}")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_dir(uri: str) -> list[str]:
    """Names (not paths) directly under `uri`; empty when it does not exist."""
    fs, path = resolve(uri)
    infos = retrying(lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)),
                     f"list {redact(uri)}")
    return sorted(i.base_name for i in infos)


def delete_tree(uri: str) -> None:
    fs, path = resolve(uri)

    def delete() -> None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    retrying(delete, f"delete {redact(uri)}")


@contextmanager
def open_input(uri: str) -> Iterator[pafs.NativeFile]:
    """A streaming reader (for checkpoints: never read whole into memory by the service)."""
    fs, path = resolve(uri)
    stream = retrying(lambda: fs.open_input_stream(path), f"open {redact(uri)}")
    try:
        yield stream
    finally:
        stream.close()


def iter_chunks(uri: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    with open_input(uri) as stream:
        while chunk := stream.read(chunk_size):
            yield chunk


def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: local paths as they are, S3 as a
    bucket-relative path plus a filesystem object carrying the endpoint and credentials."""
    if is_s3(uri):
        fs, path = resolve(uri)
        return path, fs
    return resolve(uri)[1], None
