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


def test_the_closed_form_cost_counts_exactly_what_is_built():
    """trainer.spec.model_cost (arithmetic, one step per stage) against the built model, for stage counts and
    depths where the shortcut projections differ (widths changing or not, 8 stages reaching 1x1 resolution)."""
    from trainer.spec import model_cost

    for spec in (
        ModelSpec(),
        ModelSpec(widths=[8, 8, 16], blocks=[3, 1, 4], se_reduction=4),
        ModelSpec(widths=[4] * 8, blocks=[1, 2, 1, 2, 1, 2, 1, 3], se=False, num_classes=3),
        ModelSpec(widths=[2, 4, 4, 8, 8, 8], blocks=[2, 3, 1, 1, 2, 2], se_reduction=2, activation="relu"),
    ):
        assert model_cost(spec)[0] == count_parameters(build_model(spec)), spec


def test_zero_init_residual_starts_every_block_as_its_shortcut():
    torch.manual_seed(0)
    spec = ModelSpec(widths=[8, 16], blocks=[2, 1], se_reduction=4)
    plain = build_model(spec)
    zero = build_model(spec.model_copy(update={"zero_init_residual": True}))
    assert count_parameters(zero) == count_parameters(plain)
    assert all(block.bn2.weight.abs().sum() > 0 for block in plain.stages)
    assert all(torch.equal(block.bn2.weight, torch.zeros_like(block.bn2.weight)) for block in zero.stages)
    first = zero.stages[0]  # same width, stride 1: its shortcut is the identity
    x = torch.randn(4, 8, 32, 32)
    assert torch.allclose(first(x), first.act2(x))
