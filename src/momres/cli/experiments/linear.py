"""Linear maps: momentum represents any matrix up to a positive factor; a ResNet, det > 0 only.

Deep linear stacks in the ODE regime: ``depth`` blocks ``f_n(x) = h theta_n x`` with step
``h = 1/depth`` and weights ``theta_n`` of order one.  The ResNet is then an Euler scheme of
``x' = theta(t) x``, whose flow has a positive determinant; the Momentum ResNet, with
``1 - gamma = h / epsilon``, discretises ``epsilon x'' + x' = theta(t) x`` (DESIGN.md section 1).

Both are fitted to a target ``A`` up to scale (loss ``1 - cos(M, A)``, ``M`` the network's
matrix); the error is ``min over lambda > 0 of |A - M / lambda|_F / |A|_F``, the sine of the
angle between ``M`` and ``A`` (1 if they point apart).  Over matrices with ``det >= 0`` it is at
least ``sigma_min(A) / |A|_F`` when ``det A < 0``: 0.707 for a reflection in 2-D.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from . import _common

CLAIM = ("In the ODE regime, a Momentum ResNet represents any linear map up to a positive "
         "factor, including a reflection (det < 0); a ResNet only reaches maps with det > 0.")


@dataclass(frozen=True)
class Config:
    depth: int = 32
    epsilon: float = 1.0  # gamma = 1 - 1 / (depth * epsilon)
    random_targets: int = 4
    random_dim: int = 3
    steps: int = 400
    lr: float = 0.05


FULL = Config(depth=64, random_targets=8, steps=1000)


class LinearStep(nn.Module):
    """``f(x) = h theta x``: one step of size ``h`` of ``x' = theta x``."""

    def __init__(self, dim: int, h: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(0.1 * torch.randn(dim, dim, dtype=torch.float64))
        self.h = h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h * x @ self.theta.T


def matrix(net: nn.Module, dim: int) -> torch.Tensor:
    """The matrix ``M`` of a linear network: its rows map to ``M e_i``."""
    return net(torch.eye(dim, dtype=torch.float64)).T


def scale_error(m: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``min over lambda > 0 of |a - m / lambda| / |a|``: the sine of the angle, or 1."""
    cos = (m * a).sum() / (m.norm() * a.norm())
    return (1 - cos.clamp(min=0).square()).clamp(min=0).sqrt()


def fit_target(a: torch.Tensor, config: Config, seed: int, desc: str) -> dict[str, float]:
    """Train both networks to represent ``a`` up to scale; their errors."""
    dim, h = a.shape[0], 1 / config.depth
    gamma = 1 - h / config.epsilon
    nets = _common.momentum_and_resnet(
        lambda: [LinearStep(dim, h) for _ in range(config.depth)], gamma, seed)
    errors = {}
    for name, net in nets.items():
        def loss_fn(net=net) -> torch.Tensor:
            m = matrix(net, dim)
            return 1 - (m * a).sum() / (m.norm() * a.norm())

        _common.fit(net.parameters(), loss_fn, config.steps, config.lr, f"{desc} {name}")
        with torch.no_grad():
            errors[name] = scale_error(matrix(net, dim), a).item()
    return errors


def reach(eps: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``psi_eps(lam) = y(1)`` for ``eps y'' + y' = lam y``, ``y(0) = 1``, ``y'(0) = 0``: the
    eigenvalue of the time-1 map for an eigenvalue ``lam`` of ``theta`` (``eps > 0``; as
    ``eps -> 0`` it tends to the ResNet's ``exp(lam)``).  Broadcasts ``eps`` against ``lam``."""
    eps, lam = torch.broadcast_tensors(eps, lam)
    system = torch.zeros(*eps.shape, 2, 2, dtype=torch.float64)
    system[..., 0, 1] = 1
    system[..., 1, 0] = lam / eps
    system[..., 1, 1] = -1 / eps
    return torch.linalg.matrix_exp(system)[..., 0, 0]


def lowest_reachable(eps: torch.Tensor) -> torch.Tensor:
    """``min over lam of psi_eps(lam)``: every real eigenvalue above it is reachable."""
    lam = -torch.logspace(-3, 4, 4000, dtype=torch.float64)
    return reach(eps.unsqueeze(-1), lam).amin(-1)


def run(out: Path, config: Config = Config(), seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    reflection = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    randoms = [torch.randn(config.random_dim, config.random_dim, generator=generator,
                           dtype=torch.float64) for _ in range(config.random_targets)]
    with _common.threads(1):
        errors = fit_target(reflection, config, seed, "reflection")
        records = []
        for i, a in enumerate(randoms):
            fitted = fit_target(a, config, seed + 1 + i, f"random {i + 1}/{len(randoms)}")
            bound = (torch.linalg.svdvals(a)[-1] / a.norm()).item() if a.det() < 0 else 0.0
            records.append({"det": a.det().item(), "resnet_bound": bound,
                            **{f"{k}_error": v for k, v in fitted.items()}})

    eps = torch.tensor(config.epsilon, dtype=torch.float64)
    metrics = {
        "momentum_error": errors["momentum"],
        "resnet_error": errors["resnet"],
        "resnet_bound": 2**-0.5,
        "momentum_random_error_max": max(r["momentum_error"] for r in records),
        "resnet_random_error_max": max(r["resnet_error"] for r in records),
        "random": records,
        "gamma": 1 - 1 / (config.depth * config.epsilon),
        "lowest_reachable_eigenvalue": lowest_reachable(eps).item(),
    }

    fig = Figure(figsize=(10, 3.6))
    left, middle, right = fig.subplots(1, 3)
    lam = torch.linspace(-40, 1.5, 800, dtype=torch.float64)
    for e, color in zip([0.05, 0.25, 1.0, 4.0], ["#fcae91", "#fb6a4a", "#de2d26", "#a50f15"],
                        strict=True):
        left.plot(lam, reach(torch.tensor(e, dtype=torch.float64), lam), color=color,
                  label=f"ε = {e:g}")
    left.plot(lam, lam.exp(), "--", color=_common.COLORS["resnet"],
              label="ResNet (ε → 0): exp(λ)")
    left.axhline(0, color="k", lw=0.5)
    left.set_ylim(-1, 1.5)
    left.set_xlabel("eigenvalue λ of θ")
    left.set_ylabel("eigenvalue of the map at t = 1")
    left.legend(fontsize=7)
    left.set_title("εx'' + x' = θx, x'(0) = 0", fontsize=9)
    grid = torch.logspace(-2, 2, 200, dtype=torch.float64)
    low = lowest_reachable(grid)
    middle.fill_between(grid, low, 1.5, color=_common.COLORS["momentum"], alpha=0.25,
                        label="reachable")
    middle.plot(grid, low, color=_common.COLORS["momentum"])
    middle.axhline(0, color="k", lw=0.5)
    middle.set_xscale("log")
    middle.set_ylim(-1, 1.5)
    middle.set_xlabel("ε   (γ = 1 − h/ε)")
    middle.set_title("reachable real eigenvalues", fontsize=9)
    names = ["reflection"] + [f"{'+' if r['det'] > 0 else '−'}{i + 1}"
                              for i, r in enumerate(records)]
    xs = torch.arange(len(names))
    for shift, name in [(-0.2, "resnet"), (0.2, "momentum")]:
        values = [errors[name]] + [r[f"{name}_error"] for r in records]
        right.bar(xs + shift, values, width=0.4, color=_common.COLORS[name], label=name)
    bounds = [metrics["resnet_bound"]] + [r["resnet_bound"] for r in records]
    right.scatter(xs - 0.2, bounds, marker="_", s=150, color="k", label="ResNet bound (det > 0)")
    right.set_xticks(xs, names, fontsize=7)
    right.set_ylabel("error up to scale")
    right.set_title("fitted targets (sign of det)", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    _common.save_figure(fig, out, "linear")

    reproduced = (metrics["momentum_error"] * 10 <= metrics["resnet_error"]
                  and metrics["momentum_random_error_max"] <= 0.1)
    return _common.finish(out, CLAIM, metrics, config, seed, reproduced)
