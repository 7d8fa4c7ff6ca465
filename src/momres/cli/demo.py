"""Train a ResNet and its Momentum twin side by side on the embedded digits; compare memory.

The README's first command. On scikit-learn's digits (no download), the two networks train
epoch by epoch in turn, so that machine noise hits both alike; then a table compares test
accuracy, peak training memory, activation memory and time, and ``OUT/report.md`` shows the
accuracy curves and how activation memory grows with depth for each.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import models
from .._io import atomic_write, machine, write_json
from ..data import load_dataset
from ..memory import MIB, activation_memory
from ..models.cifar import DEPTHS
from ..timing import floor_step_time, interleaved, median_ratio, step_time
from ..training import Config, Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    parser.add_argument("--depth", type=int, choices=DEPTHS, default=56,
                        help="depth of the two networks trained (default: 56)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)


def memory_by_depth(batch: torch.Tensor, gamma: float) -> list[dict]:
    """Activation memory of every CIFAR-family depth, ResNet and Momentum ResNet."""
    rows = []
    for depth in tqdm(DEPTHS, desc="activation memory by depth", unit="depth"):
        row = {"depth": depth}
        for prefix in ("", "m"):
            torch.manual_seed(0)
            options = {"gamma": gamma} if prefix else {}
            model = models.create_model(f"{prefix}resnet{depth}", num_classes=10, in_channels=1,
                                        **options)
            row[f"{prefix}resnet_mib"] = activation_memory(model.train(), batch) / MIB
        rows.append(row)
    return rows


def recompute_floor(depth: int, batch: torch.Tensor, rounds: int = 5) -> float:
    """A ResNet's training step plus one more forward pass without grad, over its step alone
    (median over interleaved rounds): the recompute every memory-free method pays."""
    torch.manual_seed(0)
    model = models.create_model(f"resnet{depth}", num_classes=10, in_channels=1).train()
    times = interleaved({"step": functools.partial(step_time, model, batch),
                         "floor": functools.partial(floor_step_time, model, batch)}, rounds)
    return median_ratio(times["floor"], times["step"])


def train_pair(args: argparse.Namespace) -> dict[str, dict]:
    """Train ``resnetD`` and ``mresnetD`` on digits, alternating epochs; their summaries."""
    trainers = {}
    for name in (f"resnet{args.depth}", f"mresnet{args.depth}"):
        out = args.out / f"train-{name}"
        for stale in ("checkpoint.pt", "best.pt"):  # of an earlier demo in the same folder
            (out / stale).unlink(missing_ok=True)
        trainers[name] = Trainer(Config(
            out=out, dataset="digits", model=name, gamma=args.gamma, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, warmup_epochs=min(1, args.epochs - 1),
            schedule="cosine", seed=args.seed, device="cpu",
        ))
    for epoch in range(args.epochs):
        for trainer in trainers.values():
            trainer.run_epoch(epoch)
    summaries = {}
    for name, trainer in trainers.items():
        summaries[name] = {**trainer.summary(), "records": trainer.records}
        write_json(trainer.out / "summary.json", summaries[name])
    return summaries


def table(summaries: dict[str, dict]) -> str:
    head = ["model", "test accuracy", "peak training memory", "activation memory", "s / epoch"]
    rows = [[name, f"{s['test_accuracy']:.1%}", f"{s['peak_memory_mib']:.1f} MiB",
             f"{s['activation_memory_mib']:.1f} MiB", f"{s['mean_epoch_seconds']:.1f}"]
            for name, s in summaries.items()]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def plot(summaries: dict[str, dict], depths: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, s in summaries.items():
        epochs = [r["epoch"] for r in s["records"]]
        axes[0].plot(epochs, [r["test_accuracy"] for r in s["records"]], marker="o", label=name)
        axes[1].plot(epochs, [r["train_loss"] for r in s["records"]], marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="test accuracy", title="digits: test accuracy")
    axes[1].set(xlabel="epoch", ylabel="training loss", title="digits: training loss")
    _save(fig, axes, out / "accuracy.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [row["depth"] for row in depths]
    ax.plot(x, [row["resnet_mib"] for row in depths], marker="o", label="ResNet")
    ax.plot(x, [row["mresnet_mib"] for row in depths], marker="o", label="Momentum ResNet")
    ax.set(xlabel="depth", ylabel="MiB saved for backward", title="activation memory vs depth")
    _save(fig, [ax], out / "memory_vs_depth.png")


def _save(fig, axes, path: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def report(args, summaries: dict[str, dict], depths: list[dict], floor: float,
           seconds: float) -> str:
    plain, momentum = summaries.values()
    saved = plain["activation_memory_mib"] / momentum["activation_memory_mib"]
    peak = plain["peak_memory_mib"] / momentum["peak_memory_mib"]
    slower = momentum["mean_epoch_seconds"] / plain["mean_epoch_seconds"]
    warmup = plain["warmup_epochs"]
    depth_rows = "\n".join(
        f"| {r['depth']} | {r['resnet_mib']:.1f} | {r['mresnet_mib']:.1f} | "
        f"{r['resnet_mib'] / r['mresnet_mib']:.1f}x |" for r in depths)
    return f"""# momres demo: ResNet-{args.depth} and its Momentum twin on digits

