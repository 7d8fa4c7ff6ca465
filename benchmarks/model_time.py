"""Training-step time of a CIFAR ResNet and its momentum twin in each mode, interleaved.

    python benchmarks/model_time.py [--config demo|resnet110] [--rounds 9] [--threads N]

``demo`` is ``momres demo``'s configuration (ResNet-56, 1x16x16, batch 64), ``resnet110`` CIFAR
ResNet-110 at 3x32x32, batch 128.  A step is forward, cross-entropy, backward.  Prints each
system's median step time and its median ratio, over rounds, to the ResNet's step and to the
recompute floor (the ResNet's step plus one more forward pass without grad) of the same round.
"""

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from momres.models import create_model
from momres.timing import add_allocator_option, interleaved, median_ratio, set_allocator

CONFIGS = {"demo": (56, 64, 1, 16), "resnet110": (110, 128, 3, 32)}
MODES = {"exact": {}, "float": {"exact": False}, "autograd": {"memory_efficient": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="demo")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_allocator_option(parser)
    args = parser.parse_args()
    print(set_allocator(args), flush=True)
    torch.set_num_threads(args.threads)
    depth, batch, channels, size = CONFIGS[args.config]
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    y = torch.randint(0, 10, (batch,))

    def step(model: torch.nn.Module, floor: bool = False) -> float:
        start = time.perf_counter()
        if floor:
            with torch.no_grad():
                model(x)
        F.cross_entropy(model(x.detach().requires_grad_()), y).backward()
        return time.perf_counter() - start

    def build(name: str, **options) -> torch.nn.Module:
        torch.manual_seed(0)
        return create_model(name, num_classes=10, in_channels=channels, **options).train()

    resnet = build(f"resnet{depth}")
    steps = {"resnet": functools.partial(step, resnet),
             "recompute floor": functools.partial(step, resnet, floor=True)}
    steps |= {mode: functools.partial(step, build(f"mresnet{depth}", **options))
              for mode, options in MODES.items()}
    times = interleaved(steps, args.rounds)
    print(f"{args.config}: resnet{depth}, {channels}x{size}x{size}, batch {batch}, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads")
    for name, t in times.items():
        ratios = [median_ratio(t, times[ref]) for ref in ("resnet", "recompute floor")]
        print(f"{name:>15}: {statistics.median(t):.3f} s  {ratios[0]:.2f}x resnet  "
              f"{ratios[1]:.2f}x floor")


if __name__ == "__main__":
    main()
