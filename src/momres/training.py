"""Train or fine-tune an image classifier, ResNet or Momentum ResNet.

The conventions of torchvision's reference scripts: SGD with momentum and weight decay, a step
or cosine learning-rate schedule stepped once per epoch, ``--batch-size`` per process, and
``torchrun`` for multi-GPU and multi-node runs (DistributedDataParallel with a
DistributedSampler, or with ``--fsdp`` FSDP2: each block of the momentum stages and then the
model sharded with ``fully_shard``; rank 0 alone logs and writes files).

The output folder ``--out`` holds ``config.json``, ``metrics.jsonl`` (one JSON object per epoch),
``curves.png``, ``checkpoint.pt`` (after every epoch), ``best.pt`` (best test accuracy) and, at
the end, ``summary.json``. Every file is written atomically (temporary file, then rename).

Memory, ``peak_memory_mib``: on CUDA, ``torch.cuda.max_memory_allocated`` over the epoch. On CPU,
which has no allocator counter, the bytes of the parameters, buffers and optimizer state plus the
peak of (allocations - frees) that ``torch.profiler`` traces during the epoch's second training
step. ``activation_memory_mib``: bytes autograd saves for backward in one training forward pass
(:func:`momres.activation_memory`), on every device.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from . import __version__
from ._io import atomic_write, write_json
from .convert import momentum_blocks
from .data import DATASETS, ImageData, load_dataset
from .memory import MIB, activation_memory, peak_bytes, tensor_bytes

SCHEDULES = ("step", "cosine")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: Options that may differ on --resume: they change where and how fast a run goes, not what it
#: trains (--epochs extends it). Any other difference is refused.
RESUMABLE = frozenset({"epochs", "out", "device", "workers", "progress", "data_dir", "download",
                       "resume"})
#: What every momres checkpoint holds.
CHECKPOINT_KEYS = ("momres", "epoch", "config", "model", "optimizer", "scheduler", "scaler",
                   "rng", "records", "best_accuracy")
#: What torch.load raises for a file that is not a (whole) PyTorch file.  A truncated zip is
#: read as a legacy pickle, where the weights-only unpickler can also fail on its own stack
#: (IndexError) or memo (KeyError), depending on the bytes.
UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, IndexError, KeyError)


@dataclass
class Config:
    """One training run: the options of ``momres train``."""

    out: Path
    dataset: str = "digits"
    model: str = "mresnet20"
    data_dir: Path | None = None
    download: bool = False
    gamma: float = 0.9
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    milestones: list[int] | None = None  # step schedule; default: 1/2 and 3/4 of the epochs
    lr_decay: float = 0.1
    warmup_epochs: int = 0  # linear warm-up from lr/10 before the schedule
    amp: str | None = None  # "bfloat16" or "float16" autocast
    memory_efficient: bool = True
    fsdp: bool = False  # under torchrun: FSDP2 (each momentum block, then the model) for DDP
    seed: int = 0
    device: str = "auto"
    workers: int | None = None  # default: 4 on CUDA, 0 on CPU (the data sets live in memory)
    resume: bool = False
    init_from: Path | None = None
    train_subset: int | None = None  # train on this many images (a fixed random subset)
    progress: bool = True  # tqdm bars (rank 0 only)

    def check(self) -> None:
        """Raise a clear error for settings that cannot work."""
        if self.dataset not in DATASETS:
            raise ValueError(f"momres: unknown data set {self.dataset!r}; choose one of "
                             f"{', '.join(DATASETS)}.")
        for name in ("epochs", "batch_size", "train_subset"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"momres: --{name.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(self, name)}.")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError("momres: --warmup-epochs must be in [0, --epochs), got "
                             f"{self.warmup_epochs} with --epochs {self.epochs}.")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"momres: --workers must be at least 0 (0: load in the main "
                             f"process), got {self.workers}.")
        if self.milestones is not None and min(self.milestones, default=1) < 1:
            raise ValueError(f"momres: --milestones must be epochs >= 1, got {self.milestones}.")
        if not 0 <= self.seed < 2**32:  # NumPy's range
            raise ValueError(f"momres: --seed must be in [0, 2**32), got {self.seed}.")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"momres: --lr must be > 0 and finite, got {self.lr}.")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"momres: --weight-decay must be >= 0 and finite, got "
                             f"{self.weight_decay}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momres: --momentum must be in [0, 1), got {self.momentum}.")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"momres: --lr-decay must be in (0, 1], got {self.lr_decay}.")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"momres: --gamma must be in [0, 1], got {self.gamma}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"momres: unknown --schedule {self.schedule!r}; choose step or "
                             "cosine.")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"momres: --amp takes bfloat16 or float16, not {self.amp!r}.")
        from . import models

        if self.model not in models.list_models():
            raise ValueError(f"momres: unknown model {self.model!r}; choose one of "
                             f"{', '.join(models.list_models())}.")

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON values (paths as strings): for config.json and checkpoints."""
        return json.loads(json.dumps(asdict(self), default=str))


