"""Writers for tiny CIFAR-10-format files (python-pickle batches, Kaggle-style input), used by tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar_python(root: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """A CIFAR-10 python directory whose images are learnable: each class is a distinct colour + noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in BATCHES:
        labels = rng.integers(0, 10, per_batch)
        images = np.clip(labels[:, None] * 25 + rng.integers(0, 20, (per_batch, 3072)), 0, 255).astype(np.uint8)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": images, b"labels": labels.tolist(), b"batch_label": name.encode()}, f)
    return root


def write_kaggle_input(path: Path, n: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"ids": list(range(100, 100 + n))}, f)
    return path
