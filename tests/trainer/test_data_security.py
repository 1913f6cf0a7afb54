"""No code from data, no file contents in errors, and the driver's own data-roots check (issue 10)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.trainer.cifar_files import write_cifar_python
from trainer.data import DataError, load, load_pickle
from trainer.evaluate import predict_to_csv
from trainer.run import UserError, preflight
from trainer.spec import resolve


class _Plant:
    """What an attacker pickles: unpickling it calls os.system, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _planted_batch(root: Path, marker: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": _Plant(marker), b"labels": [0]}, f)
    return root


def test_a_planted_pickle_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    root = _planted_batch(tmp_path / "cifar", marker)
    with pytest.raises(DataError) as exc:
        load(str(root), "cifar10-python")
    assert not marker.exists()
    assert "refused to load" in str(exc.value) and "system" in str(exc.value)  # names the offending global
    # the same for a lone batch file, for format=auto, and for `trainer predict`'s Kaggle input
    with pytest.raises(DataError):
        load(str(root / "data_batch_1"))
    with pytest.raises(DataError):
        predict_to_csv(str(tmp_path / "no.pt"), str(root / "test_batch"), str(tmp_path / "out.csv"))
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        # builtins that run code, and a global that is merely unexpected
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"cos\nsystem\n(S'true'\ntR.",
        b"cnumpy\nload\n(S'/etc/passwd'\ntR.",
    ],
)
def test_only_data_globals_are_admitted(payload: bytes) -> None:
    with pytest.raises(DataError, match="refused to load"):
        load_pickle(payload, "mem://x")


def test_real_cifar_layouts_still_load(tmp_path: Path) -> None:
    root = write_cifar_python(tmp_path / "cifar", per_batch=8)
    data = load(str(root), "cifar10-python")
    assert tuple(data.images.shape) == (40, 3, 32, 32)
    # protocol 2 (what Python 2 wrote, and what Python 3 writes with protocol=2: bytes via _codecs.encode)
    batch = {b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, 2, 3], b"batch_label": b"x"}
    out = load_pickle(pickle.dumps(batch, protocol=2), "mem://p2")
    assert out[b"labels"] == [1, 2, 3] and out[b"data"].shape == (3, 3072) and out[b"batch_label"] == b"x"


def test_errors_never_quote_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "cifar" / "data_batch_1"
    secret.parent.mkdir()
    secret.write_bytes(b"Zecret-contents-of-some-file\n")
    with pytest.raises(DataError) as exc:
        load(str(secret), "cifar10-python")
    text = str(exc.value)
    assert "'Z'" not in text and "Zecret" not in text and "unreadable" in text
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"Zecret-contents-of-some-file\n" * 10)
    with pytest.raises(DataError) as exc:
        load(str(bad))
    assert "Zecret" not in str(exc.value) and "not a Hugging Face image parquet" in str(exc.value)


def test_the_driver_checks_the_data_roots_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inside = write_cifar_python(tmp_path / "datasets" / "cifar", per_batch=8)
    outside = write_cifar_python(tmp_path / "elsewhere", per_batch=8)
    monkeypatch.setenv("TRAINCTL_DATA_ROOTS", str(tmp_path / "datasets"))
    preflight(resolve("debug", {"data.train": str(inside), "data.max_train_images": 64}))
    for train in (str(outside), f"{tmp_path}/datasets/../elsewhere", f"file://{outside}"):
        with pytest.raises(UserError, match="data.train: .* outside the data roots"):
            preflight(resolve("debug", {"data.train": train, "data.max_train_images": 64}))
    (tmp_path / "datasets" / "link").symlink_to(outside)
    with pytest.raises(UserError, match="outside the data roots"):
        preflight(resolve("debug", {"data.train": str(tmp_path / "datasets" / "link"), "data.max_train_images": 64}))
    with pytest.raises(UserError, match="data.test"):
        preflight(
            resolve("debug", {"data.train": str(inside), "data.test": "/etc/passwd", "data.max_train_images": 64})
        )
    # a data error names its field
    with pytest.raises(DataError, match="^data.train: "):
        preflight(
            resolve(
                "debug", {"data.train": str(tmp_path / "datasets" / "missing.parquet"), "data.max_train_images": 64}
            )
        )
    monkeypatch.delenv("TRAINCTL_DATA_ROOTS")  # trainer.run by hand: no restriction
    preflight(resolve("debug", {"data.train": str(outside), "data.max_train_images": 64}))


# --- issue 21 item 8: decompression bombs; item 13: one download folder ---------------------------------------


