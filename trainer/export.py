"""Models that leave trainctl: the best checkpoint as weights-only safetensors and as a torch.export program.

- `model.safetensors`: the network's weights only (no optimizer state, no pickle), with the spec and the
  input normalisation in its metadata;
- `model.pt2`: a `torch.export` program of the network *with its input normalisation inside*, so plain torch
  runs it with no trainctl code: `torch.export.load("model.pt2").module()(x)` where x is float32 N×3×32×32
  holding raw pixel values 0..255 (RGB, channels first), and the output is N×10 logits.
  Its parameters carry the same names as the safetensors file, under `net.`.
- `model.onnx` (only when asked for: `exports: [onnx]`; needs the `[onnx]` extra): the same normalised
  program through `torch.onnx.export(dynamo=True)`, opset 18, one input `pixels` (float32 N×3×32×32, 0..255,
  dynamic batch) and one output `logits` (N×10): `onnxruntime.InferenceSession("model.onnx").run(None,
  {"pixels": x})`.

`artifacts/artifacts.json` (trainer/contract.py's ArtifactIndex) lists them with sha256 and size, so the service
can verify a download.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import torch
from torch import nn

import objstore
from trainer import checkpoint as ckpt
from trainer import contract
from trainer.contract import Artifact, ArtifactIndex
from trainer.data import CIFAR10_MEAN, CIFAR10_STD
from trainer.model import build_model
from trainer.spec import ExportFormat, JobSpec

log = logging.getLogger("trainer.export")

FORMATS = contract.EXPORT_FILES  # format → file name under artifacts/


class Normalized(nn.Module):
    """The network behind its input normalisation: raw 0..255 pixels in, logits out."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _write_safetensors(net: nn.Module, spec: JobSpec, path: str) -> None:
    from safetensors.torch import save_file

    meta = {
        "format": "pt",
        "spec": spec.model_dump_json(),
        "input": "float32 N×3×32×32, (x/255 - mean)/std",
        "mean": json.dumps(list(CIFAR10_MEAN)),
        "std": json.dumps(list(CIFAR10_STD)),
    }
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path, metadata=meta)


def _write_pt2(net: nn.Module, path: str) -> None:
    model = Normalized(net, CIFAR10_MEAN, CIFAR10_STD).eval()
    example = torch.rand(2, 3, 32, 32) * 255
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)


def _write_onnx(net: nn.Module, path: str) -> None:
    model = Normalized(net, CIFAR10_MEAN, CIFAR10_STD).eval()
    example = torch.rand(2, 3, 32, 32) * 255
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        external_data=False,
    )
    if program is None:  # only the legacy exporter returns nothing; dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(path, external_data=False)  # one self-contained file (the weights are ~18 MB, far below 2 GB)


def export_checkpoint(
    checkpoint_uri: str, out_dir: str, formats: list[ExportFormat], expected_sha256: str | None = None
) -> list[Artifact]:
    """Write each format of the checkpoint's model to out_dir (a local dir or storage URI) and index them."""
    state = ckpt.load(checkpoint_uri, expected_sha256)
    spec = JobSpec.model_validate_json(state["spec"])
    net = build_model(spec.model)
    net.load_state_dict(state["model"])
    net = net.float().eval()
    entries = []
    with tempfile.TemporaryDirectory(prefix="trainctl-export-") as tmp:
        for fmt in formats:
            name = FORMATS[fmt]
            local = os.path.join(tmp, name)
            if fmt == "safetensors":
                _write_safetensors(net, spec, local)
            elif fmt == "onnx":
                _write_onnx(net, local)
            else:
                _write_pt2(net, local)
            uri = objstore.join(out_dir, name)
            with open(local, "rb") as f:
                objstore.write_bytes(uri, f.read())
            entries.append(
                Artifact(
                    name=name,
                    format=fmt,
                    uri=uri,
                    sha256=ckpt.sha256_file(local),
                    size=os.path.getsize(local),
                    epoch=state.get("epoch"),
                )
            )
    objstore.write_text(objstore.join(out_dir, "artifacts.json"), ArtifactIndex(artifacts=entries).to_json())
    return entries


def export_best(job_dir: str, spec: JobSpec) -> list[Artifact]:
    """At the end of a run: export the best checkpoint in `spec.exports` formats to <job dir>/artifacts/.
    Never fails the run: a model that trained fine is worth more than its export (logged instead)."""
    if not spec.exports:
        return []
    best = ckpt.read_manifest(job_dir).best()
    if best is None:
        return []
    try:
        return export_checkpoint(
            best.uri, objstore.join(job_dir, contract.ARTIFACTS_DIR), list(spec.exports), best.sha256
        )
    except Exception:  # see the docstring
        log.exception("exporting the best checkpoint failed; the run itself succeeded")
        return []
