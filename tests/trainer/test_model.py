import torch

from trainer.model import build_model, count_parameters
from trainer.spec import ModelSpec, resolve


def test_paper_model_has_the_papers_parameter_count():
    assert count_parameters(build_model(ModelSpec())) == 4_570_934


def test_forward_shapes_and_variants():
    for spec in (
        resolve("debug").model,
        ModelSpec(widths=[8, 16], blocks=[1, 1], se_reduction=4, activation="relu", se=False, num_classes=7),
    ):
        model = build_model(spec).eval()
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, spec.num_classes)


def test_model_file_knows_nothing_of_training():
    import pathlib

    import trainer.model

    text = pathlib.Path(trainer.model.__file__).read_text()
    for word in ("ray", "optim", "DistributedDataParallel", "cuda"):
        assert f"import {word}" not in text and f"{word}." not in text.replace("nn.", ""), word
