"""``MomentumNet``: a stage of residual blocks turned into a Momentum ResNet.

    v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n)
    x_{n+1} = x_n + v_{n+1}

The update is invertible in closed form, so training does not need to store activations: the
memory-free backward (``_rule``, on the recompute machinery of ``_recompute``) rebuilds them
from the output, bit-exactly (``_exact``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _exact, _tail
from ._recompute import build_stage, evaluate, shape_checked
from ._replay import checkpointed
from ._rule import MomentumFunction, Rule, RuleStep

#: How a momentum stage can be executed (``Strategy.mode``).
MODES = ("autograd", "checkpoint", "exact", "float")


@dataclass(frozen=True)
class Strategy:
    """How a momentum stage is executed; never what it computes.

    ``mode``: ``"autograd"`` stores every activation; ``"checkpoint"`` stores ``(x, v)`` at
    the input of every ``segment``-th block and recomputes each run of ``segment`` blocks in
    the backward pass (``torch.utils.checkpoint``, BatchNorm statistics updated once);
    ``"exact"`` and ``"float"`` are the memory-free backward, inverting in fixed point or in
    floating point.  ``keep_last`` (all modes but autograd): the last ``keep_last`` blocks run
    under plain autograd instead, storing their activations and skipping their recompute.
    ``segment`` (checkpoint only; default 1, per block): a longer segment stores fewer states
    and recomputes the same blocks, but its backward holds the activations of a whole segment.

        stage.strategy = "checkpoint"
        stage.strategy = Strategy("exact", keep_last=2)
        stage.strategy = Strategy("checkpoint", keep_last=4, segment=3)
    """

    mode: str = "exact"
    keep_last: int = 0
    segment: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"momres: unknown strategy {self.mode!r}; choose one of "
                             f"{', '.join(MODES)}.")
        if not _is_count(self.keep_last, 0):
            raise ValueError(f"momres: keep_last must be an integer >= 0, got {self.keep_last!r}.")
        if not _is_count(self.segment, 1):
            raise ValueError(f"momres: segment must be an integer >= 1 (blocks recomputed "
                             f"together), got {self.segment!r}.")
        if self.keep_last and self.mode == "autograd":
            raise ValueError("momres: keep_last applies to the strategies that recompute "
                             "(checkpoint, exact, float), not to 'autograd', which stores every "
                             "block.")
        if self.segment != 1 and self.mode != "checkpoint":
            raise ValueError(f"momres: segment applies to 'checkpoint' only, not to "
                             f"{self.mode!r}; use Strategy('checkpoint', segment="
                             f"{self.segment!r}).")

    @classmethod
    def of(cls, value: Strategy | str) -> Strategy:
        """``value`` itself, or the strategy its mode names."""
        if isinstance(value, Strategy):
            return value
        if isinstance(value, str):
            return cls(value)
        raise TypeError(f"momres: a strategy is a Strategy or one of {', '.join(MODES)}, "
                        f"not {type(value).__name__}.")

    @property
    def memory_free(self) -> bool:
        return self.mode in ("exact", "float")

    def __str__(self) -> str:
        return self.mode + (f", keep_last={self.keep_last}" if self.keep_last else "") + (
            f", segment={self.segment}" if self.segment != 1 else "")


def _is_count(value: object, least: int) -> bool:
    """``value`` is an int (not a bool) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


