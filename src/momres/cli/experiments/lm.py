"""Language modelling: a GPT-2 converted to momentum trains as well, in a fraction of the memory.

A byte-level causal language model (``transformers``' GPT-2) learns Python's own standard
library, which every machine has: its ``.py`` files, taken in sorted order, every ``stride``-th
one up to a byte budget, with every tenth of those held out for validation.  At equal depth and
batch, from the same initial weights and on the same batches, it is trained three ways: plainly;
with Hugging Face's activation (gradient) checkpointing (the same function, so only its memory
and time are measured); and converted with ``to_momentum`` (``gamma``, exact memory-free backward).
Retrofitting: the plain model halfway through is converted and trained on, with its optimizer
state, next to the plain continuation on the same batches.

The peaks depend on depth: checkpointing stores each layer's input, the momentum chain a fixed
state, and both recompute one layer at a time.  So the peak of one training step is also traced
against depth (``depths``, at the same width, sequence length and batch; untrained weights, no
training), for all three systems.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from ...convert import to_momentum
from ...memory import MIB, peak_bytes
from ...timing import interleaved, median_ratio
from . import _common

CLAIM = ("A GPT-2 language model converted to a Momentum Transformer (exact memory-free "
         "backward) reaches the validation loss of the plain model (within 3%), with a peak "
         "memory at most that of gradient checkpointing, and a plain model converted halfway "
         "through training (retrofitting) continues as well as the plain one (within 5%).")


@dataclass(frozen=True)
class Config:
    layers: int = 6
    hidden: int = 64
    heads: int = 4
    seq: int = 64
    batch: int = 16
    steps: int = 200  # the retrofit is converted after steps // 2
    lr: float = 2e-3
    gamma: float = 0.9
    corpus_bytes: int = 1_000_000
    stride: int = 7  # every stride-th file of the standard library
    val_batches: int = 8
    timing_rounds: int = 5
    depths: tuple[int, ...] = (6, 12, 24, 48, 96)  # the peak against depth (traced steps)


#: Deep (GPT-2 XL's 48 layers, narrow enough for a CPU) and longer sequences: where storing
#: activations costs most, and where the chain's peak is half of checkpointing's.
FULL = Config(layers=48, seq=128, steps=200, corpus_bytes=2_000_000)


def corpus(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation bytes of the standard library's source (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train, val, total = [], [], 0
    for i, path in enumerate(files[:: config.stride]):
        data = path.read_bytes()
        (val if i % 10 == 9 else train).append(data)
        total += len(data)
        if total >= config.corpus_bytes:
            break
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
    return as_tensor(train).long(), as_tensor(val).long()


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.stack([data[s : s + seq] for s in starts.tolist()])


def gpt2(config: Config, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=256, n_positions=config.seq, n_embd=config.hidden, n_layer=config.layers,
        n_head=config.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        bos_token_id=0, eos_token_id=0))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def val_loss(model: nn.Module, val: torch.Tensor, config: Config) -> float:
    """Mean loss over fixed, evenly spaced validation windows."""
    starts = torch.linspace(0, len(val) - config.seq - 1, config.val_batches * config.batch)
    model.eval()
    with torch.no_grad():
        losses = [loss_of(model, windows(val, chunk.long(), config.seq)).item()
                  for chunk in starts.split(config.batch)]
    model.train()
    return statistics.fmean(losses)


class Run:
    """A model, its AdamW optimizer, and its loss curve."""

    def __init__(self, model: nn.Module, config: Config) -> None:
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
        self.losses: list[float] = []

    def train(self, batches: list[torch.Tensor], desc: str) -> None:
        for ids in _common.progress(batches, desc):
            self.optimizer.zero_grad(set_to_none=True)
            loss = loss_of(self.model, ids)
            loss.backward()
            self.optimizer.step()
            self.losses.append(loss.item())


def step_of(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """One training step's forward and backward (gradients zeroed in place, not freed)."""
    def step() -> None:
        model.zero_grad(set_to_none=False)
        loss_of(model, ids).backward()
    return step


SYSTEMS = ("plain", "checkpointing", "momentum")


def systems_of(model: nn.Module, gamma: float) -> dict[str, nn.Module]:
    """The plain model, a copy under HF's activation checkpointing, a copy converted."""
    checkpointing = copy.deepcopy(model)
    checkpointing.activation_checkpointing_enable({"use_reentrant": False})
    return {"plain": model, "checkpointing": checkpointing,
            "momentum": to_momentum(copy.deepcopy(model), gamma)}


