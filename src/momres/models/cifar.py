"""CIFAR ResNets (He et al. 2016, section 4.2): ``resnet20/32/44/56/110``, ``mresnet*``.

A 3x3 convolution to 16 channels, three stages of ``n`` torchvision ``BasicBlock``s at widths
16, 32 and 64 (the first block of the last two halves the resolution), global average pooling
and a linear layer: ``6n + 2`` layers.  Shortcuts that change the shape are option A of the
paper: subsample and pad the new channels with zeros, no parameters (0.27M parameters for
ResNet-20, as in the paper).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, conv3x3

from ._registry import register_pair

DEPTHS = (20, 32, 44, 56, 110)


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel, append ``extra`` zero channels."""

    def __init__(self, stride: int, extra: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))


class CifarResNet(nn.Module):
    """ResNet-``depth`` for small images; modules named as in torchvision's ``ResNet``."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"momres: a CIFAR ResNet has 6n+2 layers (20, 32, ...), got {depth}.")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(16, 16, n, stride=1)
        self.layer2 = _stage(16, 32, n, stride=2)
        self.layer3 = _stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(width_in: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    shortcut = None
    if stride != 1 or width_in != width:
        shortcut = PadShortcut(stride, width - width_in)
    first = BasicBlock(width_in, width, stride, downsample=shortcut)
    return nn.Sequential(first, *(BasicBlock(width, width) for _ in range(blocks - 1)))


for _depth in DEPTHS:
    register_pair(f"resnet{_depth}", functools.partial(CifarResNet, _depth))
