"""Offline use of a checkpoint: accuracy on a dataset, and predictions in the paper's Kaggle format."""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

import objstore
from trainer import checkpoint as ckpt
from trainer.contract import Confusion
from trainer.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MAX_PICKLE_BYTES,
    DataError,
    Dataset,
    images_to_batches,
    load,
    load_pickle,
    load_splits,
    read_bounded,
    test_source,
    use_channels_last,
)
from trainer.model import build_model
from trainer.precision import Numerics, autocast, resolve_precision
from trainer.spec import JobSpec, TtaMode

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the first GPU where there is one (a run trained on CUDA evaluates to its val_acc there), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def checkpoint_numerics(state: dict[str, Any], spec: JobSpec, device: torch.device) -> Numerics:
    """The precision and layout the run used (recorded in its checkpoints); older checkpoints: by rule."""
    if isinstance(state.get("numerics"), dict):
        return Numerics.from_dict(state["numerics"])
    return Numerics("bf16" if resolve_precision(spec, device) is not None else "fp32", use_channels_last(spec), "rule")


def load_model(
    checkpoint_uri: str, expected_sha256: str | None = None, device: torch.device | None = None
) -> tuple[torch.nn.Module, JobSpec, Numerics]:
    device = device or torch.device("cpu")
    state = ckpt.load(checkpoint_uri, expected_sha256)
    spec = JobSpec.model_validate_json(state["spec"])
    numerics = checkpoint_numerics(state, spec, device)
    model = build_model(spec.model)
    model.load_state_dict(state["model"])
    model = model.to(device)
    if numerics.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), spec, numerics


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    numerics: Numerics,
    images: torch.Tensor,
    batch: int = 1024,
    device: torch.device | None = None,
    tta: TtaMode = "none",
) -> torch.Tensor:
    """Logits (on the CPU) in the run's own precision and memory layout, as its validation saw them.
    tta `flip`: the mean of the logits of each image and of its mirror image (training flips at random, so
    both views are in distribution); the prediction is their argmax. `flip-shift`: half that, half the mean
    of the same for the image shifted one pixel up-left and one pixel down-right (training crops shift at
    random too; the border pixel is reflected), as airbench weighs them."""
    device = device or torch.device("cpu")
    out = []
    for x in images_to_batches(images, device, numerics.channels_last, batch):
        with autocast(device, numerics.amp_dtype):
            logits = model(x).float() if tta == "none" else _mirrored(model, x)
            if tta == "flip-shift":
                padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
                h, w = x.shape[-2:]
                shifted = [padded[..., :h, :w], padded[..., 2 : h + 2, 2 : w + 2]]
                logits = (logits + (_mirrored(model, shifted[0]) + _mirrored(model, shifted[1])) / 2) / 2
        out.append(logits.cpu())
    return torch.cat(out)


