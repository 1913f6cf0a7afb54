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
