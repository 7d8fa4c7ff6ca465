"""Memory: activation and peak memory vs depth, and the exact mode's buffer bits vs gamma."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ... import _exact, debug
from ...baselines import conv_stage
from ...memory import MIB, activation_memory
from ...momentum import MomentumNet
from . import _common

CLAIM = ("Memory-free momentum stages (exact and float) and RevNets keep activation memory "
         "constant in depth, where a ResNet's grows linearly and checkpointing's like "
         "sqrt(depth); exact reversal costs log2(d/n) ~ log2(1/gamma) bits per block and "
         "element, the paper's O((1 - gamma) depth width batch) term.")

#: system -> label; "resnet" is plain autograd (x <- x + f(x)), the others as ``momres bench``.
SYSTEMS = {"resnet": "ResNet (autograd)", "checkpoint": "checkpoint, √depth segments",
           "momres-exact": "momentum, exact", "momres-float": "momentum, float",
           "revnet": "RevNet"}
STYLE = {"resnet": "resnet", "checkpoint": "checkpoint", "momres-exact": "momentum",
         "momres-float": "momentum-float", "revnet": "revnet"}


@dataclass(frozen=True)
class Config:
    depths: tuple[int, ...] = (4, 8, 16, 32)
    batch: int = 16
    channels: int = 32
    size: int = 16
    gammas: tuple[float, ...] = (0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    buffer_bits: float = 24  # grow the buffer by this much to measure its rate


FULL = Config(depths=(8, 16, 32, 64, 128), batch=32)


def buffer_rate(gamma: float, bits: float) -> tuple[float, float]:
    """Measured and theoretical growth of the information buffer, bits per block and element.

    Runs a memory-free exact stage deep enough for the buffer to gain about ``bits`` bits
    (before its first spill) and measures ``mean log2(1 + buffer)`` over the second half.
    """
    fraction = _exact.snap_gamma(gamma)
    theory = _exact.buffer_bits_per_block(fraction.numerator, fraction.denominator)
    depth = 2 * math.ceil(bits / theory / 2)
    torch.manual_seed(0)
    block = _common.tanh_block(8, 16)
    net = MomentumNet([block] * depth, gamma)
    with debug.record_states() as log:
        net(torch.randn(256, 8))
    level = [log["forward"][n][2].add(1).log2().mean().item() for n in (depth // 2, depth - 1)]
    return (level[1] - level[0]) / (depth - 1 - depth // 2), theory


def run(out: Path, config: Config = Config(), seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x = torch.randn(config.batch, config.channels, config.size, config.size)
    saved = {s: [] for s in SYSTEMS}
    peak = {s: [] for s in SYSTEMS}
    with _common.threads(1):
        for depth in _common.progress(config.depths, "depths"):
            for system in SYSTEMS:
                model = conv_stage(system, depth, config.channels)
                saved[system].append(activation_memory(model, x.requires_grad_()) / MIB)
                peak[system].append(_common.peak_step_memory(model, x) / MIB)
        rates = [buffer_rate(g, config.buffer_bits)
                 for g in _common.progress(config.gammas, "buffer")]

    metrics: dict = {"depths": list(config.depths)}
    for system in SYSTEMS:
        metrics[system] = {"saved_mib": saved[system], "peak_mib": peak[system]}
    metrics["buffer_bits_per_block"] = {
        "gamma": list(config.gammas), "measured": [m for m, _ in rates],
        "theory_log2_d_over_n": [t for _, t in rates],
    }

    fig = Figure(figsize=(12, 3.8))
    axes = fig.subplots(1, 3)
    for ax, values, title in [(axes[0], saved, "saved for backward"),
                              (axes[1], peak, "peak of a training step")]:
        for system, label in SYSTEMS.items():
            ax.plot(config.depths, values[system], "o-", color=_common.COLORS[STYLE[system]],
                    label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel("MiB")
        ax.set_title(f"{title}\nconv stage, {config.channels} ch, {config.size}×{config.size}, "
                     f"batch {config.batch}", fontsize=9)
    axes[0].legend(fontsize=7)
    gammas = torch.linspace(0.15, 0.995, 200, dtype=torch.float64)
    ax = axes[2]
    ax.plot(gammas, -gammas.log2(), color="k", lw=1, label="log2(1/γ)")
    ax.plot(gammas, (1 - gammas) / math.log(2), "k--", lw=1, label="(1 − γ)/ln 2")
    ax.plot(config.gammas, [m for m, _ in rates], "o", color=_common.COLORS["momentum"],
            label="measured")
    ax.set_xlabel("γ")
    ax.set_ylabel("bits per block and element")
    ax.set_title("exact mode: information buffer growth", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _common.save_figure(fig, out, "memory")

    growth = {s: saved[s][-1] / saved[s][0] for s in SYSTEMS}
    depth_ratio = config.depths[-1] / config.depths[0]
    reproduced = (all(growth[s] <= 1.1 for s in ("momres-exact", "momres-float", "revnet"))
                  and growth["resnet"] >= 0.5 * depth_ratio
                  and all(abs(m - t) <= 0.1 * t for m, t in rates))
    return _common.finish(out, CLAIM, metrics, config, seed, reproduced)
