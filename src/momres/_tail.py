"""Blocks that end in ``relu(branch(x) + x)``: the rule's pass takes over those two operations.

torchvision's ``BasicBlock`` and ``Bottleneck`` without a downsample compute ``y = relu(r + x)``
with ``r`` their branch.  Under the momentum rule, ``g = y - x`` then costs, beside the rule's own
pass, the block's add and ReLU forward, ReLU's mask and the sum of the skip's gradient with the
branch's backward, and one stored tensor (ReLU's output).  ``RuleStep(tail=True)`` takes ``r``
instead and does the add and the ReLU in its own pass; its backward hands the branch ``dL/dr``
and ``x`` its whole gradient.  The memory-free stages do the same (``Stage.tails``): their
forward advances the state from ``r`` and their backward rebuilds it from the recomputed ``r``,
handing the branch's vector-Jacobian product the cotangent ReLU would have, in the same pass.
The function computed is the block's, operation for operation, and so are the gradients, bit
for bit.

The block is then run in two parts, its submodules called directly; so only where that cannot
differ from calling it: exactly torchvision's ``forward`` and ``Module.__call__`` (a subclass
that keeps both too), no downsample, no arguments, and no hooks on the block or its ReLU (which
``forward`` calls twice and the branch once) nor global module hooks, which would see one call
fewer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as _module

#: A block's branch: ``branch(block, x)`` is its ``r`` at ``x``.
Branch = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def joined(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``r + x`` as the block's ``out += identity`` rounds it: in the branch's type."""
    return torch.add(r, x).to(r.dtype)


def output(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The block's output ``relu(r + x)`` from its branch ``r`` (a new tensor)."""
    return joined(r, x).relu_()


def _basic(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return f.bn2(f.conv2(f.relu(f.bn1(f.conv1(x)))))


def _bottleneck(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = f.relu(f.bn2(f.conv2(f.relu(f.bn1(f.conv1(x))))))
    return f.bn3(f.conv3(out))


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def branch(f: nn.Module, args: tuple, kwargs: dict) -> Branch | None:
    """The branch ``r`` of block ``f`` if ``f(x, *args, **kwargs)`` is ``relu(r(f, x) + x)``
    and may be run that way (module docstring); ``None`` otherwise."""
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is None or args or kwargs:
        return None
    forward = type(f).forward
    split = (_basic if forward is resnet.BasicBlock.forward else
             _bottleneck if forward is resnet.Bottleneck.forward else None)
    # torchvision's own forward, not one patched over it on the class (which the split would
    # silently skip).
    own = (getattr(forward, "__module__", None) == resnet.__name__
           and getattr(forward, "__qualname__", None) in ("BasicBlock.forward",
                                                          "Bottleneck.forward"))
    if (split is None or not own or f.downsample is not None or "forward" in f.__dict__
            or type(f).__call__ is not nn.Module.__call__
            or type(f.relu) is not nn.ReLU or "forward" in f.relu.__dict__
            or _hooked(f) or _hooked(f.relu)
            or any(getattr(_module, name, None) for name in _GLOBAL_HOOKS)):
        return None
    return split