def _parquet_bomb(path: Path, rows: int, value: bytes) -> Path:
    """A parquet whose img.bytes names one dictionary value in every row: a few KB on disk, rows × len(value)
    once read whole (50,000 × 48 KB = 2.4 GiB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = pa.array(np.zeros(rows, np.int32))
    img = pa.StructArray.from_arrays(
        [pa.DictionaryArray.from_arrays(index, pa.array([value], pa.binary())), pa.array(["x.jpg"] * rows)],
        names=["bytes", "path"],
    )
    # store_schema=False: the reader sees plain binary (as in a downloaded file) and would expand it
    pq.write_table(
        pa.table({"img": img, "label": np.zeros(rows, np.int64)}), path, compression="zstd", store_schema=False
    )
    return path


def test_a_parquet_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    import resource

    bomb = _parquet_bomb(tmp_path / "bomb.parquet", 50_000, b"\0" * 48_000)
    assert bomb.stat().st_size < 200_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for limit in (16, None):  # the preflight's 16 rows, and a full read
        with pytest.raises(DataError, match=r"bomb.parquet: an image of 48,000 bytes.*MAX_IMAGE_BYTES"):
            load(str(bomb), "parquet", limit=limit)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 500, f"reading the bomb grew the peak RSS by {grown_mib:.0f} MiB"


def test_parquet_row_and_byte_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = _parquet_bomb(tmp_path / "small.parquet", 100, b"\0" * 1000)
    monkeypatch.setattr("trainer.data.MAX_DATA_ROWS", 99)
    with pytest.raises(DataError, match=r"small.parquet: 100 rows, over the limit of 99 .*MAX_DATA_ROWS"):
        load(str(small), "parquet", limit=16)
    monkeypatch.setattr("trainer.data.MAX_DATA_ROWS", 1000)
    monkeypatch.setattr("trainer.data.MAX_DATA_BYTES", 50_000)
    with pytest.raises(DataError, match=r"small.parquet: images of more than 50,000 bytes .*MAX_DATA_BYTES"):
        load(str(small), "parquet")


def test_an_image_declaring_a_huge_size_is_never_decoded(tmp_path: Path) -> None:
    import struct
    import zlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.data import image_size

    # A PNG whose header says 60,000×60,000 (10 GB of pixels once decoded) in 60 bytes
    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    assert image_size(png) == (60_000, 60_000)
    img = pa.StructArray.from_arrays([pa.array([png], pa.binary()), pa.array(["x.png"])], names=["bytes", "path"])
    pq.write_table(pa.table({"img": img, "label": [0]}), tmp_path / "big.parquet")
    with pytest.raises(DataError, match=r"row 0: image is 60000×60000, expected 32×32"):
        load(str(tmp_path / "big.parquet"), "parquet")


def test_a_pickle_bomb_is_refused_before_it_expands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    # One 3,072-value row repeated 250,000 times by memo reference: ~500 KB of pickle, 766 MiB through
    # np.asarray (6 GiB as int64).
    row = [0] * 3072
    root = tmp_path / "cifar"
    root.mkdir()
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": [row] * 250_000, b"labels": [0] * 250_000}))
    assert (root / "data_batch_1").stat().st_size < 2_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match=r"data_batch_1: b'data' must be an N×3072 uint8 array .*got list"):
        load(str(root / "data_batch_1"), "cifar10-python")
    # labels repeated the same way: refused element by element, never expanded
    labels_bomb = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [row] * 4}
    (root / "data_batch_1").write_bytes(pickle.dumps(labels_bomb))
    with pytest.raises(DataError, match=r"b'labels' must be integers"):
        load(str(root / "data_batch_1"), "cifar10-python")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 300
    # a file over the byte cap is refused after reading just past the cap
    monkeypatch.setattr("trainer.data.MAX_PICKLE_BYTES", 1000)
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(DataError, match=r"data_batch_1: the batch is larger than 1,000 bytes .*MAX_PICKLE_BYTES"):
        load(str(root / "data_batch_1"), "cifar10-python")


def test_a_missing_folder_never_starts_a_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    def no_download(*args, **kwargs):
        raise AssertionError("torchvision was asked to download")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_download)
    cache = tmp_path / "cache"
    monkeypatch.setattr("trainer.data.DOWNLOAD_CACHE", str(cache / "cifar10"))
    for missing in (cache / "elsewhere", cache / "cifar10" / "again", tmp_path / "empty"):
        if missing.name == "empty":
            missing.mkdir()
        for fmt in ("auto", "torchvision"):
            with pytest.raises(DataError, match=r"torchvision downloads CIFAR-10 only into .*cifar10"):
                load(str(missing), fmt)
    with pytest.raises(DataError, match="asked to download"):  # the one folder it may download into
        load(str(cache / "cifar10"), "auto")