def lr_factor(config: Config, epoch: int) -> float:
    """The learning rate of ``epoch`` (from 0) over ``config.lr``: warm-up, then the schedule."""
    if epoch < config.warmup_epochs:  # linear from lr/10, as He et al. start deep ResNets
        return 0.1 + 0.9 * epoch / config.warmup_epochs
    if config.schedule == "cosine":
        progress = (epoch - config.warmup_epochs) / max(1, config.epochs - config.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * progress))
    milestones = config.milestones or [config.epochs // 2, config.epochs * 3 // 4]
    return config.lr_decay ** sum(epoch >= m for m in milestones)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(name: str, data: ImageData, *, gamma: float, memory_efficient: bool) -> nn.Module:
    """A registry model (``momres.models``) shaped for ``data``; ``gamma`` and
    ``memory_efficient`` reach the models that take them (momentum models, RevNets)."""
    from . import models

    accepted = models.model_options(name)
    options = {"num_classes": data.num_classes, "in_channels": data.in_channels}
    options |= {key: value for key, value in
                (("gamma", gamma), ("memory_efficient", memory_efficient)) if key in accepted}
    if data.small_images and "stem" in accepted:
        options["stem"] = "cifar"  # a 3x3 stride-1 first convolution and no max-pool
    return models.create_model(name, **options)


def load_pretrained(model: nn.Module, path: Path) -> list[str]:
    """Load a torchvision-format ResNet state dict, or a momres checkpoint, into ``model``.

    A classifier head of another shape (another number of classes) is left at its fresh
    initialisation. So is a first convolution of another shape (``stem="cifar"``), except one
    over RGB loaded into a grey-image model: that one is summed over its input channels.
    Returns the names of the entries left fresh.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"momres: --init-from {path}: no such file.") from None
    except UNREADABLE as error:
        raise ValueError(f"momres: --init-from {path} is not a PyTorch state dict or momres "
                         f"checkpoint ({error}).") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a momres checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"momres: --init-from {path} holds no state dict (name -> tensor).")
    state = {key.removeprefix("module."): value for key, value in state.items()}  # saved by DDP
    own = model.state_dict()
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    conv = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    head, stem = linear[-1:], conv[:1]
    fresh = []
    for key, value in list(state.items()):
        if key not in own or own[key].shape == value.shape:
            continue
        grey = value.dim() == 4 and own[key].shape[1] == 1 and (
            own[key].shape[0], *own[key].shape[2:]) == (value.shape[0], *value.shape[2:])
        if stem and key == f"{stem[0]}.weight" and grey:
            state[key] = value.sum(1, keepdim=True)  # a grey image is R = G = B
        elif (head and key.startswith(head[0] + ".")) or (stem and key == f"{stem[0]}.weight"):
            fresh.append(key)
            del state[key]
        else:
            raise ValueError(
                f"momres: --init-from {path}: {key} has shape {tuple(value.shape)} there but "
                f"{tuple(own[key].shape)} in the model; choose the --model it was trained as."
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key not in fresh]
    if missing or unexpected:
        raise ValueError(
            f"momres: --init-from {path} does not fit the model: {len(missing)} entries missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Use a "
            "torchvision ResNet state dict with the matching --model (resnet50 for mresnet50...)."
        )
    return fresh


class Trainer:
    """One training run: ``Trainer(config).fit()``, or ``run_epoch(e)`` one epoch at a time."""

    def __init__(self, config: Config) -> None:
        config.check()
        self.config = config
        self.rank, self.world_size, self.device = _distributed(config.device)
        self.main = self.rank == 0
        if config.fsdp and self.world_size == 1:
            raise ValueError("momres: --fsdp shards the model across the processes of a torchrun "
                             "launch (torchrun --nproc_per_node N -m momres train ...); with one "
                             "process, drop --fsdp.")
        if config.fsdp and config.amp == "float16":
            raise ValueError("momres: --fsdp with --amp float16 (a gradient scaler over sharded "
                             "gradients) is not supported; use --amp bfloat16.")
        self.out = Path(config.out)
        if self.main:
            _prepare_out(self.out, config.resume)
        checkpoint = self._read_checkpoint() if config.resume else None  # before any write
        if config.amp == "float16" and self.device.type != "cuda":
            raise ValueError("momres: --amp float16 needs CUDA; on CPU use --amp bfloat16.")
        self.amp_dtype = AMP_DTYPES.get(config.amp)  # None: no autocast

        seed_everything(config.seed)
        self.data = load_dataset(config.dataset, config.data_dir, download=config.download)
        model = build_model(config.model, self.data, gamma=config.gamma,
                            memory_efficient=config.memory_efficient)
        if config.init_from is not None:
            fresh = load_pretrained(model, Path(config.init_from))
            self.log(f"momres: initialised from {config.init_from}"
                     + (f"; new {', '.join(fresh)}" if fresh else ""))
        self.model = model.to(self.device)
        self.net = self.model
        self.activation_mib = self._activation_memory() / MIB  # on a copy, before any sharding
        if config.fsdp:
            shard(self.model)
        elif self.world_size > 1:
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.world_size > 1:
            torch.manual_seed(config.seed + self.rank)  # different augmentations per process

        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr,
                                         momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda epoch: lr_factor(config, epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "float16")
        self.train_loader, self.test_loader = self._loaders()

        self.start_epoch, self.best_accuracy, self.records = 0, -1.0, []
        if checkpoint is not None:
            self._restore(checkpoint)
        self.memory_counter = ("torch.cuda.max_memory_allocated" if self.device.type == "cuda"
                               else "cpu: model and optimizer state + torch.profiler peak of one"
                                    " training step")
        if self.main:
            write_json(self.out / "config.json", {
                **config.as_dict(), "world_size": self.world_size, "device": str(self.device),
                "memory_counter": self.memory_counter, "momres": __version__,
                "torch": torch.__version__,
            })

    def log(self, message: str) -> None:
        if self.main:
            tqdm.write(message, file=sys.stderr)

    def _loaders(self) -> tuple[DataLoader, DataLoader]:
        config, cuda = self.config, self.device.type == "cuda"
        workers = config.workers if config.workers is not None else (4 if cuda else 0)
        train = self.data.train
        if config.train_subset is not None:  # the same images for every seed and model
            if config.train_subset > len(train):
                raise ValueError(f"momres: --train-subset {config.train_subset} is more than the "
                                 f"{len(train)} training images; give at most {len(train)}.")
            keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
            train = Subset(train, keep[: config.train_subset].tolist())
        if len(train) < config.batch_size * self.world_size:
            raise ValueError(f"momres: the training set has {len(train)} images, fewer than one "
                             f"batch per process ({config.batch_size}); lower --batch-size.")
        # The sampler shuffles with (seed, epoch): the order needs no state to resume.
        sampler = DistributedSampler(train, self.world_size, self.rank, seed=config.seed)
        train_loader = DataLoader(train, config.batch_size, sampler=sampler, num_workers=workers,
                                  pin_memory=cuda, drop_last=True)
        # Each process evaluates its own slice, without the padding DistributedSampler adds.
        test = Subset(self.data.test, range(self.rank, len(self.data.test), self.world_size))
        test_loader = DataLoader(test, config.batch_size, num_workers=workers, pin_memory=cuda)
        return train_loader, test_loader

    def _activation_memory(self) -> int:
        """Bytes saved for backward by one training forward pass, on a copy of the model."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices), self._autocast():  # leaves training's RNG alone
            batch = torch.stack([self.data.train[i][0] for i in range(self.config.batch_size)])
            return activation_memory(copy.deepcopy(self.model).train(), batch.to(self.device))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step: the loss and the number of correct predictions."""
        with self._autocast():
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss.item()}")
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)  # frees the gradients until the next backward
        return loss.detach(), (logits.argmax(1) == y).sum()

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch (``epoch`` counts from 0): loss, accuracy, time, memory."""
        self.net.train()
        self.train_loader.sampler.set_epoch(epoch)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, count
        peak = 0
        traced = min(1, len(self.train_loader) - 1)  # past the first step's one-time work
        start = time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"{self.config.model} {epoch + 1}/{self.config.epochs}",
                   disable=not (self.main and self.config.progress), leave=True,
                   dynamic_ncols=True, unit="batch")
        for step, (x, y) in enumerate(bar):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            try:
                if step == traced and not cuda:
                    state = tensor_bytes(_local(chain(self.model.parameters(),
                                                      self.model.buffers(),
                                                      _optimizer_tensors(self.optimizer))))
                    result: list[torch.Tensor] = []
                    traced = peak_bytes(lambda x=x, y=y, out=result: out.extend(self._step(x, y)),
                                        "cpu")
                    (loss, correct), peak = result, state + traced
                else:
                    loss, correct = self._step(x, y)
            except (FloatingPointError, OverflowError) as error:
                raise self._diverged(f"epoch {epoch + 1}, step {step + 1}", error) from None
            totals += torch.stack([loss.double() * len(y), correct.double(),
                                   totals.new_tensor(len(y))])
            seconds = time.perf_counter() - start
            bar.set_postfix(loss=f"{totals[0].item() / totals[2].item():.3f}",
                            acc=f"{totals[1].item() / totals[2].item():.3f}",
                            img_s=f"{totals[2].item() * self.world_size / seconds:.0f}")
        seconds = time.perf_counter() - start
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
        loss, accuracy, count = self._reduce(totals)
        return {"train_loss": loss, "train_accuracy": accuracy, "epoch_seconds": seconds,
                "images_per_second": count / seconds, "peak_memory_mib": peak / MIB}

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy (a fraction), over the whole test set."""
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, y in self.test_loader:
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.model(x).float()
            totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                   (logits.argmax(1) == y).sum().double(),
                                   totals.new_tensor(len(y))])
        loss, accuracy, _ = self._reduce(totals)
        return loss, accuracy

    def _reduce(self, totals: torch.Tensor) -> tuple[float, float, float]:
        """(loss sum, correct, count) summed over processes -> mean loss, accuracy, count."""
        if self.world_size > 1:
            dist.all_reduce(totals)
        loss, correct, count = totals.tolist()
        return loss / count, correct / count, count

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train and test one epoch, step the schedule, write metrics and checkpoints."""
        lr = self.optimizer.param_groups[0]["lr"]
        record = self.train_epoch(epoch)
        test_loss, test_accuracy = self.evaluate()
        if not math.isfinite(test_loss):
            raise self._diverged(f"epoch {epoch + 1}", f"the test loss is {test_loss}")
        self.scheduler.step()
        record = {"epoch": epoch + 1, "lr": lr, **record, "test_loss": test_loss,
                  "test_accuracy": test_accuracy}
        self.records.append(record)
        checkpoint = self._checkpoint(epoch + 1)  # collective: every rank takes part
        if self.main:
            best = test_accuracy > self.best_accuracy
            self.best_accuracy = max(self.best_accuracy, test_accuracy)
            checkpoint["best_accuracy"] = self.best_accuracy
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            atomic_write(self.out / "checkpoint.pt", lambda p: torch.save(checkpoint, p))
            if best:
                atomic_write(self.out / "best.pt", lambda p: torch.save(checkpoint, p))
            plot_curves(self.records, self.out / "curves.png", title=self.config.model)
            self.log(f"{self.config.model} epoch {epoch + 1}: test accuracy {test_accuracy:.4f},"
                     f" loss {test_loss:.4f}, peak memory {record['peak_memory_mib']:.1f} MiB")
        return record

    def fit(self) -> dict[str, Any]:
        """Train to ``config.epochs``; returns (and writes) the summary."""
        for epoch in range(self.start_epoch, self.config.epochs):
            self.run_epoch(epoch)
        summary = self.summary()
        if self.main:
            write_json(self.out / "summary.json", summary)
        return summary

    def summary(self) -> dict[str, Any]:
        records = self.records
        last = records[-1] if records else {}
        return {
            "model": self.config.model, "dataset": self.config.dataset,
            "gamma": self.config.gamma, "memory_efficient": self.config.memory_efficient,
            "epochs": len(records), "warmup_epochs": self.config.warmup_epochs,
            "test_accuracy": last.get("test_accuracy"),
            "best_test_accuracy": max((r["test_accuracy"] for r in records), default=None),
            "mean_epoch_seconds": float(np.mean([r["epoch_seconds"] for r in records]))
            if records else None,
            "peak_memory_mib": max((r["peak_memory_mib"] for r in records), default=None),
            "memory_counter": self.memory_counter,
            "activation_memory_mib": self.activation_mib,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "batch_size": self.config.batch_size, "world_size": self.world_size,
            "device": str(self.device),
        }

    def _diverged(self, where: str, error: object) -> FloatingPointError:
        """The error that stops a diverged run; the last checkpoint is left as it was."""
        path = self.out / "checkpoint.pt"
        done = len(self.records) and self.records[-1]["epoch"]
        last_good = f"{path}, after epoch {done}" if done else "none yet"
        return FloatingPointError(
            f"momres: training diverged at {where}: {error}. Stopped; the last good checkpoint "
            f"({last_good}) is kept. Start a new run in another --out with a lower --lr or more "
            "--warmup-epochs (--init-from the checkpoint keeps its weights), or with --amp "
            "bfloat16 instead of float16."
        )

    def _checkpoint(self, epochs_done: int) -> dict[str, Any]:
        rng = _rng_state(self.device)
        states = [rng] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(states, rng)
        if self.config.fsdp:  # whole tensors, gathered from the shards (every rank takes part)
            from torch.distributed.checkpoint import state_dict as dcp

            options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
            model = dcp.get_model_state_dict(self.model, options=options)
            optimizer = dcp.get_optimizer_state_dict(self.model, self.optimizer, options=options)
        else:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        return {
            "momres": __version__, "epoch": epochs_done, "config": self.config.as_dict(),
            "model": model, "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": states, "records": self.records,
        }

    def _read_checkpoint(self) -> dict[str, Any]:
        """The checkpoint in ``--out``, checked to be a momres checkpoint of this run's options
        (but for those in ``RESUMABLE``)."""
        path = self.out / "checkpoint.pt"
        if not path.is_file():
            raise FileNotFoundError(f"momres: --resume: no checkpoint at {path}; run without "
                                    "--resume to start training.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except UNREADABLE:
            raise _not_a_checkpoint(path, "truncated, or not a PyTorch file") from None
        if not isinstance(state, dict):
            raise _not_a_checkpoint(path, f"it holds a {type(state).__name__}")
        missing = [key for key in CHECKPOINT_KEYS if key not in state]
        if missing or not isinstance(state["config"], dict):
            raise _not_a_checkpoint(path, f"it lacks {', '.join(missing) or 'a config'}")
        old, new = state["config"], self.config.as_dict()
        changed = [key for key in new if key not in RESUMABLE and key in old
                   and old[key] != new[key]]
        if changed:
            raise ValueError(
                f"momres: --resume: {path} was trained with other options: "
                + "; ".join(f"{_as_option(k, old[k])} then, {_as_option(k, new[k])} now"
                            for k in changed)
                + ". Resume with the options it was trained with (only --epochs, --out, "
                "--device, --workers, --data-dir, --download and --no-progress may change), or "
                "start a new run in another --out."
            )
        if state["epoch"] > self.config.epochs:
            raise ValueError(f"momres: --resume: {path} already holds {state['epoch']} epochs, "
                             f"more than --epochs {self.config.epochs}; give --epochs "
                             f"{state['epoch']} or more.")
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (see ``_read_checkpoint``): weights, optimizer, schedule,
        scaler, random generators, metrics."""
        path = self.out / "checkpoint.pt"
        try:
            if self.config.fsdp:  # every rank holds the whole state: each keeps its shards
                from torch.distributed.checkpoint import state_dict as dcp

                options = dcp.StateDictOptions(full_state_dict=True)
                dcp.set_model_state_dict(self.model, state["model"], options=options)
                dcp.set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                             options=options)
            else:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            raise _not_a_checkpoint(path, "it does not fit the model", error) from None
        self.start_epoch, self.best_accuracy = state["epoch"], state["best_accuracy"]
        self.records = state["records"]
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                  strict=True):  # the schedule of this --epochs, from here on
            group["lr"] = base_lr * lr_factor(self.config, self.start_epoch)
        if len(state["rng"]) == self.world_size:
            _set_rng_state(state["rng"][self.rank], self.device)
        else:
            self.log(f"momres: --resume with {self.world_size} processes instead of "
                     f"{len(state['rng'])}: random streams restart from the seed.")
            seed_everything(self.config.seed + self.rank + 1000 * self.start_epoch)
        if self.main:  # drop lines of epochs the checkpoint does not hold (a crash in between)
            lines = "".join(json.dumps(r) + "\n" for r in self.records)
            atomic_write(self.out / "metrics.jsonl", lambda p: p.write_text(lines))
        self.log(f"momres: resumed {path} after epoch {self.start_epoch}")


def shard(model: nn.Module) -> None:
    """FSDP2 in place: each block of the model's memory-free momentum stages, then the model
    (which keeps the rest: stems, shape-changing blocks, the head)."""
    from torch.distributed.fsdp import fully_shard

    for block in momentum_blocks(model):
        fully_shard(block)
    fully_shard(model)


def _distributed(requested: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"momres: --device {requested}, but no CUDA device is available; use "
                         "--device cpu.")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _prepare_out(out: Path, resume: bool) -> None:
    """Create ``out`` and make sure it is writable, without overwriting an earlier run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"momres: cannot write to the output folder {out} ({error}); "
                              "choose another --out.") from None
    if not resume:
        if (out / "checkpoint.pt").exists():
            raise FileExistsError(f"momres: {out} already holds a training run (checkpoint.pt); "
                                  "add --resume to continue it, or choose another --out.")
        (out / "metrics.jsonl").unlink(missing_ok=True)  # of a run stopped before its checkpoint


