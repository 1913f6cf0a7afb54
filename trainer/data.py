"""CIFAR-10 on the training device: decode once, then batch, augment and shard there.

Every source is decoded once into `images` (uint8, N×3×32×32) and `labels` (int64, N). The training
split then lives on the device as one padded uint8 tensor; each epoch draws a seeded permutation shared by
all ranks, each rank takes its shard, and random-crop (4-pixel zero padding) + horizontal flip +
normalisation run batched on the device — no per-sample Python in the hot loop (the airbench recipe).
AutoAugment and RandomErasing (trainer/augment.py), when the spec turns them on, follow in the notebook's
order, still batched and drawn per image.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import torch

import objstore
from trainer.contract import TORCHVISION_DOWNLOAD_DIR
from trainer.device_settings import to_device
from trainer.spec import AugmentSpec, DataSpec, JobSpec

if TYPE_CHECKING:
    from trainer.augment import AutoAugmentPlan  # torchvision: imported only when augmenting

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
PAD = 4
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]

# Bounds on what a dataset may make the driver or a worker hold (docs/security.md, "decompression bombs"):
# a 2 KB parquet can name one 48 KB value 50,000 times (2.4 GiB once read), a 500 KB pickle can repeat one
# list 250,000 times. Files are read in bounded batches and refused as soon as one of these is passed.
MAX_DATA_ROWS = 1_000_000  # images per file (CIFAR-10: 60,000; CINIC-10: 270,000)
MAX_IMAGE_BYTES = 32 * 1024  # one encoded 32×32 image (raw pixels are 3,072 bytes; JPEGs ~1-3 KB)
MAX_DATA_BYTES = 1 << 30  # encoded images per parquet file (CIFAR-10's: 120 MB)
MAX_PICKLE_BYTES = 256 << 20  # one python batch file (CIFAR-10's: 31 MB; CIFAR-100's train: 155 MB)
PARQUET_BATCH_ROWS = 1024
BATCH_BYTES = 64 << 20  # what one parquet batch may expand to before its sizes are checked
# The one place torchvision downloads CIFAR-10 to: any other missing folder is an error, never a new
# 170 MB download (a user could otherwise fill the node's disk, one made-up folder per job).
DOWNLOAD_CACHE = TORCHVISION_DOWNLOAD_DIR


class DataError(ValueError):
    """The dataset is missing or malformed: the user must fix the data (never worth a retry).

    Its text travels back to the user (job.message), so it names the URI and the kind of problem, never bytes
    of the file: a job must not be a way to read a file it could not otherwise see."""


# --- pickles without code ---------------------------------------------------------------------------------

# Everything a CIFAR-10 python batch (or the Kaggle input of `trainer predict`) references: numpy's array
# reconstruction, and `_codecs.encode`, which protocol-2 pickles written by Python 3 use for bytes. Python 2
# pickles (the original CIFAR-10 files) name numpy.core; numpy 2 calls it numpy._core.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def _allowed_global(module: str, name: str) -> object:
    if module == "_codecs":
        import codecs

        return codecs.encode
    if name == "_reconstruct":
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy 1.x
            from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        return _reconstruct
    return getattr(np, name)


class _DataUnpickler(pickle.Unpickler):
    """Admits dicts, lists, bytes, str, numbers and numpy arrays; any other global (os.system, builtins.eval,
    a class whose __reduce__ runs code, ...) is refused before it is looked up, so nothing in the file runs."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _PICKLE_GLOBALS:
            return _allowed_global(module, name)
        raise _ForbiddenGlobal(f"{module[:80]}.{name[:80]}")


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


def read_bounded(uri: str, max_bytes: int, limit_name: str, what: str) -> bytes:
    """The bytes of `uri`, refused (DataError naming the limit) when the file holds more than `max_bytes`:
    never reads more than max_bytes + 1 bytes, whatever the file's recorded size says."""
    fs, path = objstore.resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return bytes(f.read(max_bytes + 1))

    raw = objstore.retrying(read, f"read {objstore.redact(uri)}")
    if len(raw) > max_bytes:
        raise DataError(f"{uri}: {what} is larger than {max_bytes:,} bytes (the limit trainer.data.{limit_name})")
    return raw


