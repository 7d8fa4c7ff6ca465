"""Fused CPU kernels in plain C (``_kernels.c``), compiled on first use: the exact arithmetic
and the floating-point rule.

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
the CPU, under a tracer (``jit.trace``, ``torch.export``, ``torch.compile``), ``MOMRES_KERNELS=0``,
or no working compiler (one warning per process).  The callers
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
# -O2 with the vectoriser: the loops -O3 vectorises, at the same speed, in three quarters of the
# compile time (gcc 12: 1.5 s against 2.0, the first use of each new version).
FLAGS = ["-O2", "-ftree-vectorize", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
         "-shared", "-fPIC"]
SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.uint8: "u8", torch.int16: "i16",
          torch.int32: "i32"}

_i64, _f64, _int, _ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
#: The exported functions of ``_kernels.c`` and their arguments.
FUNCTIONS = {
    **{f"momres_forward_{g}": [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _f64, _f64, _int]
       for g in ("f32", "f64")},
    **{f"momres_backward_{g}_{b}": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _f64, _int]
       for g in ("f32", "f64") for b in ("u8", "i16", "i32", "f64")},
    **{f"momres_backward_skip_{g}_{b}": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _f64, _int]
       for g in ("f32", "f64") for b in ("u8", "i16", "i32", "f64")},
    **{f"momres_backward_tail_{g}_{b}": [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64,
                                         _f64, _int]
       for g in ("f32", "f64") for b in ("u8", "i16", "i32", "f64")},
    "momres_retreat_f32": [_ptr, _ptr, _ptr, _i64, _int, _int],
    "momres_retreat_f64": [_ptr, _ptr, _i64, _int, _int],
    **{f"momres_rule_{name}_{t}": arguments for t in ("f32", "f64") for name, arguments in {
        "forward": [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _f64, _f64, _int, _int],
        "step": [_ptr, _ptr, _ptr, _ptr, _i64, _f64, _f64, _int, _int],
        "advance": [_ptr, _ptr, _ptr, _i64, _f64, _f64, _int],
        "advance_skip": [_ptr, _ptr, _ptr, _i64, _f64, _f64, _int],
        "advance_tail": [_ptr, _ptr, _ptr, _i64, _f64, _f64, _int],
        "rebuild": [_ptr, _ptr, _ptr, _i64, _f64, _f64, _int],
        "rebuild_tail": [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _f64, _f64, _int],
        "grads": [_ptr, _ptr, _ptr, _ptr, _i64, _f64, _f64, _int, _int],
        "backward": [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _f64, _f64, _int, _int],
        "tail": [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _f64, _f64, _int],
        "tail_backward": [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _f64, _f64, _int],
    }.items()},
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
    # Tracers (jit.trace, export, compile) see tensors without data, or would record nothing
    # of a call through ctypes: they get the eager operations.
    if type(like) is not torch.Tensor or torch.jit.is_tracing() or torch.compiler.is_compiling():
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
                  g: torch.Tensor, num: int, den: int, scale: float, unit: float,
                  pos: torch.Tensor | None = None) -> bool:
    """``_exact.forward_step_`` in one pass, in place (``x``, ``v``, ``buf`` float64, ``g``
    float32 or float64); with ``pos`` (of ``g``'s type), ``x.to(pos.dtype)`` is written there
    in the same pass.  ``False`` (nothing done) where the kernels cannot run on them."""
    if not (supported(x, v, buf, g, pos) and x.dtype == v.dtype == buf.dtype == torch.float64
            and g.is_floating_point() and (pos is None or pos.dtype == g.dtype)):
        return False
    getattr(lib, f"momres_forward_{SUFFIX[g.dtype]}")(
        x.data_ptr(), v.data_ptr(), buf.data_ptr(), g.data_ptr(), _address(pos), x.numel(), num,
        den, scale, unit, torch.get_num_threads())
    return True


def backward_step_(lib: ctypes.CDLL, v: torch.Tensor, buf: torch.Tensor, g: torch.Tensor,
                   num: int, den: int, scale: float, x: torch.Tensor | None = None,
                   b: torch.Tensor | None = None) -> torch.Tensor | bool:
    """``_exact.backward_chunk_`` in one pass over whole tensors, in place (``v`` float64,
    ``buf`` in its stored type, ``g`` float32 or float64); with ``x`` (of ``g``'s type),
    ``g - x`` in place of ``g``, rounded as torch rounds it.  With ``b`` too, ``g`` is the
    branch ``r`` of a block ending in ``relu(r + x)`` (``_tail``), ``relu(r + x) - x`` is
    used, and the cotangent ReLU hands the branch, ``where(r + x > 0, b, 0)``, is returned (a
    new tensor).  ``False`` (nothing done) where it cannot run."""
    if not (supported(v, buf, g, x, b) and v.dtype == torch.float64 and g.is_floating_point()
            and all(t is None or t.dtype == g.dtype for t in (x, b))):
        return False
    types = f"{SUFFIX[g.dtype]}_{SUFFIX[buf.dtype]}"
    threads = torch.get_num_threads()
    if x is None:
        getattr(lib, f"momres_backward_{types}")(
            v.data_ptr(), buf.data_ptr(), g.data_ptr(), v.numel(), num, den, scale, threads)
    elif b is None:
        getattr(lib, f"momres_backward_skip_{types}")(
            v.data_ptr(), buf.data_ptr(), g.data_ptr(), x.data_ptr(), v.numel(), num, den,
            scale, threads)
    else:
        c = torch.empty_like(b)
        getattr(lib, f"momres_backward_tail_{types}")(
            v.data_ptr(), buf.data_ptr(), g.data_ptr(), x.data_ptr(), b.data_ptr(), c.data_ptr(),
            v.numel(), num, den, scale, threads)
        return c
    return True


def _address(t: torch.Tensor | None) -> int | None:
    """``t``'s data pointer, ``None`` (NULL) for an absent tensor."""
    return None if t is None else t.data_ptr()


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


# The momentum rule in floating point: each function returns ``None`` (or ``False``) where the
# kernels cannot run, and the caller runs the eager operations, which give the same numbers.

def _floats(*tensors: torch.Tensor) -> str | None:
    """The suffix of the rule's kernels for ``tensors``: one floating type, one layout."""
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64) or not supported(*tensors) or any(
            t.dtype != dtype for t in tensors):
        return None
    return SUFFIX[dtype]


def rule_forward(lib: ctypes.CDLL, x: torch.Tensor, v: torch.Tensor, y: torch.Tensor,
                 gamma: float, residual: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x + v', v')`` with ``v' = gamma*v + (1-gamma)*g``, ``g = y`` or ``y - x`` (new
    tensors), as ``_rule.RuleStep`` computes it eagerly."""
    suffix = _floats(x, v, y)
    if suffix is None:
        return None
    x_out, v_out = torch.empty_like(x), torch.empty_like(v)
    getattr(lib, f"momres_rule_forward_{suffix}")(
        x.data_ptr(), v.data_ptr(), y.data_ptr(), x_out.data_ptr(), v_out.data_ptr(),
        x.numel(), gamma, 1 - gamma, residual, torch.get_num_threads())
    return x_out, v_out


def rule_step_(lib: ctypes.CDLL, x: torch.Tensor, v: torch.Tensor, y: torch.Tensor,
               gamma: float, residual: bool) -> torch.Tensor | None:
    """``rule_forward`` with ``v'`` written over ``v``: gives ``x + v'`` (a new tensor)."""
    suffix = _floats(x, v, y)
    if suffix is None:
        return None
    x_out = torch.empty_like(x)
    getattr(lib, f"momres_rule_step_{suffix}")(
        x.data_ptr(), v.data_ptr(), y.data_ptr(), x_out.data_ptr(), x.numel(), gamma,
        1 - gamma, residual, torch.get_num_threads())
    return x_out


def rule_advance_(lib: ctypes.CDLL, x: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                  gamma: float, skip: bool = False, tail: bool = False) -> bool:
    """``v <- gamma*v + (1-gamma)*g; x <- x + v`` in place (``FloatInversion.advance``); with
    ``skip``, ``g`` is the output ``y`` of a block run at ``x`` itself, and ``y - x`` is used
    (taken before ``x`` moves); with ``tail``, ``g`` is the branch ``r`` of a block ending in
    ``relu(r + x)`` (``_tail``), and ``relu(r + x) - x`` is used."""
    suffix = _floats(x, v, g)
    if suffix is not None:
        name = "_tail" if tail else "_skip" if skip else ""
        getattr(lib, f"momres_rule_advance{name}_{suffix}")(
            x.data_ptr(), v.data_ptr(), g.data_ptr(), x.numel(), gamma, 1 - gamma,
            torch.get_num_threads())
    return suffix is not None


def rule_rebuild_(lib: ctypes.CDLL, v: torch.Tensor, g: torch.Tensor, gamma: float,
                  x: torch.Tensor | None = None, b: torch.Tensor | None = None
                  ) -> torch.Tensor | bool:
    """``v <- (v - (1-gamma)*g) / gamma`` in place (``FloatInversion.rebuild``); with ``x``,
    ``g - x`` in place of ``g``; with ``b`` too, ``g`` is a branch ``r`` and ``relu(r + x) -
    x`` is used, and the cotangent ``where(r + x > 0, b, 0)`` returned (as
    ``backward_step_``)."""
    suffix = _floats(v, g, *(t for t in (x, b) if t is not None))
    if suffix is None:
        return False
    threads = torch.get_num_threads()
    if b is None:
        getattr(lib, f"momres_rule_rebuild_{suffix}")(
            v.data_ptr(), g.data_ptr(), _address(x), v.numel(), gamma, 1 - gamma, threads)
        return True
    c = torch.empty_like(b)
    getattr(lib, f"momres_rule_rebuild_tail_{suffix}")(
        v.data_ptr(), g.data_ptr(), x.data_ptr(), b.data_ptr(), c.data_ptr(), v.numel(), gamma,
        1 - gamma, threads)
    return c


def rule_grads_(lib: ctypes.CDLL, a_x: torch.Tensor, b: torch.Tensor, grad: torch.Tensor,
                gamma: float, residual: bool, c: torch.Tensor | None = None) -> bool:
    """The memory-free backward's gradients after a block (``_rule.backward_step``), in
    place: ``a_x += (1-gamma)*(grad - b)`` (``grad`` alone for a residual branch; ``(grad +
    c) - b`` with ``c``, the cotangent a tail block's branch got) and ``b *= gamma``, as the
    eager operations round them.  ``grad`` must not share ``b``'s memory (a block that
    returns its input hands the cotangent back as its gradient)."""
    suffix = _floats(a_x, b, grad, *(() if c is None else (c,)))
    if suffix is None or _overlap(grad, b) or _overlap(grad, a_x) or _overlap(a_x, b):
        return False
    getattr(lib, f"momres_rule_grads_{suffix}")(
        a_x.data_ptr(), b.data_ptr(), grad.data_ptr(), _address(c), a_x.numel(), gamma,
        1 - gamma, residual, torch.get_num_threads())
    return True


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two dense tensors (``supported``) share memory: their byte ranges meet."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def rule_backward(lib: ctypes.CDLL, a_x: torch.Tensor, a_v: torch.Tensor, gamma: float,
                  residual: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``RuleStep``'s gradients ``(dL/dx, dL/dv, dL/dy)`` from those of its outputs (``dL/dx``
    is ``a_x`` itself for a residual branch)."""
    suffix = _floats(a_x, a_v)
    if suffix is None:
        return None
    d_v, d_y = torch.empty_like(a_x), torch.empty_like(a_x)
    d_x = a_x if residual else torch.empty_like(a_x)
    getattr(lib, f"momres_rule_backward_{suffix}")(
        a_x.data_ptr(), a_v.data_ptr(), d_x.data_ptr(), d_v.data_ptr(), d_y.data_ptr(),
        a_x.numel(), gamma, 1 - gamma, residual, torch.get_num_threads())
    return d_x, d_v, d_y


