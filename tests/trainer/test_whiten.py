"""model.whiten_stem (trainer/whiten.py): the stem starts as a whitening of the training images' patches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer import step
from trainer.model import build_model, count_parameters
from trainer.spec import ModelSpec, resolve
from trainer.whiten import EPS, normalised, patch_covariance, whiten_stem, whitening_filters


def _images(n: int = 300) -> torch.Tensor:
    """uint8 images with photo-like structure: smooth colour fields (neighbouring pixels correlate) plus noise."""
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    x = 0.8 * smooth + 0.2 * torch.rand(n, 3, 32, 32, generator=g)
    return (x * 255).to(torch.uint8)


def test_the_filters_whiten_the_patches_they_were_computed_from() -> None:
    images = _images()
    filters = whitening_filters(images, out_channels=32, kernel=3)  # 16 directions of 27, and their negatives
    assert filters.shape == (32, 3, 3, 3)
    assert torch.equal(filters[16:], -filters[:16])
    # The first 16 filters' responses over every patch (a convolution, so the flattening order is checked
    # too): uncorrelated, each of variance λ/(λ+EPS), which is ~1 for these directions of most variance.
    responses = F.conv2d(normalised(images), filters[:16]).permute(1, 0, 2, 3).reshape(16, -1)
    cov = (responses.double() @ responses.double().T) / responses.shape[1]
    eigenvalues = torch.linalg.eigvalsh(patch_covariance(images, 3)).flip(0)[:16]
    assert torch.allclose(cov.diagonal(), eigenvalues / (eigenvalues + EPS), atol=1e-3)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-3
    # most variance first: a smooth image's patches vary most along the flat (all-equal) direction
    assert eigenvalues[0] > 10 * eigenvalues[15]


def test_only_the_stem_changes_and_filters_whitening_cannot_fill_stay() -> None:
    spec = ModelSpec(widths=[9, 16], blocks=[1, 1], se_reduction=4)  # 9: 4 pairs, one filter left over
    torch.manual_seed(0)
    plain = build_model(spec)
    torch.manual_seed(0)
    whitened = build_model(spec.model_copy(update={"whiten_stem": True}))
    whiten_stem(whitened, _images())
    assert count_parameters(whitened) == count_parameters(plain)
    changed = {
        name
        for (name, a), (_, b) in zip(plain.state_dict().items(), whitened.state_dict().items(), strict=True)
        if not torch.equal(a, b)
    }
    assert changed == {"stem.0.weight"}
    assert torch.equal(whitened.stem[0].weight[8], plain.stem[0].weight[8])  # the odd one out kept its init
    assert torch.equal(whitened.stem[0].weight[4:8], -whitened.stem[0].weight[:4])


def test_build_whitens_from_the_images_it_is_given_and_says_when_there_are_none() -> None:
    spec = resolve("debug", {"model.whiten_stem": True})
    trainee = step.build(spec, torch.device("cpu"), steps_per_epoch=4, train_images=_images())
    expected = whitening_filters(_images(), spec.model.widths[0], 3)
    assert torch.allclose(trainee.raw_model.stem[0].weight, expected)
    with pytest.raises(ValueError, match="model.whiten_stem"):
        step.build(spec, torch.device("cpu"), steps_per_epoch=4)
