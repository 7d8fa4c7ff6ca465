"""RevNets (Gomez et al. 2017): additive coupling, trained without storing activations.

    y1 = x1 + F_n(x2),   y2 = x2 + G_n(y1)       inverse:   x2 = y2 - G_n(y1),   x1 = y1 - F_n(x2)

``ReversibleStage`` is the memory-free stage, the baseline that Momentum ResNets are compared
with; ``revnet38`` and ``revnet110`` are the paper's CIFAR networks.  The backward pass walks
the stage from the top like ``momres``' momentum stages (``_backprop``): per coupling it
evaluates ``G_n`` then ``F_n`` once each with grad enabled, and uses each evaluation both to
rebuild the input and for its vector-Jacobian product.  The inverse is computed in floating
point; additive coupling does not amplify rounding errors the way dividing by ``gamma`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torchvision.models.resnet import conv3x3

from .._backprop import Recorder, Replayer, Stage, build_stage, evaluate
from ._registry import register_model
from .cifar import PadShortcut


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] % 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"momres: a reversible stage splits x in two halves along dim 1, which needs an even "
            f"size there; got x of shape {shape}."
        )
    x1, x2 = x.chunk(2, dim=1)
    return x1, x2


def _couple(x: torch.Tensor, step: Callable[[int, torch.Tensor], torch.Tensor], depth: int):
    """The forward rule over ``depth`` couplings; ``step(n, z)`` is block ``n`` (F0 G0 F1 ...)."""
    x1, x2 = _halves(x)
    for n in range(0, 2 * depth, 2):
        x1 = x1 + step(n, x2)
        x2 = x2 + step(n + 1, x1)
    return torch.cat([x1, x2], dim=1)


class ReversibleStage(nn.Module):
    """A stage of additive couplings ``(F_n, G_n)``, memory-free by default.

    Args:
        f_blocks, g_blocks: the modules ``F_n`` and ``G_n``, each mapping one half of ``x``
            to a tensor of its shape.  The same module may appear several times (weights
            shared across couplings, as in unrolled algorithms: ``[F] * T, [G] * T``).
        memory_efficient: rebuild activations in the backward pass instead of storing them.
            ``False`` is plain autograd through the same rule.

    ``stage(x, *args, **kwargs)`` splits ``x`` in two halves along dim 1, passes ``args`` and
    ``kwargs`` to every block and returns the concatenated halves.
    """

    def __init__(
        self,
        f_blocks: Iterable[nn.Module],
        g_blocks: Iterable[nn.Module],
        *,
        memory_efficient: bool = True,
    ) -> None:
        super().__init__()
        f_blocks, g_blocks = list(f_blocks), list(g_blocks)
        if not f_blocks or len(f_blocks) != len(g_blocks):
            raise ValueError(
                f"momres: a reversible stage needs as many F blocks as G blocks, at least one; "
                f"got {len(f_blocks)} and {len(g_blocks)}."
            )
        for n, block in enumerate(f_blocks + g_blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"momres: block {n} is a {type(block).__name__}, not an nn.Module.")
        self.f_blocks = nn.ModuleList(f_blocks)
        self.g_blocks = nn.ModuleList(g_blocks)
        self.memory_efficient = memory_efficient

    def extra_repr(self) -> str:
        return f"couplings={len(self.f_blocks)}, memory_efficient={self.memory_efficient}"

    def _blocks(self) -> list[nn.Module]:
        """F0, G0, F1, G1, ...: the order in which the forward rule calls them."""
        return [b for pair in zip(self.f_blocks, self.g_blocks, strict=True) for b in pair]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        blocks = self._blocks()
        if self.memory_efficient and torch.is_grad_enabled():
            _halves(x)
            stage, params, tensors = build_stage(blocks, True, args, kwargs)
            if x.requires_grad or params or any(t.requires_grad for t in tensors):
                return ReversibleFunction.apply(stage, x, *params, *tensors)
        step = lambda n, z: evaluate(n, blocks[n], z, args, kwargs, True)
        return _couple(x, step, len(self.f_blocks))

    def inverse(self, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x`` from ``y = stage(x)``, in floating point."""
        y1, y2 = _halves(y)
        for f, g in zip(reversed(self.f_blocks), reversed(self.g_blocks), strict=True):
            y2 = y2 - g(y1, *args, **kwargs)
            y1 = y1 - f(y2, *args, **kwargs)
        return torch.cat([y1, y2], dim=1)


class ReversibleFunction(torch.autograd.Function):
    """Forward: the couplings without a graph.  Backward: rebuild and backpropagate."""

    @staticmethod
    def forward(ctx, stage: Stage, x: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        run = Recorder(ctx, stage, inputs[stage.n_params :], x.device)
        y = _couple(x, run, len(stage.functions) // 2)
        run.save(ctx, [y])
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        replay = Replayer(ctx, 2, "ReversibleStage(..., memory_efficient=False)")
        # a1, a2: dL/dy1, dL/dy2 of the coupling being undone.
        y1, y2 = _halves(replay.state[0].detach())
        a1, a2 = _halves(grad_y)
        for n in reversed(range(0, len(replay.stage.functions), 2)):
            g, vjp = replay.pull(n + 1, y1, a2)  # y2 = x2 + G(y1)
            x2 = y2 - g
            if vjp is not None:
                a1 = a1 + vjp
            f, vjp = replay.pull(n, x2, a1)  # y1 = x1 + F(x2)
            y1, y2 = y1 - f, x2
            if vjp is not None:
                a2 = a2 + vjp
        return (None, torch.cat([a1, a2], dim=1), *replay.input_grads())


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
        x1, x2 = _halves(x)
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
    gamma: float = 0.9,
    exact: bool = True,
    checkpoint: bool = False,
) -> RevNet:
    """A CIFAR RevNet; ``gamma``, ``exact`` and ``checkpoint`` are accepted for the registry
    and ignored."""
    del gamma, exact, checkpoint  # no momentum; the coupling is inverted in floating point
    return RevNet(units, widths, num_classes, in_channels, memory_efficient)


# Gomez et al. 2017, table 1: units per group and channels per group.
register_model("revnet38", functools.partial(revnet, (3, 3, 3), (32, 64, 112)))
register_model("revnet110", functools.partial(revnet, (9, 9, 9), (32, 64, 128)))
