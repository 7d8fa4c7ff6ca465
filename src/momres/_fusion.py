"""Fused kernels for the exact arithmetic on CUDA, compiled with ``torch.compile`` (opt-in).

On the CPU the fused kernels are plain C (``_kernels``), built in a fraction of a second and
cached.  On CUDA each eager pass of the exact step is a kernel launch: there
``MOMRES_FUSE=auto`` compiles the step into one kernel (untested here: no GPU was available),
which takes 5 to 16 s on first use in every new process.  ``MOMRES_FUSE=1`` compiles on every
device, the CPU included, instead of using the C kernels (the tests use this to check, on the
CPU, that the compiled step gives the eager integers); the default ``MOMRES_FUSE=0`` never
compiles.  The compiled function is the eager one, traced, so both compute the same integers.
If compiling fails it falls back to the eager code, with one warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

_compiled: dict[Callable, Callable] = {}
_broken = False


def fusing(like: torch.Tensor) -> bool:
    """Whether the exact arithmetic on tensors like ``like`` runs compiled (``fused``)."""
    setting = os.environ.get("MOMRES_FUSE", "0")
    if _broken:
        return False
    return setting == "1" or (setting == "auto" and like.device.type == "cuda")


def fused(fn: Callable, like: torch.Tensor) -> Callable:
    """``fn`` compiled into one kernel when asked for tensors like ``like``, else ``fn``."""
    if not fusing(like):
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
