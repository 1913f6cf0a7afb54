"""CIFAR-10 on the training device: decode once, then batch, augment and shard there.

Every source is decoded once into `images` (uint8, N×3×32×32) and `labels` (int64, N). The training
split then lives on the device as one padded uint8 tensor; each epoch draws a seeded permutation shared by
all ranks, each rank takes its shard, and random-crop (4-pixel zero padding) + horizontal flip +
normalisation run batched on the device — no per-sample Python in the hot loop (the airbench recipe).
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

import objstore
from trainer.spec import DataSpec, JobSpec

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
PAD = 4
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


class DataError(ValueError):
    """The dataset is missing or malformed: the user must fix the data (never worth a retry)."""


@dataclass
class Dataset:
    images: torch.Tensor  # uint8 N×3×32×32
    labels: torch.Tensor  # int64 N

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.images[index], self.labels[index])


# --- reading sources -------------------------------------------------------------------------------

def detect_format(uri: str) -> str:
    if uri.endswith(".parquet"):
        return "parquet"
    if objstore.is_s3(uri):
        return "cifar10-python"
    local = objstore.resolve(uri)[1]
    if os.path.isdir(local) and not os.listdir(local):
        return "torchvision"
    if not os.path.exists(local):
        return "torchvision"
    return "cifar10-python"


def load(uri: str, fmt: str = "auto", split: str = "train", num_classes: int = 10,
         limit: int | None = None) -> Dataset:
    """Decode a source into uint8 tensors. `split` picks train or test batches of a CIFAR-10 directory;
    `limit` reads at most that many images (smoke runs)."""
    fmt = detect_format(uri) if fmt == "auto" else fmt
    if fmt == "parquet":
        data = _read_parquet(uri, limit)
    elif fmt == "cifar10-python":
        data = _read_cifar_python(uri, split)
    elif fmt == "torchvision":
        data = _download_torchvision(uri, split)
    else:
        raise DataError(f"data.format {fmt!r} is not supported")
    if limit is not None:
        data = Dataset(data.images[:limit], data.labels[:limit])
    _check(data, uri, num_classes)
    return data


def _check(data: Dataset, uri: str, num_classes: int) -> None:
    if data.images.ndim != 4 or tuple(data.images.shape[1:]) != (3, 32, 32):
        raise DataError(f"{uri}: images have shape {tuple(data.images.shape)}, expected N×3×32×32")
    if len(data) == 0:
        raise DataError(f"{uri}: no images")
    if len(data.labels) != len(data.images):
        raise DataError(f"{uri}: {len(data.images)} images but {len(data.labels)} labels")
    low, high = int(data.labels.min()), int(data.labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{uri}: label {low if low < 0 else high} is out of range 0..{num_classes - 1} "
                        f"(model.num_classes={num_classes})")


def _read_parquet(uri: str, limit: int | None) -> Dataset:
    from torchvision.io import decode_image, decode_jpeg  # torchvision only where data is decoded
    fs, path = objstore.resolve(uri)
    try:
        table = objstore.retrying(lambda: pq.read_table(path, filesystem=fs, columns=["img", "label"]),
                                  f"read {objstore.redact(uri)}")
    except FileNotFoundError as exc:
        raise DataError(f"{uri}: file not found") from exc
    except (KeyError, ValueError) as exc:  # pyarrow raises these for missing columns / bad files
        raise DataError(f"{uri}: not a Hugging Face image parquet (needs columns img{{bytes}} and label): "
                        f"{exc}") from exc
    if limit is not None:
        table = table.slice(0, limit)
    try:
        blobs = table.column("img").combine_chunks().field("bytes").to_pylist()
    except (KeyError, AttributeError) as exc:
        raise DataError(f"{uri}: column img has no 'bytes' field") from exc
    labels = torch.as_tensor(table.column("label").to_numpy().copy(), dtype=torch.int64)
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        decoded = decode_jpeg(encoded)  # one batched C++ call
    except RuntimeError:
        decoded = []  # not all JPEG (PNG, or one broken file): decode one by one to name the culprit
        for i, blob in enumerate(encoded):
            try:
                decoded.append(decode_image(blob))
            except RuntimeError as exc:
                raise DataError(f"{uri}: row {i}: undecodable image ({exc})") from exc
    for i, img in enumerate(decoded):
        if tuple(img.shape) != (3, 32, 32):
            raise DataError(f"{uri}: row {i}: image shape {tuple(img.shape)}, expected 3×32×32 RGB")
    return Dataset(torch.stack(decoded), labels)


def _read_cifar_python(uri: str, split: str) -> Dataset:
    """The CIFAR-10 python-pickle directory (data_batch_1..5, test_batch), or a single batch file."""
    names = TRAIN_BATCHES if split == "train" else ["test_batch"]
    if objstore.exists(uri) and objstore.resolve(uri)[0].get_file_info(objstore.resolve(uri)[1]).is_file:
        files = [uri]
    else:
        base = uri
        if not objstore.exists(objstore.join(base, names[0])) and \
                objstore.exists(objstore.join(base, "cifar-10-batches-py", names[0])):
            base = objstore.join(base, "cifar-10-batches-py")
        files = [objstore.join(base, n) for n in names]
    images, labels = [], []
    for f in files:
        if not objstore.exists(f):
            raise DataError(f"{f}: missing CIFAR-10 batch file (expected {', '.join(names)} in {uri})")
        try:
            batch = pickle.load(io.BytesIO(objstore.read_bytes(f)), encoding="bytes")
            data, labs = batch[b"data"], batch.get(b"labels", batch.get(b"fine_labels"))
        except Exception as exc:  # any unpickling failure means a corrupt file
            raise DataError(f"{f}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
        data = np.asarray(data)
        if labs is None or data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
            raise DataError(f"{f}: b'data' must be N×3072 uint8 with b'labels'; got {data.dtype} {data.shape}")
        if len(labs) != len(data):
            raise DataError(f"{f}: {len(data)} images but {len(labs)} labels")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.as_tensor(np.asarray(labs), dtype=torch.int64))
    return Dataset(torch.cat(images), torch.cat(labels))


def _download_torchvision(uri: str, split: str) -> Dataset:
    """torchvision's CIFAR-10 download (for online users), read back through the python-pickle path."""
    import torchvision
    root = objstore.resolve(uri)[1]
    try:
        torchvision.datasets.CIFAR10(root, train=(split == "train"), download=True)
    except Exception as exc:  # offline, DNS, checksum: all mean "could not fetch"
        raise DataError(f"{uri}: could not download CIFAR-10 with torchvision ({exc}); "
                        "point data.train at a local copy instead") from exc
    return _read_cifar_python(os.path.join(root, "cifar-10-batches-py"), split)