def _not_a_checkpoint(path: Path, reason: str, error: Exception | None = None) -> ValueError:
    """The error for a --resume checkpoint that momres cannot use, with torch's ``error``."""
    detail = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else ""
    if len(detail) > 120:  # torch's messages run long
        detail = detail[:117] + "..."
    return ValueError(f"momres: --resume: {path} is not a momres checkpoint "
                      f"({reason}{': ' + detail if detail else ''}). Nothing was changed: "
                      "restore the file from a backup, or start afresh in another --out.")


def _as_option(key: str, value: Any) -> str:
    """``Config.key = value`` as it reads on the command line, e.g. ``--lr 0.1``."""
    if key == "memory_efficient":
        return "no --no-memory-efficient" if value else "--no-memory-efficient"
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    if value is None:
        return f"no {flag}"
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _local(tensors: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """This process's part of each tensor: the local shard of a DTensor (--fsdp)."""
    for t in tensors:
        yield t.to_local() if hasattr(t, "to_local") else t


def _rng_state(device: torch.device) -> dict[str, Any]:
    numpy = np.random.get_state(legacy=False)
    numpy["state"]["key"] = torch.from_numpy(numpy["state"]["key"].astype(np.int64))
    return {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    numpy["state"]["key"] = numpy["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def plot_curves(records: list[dict], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, train and test, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for split in ("train", "test"):
            ax.plot(epochs, [r[f"{split}_{metric}"] for r in records], marker="o", label=split)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{title} {metric}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
