"""Step time of the depth-32 conv stage, every way of training it, interleaved.

    python benchmarks/stage_time.py [--depth 32] [--batch 32] [--rounds 15] [--eager]

The measurement behind the core step-time target: plain autograd; plain autograd plus one more
forward pass without grad (the recompute floor: what rebuilding activations costs, however it
is done); torch.utils.checkpoint; momres float and exact (with the fused C kernels where they
build); with ``--eager``, exact with the eager arithmetic instead (``MOMRES_KERNELS=0``); and
the official ``momentumnet`` package when it is installed.
Prints each median step time and its median ratio to plain autograd and to the floor, over
rounds, and momres exact's step time over the official package's.
"""

import argparse
import functools
import importlib.util
import os
import statistics

import torch

from momres.baselines import conv_stage
from momres.timing import (
    add_allocator_option,
    floor_step_time,
    interleaved,
    median_ratio,
    set_allocator,
    step_time,
)


def eager_step_time(model: torch.nn.Module, x: torch.Tensor) -> float:
    os.environ["MOMRES_KERNELS"] = "0"
    try:
        return step_time(model, x)
    finally:
        del os.environ["MOMRES_KERNELS"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--eager", action="store_true",
                        help="also time exact mode with the eager arithmetic")
    add_allocator_option(parser)
    args = parser.parse_args()
    print(set_allocator(args), flush=True)
    x = torch.randn(args.batch, 32, 16, 16)
    systems = ["plain", "checkpoint", "momres-float", "momres-exact"]
    if importlib.util.find_spec("momentumnet"):
        systems.append("momentumnet")
    models = {s: conv_stage(s, args.depth) for s in systems}
    steps = {"plain": functools.partial(step_time, models["plain"], x),
             "recompute floor": functools.partial(floor_step_time, models["plain"], x)}
    steps |= {s: functools.partial(step_time, m, x) for s, m in models.items() if s != "plain"}
    if args.eager:
        steps["momres-exact eager"] = functools.partial(eager_step_time, models["momres-exact"],
                                                        x)
    times = interleaved(steps, args.rounds)
    print(f"depth {args.depth}, batch {args.batch}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    for name, t in times.items():
        ratios = [median_ratio(t, times[ref]) for ref in ("plain", "recompute floor")]
        print(f"{name:>19}: {statistics.median(t):.3f} s  {ratios[0]:.2f}x plain  "
              f"{ratios[1]:.2f}x floor")
    if "momentumnet" in times:
        ratio = median_ratio(times["momres-exact"], times["momentumnet"])
        print(f"momres exact / official momentumnet: {ratio:.2f}x")


if __name__ == "__main__":
    main()
