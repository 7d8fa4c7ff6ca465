"""Does the fused (compiled) exact step pay on this machine?  Conv stage, interleaved.

    python benchmarks/fusion.py [--depth 32] [--rounds 9]

Prints the median step time of plain autograd, the exact memory-free stage with eager and with
fused kernels (``MOMRES_FUSE``), and float mode, each as a ratio to plain autograd in the same
round.  The first fused step compiles (tens of seconds, then cached on disk).
"""

import argparse
import os
import statistics
import time

import torch

from momres.bench import conv_stage, interleaved, step_time


def with_fusion(setting: str, model: torch.nn.Module, x: torch.Tensor) -> float:
    os.environ["MOMRES_FUSE"] = setting
    try:
        return step_time(model, x)
    finally:
        os.environ["MOMRES_FUSE"] = "0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    x = torch.randn(32, 32, 16, 16)
    plain, exact, flt = (conv_stage(s, args.depth) for s in
                         ("plain", "momres-exact", "momres-float"))
    start = time.perf_counter()
    with_fusion("auto", exact, x)
    print(f"first fused step (compiles): {time.perf_counter() - start:.1f} s")
    steps = {
        "plain": lambda: step_time(plain, x),
        "exact, eager": lambda: with_fusion("0", exact, x),
        "exact, fused": lambda: with_fusion("auto", exact, x),
        "float": lambda: step_time(flt, x),
    }
    times = interleaved(steps, args.rounds)
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, times["plain"], strict=True))
        print(f"{name:>13}: {statistics.median(t):.3f} s  {ratio:.2f}x plain")


if __name__ == "__main__":
    main()