def step_peaks(systems: dict[str, nn.Module], ids: torch.Tensor) -> dict[str, float]:
    """The traced peak (MiB) of one training step of each system, gradients allocated before
    (a first step also audits the momentum layers' graphs)."""
    peaks = {}
    for name, model in systems.items():
        step = step_of(model, ids)
        step()
        peaks[name] = peak_bytes(step) / MIB
    return peaks


def depth_curve(config: Config, ids: torch.Tensor, seed: int) -> dict:
    """The peak of a training step of each system at each of ``config.depths`` layers."""
    curve: dict = {"layers": list(config.depths), **{f"{n}_peak_mib": [] for n in SYSTEMS}}
    for layers in _common.progress(config.depths, "peak against depth"):
        model = gpt2(dataclasses.replace(config, layers=layers), seed).train()
        for name, peak in step_peaks(systems_of(model, config.gamma), ids).items():
            curve[f"{name}_peak_mib"].append(peak)
    curve["momentum_over_checkpointing"] = [
        m / c for m, c in zip(curve["momentum_peak_mib"], curve["checkpointing_peak_mib"],
                              strict=True)]
    return curve


def crossing(layers: list[int], ratios: list[float], below: float) -> int | None:
    """The least depth at which ``ratio <= below``: linear between the two measured depths
    around the crossing (the checkpointing peak grows linearly with depth, the momentum peak
    hardly moves); the first measured depth if it is already below, ``None`` if none is."""
    for i, (depth, ratio) in enumerate(zip(layers, ratios, strict=True)):
        if ratio <= below:
            if i == 0:
                return depth
            d0, d1, r0 = layers[i - 1], depth, ratios[i - 1]
            return math.ceil(d0 + (d1 - d0) * (r0 - below) / (r0 - ratio) - 1e-9)
    return None


def run(out: Path, config: Config = Config(), seed: int = 0) -> dict:
    train_data, val_data = corpus(config)
    generator = torch.Generator().manual_seed(seed)
    batches = [windows(train_data, torch.randint(len(train_data) - config.seq, (config.batch,),
                                                 generator=generator), config.seq)
               for _ in range(config.steps)]
    half = config.steps // 2
    metrics: dict = {"train_bytes": len(train_data), "val_bytes": len(val_data)}
    with _common.threads(1):
        initial = gpt2(config, seed)
        plain = Run(copy.deepcopy(initial), config)
        plain.train(batches[:half], "plain")
        snapshot = copy.deepcopy(plain.model)
        optimizer_state = copy.deepcopy(plain.optimizer.state_dict())
        plain.train(batches[half:], "plain")
        momentum = Run(to_momentum(initial, config.gamma), config)
        momentum.train(batches, "momentum")
        retrofit = Run(to_momentum(snapshot, config.gamma), config)
        retrofit.optimizer.load_state_dict(optimizer_state)  # parameters in the same order
        retrofit.train(batches[half:], "retrofit")

        metrics["plain_val_loss"] = val_loss(plain.model, val_data, config)
        metrics["momentum_val_loss"] = val_loss(momentum.model, val_data, config)
        metrics["continued_val_loss"] = metrics["plain_val_loss"]
        metrics["retrofit_val_loss"] = val_loss(retrofit.model, val_data, config)
        metrics["retrofit_val_loss_at_conversion"] = val_loss(
            to_momentum(snapshot, config.gamma), val_data, config)
        metrics["snapshot_val_loss"] = val_loss(snapshot, val_data, config)

        checkpointing = copy.deepcopy(plain.model)
        checkpointing.activation_checkpointing_enable({"use_reentrant": False})
        systems = {"plain": plain.model, "checkpointing": checkpointing,
                   "momentum": momentum.model}
        ids = batches[0]
        for name, peak in step_peaks(systems, ids).items():
            metrics[f"{name}_peak_mib"] = peak
        steps = {name: step_of(model, ids) for name, model in systems.items()}
        timed = {name: (lambda step=step: _timed(step)) for name, step in steps.items()}
        times = interleaved(timed, config.timing_rounds)
        losses = {"plain": plain.losses, "momentum": momentum.losses,
                  "retrofit": retrofit.losses}
        # The trained models go before the curve's deepest ones are built.
        del plain, momentum, retrofit, snapshot, systems, steps, timed, checkpointing
        curve = depth_curve(config, ids, seed)
    for base in ("plain", "checkpointing"):
        metrics[f"momentum_time_over_{base}"] = median_ratio(times["momentum"], times[base])
    metrics["checkpointing_time_over_plain"] = median_ratio(times["checkpointing"],
                                                            times["plain"])
    metrics["plain_step_s"] = statistics.median(times["plain"])
    metrics["momentum_over_checkpointing_peak"] = (metrics["momentum_peak_mib"]
                                                   / metrics["checkpointing_peak_mib"])
    metrics["momentum_over_plain_peak"] = (metrics["momentum_peak_mib"]
                                           / metrics["plain_peak_mib"])
    metrics["depth_curve"] = curve
    # From how many layers (at this width, sequence and batch) the momentum model's peak is
    # at most that of checkpointing, and at most half of it.
    for key, below in (("checkpointing", 1.0), ("half_checkpointing", 0.5)):
        metrics[f"momentum_below_{key}_from_layers"] = crossing(
            curve["layers"], curve["momentum_over_checkpointing"], below)
    metrics["curves"] = {"plain": losses["plain"], "momentum": losses["momentum"],
                         "retrofit": losses["retrofit"]}
    _figure(out, config, metrics)
    m = metrics
    reproduced = (m["momentum_val_loss"] <= 1.03 * m["plain_val_loss"]
                  and m["momentum_peak_mib"] <= m["checkpointing_peak_mib"]
                  and m["retrofit_val_loss"] <= 1.05 * m["continued_val_loss"])
    return _common.finish(out, CLAIM, metrics, config, seed, reproduced)


