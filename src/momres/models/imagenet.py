"""ImageNet ResNets from torchvision: ``resnet18/34/50/101/152`` and ``mresnet*``.

The plain models are torchvision's (``weights=None``: nothing is downloaded), so their state
dicts are torchvision's; the momentum twins keep the same parameter names.  ``stem="cifar"``
replaces the 7x7 stride-2 convolution and the max-pool by a 3x3 stride-1 convolution, for small
images (the paper's CIFAR experiments); ``in_channels`` changes the first convolution too.
Either change makes ``conv1.weight`` differ in shape from torchvision's.
"""

from __future__ import annotations

import functools

import torchvision
from torch import nn
from torchvision.models import ResNet

from ._registry import register_pair

DEPTHS = (18, 34, 50, 101, 152)
STEMS = ("imagenet", "cifar")


def imagenet_resnet(
    depth: int, *, num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet"
) -> ResNet:
    """torchvision's ResNet-``depth``, randomly initialised, with the stem asked for."""
    if stem not in STEMS:
        raise ValueError(f"momres: stem must be one of {STEMS}, got {stem!r}.")
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        return model
    # torchvision's initialisation, for the new first convolution
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


for _depth in DEPTHS:
    register_pair(f"resnet{_depth}", functools.partial(imagenet_resnet, _depth))
