"""AutoAugment (ImageNet policy) and RandomErasing, batched on the training device, per image.

The notebook ran torchvision's per-sample pipeline: each image draws its own sub-policy, its own coin flips
and magnitude signs, and its own erasing box. Here every image of a batch draws the same things at once
(tensors of shape N), and the work runs grouped: images that drew the same operation with the same
magnitude go through torchvision's batched tensor kernel for it in one call. The ImageNet policy has about
thirty distinct (operation, magnitude) pairs, so a batch costs at most that many kernel calls per slot —
never a Python loop over images. Grouping never makes the training loop wait for the device: the sizes of
every batch's groups are read by the host once per epoch (`BatchedAutoAugment.plan`). Erasing is fully
vectorised (a box mask per image).

Inputs and outputs are uint8 N×3×H×W; both run before normalisation, as in the notebook (RandomErasing
with value 0 after ToTensor is a black box, i.e. 0 in uint8).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torchvision.transforms.v2 import functional as TF

# torchvision's AutoAugmentPolicy.IMAGENET: 25 sub-policies of two (operation, probability, magnitude bin).
IMAGENET_POLICY: list[tuple[tuple[str, float, int | None], tuple[str, float, int | None]]] = [
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
]

NUM_BINS = 10
# (magnitude of bin k for k in 0..9, signed?) — torchvision's AutoAugment._AUGMENTATION_SPACE at 32×32.
_SPACE: dict[str, tuple[list[float] | None, bool]] = {
    "ShearX": (torch.linspace(0.0, 0.3, NUM_BINS).tolist(), True),
    "Rotate": (torch.linspace(0.0, 30.0, NUM_BINS).tolist(), True),
    "Color": (torch.linspace(0.0, 0.9, NUM_BINS).tolist(), True),
    "Contrast": (torch.linspace(0.0, 0.9, NUM_BINS).tolist(), True),
    "Sharpness": (torch.linspace(0.0, 0.9, NUM_BINS).tolist(), True),
    "Posterize": ((8 - (torch.arange(NUM_BINS) / ((NUM_BINS - 1) / 4))).round().int().float().tolist(), False),
    "Solarize": (torch.linspace(1.0, 0.0, NUM_BINS).tolist(), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
    "Invert": (None, False),
}
OPS = sorted(_SPACE)  # operation id = index here


def apply_op(images: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One AutoAugment operation on a uint8 batch, exactly as torchvision's AutoAugment applies it to a
    tensor image (nearest interpolation, fill 0) — the reference the tests compare against."""
    if op == "ShearX":
        return TF.affine(
            images,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=[math.degrees(math.atan(magnitude)), 0.0],
            interpolation=TF.InterpolationMode.NEAREST,
            fill=None,
            center=[0, 0],
        )
    if op == "Rotate":
        return TF.rotate(images, angle=magnitude, interpolation=TF.InterpolationMode.NEAREST, fill=None)
    if op == "Color":
        return TF.adjust_saturation(images, saturation_factor=1.0 + magnitude)
    if op == "Contrast":
        return TF.adjust_contrast(images, contrast_factor=1.0 + magnitude)
    if op == "Sharpness":
        return TF.adjust_sharpness(images, sharpness_factor=1.0 + magnitude)
    if op == "Posterize":
        return TF.posterize(images, bits=int(magnitude))
    if op == "Solarize":
        return TF.solarize(images, threshold=255.0 * magnitude)
    if op == "AutoContrast":
        return _autocontrast(images)
    if op == "Equalize":
        return TF.equalize(images)
    if op == "Invert":
        return TF.invert(images)
    raise ValueError(f"unknown AutoAugment operation {op!r}")


def _autocontrast(images: torch.Tensor) -> torch.Tensor:
    """torchvision's autocontrast_image for uint8, step for step, with torch.where where it assigns through a
    boolean mask (`minimum[eq] = 0`): a mask assignment is a nonzero, i.e. a device-to-host sync per call."""
    bound = 255.0
    x = images.to(torch.float32)
    minimum = x.amin(dim=(-2, -1), keepdim=True)
    maximum = x.amax(dim=(-2, -1), keepdim=True)
    flat = maximum == minimum
    inv_scale = torch.where(flat, 1.0, maximum.sub(minimum).mul_(1.0 / bound))
    minimum = torch.where(flat, 0.0, minimum)
    return x.sub_(minimum).div_(inv_scale).clamp_(0, bound).to(images.dtype)


