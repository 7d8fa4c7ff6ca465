"""Reproduce the paper's claims, one experiment per subcommand, each with figures and a result."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

#: experiment name -> module under ``momres.cli.experiments``
EXPERIMENTS = ("dynamics1d", "rings", "linear", "l2o", "memory", "finetune", "lm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for name in EXPERIMENTS:
        module = importlib.import_module(f"{__name__}.{name}")
        summary = (module.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=summary, description=f"{summary}\n\nClaim: {module.CLAIM}")
        p.add_argument("--out", type=Path, required=True, help="output folder")
        p.add_argument("--full", action="store_true",
                       help="paper-scale settings (slower) instead of the quick defaults")
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"momres: --out {args.out} is a file; give a folder (it is created if "
                         "missing).")
    if args.seed < 0:
        raise ValueError(f"momres: --seed must be a non-negative integer, got {args.seed}.")
    module = importlib.import_module(f"{__name__}.{args.experiment}")
    config = module.FULL if args.full else module.Config()
    module.run(args.out, config, seed=args.seed)
    return 0
