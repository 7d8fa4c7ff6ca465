"""Reference stages: the same conv blocks trained by every system momres is compared with.

``conv_stage(system, depth)`` builds a stage of ``depth`` residual branches
``conv3x3-BN-ReLU-conv3x3-BN`` (32 channels by default), from the same seed, as one of
``SYSTEMS``:

* ``resnet``: a plain ResNet (``x <- x + f(x)``, the momentum rule at ``gamma = 0``);
* ``plain``: the momentum rule under plain autograd (stores every activation);
* ``checkpoint``: the same under ``torch.utils.checkpoint`` over about sqrt(depth) segments;
* ``momres-exact`` and ``momres-float``: memory-free momentum stages;
* ``revnet`` / ``revnet-plain``: additive couplings of half-width branches, memory-free or not;
* ``momentumnet`` / ``momentumnet-plain``: the official package (optional,
  ``pip install 'momres[bench]'``), memory-free or not.

The benchmarks, the memory experiment and the tests all measure these, so that their figures
describe the same networks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._replay import checkpointed
from .momentum import MomentumNet, momentum_rule
from .reversible import ReversibleStage

GAMMA = 0.9
SYSTEMS = ("resnet", "plain", "checkpoint", "momres-exact", "momres-float", "revnet",
           "revnet-plain", "momentumnet", "momentumnet-plain")


def conv_block(channels: int = 32) -> nn.Module:
    """The residual branch of the stage benchmarks: conv3x3-BN-ReLU-conv3x3-BN."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
    )


class CheckpointStage(nn.Module):
    """The momentum rule under plain autograd, checkpointed over about sqrt(depth) segments."""

    def __init__(self, blocks: list[nn.Module], gamma: float = GAMMA) -> None:
        super().__init__()
        size = math.ceil(len(blocks) / max(1, round(math.sqrt(len(blocks)))))
        self.segments = nn.ModuleList(
            MomentumNet(blocks[i : i + size], gamma, memory_efficient=False)
            for i in range(0, len(blocks), size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x)
        for segment in self.segments:
            x, v = checkpointed(momentum_rule, segment, list(segment.functions), segment.gamma,
                                x, v)
        return x


def _momentumnet_stage(blocks: list[nn.Module], memory_efficient: bool) -> nn.Module:
    import momentumnet  # optional: the official package, `pip install momres[bench]`

    return momentumnet.MomentumNet(blocks, GAMMA, use_backprop=not memory_efficient)


def conv_stage(system: str, depth: int, channels: int = 32) -> nn.Module:
    """A stage of ``depth`` conv blocks as ``system`` runs it (same seed: same weights)."""
    if system not in SYSTEMS:
        raise ValueError(f"momres: unknown system {system!r}; choose one of {', '.join(SYSTEMS)}.")
    torch.manual_seed(0)
    if system.startswith("revnet"):  # couplings of two half-width branches
        half = channels // 2
        return ReversibleStage([conv_block(half) for _ in range(depth)],
                               [conv_block(half) for _ in range(depth)],
                               memory_efficient=system == "revnet")
    blocks = [conv_block(channels) for _ in range(depth)]
    if system.startswith("momentumnet"):
        return _momentumnet_stage(blocks, memory_efficient=system == "momentumnet")
    if system == "checkpoint":
        return CheckpointStage(blocks)
    if system == "resnet":
        return MomentumNet(blocks, 0.0, memory_efficient=False)
    options = {"plain": {"memory_efficient": False}, "momres-exact": {},
               "momres-float": {"exact": False}}[system]
    return MomentumNet(blocks, GAMMA, **options)
