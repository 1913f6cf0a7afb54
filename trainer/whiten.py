"""Patch-whitening initialisation of the stem convolution, for `model.whiten_stem`.

The fastest CIFAR-10 training (Keller Jordan's airbench, after tysam-code's hlb-CIFAR10) starts its first
convolution as a whitening of the images' patches: each filter is a principal direction of the training
images' k×k patches, scaled by 1/sqrt(its variance), once as itself and once negated (so an activation after
it passes both signs). The first layer then sees decorrelated inputs of equal variance from the first step,
instead of learning to from random filters. Here the network is fixed (the paper's stem: a 3×3 convolution
into `widths[0]` channels, BatchNorm, the activation), so the stem keeps its shape: 3×3×3 = 27-dimensional
patches, and the 16 directions of most variance (with their negatives) fill its 32 filters. Initialisation
only: the same parameters, still trained.

Knows nothing of Ray or DDP: `trainer/step.py` calls `whiten_stem` before the model is wrapped, on images
every rank holds alike (DDP broadcasts rank 0's weights anyway).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.data import CIFAR10_MEAN, CIFAR10_STD

# Images the patch covariance is estimated from: 2,000 × 30 × 30 = 1.8 M patches, read in chunks.
IMAGES = 2000
_CHUNK = 250
EPS = 5e-4  # airbench's: keeps the near-zero-variance directions from blowing up


def normalised(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×3×H×W → float, as the network sees its inputs (trainer/data.py DeviceData)."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def patch_covariance(images: torch.Tensor, kernel: int) -> torch.Tensor:
    """The (uncentred) covariance of every kernel×kernel patch of `images` (uint8 N×C×H×W), in float64:
    (C·k·k)², indexed as a convolution weight is flattened (channel, row, column)."""
    dims = images.shape[1] * kernel * kernel
    total = torch.zeros(dims, dims, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), _CHUNK):
        x = normalised(images[start : start + _CHUNK])
        patches = x.unfold(2, kernel, 1).unfold(3, kernel, 1)  # N, C, H', W', k, k
        flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, dims).double()
        total += flat.T @ flat
        count += len(flat)
    return total / count


def whitening_filters(images: torch.Tensor, out_channels: int, kernel: int) -> torch.Tensor:
    """Filters out_channels×C×k×k: the min(out_channels // 2, C·k·k) principal directions of the patches,
    most variance first, each scaled by 1/sqrt(variance + EPS), then the same negated. With an odd count, or
    more channels than twice the patch dimension, the rest are zeros for the caller to leave alone."""
    channels = images.shape[1]
    eigenvalues, eigenvectors = torch.linalg.eigh(patch_covariance(images, kernel))  # ascending
    pairs = min(out_channels // 2, len(eigenvalues))
    top = eigenvectors[:, -pairs:].flip(1).T  # pairs × dims, most variance first
    scaled = top / torch.sqrt(eigenvalues[-pairs:].flip(0) + EPS)[:, None]
    filters = torch.zeros(out_channels, channels * kernel * kernel, dtype=torch.float64)
    filters[: 2 * pairs] = torch.cat([scaled, -scaled])
    return filters.view(out_channels, channels, kernel, kernel).float()


@torch.no_grad()
def whiten_stem(model: nn.Module, images: torch.Tensor) -> None:
    """Set the stem convolution's filters (`model.stem[0]`) from `images` (uint8 N×3×H×W, at most IMAGES
    are read); the filters whitening cannot fill keep their initialisation."""
    conv = model.stem[0]
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size[0] != conv.kernel_size[1]:
        raise TypeError(f"model.whiten_stem needs a square Conv2d first in model.stem, not {conv!r}")
    filters = whitening_filters(images[:IMAGES].cpu(), conv.out_channels, conv.kernel_size[0])
    filled = min(conv.out_channels // 2, filters[0].numel()) * 2
    conv.weight[:filled] = filters[:filled].to(conv.weight.device, conv.weight.dtype)
