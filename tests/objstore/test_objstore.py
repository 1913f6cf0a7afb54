"""objstore against a local directory and against a real S3 server (SeaweedFS, tests/plugins/s3.py).

The same round-trip tests run on both backends (`root` is parametrized); the S3-only tests cover bucket
auto-creation, Ray's storage arguments, credentials, and what happens while the server is down.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
import time
import uuid

import pyarrow.fs as pafs
import pytest

import objstore

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh storage root: a local dir, or s3://<new bucket>/prefix with the S3 env set."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket_uri")


# --- round trips on both backends ---------------------------------------------------------------------


def test_write_read_roundtrip(root: str) -> None:
    uri = objstore.join(root, "jobs", "j1", "spec.json")
    objstore.write_text(uri, '{"a": 1}')
    assert objstore.read_text(uri) == '{"a": 1}'
    data = os.urandom(70_000) + b"\x00\xff"
    objstore.write_bytes(uri, data)  # overwrite
    assert objstore.read_bytes(uri) == data
    objstore.write_bytes(objstore.join(root, "empty.bin"), b"")
    assert objstore.read_bytes(objstore.join(root, "empty.bin")) == b""
    objstore.write_text(objstore.join(root, "unicode.txt"), "ëpoch ✓")
    assert objstore.read_text(objstore.join(root, "unicode.txt")) == "ëpoch ✓"


def test_exists_and_size(root: str) -> None:
    f = objstore.join(root, "a", "b.txt")
    assert not objstore.exists(f)
    assert not objstore.exists(root)
    objstore.write_text(f, "hello")
    assert objstore.exists(f)
    assert objstore.exists(objstore.join(root, "a"))  # a "directory" (an S3 prefix)
    assert objstore.size(f) == 5
    with pytest.raises(FileNotFoundError):
        objstore.size(objstore.join(root, "a"))  # a directory has no size
    with pytest.raises(FileNotFoundError):
        objstore.size(objstore.join(root, "missing"))


def test_missing_file_is_not_an_outage(root: str) -> None:
    """A missing file raises FileNotFoundError at once; it is never retried as if storage were down."""
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        objstore.read_bytes(objstore.join(root, "nope.json"))
    with pytest.raises(FileNotFoundError):
        list(objstore.iter_chunks(objstore.join(root, "nope.pt")))
    assert time.monotonic() - t0 < 3


def test_list_dir(root: str) -> None:
    assert objstore.list_dir(root) == []  # missing: empty, not an error
    for name in ("b.txt", "a.txt", "sub/x.txt", "sub/deeper/y.txt"):
        objstore.write_text(objstore.join(root, name), name)
    assert objstore.list_dir(root) == ["a.txt", "b.txt", "sub"]
    assert objstore.list_dir(objstore.join(root, "sub")) == ["deeper", "x.txt"]
    assert objstore.list_dir(objstore.join(root, "sub") + "/") == ["deeper", "x.txt"]


def test_local_write_leaves_no_temp_files(tmp_path) -> None:
    root = str(tmp_path)
    for i in range(3):
        objstore.write_text(objstore.join(root, "m.json"), str(i))
    assert objstore.list_dir(root) == ["m.json"]
    assert objstore.read_text(objstore.join(root, "m.json")) == "2"


def test_delete_tree(root: str) -> None:
    for name in (
        "ep/epoch_0001/checkpoint.pt",
        "ep/epoch_0001/meta/x",
        "ep/epoch_00010/checkpoint.pt",
        "ep/manifest.json",
    ):
        objstore.write_text(objstore.join(root, name), "x")
    objstore.delete_tree(objstore.join(root, "ep", "epoch_0001"))
    # Only that folder: a sibling sharing its name as a prefix (S3 keys are prefixes) survives.
    assert objstore.list_dir(objstore.join(root, "ep")) == ["epoch_00010", "manifest.json"]
    assert not objstore.exists(objstore.join(root, "ep", "epoch_0001", "checkpoint.pt"))
    objstore.delete_tree(objstore.join(root, "ep", "manifest.json"))  # a single file
    assert objstore.list_dir(objstore.join(root, "ep")) == ["epoch_00010"]
    objstore.delete_tree(objstore.join(root, "ep", "never-existed"))  # missing: no-op
    objstore.delete_tree(objstore.join(root, "ep"))
    assert objstore.list_dir(root) == []
    assert not objstore.exists(objstore.join(root, "ep"))


@pytest.mark.parametrize("size,chunk", [(0, 4), (10, 4), (12, 4), (3_000_001, 1 << 20)])
def test_iter_chunks(root: str, size: int, chunk: int) -> None:
    data = os.urandom(size)
    uri = objstore.join(root, "ckpt", "checkpoint.pt")
    objstore.write_bytes(uri, data)
    chunks = list(objstore.iter_chunks(uri, chunk_size=chunk))
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= chunk for c in chunks)
    assert len(chunks) == -(-size // chunk)
    assert objstore.size(uri) == size
    with objstore.open_input(uri) as stream:
        assert hashlib.sha256(stream.read()).hexdigest() == hashlib.sha256(data).hexdigest()


def test_ensure_dir(root: str) -> None:
    d = objstore.join(root, "jobs", "j2")
    objstore.ensure_dir(d)
    objstore.ensure_dir(d)  # idempotent
    assert objstore.exists(d)
    assert objstore.list_dir(objstore.join(root, "jobs")) == ["j2"]


def test_file_uri_is_a_local_path(tmp_path) -> None:
    objstore.write_text(f"file://{tmp_path}/x/y.txt", "via file://")
    assert (tmp_path / "x" / "y.txt").read_text() == "via file://"
    assert objstore.read_text(str(tmp_path / "x" / "y.txt")) == "via file://"
    assert objstore.resolve(f"file://localhost{tmp_path}/a%20b")[1] == f"{tmp_path}/a b"
    assert objstore.ray_storage(f"file://{tmp_path}") == (str(tmp_path), None)


def test_join() -> None:
    assert objstore.join("s3://b/p/", "jobs", "/j1/") == "s3://b/p/jobs/j1"
    assert objstore.join("/data", "x") == "/data/x"


# --- URIs never carry secrets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        f"s3://AKIAEXAMPLE:{SECRET}@bucket/prefix",
        f"s3://bucket/prefix?endpoint_override=http://127.0.0.1:8333&secret_key={SECRET}",
        f"s3://bucket/prefix#{SECRET}",
        f"file:///data/x?token={SECRET}",
        f"gs://user:{SECRET}@bucket/x",
        f"https://user:{SECRET}@example.com/x",
        f"s3://[broken/x?k={SECRET}",
    ],
)
def test_uris_with_credentials_or_queries_are_rejected(uri: str) -> None:
    with pytest.raises(ValueError) as err:
        objstore.resolve(uri)
    message = str(err.value)
    assert SECRET not in message  # the error itself is safe to log
    assert "storage URI" in message
    # Every public operation goes through resolve(): none of them touches storage with such a URI.
    for op in (objstore.exists, objstore.read_bytes, objstore.list_dir, objstore.delete_tree):
        with pytest.raises(ValueError):
            op(uri)
    with pytest.raises(ValueError):
        objstore.write_text(uri, "x")


def test_rejection_explains_where_credentials_go() -> None:
    with pytest.raises(ValueError, match="TRAINCTL_S3_ENDPOINT.*AWS_"):
        objstore.resolve(f"s3://k:{SECRET}@bucket/p")
    with pytest.raises(ValueError, match="no bucket"):
        objstore.resolve("s3:///prefix")
    with pytest.raises(ValueError, match="file:///"):
        objstore.resolve("file://otherhost/data")


def test_semicolon_is_part_of_the_key() -> None:
    # urlparse would split "x;y" into path "x" and params "y" and silently use another key.
    assert objstore.resolve("s3://bucket/p/x;y")[1] == "bucket/p/x;y"


@pytest.mark.parametrize(
    "uri,expected",
    [
        (f"s3://AKIA:{SECRET}@bucket/p/x", "s3://bucket/p/x"),
        (f"s3://bucket/p?secret_key={SECRET}", "s3://bucket/p"),
        (f"s3://bucket/p#{SECRET}", "s3://bucket/p"),
        (f"https://u:p@ss:{SECRET}@host:9000/a", "https://host:9000/a"),
        (f"s3://[oops/p?k={SECRET}", "s3://[oops/p"),
        ("s3://bucket/jobs/j1/spec.json", "s3://bucket/jobs/j1/spec.json"),
        ("file:///data/x", "file:///data/x"),
        ("/data/x", "/data/x"),
        ("~/x", "~/x"),
    ],
)
def test_redact(uri: str, expected: str) -> None:
    assert objstore.redact(uri) == expected
    assert SECRET not in objstore.redact(uri)


# --- error classification --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc,transient",
    [
        (
            OSError(
                "When getting information for key 'k' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                "HeadObject operation: curlCode: 7, Could not connect to server"
            ),
            True,
        ),
        (OSError("When reading 'b/k': AWS Error UNKNOWN (HTTP status 503) during GetObject operation"), True),
        (OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."), True),
        (OSError("AWS Error UNKNOWN during GetObject operation: curlCode: 28, Timeout was reached"), True),
        (ConnectionRefusedError(111, "Connection refused"), True),
        (TimeoutError("timed out"), True),
        # A key or bucket name that happens to contain an "outage" word does not make an error transient.
        (
            OSError(
                "When getting information for key 'jobs/network-timeout-500/spec.json' in bucket 'connect': "
                "AWS Error ACCESS_DENIED during HeadObject operation: No response body."
            ),
            False,
        ),
        (
            OSError(
                "When creating bucket 'b': AWS Error UNKNOWN (HTTP status 400) during CreateBucket operation: "
                "InvalidBucketName"
            ),
            False,
        ),
        (OSError("Local error for '/data/connect-503/x': No space left on device"), False),
        (FileNotFoundError("Path does not exist 'b/connection-timeout'"), False),
        (PermissionError("denied"), False),
        (ValueError("connect timeout"), False),
    ],
)
def test_transient_classification(exc: BaseException, transient: bool) -> None:
    assert objstore._is_transient(exc) is transient


def test_retrying_gives_up_within_budget_and_passes_other_errors() -> None:
    calls = []

    def refused() -> None:
        calls.append(time.monotonic())
        raise ConnectionRefusedError(111, "Connection refused")

    t0 = time.monotonic()
    with pytest.raises(objstore.StorageUnavailable, match="probe thing"):
        objstore.retrying(refused, "probe thing", budget_s=1.0)
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed <= 1.0 + 0.1  # used its budget, and no more
    assert len(calls) >= 3  # it did retry
    assert calls[-1] - t0 >= 0.95  # the last attempt came at the deadline

    def missing() -> None:
        calls.append(0)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        objstore.retrying(missing, "read", budget_s=5)
    assert calls == [0]  # not retried


# --- S3 only ----------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_bucket_is_created_on_first_write(s3_bucket_uri: str, s3_server) -> None:
    bucket = s3_bucket_uri[len("s3://") :].split("/")[0]
    admin = s3_server.filesystem()
    assert admin.get_file_info(bucket).type == pafs.FileType.NotFound
    assert objstore.list_dir(s3_bucket_uri) == []  # reading a missing bucket is not an error
    assert not objstore.exists(objstore.join(s3_bucket_uri, "x"))
    objstore.write_text(objstore.join(s3_bucket_uri, "jobs", "j", "spec.json"), "{}")
    assert admin.get_file_info(bucket).type == pafs.FileType.Directory
    with admin.open_input_stream(f"{bucket}/prefix/jobs/j/spec.json") as f:
        assert f.read() == b"{}"


@pytest.mark.s3
def test_ray_storage_is_usable_by_pyarrow(s3_bucket_uri: str) -> None:
    path, fs = objstore.ray_storage(s3_bucket_uri)
    assert isinstance(fs, pafs.S3FileSystem)
    assert not path.startswith("s3://") and path == s3_bucket_uri[len("s3://") :]
    fs.create_dir(f"{path}/run", recursive=True)
    with fs.open_output_stream(f"{path}/run/.validate_storage_marker") as f:
        f.write(b"ray")
    assert objstore.read_bytes(objstore.join(s3_bucket_uri, "run", ".validate_storage_marker")) == b"ray"
    # Ray ships the filesystem to its workers by pickling it: the copy still reaches the same server
    # without the worker's environment.
    clone = pickle.loads(pickle.dumps(fs))
    with clone.open_input_stream(f"{path}/run/.validate_storage_marker") as f:
        assert f.read() == b"ray"
    # The same helpers Ray Train uses to upload checkpoint folders.
    src = pafs.LocalFileSystem()
    local = f"/tmp/objstore-ray-{uuid.uuid4().hex}"
    try:
        src.create_dir(f"{local}/ckpt")
        with src.open_output_stream(f"{local}/ckpt/checkpoint.pt") as f:
            f.write(b"weights")
        pafs.copy_files(f"{local}/ckpt", f"{path}/run/checkpoint_0", source_filesystem=src, destination_filesystem=fs)
    finally:
        src.delete_dir(local)
    assert objstore.list_dir(objstore.join(s3_bucket_uri, "run")) == [".validate_storage_marker", "checkpoint_0"]


def test_ray_storage_local(tmp_path) -> None:
    assert objstore.ray_storage(str(tmp_path / "r")) == (str(tmp_path / "r"), None)
    assert objstore.ray_storage("~/r")[0] == os.path.expanduser("~/r")


@pytest.mark.s3
def test_wrong_credentials_fail_fast_not_as_outage(s3_bucket_uri: str, monkeypatch) -> None:
    objstore.write_text(objstore.join(s3_bucket_uri, "x"), "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    t0 = time.monotonic()
    with pytest.raises(OSError) as err:
        objstore.read_text(objstore.join(s3_bucket_uri, "x"))
    assert not isinstance(err.value, objstore.StorageUnavailable)
    assert time.monotonic() - t0 < 5


@pytest.mark.s3
def test_session_token_is_passed(monkeypatch, s3_bucket_uri: str) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")
    fs, _ = objstore.resolve(s3_bucket_uri)
    # pyarrow does not expose the token; its pickled form (what Ray ships) carries it.
    assert b"tok" in pickle.dumps(fs)


# --- outages ------------------------------------------------------------------------------------------------

BUDGET_S = 3.0  # for retrying() itself
OP_BUDGET_S = 1.5  # for the public operations (objstore.DEFAULT_RETRY_BUDGET_S), to keep the test short
# Past the budget comes at most one last attempt; against a closed port that takes well under a second
# (connection refused). Allow for a slow CI box.
SLACK_S = 2.5


@pytest.mark.s3
def test_outage_raises_storage_unavailable_within_budget_then_recovers(
    s3_server, s3_bucket_uri: str, monkeypatch
) -> None:
    data = os.urandom(100_000)
    ckpt = objstore.join(s3_bucket_uri, "jobs", "j", "checkpoint.pt")
    objstore.write_bytes(ckpt, data)
    monkeypatch.setattr(objstore, "DEFAULT_RETRY_BUDGET_S", OP_BUDGET_S)
    s3_server.stop()
    try:
        fs, path = objstore.resolve(ckpt)
        ops = {
            "retrying": lambda: objstore.retrying(lambda: fs.get_file_info(path), "stat it", budget_s=BUDGET_S),
            "exists": lambda: objstore.exists(ckpt),
            "read_bytes": lambda: objstore.read_bytes(ckpt),
            "write_text": lambda: objstore.write_text(objstore.join(s3_bucket_uri, "new.json"), "{}"),
            "list_dir": lambda: objstore.list_dir(s3_bucket_uri),
            "iter_chunks": lambda: list(objstore.iter_chunks(ckpt)),
        }
        for name, op in ops.items():
            budget = BUDGET_S if name == "retrying" else OP_BUDGET_S
            t0 = time.monotonic()
            with pytest.raises(objstore.StorageUnavailable) as err:
                op()
            elapsed = time.monotonic() - t0
            assert elapsed <= budget + SLACK_S, f"{name} took {elapsed:.1f}s"
            assert elapsed >= budget, f"{name} gave up after {elapsed:.1f}s, before its {budget}s budget"
            assert "storage unreachable" in str(err.value)
            assert s3_server.secret_key not in str(err.value)
    finally:
        s3_server.start()
    # Back on the same endpoint with the same data dir: what was written before the outage is still there.
    assert objstore.read_bytes(ckpt) == data
    objstore.write_text(objstore.join(s3_bucket_uri, "after.json"), "{}")
    assert objstore.list_dir(s3_bucket_uri) == ["after.json", "jobs"]


@pytest.mark.s3
def test_outage_shorter_than_budget_is_ridden_out_mid_download(s3_server, s3_bucket_uri: str, monkeypatch) -> None:
    """A download that loses the server between two chunks finishes once the server is back, with the
    same bytes: each chunk is retried on its own."""
    data = os.urandom(3 * 256 * 1024 + 17)
    ckpt = objstore.join(s3_bucket_uri, "best.pt")
    objstore.write_bytes(ckpt, data)
    monkeypatch.setattr(objstore, "DEFAULT_RETRY_BUDGET_S", 45.0)
    chunks = objstore.iter_chunks(ckpt, chunk_size=256 * 1024)
    received = [next(chunks)]
    s3_server.stop()
    restarter = threading.Thread(target=lambda: (time.sleep(1.0), s3_server.start()))
    restarter.start()
    try:
        received.extend(chunks)  # blocks in retrying() until the server is back
    finally:
        restarter.join()
        if not s3_server.running:
            s3_server.start()
    assert b"".join(received) == data
    assert len(received) == 4


@pytest.mark.s3
def test_server_env_reaches_the_server_from_a_subprocess(s3_server, s3_bucket_uri: str) -> None:
    """`s3_server.env()` is what other tests hand to `trainctl serve` / `python -m trainer.run`."""
    import subprocess
    import sys

    uri = objstore.join(s3_bucket_uri, "from-parent.txt")
    objstore.write_text(uri, "hello child")
    env = s3_server.env()
    assert env["TRAINCTL_S3_ENDPOINT"] == s3_server.endpoint and env["AWS_REGION"] == "us-east-1"
    code = "import objstore, sys; print(objstore.read_text(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, uri], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello child"
