"""Whole-model peaks (``momres bench --whole-model``): the memory users feel, and its price.

For each model at a realistic batch, four systems: ``plain`` (the model under plain autograd),
``checkpoint`` (``torch.utils.checkpoint`` over about sqrt(n) segments of every stage,
non-reentrant), ``momres-default`` (``to_momentum`` with its default strategies) and
``momres-least`` (``momres.plan``'s least-peak plan); for ResNet-101 (``curve``) also the plans
at several budgets, one of them checkpointing's peak.  Each gets the traced peak of tensor
memory of one training step (``momres.memory.peak_bytes``, deterministic), the growth of peak
resident memory over a step in a fresh process (glibc told to unmap freed blocks, the peak
reset after a warm-up step) and the step time, interleaved with the others' in rounds, as a
median ratio to plain's.  Beside the traced peak (which counts the parameter gradients the step
allocates), issue 12's own measure: the traced peak above weights *and* gradients, the
gradients allocated (zeros) before the traced step (``plan.traced_peak_over_gradients``), for
every system but the curve's budget plans.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from .._io import machine
from ..convert import Part, checkpoint_part, momentum_stages, to_momentum
from ..memory import in_fresh_process, peak_resident_bytes, reset_peak_resident
from ..models import create_model
from ..momentum import Strategy
from ..plan import Plan, format_bytes, measure, traced_peak, traced_peak_over_gradients
from ..timing import interleaved, median_ratio, step_time

GAMMA = 0.9
SYSTEMS = ("plain", "checkpoint", "momres-default", "momres-least")


@dataclass(frozen=True)
class Model:
    """A model of the table: ``kind`` (resnet, cifar, vit, transformer), its input."""

    kind: str
    name: str
    batch: int
    size: int  # image side, or tokens
    width: int = 768  # transformer width (a ViT's comes with its name)
    layers: int = 12  # transformer layers
    curve: bool = False  # also the memory-time curve over budgets

    def label(self) -> str:
        what = {"transformer": f"transformer {self.layers}x{self.width}, {self.size} tokens"}
        return f"{what.get(self.kind, self.name)}, batch {self.batch}"

    def plain(self) -> tuple[nn.Module, list[str]]:
        """The plain model, and the paths of its stages (``nn.Sequential``s of blocks)."""
        torch.manual_seed(0)
        if self.kind == "resnet":
            model = getattr(torchvision.models, self.name)(weights=None)
            return model, [f"layer{k}" for k in range(1, 5)]
        if self.kind == "cifar":
            return create_model(self.name), ["layer1", "layer2", "layer3"]
        if self.kind == "vit":
            return getattr(torchvision.models, self.name)(weights=None), ["encoder.layers"]
        layer = lambda: nn.TransformerEncoderLayer(  # noqa: E731
            self.width, nhead=max(1, self.width // 64), dim_feedforward=4 * self.width,
            dropout=0.1, batch_first=True)
        model = nn.Sequential(OrderedDict(
            layers=nn.Sequential(*(layer() for _ in range(self.layers)))))
        return model, ["layers"]

    def momentum(self) -> nn.Module:
        model, paths = self.plain()
        if self.kind == "transformer":
            return to_momentum(model, GAMMA, stages=paths, keep_first=False)
        return to_momentum(model, GAMMA)

    def input(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        if self.kind == "transformer":
            return torch.randn(self.batch, self.size, self.width, generator=generator)
        return torch.randn(self.batch, 3, self.size, self.size, generator=generator)


class SegmentCheckpoint(nn.Module):
    """A stage under ``torch.utils.checkpoint`` over about sqrt(n) segments (non-reentrant)."""

    def __init__(self, stage: nn.Sequential) -> None:
        super().__init__()
        self.stage = stage
        self.segments = max(1, round(math.sqrt(len(stage))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.stage(x)
        return checkpoint_sequential(self.stage, self.segments, x, use_reentrant=False)


def build(model: Model, system: str, strategies: dict | None = None) -> nn.Module:
    """``model`` as ``system`` runs it; ``strategies`` (``stages``: path -> (mode, keep_last,
    segment, checkpoint); ``parts``: [parent, names, checkpoint] each) sets a plan's strategies
    without planning again."""
    if system == "plain":
        return model.plain()[0]
    if system == "checkpoint":
        net, paths = model.plain()
        for path in paths:
            net.set_submodule(path, SegmentCheckpoint(net.get_submodule(path)))
        return net
    net = model.momentum()
    strategies = strategies or {}
    for path, (mode, keep, segment, ckpt) in strategies.get("stages", {}).items():
        stage = momentum_stages(net)[path]
        stage.strategy, stage.checkpoint = Strategy(mode, keep, segment), ckpt
    for parent, names, ckpt in strategies.get("parts", []):
        checkpoint_part(net, Part(parent, tuple(names)), ckpt)
    return net


def _strategies(plan: Plan) -> dict:
    return {"stages": {s.path: (s.strategy.mode, s.strategy.keep_last, s.strategy.segment,
                                s.checkpoint)
                       for s in plan.stages},
            "parts": [(p.parent, p.names, g.checkpoint) for g in plan.parts for p in g.parts]}


def resident_growth_mib(model: Model, system: str, strategies: dict | None) -> float:
    """Growth of peak resident memory over one training step, in a fresh process (MiB)."""
    code = ("from momres.cli.peaks import _resident_child; _resident_child("
            f"{json.dumps(asdict(model))!r}, {system!r}, {json.dumps(strategies)!r})")
    return in_fresh_process(code)


def _resident_child(model_json: str, system: str, strategies_json: str) -> None:
    model = Model(**json.loads(model_json))
    net, x = build(model, system, json.loads(strategies_json)), model.input()
    step_time(net, x)  # warm-up: allocator, kernels, gradients allocated
    for p in net.parameters():
        p.grad = None
    reset_peak_resident()
    before = peak_resident_bytes()
    step_time(net, x)
    print((peak_resident_bytes() - before) / 2**20)


def measure_model(model: Model, rounds: int, resident: bool, budgets: int) -> dict:
    """Every system's traced peak, resident growth and step time for ``model``."""
    x = model.input()
    nets = {s: build(model, s) for s in ("plain", "checkpoint", "momres-default")}
    planned = model.momentum()
    measured = measure(planned, x)
    plans = {"momres-least": measured.choose()}
    peaks = {s: traced_peak(net, x) for s, net in nets.items()}
    if model.curve:  # budgets from checkpointing's peak to plain autograd's, and the least
        lo, hi = plans["momres-least"].least_peak, peaks["plain"]
        points = [peaks["checkpoint"], *(lo + (hi - lo) * k / (budgets - 1)
                                        for k in range(1, budgets))]
        for budget in sorted({int(b) for b in points if b >= lo}):
            plans[f"momres-budget-{budget}"] = measured.choose(budget)
    # The issue's own measure beside ours: the peak above weights and gradients allocated
    # before the step (ours counts the gradients the step allocates).
    over = {s: traced_peak_over_gradients(net, x) for s, net in nets.items()}
    for name, plan in plans.items():
        plan.apply(planned)
        peaks[name] = traced_peak(planned, x)
        if plan.budget is None:
            over[name] = traced_peak_over_gradients(planned, x)
    gradient_bytes = sum(p.numel() * p.element_size() for p in planned.parameters()
                         if p.requires_grad)

    def timed(name: str):
        if name in plans:
            return lambda: (plans[name].apply(planned), step_time(planned, x))[1]
        return lambda: step_time(nets[name], x)

    # rounds = 0: peaks only (the step times are left out)
    times = interleaved({name: timed(name) for name in peaks}, rounds) if rounds else \
        {name: [math.nan] for name in peaks}
    records = []
    for name, peak in peaks.items():
        plan = plans.get(name)
        strategies = _strategies(plan) if plan else None
        records.append({
            "model": model.label(), "kind": model.kind, "system": name,
            "budget": plan.budget if plan else None,
            "traced_peak": peak, "traced_peak_ratio": peak / peaks["plain"],
            "gradient_bytes": gradient_bytes,
            "over_gradients_peak": over.get(name),
            "over_gradients_ratio": over[name] / over["plain"] if name in over else None,
            "over_gradients_vs_checkpoint": (over[name] / over["checkpoint"] if name in over
                                             else None),
            "predicted_peak": plan.peak if plan else None,
            "predicted_time": plan.time if plan else None,
            "step_seconds": statistics.median(times[name]),
            "step_time_ratio": median_ratio(times[name], times["plain"]),
            "vs_checkpoint_peak": peak / peaks["checkpoint"],
            "vs_checkpoint_time": median_ratio(times[name], times["checkpoint"]),
            "resident_growth_mib": (resident_growth_mib(model, name, strategies)
                                    if resident and (plan is None or name == "momres-least")
                                    else None),
            "strategies": strategies,
            "plan": str(plan) if plan else None,
        })
        growth = "" if name not in over else (
            f", above weights and gradients {format_bytes(over[name])} "
            f"({over[name] / over['plain']:.2f}x plain)")
        print(f"[bench] {model.label()}: {name}: traced peak {format_bytes(peak)} "
              f"({peak / peaks['plain']:.2f}x plain){growth}, time "
              f"{records[-1]['step_time_ratio']:.2f}x", flush=True)
    return {"model": model.label(), "records": records}