def _mirrored(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mean of the logits of x and of its mirror image."""
    return (model(x).float() + model(x.flip(-1)).float()) / 2


def evaluate_checkpoint(
    checkpoint_uri: str,
    data_uri: str | None = None,
    fmt: str = "auto",
    split: str = "all",
    expected_sha256: str | None = None,
    device: str = "cpu",
    tta: TtaMode = "none",
) -> dict[str, Any]:
    """{"accuracy", "per_class", "n", "device"}, plus {"tta": {"mode", "accuracy", "per_class"}} with a test-time
    augmentation (the plain figures stay beside it, never replaced). split: `val` rebuilds the run's own seeded
    validation split (so the figure matches the reported val_acc on the device kind it trained on), `test` reads a
    CIFAR-10 directory's test_batch (without data_uri: the run's own test split, as its metrics' test_acc),
    `train`/`all` read every image of the source."""
    dev = pick_device(device)
    model, spec, numerics = load_model(checkpoint_uri, expected_sha256, dev)
    if split == "val":
        data_spec = spec.data if data_uri is None else spec.data.model_copy(update={"train": data_uri})
        data = load_splits(data_spec, spec.seed, spec.model.num_classes)[1]
    else:
        if data_uri is None and split == "test":
            # The run's own test split: data.test, or data.train's test_batch (what its metrics report).
            source = test_source(spec.data)
            if source is None:
                raise DataError(
                    "the run has no test split (data.test unset, data.train has no test_batch): pass --data"
                )
            data_uri, fmt = source
        if data_uri is None:
            raise DataError("evaluate needs --data unless --split val or test")
        data = load(data_uri, fmt, "test" if split == "test" else "train", spec.model.num_classes)
    result = {**accuracy(model, spec, numerics, data, dev), "device": str(dev)}
    if tta != "none":
        tested = accuracy(model, spec, numerics, data, dev, tta=tta)
        result["tta"] = {"mode": tta, "accuracy": tested["accuracy"], "per_class": tested["per_class"]}
    return result


def accuracy(
    model: torch.nn.Module,
    spec: JobSpec,
    numerics: Numerics,
    data: Dataset,
    device: torch.device | None = None,
    tta: TtaMode = "none",
) -> dict[str, Any]:
    num_classes = spec.model.num_classes
    pred = predict_logits(model, numerics, data.images, device=device, tta=tta).argmax(1)
    correct = pred == data.labels
    per_class = {}
    for c in range(num_classes):
        mask = data.labels == c
        if mask.any():
            name = CLASSES[c] if num_classes == len(CLASSES) else str(c)
            per_class[name] = float(correct[mask].float().mean())
    return {"accuracy": float(correct.float().mean()), "per_class": per_class, "n": len(data)}


def class_names(num_classes: int) -> list[str]:
    return list(CLASSES) if num_classes == len(CLASSES) else [str(c) for c in range(num_classes)]


def confusion_matrix(model: torch.nn.Module, spec: JobSpec, numerics: Numerics, data: Dataset) -> list[list[int]]:
    """matrix[true][predicted] = number of images."""
    n = spec.model.num_classes
    pred = predict_logits(model, numerics, data.images).argmax(1)
    counts = torch.bincount(data.labels.long() * n + pred.long(), minlength=n * n)
    matrix: list[list[int]] = counts.reshape(n, n).tolist()
    return matrix


def evaluate_confusion(
    checkpoint_uri: str, run_spec: JobSpec, expected_sha256: str | None = None, epoch: int | None = None
) -> Confusion | None:
    """The checkpoint's confusion matrix on the run's test split (data.test) where it has one, else on its
    own seeded validation split; None when it has neither (val_fraction 0 and no test data)."""
    model, spec, numerics = load_model(checkpoint_uri, expected_sha256)
    split: Literal["test", "val"]
    if run_spec.data.test:
        split, data = "test", load(run_spec.data.test, run_spec.data.format, "test", spec.model.num_classes)
    else:
        split, data = "val", load_splits(run_spec.data, spec.seed, spec.model.num_classes)[1]
    if len(data) == 0:
        return None
    matrix = confusion_matrix(model, spec, numerics, data)
    correct = sum(matrix[i][i] for i in range(len(matrix)))
    return Confusion(
        split=split,
        classes=class_names(spec.model.num_classes),
        matrix=matrix,
        accuracy=correct / len(data),
        n=len(data),
        checkpoint=checkpoint_uri,
        epoch=epoch,
    )


def _read_kaggle_pickle(uri: str) -> tuple[torch.Tensor, list[Any]]:
    """A pickle with b'data' as N×32×32×3 (HWC, the paper's Kaggle test file) or N×3072 (CHW rows, the CIFAR-10
    python layout, e.g. `test_batch`) uint8; ids from b'ids', else 1..N in file order. Read without code."""
    batch = load_pickle(
        read_bounded(uri, MAX_PICKLE_BYTES, "MAX_PICKLE_BYTES", "the pickle"), uri, "a Kaggle input pickle"
    )
    try:
        data = batch[b"data"]
        if not isinstance(data, np.ndarray):  # a list of repeated rows would expand in np.asarray
            raise TypeError
        ids = list(batch[b"ids"]) if b"ids" in batch else list(range(1, len(data) + 1))
    except (TypeError, KeyError, AttributeError):
        raise DataError(f"{uri}: expected a pickle with b'data'") from None
    if (
        data.dtype != np.uint8
        or len(ids) != len(data)
        or not ((data.ndim == 4 and data.shape[1:] == (32, 32, 3)) or (data.ndim == 2 and data.shape[1] == 3072))
    ):
        raise DataError(
            f"{uri}: b'data' must be uint8 N×32×32×3 (HWC) or N×3072 (CIFAR-10 CHW rows), with one "
            f"id each; got {data.dtype} {data.shape} and {len(ids)} ids"
        )
    if data.ndim == 2:
        return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), ids
    return torch.from_numpy(data.copy()).permute(0, 3, 1, 2).contiguous(), ids


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _read_image_folder(uri: str) -> tuple[torch.Tensor, list[Any]]:
    """Every PNG/JPEG file in a folder (sorted by name), each 32×32; ids are the file names."""
    from torchvision.io import ImageReadMode, decode_image

    names = sorted(n for n in os.listdir(uri) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise DataError(f"{uri}: no .png/.jpg/.jpeg files in this folder")
    images = []
    for name in names:
        img = decode_image(
            torch.frombuffer(bytearray(objstore.read_bytes(os.path.join(uri, name))), dtype=torch.uint8),
            mode=ImageReadMode.RGB,
        )
        if tuple(img.shape) != (3, 32, 32):
            raise DataError(f"{uri}/{name}: image is {img.shape[2]}×{img.shape[1]}, expected 32×32")
        images.append(img)
    return torch.stack(images), names


def read_predict_input(uri: str) -> tuple[torch.Tensor, list[Any]]:
    """Images to predict (uint8 N×3×32×32) and their ids, from a folder of PNG/JPEG files (ids: file names),
    a Hugging Face parquet (ids: row numbers) or the paper's Kaggle pickle (its ids)."""
    local = objstore.resolve(uri)[1] if not objstore.is_s3(uri) else None
    if local is not None and os.path.isdir(local):
        return _read_image_folder(local)
    if uri.endswith(".parquet"):
        data = load(uri, "parquet")
        return data.images, list(range(len(data)))
    return _read_kaggle_pickle(uri)


PT2_REFUSED = (
    "{uri}: a .pt2 export is not loaded here: torch.export.load unpickles parts of it without restriction, so "
    "a planted or altered file could run code. Use the job's model.safetensors (`trainctl export ID --format "
    "safetensors`) or its checkpoint (`trainctl best ID`); both load without running code"
)


def load_safetensors_model(path: str) -> torch.nn.Module:
    """A `model.safetensors` export (trainer/export.py) as a runnable model, raw 0..255 float pixels in and logits
    out like the .pt2: the tensors are read by safetensors (a JSON header and raw bytes: no pickle, no code), the
    network is this code's own (trainer/model.py) built from the spec in the file's metadata, which is validated
    first (so a planted spec gets no model the limits do not allow), and the normalisation is this code's too.
    Every tensor's name and shape must be the model's, checked before any tensor is read."""
    from pydantic import ValidationError
    from safetensors import SafetensorError, safe_open

    from trainer.export import Normalized

    try:
        with safe_open(path, framework="pt") as f:
            try:
                spec = JobSpec.model_validate_json((f.metadata() or {}).get("spec") or "")
            except ValidationError as exc:
                raise DataError(
                    f"{path}: the spec in its metadata is not a valid job spec ({exc.error_count()} error(s))"
                ) from None
            net = build_model(spec.model)
            expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            if found != expected:
                differ = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
                raise DataError(
                    f"{path}: its tensors are not those of the model its spec describes "
                    f"({len(differ)} differ, e.g. {differ[0][:100]!r})"
                )
            net.load_state_dict({k: f.get_tensor(k) for k in expected})
    except SafetensorError as exc:
        raise DataError(f"{path}: not a readable safetensors file ({str(exc)[:200]})") from None
    return Normalized(net.float(), CIFAR10_MEAN, CIFAR10_STD).eval()


def predict_to_csv(model_uri: str, input_uri: str, out_uri: str) -> int:
    """Predictions as CSV `ID,Labels` (the paper's Kaggle format) for a checkpoint (loaded weights-only) or a
    `.safetensors` export; a `.pt2` export is refused (see PT2_REFUSED)."""
    if model_uri.endswith(".pt2"):
        raise DataError(PT2_REFUSED.format(uri=model_uri))
    images, ids = read_predict_input(input_uri)
    if model_uri.endswith(".safetensors"):
        exported = load_safetensors_model(objstore.resolve(model_uri)[1])
        with torch.no_grad():
            labels = torch.cat([exported(chunk.float()).argmax(1) for chunk in images.split(1024)]).tolist()
    else:
        model, _spec, numerics = load_model(model_uri)
        labels = predict_logits(model, numerics, images).argmax(1).tolist()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ID", "Labels"])
    writer.writerows((i.decode() if isinstance(i, bytes) else i, lab) for i, lab in zip(ids, labels, strict=True))
    objstore.write_text(out_uri, out.getvalue())
    return len(labels)
