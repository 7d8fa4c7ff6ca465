"""Nested rings: momentum separates 4 rings in 2-D without adding dimensions; a ResNet cannot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from . import _common

CLAIM = ("A Momentum ResNet separates 4 nested rings with alternating labels in the plane, "
         "without adding dimensions; a ResNet cannot, since a first-order flow is a "
         "homeomorphism of the plane and cannot bring alternate rings onto opposite sides of "
         "a line.")


@dataclass(frozen=True)
class Config:
    rings: int = 4
    depth: int = 15
    width: int = 16
    gamma: float = 0.99
    steps: int = 500
    batch: int = 512
    lr: float = 3e-2


FULL = Config(steps=3000)


def sample(n: int, rings: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points, as many per ring, on rings of radius 0.5, 1, 1.5, ... (width 0.2);
    label: ring index mod 2."""
    ring = torch.arange(n) % rings
    radius = 0.5 * (ring + 1) + 0.2 * (torch.rand(n, generator=generator) - 0.5)
    angle = 2 * torch.pi * torch.rand(n, generator=generator)
    points = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    return points, ring % 2


def run(out: Path, config: Config = Config(), seed: int = 0) -> dict:
    nets = _common.momentum_and_resnet(
        lambda: [_common.tanh_block(2, config.width) for _ in range(config.depth)],
        config.gamma, seed,
    )
    generator = torch.Generator().manual_seed(seed)
    metrics: dict = {}
    # The logits are the two coordinates of the output: the classifier is the line x1 = x2.
    with _common.threads(1):
        for name, net in nets.items():
            def loss_fn(net=net) -> torch.Tensor:
                x, y = sample(config.batch, config.rings, generator)
                return torch.nn.functional.cross_entropy(net(x), y)

            _common.fit(net.parameters(), loss_fn, config.steps, config.lr, name)
        x, y = sample(4000, config.rings, generator)
        lim = 0.5 * config.rings + 0.3
        axis = torch.linspace(-lim, lim, 200)
        grid = torch.cartesian_prod(axis, axis)
        paths, regions = {}, {}
        for name, net in nets.items():
            with torch.no_grad():
                metrics[f"{name}_accuracy"] = (net(x).argmax(1) == y).double().mean().item()
                regions[name] = net(grid).argmax(1).view(len(axis), len(axis)).T
            paths[name] = _common.trajectory(net, x[:600])

    titles = {"resnet": "ResNet", "momentum": f"Momentum ResNet (γ = {config.gamma})"}
    fig = Figure(figsize=(8, 4))
    for ax, name in zip(fig.subplots(1, 2), titles, strict=True):
        ax.contourf(axis, axis, regions[name], levels=[-0.5, 0.5, 1.5],
                    colors=["#dde6f5", "#f5dddd"])
        ax.scatter(x[:600, 0], x[:600, 1], c=y[:600], cmap="coolwarm", s=3)
        ax.set_title(f"{titles[name]}\naccuracy {metrics[f'{name}_accuracy']:.1%}")
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    _common.save_figure(fig, out, "rings_decision")

    depths = [round(i * config.depth / 4) for i in range(5)]
    fig = Figure(figsize=(2 * len(depths), 4.2))
    axes = fig.subplots(2, len(depths))
    for row, name in zip(axes, titles, strict=True):
        for ax, n in zip(row, depths, strict=True):
            ax.scatter(paths[name][n, :, 0], paths[name][n, :, 1], c=y[:600], cmap="coolwarm",
                       s=2)
            ax.set_title(f"{name}, depth {n}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    _common.save_figure(fig, out, "rings_trajectories")

    reproduced = (metrics["momentum_accuracy"] >= 0.95
                  and metrics["momentum_accuracy"] - metrics["resnet_accuracy"] >= 0.1)
    return _common.finish(out, CLAIM, metrics, config, seed, reproduced)