class MomentumNet(nn.Module):
    """A momentum residual stage over ``functions``.

    Args:
        functions: the blocks ``f_n`` (modules), each mapping ``x`` to a tensor of its shape.
        gamma: momentum in ``[0, 1]`` (any real number: Python or numpy scalars); snapped to
            the nearest fraction ``n/d`` with ``d <= 2**16`` (``self.gamma``,
            ``self.gamma_fraction``), used in every mode.  A snap that moves ``gamma`` or
            ``1 - gamma`` by more than a relative 1e-3 warns; ``gamma < 1`` that would snap to
            1 (the stage would ignore its blocks) is refused.  ``gamma=0`` is exactly a ResNet.
        residual: ``True`` if each ``f_n`` is a residual branch; ``False`` if it is a whole
            block with its own skip connection, in which case the rule uses ``f_n(x) - x``.
        memory_efficient: backpropagate without storing activations (needs ``gamma > 0``).
            ``False`` is plain autograd through the same rule.
        exact: rebuild activations bit-exactly with fixed-point arithmetic; ``False``
            inverts in floating point (faster, but the error grows like ``gamma**-depth``).
            Both flags are views of ``self.strategy`` (``Strategy``), which also offers
            checkpointing (per block or per segment of blocks) and, with a recompute, the
            last blocks stored.
        init_velocity: ``None`` for ``v_0 = 0``, or a module ``phi`` with ``v_0 = phi(x_0)``.
        frac_bits: fractional bits of the exact fixed-point state; values must stay below
            ``2**(52 - frac_bits)`` in magnitude.  ``None``: 30 (range +-4.2e6) for float32
            and narrower activations, 40 (range +-4096) for float64.

    Calling ``net(x, *args, return_velocity=False, **kwargs)`` passes ``args``/``kwargs`` to
    every block and returns ``x_N`` (or ``(x_N, v_N)``).
    """

    def __init__(
        self,
        functions: Iterable[nn.Module],
        gamma: float = 0.9,
        *,
        residual: bool = True,
        memory_efficient: bool = True,
        exact: bool = True,
        init_velocity: nn.Module | None = None,
        frac_bits: int | None = None,
    ) -> None:
        super().__init__()
        functions = list(functions)
        if not functions:
            raise ValueError("momres: MomentumNet needs at least one block.")
        for n, f in enumerate(functions):
            if not isinstance(f, nn.Module):
                raise TypeError(
                    f"momres: block {n} is a {type(f).__name__}, not an nn.Module; wrap plain "
                    "functions in a module so that their parameters can be found."
                )
        fraction = _snapped(gamma)
        if memory_efficient and fraction == 0:
            raise ValueError(
                f"momres: gamma={gamma!r} is used as 0, a plain ResNet, which is not invertible, "
                "so it cannot be trained memory-free. Use memory_efficient=False, or gamma >= "
                f"{1 / _exact.MAX_DENOMINATOR:.3g}."
            )
        if frac_bits is not None and not 1 <= frac_bits <= 50:
            raise ValueError(f"momres: frac_bits must be in [1, 50], got {frac_bits}.")
        self.functions = nn.ModuleList(functions)
        self.gamma_fraction = (fraction.numerator, fraction.denominator)
        self.residual = residual
        self.memory_efficient = memory_efficient
        self.exact = exact
        self.checkpoint_blocks = False  # without memory_efficient: "checkpoint", else "autograd"
        self.keep_last = 0  # memory-free or checkpointed: blocks at the end under plain autograd
        self.segment = 1  # checkpointed: blocks recomputed together
        self.init_velocity = init_velocity
        self.frac_bits = frac_bits

    @property
    def gamma(self) -> float:
        """The momentum actually used: ``n / d`` of ``gamma_fraction``."""
        num, den = self.gamma_fraction
        return num / den

    @property
    def strategy(self) -> Strategy:
        """How the stage runs in training (``Strategy``); ``memory_efficient`` and ``exact``
        are views of it.  Assign a ``Strategy`` or a mode name to change it."""
        if self.memory_efficient:
            return Strategy("exact" if self.exact else "float", self.keep_last)
        if self.checkpoint_blocks:
            return Strategy("checkpoint", self.keep_last, self.segment)
        return Strategy("autograd")

    @strategy.setter
    def strategy(self, value: Strategy | str) -> None:
        value = Strategy.of(value)
        if value.memory_free and self.gamma == 0:
            raise ValueError(f"momres: gamma=0 is not invertible: strategy {value.mode!r} "
                             "cannot run; use 'autograd' or 'checkpoint'.")
        self.memory_efficient = value.memory_free
        if value.memory_free:
            self.exact = value.mode == "exact"
        self.checkpoint_blocks = value.mode == "checkpoint"
        self.keep_last, self.segment = value.keep_last, value.segment

    def extra_repr(self) -> str:
        num, den = self.gamma_fraction
        return (f"gamma={num}/{den}, residual={self.residual}, strategy={self.strategy}")

    def forward(
        self, x: torch.Tensor, *args, return_velocity: bool = False, **kwargs
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("momres: MomentumNet expects a floating-point tensor x.")
        v = torch.zeros_like(x) if self.init_velocity is None else self.init_velocity(x)
        if v.shape != x.shape:
            raise ValueError(
                f"momres: init_velocity maps x of shape {tuple(x.shape)} to {tuple(v.shape)}; "
                "the initial velocity must have the shape of x."
            )
        functions, split = list(self.functions), 0
        if torch.is_grad_enabled() and (self.memory_efficient or self.checkpoint_blocks):
            # The first blocks are recomputed in the backward pass, the last keep_last stored.
            split = len(functions) - min(self.keep_last, len(functions))
            if split and self.memory_efficient:
                x, v = self._memory_free(functions[:split], x, v, args, kwargs)
            elif split:
                x, v = self._checkpointed(functions[:split], x, v, args, kwargs)
        x, v = momentum_rule(functions[split:], self.gamma, x, v, args, kwargs, self.residual,
                             first=split)
        return (x, v) if return_velocity else x

    def _checkpointed(self, functions: list[nn.Module], x: torch.Tensor, v: torch.Tensor,
                      args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``functions`` under ``torch.utils.checkpoint`` in runs of ``self.segment`` blocks:
        ``(x, v)`` stored at the start of each run, and the run's BatchNorm statistics updated
        once (frozen in its recompute)."""
        for start in range(0, len(functions), self.segment):
            run = functions[start:start + self.segment]
            norms = [m for f in run for m in f.modules() if isinstance(m, _BatchNorm)]
            if start == 0 and self.init_velocity is None:
                # v_0 = 0 is made again in the recompute rather than stored
                x, v = checkpointed(_from_rest, None, run, self.gamma, x, args, kwargs,
                                    self.residual, layers=norms)
            else:
                x, v = checkpointed(momentum_rule, None, run, self.gamma, x, v, args, kwargs,
                                    self.residual, start, layers=norms)
        return x, v

    # torch.compile must not trace into the memory-free Function: its exact arithmetic needs
    # the eager kernels' correctly rounded divisions (a compiled graph may turn them into
    # multiplications by reciprocals), and its forward is not a graph of differentiable ops.
    # The stage is a graph break; what surrounds it is compiled as usual.
    @torch.compiler.disable
    def _memory_free(self, functions: list[nn.Module], x: torch.Tensor, v: torch.Tensor,
                     args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        stage, params, tensors = build_stage(functions, self.residual, args, kwargs)
        if not (x.requires_grad or v.requires_grad or params
                or any(t.requires_grad for t in tensors)):
            return momentum_rule(functions, self.gamma, x, v, args, kwargs, self.residual)
        rule = Rule(*self.gamma_fraction, self.exact,
                    self.frac_bits or _exact.default_frac_bits(x.dtype))
        return MomentumFunction.apply(stage, rule, x, v, *params, *tensors)

    def inverse(
        self, x: torch.Tensor, v: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_0, v_0)`` from ``(x_N, v_N)`` by the closed-form inverse, in floating point.

        Approximate: rounding errors grow like ``gamma**-depth``.  The memory-free backward
        does not use it (it inverts exactly in fixed point).
        """
        gamma = self.gamma
        if gamma == 0:
            raise ValueError("momres: gamma=0 is not invertible.")
        for n in reversed(range(len(self.functions))):
            x = x - v
            g = evaluate(n, self.functions[n], x, args, kwargs, self.residual)
            v = (v - (1 - gamma) * g) / gamma
        return x, v


def _snapped(gamma: numbers.Real) -> Fraction:
    """``gamma`` validated and snapped to its fraction (``_exact.snap_gamma``).

    Any real number but a bool is accepted (numpy scalars included).  Tensors are not: gamma
    is a fixed hyper-parameter, and a tensor (perhaps requiring grad) would suggest otherwise.
    A snap that moves ``gamma`` or ``1 - gamma`` by more than a relative 1e-3 warns; one that
    turns ``gamma < 1`` into 1 is refused, because at 1 the stage ignores its blocks.
    """
    if (isinstance(gamma, bool) or not isinstance(gamma, numbers.Real)
            or not 0 <= gamma <= 1):  # NaN fails the comparison too
        hint = " (pass a Python number: float(gamma))" if isinstance(gamma, torch.Tensor) else ""
        raise ValueError(f"momres: gamma must be a number in [0, 1], got {gamma!r}{hint}.")
    gamma = float(gamma)
    fraction = _exact.snap_gamma(gamma)
    if fraction == 1 and gamma < 1:
        raise ValueError(
            f"momres: gamma={gamma!r} is too close to 1: snapped to a fraction with denominator "
            f"at most {_exact.MAX_DENOMINATOR} it becomes 1, where v never changes and the stage "
            f"ignores its blocks. Use gamma <= {1 - 1 / _exact.MAX_DENOMINATOR!r}, or 1 if that is "
            "what you mean."
        )
    if max(_relative_change(gamma, float(fraction)),
           _relative_change(1 - gamma, float(1 - fraction))) > 1e-3:
        warnings.warn(
            f"momres: gamma={gamma!r} is snapped to {fraction} = {float(fraction)!r} (1 - gamma "
            f"= {float(1 - fraction):.6g} instead of {1 - gamma:.6g}); that value is used in "
            "every mode. Choose a gamma with a small denominator to silence this.",
            UserWarning, stacklevel=3,
        )
    return fraction


def _relative_change(old: float, new: float) -> float:
    """``|new - old| / |old|``; from 0, infinite unless ``new`` is 0 too."""
    if old == 0:
        return 0.0 if new == 0 else math.inf
    return abs(new - old) / abs(old)


#: Called as ``observe(f, x)`` before each block ``f`` that ``momentum_rule`` runs, at its
#: input ``x``: how ``momres.plan`` marks its traces at block boundaries (a forward pre-hook on
#: the block would also do, but would keep ``_tail`` from splitting the block it watches).
BLOCK_OBSERVERS: list[Callable[[nn.Module, torch.Tensor], None]] = []


def momentum_rule(
    functions: list[nn.Module], gamma: float, x: torch.Tensor, v: torch.Tensor,
    args: tuple = (), kwargs: dict | None = None, residual: bool = True, first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_N, v_N)``: the rule itself over ``functions`` from ``(x, v)``, differentiated (if
    at all) by plain autograd.  ``MomentumNet(memory_efficient=False)`` runs this.  ``first``:
    the stage's index of ``functions[0]``, for the errors that name a block."""
    kwargs = kwargs or {}
    # After the first block, v is the rule's own and is updated in place; torch.jit.trace
    # cannot record a Function that changes its input.
    in_place = not torch.jit.is_tracing()
    for n, f in enumerate(functions):
        for observe in BLOCK_OBSERVERS:
            observe(f, x)
        # The block's own output, then the rule's update as one graph node (``RuleStep``);
        # for a block ending in relu(r + x), its branch r, and the add and ReLU in that node.
        tail = None if residual else _tail.branch(f, args, kwargs)
        if tail is None:
            y = evaluate(first + n, f, x, args, kwargs, residual=True)
        else:
            y = shape_checked(first + n, f, x, tail(f, x))
        x, v = RuleStep.apply(x, v, y, gamma, residual, in_place and n > 0, tail is not None)
    return x, v


def _from_rest(functions: list[nn.Module], gamma: float, x: torch.Tensor, args: tuple,
               kwargs: dict, residual: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``momentum_rule`` over ``functions`` from ``(x, 0)``."""
    return momentum_rule(functions, gamma, x, torch.zeros_like(x), args, kwargs, residual)