def _timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _figure(out: Path, config: Config, metrics: dict) -> None:
    fig = Figure(figsize=(14, 4))
    left, middle, right = fig.subplots(1, 3, gridspec_kw={"width_ratios": [2, 1, 1.5]})
    curves = metrics["curves"]
    window = max(1, config.steps // 20)
    half = config.steps // 2
    styles = {"plain": ("resnet", 0, "plain"), "momentum": ("momentum", 0, "momentum"),
              "retrofit": ("momentum-float", half, f"plain, converted at step {half}")}
    for name, (color, offset, label) in styles.items():
        losses = torch.tensor(curves[name])
        smooth = losses.unfold(0, window, 1).mean(1)
        key = "continued" if name == "plain" else name
        left.plot(range(offset + window, offset + len(losses) + 1), smooth,
                  color=_common.COLORS[color],
                  label=f"{label}: val {metrics[f'{key}_val_loss']:.3f}")
    left.axvline(half, color="gray", lw=0.5, ls=":")
    left.set_xlabel("step")
    left.set_ylabel(f"training loss, nats/byte (mean of {window} steps)")
    left.set_title(f"byte-level GPT-2, {config.layers} layers x {config.hidden}, "
                   f"gamma={config.gamma}", fontsize=9)
    left.legend(fontsize=8)
    colors = {n: _common.COLORS[c] for n, c in zip(SYSTEMS, ("resnet", "checkpoint", "momentum"),
                                                    strict=True)}
    middle.bar(SYSTEMS, [metrics[f"{n}_peak_mib"] for n in SYSTEMS], color=colors.values())
    middle.set_ylabel(f"peak MiB of a training step (batch {config.batch}, seq {config.seq})",
                      fontsize=8)
    middle.set_title(f"trained, {config.layers} layers", fontsize=9)
    middle.tick_params(axis="x", labelsize=8)
    curve = metrics["depth_curve"]
    for name in SYSTEMS:
        right.plot(curve["layers"], curve[f"{name}_peak_mib"], "o-", color=colors[name],
                   label=name)
    right.plot(curve["layers"], [c / 2 for c in curve["checkpointing_peak_mib"]], ":",
               color=colors["checkpointing"], label="checkpointing / 2")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xticks(curve["layers"], [str(n) for n in curve["layers"]])
    right.set_xlabel("layers")
    right.set_ylabel("peak MiB of a training step", fontsize=8)
    half_from = metrics["momentum_below_half_checkpointing_from_layers"]
    right.set_title("against depth (untrained); momentum <= checkpointing / 2 "
                    + (f"from ~{half_from} layers" if half_from else "at no depth measured"),
                    fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    _common.save_figure(fig, out, "lm")