def load_pickle(raw: bytes, uri: str, what: str = "a CIFAR-10 python batch") -> Any:
    """Unpickle data (never code): DataError naming the offending global for anything but plain data and
    numpy arrays; DataError saying only "unreadable" for a broken file (the pickle module's own messages
    quote bytes of the file)."""
    try:
        return _DataUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise DataError(
            f"{uri}: refused to load: the pickle references {exc}, which {what} never contains "
            "(only plain data and numpy arrays are read)"
        ) from None
    except Exception:  # noqa: BLE001 - truncated, not a pickle, wrong protocol: all "unreadable"
        raise DataError(f"{uri}: not {what} (an unreadable or truncated pickle)") from None


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


def load(uri: str, fmt: str = "auto", split: str = "train", num_classes: int = 10, limit: int | None = None) -> Dataset:
    """Decode a source into uint8 tensors. `split` picks train or test batches of a CIFAR-10 directory;
    `limit` reads at most that many images (smoke runs)."""
    if fmt in ("auto", "cifar10-python"):
        _refuse_image_folder(uri)
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SUPPORTED = (
    "a CIFAR-10 python folder (data_batch_1..5, test_batch), a Hugging Face image parquet (img{bytes}, "
    f"label), or {DOWNLOAD_CACHE} (torchvision downloads CIFAR-10 there once)"
)


def _image_files(folder: str, depth: int = 2) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        if root[len(folder) :].count(os.sep) >= depth:
            dirs[:] = []
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
        if found:
            break
    return found


def _refuse_image_folder(uri: str) -> None:
    """A folder of PNG/JPEG files (ImageFolder: one sub-folder per class) is what most people try first:
    say what is supported and how to convert it, instead of a missing-batch-file error."""
    if objstore.is_s3(uri):
        return
    local = objstore.resolve(uri)[1]
    if (
        not os.path.isdir(local)
        or os.path.exists(os.path.join(local, "data_batch_1"))
        or os.path.exists(os.path.join(local, "test_batch"))
        or os.path.isdir(os.path.join(local, "cifar-10-batches-py"))
    ):
        return
    if _image_files(local):
        raise DataError(
            f"{uri}: a folder of PNG/JPEG images is not a training format; convert it (one sub-folder "
            f"per class) with `python -m trainer convert-images {local} {local.rstrip('/')}.parquet` "
            f"and set data.train to that file. Supported: {SUPPORTED}"
        )


def image_folder_to_parquet(folder: str, out_uri: str) -> tuple[list[str], int]:
    """ImageFolder layout (folder/<class>/<image>.png|jpg) → the Hugging Face parquet layout training reads
    (img{bytes,path}, label). Labels follow CIFAR-10's class order when the folder names are its classes,
    else the sorted folder names. Returns (class names by label, image count)."""
    import pyarrow as pa

    from trainer.evaluate import CLASSES

    root = objstore.resolve(folder)[1]
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not names:
        raise DataError(f"{folder}: expected one sub-folder per class (e.g. {folder}/cat/0001.png)")
    classes = CLASSES if set(names) <= set(CLASSES) else names
    blobs, paths, labels = [], [], []
    for name in names:
        for f in sorted(os.listdir(os.path.join(root, name))):
            if f.lower().endswith(IMAGE_SUFFIXES):
                with open(os.path.join(root, name, f), "rb") as fh:
                    blobs.append(fh.read())
                paths.append(f"{name}/{f}")
                labels.append(classes.index(name))
    if not blobs:
        raise DataError(f"{folder}: no .png/.jpg/.jpeg files in its class sub-folders")
    img = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), pa.array(paths)], names=["bytes", "path"])
    table = pa.table({"img": img, "label": pa.array(labels, pa.int64())})
    fs, path = objstore.resolve(out_uri)
    pq.write_table(table, path, filesystem=fs)
    return list(classes), len(blobs)


def _check(data: Dataset, uri: str, num_classes: int) -> None:
    if data.images.ndim != 4 or tuple(data.images.shape[1:]) != (3, 32, 32):
        raise DataError(f"{uri}: images have shape {tuple(data.images.shape)}, expected N×3×32×32")
    if len(data) == 0:
        raise DataError(f"{uri}: no images")
    if len(data.labels) != len(data.images):
        raise DataError(f"{uri}: {len(data.images)} images but {len(data.labels)} labels")
    low, high = int(data.labels.min()), int(data.labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"{uri}: label {low if low < 0 else high} is out of range 0..{num_classes - 1} "
            f"(model.num_classes={num_classes})"
        )


