"""Exported models leave trainctl: plain torch (torch.export.load, safetensors) reproduces what
`python -m trainer evaluate` predicts, on 1,000 real CIFAR-10 images, without trainctl's model code."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.once import once_per_session
from trainer import checkpoint as ckpt
from trainer.data import DeviceData, load
from trainer.evaluate import load_model, predict_logits, predict_to_csv
from trainer.export import export_checkpoint
from trainer.model import build_model
from trainer.precision import Numerics
from trainer.spec import resolve

pytestmark = pytest.mark.slow  # trains a few steps and exports twice: ~1 minute


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, cifar_parquet: Path) -> str:
    """A checkpoint as the loop writes it, of a network trained for a few steps (an untrained one predicts
    one class for every image, which would prove nothing). Trained once per session; the tests only read it."""

    def train_a_few_steps(folder: Path) -> Path:
        torch.manual_seed(0)
        spec = resolve("debug", {"precision": "fp32", "channels_last": False})
        model = build_model(spec.model)
        train = DeviceData(
            load(str(cifar_parquet), "parquet", limit=3000).take(torch.arange(1000, 3000)),
            torch.device("cpu"),
            channels_last=False,
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for epoch in range(2):
            for x, y in train.train_batches(epoch, seed=0, rank=0, world=1, local_batch=64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        ckpt.save({"model": model.state_dict(), "spec": spec.model_dump_json(), "epoch": 3}, str(folder))
        return folder / ckpt.FILENAME

    return str(once_per_session(tmp_path_factory, "export-checkpoint", train_a_few_steps))


@pytest.fixture(scope="module")
def images(cifar_parquet: Path) -> torch.Tensor:
    return load(str(cifar_parquet), "parquet", limit=1000).images


def test_exports_predict_like_evaluate(checkpoint: str, images: torch.Tensor, tmp_path: Path) -> None:
    entries = export_checkpoint(checkpoint, str(tmp_path), ["safetensors", "pt2"])
    assert {e.name for e in entries} == {"model.safetensors", "model.pt2"}
    for e in entries:
        assert e.sha256 == ckpt.sha256_file(e.uri) and e.size == Path(e.uri).stat().st_size
    reference = predict_logits(*_model_and_numerics(checkpoint), images)  # what `evaluate` computes

    program = torch.export.load(str(tmp_path / "model.pt2")).module()  # plain torch from here on
    with torch.no_grad():
        exported = program(images.float())
    assert torch.equal(exported.argmax(1), reference.argmax(1))
    assert torch.allclose(exported, reference, atol=1e-3)
    assert len(set(reference.argmax(1).tolist())) > 1, "a constant predictor would prove nothing"

    # safetensors holds the network's weights: zero the program's, load the file's, same predictions again.
    weights = load_file(str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        for p in program.parameters():
            p.zero_()
        missing, unexpected = program.load_state_dict({f"net.{k}": v for k, v in weights.items()}, strict=False)
        assert not unexpected and not [k for k in missing if not k.startswith(("mean", "std"))]
        assert torch.equal(program(images.float()).argmax(1), reference.argmax(1))


def test_predict_reads_folders_parquets_and_exports(
    checkpoint: str, images: torch.Tensor, cifar_parquet: Path, tmp_path: Path
) -> None:
    from torchvision.io import write_png

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(20):
        write_png(images[i], str(folder / f"img{i:03d}.png"))
    export_checkpoint(checkpoint, str(tmp_path / "export"), ["safetensors"])  # (a .pt2 is refused: it unpickles)
    expected = predict_logits(*_model_and_numerics(checkpoint), images[:20]).argmax(1).tolist()

    for model in (checkpoint, str(tmp_path / "export" / "model.safetensors")):
        out = tmp_path / "pred.csv"
        assert predict_to_csv(model, str(folder), str(out)) == 20
        rows = list(csv.reader(out.open()))
        assert rows[0] == ["ID", "Labels"] and rows[1][0] == "img000.png"
        assert [int(r[1]) for r in rows[1:]] == expected
    import pyarrow.parquet as pq

    small = tmp_path / "small.parquet"
    pq.write_table(pq.read_table(cifar_parquet).slice(0, 20), small)
    out = tmp_path / "parquet.csv"
    assert predict_to_csv(checkpoint, str(small), str(out)) == 20
    assert [int(r[1]) for r in list(csv.reader(out.open()))[1:]] == expected


def _model_and_numerics(checkpoint: str) -> tuple[torch.nn.Module, Numerics]:
    model, _spec, numerics = load_model(checkpoint)  # the run's own precision and layout, as evaluate uses
    return model, numerics


def test_trainctl_export_builds_a_missing_export_from_the_best_checkpoint(
    checkpoint: str, images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A debug-preset job exports nothing (`exports: []`); `trainctl export` with the trainer installed here
    downloads its best checkpoint (verified) and exports it in a `python -m trainer export` child."""
    from service.client.cli import common, main, models
    from tests.service.test_cli import _export_service

    monkeypatch.setattr(common, "client", _export_service([], checkpoint=Path(checkpoint).read_bytes()))
    out = tmp_path / "job1-model.pt2"
    assert models.cmd_export(main.build_parser().parse_args(["export", "job1", "-o", str(out), "--json"])) == 0
    printed = capsys.readouterr()
    assert "has no pt2 export" in printed.err and '"source": "here"' in printed.out
    assert ckpt.sha256_file(str(out)) in printed.out
    program = torch.export.load(str(out)).module()
    reference = predict_logits(*_model_and_numerics(checkpoint), images[:200])
    with torch.no_grad():
        assert torch.equal(program(images[:200].float()).argmax(1), reference.argmax(1))


def test_onnx_export_matches_pytorch_in_onnxruntime(checkpoint: str, images: torch.Tensor, tmp_path: Path) -> None:
    """`exports: [onnx]`: onnxruntime runs the file on 1,000 real images and matches PyTorch's logits. Max abs
    diff measured here: 1.43e-06 (CPU, fp32, torch 2.14.1, onnxruntime 1.32); the bound leaves room for other CPUs."""
    import onnxruntime

    (entry,) = export_checkpoint(checkpoint, str(tmp_path), ["onnx"])
    assert entry.name == "model.onnx" and entry.format == "onnx" and entry.sha256 == ckpt.sha256_file(entry.uri)
    reference = predict_logits(*_model_and_numerics(checkpoint), images)
    session = onnxruntime.InferenceSession(entry.uri, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixels"] and [o.name for o in session.get_outputs()] == [
        "logits"
    ]
    (logits,) = session.run(None, {"pixels": images.float().numpy()})  # dynamic batch: 1,000 at once
    got = torch.from_numpy(logits)
    max_abs_diff = (got - reference).abs().max().item()
    print(f"onnxruntime vs PyTorch on {len(images)} images: max abs logit diff {max_abs_diff:.3g}")
    assert got.shape == reference.shape and max_abs_diff < 1e-3
    assert torch.equal(got.argmax(1), reference.argmax(1))
    assert len(set(reference.argmax(1).tolist())) > 1, "a constant predictor would prove nothing"