def load_splits(spec: DataSpec, seed: int, num_classes: int) -> tuple[Dataset, Dataset]:
    """(train, val): a seeded split of data.train. With max_train_images, only as many images are read
    as make that many training images after the split."""
    limit = None
    if spec.max_train_images is not None:
        limit = math.ceil(spec.max_train_images / (1.0 - spec.val_fraction))
    full = load(spec.train, spec.format, "train", num_classes, limit)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(full) * spec.val_fraction))
    val, train = full.take(order[:n_val]), full.take(order[n_val:])
    if spec.max_train_images is not None:
        train = train.take(torch.arange(min(len(train), spec.max_train_images)))
    return train, val


# --- on-device batching and augmentation ------------------------------------------------------------

def use_channels_last(spec: JobSpec) -> bool:
    """channels_last=auto → on: NHWC convolutions are faster on CUDA and on oneDNN CPUs alike. Training and
    offline evaluation use the same layout, so a checkpoint reproduces its val_acc to the image."""
    return spec.channels_last if isinstance(spec.channels_last, bool) else True


class DeviceData:
    """One split on the training device, served as normalised float batches for one rank."""

    def __init__(self, data: Dataset, device: torch.device, channels_last: bool):
        # Padded once, so a random crop is a gather of a 32×32 window out of 40×40.
        self.padded = torch.nn.functional.pad(data.images, (PAD, PAD, PAD, PAD)).to(device)
        self.labels = data.labels.to(device)
        self.device = device
        self.channels_last = channels_last
        self.mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.labels)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def shard(self, epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
        """This rank's indices for `epoch`: a permutation shared by every rank (seeded by seed and
        epoch), padded by wrapping around to a multiple of `world` as DistributedSampler does, so every
        image is seen once per epoch and every rank takes the same number of steps."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        total = math.ceil(len(perm) / world) * world
        perm = torch.cat([perm, perm[: total - len(perm)]])
        return perm[rank::world].to(self.device)

    def steps_per_epoch(self, local_batch: int, world: int) -> int:
        return math.ceil(math.ceil(len(self) / world) / local_batch)

    def train_batches(self, epoch: int, seed: int, rank: int, world: int, local_batch: int
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self.shard(epoch, seed, rank, world)
        gen = torch.Generator(device=self.device).manual_seed(seed * 7919 + epoch * 104729 + rank)
        for start in range(0, len(index), local_batch):
            idx = index[start:start + local_batch]
            yield self._normalise(self._augment(self.padded[idx], gen)), self.labels[idx]

    def _augment(self, padded: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random 32×32 crop of each 40×40 padded image, then a random horizontal flip, all batched."""
        n = padded.shape[0]
        dy = torch.randint(0, 2 * PAD + 1, (n,), device=self.device, generator=gen)
        dx = torch.randint(0, 2 * PAD + 1, (n,), device=self.device, generator=gen)
        ar = torch.arange(32, device=self.device)
        rows = (dy[:, None] + ar)[:, None, :, None]           # n×1×32×1
        cols = (dx[:, None] + ar)[:, None, None, :]           # n×1×1×32
        flip = torch.rand(n, device=self.device, generator=gen) < 0.5
        cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
        batch_i = torch.arange(n, device=self.device)[:, None, None, None]
        chan_i = torch.arange(3, device=self.device)[None, :, None, None]
        return padded[batch_i, chan_i, rows, cols]

    def eval_batches(self, rank: int, world: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous slice of the split, unaugmented (no padding: each image counted once)."""
        per_rank = math.ceil(len(self) / world)
        lo, hi = rank * per_rank, min(len(self), (rank + 1) * per_rank)
        for start in range(lo, hi, batch):
            stop = min(hi, start + batch)
            yield self._normalise(self.padded[start:stop, :, PAD:PAD + 32, PAD:PAD + 32]), self.labels[start:stop]


def images_to_batches(images: torch.Tensor, device: torch.device, channels_last: bool, batch: int
                      ) -> Iterator[torch.Tensor]:
    """Normalised float batches of raw uint8 N×3×32×32 images, for evaluation and prediction."""
    data = DeviceData(Dataset(images, torch.zeros(len(images), dtype=torch.int64)), device, channels_last)
    for x, _ in data.eval_batches(0, 1, batch):
        yield x