def _read_parquet(uri: str, limit: int | None) -> Dataset:
    from torchvision.io import decode_image, decode_jpeg  # torchvision only where data is decoded

    blobs, labels = _parquet_rows(uri, limit)
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    for i, blob in enumerate(blobs):  # before decoding: a few bytes may declare a 60,000×60,000 image
        size = image_size(blob)
        if size is None:
            raise DataError(f"{uri}: row {i}: undecodable image (not a JPEG or PNG)")
        if size != (32, 32):
            raise DataError(f"{uri}: row {i}: image is {size[0]}×{size[1]}, expected 32×32 RGB")
    try:
        decoded = decode_jpeg(encoded)  # one batched C++ call
    except RuntimeError:
        decoded = []  # not all JPEG (PNG, or one broken file): decode one by one to name the culprit
        for i, blob in enumerate(encoded):
            try:
                decoded.append(decode_image(blob))
            except RuntimeError:
                raise DataError(f"{uri}: row {i}: undecodable image (not a JPEG or PNG)") from None
    for i, img in enumerate(decoded):
        if tuple(img.shape) != (3, 32, 32):
            raise DataError(f"{uri}: row {i}: image shape {tuple(img.shape)}, expected 3×32×32 RGB")
    return Dataset(torch.stack(decoded), labels)


def _parquet_rows(uri: str, limit: int | None) -> tuple[list[bytes], torch.Tensor]:
    """The encoded images and labels of a Hugging Face image parquet: at most `limit` rows (the preflight
    reads 16: only the first batch of the first row group), in batches of PARQUET_BATCH_ROWS, refused as
    soon as the file passes MAX_DATA_ROWS, an image MAX_IMAGE_BYTES or all images MAX_DATA_BYTES.

    The footer's sizes do not bound what a file expands to: a dictionary-encoded column can name one large
    value for every row (2 KB on disk, 2.4 GiB read). One value is at most its column chunk's uncompressed
    size, so batches hold few enough rows that a batch of such values stays within BATCH_BYTES, and each
    batch is checked before the next is read."""
    import pyarrow as pa
    import pyarrow.compute as pc

    fs, path = objstore.resolve(uri)
    try:
        pf = objstore.retrying(lambda: pq.ParquetFile(path, filesystem=fs), f"read {objstore.redact(uri)}")
        meta = pf.metadata
        if meta.num_rows > MAX_DATA_ROWS:
            raise DataError(
                f"{uri}: {meta.num_rows:,} rows, over the limit of {MAX_DATA_ROWS:,} (trainer.data.MAX_DATA_ROWS)"
            )
        chunk = max(
            (
                rg.column(c).total_uncompressed_size
                for rg in (meta.row_group(g) for g in range(meta.num_row_groups))
                for c in range(rg.num_columns)
                if rg.column(c).path_in_schema == "img.bytes"
            ),
            default=0,
        )
        if chunk > MAX_DATA_BYTES:
            raise DataError(f"{uri}: images of more than {MAX_DATA_BYTES:,} bytes in all (trainer.data.MAX_DATA_BYTES)")
        batch_rows = max(1, min(PARQUET_BATCH_ROWS, limit or PARQUET_BATCH_ROWS, BATCH_BYTES // max(chunk, 1)))
        blobs: list[bytes] = []
        labels: list[np.ndarray] = []
        total = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["img", "label"]):
            if limit is not None:
                batch = batch.slice(0, limit - len(blobs))
            img = batch.column("img")
            if not pa.types.is_struct(img.type) or img.type.get_field_index("bytes") < 0:
                raise DataError(f"{uri}: column img has no 'bytes' field")
            values = img.field("bytes")
            lengths = pc.binary_length(values)
            biggest = pc.max(lengths).as_py() or 0
            total += pc.sum(lengths).as_py() or 0
            if biggest > MAX_IMAGE_BYTES:
                raise DataError(
                    f"{uri}: an image of {biggest:,} bytes, over the limit of {MAX_IMAGE_BYTES:,} "
                    "(trainer.data.MAX_IMAGE_BYTES; a 32×32 image needs a few KB)"
                )
            if total > MAX_DATA_BYTES:
                raise DataError(
                    f"{uri}: images of more than {MAX_DATA_BYTES:,} bytes in all (trainer.data.MAX_DATA_BYTES)"
                )
            blobs += values.to_pylist()
            labels.append(batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64))
            if limit is not None and len(blobs) >= limit:
                break
    except FileNotFoundError:
        raise DataError(f"{uri}: file not found") from None
    except (KeyError, ValueError, OSError, TypeError, pa.ArrowException) as exc:
        if isinstance(exc, DataError):
            raise
        # pyarrow's message may quote the file's bytes: say only what kind of problem it is
        raise DataError(
            f"{uri}: not a Hugging Face image parquet (needs columns img{{bytes}} and label; "
            f"pyarrow raised {type(exc).__name__})"
        ) from None
    if any(b is None for b in blobs):
        raise DataError(f"{uri}: a row has no image bytes")
    label_array = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    return blobs, torch.from_numpy(label_array)


