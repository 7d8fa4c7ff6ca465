"""Exact arithmetic for the memory-free momentum update.

The update ``v <- g*v + (1-g)*f(x); x <- x + v`` loses bits when it is inverted in floating
point: dividing by ``g`` amplifies rounding error by ``1/g`` per block.  Here it is made exactly
reversible instead:

* ``x`` and ``v`` are fixed-point integers with ``frac_bits`` fractional bits.  Integer
  additions (``x + v``, adding the quantised ``(1-g)*f(x)``) are reversible exactly.
* The multiplication by ``g = n/d`` keeps the bits it would destroy in an *information buffer*
  ``i >= 0`` per element (Maclaurin, Duvenaud & Adams, 2015).

The integers are held in **float64** tensors.  Every integer of magnitude below 2**53 is exact
in float64, and on such values ``+``, ``-``, ``*`` by a small integer and ``floor(a / b)`` are
exact too (IEEE division is correctly rounded, and the distance from a non-integer quotient to
the next integer, at least ``1/b``, is larger than the rounding error while ``|a| < 2**53``).
This keeps every step a plain, vectorised floating-point kernel: no int64 division (an order of
magnitude slower on CPUs) and no int/float conversions.  The price is range: values must stay
below 2**52 in magnitude, which the caller checks (``range_limit``) and the buffer is spilled
before it would outgrow 2**53 (``spill_schedule``).

The step functions here are the eager reference; on the CPU the fused kernels of ``_kernels``
compute the same integers in one pass per element, and these run where those cannot.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

#: Largest denominator allowed when snapping gamma to a fraction n/d.
MAX_DENOMINATOR = 2**16
#: Every integer below this magnitude is exact in float64.
EXACT_LIMIT = 2**53


def default_frac_bits(dtype: torch.dtype) -> int:
    """Fractional bits of the fixed-point state for activations of ``dtype``.

    53 bits are shared between range and resolution.  Float64 users want gradients that agree
    with plain autograd to ~1e-8 (40 bits: resolution 9e-13, range +-4096); for float32 and
    narrower types the float rounding of the blocks dominates anyway (30 bits: resolution
    9e-10, range +-4.2e6).
    """
    return 40 if dtype == torch.float64 else 30


#: Fewest significant bits the fixed-point state should give the activations (fewer: a warning).
MIN_STATE_BITS = 16


def significant_bits(dtype: torch.dtype) -> int:
    """Significant bits of a floating-point ``dtype``, the implicit one included (24 for
    float32, 11 for float16, 8 for bfloat16)."""
    return 1 - round(math.log2(torch.finfo(dtype).eps))


def resolution_floor(frac_bits: int, dtype: torch.dtype) -> float:
    """Largest magnitude below which activations are resolved too coarsely by the grid.

    An activation of magnitude ``a`` keeps ``log2(a * 2**frac_bits)`` significant bits on the
    grid.  Below ``MIN_STATE_BITS`` (a relative resolution of 2**-16 = 1.5e-5; measured on
    tanh MLP blocks, gradients then drift from plain autograd by 1e-4 and more, about twice as
    much per bit lost) or below the dtype's own precision, whichever is fewer, the rounding to
    the grid dominates every other error.
    """
    return 2.0 ** (min(MIN_STATE_BITS, significant_bits(dtype)) - frac_bits)


def snap_gamma(gamma: float) -> Fraction:
    """The fraction n/d (d <= 2**16) nearest to ``gamma``: the value used in every mode."""
    return Fraction(gamma).limit_denominator(MAX_DENOMINATOR)


def range_limit(frac_bits: int) -> float:
    """Largest magnitude a state value may reach so that ``x + v`` stays below 2**53."""
    return 2.0 ** (52 - frac_bits)


def to_grid(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """``x`` rounded to the fixed-point grid ``2**-frac_bits``, as a new float64 tensor.

    The position ``x`` is kept in value units on the grid: sums of grid values are exact, and
    its float value for the blocks is a single conversion.
    """
    return x.to(torch.float64, copy=True).mul_(2.0**frac_bits).round_().mul_(2.0**-frac_bits)


def to_units(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """``x`` as an integer number of grid units ``2**-frac_bits`` (a new float64 tensor).

    The velocity is kept in units, because the exact multiplication by ``gamma`` needs
    integers.
    """
    return x.to(torch.float64, copy=True).mul_(2.0**frac_bits).round_()


def from_units(units: torch.Tensor, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The floating-point value of a tensor in grid units, in ``dtype`` (a new tensor)."""
    return units.mul(2.0**-frac_bits).to(dtype)


