"""The ``momres`` command: one entry point, one module per subcommand.

Each subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int``; its
docstring's first line is the subcommand's help.  The commands sit on top of the library and
share what they need through it, never through each other.  Errors reach the user one way:
momres's own (messages that start with "momres:") are printed without a traceback and exit 2;
anything else is a bug and keeps its traceback.

The command keeps freed CPU memory for reuse (``memory.keep_freed_memory``: glibc's malloc
told neither to unmap nor to trim, as CUDA's allocator caches), so that training steps do not
fault their activations' pages in again every step; ``MOMRES_KEEP_FREED_MEMORY=0`` leaves
glibc's defaults.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

import torch.distributed as dist

from .. import memory

#: subcommand -> module under ``momres.cli``
COMMANDS = {
    "demo": "demo",
    "bench": "bench",
    "plan": "plan",
    "train": "train",
    "experiment": "experiments",
}

#: Exception types whose "momres: ..." messages are the user's to act on.
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError, OverflowError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="momres",
        description="Momentum Residual Networks: exact, memory-free training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"{__name__}.{module_name}")
        summary = (module.__doc__ or "").strip().splitlines()[0]
        module.add_arguments(sub.add_parser(name, help=summary, description=summary))
        modules[name] = module
    args = parser.parse_args(argv)
    if os.environ.get("MOMRES_KEEP_FREED_MEMORY", "1") != "0":
        memory.keep_freed_memory()
    return report_errors(lambda: modules[args.command].run(args))


def report_errors(action: Callable[[], int | None]) -> int:
    """Run ``action``: its exit status, or 2 after printing a momres error (no traceback), or
    130 when interrupted."""
    try:
        status = int(action() or 0)
        if dist.is_initialized():
            # No rank tears the process group down while another still talks to it (rank 0
            # writes the last checkpoint): gloo aborts a process whose peer left mid-talk.
            dist.barrier()
        return status
    except USER_ERRORS as error:
        if not str(error).startswith("momres:"):
            raise
        print(error, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("momres: interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
