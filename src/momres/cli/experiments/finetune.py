"""Fine-tuning: a pretrained ResNet converted to momentum fine-tunes as well, in less memory.

A CIFAR ResNet is pretrained on digits 0-4 (scikit-learn's digits, 16x16), then fine-tuned on
digits 5-9 with a fresh head in two ways: as it is, and converted with ``to_momentum`` (weights
kept, ``gamma = 0.9``) and trained with the memory-free backward.  Both fine-tunings start from
the same weights and see the same batches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from ...convert import to_momentum
from ...data import load_dataset
from ...memory import MIB, activation_memory
from ...models import create_model
from . import _common

CLAIM = ("A pretrained ResNet converted to a Momentum ResNet (weights kept) fine-tunes to the "
         "accuracy of the fine-tuned ResNet, with the memory-free backward's smaller peak "
         "memory.")


@dataclass(frozen=True)
class Config:
    model: str = "resnet20"
    gamma: float = 0.9
    pretrain_steps: int = 200
    finetune_steps: int = 150
    batch: int = 64
    lr: float = 1e-3


FULL = Config(model="resnet56", pretrain_steps=600, finetune_steps=400)


def split(images: torch.Tensor, labels: torch.Tensor, digits: range
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of ``digits``, relabelled from 0."""
    keep = (labels >= digits.start) & (labels < digits.stop)
    return images[keep], labels[keep] - digits.start


def tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.tensor(labels)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).double().mean().item()
    model.train()
    return correct


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: Config,
          steps: int, seed: int, desc: str) -> list[float]:
    """Adam on random mini-batches (the same sequence for the same ``seed``)."""
    generator = torch.Generator().manual_seed(seed)

    def loss_fn() -> torch.Tensor:
        batch = torch.randint(len(labels), (config.batch,), generator=generator)
        return F.cross_entropy(model(images[batch]), labels[batch])

    model.train()
    return _common.fit(model.parameters(), loss_fn, steps, config.lr, desc)


def run(out: Path, config: Config = Config(), seed: int = 0) -> dict:
    data = load_dataset("digits", augment=False)
    train_set, test_set = tensors(data.train), tensors(data.test)
    source, target = range(0, 5), range(5, 10)
    metrics: dict = {}
    with _common.threads(1):
        torch.manual_seed(seed)
        pretrained = create_model(config.model, num_classes=5, in_channels=1)
        train(pretrained, *split(*train_set, source), config, config.pretrain_steps, seed,
              "pretrain")
        metrics["source_accuracy"] = accuracy(pretrained, *split(*test_set, source))
        converted = to_momentum(pretrained, config.gamma)
        metrics["source_accuracy_after_conversion"] = accuracy(
            converted, *split(*test_set, source))

        torch.manual_seed(seed + 1)
        head = nn.Linear(pretrained.fc.in_features, 5)  # the same fresh head for both
        nets = {"momentum": converted, "resnet": copy.deepcopy(pretrained)}
        curves = {}
        for name, net in nets.items():
            net.fc = copy.deepcopy(head)
            curves[name] = train(net, *split(*train_set, target), config,
                                 config.finetune_steps, seed + 2, f"fine-tune {name}")
            metrics[f"{name}_accuracy"] = accuracy(net, *split(*test_set, target))
            x = split(*train_set, target)[0][: config.batch]
            metrics[f"{name}_peak_memory_mib"] = _common.peak_step_memory(net, x) / MIB
            metrics[f"{name}_activation_memory_mib"] = activation_memory(net, x) / MIB

    fig = Figure(figsize=(9, 3.6))
    left, right = fig.subplots(1, 2)
    window = max(1, config.finetune_steps // 20)
    for name, losses in curves.items():
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1)
        left.plot(range(window, len(losses) + 1), smooth, color=_common.COLORS[name],
                  label=f"{name}: test accuracy {metrics[f'{name}_accuracy']:.1%}")
    left.set_yscale("log")
    left.set_xlabel("fine-tuning step")
    left.set_ylabel(f"training loss (mean of {window} steps)")
    left.set_title(f"{config.model} pretrained on digits 0-4, fine-tuned on 5-9", fontsize=9)
    left.legend(fontsize=8)
    kinds = ["peak_memory_mib", "activation_memory_mib"]
    xs = torch.arange(len(kinds))
    for shift, name in [(-0.2, "resnet"), (0.2, "momentum")]:
        right.bar(xs + shift, [metrics[f"{name}_{k}"] for k in kinds], width=0.4,
                  color=_common.COLORS[name], label=name)
    right.set_xticks(xs, ["peak of a training step", "saved for backward"])
    right.set_ylabel(f"MiB (batch {config.batch})")
    right.legend(fontsize=8)
    fig.tight_layout()
    _common.save_figure(fig, out, "finetune")

    reproduced = (metrics["momentum_accuracy"] >= metrics["resnet_accuracy"] - 0.02
                  and metrics["momentum_peak_memory_mib"] < metrics["resnet_peak_memory_mib"])
    return _common.finish(out, CLAIM, metrics, config, seed, reproduced)
