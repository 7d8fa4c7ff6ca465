"""Issues 12 and 15 on a GPU, in one short run for a lent device (about 5 minutes on an H100).

    python benchmarks/gpu_check.py --out "$OUT"            # CUDA
    python benchmarks/gpu_check.py --device cpu --quick    # the same code at toy sizes

Part 1, whole-model peaks (issue 12): for each model of ``momres bench --whole-model`` (ResNet-50
/101/152 at batch 16, 224², ViT-B/16 at batch 8, CIFAR ResNet-110 at batch 128, the 12-layer
transformer encoder), the peak of one training step above what was allocated before it
(``momres.memory.peak_bytes``: ``torch.cuda.max_memory_allocated`` on CUDA) and the step time,
interleaved, for plain autograd, ``torch.utils.checkpoint`` over sqrt(n) segments per stage,
momres's default, and momres with every stage exact, float, or checkpointed in segments of
ceil(sqrt(n)) blocks (the first blocks of each stage checkpointed in those three).

Part 2, step time where tensors are small (issue 15): the demo configuration (ResNet-56,
1x16x16, batch 64) and CIFAR ResNet-110 (3x32x32, batch 128), the ResNet's step, the recompute
floor, and the momentum twin exact, float and under autograd; then exact and float again with
the exact arithmetic compiled (``MOMRES_FUSE=1``, ``torch.compile``; float mode has no compiled
path, so its second run is a repeat), first-use time printed.

Everything is printed and written to ``OUT/gpu_check.json`` as it goes, so that a run cut short
by the device's time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from momres import memory
from momres._io import machine
from momres.cli.peaks import Model, build
from momres.convert import momentum_stages
from momres.models import create_model
from momres.momentum import Strategy
from momres.plan import sqrt_segment
from momres.timing import interleaved, median_ratio, step_time

WHOLE = [Model("resnet", "resnet50", 16, 224), Model("resnet", "resnet101", 16, 224),
         Model("resnet", "resnet152", 16, 224), Model("vit", "vit_b_16", 8, 224),
         Model("cifar", "resnet110", 128, 32), Model("transformer", "transformer", 4, 512)]
QUICK = [Model("cifar", "resnet20", 4, 16), Model("transformer", "transformer", 2, 8, width=32,
                                                  layers=4)]
SMALL = {"demo": (56, 64, 1, 16), "resnet110": (110, 128, 3, 32)}
MOMENTUM = {"exact": {}, "float": {"exact": False}, "autograd": {"memory_efficient": False}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device):
    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        return time.perf_counter() - start
    return run


def whole_model(model: Model, device: torch.device, rounds: int) -> list[dict]:
    """Peak and step time of every system on ``model``."""
    x = model.input().to(device)
    nets = {name: build(model, name) for name in ("plain", "checkpoint")}
    nets["momres-default"] = model.momentum()
    for mode in ("exact", "float", "checkpoint-segments"):
        net = model.momentum()
        for stage in momentum_stages(net).values():
            segment = sqrt_segment(len(stage.momentum.functions))
            stage.strategy = (Strategy("checkpoint", segment=segment)
                              if mode == "checkpoint-segments" else Strategy(mode))
            stage.checkpoint = True
        nets[f"momres-{mode}"] = net
    for net in nets.values():
        net.to(device)
    # The step of ``momres bench --whole-model``: forward, a squared mean, backward.
    steps = {name: (lambda net=net: step_time(net, x)) for name, net in nets.items()}
    peaks = {}
    for name, step in steps.items():
        step()  # warm-up: kernels chosen, gradients allocated
        peaks[name] = memory.peak_bytes(step, device)
    times = interleaved(steps, rounds)
    records = []
    for name in steps:
        records.append({"part": "whole-model", "model": model.label(), "system": name,
                        "peak_bytes": peaks[name], "peak_ratio": peaks[name] / peaks["plain"],
                        "vs_checkpoint_peak": peaks[name] / peaks["checkpoint"],
                        "step_seconds": statistics.median(times[name]),
                        "time_ratio": median_ratio(times[name], times["plain"]),
                        "vs_checkpoint_time": median_ratio(times[name], times["checkpoint"])})
        r = records[-1]
        print(f"{model.label()}: {name}: peak {r['peak_bytes'] / 2**20:.0f} MiB "
              f"({r['peak_ratio']:.2f}x plain, {r['vs_checkpoint_peak']:.2f}x checkpoint), time "
              f"{r['time_ratio']:.2f}x plain, {r['vs_checkpoint_time']:.2f}x checkpoint",
              flush=True)
    for net in nets.values():
        net.to("cpu")
    return records


def small_tensors(config: str, device: torch.device, rounds: int, quick: bool) -> list[dict]:
    """Issue 15's table on ``config``: ratios to the ResNet and to the recompute floor."""
    depth, batch, channels, size = SMALL[config]
    if quick:
        depth, batch = 44, 4  # the smallest whose stages run memory-free by default
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def make(name: str, **options) -> torch.nn.Module:
        torch.manual_seed(0)
        return create_model(name, num_classes=10, in_channels=channels, **options).to(device)

    def step(model: torch.nn.Module, floor: bool = False) -> None:
        if floor:
            with torch.no_grad():
                model(x)
        F.cross_entropy(model(x), y).backward()

    resnet = make(f"resnet{depth}")
    steps = {"resnet": lambda: step(resnet), "floor": lambda: step(resnet, floor=True)}
    for mode, options in MOMENTUM.items():
        net = make(f"mresnet{depth}", **options)
        steps[mode] = (lambda net=net: step(net))
    fuse = os.environ.get("MOMRES_FUSE")
    os.environ["MOMRES_FUSE"] = "1"  # the same two modes with the arithmetic compiled
    try:
        for mode in ("exact", "float"):
            net = make(f"mresnet{depth}", **MOMENTUM[mode])
            start = time.perf_counter()
            step(net)  # first use: compiles
            synchronize(device)
            print(f"{config}: {mode} fused: first step {time.perf_counter() - start:.1f} s",
                  flush=True)
            steps[f"{mode} fused"] = (lambda net=net: step(net))
        times = interleaved({k: timed(s, device) for k, s in steps.items()}, rounds)
    finally:
        if fuse is None:
            del os.environ["MOMRES_FUSE"]
        else:
            os.environ["MOMRES_FUSE"] = fuse
    records = []
    for name, t in times.items():
        records.append({"part": "small", "config": config, "system": name,
                        "step_seconds": statistics.median(t),
                        "vs_resnet": median_ratio(t, times["resnet"]),
                        "vs_floor": median_ratio(t, times["floor"])})
        print(f"{config}: {name}: {statistics.median(t) * 1e3:.1f} ms, "
              f"{records[-1]['vs_resnet']:.2f}x resnet, {records[-1]['vs_floor']:.2f}x floor",
              flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="toy sizes, 2 rounds (a smoke test)")
    parser.add_argument("--skip-whole", action="store_true", help="part 2 only")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run with --device cpu for the smoke test.")
    device = torch.device(args.device)
    if device.type == "cpu":
        memory.keep_freed_memory()
    rounds = 2 if args.quick else args.rounds
    args.out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {card}, torch {torch.__version__}", flush=True)
    results = {"device": card, "machine": machine(), "records": []}

    def save(records: list[dict]) -> None:
        results["records"] += records
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2))

    for config in SMALL:  # the quick one first
        save(small_tensors(config, device, rounds, args.quick))
    if not args.skip_whole:
        for model in QUICK if args.quick else WHOLE:
            save(whole_model(model, device, rounds))


if __name__ == "__main__":
    main()