def image_size(blob: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's or JPEG's header, without decoding; None for anything else."""
    if blob[:8] == b"\x89PNG\r\n\x1a\n" and blob[12:16] == b"IHDR":
        return int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")
    if blob[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(blob):  # walk the markers to the first start-of-frame
        if blob[i] != 0xFF:
            return None
        marker = blob[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = int.from_bytes(blob[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(blob):
                return None
            return int.from_bytes(blob[i + 7 : i + 9], "big"), int.from_bytes(blob[i + 5 : i + 7], "big")
        if length < 2:
            return None
        i += 2 + length
    return None


def _read_cifar_python(uri: str, split: str) -> Dataset:
    """The CIFAR-10 python-pickle directory (data_batch_1..5, test_batch), or a single batch file."""
    names = TRAIN_BATCHES if split == "train" else ["test_batch"]
    if objstore.exists(uri) and objstore.resolve(uri)[0].get_file_info(objstore.resolve(uri)[1]).is_file:
        files = [uri]
    else:
        base = uri
        if not objstore.exists(objstore.join(base, names[0])) and objstore.exists(
            objstore.join(base, "cifar-10-batches-py", names[0])
        ):
            base = objstore.join(base, "cifar-10-batches-py")
        files = [objstore.join(base, n) for n in names]
    images, labels = [], []
    for f in files:
        if not objstore.exists(f):
            raise DataError(f"{f}: missing CIFAR-10 batch file (expected {', '.join(names)} in {uri})")
        data, labs = _cifar_batch(load_pickle(read_bounded(f, MAX_PICKLE_BYTES, "MAX_PICKLE_BYTES", "the batch"), f), f)
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(labs))
    return Dataset(torch.cat(images), torch.cat(labels))


def is_download_cache(uri: str) -> bool:
    """Whether `uri` is the torchvision download folder (DOWNLOAD_CACHE, `~` expanded, links resolved)."""
    if objstore.is_s3(uri):
        return False
    try:
        return os.path.realpath(objstore.resolve(uri)[1]) == os.path.realpath(os.path.expanduser(DOWNLOAD_CACHE))
    except ValueError:
        return False


def _cifar_batch(batch: Any, uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(data N×3072 uint8, labels N int64) of an unpickled batch, checked before anything is converted: a
    pickle can repeat one list many times for a few bytes each (memo references), which np.asarray would
    expand into gigabytes, so b'data' must already be a uint8 array and labels plain integers."""
    try:
        data, labs = batch[b"data"], batch.get(b"labels", batch.get(b"fine_labels"))
    except (TypeError, KeyError, AttributeError):
        raise DataError(f"{uri}: not a CIFAR-10 python batch (no dict with b'data' and b'labels')") from None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{uri}: b'data' must be an N×3072 uint8 array with b'labels'; got {got}")
    if len(data) > MAX_DATA_ROWS:
        raise DataError(
            f"{uri}: {len(data):,} images, over the limit of {MAX_DATA_ROWS:,} (trainer.data.MAX_DATA_ROWS)"
        )
    if not isinstance(labs, (list, np.ndarray)) or len(labs) != len(data):
        n = len(labs) if isinstance(labs, (list, np.ndarray)) else type(labs).__name__
        raise DataError(f"{uri}: {len(data)} images but {n} labels")
    try:  # element by element: a nested list is an error, never an N×M array
        labels = np.fromiter(labs, dtype=np.int64, count=len(data))
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{uri}: b'labels' must be integers") from None
    return data, labels


def _download_torchvision(uri: str, split: str) -> Dataset:
    """torchvision's CIFAR-10 download (for online users), read back through the python-pickle path."""
    import torchvision

    root = objstore.resolve(uri)[1]
    if not is_download_cache(uri):
        raise DataError(
            f"{uri}: does not exist (or is an empty folder); torchvision downloads CIFAR-10 only into "
            f"{DOWNLOAD_CACHE}, so that a missing folder never starts another 170 MB download"
        )
    try:
        torchvision.datasets.CIFAR10(root, train=(split == "train"), download=True)
    except Exception as exc:  # offline, DNS, checksum: all mean "could not fetch"
        raise DataError(
            f"{uri}: could not download CIFAR-10 with torchvision ({exc}); point data.train at a local copy instead"
        ) from exc
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


def test_source(spec: DataSpec) -> tuple[str, str] | None:
    """(uri, format) of the test split: data.test when set; else data.train's own test_batch when it is a
    CIFAR-10 python directory or the torchvision download (which fetches both splits); else None (a
    parquet of training images has no test split)."""
    if spec.test:
        return spec.test, spec.format
    fmt = detect_format(spec.train) if spec.format == "auto" else spec.format
    if fmt == "torchvision":
        return spec.train, fmt
    if fmt == "cifar10-python":
        base = spec.train
        for candidate in (base, objstore.join(base, "cifar-10-batches-py")):
            if objstore.exists(objstore.join(candidate, "test_batch")):
                return candidate, fmt
    return None


class DeviceData:
    """One split on the training device, served as normalised float batches for one rank."""

    def __init__(self, data: Dataset, device: torch.device, channels_last: bool, augment: AugmentSpec | None = None):
        # Padded once, so a random crop is a gather of a 32×32 window out of 40×40.
        self.padded = to_device(torch.nn.functional.pad(data.images, (PAD, PAD, PAD, PAD)), device)
        self.labels = to_device(data.labels, device)
        self.device = device
        self.channels_last = channels_last
        self.mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1) * 255
        # index tensors every batch's crop uses, made once (bench/step_overhead.py: each op is a few µs a step)
        self._window = torch.arange(32, device=device)
        self._window_flipped = self._window.flip(0)
        self._channels = torch.arange(3, device=device)[None, :, None, None]
        self.augment = augment or AugmentSpec()
        self.autoaugment = self.erasing = None
        if self.augment.autoaugment or self.augment.random_erasing:
            from trainer.augment import BatchedAutoAugment, BatchedRandomErasing  # needs torchvision

            if self.augment.autoaugment:
                self.autoaugment = BatchedAutoAugment(device)
            if self.augment.random_erasing:
                a = self.augment
                self.erasing = BatchedRandomErasing(a.erasing_p, a.erasing_scale, a.erasing_ratio, device)

    def __len__(self) -> int:
        return len(self.labels)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std  # uint8 - float32 promotes to float32: no separate conversion
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def shard(self, epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
        """This rank's indices for `epoch`: a permutation shared by every rank (seeded by seed and
        epoch), padded by wrapping around to a multiple of `world` as DistributedSampler does, so every
        image is seen once per epoch and every rank takes the same number of steps."""
        # on the host (a CPU generator: the same permutation whatever the device), then one copy to the device
        perm = torch.randperm(
            len(self), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch), device="cpu"
        )
        total = math.ceil(len(perm) / world) * world
        perm = torch.cat([perm, perm[: total - len(perm)]])
        return to_device(perm[rank::world].contiguous(), self.device)

    def steps_per_epoch(self, local_batch: int, world: int) -> int:
        return math.ceil(math.ceil(len(self) / world) / local_batch)

    def train_batches(
        self, epoch: int, seed: int, rank: int, world: int, local_batch: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self.shard(epoch, seed, rank, world)
        gen = torch.Generator(device=self.device).manual_seed(seed * 7919 + epoch * 104729 + rank)
        plan = None
        if self.autoaugment is not None:
            # The whole epoch's AutoAugment draws up front: grouping the images by operation needs the group
            # sizes on the host, read here once an epoch rather than once a batch (trainer/augment.py).
            plan = self.autoaugment.plan(self.autoaugment.draw(len(index), gen), local_batch)
        flips = self.alternating_flips(epoch, seed) if self.augment.flip and self.augment.flip_alternate else None
        for step, start in enumerate(range(0, len(index), local_batch)):
            idx = index[start : start + local_batch]
            flip = None if flips is None else flips[idx]
            yield self._normalise(self._augment(self.padded, gen, plan, step, idx, flip)), self.labels[idx]

    def alternating_flips(self, epoch: int, seed: int) -> torch.Tensor:
        """Which images `epoch` flips under augment.flip_alternate: one seeded coin per image (the same for
        every epoch and rank), inverted on every other epoch."""
        coins = torch.rand(len(self), generator=torch.Generator().manual_seed(seed * 15_485_863 + 1)) < 0.5
        return to_device(coins ^ bool(epoch % 2 == 0), self.device)

    def _augment(
        self,
        padded: torch.Tensor,
        gen: torch.Generator,
        plan: AutoAugmentPlan | None = None,
        step: int = 0,
        idx: torch.Tensor | None = None,
        flip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The notebook's order, batched and drawn per image: crop → flip → AutoAugment → RandomErasing, on
        the images `idx` of `padded` (all of them without). AutoAugment follows batch `step` of the epoch's
        `plan`, or draws for this batch alone without one. `flip` (one bool per image) decides the flips
        instead of a coin: augment.flip_alternate."""
        images = self._crop_flip(padded, gen, idx, flip)
        if self.autoaugment is not None:
            images = (
                self.autoaugment(images, gen) if plan is None else self.autoaugment.apply_planned(images, plan, step)
            )
        if self.erasing is not None:
            images = self.erasing(images, gen)
        return images

    def _crop_flip(
        self,
        padded: torch.Tensor,
        gen: torch.Generator,
        idx: torch.Tensor | None = None,
        chosen_flip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Random 32×32 crop of each 40×40 padded image (those `idx` picks), shifted at most
        augment.crop_padding pixels from the centre, then a random horizontal flip (or `chosen_flip`), all
        batched: one gather picks the images and their windows together."""
        n = padded.shape[0] if idx is None else idx.shape[0]
        shift = self.augment.crop_padding  # a window shifted by up to `shift` pixels from the centre (PAD)
        dy = torch.randint(PAD - shift, PAD + shift + 1, (n,), device=self.device, generator=gen)
        dx = torch.randint(PAD - shift, PAD + shift + 1, (n,), device=self.device, generator=gen)
        if not self.augment.crop:
            dy = dx = torch.full((n,), PAD, device=self.device)  # the centre window: the image itself
        # drawn even when chosen_flip overrides it, so the crops' random stream is the same either way
        flip = torch.rand(n, device=self.device, generator=gen) < 0.5
        if chosen_flip is not None:
            flip = chosen_flip
        if not self.augment.flip:
            flip = torch.zeros_like(flip)
        rows = (dy[:, None] + self._window)[:, None, :, None]  # n×1×32×1
        # a flipped window reads its columns right to left
        cols = (dx[:, None] + torch.where(flip[:, None], self._window_flipped, self._window))[:, None, None, :]
        images = torch.arange(n, device=self.device) if idx is None else idx
        return padded[images[:, None, None, None], self._channels, rows, cols]

    def eval_batches(self, rank: int, world: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous slice of the split, unaugmented (no padding: each image counted once)."""
        per_rank = math.ceil(len(self) / world)
        lo, hi = rank * per_rank, min(len(self), (rank + 1) * per_rank)
        for start in range(lo, hi, batch):
            stop = min(hi, start + batch)
            yield self._normalise(self.padded[start:stop, :, PAD : PAD + 32, PAD : PAD + 32]), self.labels[start:stop]


def images_to_batches(
    images: torch.Tensor, device: torch.device, channels_last: bool, batch: int
) -> Iterator[torch.Tensor]:
    """Normalised float batches of raw uint8 N×3×32×32 images, for evaluation and prediction."""
    data = DeviceData(Dataset(images, torch.zeros(len(images), dtype=torch.int64)), device, channels_last)
    for x, _ in data.eval_batches(0, 1, batch):
        yield x
