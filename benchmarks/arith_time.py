"""Per-block time of the exact arithmetic alone, eager against the fused C kernels, interleaved.

    python benchmarks/arith_time.py [--config demo|resnet110] [--rounds 9] [--threads N]

For each stage size of the configuration (``demo``: batch 64 at 16x16x16, 32x8x8, 64x4x4;
``resnet110``: batch 128 at 16x32x32, 32x16x16, 64x8x8), runs ``ExactInversion`` over 8 blocks
on random float32 values, gamma = 0.9, with ``MOMRES_KERNELS=0`` and ``1`` in turn: forward
(``start``, then ``position`` and ``advance`` per block) and backward (``retreat`` and
``rebuild`` per block).  Prints the median microseconds per block and direction.  No block
runs: this is the arithmetic that the block profile (``block_profile.py``) charges to it.
"""

import argparse
import os
import statistics
import time

import torch

from momres._rule import Rule

SHAPES = {"demo": [(64, 16, 16, 16), (64, 32, 8, 8), (64, 64, 4, 4)],
          "resnet110": [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]}
DEPTH = 8


def blocks(rule: Rule, x: torch.Tensor, gs: list[torch.Tensor], kernels: bool
           ) -> tuple[float, float]:
    """Seconds per block of the forward and of the backward arithmetic."""
    os.environ["MOMRES_KERNELS"] = "1" if kernels else "0"
    forward = rule.inversion(x.dtype, DEPTH)
    start = time.perf_counter()
    forward.start(x, torch.zeros_like(x))
    for n, g in enumerate(gs):
        forward.position()
        forward.advance(n, g)
    middle = time.perf_counter()
    _, _, saved, layout = forward.finish()
    backward = rule.inversion(x.dtype, DEPTH)
    backward.resume(saved, layout)
    resumed = time.perf_counter()
    for n in reversed(range(DEPTH)):
        backward.retreat()
        backward.rebuild(n, gs[n])
    end = time.perf_counter()
    backward.verify()
    return (middle - start) / DEPTH, (end - resumed) / DEPTH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rule = Rule(9, 10, True, 30)
    print(f"{args.config}, {args.rounds} rounds, {args.threads} threads; us per block")
    print("| elements | forward eager | forward C | backward eager | backward C |")
    print("|---:|---:|---:|---:|---:|")
    for shape in SHAPES[args.config]:
        torch.manual_seed(0)
        x = torch.randn(shape)
        gs = [torch.randn(shape) for _ in range(DEPTH)]
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for kernels in times:
                times[kernels].append(blocks(rule, x, gs, kernels))
        med = {(k, d): statistics.median(t[d] for t in ts) * 1e6
               for k, ts in times.items() for d in (0, 1)}
        print(f"| {x.numel()} | {med[False, 0]:.0f} | {med[True, 0]:.0f} | {med[False, 1]:.0f} "
              f"| {med[True, 1]:.0f} |")
    del os.environ["MOMRES_KERNELS"]


if __name__ == "__main__":
    main()
