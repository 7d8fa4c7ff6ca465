"""Fused kernels for the exact arithmetic, compiled with ``torch.compile`` (opt-in).

On the CPU the exact step runs eagerly, chunk by chunk (``_exact.CHUNK``): its dozen
elementwise passes then run over two small scratch tensors that stay in the cache, which is
most of what fusing would bring, with no compilation at all.  On CUDA a chunk is the whole
tensor, and each pass is a kernel launch: there ``MOMRES_FUSE=auto`` compiles the step into one
kernel (untested here: no GPU was available).  ``MOMRES_FUSE=1`` compiles on every device (the
tests use this to check that compiled and eager steps give the same integers), the default
``MOMRES_FUSE=0`` never.  The compiled function is the eager one, traced, so both compute the
same integers; forward and backward of a stage pick the same path, because the choice depends
only on the device.  If compiling fails it falls back to the eager code, with one warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

_compiled: dict[Callable, Callable] = {}
_broken = False


def _wanted(like: torch.Tensor) -> bool:
    setting = os.environ.get("MOMRES_FUSE", "0")
    if _broken:
        return False
    return setting == "1" or (setting == "auto" and like.device.type == "cuda")


def fused(fn: Callable, like: torch.Tensor) -> Callable:
    """``fn`` compiled into one kernel when asked for tensors like ``like``, else ``fn``."""
    if not _wanted(like):
        return fn
    if fn not in _compiled:
        _compiled[fn] = _with_fallback(fn, torch.compile(fn, dynamic=True))
    return _compiled[fn]


def _with_fallback(fn: Callable, compiled: Callable) -> Callable:
    def call(*args):
        global _broken
        if _broken:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as error:  # compilation failed: no compiler, unsupported platform...
            _broken = True
            warnings.warn(
                f"momres: could not compile the fused exact-arithmetic kernels ({error!r:.200}); "
                "using the eager kernels (same results, slower). Set MOMRES_FUSE=0 to skip.",
                RuntimeWarning, stacklevel=2,
            )
            return fn(*args)

    return call