def models(quick: bool) -> list[tuple[Model, int]]:
    """The models, each with its number of timing rounds."""
    if quick:
        return [(Model("cifar", "resnet20", 4, 16, curve=True), 1),
                (Model("transformer", "transformer", 2, 8, width=32, layers=4), 1)]
    return [(Model("resnet", "resnet50", 16, 224), 2),
            (Model("resnet", "resnet101", 16, 224, curve=True), 2),
            (Model("resnet", "resnet152", 16, 224), 1),
            (Model("vit", "vit_b_16", 8, 224), 2),
            (Model("cifar", "resnet110", 128, 32), 3),
            (Model("transformer", "transformer", 4, 512), 2)]


def format_table(results: list[dict]) -> str:
    """Markdown: traced peak (ratio to plain), resident growth, step time per model/system."""
    lines = ["| model | system | traced peak | vs plain | vs checkpoint | above weights and "
             "gradients | vs plain | vs checkpoint | resident growth | step time vs plain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        for r in result["records"]:
            if r["budget"] is not None and r["system"] != "momres-least":
                continue
            resident = "" if r["resident_growth_mib"] is None else \
                f"{r['resident_growth_mib']:.0f} MiB"
            over = "| | |" if r["over_gradients_peak"] is None else (
                f"{format_bytes(r['over_gradients_peak'])} | {r['over_gradients_ratio']:.2f}x | "
                f"{r['over_gradients_vs_checkpoint']:.2f}x |")
            lines.append(f"| {r['model']} | {r['system']} | {format_bytes(r['traced_peak'])} | "
                         f"{r['traced_peak_ratio']:.2f}x | {r['vs_checkpoint_peak']:.2f}x | "
                         f"{over} {resident} | {r['step_time_ratio']:.2f}x |")
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> Path | None:
    """The memory-time curve of the plans at several budgets, beside the other systems."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = next((r for r in results if any(q["budget"] for q in r["records"])), None)
    if curve is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = sorted((q["traced_peak_ratio"], q["step_time_ratio"]) for q in curve["records"]
                     if q["system"].startswith("momres-budget") or q["system"] == "momres-least")
    ax.plot(*zip(*budgets, strict=True), marker="o", label="momres plan at a budget")
    for q in curve["records"]:
        if q["system"] in ("plain", "checkpoint", "momres-default"):
            ax.plot(q["traced_peak_ratio"], q["step_time_ratio"], marker="s", linestyle="",
                    label=q["system"])
    ax.set_xlabel("traced peak of a training step / plain autograd's")
    ax.set_ylabel("step time / plain autograd's")
    ax.set_title(curve["model"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "whole_model_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(quick: bool, out: Path, rounds: int | None, resident: bool, only: list[str] | None
        ) -> list[dict]:
    """Measure every model (``only``: those whose name is listed), writing as it goes."""
    results = []
    for model, default_rounds in models(quick):
        if only and model.name not in only:
            continue
        print(f"[bench] {model.label()}", flush=True)
        results.append(measure_model(model, default_rounds if rounds is None else rounds, resident,
                                     budgets=3 if quick else 4))
        (out / "whole_model.json").write_text(json.dumps(
            {"results": results, "machine": machine(), "command": " ".join(sys.argv)},
            indent=2))
    plot(results, out)
    print(format_table(results))
    return results
