"""Benchmark memory-free momentum stages against plain autograd (time and memory).

Method: every system is timed in the same run, interleaved round by round so that machine
noise hits all of them alike; a system's figure is the median over rounds of its step time
divided by the plain-autograd step time of the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .memory import activation_memory
from .momentum import MomentumNet

MIB = 2**20

#: system name -> MomentumNet options.  "plain" is the same rule under plain autograd.
SYSTEMS: dict[str, dict] = {
    "plain": {"memory_efficient": False},
    "momres-exact": {"memory_efficient": True, "exact": True},
    "momres-float": {"memory_efficient": True, "exact": False},
}


def conv_block(channels: int = 32) -> nn.Module:
    """The residual branch used throughout: conv3x3-BN-ReLU-conv3x3-BN."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
    )


def conv_stage(system: str, depth: int, channels: int = 32, gamma: float = 0.9) -> MomentumNet:
    torch.manual_seed(0)
    return MomentumNet([conv_block(channels) for _ in range(depth)], gamma, **SYSTEMS[system])


def step_time(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds for one forward + backward pass."""
    x = x.detach().requires_grad_()
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(x).float().square().mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_ratios(
    steps: dict[str, Callable[[], float]], rounds: int, baseline: str = "plain"
) -> dict[str, dict[str, float]]:
    """Run every step once per round (after one warm-up); median time and ratio to baseline."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(step())
    return {
        name: {
            "step_seconds": statistics.median(t),
            "step_time_ratio": statistics.median(
                a / b for a, b in zip(t, times[baseline], strict=True)
            ),
        }
        for name, t in times.items()
    }


def stage_records(
    depths: list[int], batch: int = 32, channels: int = 32, size: int = 16, rounds: int = 5,
    systems: tuple[str, ...] = ("plain", "momres-exact", "momres-float"),
    device: str = "cpu", progress: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """Step-time ratio and bytes saved for backward of conv stages, per depth and system."""
    records = []
    for depth in depths:
        progress(f"depth {depth}")
        x = torch.randn(batch, channels, size, size, device=device)
        models = {s: conv_stage(s, depth, channels).to(device) for s in systems}
        timing = interleaved_ratios(
            {s: (lambda m=m, x=x: step_time(m, x)) for s, m in models.items()}, rounds
        )
        for system, model in models.items():
            saved = activation_memory(model, x.detach().requires_grad_())
            records.append({
                "system": system, "depth": depth, "batch": batch, **timing[system],
                "saved_mib": saved / MIB, "saved_bytes_per_element": saved / x.numel(),
            })
    return records


def peak_rss_mib(system: str, depth: int, batch: int = 32, channels: int = 32,
                 size: int = 16) -> float:
    """Peak resident memory (MiB) of a fresh process after one training step of a conv stage.

    A separate process per configuration: the peak of one process says nothing about the next
    configuration once memory has been touched.  glibc is told to map every allocation above
    64 KiB on its own, so that freed tensors leave the process at once and the peak follows
    the live tensors instead of the heap's fragmentation.  Compare differences between
    depths, not absolute values (they include the interpreter and torch itself).
    """
    code = (f"from momres.bench import _peak_rss_child; "
            f"_peak_rss_child({system!r}, {depth}, {batch}, {channels}, {size})")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def _peak_rss_child(system: str, depth: int, batch: int, channels: int, size: int) -> None:
    model = conv_stage(system, depth, channels)
    step_time(model, torch.randn(batch, channels, size, size))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB


def format_table(records: list[dict]) -> str:
    systems = list(dict.fromkeys(r["system"] for r in records))
    head = ["depth"] + [f"{s} saved MiB" for s in systems] + [
        f"{s} time" for s in systems if s != "plain"
    ]
    rows = []
    for depth in dict.fromkeys(r["depth"] for r in records):
        by = {r["system"]: r for r in records if r["depth"] == depth}
        rows.append([str(depth)] + [f"{by[s]['saved_mib']:.1f}" for s in systems] + [
            f"{by[s]['step_time_ratio']:.2f}x" for s in systems if s != "plain"
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small settings (a smoke test)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("momres bench: --device cuda, but no CUDA device is available.")
    depths, rounds, batch = ([2, 4], 1, 4) if args.quick else ([8, 32, 128], 7, 32)
    records = stage_records(depths, batch=batch, rounds=rounds, device=args.device,
                            progress=lambda s: print(f"[bench] {s}", flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(
        json.dumps({"records": records, "machine": machine()}, indent=2)
    )
    print(format_table(records))
    return 0
