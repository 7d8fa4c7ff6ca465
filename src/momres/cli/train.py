"""Train or fine-tune an image classifier, ResNet or Momentum ResNet.

The command-line face of ``momres.training``: the options of ``Config``, one ``Trainer`` run,
its summary printed as JSON (rank 0).  torchrun launches it on several processes.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from pathlib import Path

from ..data import DATASETS
from ..training import AMP_DTYPES, SCHEDULES, Config, Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Config
    add = parser.add_argument
    add("--dataset", choices=DATASETS, default=d.dataset, help="data set (default: digits)")
    add("--data-dir", type=Path, help="folder of the data set's files")
    add("--download", action="store_true", help="download the data set (torchvision; online)")
    add("--model", default=d.model, help="a momres.models name, e.g. resnet56, mresnet56")
    add("--gamma", type=float, default=d.gamma, help="momentum of Momentum ResNets")
    add("--epochs", type=int, default=d.epochs)
    add("--batch-size", type=int, default=d.batch_size, help="per process")
    add("--lr", type=float, default=d.lr, help="learning rate (SGD)")
    add("--momentum", type=float, default=d.momentum, help="SGD momentum")
    add("--weight-decay", type=float, default=d.weight_decay)
    add("--schedule", choices=SCHEDULES, default=d.schedule,
        help="step: lr x --lr-decay at each milestone; cosine: cosine annealing to 0")
    add("--milestones", type=int, nargs="+", help="epochs of the step schedule (default: 1/2, 3/4)")
    add("--lr-decay", type=float, default=d.lr_decay, help="step schedule factor")
    add("--warmup-epochs", type=int, default=d.warmup_epochs,
        help="linear warm-up from lr/10 over these first epochs (deep plain ResNets need it)")
    add("--amp", nargs="?", const="bfloat16", choices=list(AMP_DTYPES),
        help="autocast: bfloat16 (default when given; CPU and CUDA) or float16 (CUDA)")
    add("--no-memory-efficient", dest="memory_efficient", action="store_false",
        help="plain autograd through momentum stages (stores activations)")
    add("--fsdp", action="store_true",
        help="under torchrun: shard each momentum block and the model with FSDP2 (instead of "
             "DistributedDataParallel)")
    add("--seed", type=int, default=d.seed)
    add("--device", default=d.device, help="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)")
    add("--workers", type=int, help="data-loading processes (default: 4 on CUDA, 0 on CPU)")
    add("--out", type=Path, required=True, help="output folder")
    add("--resume", action="store_true",
        help="continue the run in --out from its checkpoint, with the same options (--epochs "
             "may grow; --device, --workers, --data-dir and --no-progress may change)")
    add("--init-from", type=Path, help="torchvision ResNet state dict or momres checkpoint")
    add("--train-subset", type=int, metavar="N",
        help="train on a fixed random subset of N images (quick runs); test on all")
    add("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    config = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
    summary = Trainer(config).fit()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
