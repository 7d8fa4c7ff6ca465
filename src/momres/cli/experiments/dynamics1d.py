"""1-D dynamics: momentum trajectories can cross, a ResNet's cannot (learning h(x) = -x^3)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from . import _common

CLAIM = ("A Momentum ResNet learns h(x) = -x^3 on [-1, 1], a map that reverses the order of "
         "the points, so their trajectories must cross; a ResNet cannot, since first-order "
         "flows preserve order in 1-D.")


@dataclass(frozen=True)
class Config:
    depth: int = 15
    width: int = 16
    gamma: float = 0.99
    steps: int = 500
    batch: int = 200
    lr: float = 3e-2


FULL = Config(steps=3000)


def target(x: torch.Tensor) -> torch.Tensor:
    return -x.pow(3)


def run(out: Path, config: Config = Config(), seed: int = 0) -> dict:
    nets = _common.momentum_and_resnet(
        lambda: [_common.tanh_block(1, config.width) for _ in range(config.depth)],
        config.gamma, seed,
    )
    generator = torch.Generator().manual_seed(seed)
    # The best order-preserving map is the constant E[h(x)] = 0, with loss E[x^6] = 1/7.
    metrics: dict = {"best_order_preserving_loss": 1 / 7}
    with _common.threads(1):
        for name, net in nets.items():
            def loss_fn(net=net) -> torch.Tensor:
                x = torch.rand(config.batch, 1, generator=generator) * 2 - 1
                return (net(x) - target(x)).square().mean()

            _common.fit(net.parameters(), loss_fn, config.steps, config.lr, name)
        grid = torch.linspace(-1, 1, 1001).unsqueeze(1)
        paths = {}
        for name, net in nets.items():
            with torch.no_grad():
                y = net(grid)
            metrics[f"{name}_loss"] = (y - target(grid)).square().mean().item()
            paths[name] = _common.trajectory(net, torch.linspace(-1, 1, 11).unsqueeze(1))

    fig = Figure(figsize=(7, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (name, title) in zip(axes, [("resnet", "ResNet"),
                                        ("momentum", f"Momentum ResNet (γ = {config.gamma})")],
                                 strict=True):
        path = paths[name].squeeze(-1).numpy()
        ax.plot(path, range(config.depth + 1), "-", color=_common.COLORS[name], marker=".")
        ax.plot(target(torch.from_numpy(path[0])).numpy(), [config.depth] * path.shape[1],
                "kx", label="target $-x^3$")
        ax.set_title(f"{title}\nloss {metrics[f'{name}_loss']:.2g}")
        ax.set_xlabel("x")
    axes[0].set_ylabel("depth")
    axes[0].legend(loc="lower left")
    _common.save_figure(fig, out, "dynamics1d")

    reproduced = metrics["momentum_loss"] * 10 <= metrics["resnet_loss"]
    return _common.finish(out, CLAIM, metrics, config, seed, reproduced)
