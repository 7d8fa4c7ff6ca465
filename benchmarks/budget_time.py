"""Issue 12's budget target: at checkpointing's peak as the budget, is the plan as fast?

For each model: trace the peak of a training step under ``torch.utils.checkpoint`` (about
sqrt(n) segments per stage, ``momres bench --whole-model``'s ``checkpoint`` system), plan the
momentum twin with that peak as its budget (``momres.plan``, verified: a plan whose traced peak
is over is chosen again), print the plan with its predicted and traced peaks, then time plain
autograd, checkpointing and the plan interleaved, round by round, and report median ratios.

    python benchmarks/budget_time.py --models resnet110 --rounds 9 --threads 2
"""

from __future__ import annotations

import argparse
import os

import torch

import momres
from momres.cli.peaks import Model, build
from momres.plan import format_bytes, traced_peak
from momres.timing import add_allocator_option, interleaved, median_ratio, set_allocator, step_time

MODELS = {
    "resnet50": Model("resnet", "resnet50", 16, 224),
    "resnet101": Model("resnet", "resnet101", 16, 224),
    "resnet110": Model("cifar", "resnet110", 128, 32),
    "resnet20": Model("cifar", "resnet20", 8, 16),  # a quick look, not a target
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet101", "resnet110"],
                        choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    add_allocator_option(parser)
    args = parser.parse_args()
    print(set_allocator(args), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}", flush=True)
    for name in args.models:
        measure_at_checkpointings_peak(MODELS[name], args.rounds)


def measure_at_checkpointings_peak(model: Model, rounds: int) -> None:
    x = model.input()
    plain, checkpointed = build(model, "plain"), build(model, "checkpoint")
    budget = traced_peak(checkpointed, x)
    planned = model.momentum()
    # Verified: a plan whose traced peak is over the budget is chosen again, aiming lower.
    plan = momres.plan(planned, x, budget=budget)
    planned_peak = plan.traced_peak
    print(f"\n== {model.label()}: checkpointing's traced peak {format_bytes(budget)} "
          f"(plain {format_bytes(traced_peak(plain, x))})\n{plan}\n"
          f"traced peak of the plan {format_bytes(planned_peak)} "
          f"({planned_peak / budget - 1:+.1%} against the budget)", flush=True)
    nets = {"plain": plain, "checkpoint": checkpointed, "plan": planned}
    times = interleaved({k: (lambda net=net: step_time(net, x)) for k, net in nets.items()},
                        rounds)
    ratio = lambda a, b: median_ratio(times[a], times[b])  # noqa: E731
    print(f"{model.label()}: checkpoint {ratio('checkpoint', 'plain'):.3f}x plain; plan "
          f"{ratio('plan', 'plain'):.3f}x plain, **{ratio('plan', 'checkpoint'):.3f}x "
          f"checkpointing** ({rounds} rounds, load {os.getloadavg()[0]:.1f})", flush=True)

if __name__ == "__main__":
    main()