class AutoAugmentParams:
    """What each image of a batch drew: sub-policy, and per slot whether it applies and the magnitude's sign."""

    def __init__(self, policy: torch.Tensor, applied: torch.Tensor, negative: torch.Tensor):
        self.policy = policy  # int64 N: sub-policy index
        self.applied = applied  # bool N×2: slot s of the sub-policy runs on this image
        self.negative = negative  # bool N×2: signed magnitudes are negated

    def operation(self, i: int, slot: int) -> tuple[str, float] | None:
        """(operation, signed magnitude) image i gets in `slot`, or None when the slot was skipped."""
        if not bool(self.applied[i, slot]):
            return None
        name, _, bin_ = IMAGENET_POLICY[int(self.policy[i])][slot]
        values, signed = _SPACE[name]
        magnitude = 0.0 if values is None or bin_ is None else float(values[bin_])
        if signed and bool(self.negative[i, slot]):
            magnitude = -magnitude
        return name, magnitude


class BatchedAutoAugment:
    """AutoAugment with torchvision's ImageNet policy, drawn per image, applied grouped by (op, magnitude)."""

    def __init__(self, device: torch.device):
        rows = [[_slot_code(p[s]) for s in range(2)] for p in IMAGENET_POLICY]
        self.op_id = torch.tensor([[r[s][0] for s in range(2)] for r in rows], device=device)  # 25×2
        self.prob = torch.tensor([[r[s][1] for s in range(2)] for r in rows], device=device)  # 25×2
        self.bin = torch.tensor([[r[s][2] for s in range(2)] for r in rows], device=device)  # 25×2 (-1: none)
        self.signed = torch.tensor([_SPACE[name][1] for name in OPS], device=device)  # per op
        self.device = device

    def draw(self, n: int, gen: torch.Generator) -> AutoAugmentParams:
        policy = torch.randint(0, len(IMAGENET_POLICY), (n,), device=self.device, generator=gen)
        coins = torch.rand(n, 2, device=self.device, generator=gen)
        signs = torch.rand(n, 2, device=self.device, generator=gen)
        # torchvision skips a slot unless rand <= p, and negates a signed magnitude when rand <= 0.5.
        return AutoAugmentParams(policy, coins <= self.prob[policy], signs <= 0.5)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape[0], gen))

    def apply(self, images: torch.Tensor, params: AutoAugmentParams) -> torch.Tensor:
        """Apply what `params` drew for each image (one batch; one device read, to group it)."""
        return self.apply_planned(images, self.plan(params, images.shape[0]), 0)

    def keys(self, params: AutoAugmentParams) -> torch.Tensor:
        """N×2 int64: per image and slot one integer for its (op, bin, sign), -1 where the slot is skipped."""
        columns = []
        for slot in range(2):
            op = self.op_id[params.policy, slot]
            bin_ = self.bin[params.policy, slot]
            negative = params.negative[:, slot] & self.signed[op]  # the sign of an unsigned op is moot
            key = (op * (NUM_BINS + 1) + (bin_ + 1)) * 2 + negative.long()
            columns.append(torch.where(params.applied[:, slot], key, -1))
        return torch.stack(columns, 1)

    def plan(self, params: AutoAugmentParams, batch: int) -> AutoAugmentPlan:
        """The groups of every batch of `batch` consecutive images of `params` (an epoch's draws): within each
        batch and slot the images sorted by key on the device, and each key's count read by the host — in
        one read for all the batches, so the training loop never waits for the device (the host needs the
        group sizes to slice the groups; data-dependent shapes any other way, `nonzero` or `unique`, are a
        device-to-host sync per batch)."""
        keys = self.keys(params)
        n = keys.shape[0]
        steps = max(1, math.ceil(n / batch))
        padded = torch.cat([keys, keys.new_full((steps * batch - n, 2), -1)]).view(steps, batch, 2)
        order = padded.argsort(dim=1, stable=True)  # skipped (-1) and padding first, then by key
        counts = torch.zeros(steps, 2, KEYS + 1, dtype=torch.int64, device=keys.device)
        counts.scatter_add_(2, (padded + 1).transpose(1, 2), torch.ones_like(padded).transpose(1, 2))
        return AutoAugmentPlan(order, counts.tolist())

    def apply_planned(self, images: torch.Tensor, plan: AutoAugmentPlan, step: int) -> torch.Tensor:
        """Batch `step` of `plan` on `images`: each group through torchvision's batched kernel, no device read."""
        out = images
        for slot in range(2):
            groups = list(plan.groups(step, slot))
            if not groups:
                continue
            out = out.clone() if out is images else out
            for k, idx in groups:
                name, magnitude = decode_key(k)
                out[idx] = apply_op(out[idx], name, magnitude)
        return out


