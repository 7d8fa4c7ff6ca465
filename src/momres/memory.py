"""Honest memory accounting: the bytes a forward pass keeps for the backward pass."""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn


def activation_memory(module: nn.Module, *inputs, **kwargs) -> int:
    """Bytes saved for backward by one forward pass of ``module(*inputs, **kwargs)``.

    Every tensor that autograd keeps for the backward pass goes through the saved-tensor
    hooks; each underlying storage is counted once, at its full size.  The module's own
    parameters and buffers are not counted (they exist whether or not you train), the inputs
    are (a layer that keeps its input keeps it alive).

    Limits: it runs one real forward pass (with grad enabled, in the module's current mode),
    sees only what autograd saves (not the caching allocator's free blocks, not workspace
    memory of kernels), and counts a view by its whole storage.
    """
    own = {t.untyped_storage().data_ptr() for t in chain(module.parameters(), module.buffers())}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*inputs, **kwargs)
    del out  # the saved tensors were counted while the graph was alive
    return sum(sizes.values())
