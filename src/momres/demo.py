"""Show what a momentum stage saves: activation memory and step time against plain autograd."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .bench import format_table, machine, stage_records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per depth")


def run(args: argparse.Namespace) -> int:
    print("momres demo: a stage of conv3x3-BN-ReLU-conv3x3-BN blocks (32 channels, 16x16,"
          " batch 32),\nplain autograd against the memory-free momentum stage (gamma = 0.9)\n",
          flush=True)
    records = stage_records([8, 16, 32, 64, 128], rounds=args.rounds,
                            progress=lambda s: print(f"  measuring {s} ...", flush=True))
    table = format_table(records)
    print("\nbytes saved for backward (MiB) and step time relative to plain autograd:\n")
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(
        json.dumps({"records": records, "machine": machine()}, indent=2)
    )
    print(f"\nwritten: {args.out / 'demo.json'}")
    return 0
