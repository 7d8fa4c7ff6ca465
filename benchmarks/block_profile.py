"""Where a training step's time goes, per block and direction: the demo configuration and
CIFAR ResNet-110, plain ResNet against its momentum twin in each mode.

    python benchmarks/block_profile.py [--config demo|resnet110] [--steps 3]

Each step (forward, cross-entropy, backward) runs under ``torch.profiler`` with Python
frames recorded; every operator's own CPU time is charged to one category by what it is and
where it was called from: the blocks' convolutions; their other layers (BatchNorm, ReLU, the
block's own skip); the exact arithmetic (``_exact``, the C kernels called by ``_kernels``, and
the inversion's steps in ``_rule``: for float mode, its floating-point rule); the rule under
autograd (``RuleStep``); the memory-free backward's own elementwise work on the gradients
(``a_x``, ``b``) and ``g = y - x``; and the rest
(Python and autograd bookkeeping: replaying the block, the recompute's arguments, its gradient
call).  The profiler slows Python down, so read shares, not absolute times; time the
steps themselves with ``momres bench`` or ``stage_time.py``.
"""

import argparse
import collections

import torch
import torch.nn.functional as F

from momres.convert import MomentumStage
from momres.models import create_model

CONFIGS = {"demo": ("resnet56", 64, 1, 16), "resnet110": ("resnet110", 128, 3, 32)}
INVERSION = ("start", "position", "advance", "finish", "resume", "retreat", "rebuild", "verify")


def category(event) -> str:
    """The category an operator's own time belongs to (see the module docstring)."""
    name, parent = event.name, event.cpu_parent
    ancestors = []
    while parent is not None:
        ancestors.append(parent.name)
        parent = parent.cpu_parent
    # The event itself too: the C kernels' time is the self time of the Python frame that
    # calls them (_kernels.py), which records no operator.
    if any("_exact.py" in a or "_kernels.py" in a or ("_rule.py" in a and a.endswith(INVERSION))
           for a in [name, *ancestors]):
        return "exact arithmetic / float rule"
    if any(a.startswith("RuleStep") for a in ancestors + [name]):
        return "rule under autograd"
    if "onvolution" in name:
        return "convolutions"
    caller = next((a for a in ancestors if ".py(" in a), "")
    if name.startswith("aten::") and ("momres/_rule.py" in caller
                                      or "momres/_recompute.py" in caller):
        return "gradients and g = y - x"
    if name.startswith("aten::") or "Backward" in name:
        return "other layers"
    return "Python and autograd bookkeeping"


def profile(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict:
    """Milliseconds per step in each category."""
    def step():
        F.cross_entropy(model(x.requires_grad_()), y).backward()

    step()
    with torch.profiler.profile(with_stack=True) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        totals[category(event)] += event.self_cpu_time_total / 1e3 / steps
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="demo")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    name, batch, channels, size = CONFIGS[args.config]
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    y = torch.randint(0, 10, (batch,))
    systems = {"resnet": (name, {}), "exact": ("m" + name, {}),
               "float": ("m" + name, {"exact": False}),
               "autograd": ("m" + name, {"memory_efficient": False})}
    rows = {}
    for system, (model_name, options) in systems.items():
        torch.manual_seed(0)
        model = create_model(model_name, num_classes=10, in_channels=channels, **options)
        rows[system] = profile(model.train(), x, y, args.steps)
    blocks = sum(len(m.momentum.functions) for m in model.modules()
                 if isinstance(m, MomentumStage))
    names = sorted({c for row in rows.values() for c in row})
    print(f"{args.config}: {name}, {channels}x{size}x{size}, batch {batch}, {blocks} momentum "
          f"blocks, {torch.get_num_threads()} threads; ms per step (profiled)")
    print("| category | " + " | ".join(rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for c in names:
        print(f"| {c} | " + " | ".join(f"{row.get(c, 0):.1f}" for row in rows.values()) + " |")
    print("| total | " + " | ".join(f"{sum(row.values()):.1f}" for row in rows.values()) + " |")
    exact = rows["exact"]["exact arithmetic / float rule"]
    print(f"exact arithmetic per momentum block and direction: {exact / blocks / 2 * 1e3:.0f} us")


if __name__ == "__main__":
    main()
