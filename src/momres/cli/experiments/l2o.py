"""Learning to optimize: unrolled momentum converges past its training depth; a RevNet cannot.

Problems ``min_x 1/2 |D x - y|^2`` with ``D`` fixed and ``y`` random; the minimiser is ``x*``.
Every layer is the same learned iteration, a preconditioned gradient step
``f(x; y) = -P D^T (D x - y)`` with ``P`` learned and shared across layers:

* Momentum ResNet: ``v <- gamma v + (1 - gamma) f(x; y); x <- x + v``, a heavy-ball method.
  Its Jacobian in ``(x, v)`` has determinant ``gamma^d``, so its fixed point ``(x*, 0)`` can
  attract.  Its iterates contract at best like ``sqrt(gamma)`` per layer, hence ``gamma = 0.5``.
* RevNet: ``x1 <- x1 + F(x2; y); x2 <- x2 + G(x1; y)`` with ``F``, ``G`` two such steps (twice
  the parameters); the estimate is ``x2``.  Volume-preserving: no attracting fixed point.
* ResNet (not invertible, a reference): ``x <- x + f(x; y)``, preconditioned gradient descent.

All start from zero, are trained unrolled at depth ``T`` and are evaluated up to ``8T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from ...momentum import MomentumNet
from ...reversible import ReversibleStage
from . import _common

CLAIM = ("Unrolled with weights shared across layers and trained at depth T, a Momentum ResNet "
         "learns a convergent iteration (heavy ball): unrolled further, to 2T, 4T, 8T, its error "
         "goes to zero. A RevNet, volume-preserving, cannot converge to the minimiser.")

SYSTEMS = ("momentum", "revnet", "resnet")


@dataclass(frozen=True)
class Config:
    dim: int = 10
    rows: int = 20
    depth: int = 10  # T
    gamma: float = 0.5
    steps: int = 500
    batch: int = 256
    lr: float = 1e-2


FULL = Config(dim=20, rows=40, depth=20, steps=3000, lr=1e-3)  # lr 1e-2: the RevNet diverges


class GradientStep(nn.Module):
    """``f(x; y) = -P D^T (D x - y)``, with a learned preconditioner ``P``.

    ``P`` starts at zero, so every network starts as the identity.  (Starting from gradient
    descent's step, ``P = I / L``, makes the RevNet's two coupled descent steps unstable: its
    error at depth T is then 10^2-10^3 before training.)
    """

    def __init__(self, d: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("d", d)
        self.p = nn.Parameter(torch.zeros(d.shape[1], d.shape[1]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -((x @ self.d.T - y) @ self.d) @ self.p.T


def unrolled(d: torch.Tensor, gamma: float) -> dict[str, tuple[Callable[[int], nn.Module], int]]:
    """Per system: ``depth -> network`` with shared weights, and the width of its state."""
    f, f_res, f_rev, g_rev = (GradientStep(d) for _ in range(4))
    dim = d.shape[1]
    return {
        "momentum": (lambda k: MomentumNet([f] * k, gamma), dim),
        "revnet": (lambda k: ReversibleStage([f_rev] * k, [g_rev] * k), 2 * dim),
        "resnet": (lambda k: MomentumNet([f_res] * k, 0.0, memory_efficient=False), dim),
    }


def relative_error(x: torch.Tensor, solution: torch.Tensor) -> torch.Tensor:
    """``|x - x*| / |x*|`` over the whole batch."""
    return (x - solution).norm() / solution.norm()


def run(out: Path, config: Config = Config(), seed: int = 0) -> dict:
    torch.manual_seed(seed)
    d = torch.randn(config.rows, config.dim) / config.rows**0.5
    systems = unrolled(d, config.gamma)
    generator = torch.Generator().manual_seed(seed)

    def problems(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randn(n, config.rows, generator=generator)
        return y, torch.linalg.lstsq(d, y.T).solution.T

    horizon = 8 * config.depth
    curves = {}
    with _common.threads(1):
        for name, (make, width) in systems.items():
            net = make(config.depth)

            def loss_fn(net=net, width=width) -> torch.Tensor:
                y, solution = problems(config.batch)
                x = net(torch.zeros(len(y), width), y)[:, -config.dim:]
                return relative_error(x, solution).square()

            _common.fit(net.parameters(), loss_fn, config.steps, config.lr, name)
            y, solution = problems(1000)
            with torch.no_grad():
                curves[name] = [relative_error(make(k)(torch.zeros(len(y), width), y)
                                               [:, -config.dim:], solution).item()
                                for k in range(1, horizon + 1)]

    metrics: dict = {f"{name}_error": curves[name][-1] for name in SYSTEMS}
    marks = [config.depth * m for m in (1, 2, 4, 8)]
    metrics["iterations"] = marks
    metrics.update({f"{name}_errors": [curves[name][k - 1] for k in marks] for name in SYSTEMS})
    metrics["curves"] = curves

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name in SYSTEMS:
        ax.semilogy(range(1, horizon + 1), curves[name], color=_common.COLORS[name], label=name)
        ax.semilogy(marks, metrics[f"{name}_errors"], "o", color=_common.COLORS[name])
    ax.axvline(config.depth, color="k", ls=":", lw=1, label="trained depth T")
    ax.set_xlabel("iterations (layers)")
    ax.set_ylabel("relative error |x - x*| / |x*|")
    ax.set_title("learned iterations for least squares, unrolled past T")
    ax.legend()
    _common.save_figure(fig, out, "l2o")

    # The comparison means something only if the RevNet learned at its own depth T.
    revnet_trained = metrics["revnet_errors"][0] < 1
    revnet_stuck = (not math.isfinite(metrics["revnet_error"])
                    or metrics["momentum_error"] * 10 <= metrics["revnet_error"])
    reproduced = revnet_trained and revnet_stuck and metrics["momentum_error"] <= 1e-2
    return _common.finish(out, CLAIM, metrics, config, seed, reproduced)
