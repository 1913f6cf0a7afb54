"""Test-time augmentation in evaluation (no Ray: a tiny model and a checkpoint written here)."""

from __future__ import annotations

import torch

from trainer import checkpoint as ckpt
from trainer.data import Dataset
from trainer.evaluate import accuracy, evaluate_checkpoint, predict_logits
from trainer.model import build_model
from trainer.precision import Numerics
from trainer.spec import resolve

FP32 = Numerics("fp32", False, "rule")


def tiny(seed: int = 0) -> tuple[torch.nn.Module, object]:
    spec = resolve("debug", {"seed": seed})
    torch.manual_seed(seed)
    return build_model(spec.model).eval(), spec


def images(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror_image():
    model, _ = tiny()
    x = images()
    plain = predict_logits(model, FP32, x)
    mirrored = predict_logits(model, FP32, x.flip(-1))
    tta = predict_logits(model, FP32, x, tta="flip")
    torch.testing.assert_close(tta, (plain + mirrored) / 2)
    assert not torch.allclose(tta, plain)  # the option changes something: random weights are not symmetric


def test_tta_accuracy_is_reported_beside_the_plain_one_never_instead(tmp_path):
    # A linear model on raw pixels is far from mirror-symmetric: its labels for the mirror views are what the
    # plain pass gets partly wrong and the flip average gets more of.
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    _, spec = tiny()
    x = images(200)
    data = Dataset(x, predict_logits(linear, FP32, x.flip(-1)).argmax(1))
    plain, flipped = accuracy(linear, spec, FP32, data), accuracy(linear, spec, FP32, data, tta="flip")
    assert plain["accuracy"] < flipped["accuracy"], (plain, flipped)

    # evaluate_checkpoint on a checkpoint file: both figures, the plain one as without tta
    model, spec = tiny()
    (tmp_path / "ck").mkdir()
    state = {"model": model.state_dict(), "spec": spec.model_dump_json()}
    ckpt.save({**state, "numerics": {"precision": "fp32", "channels_last": False}}, str(tmp_path / "ck"))
    parquet = tmp_path / "imgs.parquet"
    _write_parquet(parquet, x, data.labels)
    result = evaluate_checkpoint(str(tmp_path / "ck"), str(parquet), "parquet", "all", tta="flip")
    assert result["accuracy"] == accuracy(model, spec, FP32, data)["accuracy"] and result["n"] == 200
    assert result["tta"]["mode"] == "flip"
    assert result["tta"]["accuracy"] == accuracy(model, spec, FP32, data, tta="flip")["accuracy"]
    assert "tta" not in evaluate_checkpoint(str(tmp_path / "ck"), str(parquet), "parquet", "all")


def _write_parquet(path, x: torch.Tensor, labels: torch.Tensor) -> None:
    """A Hugging Face layout parquet (img {bytes, path}, label) of PNGs: lossless, so pixels survive."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from torchvision.io import encode_png

    rows = [{"bytes": encode_png(img).numpy().tobytes(), "path": f"{i}.png"} for i, img in enumerate(x)]
    pq.write_table(pa.table({"img": rows, "label": labels.tolist()}), path)


def test_flip_shift_tta_adds_the_one_pixel_shifts_at_half_weight():
    model, _ = tiny()
    x = images()

    def mirrored(batch: torch.Tensor) -> torch.Tensor:
        return (predict_logits(model, FP32, batch) + predict_logits(model, FP32, batch.flip(-1))) / 2

    padded = torch.nn.functional.pad(x.float(), (1, 1, 1, 1), mode="reflect").to(torch.uint8)
    up_left, down_right = padded[..., :32, :32], padded[..., 2:, 2:]
    expected = (mirrored(x) + (mirrored(up_left) + mirrored(down_right)) / 2) / 2
    got = predict_logits(model, FP32, x, tta="flip-shift")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, predict_logits(model, FP32, x, tta="flip"))