def split_grid_(grid: torch.Tensor, frac_bits: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A grid tensor as its value in ``dtype`` plus the remainder in grid units (or ``None``).

    The stage's output is the value in ``dtype``, which the next layer usually keeps anyway, so
    storing the grid state as ``(output, remainder)`` costs only the remainder: for float32 an
    int32 (the remainder is below half a float32 ulp, at most 2**27 units within the range),
    nothing for float64, a float64 for narrower types.  ``grid`` is consumed: the remainder is
    computed in its memory (for float64 it is the value), so no temporary is made.
    """
    if dtype == torch.float64:
        return grid, None
    value = grid.to(dtype, copy=True)
    remainder = grid.sub_(value).mul_(2.0**frac_bits)
    return value, remainder.to(torch.int32) if dtype == torch.float32 else remainder


def join_grid(value: torch.Tensor, remainder: torch.Tensor | None, frac_bits: int
              ) -> torch.Tensor:
    """Inverse of :func:`split_grid_` (a new float64 tensor)."""
    grid = value.to(torch.float64, copy=True)
    return grid if remainder is None else grid.add_(remainder, alpha=2.0**-frac_bits)


def quantise(g: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``round(scale * g)`` into ``out`` (float64).  The same ``g`` always gives the same
    integers, which is all that exact reversal needs.

    For float32 and float64 the product is computed in ``g``'s dtype, like the floating-point
    rule.  Narrower types are widened to float64 first (exactly, in ``out``'s memory): ``scale``
    is about ``(1 - gamma) * 2**30``, so the product would overflow float16 (largest value
    65504) and keep only 8 significant bits in bfloat16.
    """
    if g.dtype in (torch.float32, torch.float64):
        return torch.mul(g, scale, out=out).round_()
    return out.copy_(g).mul_(scale).round_()


def _divisor(value: int, like: torch.Tensor) -> float | torch.Tensor:
    # On CUDA a Python-scalar divisor is turned into a multiplication by its reciprocal, which
    # is not exact; a 0-dim tensor on the device keeps the true, correctly rounded division.
    return value if like.device.type == "cpu" else torch.tensor(float(value), device=like.device)


def mul_frac_(
    c: torch.Tensor, i: torch.Tensor, tmp: torch.Tensor, num: int, den: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exactly ``c <- c * num / den`` with the lost bits pushed onto the buffer ``i``.

    ``i <- i*den + (c mod den); c <- c div den; c <- c*num + (i mod num); i <- i div num``
    with floor division and floor modulo throughout.  The three tensors are reused in place
    and handed back in their new roles ``(c, i, tmp)``.  Its inverse is the same call with
    ``num`` and ``den`` swapped.
    """
    if num == den:
        return c, i, tmp
    torch.div(c, _divisor(den, c), out=tmp).floor_()  # tmp = c div den
    c.sub_(tmp, alpha=den)  # c = c mod den
    torch.add(c, i, alpha=den, out=i)  # i = i*den + c mod den
    # i >= 0 here, so truncation is the floor: one pass instead of two.
    torch.div(i, _divisor(num, i), rounding_mode="trunc", out=c)  # c = i div num (new buffer)
    i.sub_(c, alpha=num)  # i = i mod num
    i.add_(tmp, alpha=num)  # i = (c div den)*num + i mod num   (the new value)
    return i, c, tmp


#: Elements per chunk of the backward pass's arithmetic on the CPU: its float64 scratch is
#: 4 MiB, however large the stage (it would be 16 bytes per element of the state at full
#: size), and a chunk stays in the last-level cache over its dozen passes.  Larger than the
#: L2 cache, because every pass is a Python call too.
CHUNK = 2**18


def chunk_rows(like: torch.Tensor) -> int:
    """Rows (along dim 0) per chunk of the elementwise arithmetic on tensors like ``like``.

    Chunks are slices along dim 0, so every tensor of the state is cut at the same logical
    indices whatever its memory layout.  On CUDA one chunk is the whole tensor: there, cache
    reuse matters less than the number of kernel launches.
    """
    if like.dim() == 0:
        return 1
    rows = like.shape[0]
    if like.device.type != "cpu" or rows == 0:
        return max(rows, 1)
    return max(1, min(rows, CHUNK // max(1, like.numel() // rows)))


def chunks(rows: int, *tensors: torch.Tensor):
    """Matching slices along dim 0 of ``tensors`` (0-dim tensors: the tensors themselves)."""
    if tensors[0].dim() == 0:
        yield tensors
        return
    for start in range(0, tensors[0].shape[0], rows):
        yield tuple(t[start : start + rows] for t in tensors)


def scratch(like: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 scratch tensors of one chunk's size (flat; ``shaped`` views them).

    Made for each block's arithmetic and freed with it, so that they never sit beside a
    block's graph at the peak of the backward pass; reused across the chunks.
    """
    size = like.numel() if like.dim() == 0 else rows * (like.numel() // max(1, like.shape[0]))
    flat = torch.empty(2, size, dtype=torch.float64, device=like.device)
    return flat[0], flat[1]


def shaped(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The first ``like.numel()`` elements of the flat scratch ``flat``, shaped like ``like``."""
    return flat[: like.numel()].view(like.shape)


def forward_step_(
    x: torch.Tensor, v: torch.Tensor, i: torch.Tensor, tmp: torch.Tensor, g: torch.Tensor,
    num: int, den: int, scale: float, unit: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of the exact rule: ``v <- v*num/den + round(scale*g); x <- x + v*unit``.

    ``v``, the buffer ``i`` and ``tmp`` are float64 and change roles (:func:`mul_frac_`); the
    new ``(v, i, tmp)`` are handed back.  The forward pass runs it on whole tensors: it holds
    no graph, so its full-size buffer and scratch do not raise the step's peak.
    """
    v, i, tmp = mul_frac_(v, i, tmp, num, den)
    v.add_(quantise(g, scale, out=tmp))
    x.add_(v, alpha=unit)
    return v, i, tmp


def backward_chunk_(
    v: torch.Tensor, buf: torch.Tensor, g: torch.Tensor, b: torch.Tensor, t: torch.Tensor,
    num: int, den: int, scale: float,
) -> None:
    """Undo :func:`forward_step_`'s velocity update on one chunk, in place (``x`` is rebuilt
    before ``g`` exists: :func:`retreat_chunk_`).

    ``buf`` is stored in the narrowest integer type its bound allows and widened for the
    arithmetic; ``b`` and ``t`` are float64 scratch.
    """
    # The velocity goes to the scratch and the widened buffer into v's memory, so that the
    # multiplication (which swaps the two roles) leaves the new velocity in v.
    torch.sub(v, quantise(g, scale, out=t), out=b)
    v.copy_(buf)
    _, buffer, _ = mul_frac_(b, v, t, den, num)
    buf.copy_(buffer)


def retreat_chunk_(x: torch.Tensor, remainder: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                   frac_bits: int) -> None:
    """``x <- x - v`` on one chunk of a state held as :func:`split_grid_` holds it: the value
    ``x`` in the activations' dtype and ``remainder`` in grid units, both updated in place.

    In units ``U = x*2**k + remainder`` (exact: scaling by a power of two, and the sum stays
    below 2**53), the new value is ``U*2**-k`` rounded to the dtype, as ``split_grid_`` rounds
    it, and the new remainder what that rounding left.  ``u`` is float64 scratch.
    """
    k = frac_bits
    if x.dtype == torch.float16:  # x * 2**k would overflow float16's range
        u.copy_(x).mul_(2.0**k)
    else:  # exact in x's own dtype: a power of two within its range
        torch.mul(x, 2.0**k, out=u)
    u.add_(remainder).sub_(v)
    torch.mul(u, 2.0**-k, out=x)  # computed in float64, rounded once to x's dtype
    remainder.copy_(u.sub_(x, alpha=2.0**k))


def spill_schedule(num: int, den: int, depth: int, limit: int = EXACT_LIMIT
                   ) -> tuple[list[bool], int]:
    """For each block, whether the buffer must be pushed aside (and restarted at 0) first; and
    the largest value the buffer can hold after the last block.

    A buffer of at most ``b`` becomes at most ``(b*den + den - 1) div num`` after one
    multiplication, and ``i*den + (c mod den)`` must stay below ``limit``.  The bound does not
    depend on the data, so the schedule is known before the forward pass and needs no
    reduction over the tensors.
    """
    schedule = []
    bound = 0  # max possible buffer value
    for _ in range(depth):
        spill = bound * den + den - 1 >= limit
        if spill:
            bound = 0
        schedule.append(spill)
        bound = (bound * den + den - 1) // num
    return schedule, bound


def narrow_dtype(bound: int) -> torch.dtype:
    """The narrowest type that holds the integers ``[0, bound]`` (float64 beyond int32).

    The buffer gains only ``log2(den/num)`` bits per block (0.15 at gamma = 0.9), so a stage of
    a few dozen blocks needs one byte per element where float64 takes eight.
    """
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if bound <= torch.iinfo(dtype).max:
            return dtype
    return torch.float64


def segment_dtypes(num: int, den: int, schedule: list[bool]) -> list[torch.dtype]:
    """For each block, the type that holds its buffer: :func:`narrow_dtype` of the largest
    value the buffer can reach before it is next spilled (or at the end of the stage)."""
    bounds, bound = [], 0
    for spill in schedule:
        if spill:
            bound = 0
        bound = (bound * den + den - 1) // num
        bounds.append(bound)
    # Within a segment the bound only grows: its last block's bound holds for all of them.
    dtypes = [torch.float64] * len(schedule)
    end = bounds[-1] if bounds else 0
    for n in reversed(range(len(schedule))):
        dtypes[n] = narrow_dtype(end)
        if schedule[n] and n > 0:
            end = bounds[n - 1]
    return dtypes


def buffer_bits_per_block(num: int, den: int) -> float:
    """Information the buffer gains per block: ``log2(den/num)`` bits."""
    return math.log2(den / num)