KEYS = len(OPS) * (NUM_BINS + 1) * 2  # distinct (op, bin + 1, sign) codes


def decode_key(k: int) -> tuple[str, float]:
    """(operation, signed magnitude) of a key of `BatchedAutoAugment.keys`."""
    op_i, rest = divmod(k // 2, NUM_BINS + 1)
    name = OPS[op_i]
    values, signed = _SPACE[name]
    magnitude = 0.0 if values is None or rest == 0 else float(values[rest - 1])
    return name, -magnitude if signed and k % 2 else magnitude


class AutoAugmentPlan:
    """Per batch and slot: the batch's positions sorted by key (on the device) and each key's count (on the
    host, `counts[step][slot][key + 1]`; index 0 counts the skipped images and the last batch's padding)."""

    def __init__(self, order: torch.Tensor, counts: list[list[list[int]]]):
        self.order = order  # steps×batch×2
        self.counts = counts

    def groups(self, step: int, slot: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(key, positions in the batch) for each key drawn in this batch and slot."""
        sizes = self.counts[step][slot]
        offset = sizes[0]
        for k, count in enumerate(sizes[1:]):
            if count:
                yield k, self.order[step, offset : offset + count, slot]
                offset += count


def _slot_code(slot: tuple[str, float, int | None]) -> tuple[int, float, int]:
    name, prob, bin_ = slot
    return OPS.index(name), prob, -1 if bin_ is None else bin_


class ErasingParams:
    def __init__(
        self, erase: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor, width: torch.Tensor
    ):
        self.erase, self.top, self.left, self.height, self.width = erase, top, left, height, width


class BatchedRandomErasing:
    """torchvision's RandomErasing(p, scale, ratio, value=0) with one box per image, vectorised: each image
    tries up to 10 (area, log-ratio) draws and keeps the first box that fits, as torchvision does; an image
    none of whose draws fits is left unerased."""

    ATTEMPTS = 10

    def __init__(self, p: float, scale: tuple[float, float], ratio: tuple[float, float], device: torch.device):
        self.p, self.scale, self.device = p, scale, device
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def draw(self, n: int, height: int, width: int, gen: torch.Generator) -> ErasingParams:
        d, a = self.device, self.ATTEMPTS
        erase = torch.rand(n, device=d, generator=gen) < self.p
        area = (
            height
            * width
            * (
                self.scale[0]
                + (self.scale[1] - self.scale[0]) * torch.rand(n, a, device=d, generator=gen, dtype=torch.float64)
            )
        )
        log_r = self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * torch.rand(
            n, a, device=d, generator=gen, dtype=torch.float64
        )
        aspect = torch.exp(log_r)
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        fits = (h < height) & (w < width)
        first = torch.where(fits, torch.arange(a, device=d).expand(n, a), a).amin(1)  # a: none fits
        erase = erase & (first < a)
        pick = first.clamp(max=a - 1)[:, None]
        h, w = h.gather(1, pick).squeeze(1), w.gather(1, pick).squeeze(1)
        h, w = torch.where(erase, h, 0), torch.where(erase, w, 0)
        u = torch.rand(n, 2, device=d, generator=gen, dtype=torch.float64)
        top = (u[:, 0] * (height - h + 1)).long().clamp(max=height)
        left = (u[:, 1] * (width - w + 1)).long().clamp(max=width)
        return ErasingParams(erase, top, left, h, w)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        return self.apply(images, self.draw(n, height, width, gen))

    @staticmethod
    def apply(images: torch.Tensor, params: ErasingParams) -> torch.Tensor:
        height, width = images.shape[-2:]
        rows = torch.arange(height, device=images.device)[None, :]
        cols = torch.arange(width, device=images.device)[None, :]
        in_rows = (rows >= params.top[:, None]) & (rows < (params.top + params.height)[:, None])  # N×H
        in_cols = (cols >= params.left[:, None]) & (cols < (params.left + params.width)[:, None])  # N×W
        box = (in_rows[:, :, None] & in_cols[:, None, :] & params.erase[:, None, None])[:, None]  # N×1×H×W
        return images.masked_fill(box, 0)
