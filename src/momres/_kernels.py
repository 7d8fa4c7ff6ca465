"""Fused CPU kernels for the exact arithmetic, in plain C (``_kernels.c``), compiled on first use.

Eagerly, one block of the exact rule is a dozen elementwise torch passes per direction, each
a Python call and a trip through memory; ``_kernels.c`` does each step in one pass per
element, with no scratch tensors, and computes the same integers bit for bit (its header says
why; ``tests/test_kernels.py`` checks it).  It includes no torch header, so the system C
compiler (``cc``, or ``$MOMRES_CC``) builds it in a fraction of a second, once per user: the
library is cached in ``$MOMRES_CACHE_DIR`` (default ``$XDG_CACHE_HOME/momres`` or
``~/.cache/momres``) under a hash of the source, the compiler and the flags, written under a
temporary name and renamed into place, so that concurrent processes never see half a file.
Later processes only load it.

:func:`kernels` gives the loaded library, or ``None`` where the eager code runs instead: not on
the CPU, ``MOMRES_KERNELS=0``, or no working compiler (one warning per process).  The callers
check each tensor (:func:`supported`): contiguous, of a type the kernels are made for;
anything else (float16, bfloat16, strided views) runs eagerly, with the same results.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_kernels.c")
FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-shared", "-fPIC"]
SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.uint8: "u8", torch.int16: "i16",
          torch.int32: "i32"}

_i64, _f64, _int, _ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
#: The exported functions of ``_kernels.c`` and their arguments.
FUNCTIONS = {
    **{f"momres_forward_{g}": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _f64, _f64, _int]
       for g in ("f32", "f64")},
    **{f"momres_backward_{g}_{b}": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _f64, _int]
       for g in ("f32", "f64") for b in ("u8", "i16", "i32", "f64")},
    "momres_retreat_f32": [_ptr, _ptr, _ptr, _i64, _int, _int],
    "momres_retreat_f64": [_ptr, _ptr, _i64, _int, _int],
}

_library: ctypes.CDLL | None = None
_failed = False


def compiler() -> str:
    """The C compiler to build with: ``$MOMRES_CC``, else ``cc``."""
    return os.environ.get("MOMRES_CC", "cc")


def cache_dir() -> Path:
    """Where the built library is cached (see the module's docstring)."""
    if "MOMRES_CACHE_DIR" in os.environ:
        return Path(os.environ["MOMRES_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "momres"


def library_path(cc: str) -> Path:
    """Where the library built by ``cc`` (a resolved path) is cached: named by a hash of the
    source, the compiler (path, size, modification time), the flags and the platform."""
    stat = os.stat(cc)
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(f"{cc}\0{stat.st_size}\0{stat.st_mtime_ns}\0{FLAGS}\0{sys.platform}\0{platform.machine()}".encode())
    return cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"


def build(cc: str, path: Path) -> None:
    """Compile the source into ``path`` (with OpenMP where the compiler has it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        errors = ""
        for extra in (["-fopenmp"], []):
            run = subprocess.run([cc, *FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"],
                                 capture_output=True, text=True, timeout=120)
            if run.returncode == 0:
                os.replace(tmp, path)
                return
            errors = run.stderr.strip()
        raise RuntimeError(f"{cc} failed: {errors[-300:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> ctypes.CDLL:
    """The library, built first if the cache does not hold it (raises on any failure)."""
    cc = shutil.which(compiler())
    if cc is None:
        raise FileNotFoundError(f"no C compiler {compiler()!r} (set MOMRES_CC)")
    path = library_path(os.path.realpath(cc))
    if not path.exists():
        build(cc, path)
    library = ctypes.CDLL(str(path))
    for name, arguments in FUNCTIONS.items():
        getattr(library, name).argtypes = arguments
        getattr(library, name).restype = None
    return library


def kernels(like: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels for tensors like ``like``, or ``None`` where the eager code must run."""
    global _library, _failed
    if like.device.type != "cpu" or _failed or os.environ.get("MOMRES_KERNELS", "1") == "0":
        return None
    if _library is None:
        try:
            _library = load()
        except Exception as error:  # no compiler, a compile error, an unloadable library
            _failed = True
            warnings.warn(
                f"momres: could not build the fused exact-arithmetic kernels ({error!r:.300}); "
                "using the eager arithmetic (same results, slower). Set MOMRES_KERNELS=0 to "
                "skip, MOMRES_CC to name a C compiler, or MOMRES_CACHE_DIR a writable folder.",
                RuntimeWarning, stacklevel=3)
            return None
    return _library


def supported(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can run on ``tensors`` (``None``: absent) in place: CPU tensors of
    the types the kernels are made for, dense in one layout (the same shape and strides,
    contiguous in some memory format), so that equal offsets are the same element."""
    first = tensors[0]
    if not (first.is_contiguous() or (first.dim() == 4 and first.is_contiguous(
            memory_format=torch.channels_last))):
        return False
    shape, strides = first.shape, first.stride()
    for t in tensors:
        if t is not None and (t.dtype not in SUFFIX or t.device.type != "cpu"
                              or t.shape != shape or t.stride() != strides):
            return False
    return True


def forward_step_(lib: ctypes.CDLL, x: torch.Tensor, v: torch.Tensor, buf: torch.Tensor,
                  g: torch.Tensor, num: int, den: int, scale: float, unit: float) -> bool:
    """``_exact.forward_step_`` in one pass, in place (``x``, ``v``, ``buf`` float64, ``g``
    float32 or float64); ``False`` (nothing done) where the kernels cannot run on them."""
    if not (supported(x, v, buf, g) and x.dtype == v.dtype == buf.dtype == torch.float64
            and g.is_floating_point()):
        return False
    getattr(lib, f"momres_forward_{SUFFIX[g.dtype]}")(
        x.data_ptr(), v.data_ptr(), buf.data_ptr(), g.data_ptr(), x.numel(), num, den, scale,
        unit, torch.get_num_threads())
    return True


def backward_step_(lib: ctypes.CDLL, v: torch.Tensor, buf: torch.Tensor, g: torch.Tensor,
                   num: int, den: int, scale: float) -> bool:
    """``_exact.backward_chunk_`` in one pass over whole tensors, in place (``v`` float64,
    ``buf`` in its stored type, ``g`` float32 or float64); ``False`` where it cannot run."""
    if not (supported(v, buf, g) and v.dtype == torch.float64 and g.is_floating_point()):
        return False
    getattr(lib, f"momres_backward_{SUFFIX[g.dtype]}_{SUFFIX[buf.dtype]}")(
        v.data_ptr(), buf.data_ptr(), g.data_ptr(), v.numel(), num, den, scale,
        torch.get_num_threads())
    return True


def retreat_(lib: ctypes.CDLL, x: torch.Tensor, remainder: torch.Tensor | None,
             v: torch.Tensor, frac_bits: int) -> bool:
    """``_exact.retreat_chunk_`` in one pass, in place: ``x`` float32 with an int32
    ``remainder``, or float64 without one; ``False`` where it cannot run."""
    if not supported(x, remainder, v) or v.dtype != torch.float64:
        return False
    if remainder is None and x.dtype == torch.float64:
        lib.momres_retreat_f64(x.data_ptr(), v.data_ptr(), x.numel(), frac_bits,
                               torch.get_num_threads())
    elif remainder is not None and (x.dtype, remainder.dtype) == (torch.float32, torch.int32):
        lib.momres_retreat_f32(x.data_ptr(), remainder.data_ptr(), v.data_ptr(), x.numel(),
                               frac_bits, torch.get_num_threads())
    else:
        return False
    return True
