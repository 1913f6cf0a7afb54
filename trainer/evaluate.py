"""Offline use of a checkpoint: accuracy on a dataset, and predictions in the paper's Kaggle format."""

from __future__ import annotations

import csv
import io
import os
import pickle
from typing import Any, Literal

import numpy as np
import torch

import objstore
from trainer import checkpoint as ckpt
from trainer.contract import Confusion
from trainer.data import DataError, Dataset, images_to_batches, load, load_splits, use_channels_last
from trainer.model import build_model
from trainer.precision import autocast, resolve_precision
from trainer.spec import JobSpec

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_model(checkpoint_uri: str, expected_sha256: str | None = None) -> tuple[torch.nn.Module, JobSpec]:
    state = ckpt.load(checkpoint_uri, expected_sha256)
    spec = JobSpec.model_validate_json(state["spec"])
    model = build_model(spec.model)
    model.load_state_dict(state["model"])
    if use_channels_last(spec):
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), spec


@torch.no_grad()
def predict_logits(model: torch.nn.Module, spec: JobSpec, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Logits in the run's own precision and memory layout (as its validation saw them)."""
    device = torch.device("cpu")
    dtype = resolve_precision(spec, device)
    out = []
    for x in images_to_batches(images, device, use_channels_last(spec), batch):
        with autocast(device, dtype):
            out.append(model(x).float())
    return torch.cat(out)


def evaluate_checkpoint(checkpoint_uri: str, data_uri: str | None = None, fmt: str = "auto",
                        split: str = "all", expected_sha256: str | None = None) -> dict[str, Any]:
    """{"accuracy", "per_class", "n"}. split: `val` rebuilds the run's own seeded validation split (so the
    figure matches the reported val_acc), `test` reads a CIFAR-10 directory's test_batch, `train`/`all`
    read every image of the source."""
    model, spec = load_model(checkpoint_uri, expected_sha256)
    if split == "val":
        data_spec = spec.data if data_uri is None else spec.data.model_copy(update={"train": data_uri})
        data = load_splits(data_spec, spec.seed, spec.model.num_classes)[1]
    else:
        if data_uri is None:
            raise DataError("evaluate needs --data unless --split val")
        data = load(data_uri, fmt, "test" if split == "test" else "train", spec.model.num_classes)
    return accuracy(model, spec, data)


def accuracy(model: torch.nn.Module, spec: JobSpec, data: Dataset) -> dict[str, Any]:
    num_classes = spec.model.num_classes
    pred = predict_logits(model, spec, data.images).argmax(1)
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


def confusion_matrix(model: torch.nn.Module, spec: JobSpec, data: Dataset) -> list[list[int]]:
    """matrix[true][predicted] = number of images."""
    n = spec.model.num_classes
    pred = predict_logits(model, spec, data.images).argmax(1)
    counts = torch.bincount(data.labels.long() * n + pred.long(), minlength=n * n)
    matrix: list[list[int]] = counts.reshape(n, n).tolist()
    return matrix


def evaluate_confusion(checkpoint_uri: str, run_spec: JobSpec, expected_sha256: str | None = None,
                       epoch: int | None = None) -> Confusion | None:
    """The checkpoint's confusion matrix on the run's test split (data.test) where it has one, else on its
    own seeded validation split; None when it has neither (val_fraction 0 and no test data)."""
    model, spec = load_model(checkpoint_uri, expected_sha256)
    split: Literal["test", "val"]
    if run_spec.data.test:
        split, data = "test", load(run_spec.data.test, run_spec.data.format, "test", spec.model.num_classes)
    else:
        split, data = "val", load_splits(run_spec.data, spec.seed, spec.model.num_classes)[1]
    if len(data) == 0:
        return None
    matrix = confusion_matrix(model, spec, data)
    correct = sum(matrix[i][i] for i in range(len(matrix)))
    return Confusion(split=split, classes=class_names(spec.model.num_classes), matrix=matrix,
                     accuracy=correct / len(data), n=len(data), checkpoint=checkpoint_uri, epoch=epoch)


def _read_kaggle_pickle(uri: str) -> tuple[torch.Tensor, list[Any]]:
    """The paper's Kaggle test file: a pickle with b'data' (N×32×32×3 uint8) and b'ids'."""
    try:
        batch = pickle.load(io.BytesIO(objstore.read_bytes(uri)), encoding="bytes")
        data, ids = np.asarray(batch[b"data"]), list(batch[b"ids"])
    except Exception as exc:  # any unpickling failure means bad input
        raise DataError(f"{uri}: expected a pickle with b'data' and b'ids' ({exc})") from exc
    if data.ndim != 4 or data.shape[1:] != (32, 32, 3) or data.dtype != np.uint8 or len(ids) != len(data):
        raise DataError(f"{uri}: b'data' must be N×32×32×3 uint8 with one id each; "
                        f"got {data.dtype} {data.shape} and {len(ids)} ids")
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
        img = decode_image(torch.frombuffer(bytearray(objstore.read_bytes(os.path.join(uri, name))),
                                            dtype=torch.uint8), mode=ImageReadMode.RGB)
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


def load_exported(path: str) -> torch.nn.Module:
    """A `model.pt2` export (trainer/export.py): raw 0..255 float pixels in, logits out; plain torch."""
    return torch.export.load(path).module()


def predict_to_csv(model_uri: str, input_uri: str, out_uri: str) -> int:
    """Predictions as CSV `ID,Labels` (the paper's Kaggle format) for a checkpoint or a `.pt2` export."""
    images, ids = read_predict_input(input_uri)
    if model_uri.endswith(".pt2"):
        exported = load_exported(objstore.resolve(model_uri)[1])
        with torch.no_grad():
            labels = torch.cat([exported(chunk.float()).argmax(1) for chunk in images.split(1024)]).tolist()
    else:
        model, spec = load_model(model_uri)
        labels = predict_logits(model, spec, images).argmax(1).tolist()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ID", "Labels"])
    writer.writerows((i.decode() if isinstance(i, bytes) else i, lab) for i, lab in zip(ids, labels, strict=True))
    objstore.write_text(out_uri, out.getvalue())
    return len(labels)
