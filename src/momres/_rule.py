"""The momentum rule's memory-free Function, and the two ways of inverting the rule.

Forward: run every block without building a graph, keep only the final state (and, in exact
mode, the information buffer).  Backward: walk the blocks from the top; for each, rebuild
``x_n = x_{n+1} - v_{n+1}``, evaluate ``g = f_n(x_n)`` once with grad enabled, and use that one
evaluation twice: to rebuild ``v_n = (v_{n+1} - (1-gamma) g) / gamma`` and for the
vector-Jacobian product with ``(1-gamma) b``, where ``b = dL/dx_{n+1} + dL/dv_{n+1}``:

    dL/dx_n = dL/dx_{n+1} + (1-gamma) J_g^T b,   dL/dv_n = gamma b,
    dL/dtheta_n = (1-gamma) (dg/dtheta_n)^T b.

How the state is held and inverted is a strategy (``Inversion``): ``FloatInversion`` divides by
gamma in floating point (fast; the error grows like ``gamma**-depth``), ``ExactInversion``
holds the state in fixed point and multiplies by gamma exactly (``_exact``), so the rebuilt
state is the forward's bit for bit.  The Function's loops are the same for both.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from . import _exact, _kernels, _tail, debug
from ._fusion import fused, fusing
from ._recompute import Recorder, Replayer, Stage, graph_kept


@dataclass(frozen=True)
class Rule:
    """The momentum rule: ``gamma = num/den`` and how it is inverted."""

    num: int
    den: int
    exact: bool
    frac_bits: int

    @property
    def gamma(self) -> float:
        return self.num / self.den

    def inversion(self, dtype: torch.dtype, depth: int) -> Inversion | LoggedInversion:
        """A fresh strategy for one pass (forward or backward) over ``depth`` blocks."""
        inversion = (ExactInversion if self.exact else FloatInversion)(self, dtype, depth)
        log = debug.state_log()  # once per stage call, not per block
        return inversion if log is None else LoggedInversion(inversion, log)


class Inversion:
    """How a stage's state ``(x, v)`` is held, advanced and rebuilt.

    Forward: ``start(x0, v0)``; per block ``advance(n, f_n(position()))``, or ``advance(n, y,
    x)`` with the output ``y`` of a block with its own skip run at ``x = position()`` (``g = y -
    x``, taken in the same pass), or ``advance(n, r, x, tail=True)`` with the branch ``r`` of a
    block ending in ``relu(r + x)`` (``g = relu(r + x) - x``); ``finish()`` gives the outputs,
    the tensors to save and a small picklable ``layout`` of them.  Backward:
    ``resume(saved, layout)``; per block from the top ``retreat()`` (gives ``x_n``) then
    ``rebuild(n, g)`` with ``g = f_n(x_n)``, or ``rebuild(n, y, x_n)`` with the output ``y``
    of a block with its own skip (``g = y - x_n``, taken in the same pass), or ``rebuild(n, r,
    x_n, b)`` with the branch ``r`` of a tail block, which also returns the cotangent ReLU
    hands the branch, ``where(r + x_n > 0, b, 0)``; ``verify()`` at the end.
    """

    def __init__(self, rule: Rule, dtype: torch.dtype, depth: int) -> None:
        self.rule, self.dtype, self.depth = rule, dtype, depth

    def start(self, x0: torch.Tensor, v0: torch.Tensor) -> None:
        raise NotImplementedError

    def position(self) -> torch.Tensor:
        raise NotImplementedError

    def advance(self, n: int, g: torch.Tensor, x: torch.Tensor | None = None,
                tail: bool = False) -> None:
        raise NotImplementedError

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], object]:
        raise NotImplementedError

    def resume(self, saved: list[torch.Tensor], layout: object) -> None:
        raise NotImplementedError

    def retreat(self) -> torch.Tensor:
        raise NotImplementedError

    def rebuild(self, n: int, g: torch.Tensor, x: torch.Tensor | None = None,
                b: torch.Tensor | None = None) -> torch.Tensor | None:
        raise NotImplementedError

    def rebuilds_in_place(self) -> bool:
        """Whether ``rebuild`` allocates nothing (it may then run while a block's graph is
        held: ``backward_step``)."""
        return True

    def verify(self) -> None:
        """Raise if the rebuilt state is not the forward's (where that can be told)."""

    def state(self) -> tuple[torch.Tensor, ...]:
        """The state as held (for ``momres.debug.record_states``)."""
        raise NotImplementedError


