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

import errno
import functools
import os
import posixpath
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")

# Total time one operation may spend retrying before it reports the storage as unreachable.
DEFAULT_RETRY_BUDGET_S = float(os.environ.get("TRAINCTL_STORAGE_RETRY_SECONDS", "30"))


class StorageUnavailable(RuntimeError):
    """Storage did not answer within the retry budget."""


def is_s3(uri: str) -> bool:
    return uri[:5].lower() == "s3://"


def _reject(uri: str, why: str) -> ValueError:
    return ValueError(f"storage URI {redact(uri)!r}: {why}")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a storage URI or local path.

    Raises ValueError for URIs that carry credentials, a query string or a fragment (the endpoint belongs in
    TRAINCTL_S3_ENDPOINT, credentials in AWS_* variables), for `s3://` without a bucket, for `file://` with a
    remote host, and for other schemes. Error messages never repeat the secret part of the URI."""
    if "://" in uri:
        try:
            # urlsplit, not urlparse: `;` is an ordinary character in an object key, not a params separator.
            parsed = urllib.parse.urlsplit(uri)
        except ValueError as exc:
            raise _reject(uri, f"not a valid URI ({exc})") from None
        scheme = parsed.scheme.lower()
        if scheme not in ("s3", "file"):
            raise _reject(uri, "unsupported scheme: use a local path, file:// or s3://")
        if "@" in parsed.netloc or parsed.query or parsed.fragment or "?" in uri or "#" in uri:
            raise _reject(
                uri,
                "credentials, query strings and fragments are not allowed in storage URIs: put "
                "the endpoint in TRAINCTL_S3_ENDPOINT and credentials in AWS_* variables",
            )
        if scheme == "s3":
            if not parsed.netloc:
                raise _reject(uri, "no bucket: use s3://bucket/prefix")
            path = (parsed.netloc + parsed.path).rstrip("/")
            return s3_filesystem(), path
        if parsed.netloc not in ("", "localhost"):
            raise _reject(uri, "file:// URIs name a local path: use file:///abs/path")
        uri = urllib.parse.unquote(parsed.path)
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
        # Temporary (STS) credentials are useless without their token; pyarrow does not read it from the
        # environment once keys are passed explicitly.
        if token := os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = token
    return pafs.S3FileSystem(**kwargs)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def redact(uri: str) -> str:
    """A URI safe to log: userinfo, query string and fragment removed. Never raises."""
    if "://" not in uri:
        return uri
    try:
        parsed = urllib.parse.urlsplit(uri)
    except ValueError:
        # Unparseable (e.g. a stray `[`): cut by hand.
        scheme, rest = uri.split("://", 1)
        rest = re.split(r"[?#]", rest, maxsplit=1)[0]
        netloc, slash, path = rest.partition("/")
        return f"{scheme}://{netloc.rsplit('@', 1)[-1]}{slash}{path}"
    netloc = parsed.netloc.rsplit("@", 1)[-1]
    return f"{parsed.scheme}://{netloc}{parsed.path}"


# --- where a URI points: normalised forms and containment -------------------------------------------------


def normalise(uri: str) -> str:
    """A canonical form for containment checks: local paths (plain, `~/`, `file://`) become absolute real
    paths (`..` and symlinks resolved); `s3://bucket/key` keeps its bucket and a key with `.`/`..` segments
    folded. Raises ValueError for a relative path and for anything `resolve` refuses."""
    if "://" not in uri and not uri.startswith(("/", "~")):
        raise ValueError(f"{uri!r} is a relative path: use an absolute path, ~/..., file:///... or s3://...")
    if is_s3(uri):
        parsed = urllib.parse.urlsplit(uri)
        resolve(uri)  # same refusals (credentials, query strings, no bucket)
        key = posixpath.normpath("/" + parsed.path.lstrip("/")) if parsed.path.strip("/") else "/"
        # posixpath keeps a leading "//"; S3 keys never need it
        return f"s3://{parsed.netloc}/{key.lstrip('/')}".rstrip("/") if key != "/" else f"s3://{parsed.netloc}"
    fs, path = resolve(uri)
    return os.path.realpath(path)


def within(uri: str, prefix: str) -> bool:
    """True when `uri` is `prefix` or lies under it, both normalised (so `..`, symlinks, `~` and
    `file://` cannot step outside). False, never an error, for URIs that do not normalise."""
    try:
        target, root = normalise(uri), normalise(prefix)
    except ValueError:
        return False
    if is_s3(target) != is_s3(root):
        return False
    return target == root or target.startswith(root.rstrip("/") + "/")


def within_any(uri: str, prefixes: list[str]) -> bool:
    return any(within(uri, p) for p in prefixes)


def parse_roots(text: str) -> list[str]:
    """A comma-separated list of path/URI prefixes (TRAINCTL_DATA_ROOTS) → its non-empty entries."""
    return [r.strip() for r in (text or "").split(",") if r.strip()]


# --- retries ------------------------------------------------------------------------------------------

# pyarrow's S3 errors read "When <doing X> for key '<key>' in bucket '<b>': AWS Error <CODE> [(HTTP status N)]
# during <Op> operation: ...". Classify by the AWS error code and HTTP status, never by words that could
# come from a key or bucket name (a job called "network-test" must not turn AccessDenied into a retry).
_AWS_ERROR = re.compile(r"AWS Error (\w+)(?: \(HTTP status (\d+)\))?")
_TRANSIENT_AWS_CODES = {
    "NETWORK_CONNECTION",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "THROTTLING",
    "REQUEST_TIMEOUT",
    "INTERNAL_FAILURE",
    "REQUEST_LIMIT_EXCEEDED",
}
_TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EPIPE,
}
_TRANSIENT_WORDS = (
    "connect",
    "timeout",
    "timed out",
    "unreachable",
    "curl",
    "network",
    "broken pipe",
    "connection reset",
    "slowdown",
    "temporarily",
    "service unavailable",
)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if not isinstance(exc, OSError):
        return False
    if exc.errno in _TRANSIENT_ERRNOS:
        return True
    text = str(exc)
    if m := _AWS_ERROR.search(text):
        code, status = m.group(1), int(m.group(2) or 0)
        if code in _TRANSIENT_AWS_CODES or status >= 500 or status == 429:
            return True
        # UNKNOWN codes from curl failures (e.g. "curlCode: 28, Timeout was reached").
        return code == "UNKNOWN" and status == 0 and "curlcode" in text.lower()
    # Not an AWS error: look at the message with quoted names (paths, keys) removed.
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "", text).lower()
    return any(w in text for w in _TRANSIENT_WORDS) or bool(re.search(r"\b(500|502|503|504)\b", text))


def retrying(fn: Callable[[], T], what: str, budget_s: float | None = None) -> T:
    """Run `fn`, retrying transient storage errors with jittered exponential backoff for at most
    `budget_s` seconds, then raise StorageUnavailable naming `what`. Non-transient errors (missing file,
    access denied, bad request) propagate at once. The budget bounds the retrying; one attempt itself is
    bounded by the S3 client's connect/request timeouts."""
    budget = DEFAULT_RETRY_BUDGET_S if budget_s is None else budget_s
    deadline, delay = time.monotonic() + budget, 0.2
    while True:
        try:
            return fn()
        except Exception as exc:  # classified below
            if not _is_transient(exc):
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StorageUnavailable(f"storage unreachable for {budget:g}s while trying to {what}: {exc}") from exc
            # Never sleep past the deadline; the last attempt happens at the deadline.
            time.sleep(min(delay * (0.5 + random.random()), remaining))
            delay = min(delay * 2, 5.0)


