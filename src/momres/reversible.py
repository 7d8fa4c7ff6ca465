"""Reversible stages: additive coupling (RevNet, Gomez et al. 2017), trained memory-free.

    y1 = x1 + F_n(x2),   y2 = x2 + G_n(y1)       inverse:   x2 = y2 - G_n(y1),   x1 = y1 - F_n(x2)

``ReversibleStage`` is a building block like ``MomentumNet``: a stage of couplings whose
backward pass rebuilds activations instead of storing them.  It walks the stage from the top
on the same recompute machinery as the momentum stages (``_recompute``): per coupling it
evaluates ``G_n`` then ``F_n`` once each with grad enabled, and uses each evaluation both to
rebuild the input and for its vector-Jacobian product.  The inverse is computed in floating
point; additive coupling does not amplify rounding errors the way dividing by ``gamma`` does.
It is volume preserving, so (unlike a momentum stage) it cannot contract: the paper's
learning-to-optimize experiment shows what that costs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ._recompute import Recorder, Replayer, Stage, build_stage, evaluate

__all__ = ["ReversibleStage", "halves"]


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of ``x`` along dim 1, which must have an even size."""
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
    x1, x2 = halves(x)
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
        if self.memory_efficient and torch.is_grad_enabled():
            return self._memory_free(x, args, kwargs)
        return self._plain(x, args, kwargs)

    def _plain(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        blocks = self._blocks()
        step = lambda n, z: evaluate(n, blocks[n], z, args, kwargs, True)
        return _couple(x, step, len(self.f_blocks))

    @torch.compiler.disable  # a graph break under torch.compile, as for MomentumNet
    def _memory_free(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        halves(x)
        stage, params, tensors = build_stage(self._blocks(), True, args, kwargs)
        if not (x.requires_grad or params or any(t.requires_grad for t in tensors)):
            return self._plain(x, args, kwargs)
        return ReversibleFunction.apply(stage, x, *params, *tensors)

    def inverse(self, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x`` from ``y = stage(x)``, in floating point."""
        y1, y2 = halves(y)
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
        y1, y2 = halves(replay.state[0].detach())
        a1, a2 = halves(grad_y)
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
