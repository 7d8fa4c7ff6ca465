"""RevNets (Gomez et al. 2017): the CIFAR baselines ``revnet38`` and ``revnet110``.

Groups of reversible units (``momres.ReversibleStage``, additive coupling, memory-free) after a
shape-changing ``Downsample`` unit: the baseline that Momentum ResNets are compared with.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.resnet import conv3x3

from ..reversible import ReversibleStage, halves
from ._registry import register_model
from .cifar import PadShortcut


def _branch(width_in: int, width: int, stride: int = 1) -> nn.Sequential:
    """A pre-activation residual function: BN-ReLU-conv3x3-BN-ReLU-conv3x3."""
    return nn.Sequential(
        nn.BatchNorm2d(width_in), nn.ReLU(), conv3x3(width_in, width, stride),
        nn.BatchNorm2d(width), nn.ReLU(), conv3x3(width, width),
    )


class Downsample(nn.Module):
    """The first unit of a RevNet group that changes the shape: a coupling whose ``F`` is
    strided and whose skips are option-A shortcuts.  Not invertible: autograd stores it."""

    def __init__(self, width_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.f = _branch(width_in // 2, width // 2, stride)
        self.g = _branch(width // 2, width // 2)
        self.shortcut = PadShortcut(stride, (width - width_in) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = halves(x)
        y1 = self.shortcut(x1) + self.f(x2)
        y2 = self.shortcut(x2) + self.g(y1)
        return torch.cat([y1, y2], dim=1)


class RevNet(nn.Module):
    """A CIFAR RevNet: 3x3 convolution, groups of reversible units, BN-ReLU-pool-linear head.

    Group ``k`` has ``units[k]`` units at ``widths[k]`` channels (split into two halves); the
    first unit of a group that changes the shape is a ``Downsample``, the others one
    ``ReversibleStage``.  Each unit has four 3x3 convolutions: ``4 * sum(units) + 2`` layers.
    """

    def __init__(
        self,
        units: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        memory_efficient: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, widths[0])
        width_in = widths[0]
        for k, (count, width) in enumerate(zip(units, widths, strict=True), 1):
            stride = 1 if k == 1 else 2
            group = []
            if stride != 1 or width != width_in:
                group.append(Downsample(width_in, width, stride))
            couplings = count - len(group)
            group.append(ReversibleStage(
                [_branch(width // 2, width // 2) for _ in range(couplings)],
                [_branch(width // 2, width // 2) for _ in range(couplings)],
                memory_efficient=memory_efficient,
            ))
            self.add_module(f"layer{k}", nn.Sequential(*group))
            width_in = width
        self.head = nn.Sequential(
            nn.BatchNorm2d(width_in), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(width_in, num_classes),
        )
        self.groups = len(units)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for k in range(1, self.groups + 1):
            x = getattr(self, f"layer{k}")(x)
        return self.head(x)


def revnet(
    units: Sequence[int],
    widths: Sequence[int],
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    memory_efficient: bool = True,
) -> RevNet:
    """A CIFAR RevNet (the coupling is inverted in floating point: no momentum options)."""
    return RevNet(units, widths, num_classes, in_channels, memory_efficient)


# Gomez et al. 2017, table 1: units per group and channels per group.
register_model("revnet38", functools.partial(revnet, (3, 3, 3), (32, 64, 112)))
register_model("revnet110", functools.partial(revnet, (9, 9, 9), (32, 64, 128)))
