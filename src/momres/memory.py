"""Memory accounting, the one place for it: what a step saves, what it peaks at.

* ``activation_memory(module, *inputs)``: bytes autograd saves for the backward pass in one
  forward pass; what depth multiplies in a plain network, and what a memory-free stage removes.
* ``peak_bytes(step)``: the peak of tensor memory allocated while ``step()`` runs, above what was
  in use when it started; what decides whether a training step fits (the CPU counterpart of
  ``torch.cuda.max_memory_allocated``).
* ``peak_resident_bytes()`` / ``reset_peak_resident()``: the process's peak resident memory, for
  whole-program figures.  On CPU it follows live tensors only with glibc told to unmap freed
  blocks (``MALLOC_MMAP_THRESHOLD_=65536`` in the environment before Python starts) and the
  peak reset after warm-up; otherwise it wanders by tens of percent.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate, chain
from typing import Any

import torch
from torch import nn

MIB = 2**20


def activation_memory(module: nn.Module, *inputs, **kwargs) -> int:
    """Bytes saved for backward by one forward pass of ``module(*inputs, **kwargs)``.

    Every tensor that autograd keeps for the backward pass goes through the saved-tensor
    hooks; each underlying storage is counted once, at its full size.  The module's own
    parameters and buffers are not counted (they exist whether or not you train), the inputs
    are (a layer that keeps its input keeps it alive).

    Limits: it runs one real forward pass (with grad enabled, in the module's current mode),
    sees only what autograd saves (not the caching allocator's free blocks, not workspace
    memory of kernels, not the backward pass's working set: ``peak_bytes`` sees those), and
    counts a view by its whole storage.
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


def peak_bytes(step: Callable[[], Any], device: str | torch.device | None = None) -> int:
    """Peak bytes of tensor memory allocated while ``step()`` runs, beyond those in use before.

    CUDA: from ``torch.cuda.max_memory_allocated`` (the peak statistics are reset).  CPU: every
    tensor allocation and free of this thread, in order, as traced by ``torch.profiler``; the
    tracer slows the step down, so time it separately.  ``device=None`` measures CUDA when it
    is initialised in this process, else the CPU.  Returns the peak; keep ``step``'s results
    through its closure if you need them.

        peak = momres.memory.peak_bytes(lambda: model(x).sum().backward())
    """
    if device is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        device = torch.device("cuda") if cuda else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu":
        raise ValueError(f"momres: peak_bytes measures cpu and cuda, not {device.type}.")
    sizes = (e for e in allocation_trace(step) if isinstance(e, int))
    return max(0, max(accumulate(sizes), default=0))


#: Prefix of the profiler ranges that ``mark`` records.
_MARK = "momres.mark:"


def mark(label: str) -> None:
    """Record ``label`` at this point of an ``allocation_trace`` (nothing when not tracing)."""
    with torch.profiler.record_function(_MARK + label):
        pass


def allocation_trace(step: Callable[[], Any]) -> list[int | str]:
    """Every tensor allocation (bytes, positive) and free (negative) of this thread on the CPU
    while ``step()`` runs, in order, with the labels of the ``mark`` calls made meanwhile in
    their places: the timeline behind ``peak_bytes`` (and ``momres.plan``)."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                  profile_memory=True)
    with _silenced_stderr():  # kineto prints a line at every start and stop
        prof.start()
    try:
        step()
    finally:
        with _silenced_stderr():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" or e.name().startswith(_MARK)]
    events.sort(key=lambda e: e.start_ns())
    return [e.nbytes() if e.name() == "[memory]" else e.name().removeprefix(_MARK)
            for e in events]


@contextlib.contextmanager
def _silenced_stderr() -> Iterator[None]:
    """Send file descriptor 2 (where C++ libraries log) to /dev/null for a moment."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each storage counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def peak_resident_bytes() -> int:
    """This process's peak resident memory since it started or since ``reset_peak_resident``.

    Linux: ``VmHWM``, the high-water mark of this process's own address space.  Not
    ``ru_maxrss`` (the fallback elsewhere): a child started by ``subprocess`` (vfork, then exec)
    inherits its parent's peak there, so every child would report at least the parent's.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_resident() -> bool:
    """Reset ``peak_resident_bytes`` to the current resident set (Linux); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def in_fresh_process(code: str) -> float:
    """Run Python ``code`` in a new interpreter and return the last number it prints.

    glibc is told to map every allocation above 64 KiB on its own
    (``MALLOC_MMAP_THRESHOLD_=65536``), so that freed tensors leave the process at once and its
    peak resident memory follows the live tensors, not the heap's fragmentation.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])