#: Largest relative deviation of the rebuilt input that float inversion lets pass, by dtype:
#: beyond it the gradients are off by about as much, and an error says so.
FLOAT_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3}
LOW_PRECISION_TOLERANCE = 1e-2


def _moments(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sum and sum of squares of ``x`` and ``v`` (float64): a cheap fingerprint of a state."""
    x, v = x.double(), v.double()
    return torch.stack([x.sum(), x.square().sum(), v.sum(), v.square().sum()])


class FloatInversion(Inversion):
    """The rule in the activations' dtype; inverted by dividing by gamma.

    The inverse amplifies rounding errors by ``1/gamma`` per block, and a block that does not
    compute the same function twice goes unnoticed by the arithmetic itself; so the forward
    keeps a fingerprint of ``(x_0, v_0)`` and ``verify`` compares the rebuilt state with it.
    """

    def start(self, x0, v0):
        self.x, self.v = x0.detach().clone(), v0.detach().clone()
        self.moments = _moments(self.x, self.v)
        self.kernels = _kernels.kernels(self.x)

    def position(self):
        return self.x

    def advance(self, n, g, x=None, tail=False):
        gamma = self.rule.gamma
        # The position is x itself: the kernel takes g = y - x before x moves.
        if self.kernels is not None and (x is None or x is self.x) and _kernels.rule_advance_(
                self.kernels, self.x, self.v, g, gamma, skip=x is not None, tail=tail):
            return
        if tail:
            g = _tail.output(g, x)
        if x is not None:
            g = g - x
        self.v.mul_(gamma).add_(g, alpha=1 - gamma)
        self.x.add_(self.v)

    def finish(self):
        # v is saved as our own tensor and a copy is the output (usually dropped), so that
        # the backward rebuilds v in place instead of copying it at its peak.
        return self.x, self.v.clone(), [self.x, self.v, self.moments], None

    def resume(self, saved, layout):
        # x's value is the stage's output, which is not ours to change: a copy.  v is ours,
        # unless a later backward pass (retain_graph=True) needs it again.
        self.x, self.moments = saved[0].clone(), saved[2]
        self.v = saved[1].clone() if graph_kept() else saved[1]
        self.kernels = _kernels.kernels(self.x)

    def retreat(self):
        return self.x.sub_(self.v)

    def rebuild(self, n, g, x=None, b=None):
        gamma = self.rule.gamma
        done = self.kernels is not None and _kernels.rule_rebuild_(self.kernels, self.v, g,
                                                                   gamma, x, b)
        if done is not False:
            return None if b is None else done
        g, c = (g, None) if b is None else _relu_tail(g, x, b)
        self.v.sub_(g if x is None else g - x, alpha=1 - gamma).div_(gamma)
        return c

    def verify(self):
        # Deviation of each moment relative to the state's size: sums against
        # sqrt(n * sum of squares), which does not vanish when values cancel, squares against
        # the sum of squares; x and v share one scale (v_0 is often zero).
        expected, rebuilt, n = self.moments, _moments(self.x, self.v), self.x.numel()
        square = expected[1] + expected[3]
        scale = torch.stack([(n * square).sqrt(), square] * 2).clamp_min(1e-300)
        deviation = ((rebuilt - expected).abs() / scale).max().item()
        tolerance = FLOAT_TOLERANCE.get(self.dtype, LOW_PRECISION_TOLERANCE)
        if not deviation <= tolerance:
            raise RuntimeError(
                f"momres: the backward pass rebuilt the stage's input with a relative error of "
                f"{deviation:.2g} (exact=False, {self.dtype}, tolerance {tolerance:g}), so its "
                "gradients would be wrong by about as much. Either the float inverse lost "
                "precision (it amplifies rounding by 1/gamma per block: "
                f"gamma={self.rule.gamma:.4g}, {self.depth} blocks) or a block does not "
                "compute the same function twice "
                "(see the exact-mode self-check's causes). Use exact=True, which rebuilds the "
                "state bit for bit, or fewer blocks per stage."
            )

    def state(self):
        return self.x, self.v


class ExactInversion(Inversion):
    """The rule in fixed point, reversible bit for bit (``_exact``).

    Forward (no graph is held, so whole float64 tensors cost little at the step's peak): ``x``
    is held on the grid ``2**-k`` in value units, ``v`` in grid units, and the bits that the
    multiplication by ``gamma = num/den`` destroys go to the information buffer, pushed aside
    (spilled) and restarted before it could outgrow float64's exact integers.  When to spill
    depends only on the block index, so forward and backward agree without looking at the data.

    Backward, where the peak of a memory-free step is: ``x`` stays in the compact form the
    forward saved it in (its value in the activations' dtype, which is also the block's input,
    and the remainder to the grid in units), the buffer stays in its narrow integer type, and
    the arithmetic runs as one fused C kernel per step (``_kernels``), or, where those cannot
    run, eagerly, chunk by chunk through two small float64 scratch tensors.
    """

    def __init__(self, rule, dtype, depth):
        super().__init__(rule, dtype, depth)
        k = rule.frac_bits
        self.scale, self.unit = (1 - rule.gamma) * 2.0**k, 2.0**-k
        self.schedule, _ = _exact.spill_schedule(rule.num, rule.den, depth)
        self.buffer_dtypes = _exact.segment_dtypes(rule.num, rule.den, self.schedule)

    def start(self, x0, v0):
        k = self.rule.frac_bits
        self.x0, self.v0 = x0, v0
        self.X, self.V = _exact.to_grid(x0, k), _exact.to_units(v0, k)
        self.buf, self.tmp = torch.zeros_like(self.X), None
        self.checksum = torch.stack([self.X.sum(), self.V.sum()])
        self.spilled: list[torch.Tensor] = []
        self.gmax: list[torch.Tensor] = []
        self.kernels = None if fusing(self.X) else _kernels.kernels(self.X)
        self.step = fused(_exact.forward_step_, self.X)
        # The next block's input, written by the forward kernel in its pass over X.
        self.next: torch.Tensor | None = None

    def position(self):
        if self.next is not None:
            x, self.next = self.next, None
            return x
        return self.X.to(self.dtype, copy=True)

    def advance(self, n, g, x=None, tail=False):
        if tail:
            g = _tail.output(g, x)
        if x is not None:
            g = g - x
        if self.schedule[n]:  # stored as narrow as the segment's bound allows
            self.spilled.append(self.buf.to(self.buffer_dtypes[n - 1]))
            self.buf = torch.zeros_like(self.X)
        g = g.to(self.dtype)
        self.gmax.extend(_extremes(g))
        rule = self.rule
        # Every block but the last is followed by position(): its input, x in the
        # activations' dtype, is written in the same pass (a fresh tensor, as position's).
        self.next, pos = None, None
        if self.kernels is not None and n + 1 < self.depth and self.dtype in (torch.float32,
                                                                              torch.float64):
            pos = torch.empty_like(self.X, dtype=self.dtype)
        if self.kernels is not None and _kernels.forward_step_(
                self.kernels, self.X, self.V, self.buf, g, rule.num, rule.den, self.scale,
                self.unit, pos):
            self.next = pos
            return
        if self.tmp is None:
            self.tmp = torch.empty_like(self.X)
        self.V, self.buf, self.tmp = self.step(self.X, self.V, self.buf, self.tmp, g, rule.num,
                                               rule.den, self.scale, self.unit)

    def finish(self):
        k = self.rule.frac_bits
        del self.tmp
        x_out, remainder = _exact.split_grid_(self.X, k, self.dtype)  # X is consumed
        # Float16's range (65504) is narrower than the grid's: its output may overflow.
        narrow_range = torch.finfo(self.dtype).max < _exact.range_limit(k)
        check_range(self.rule, self.x0, self.v0, self.gmax, x_out if narrow_range else None)
        v_out = _exact.from_units(self.V, k, self.dtype)
        has_remainder = remainder is not None
        buf = self.buf.to(self.buffer_dtypes[-1])
        saved = [x_out, *([remainder] if has_remainder else []), self.V, buf, self.checksum,
                 *self.spilled]
        return x_out, v_out, saved, has_remainder

    def resume(self, saved, layout):
        saved = list(saved)
        # x's value is the stage's output, which is not ours to change: a copy.  The rest is
        # internal to the Function: rebuilt in place unless a later backward pass
        # (retain_graph=True) needs it again.
        copy = graph_kept()
        own = (lambda t: t.clone()) if copy else (lambda t: t)
        self.x = saved.pop(0).clone()
        self.remainder = own(saved.pop(0)) if layout else None
        self.V, self.buf = own(saved[0]), own(saved[1])
        self.checksum, self.spilled = saved[2], [own(t) for t in saved[3:]] if copy else saved[3:]
        self.leftovers: list[torch.Tensor] = []
        self.rows = _exact.chunk_rows(self.x)
        self.kernels = None if fusing(self.x) else _kernels.kernels(self.x)
        self.step = fused(_exact.backward_chunk_, self.x)

    def retreat(self):
        # x_n = x_{n+1} - v_{n+1}; the value part is the block's input, shared, not copied.
        if self.kernels is not None and _kernels.retreat_(self.kernels, self.x, self.remainder,
                                                          self.V, self.rule.frac_bits):
            return self.x
        if self.remainder is None:  # float64: the value is the grid value itself
            self.x.sub_(self.V, alpha=self.unit)
        else:
            u, _ = _exact.scratch(self.x, self.rows)
            for x, r, v in _exact.chunks(self.rows, self.x, self.remainder, self.V):
                _exact.retreat_chunk_(x, r, v, _exact.shaped(u, x), self.rule.frac_bits)
        return self.x

    def rebuild(self, n, g, x=None, b=None):
        rule, c = self.rule, None
        if b is not None and g.dtype != self.dtype:  # a branch under autocast: added in its type
            (g, c), b = _relu_tail(g, x, b), None
        g = g.to(self.dtype)
        done = self.kernels is not None and _kernels.backward_step_(
            self.kernels, self.V, self.buf, g, rule.num, rule.den, self.scale, x, b)
        if done is not False and b is not None:
            c = done
        elif done is False:
            if b is not None:
                g, c = _relu_tail(g, x, b)
            if x is not None:
                g = g - x
            b, t = _exact.scratch(self.x, self.rows)
            for v, buf, gc in _exact.chunks(self.rows, self.V, self.buf, g):
                self.step(v, buf, gc, _exact.shaped(b, v), _exact.shaped(t, v), rule.num,
                          rule.den, self.scale)
        if self.schedule[n]:
            self.leftovers.append(self.buf.any())
            self.buf = self.spilled.pop()
        return c

    def rebuilds_in_place(self):
        # The eager arithmetic needs float64 scratch (whole tensors on CUDA).
        return self.kernels is not None

    def _grid(self) -> torch.Tensor:
        return _exact.join_grid(self.x, self.remainder, self.rule.frac_bits)

    def verify(self):
        # The forward's checksum summed the float64 grid in x_0's layout: so is this one.
        intact = torch.equal(torch.stack([self._grid().sum(), self.V.sum()]), self.checksum)
        if not intact or bool(self.buf.any()) or any(bool(t) for t in self.leftovers):
            raise RuntimeError(
                "momres: the backward pass did not rebuild the forward's exact state, so "
                "its gradients would be wrong. Every block must compute the same function "
                "twice: likely causes are non-deterministic kernels (try "
                "torch.use_deterministic_algorithms(True)), random numbers drawn outside "
                "torch's generators, parameters or buffers changed between forward and "
                "backward, or layers with side effects (e.g. spectral norm's power "
                "iteration) inside the blocks."
            )

    def state(self):
        # The same representation in both directions, so that the logs compare bit for bit.
        grid = self.X if hasattr(self, "X") else self._grid()  # forward or backward
        return grid, self.V, self.buf.to(torch.float64)


class LoggedInversion:
    """An ``Inversion`` that logs its state at every block (``momres.debug.record_states``)."""

    def __init__(self, inner: Inversion, log: debug.StateLog) -> None:
        self.inner, self.log = inner, log

    def __getattr__(self, name):  # every step but the two logged ones goes to ``inner``
        return getattr(self.inner, name)

    def advance(self, n, g, x=None, tail=False):
        self.log["forward"][n] = tuple(t.clone() for t in self.inner.state())
        self.inner.advance(n, g, x, tail)

    def rebuild(self, n, g, x=None, b=None):
        c = self.inner.rebuild(n, g, x, b)
        self.log["backward"][n] = tuple(t.clone() for t in self.inner.state())
        return c


def _relu_tail(r: torch.Tensor, x: torch.Tensor, b: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A tail block's output ``relu(r + x)`` and the cotangent its ReLU hands the branch,
    ``where(r + x > 0, b, 0)``: the eager form of the rebuild kernels' tail.  The cotangent is
    in the branch's type, as autograd rounds it at the block's output (a bfloat16 branch under
    autocast), so that the skip's share of ``x``'s gradient is rounded as the block's own
    backward rounds it too."""
    s = _tail.joined(r, x)
    c = torch.where(s > 0, b, 0).to(r.dtype)
    return s.relu_(), c


def _extremes(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of ``t``; zeros for an empty tensor (which has nothing to overflow)."""
    if t.numel() == 0:
        zero = t.new_zeros(())
        return zero, zero
    return torch.aminmax(t)


def check_range(rule: Rule, x0: torch.Tensor, v0: torch.Tensor, gmax: list,
                out: torch.Tensor | None = None) -> None:
    """Raise unless every fixed-point value stayed inside the exactly representable range and
    the output ``out`` (if given) inside its dtype's; warn if the activations are so small that
    the grid resolves them coarsely (``_exact.resolution_floor``).

    Float64 integers do not wrap around, but past 2**53 they silently round.  A bound on the
    largest ``|x|`` and ``|v|`` reached, from ``|x_0|``, ``|v_0|`` and each block's largest
    ``|g|``, proves they did not; one device synchronisation per forward pass.
    """
    gamma, k, dtype = rule.gamma, rule.frac_bits, x0.dtype
    limit = _exact.range_limit(k)
    extremes = [*_extremes(x0.detach()), *_extremes(v0.detach()), *gmax,
                *(() if out is None else _extremes(out))]
    values = torch.stack([t.double() for t in extremes]).abs().view(-1, 2).amax(1).tolist()
    out_peak = None if out is None else values.pop()
    x_start, v_bound, *peaks = values
    x_bound = x_start
    for n, peak in enumerate(peaks):
        if not math.isfinite(peak):
            raise FloatingPointError(
                f"momres: block {n} returned non-finite values (inf or nan); the exact "
                "memory-free backward cannot run. Check the learning rate, the input scaling "
                f"(activations must stay within {dtype}'s range, +-{torch.finfo(dtype).max:.3g}),"
                " or train with a loss scaler."
            )
        v_bound = gamma * v_bound + (1 - gamma) * peak
        x_bound += v_bound
    if not x_bound < limit:
        raise OverflowError(
            f"momres: activations of the momentum stage may reach {x_bound:.3g}, beyond the "
            f"exact fixed-point range +-{limit:.3g} (frac_bits={k}). Rescale the "
            "input or the blocks (normalisation), lower frac_bits (each bit fewer doubles the "
            "range and halves the resolution), or use exact=False."
        )
    if out_peak is not None and not math.isfinite(out_peak):
        raise OverflowError(
            f"momres: the momentum stage's output overflows {dtype} (largest finite value "
            f"{torch.finfo(dtype).max:.3g}). Rescale the input or the blocks, or use a dtype "
            "with a wider range (bfloat16 or float32)."
        )
    floor = _exact.resolution_floor(k, dtype)
    # The blocks see x_0 rounded to the grid; and if even the bound on |x| is tiny, every
    # state of the pass is.  An exact zero loses nothing.
    if 0 < x_start < floor or 0 < x_bound < floor:
        peak = x_start if x_start < floor else x_bound
        warnings.warn(
            f"momres: the activations of the momentum stage are tiny (largest |x| about "
            f"{peak:.2g}) next to the exact fixed-point grid 2**-{k} = {2.0**-k:.2g}: they keep "
            f"fewer than {math.log2(floor) + k:.0f} significant bits, so the memory-free "
            "gradients may lose precision. Raise frac_bits (each bit more doubles the resolution "
            "and halves the range), rescale the input or the blocks, or use exact=False.",
            RuntimeWarning, stacklevel=5,
        )


class RuleStep(torch.autograd.Function):
    """One block of the rule under plain autograd, one graph node instead of four:
    ``(x, v, y) -> (x + v', v')`` with ``v' = gamma v + (1 - gamma) g``, where ``g = y`` for a
    residual branch and ``g = y - x`` for a block with its own skip connection.

    With ``own_v``, ``v'`` is written over ``v`` (marked dirty): for a velocity that only the
    rule itself holds, the previous step's ``v'``, which no node saves (this one's backward
    needs none of its inputs) and no caller sees; the block's output is then one new tensor,
    not two.  Autograd's version counters refuse the step if anything did save ``v``.

    With ``tail``, the block ends in ``relu(r + x)`` (``_tail``) and ``y`` is its branch ``r``:
    the block's own add and ReLU are taken here, ``g = relu(r + x) - x``.  The node then saves
    where the ReLU passes gradients (one byte per element) where the ReLU would have saved its
    output, and its backward hands ``dL/dr`` to the branch and ``dL/dx`` with the skip's share
    already summed: two passes forward and two backward fewer than the block's own.

    The forward computes the same numbers as ``FloatInversion.advance`` (the same operations
    in the same order).  The backward is linear in the incoming gradients and written with
    differentiable operations, so it can itself be differentiated (double backward).  On the
    CPU each direction is one pass of a C kernel (``_kernels``) where that can run, with the
    same numbers; a double backward runs the differentiable operations.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, v: torch.Tensor, y: torch.Tensor, gamma: float,
                residual: bool, own_v: bool, tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.gamma, ctx.residual, ctx.tail, ctx.branch_dtype = gamma, residual, tail, y.dtype
        ctx.set_materialize_grads(False)
        lib = _kernels.kernels(x)
        if own_v:
            ctx.mark_dirty(v)
        if tail:
            fused = None if lib is None else _kernels.rule_tail(lib, x, v, y, gamma, own_v)
            if fused is not None:
                ctx.save_for_backward(fused[2])
                return fused[:2]
            s = _tail.joined(y, x)  # the block's `out += identity` (in out's type)
            ctx.save_for_backward(s > 0)
            y = s.relu_()
        elif own_v and lib is not None:
            x_out = _kernels.rule_step_(lib, x, v, y, gamma, residual)
            if x_out is not None:
                return x_out, v
        elif lib is not None:
            fused = _kernels.rule_forward(lib, x, v, y, gamma, residual)
            if fused is not None:
                return fused
        g = y if residual else y - x
        v = (v.mul_(gamma) if own_v else torch.mul(v, gamma)).add_(g, alpha=1 - gamma)
        return x + v, v

    @staticmethod
    def backward(ctx, a_x: torch.Tensor | None, a_v: torch.Tensor | None):
        gamma, none = ctx.gamma, (None,) * 4
        if a_x is None and a_v is None:
            return None, None, None, *none
        mask = ctx.saved_tensors[0] if ctx.tail else None
        given = a_x if a_x is not None else a_v
        # (A tail whose branch has another type takes the eager formulas, which round as the
        # block does.)
        fusable = (ctx.branch_dtype == given.dtype if ctx.tail else
                   a_x is not None and a_v is not None)
        lib = _kernels.kernels(given) if fusable else None
        if lib is not None and not torch.is_grad_enabled():  # else: double backward
            fused = (_kernels.rule_tail_backward(lib, a_x, a_v, mask, gamma) if ctx.tail else
                     _kernels.rule_backward(lib, a_x, a_v, gamma, ctx.residual))
            if fused is not None:
                return *fused, *none
        # b = dL/dx' + dL/dv' is the gradient of v'; the rest is scaling.
        b = a_v if a_x is None else a_x if a_v is None else a_x + a_v
        grad_y = b * (1 - gamma)
        if ctx.tail:  # through the ReLU where it passes: the rule's -grad_y and the skip's cancel
            a_x = torch.zeros_like(b) if a_x is None else a_x
            grad_r = torch.where(mask, grad_y, 0)
            if ctx.branch_dtype == b.dtype:
                return torch.where(mask, a_x, a_x - grad_y), b * gamma, grad_r, *none
            # A branch of another type (autocast): the block's backward rounds the gradient at
            # its output to the branch's type, and its add hands that to the skip.
            grad_r = grad_r.to(ctx.branch_dtype)
            return (a_x - grad_y) + grad_r.to(b.dtype), b * gamma, grad_r, *none
        grad_x = a_x if ctx.residual else (-grad_y if a_x is None else a_x - grad_y)
        return grad_x, b * gamma, grad_y, *none


class MomentumFunction(torch.autograd.Function):
    """Forward: the momentum stage without a graph.  Backward: rebuild and backpropagate."""

    @staticmethod
    def forward(ctx, stage: Stage, rule: Rule, x0: torch.Tensor, v0: torch.Tensor,
                *inputs: torch.Tensor):
        # The parameters are inputs only so that their gradients leave through backward();
        # the blocks use them directly.
        run = Recorder(ctx, stage, inputs[stage.n_params :], x0.device)
        depth = len(stage.functions)
        state = rule.inversion(x0.dtype, depth)
        state.start(x0, v0)
        skip = not stage.residual  # g = y - x, taken in the advance's pass
        for n in range(depth):
            x = state.position()
            state.advance(n, run(n, x, skip=False), x if skip else None,
                          stage.tails[n] is not None)
        x_out, v_out, saved, ctx.layout = state.finish()
        ctx.rule, ctx.dtype = rule, x0.dtype
        run.save(ctx, saved)
        ctx.set_materialize_grads(False)  # an unused output gets no tensor of zeros
        return x_out, v_out

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor, grad_v: torch.Tensor):
        replay = Replayer(ctx, 4, "MomentumNet(..., memory_efficient=False)")
        depth, gamma = len(replay.stage.functions), ctx.rule.gamma
        state = ctx.rule.inversion(ctx.dtype, depth)
        state.resume(replay.state, ctx.layout)
        # b = dL/dx_{n+1} + dL/dv_{n+1};  dL/dx_n = a_x + (1-gamma) J^T b;  dL/dv_n = gamma b.
        # The vector-Jacobian product is taken with b itself and scaled when accumulated.
        # a_x and a_v are our own copies (an unused output's gradient arrives as None), so b
        # is formed in a_v's memory: two gradient-sized tensors, not three, while a block runs.
        like = replay.state[0]
        a_x = torch.zeros_like(like, dtype=ctx.dtype) if grad_x is None else grad_x.clone()
        a_v = torch.zeros_like(a_x) if grad_v is None else grad_v.clone()
        for n in reversed(range(depth)):
            a_x, a_v = backward_step(state, replay, n, n, gamma, a_x, a_v)
        state.verify()
        return (None, None, a_x, a_v, *replay.input_grads())


def backward_step(state: Inversion | LoggedInversion, replay: Replayer, n: int, block: int,
                  gamma: float, a_x: torch.Tensor | None, a_v: torch.Tensor | None,
                  own_a_x: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of the memory-free backward, from the top: rebuild its input ``x_n`` (state
    block ``n``, replayed as ``replay``'s block ``block``) and turn ``(a_x, a_v) = (dL/dx_{n+1},
    dL/dv_{n+1})`` (``None``: zero) into ``(dL/dx_n, dL/dv_n)``.  ``a_v`` is ours and changed
    in place; so is ``a_x`` if ``own_a_x``, else (the incoming gradient, which autograd holds
    anyway while the step runs) ``dL/dx_n`` is formed in the memory of the vector-Jacobian
    product: no copy of ``a_x`` sits beside the block's graph."""
    x = state.retreat()
    if a_x is None:
        a_x, own_a_x = torch.zeros_like(x), True
    b = a_x.clone() if a_v is None else a_v.add_(a_x)
    # One evaluation of the block, used for the gradient and to rebuild v_n: before the
    # block's backward where the rebuild needs no memory of its own, so that g is not held
    # through it; else after, when the block's graph is gone.  A block with its own skip
    # hands back its output y and its product without the skip's share: g = y - x is taken
    # in the rebuild's pass, the skip's -b in the gradients' (``fused_grads``).
    # A block ending in relu(r + x) (``_tail``) runs as its branch r where the rebuild comes
    # first: the rebuild's pass takes the add and the ReLU and gives the cotangent c that the
    # ReLU hands r; x's gradient is then (J_r^T c + c) - b, as autograd sums it through the
    # block's own add and ReLU.
    skip = None if replay.stage.residual else x
    early = state.rebuilds_in_place()
    tail = early and replay.stage.tails[block] is not None
    c = None

    def rebuild(y: torch.Tensor) -> torch.Tensor | None:
        nonlocal c
        c = state.rebuild(n, y, skip, b if tail else None)
        return c

    g, grad = replay.pull(block, x, b, 1 - gamma, skip=False, use=rebuild if early else None,
                          tail=tail)
    if not (own_a_x and fused_grads(a_x, b, grad, gamma, skip is None, c)):
        if c is not None:  # the skip's share, in x's type (as the block's add hands it on)
            c = c.to(a_x.dtype)
            grad = c if grad is None else grad + c
        if skip is not None:
            grad = -b if grad is None else grad - b
        if grad is None:
            a_x = a_x if own_a_x else a_x.clone()
        elif own_a_x:
            a_x.add_(grad, alpha=1 - gamma)
        elif _writable(grad, a_x, b):  # the same numbers as a_x.add_(grad, alpha=1 - gamma)
            a_x = torch.add(a_x, grad, alpha=1 - gamma, out=grad)
        else:
            a_x = torch.add(a_x, grad, alpha=1 - gamma)
        b.mul_(gamma)  # after pull: a gradient there may be b itself
    if g is not None:  # not rebuilt early
        state.rebuild(n, g, skip)
    return a_x, b  # b is now dL/dv_n


def fused_grads(a_x: torch.Tensor, b: torch.Tensor, grad: torch.Tensor | None, gamma: float,
                residual: bool, c: torch.Tensor | None = None) -> bool:
    """``a_x += (1-gamma) (grad - b)`` (``grad`` alone if ``residual``, ``(grad + c) - b`` with
    a tail's cotangent ``c``) and ``b *= gamma`` in one pass of a C kernel, as the eager
    operations round them; ``False`` (nothing done) where it cannot run."""
    lib = None if grad is None else _kernels.kernels(a_x)
    return lib is not None and _kernels.rule_grads_(lib, a_x, b, grad, gamma, residual, c)


def _writable(grad: torch.Tensor, like: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``grad`` may take the result in place: dense, like ``like``, and not ``b``'s."""
    return (grad.is_contiguous() and grad.shape == like.shape and grad.dtype == like.dtype
            and grad.untyped_storage().data_ptr() != b.untyped_storage().data_ptr())
