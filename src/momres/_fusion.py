"""Fused kernels for the exact arithmetic, compiled once with ``torch.compile``.

Eagerly, one exact step is about a dozen elementwise passes over float64 tensors, each a trip
through memory.  Compiled, it is one loop.  The compiled function is the eager one (the same
code, traced), so both compute the same integers; forward and backward of a stage always pick
the same path, because the choice depends only on the tensors' size and device.

Compilation costs tens of seconds on first use (then it is cached on disk by PyTorch) and needs
a C++ compiler, so it is opt-in: ``MOMRES_FUSE=auto`` uses it on the CPU for tensors large enough
to gain from it, ``MOMRES_FUSE=1`` for every size (the tests use this), and the default
``MOMRES_FUSE=0`` never.  If compiling fails it falls back to the eager code, with one warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

#: Smallest tensor (elements) for which the fused kernels are used by default.
MIN_ELEMENTS = 2**16

_compiled: dict[Callable, Callable] = {}
_broken = False


def _wanted(like: torch.Tensor) -> bool:
    setting = os.environ.get("MOMRES_FUSE", "0")
    if _broken or setting == "0" or like.device.type != "cpu":
        return False
    return setting == "1" or like.numel() >= MIN_ELEMENTS


def fused(fn: Callable, like: torch.Tensor) -> Callable:
    """``fn`` compiled into one kernel when that pays for tensors like ``like``, else ``fn``."""
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
