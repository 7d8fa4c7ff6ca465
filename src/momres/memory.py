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
* ``keep_freed_memory()``: glibc told to keep freed blocks for reuse, as CUDA's caching
  allocator does, so that a CPU training step does not fault its activations' pages in again
  every step (the ``momres`` command does this).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
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


#: glibc's ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in the process and hand it out again; whether
    it could (``False`` where the C library is not glibc: nothing is changed).

    By default glibc serves every allocation above its threshold (128 KiB, rising to at most
    32 MiB) with a fresh mapping and unmaps it when freed, and returns freed memory at the top
    of its heap to the system.  A training step frees its activations and allocates them again
    in the next step, so every step faults their pages in anew: on a virtual machine about
    2.5 microseconds per 4 KiB page, more than the arithmetic on a tensor costs.  With mappings
    and trimming off, freed blocks are reused as CUDA's caching allocator reuses them (or
    jemalloc and tcmalloc on the CPU).  The price is the same as on a GPU: the process keeps
    its peak heap.  Leave it off where peak resident memory is being measured
    (``in_fresh_process`` runs without it).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it (musl has a mallopt too)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # INT_MAX: the largest value mallopt takes; never trim the heap's free top.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


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
