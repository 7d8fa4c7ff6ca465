"""Plan how each stage of a registry model runs: least peak, or fastest within a budget.

Measures one training step of the model on a random batch under each strategy (traced on the
CPU), and prints the plan: per stage its strategy, what it stores, its working set and its
share of the step time, with the predicted peak against plain autograd's and the traced peak of
the plan itself.
"""

from __future__ import annotations

import argparse

import torch

from ..models import create_model, list_models
from ..models.cifar import CifarResNet
from ..plan import EXACT_MODES, parse_bytes, plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help=f"a momentum model of the registry ({', '.join(list_models('m*'))})")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--image-size", type=int,
                        help="image side (default: 32 for CIFAR ResNets, 224 otherwise)")
    parser.add_argument("--budget", help="peak memory budget, e.g. 2GiB or 500MB (default: the "
                        "plan with the least peak)")
    parser.add_argument("--allow-float", action="store_true",
                        help="also consider the float inverse (exact=False), whose gradients "
                        "drift from plain autograd's")


def run(args: argparse.Namespace) -> int:
    if args.budget is not None:
        parse_bytes(args.budget)  # refused before building anything
    if args.batch_size < 1:
        raise ValueError(f"momres: --batch-size must be at least 1, got {args.batch_size}.")
    model = create_model(args.model)
    size = args.image_size or (32 if isinstance(model, CifarResNet) else 224)
    x = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    modes = (*EXACT_MODES, "float") if args.allow_float else EXACT_MODES
    print(f"{args.model}, batch {args.batch_size}, {size}x{size}:")
    print(plan(model, x, budget=args.budget, modes=modes))
    return 0
