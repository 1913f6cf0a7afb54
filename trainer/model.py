"""The paper's network: a ResNet18-style CIFAR-10 model with Squeeze-and-Excitation and Mish.

Knows nothing about training, devices or parallelism. At the default ModelSpec it has exactly 4,570,934
trainable parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.spec import ModelSpec


def _activation(name: str) -> nn.Module:
    return nn.Mish(inplace=False) if name == "mish" else nn.ReLU(inplace=True)


class SqueezeExcite(nn.Module):
    """Channel attention: global avg pool → 1x1 conv to c/r → act → 1x1 conv to c → sigmoid → scale."""

    def __init__(self, channels: int, reduction: int, activation: str):
        super().__init__()
        hidden = channels // reduction
        self.squeeze = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = _activation(activation)
        self.excite = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = torch.sigmoid(self.excite(self.act(self.squeeze(scale))))
        return x * scale


class BasicBlock(nn.Module):
    """conv3x3 → BN → act → conv3x3 → BN → SE, plus the shortcut, then act."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, spec: ModelSpec):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = _activation(spec.activation)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, spec.se_reduction, spec.activation) if spec.se else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.act2 = _activation(spec.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        first = spec.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, first, 3, padding=1, bias=False), nn.BatchNorm2d(first), _activation(spec.activation)
        )
        stages, in_ch = [], first
        for i, (width, n) in enumerate(zip(spec.widths, spec.blocks, strict=True)):
            stride = 1 if i == 0 else 2  # stage 1 keeps 32x32; each later stage halves the resolution
            for j in range(n):
                stages.append(BasicBlock(in_ch, width, stride if j == 0 else 1, spec))
                in_ch = width
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(in_ch, spec.num_classes)
        if spec.zero_init_residual:
            for block in self.stages:
                nn.init.zeros_(block.bn2.weight)  # the residual branch adds 0 until training moves it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(self.dropout(x))


def build_model(spec: ModelSpec) -> ResNet:
    return ResNet(spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
