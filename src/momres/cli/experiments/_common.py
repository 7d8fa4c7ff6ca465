"""What every experiment shares: models, the training loop, trajectories, result and figures.

Figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot), so saving a PNG uses the
Agg canvas and never touches the user's global matplotlib backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from ...memory import peak_bytes
from ...momentum import MomentumNet

#: Colours used for the same system in every figure.
COLORS = {"momentum": "tab:red", "resnet": "tab:blue", "revnet": "tab:green",
          "checkpoint": "tab:purple", "momentum-float": "tab:orange"}


def progress(iterable: Iterable, desc: str) -> tqdm:
    """A tqdm progress bar (on stderr) labelled ``desc``."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads.  The experiments' models are small: on one thread they
    run at most a little slower, and on a shared machine much faster (synchronising threads
    that compete for cores costs more than the arithmetic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tanh_block(dim: int, width: int) -> nn.Module:
    """The paper's residual branch ``f(x) = W2^T tanh(W1 x + b)``."""
    return nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim, bias=False))


def momentum_and_resnet(
    make_blocks: Callable[[], list[nn.Module]], gamma: float, seed: int
) -> dict[str, MomentumNet]:
    """The same initial blocks as a memory-free Momentum ResNet and as a ResNet (``gamma=0``,
    which is exactly ``x <- x + f(x)``)."""
    torch.manual_seed(seed)
    momentum = MomentumNet(make_blocks(), gamma)
    torch.manual_seed(seed)
    resnet = MomentumNet(make_blocks(), 0.0, memory_efficient=False)
    return {"momentum": momentum, "resnet": resnet}


def fit(
    params: Iterable[torch.Tensor], loss_fn: Callable[[], torch.Tensor], steps: int,
    lr: float, desc: str,
) -> list[float]:
    """Minimise ``loss_fn()`` (which draws its own batch) with Adam; the loss per step."""
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    bar = progress(range(steps), desc)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
    return losses


def trajectory(net: MomentumNet, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The positions ``x_0 ... x_N`` through the stage, stacked along a new first dimension.

    Each block receives ``x_n``, so a forward pre-hook on every (distinct) block records them
    in call order, whatever the mode of the stage.
    """
    states: list[torch.Tensor] = []
    hooks = [block.register_forward_pre_hook(lambda _, inputs: states.append(inputs[0].clone()))
             for block in dict.fromkeys(net.functions)]
    try:
        with torch.no_grad():
            out = net(x, *args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([*states, out])


def peak_step_memory(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes allocated by one training step (forward, loss, backward) beyond those in use
    before it (``momres.memory.peak_bytes``)."""
    x = x.detach().requires_grad_()
    return peak_bytes(lambda: model(x).square().mean().backward())


def save_figure(fig: Figure, out: Path, name: str) -> Path:
    """Write ``fig`` as ``out/name.png``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (a diverged error) replaced by ``None``: strict
    JSON has no infinity."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def finish(out: Path, claim: str, metrics: dict[str, Any], config: Any, seed: int,
           reproduced: bool) -> dict[str, Any]:
    """Write ``out/result.json`` and print a summary; the result as a dict.  Non-finite
    numbers are written as ``null``."""
    result = {"claim": claim, "metrics": _json_safe(metrics),
              "config": {**dataclasses.asdict(config), "seed": seed},
              "reproduced": bool(reproduced)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"{claim}\nreproduced: {result['reproduced']}")
    for key, value in result["metrics"].items():  # the numbers, not the long curves
        for name, v in value.items() if isinstance(value, dict) else [("", value)]:
            label = f"{key}.{name}" if name else key
            if isinstance(v, float):
                print(f"  {label} = {v:.4g}")
            elif isinstance(v, list) and len(v) <= 10 and all(
                    isinstance(i, (int, float)) for i in v):
                print(f"  {label} = " + ", ".join(f"{i:.4g}" for i in v))
    print(f"written: {out / 'result.json'}")
    return result
