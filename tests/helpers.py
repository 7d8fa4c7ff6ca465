"""Helpers shared by the tests: one fixed loss, its gradients, how far two sets differ, a
block whose recompute differentiates another graph, and the C kernels built into a cache of the
test session's own."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch
from torch import nn

from momres import _kernels


def fixed_loss(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A scalar loss that weighs every output element differently (a tuple: summed)."""
    if isinstance(out, tuple):
        return sum(fixed_loss(o) for o in out)
    weight = torch.linspace(-1, 2, out.numel(), dtype=out.dtype, device=out.device)
    return (out * weight.view_as(out)).square().sum()


def output_and_gradients(fn: Callable, x: torch.Tensor, *args,
                         wrt: Iterable[torch.Tensor] | None = None, **kwargs):
    """``fn(x, *args, **kwargs)`` and the gradients of its ``fixed_loss`` w.r.t. ``x`` and
    ``wrt`` (default: ``fn``'s trainable parameters); zeros where a tensor gets no gradient."""
    x = x.detach().requires_grad_()
    if wrt is None:
        wrt = [p for p in fn.parameters() if p.requires_grad]
    wrt = [x, *wrt]
    out = fn(x, *args, **kwargs)
    grads = torch.autograd.grad(fixed_loss(out), wrt, allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads, strict=True)]


def gradients(fn: Callable, x: torch.Tensor, *args, **kwargs) -> list[torch.Tensor]:
    """The gradients of ``output_and_gradients``."""
    return output_and_gradients(fn, x, *args, **kwargs)[1]


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """``|a - b| / |b|`` over all the tensors of each list together."""
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return ((a - b).norm() / b.norm()).item()


class DetachesOnItsSecondCall(nn.Linear):
    """The same values in every call, but the second (the recompute) cuts the graph to x."""

    def __init__(self, width: int) -> None:
        super().__init__(width, width)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(super().forward(x.detach() if self.calls == 2 else x))


@pytest.fixture
def private_kernel_cache(tmp_path_factory, monkeypatch):
    """The C kernels built into (or reused from) one cache of this test session's own, and on
    whatever ``MOMRES_KERNELS`` says outside; modules that test the kernels use it autouse."""
    monkeypatch.setenv("MOMRES_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))
    monkeypatch.delenv("MOMRES_KERNELS", raising=False)


def kernel_library():
    """The loaded C kernels (the test fails if they cannot be built)."""
    lib = _kernels.kernels(torch.zeros(1))
    assert lib is not None
    return lib
