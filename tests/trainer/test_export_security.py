"""Issue 21 item 4: loading a model never runs code. `predict` refuses a .pt2 (torch.export.load unpickles parts
of it without restriction), reads model.safetensors without pickle into this code's own model, and loads
checkpoints weights-only; a planted file of any kind fails with an error and its payload never runs. An
untrained debug model, no data set: fast."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainer import checkpoint as ckpt
from trainer.data import DataError
from trainer.evaluate import load_model, load_safetensors_model, predict_logits, predict_to_csv
from trainer.export import _write_safetensors
from trainer.model import build_model
from trainer.spec import resolve


class _Payload:
    """Unpickling this creates the marker file: the proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def spec():
    return resolve("debug", {"precision": "fp32", "channels_last": False})


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)


@pytest.fixture
def input_pickle(tmp_path: Path, images: torch.Tensor) -> str:
    path = tmp_path / "input.pkl"
    path.write_bytes(pickle.dumps({b"data": images.permute(0, 2, 3, 1).numpy(), b"ids": list(range(6))}))
    return str(path)


def test_predict_from_safetensors_matches_the_checkpoint(spec, images, input_pickle, tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = build_model(spec.model).eval()
    ckpt.save({"model": net.state_dict(), "spec": spec.model_dump_json(), "epoch": 1}, str(tmp_path))
    _write_safetensors(net, spec, str(tmp_path / "model.safetensors"))
    model, _, numerics = load_model(str(tmp_path / ckpt.FILENAME))
    expected = predict_logits(model, numerics, images).argmax(1).tolist()
    with torch.no_grad():
        got = load_safetensors_model(str(tmp_path / "model.safetensors"))(images.float()).argmax(1).tolist()
    assert got == expected
    for source in (str(tmp_path / "model.safetensors"), str(tmp_path / ckpt.FILENAME)):
        out = tmp_path / "pred.csv"
        assert predict_to_csv(source, input_pickle, str(out)) == 6
        assert [int(r[1]) for r in list(csv.reader(out.open()))[1:]] == expected


def test_a_pt2_is_refused_before_anything_is_read(input_pickle, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    planted = tmp_path / "model.pt2"
    planted.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(DataError, match="not loaded here.*model.safetensors"):
        predict_to_csv(str(planted), input_pickle, str(tmp_path / "out.csv"))
    assert not marker.exists() and not (tmp_path / "out.csv").exists()


def test_planted_checkpoints_and_safetensors_never_run_code(spec, input_pickle, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model": _Payload(marker), "spec": spec.model_dump_json()})
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / ckpt.FILENAME).write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError):  # torch.load(weights_only=True) refuses the global
        predict_to_csv(str(tmp_path / "ckpt" / ckpt.FILENAME), input_pickle, str(tmp_path / "out.csv"))
    torch.save({"model": _Payload(marker)}, str(tmp_path / "ckpt" / ckpt.FILENAME))  # torch's own zip format
    with pytest.raises(pickle.UnpicklingError):
        predict_to_csv(str(tmp_path / "ckpt" / ckpt.FILENAME), input_pickle, str(tmp_path / "out.csv"))
    (tmp_path / "fake.safetensors").write_bytes(payload)  # a pickle under the safetensors name
    with pytest.raises(DataError, match="not a readable safetensors file"):
        predict_to_csv(str(tmp_path / "fake.safetensors"), input_pickle, str(tmp_path / "out.csv"))
    assert not marker.exists()


def test_a_safetensors_spec_is_validated_before_a_model_is_built(spec, tmp_path: Path) -> None:
    net = build_model(spec.model)
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    huge = json.loads(spec.model_dump_json())
    huge["model"]["blocks"] = [1, 1, 1, 2_000_000]  # millions of modules on the machine that loads it
    save_file(weights, str(tmp_path / "huge.safetensors"), metadata={"spec": json.dumps(huge)})
    with pytest.raises(DataError, match="not a valid job spec"):
        load_safetensors_model(str(tmp_path / "huge.safetensors"))
    other = resolve("debug", {"model.widths": [8, 16, 32, 64]})  # tensors of another model
    save_file(weights, str(tmp_path / "other.safetensors"), metadata={"spec": other.model_dump_json()})
    with pytest.raises(DataError, match="not those of the model"):
        load_safetensors_model(str(tmp_path / "other.safetensors"))