def rule_tail(lib: ctypes.CDLL, x: torch.Tensor, v: torch.Tensor, r: torch.Tensor,
              gamma: float, own_v: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``rule_forward`` for a block ending in ``relu(r + x)``, given its branch ``r``: ``(x +
    v', v', r + x > 0)``, with ``v'`` written over ``v`` if ``own_v``."""
    suffix = _floats(x, v, r)
    if suffix is None:
        return None
    x_out, v_out = torch.empty_like(x), v if own_v else torch.empty_like(v)
    mask = torch.empty_like(x, dtype=torch.bool)
    getattr(lib, f"momres_rule_tail_{suffix}")(
        x.data_ptr(), v.data_ptr(), r.data_ptr(), x_out.data_ptr(), v_out.data_ptr(),
        mask.data_ptr(), x.numel(), gamma, 1 - gamma, torch.get_num_threads())
    return x_out, v_out, mask


def rule_tail_backward(lib: ctypes.CDLL, a_x: torch.Tensor | None, a_v: torch.Tensor | None,
                       mask: torch.Tensor, gamma: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``rule_tail``'s gradients ``(dL/dx, dL/dv, dL/dr)`` from those of its outputs (at
    least one given; ``None``: zero)."""
    given = [t for t in (a_x, a_v) if t is not None]
    suffix = _floats(*given)
    if suffix is None or mask.stride() != given[0].stride():
        return None
    d_x, d_v, d_r = (torch.empty_like(given[0]) for _ in range(3))
    getattr(lib, f"momres_rule_tail_backward_{suffix}")(
        _address(a_x), _address(a_v), mask.data_ptr(), d_x.data_ptr(), d_v.data_ptr(),
        d_r.data_ptr(), d_x.numel(), gamma, 1 - gamma, torch.get_num_threads())
    return d_x, d_v, d_r