scikit-learn's digits (1,437 training and 360 test images, 16x16), {args.epochs} epochs each,
batch {args.batch_size}, SGD (lr {args.lr}, momentum 0.9, weight decay 5e-4, {warmup} warm-up
epoch from lr/10, then cosine),
gamma = {args.gamma}, seed {args.seed}; the two trained in turn, epoch by epoch, on the CPU.

{table(summaries)}

The Momentum ResNet keeps {saved:.1f}x less memory for its backward pass and peaks {peak:.1f}x
lower in training, at {slower:.2f}x the time per epoch of the ResNet, of which {floor:.2f}x is the
recompute every memory-free method pays (the ResNet's step plus one more forward pass, measured
beside it on a batch).

- *test accuracy*: after the last epoch, on the 360 test images.
- *peak training memory*: {plain['memory_counter']}.
- *activation memory*: bytes autograd saves for the backward pass in one training forward pass
  at batch {args.batch_size} (`momres.activation_memory`).

![accuracy curves](accuracy.png)

## Activation memory vs depth (batch {args.batch_size}, 1x16x16 inputs)

| depth | ResNet MiB | Momentum ResNet MiB | ratio |
|---:|---:|---:|---:|
{depth_rows}

![activation memory vs depth](memory_vs_depth.png)

Per-run metrics, checkpoints and curves: `train-resnet{args.depth}/`,
`train-mresnet{args.depth}/`. Total time {seconds:.0f} s; machine: {json.dumps(machine())}.
"""


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    print(f"momres demo: ResNet-{args.depth} and Momentum ResNet-{args.depth} (gamma = "
          f"{args.gamma}) on scikit-learn's digits, {args.epochs} epochs each\n", flush=True)
    digits = load_dataset("digits", augment=False).train
    batch = torch.stack([digits[i][0] for i in range(args.batch_size)])
    depths = memory_by_depth(batch, args.gamma)
    summaries = train_pair(args)
    floor = recompute_floor(args.depth, batch)
    plot(summaries, depths, args.out)
    seconds = time.perf_counter() - start
    text = report(args, summaries, depths, floor, seconds)
    atomic_write(args.out / "report.md", lambda p: p.write_text(text))
    write_json(args.out / "demo.json", {"summaries": summaries, "memory_by_depth": depths,
                                        "recompute_floor": floor, "seconds": seconds,
                                        "machine": machine()})
    print("\n" + table(summaries))
    plain, momentum = (s["mean_epoch_seconds"] for s in summaries.values())
    print(f"\ntime per epoch: {momentum / plain:.2f}x the ResNet, of which {floor:.2f}x is the "
          "recompute every memory-free method pays")
    deepest = depths[-1]
    print(f"\nactivation memory at depth {deepest['depth']}: ResNet "
          f"{deepest['resnet_mib']:.0f} MiB, Momentum ResNet {deepest['mresnet_mib']:.0f} MiB")
    print(f"\nreport: {args.out / 'report.md'} ({seconds:.0f} s)")
    return 0
