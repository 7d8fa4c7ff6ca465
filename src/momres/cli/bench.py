"""Benchmark memory-saving methods against plain autograd: step time, saved and peak memory.

Method: within one run, every system and its plain-autograd twin are timed interleaved, round
by round, so that machine noise hits all of them alike; a system's figure is the median over
rounds of its step time divided by its twin's step time in the same round.  Each twin is also
timed with one more forward pass without grad (``recompute_floor``): what rebuilding the
activations costs, however it is done, so a memory-free method is best judged against it.
Memory is measured twice: bytes saved for the backward pass (``momres.activation_memory``,
each storage once), and the peak of a whole training step in a fresh process per configuration
(CPU: peak resident memory; CUDA: ``torch.cuda.max_memory_allocated``).

Systems (``momres.baselines``): ``plain`` (the momentum rule under plain autograd, the twin of
the next three; for whole models, the plain ResNet), ``momres-autograd`` (a whole momentum
model under plain autograd, against the ResNet), ``checkpoint`` (the same under
``torch.utils.checkpoint`` over sqrt(depth) segments, non-reentrant), ``momres-exact``,
``momres-float``, ``revnet`` (additive coupling, memory-free; twin: ``revnet-plain``) and
``momentumnet`` (the official package, optional; twin:
``momentumnet-plain``).  Cases: a conv stage over depths and batch sizes, CIFAR and ImageNet
ResNets against their momentum twins (among them ``momres demo``'s configuration, ResNet-56 on
1x16x16 images at batch 64), and a transformer encoder.  Each record carries the twin's
recompute floor and the system's time over that floor, median over the same rounds.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .._io import machine
from ..baselines import GAMMA, conv_stage
from ..convert import to_momentum
from ..memory import MIB, activation_memory, in_fresh_process, peak_resident_bytes
from ..models import create_model
from ..timing import floor_step_time, interleaved, median_ratio, step_time
from . import peaks

#: system -> its plain-autograd twin, whose step time it is divided by (default "plain").
TWIN = {"revnet": "revnet-plain", "revnet-plain": "revnet-plain",
        "momentumnet": "momentumnet-plain", "momentumnet-plain": "momentumnet-plain"}


def _registry_model(name: str, system: str, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    prefix, options = {
        "plain": ("", {}), "momres-exact": ("m", {"gamma": GAMMA}),
        "momres-float": ("m", {"gamma": GAMMA, "exact": False}),
        "momres-autograd": ("m", {"gamma": GAMMA, "memory_efficient": False}),
        "revnet": ("", {}), "revnet-plain": ("", {"memory_efficient": False}),
    }[system]
    return create_model(prefix + name, in_channels=in_channels, **options)


def _transformer(system: str, layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(width, nhead=max(1, width // 32), dim_feedforward=4 * width,
                                       dropout=0.1, batch_first=True)
    encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    if system == "plain":
        return encoder
    return to_momentum(encoder, GAMMA, exact=system == "momres-exact")


@dataclass(frozen=True)
class Case:
    """One configuration: what is built (``kind``, ``name``, ``depth``) and its input."""

    kind: str  # "conv", "cifar", "imagenet", "transformer"
    batch: int
    depth: int = 0  # conv blocks or transformer layers
    name: str = ""  # registry name (plain) for model cases
    width: int = 32  # conv channels or transformer width
    size: int = 16  # image side, or sequence length
    in_channels: int = 3  # image channels of model cases

    def systems(self, available: list[str]) -> list[str]:
        wanted = {
            "conv": ["plain", "checkpoint", "momres-exact", "momres-float", "revnet",
                     "revnet-plain", "momentumnet", "momentumnet-plain"],
            "cifar": ["plain", "momres-exact", "momres-float", "momres-autograd"],
            "imagenet": ["plain", "momres-exact", "momres-float"],
            "transformer": ["plain", "momres-exact", "momres-float"],
        }[self.kind]
        if self.kind == "cifar" and self.name.startswith("revnet"):
            wanted = ["revnet", "revnet-plain"]
        return [s for s in wanted if s in available]

    def build(self, system: str) -> nn.Module:
        if self.kind == "conv":
            return conv_stage(system, self.depth, self.width)
        if self.kind == "transformer":
            return _transformer(system, self.depth, self.width)
        return _registry_model(self.name, system, self.in_channels)

    def input(self, batch: int | None = None) -> torch.Tensor:
        batch = batch or self.batch
        generator = torch.Generator().manual_seed(1)
        if self.kind == "transformer":
            return torch.randn(batch, self.size, self.width, generator=generator)
        channels = self.width if self.kind == "conv" else self.in_channels
        return torch.randn(batch, channels, self.size, self.size, generator=generator)

    def label(self) -> str:
        what = {"conv": f"conv stage depth {self.depth}", "transformer":
                f"transformer {self.depth} layers", "cifar":
                f"{self.name} {self.in_channels}x{self.size}x{self.size}"}.get(self.kind, self.name)
        return f"{what}, batch {self.batch}"


def available_systems() -> tuple[list[str], list[str]]:
    """Systems that can run here, and a note for each one that cannot."""
    systems = ["plain", "checkpoint", "momres-exact", "momres-float", "revnet", "revnet-plain"]
    notes = []
    if importlib.util.find_spec("momentumnet"):
        systems += ["momentumnet", "momentumnet-plain"]
    else:
        notes.append("momentumnet (official package 0.10) not installed: skipped "
                     "(pip install 'momres[bench]')")
    return systems, notes


def peak_memory_mib(case: Case, system: str, device: str) -> float:
    """Peak memory of one training step, in a fresh process (MiB).

    CPU: peak resident memory of the process, with glibc told to map every allocation above
    64 KiB on its own so that freed tensors leave the process at once and the peak follows the
    live tensors, not the heap's fragmentation; it includes the interpreter and torch, so
    compare systems and depths by differences.  CUDA: ``torch.cuda.max_memory_allocated``.
    """
    code = f"from momres.cli.bench import _peak_child; _peak_child(" \
           f"{json.dumps(asdict(case))!r}, {system!r}, {device!r})"
    return in_fresh_process(code)


def _peak_child(case_json: str, system: str, device: str) -> None:
    case = Case(**json.loads(case_json))
    model, x = case.build(system).to(device), case.input().to(device)
    step_time(model, x)
    if device == "cuda":
        print(torch.cuda.max_memory_allocated() / MIB)
    else:
        print(peak_resident_bytes() / MIB)


def measure(case: Case, systems: list[str], rounds: int, device: str, peak: bool,
            budget_gib: float) -> list[dict]:
    """Records of one case: time ratio, saved and peak memory, largest batch in budget."""
    models = {s: case.build(s).to(device) for s in systems}
    x = case.input().to(device)
    twins = {TWIN.get(s, "plain") for s in systems} & set(systems)
    steps = {s: functools.partial(step_time, m, x) for s, m in models.items()}
    steps.update({f"{t}+forward": functools.partial(floor_step_time, models[t], x)
                  for t in sorted(twins)})
    times = interleaved(steps, rounds)
    records = []
    for system, model in models.items():
        twin = TWIN.get(system, "plain")
        saved = activation_memory(model, x.detach().requires_grad_())
        # Saved bytes are linear in the batch: two points give the largest batch in budget.
        half = max(1, case.batch // 2)
        saved_half = activation_memory(model, case.input(half).to(device).requires_grad_())
        per_sample = (saved - saved_half) / (case.batch - half) if case.batch > half else saved
        fixed = saved - per_sample * case.batch + sum(
            p.numel() * p.element_size() * 2 for p in model.parameters())  # weights + grads
        records.append({
            "case": case.kind, "label": case.label(), "system": system, "baseline": twin,
            "depth": case.depth, "batch": case.batch, "model": case.name or None,
            "rounds": rounds,
            "step_seconds": statistics.median(times[system]),
            "step_time_ratio": median_ratio(times[system], times[twin]),
            # The twin's step plus one no-grad forward, over the twin's step, same rounds.
            "recompute_floor": median_ratio(times[f"{twin}+forward"], times[twin]),
            # The system's step over that floor, same rounds: what it costs beyond the
            # recompute every memory-free method pays.
            "floor_ratio": median_ratio(times[system], times[f"{twin}+forward"]),
            "saved_mib": saved / MIB,
            "saved_bytes_per_element": saved / x.numel(),
            "peak_mib": peak_memory_mib(case, system, device) if peak else None,
            "max_batch_at_budget": int((budget_gib * 2**30 - fixed) // max(per_sample, 1)),
        })
    return records


def plan(quick: bool) -> list[tuple[Case, int]]:
    """The cases, each with its number of timing rounds."""
    if quick:  # every kind of case, tiny, no peak measurement (one process each)
        return [(Case("conv", 4, depth=3, width=8, size=8), 1),
                (Case("cifar", 2, name="resnet20", size=16), 1),
                (Case("transformer", 2, depth=2, width=32, size=8), 1)]
    return [(Case("conv", 32, depth=8), 7), (Case("conv", 32, depth=32), 7),
            (Case("conv", 32, depth=128), 3), (Case("conv", 32, depth=256), 3),
            (Case("conv", 8, depth=32), 7),
            (Case("cifar", 64, name="resnet56", size=16, in_channels=1), 9),  # momres demo
            (Case("cifar", 128, name="resnet110", size=32), 3),
            (Case("cifar", 32, name="revnet110", size=32), 3),
            (Case("imagenet", 2, name="resnet50", size=224), 3),
            (Case("imagenet", 2, name="resnet101", size=224), 3),
            (Case("transformer", 16, depth=12, width=256, size=128), 3)]


def format_table(records: list[dict]) -> str:
    """Markdown: one row per case and system."""
    lines = ["| case | system | step time vs twin | recompute floor | vs floor | saved MiB "
             "| bytes/element | peak MiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if r["system"] == r["baseline"] and r["system"] != "plain":
            continue  # the twins of revnet and momentumnet appear through their ratio
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['label']} | {r['system']} | {r['step_time_ratio']:.2f}x | "
                     f"{r['recompute_floor']:.2f}x | {r['floor_ratio']:.2f}x | "
                     f"{r['saved_mib']:.1f} | {r['saved_bytes_per_element']:.1f} | {peak} |")
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> list[Path]:
    """Saved memory and step-time ratio against depth, for the conv stage at batch 32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage = [r for r in records if r["case"] == "conv" and r["batch"] == max(
        q["batch"] for q in records if q["case"] == "conv")]
    paths = []
    for key, label, log in (("saved_mib", "saved for backward (MiB)", True),
                            ("step_time_ratio", "step time / plain-autograd twin", False)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for system in dict.fromkeys(r["system"] for r in stage):
            points = sorted((r["depth"], r[key]) for r in stage if r["system"] == system)
            ax.plot(*zip(*points, strict=True), marker="o", label=system)
        if key == "step_time_ratio":
            floor = sorted((r["depth"], r["recompute_floor"]) for r in stage
                           if r["system"] == "plain")
            ax.plot(*zip(*floor, strict=True), "k--", label="recompute floor")
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / f"{key}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings, no peak memory (a smoke test)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, help="timing rounds for every case (default: "
                        "7 for small cases, 3 for large ones, 1 with --quick; with "
                        "--whole-model, 0 measures the peaks only)")
    parser.add_argument("--no-peak", action="store_true",
                        help="skip the peak-memory measurements (one process each)")
    parser.add_argument("--budget-gib", type=float, default=16.0,
                        help="memory budget for the largest-batch estimate (default 16)")
    parser.add_argument("--whole-model", action="store_true",
                        help="whole-model peaks instead: torchvision ResNet-50/101/152, ViT-B/16, "
                        "CIFAR ResNet-110 and a transformer under plain autograd, checkpointing, "
                        "momres' default and its least-peak plan (CPU)")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="with --whole-model: only these (resnet50, resnet101, resnet152, "
                        "vit_b_16, resnet110, transformer)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("momres: bench --device cuda, but no CUDA device is available.")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"momres: bench cannot create the output folder {args.out}: {error}"
                      ) from None
    if args.whole_model:
        if args.device != "cpu":
            raise ValueError("momres: bench --whole-model measures on the CPU only.")
        peaks.run(args.quick, args.out, args.rounds, resident=not (args.no_peak or args.quick),
                  only=args.models)
        return 0
    cases = plan(args.quick)
    systems, notes = available_systems()
    for note in notes:
        print(f"[bench] note: {note}", flush=True)
    records: list[dict] = []
    for n, (case, rounds) in enumerate(cases, 1):
        print(f"[bench] {n}/{len(cases)} {case.label()}", flush=True)
        records += measure(case, case.systems(systems), args.rounds or rounds, args.device,
                           peak=not (args.no_peak or args.quick),
                           budget_gib=args.budget_gib)
        # Written after every case: an interrupted run keeps what it measured.
        (args.out / "bench.json").write_text(json.dumps(
            {"records": records, "machine": machine(), "notes": notes,
             "command": " ".join(sys.argv)}, indent=2))
    plot(records, args.out)
    print(format_table(records))
    return 0