# --- small file operations (whole files; checkpoints are streamed) -----------------------------------------


def ensure_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        retrying(lambda: os.makedirs(path, mode=0o700, exist_ok=True), f"create {redact(uri)}")
        return
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
            # Owner-only: job files (specs, metrics, checkpoints) are nobody else's business on a shared host.
            os.makedirs(parent, mode=0o700, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{random.randrange(1 << 30)}"
            try:
                with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                with suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)

    retrying(write, f"write {redact(uri)}")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_dir(uri: str) -> list[str]:
    """Names (not paths) directly under `uri`; empty when it does not exist."""
    fs, path = resolve(uri)
    infos = retrying(lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)), f"list {redact(uri)}")
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
    """The file's bytes in chunks of at most `chunk_size`. Each chunk is a ranged read retried on its own,
    so a storage blip in the middle of a large download costs a retry, not the whole download."""
    fs, path = resolve(uri)
    f = retrying(lambda: fs.open_input_file(path), f"open {redact(uri)}")
    try:
        total = f.size()
        offset = 0
        while offset < total:
            n = min(chunk_size, total - offset)
            chunk = retrying(functools.partial(f.read_at, n, offset), f"read {redact(uri)} at {offset}")
            if not chunk:
                raise OSError(f"{redact(uri)} ended at {offset} of {total} bytes while being read")
            yield chunk
            offset += len(chunk)
    finally:
        f.close()


def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: local paths as they are, S3 as a
    bucket-relative path plus a filesystem object carrying the endpoint and credentials."""
    if is_s3(uri):
        fs, path = resolve(uri)
        return path, fs
    return resolve(uri)[1], None
