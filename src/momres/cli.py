"""The ``momres`` command: one entry point, one module per subcommand.

Each subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int``; its
docstring's first line is the subcommand's help.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> module under ``momres``
COMMANDS = {
    "demo": "demo",
    "bench": "bench",
    "train": "train",
    "experiment": "experiments",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="momres",
        description="Momentum Residual Networks: exact, memory-free training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"momres.{module_name}")
        summary = (module.__doc__ or "").strip().splitlines()[0]
        module.add_arguments(sub.add_parser(name, help=summary, description=summary))
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("momres: interrupted", file=sys.stderr)
        return 130
