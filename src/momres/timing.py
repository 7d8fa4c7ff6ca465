"""Step time, measured so that machine noise hits every system alike.

Within one run, every system is timed interleaved, round by round (``interleaved``), and a
system's figure is the median over rounds of its step time divided by a baseline's in the same
round.  A memory-free system is judged against the recompute floor (``floor_step_time``: one
more forward pass without grad, then the step): what rebuilding activations costs, however it
is done.  The benchmark scripts keep freed memory for reuse, as the ``momres`` command does
(``memory.keep_freed_memory``; ``--glibc-malloc`` leaves glibc's defaults): under the defaults
every step faults its tensors' pages in again, a cost that grows with the bytes a system
allocates rather than with its work, and that a GPU's caching allocator does not have.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import memory


def step_time(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds for one training step: forward, a scalar loss, backward."""
    x = x.detach().requires_grad_()
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(x).float().square().mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def floor_step_time(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds for one more forward pass without grad, then one training step.

    What rebuilding the activations costs, however it is done: the reference ("recompute
    floor") against which memory-free systems are best judged.
    """
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    if x.is_cuda:  # the forward's kernels belong to this time, not to the step's
        torch.cuda.synchronize()
    return time.perf_counter() - start + step_time(model, x)


def interleaved(steps: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Every step once per round, after one warm-up round: the times of each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(step())
    return times


def median_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``times`` over ``reference`` in the same round (``interleaved``)."""
    return statistics.median(a / b for a, b in zip(times, reference, strict=True))


def add_allocator_option(parser: argparse.ArgumentParser) -> None:
    """``--glibc-malloc`` for a benchmark script (see ``set_allocator``)."""
    parser.add_argument("--glibc-malloc", action="store_true",
                        help="leave glibc's malloc defaults (every step faults its tensors' "
                             "pages in again) instead of keeping freed memory for reuse")


def set_allocator(args: argparse.Namespace) -> str:
    """Keep freed memory for reuse unless ``args.glibc_malloc``; the condition, in words."""
    if not args.glibc_malloc and memory.keep_freed_memory():
        return "allocator: freed memory kept for reuse (glibc told not to unmap or trim)"
    return "allocator: glibc's malloc defaults"
