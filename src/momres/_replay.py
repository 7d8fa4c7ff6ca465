"""Replaying a block's forward pass exactly, during the backward recompute.

The memory-free backward evaluates every block a second time.  That second evaluation must
compute the same function as the first and must leave no trace of its own:

* random ops (dropout, stochastic depth) draw the same numbers: the generator state is
  recorded before the block when the block consumed randomness, and restored inside a forked
  generator, so the global generator is neither re-seeded nor advanced;
* BatchNorm layers in training mode normalise with the same batch statistics, and their
  running statistics (and ``num_batches_tracked``) are restored after the recompute, so they
  are updated once per forward pass;
* autocast is re-entered with the forward's settings (the backward runs outside it);
* attention stays off its fused no-grad kernels in the forward pass, which the recompute,
  running with grad, could not use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if (
        device.type == "cuda"
    ) else []


@dataclass
class RngState:
    """Generator states before one block; ``None`` where the block used no randomness."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        devices = _cuda_devices(device)
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state(devices[0]) if devices else None)

    def differs_from(self, other: RngState) -> bool:
        if not torch.equal(self.cpu, other.cpu):
            return True
        return self.cuda is not None and not torch.equal(self.cuda, other.cuda)

    def tensors(self) -> list[torch.Tensor]:
        return [self.cpu] if self.cuda is None else [self.cpu, self.cuda]


@contextlib.contextmanager
def restored_rng(state: RngState | None, device: torch.device) -> Iterator[None]:
    """Run with the generators set to ``state``, leaving the global generators untouched."""
    if state is None:
        yield
        return
    devices = _cuda_devices(device)
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.set_rng_state(state.cpu)
        if devices:
            torch.cuda.set_rng_state(state.cuda, devices[0])
        yield


@contextlib.contextmanager
def frozen_batchnorm(module: nn.Module, layers: list[nn.Module] | None = None
                     ) -> Iterator[None]:
    """Training-mode BatchNorm runs as in the forward pass, on scratch copies of its statistics.

    The recompute normalises with the same batch statistics, so outputs and gradients match;
    the running statistics and ``num_batches_tracked`` it updates are copies, swapped out
    again afterwards, so each forward pass updates the real ones once.  (Switching
    ``track_running_stats`` off instead would change which tensors BatchNorm saves, which
    ``torch.utils.checkpoint`` rejects; copying the old values back would bump the version
    of tensors the recompute's graph has saved.)  ``layers``: the BatchNorm layers of
    ``module`` where already known.
    """
    if layers is None:
        layers = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    norms = [m for m in layers if m.training and m.track_running_stats]
    real = [dict(m._buffers) for m in norms]
    # Swapped in the buffer dicts directly: Module.__setattr__ costs more than the copies.
    for m, buffers in zip(norms, real, strict=True):
        m._buffers.update({name: buffer.clone() for name, buffer in buffers.items()
                           if buffer is not None})
    try:
        yield
    finally:
        for m, buffers in zip(norms, real, strict=True):
            m._buffers.update(buffers)


def checkpointed(fn: Callable, module: nn.Module | None, *args,
                 layers: list[nn.Module] | None = None, **kwargs):
    """``fn(*args, **kwargs)`` under ``torch.utils.checkpoint`` (non-reentrant, generator
    states preserved), with the recompute leaving the BatchNorm statistics of ``module`` (or
    of the BatchNorm ``layers`` given) alone."""
    contexts = lambda: (contextlib.nullcontext(), frozen_batchnorm(module, layers))
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)


@contextlib.contextmanager
def mha_fast_path_off() -> Iterator[None]:
    """Keep ``nn.MultiheadAttention`` (and transformer layers) off their fused kernels.

    Without grad, eval-mode attention takes a fused fast path that a pass with grad cannot
    take; the memory-free forward (without grad) and its recompute (with grad) must compute
    the same numbers, so the forward stays off it too.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings of the forward pass, for the CPU and the input's device type."""

    settings: tuple[tuple[str, bool, torch.dtype], ...]

    @classmethod
    def capture(cls, device: torch.device) -> AutocastState:
        types = sorted({"cpu", device.type})
        return cls(tuple(
            (t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types
        ))

    def replay(self) -> contextlib.AbstractContextManager:
        """The forward's settings, entered again (nothing to enter where autocast is off in
        both passes)."""
        if not any(enabled for _, enabled, _ in self.settings) and not any(
            torch.is_autocast_enabled(device_type) for device_type, _, _ in self.settings
        ):
            return contextlib.nullcontext()
        return self._replay()

    @contextlib.contextmanager
    def _replay(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.settings:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield
