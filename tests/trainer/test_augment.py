"""The batched AutoAugment (ImageNet policy) and RandomErasing against torchvision's per-image transforms."""

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainer.augment import (
    _SPACE,
    IMAGENET_POLICY,
    BatchedAutoAugment,
    BatchedRandomErasing,
    ErasingParams,
    apply_op,
)
from trainer.data import Dataset, DeviceData
from trainer.spec import AugmentSpec

DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
]
GEOMETRIC = {"Rotate", "ShearX"}  # nearest-neighbour resampling: allowed to differ by 1 level


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Image-like uint8 batches: per-image colour gradients plus noise, with varied ranges, so equalize,
    autocontrast and solarize have something to do."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    a = torch.rand(n, 3, 1, 1, generator=g)
    b = torch.rand(n, 3, 1, 1, generator=g)
    low = torch.rand(n, 1, 1, 1, generator=g) * 100
    span = 40 + torch.rand(n, 1, 1, 1, generator=g) * 115
    x = low + span * (a * yy + b * xx + 0.3 * torch.rand(n, 3, 32, 32, generator=g)) / 1.6
    return x.round().clamp(0, 255).to(torch.uint8)


def reference(image: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """torchvision's own AutoAugment operation on one image (its dispatch, interpolation and fill)."""
    tv = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    return tv._apply_image_or_video_transform(image, op, magnitude, interpolation=tv.interpolation, fill=tv._fill)


def policy_pairs() -> set[tuple[str, float]]:
    """Every (operation, signed magnitude) the ImageNet policy can produce."""
    pairs = set()
    for sub in IMAGENET_POLICY:
        for name, prob, bin_ in sub:
            if prob == 0.0:
                continue
            values, signed = _SPACE[name]
            m = 0.0 if values is None else float(values[bin_])
            pairs.add((name, m))
            if signed and m != 0.0:
                pairs.add((name, -m))
    return pairs


@pytest.mark.parametrize("device", DEVICES)
def test_every_operation_matches_torchvision_per_image(device):
    n = 2048
    x = images(n).to(device)
    aa = BatchedAutoAugment(torch.device(device))
    params = aa.draw(n, torch.Generator(device=device).manual_seed(1))
    out = aa.apply(x, params).cpu()
    seen: set[tuple[str, float]] = set()
    worst: dict[str, int] = {}
    for i in range(n):
        expected = x[i].cpu()
        ops = [params.operation(i, s) for s in range(2)]
        for op in ops:
            if op is not None:
                expected = reference(expected, *op)
                seen.add(op)
        diff = int((out[i].int() - expected.int()).abs().max())
        names = {op[0] for op in ops if op is not None}
        for name in names:
            worst[name] = max(worst.get(name, 0), diff)
        if names & GEOMETRIC:
            # Nearest-neighbour resampling can pick the neighbouring pixel where a coordinate lands on a
            # rounding boundary; everything else must be exact.
            assert (out[i] != expected).float().mean() < 0.02, (i, ops)
        else:
            assert diff == 0, (i, ops, diff)
    assert seen == policy_pairs(), policy_pairs() - seen  # every operation and magnitude was exercised


def test_images_of_one_batch_draw_different_sub_policies():
    x = images(1).expand(256, -1, -1, -1).contiguous()  # one image, 256 times
    aa = BatchedAutoAugment(torch.device("cpu"))
    params = aa.draw(256, torch.Generator().manual_seed(0))
    assert len(set(params.policy.tolist())) == len(IMAGENET_POLICY)  # all 25 sub-policies drawn
    out = aa.apply(x, params)
    assert len({tuple(o.flatten().tolist()) for o in out}) > 30  # the same input, many different results
    # and a second batch draws differently
    again = aa.draw(256, torch.Generator().manual_seed(1))
    assert not torch.equal(params.policy, again.policy)


@pytest.mark.parametrize("device", DEVICES)
def test_erasing_statistics_match_torchvision(device):
    n = 10_000
    x = torch.full((n, 3, 32, 32), 200, dtype=torch.uint8, device=device)
    erase = BatchedRandomErasing(0.5, (0.02, 0.33), (0.3, 3.3), torch.device(device))
    out = erase(x, torch.Generator(device=device).manual_seed(0)).cpu()
    zero = out[:, 0] == 0
    assert torch.equal(zero, out[:, 1] == 0) and torch.equal(zero, out[:, 2] == 0)  # all channels erased
    erased = zero.flatten(1).any(1)
    assert 0.48 < erased.float().mean() < 0.52  # p 0.5
    areas = []
    for m in zero[erased]:
        rows, cols = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
        h, w = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w and int(m.sum()) == h * w  # a box
        areas.append(h * w / 1024)
        # inside the scale bounds, up to rounding h and w to whole pixels (as torchvision rounds them)
        assert 0.02 * 1024 - 0.5 * (h + w) - 0.25 <= h * w <= 0.33 * 1024 + 0.5 * (h + w) + 0.25
    # the same distribution of box areas as torchvision's per-image RandomErasing
    torch.manual_seed(0)
    tv = v2.RandomErasing(p=1.0, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)
    tv_areas = [
        float((tv(torch.full((3, 32, 32), 200, dtype=torch.uint8))[0] == 0).float().mean()) for _ in range(3000)
    ]
    mean, tv_mean = sum(areas) / len(areas), sum(tv_areas) / len(tv_areas)
    assert abs(mean - tv_mean) < 0.01, (mean, tv_mean)
    assert abs(max(areas) - max(tv_areas)) < 0.03 and abs(min(areas) - min(tv_areas)) < 0.01


def test_erasing_box_equals_torchvision_erase():
    x = images(4)
    params = ErasingParams(
        erase=torch.tensor([True, False, True, True]),
        top=torch.tensor([0, 3, 10, 25]),
        left=torch.tensor([5, 0, 0, 28]),
        height=torch.tensor([7, 4, 22, 7]),
        width=torch.tensor([9, 4, 31, 4]),
    )
    out = BatchedRandomErasing.apply(x, params)
    for i in range(4):
        expected = (
            x[i]
            if not params.erase[i]
            else TF.erase(
                x[i],
                int(params.top[i]),
                int(params.left[i]),
                int(params.height[i]),
                int(params.width[i]),
                torch.zeros(3, 1, 1, dtype=torch.uint8),
            )
        )
        assert torch.equal(out[i], expected)


def test_device_data_applies_the_notebook_pipeline_in_order():
    data = Dataset(images(64), torch.arange(64) % 10)
    plain = DeviceData(data, torch.device("cpu"), False, AugmentSpec(crop=False, flip=False))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(plain._augment(plain.padded, gen), data.images)  # crop and flip off: the images
    full = DeviceData(
        data, torch.device("cpu"), False, AugmentSpec(autoaugment=True, random_erasing=True, erasing_p=1.0)
    )
    out = full._augment(full.padded, torch.Generator().manual_seed(0))
    assert out.shape == data.images.shape and out.dtype == torch.uint8
    assert ((out == 0).all(1).flatten(1).sum(1) > 0).all()  # erasing with p 1: every image has a box
    batches = list(full.train_batches(1, 0, 0, 1, 32))
    assert [tuple(x.shape) for x, _ in batches] == [(32, 3, 32, 32)] * 2 and batches[0][0].dtype == torch.float32


def test_policy_table_is_torchvisions():
    tv = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    assert [tuple(tuple(s) for s in sub) for sub in tv._policies] == IMAGENET_POLICY
    for name, (values, signed) in _SPACE.items():
        fn, tv_signed = tv._AUGMENTATION_SPACE[name]
        tv_values = fn(10, 32, 32)
        assert signed == tv_signed
        assert (values is None) == (tv_values is None)
        if values is not None:
            assert all(math.isclose(a, float(b)) for a, b in zip(values, tv_values, strict=True))


def test_autocontrast_equals_torchvisions_without_a_mask_assignment():
    x = images(16)
    x[0] = 77  # flat in every channel: torchvision's special case (max == min)
    x[1, 2] = 0
    x[2, :, :, :16] = 255
    assert torch.equal(apply_op(x, "AutoContrast", 0.0), TF.autocontrast(x))
