"""The memory-free backward pass: one ``torch.autograd.Function`` per momentum stage.

Forward: run every block without building a graph, keep only the final state (and, in exact
mode, the information buffer).  Backward: walk the blocks from the top; for each, rebuild
``x_n = x_{n+1} - v_{n+1}``, evaluate ``g = f_n(x_n)`` once with grad enabled, and use that one
evaluation twice: to rebuild ``v_n = (v_{n+1} - (1-gamma) g) / gamma`` and for the
vector-Jacobian product with ``(1-gamma) b``, where ``b = dL/dx_{n+1} + dL/dv_{n+1}``:

    dL/dx_n = dL/dx_{n+1} + (1-gamma) J_g^T b,   dL/dv_n = gamma b,
    dL/dtheta_n = (1-gamma) (dg/dtheta_n)^T b.

Parameters (and tensors among the blocks' extra arguments) enter the Function as explicit
inputs, so their gradients leave it like any other gradient: DistributedDataParallel's hooks,
gradient accumulation and weights shared between blocks keep working.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import _exact
from ._fusion import fused
from ._replay import AutocastState, RngState, frozen_batchnorm, mha_fast_path_off, restored_rng

_STATE_LOG: dict[str, dict[int, tuple[torch.Tensor, ...]]] | None = None


@contextlib.contextmanager
def record_states() -> Iterator[dict[str, dict[int, tuple[torch.Tensor, ...]]]]:
    """Test hook: log the exact integer state ``(x_n, v_n, buffer_n)`` at every block.

    ``log["forward"][n]`` is the state entering block ``n`` in the forward pass and
    ``log["backward"][n]`` the state rebuilt for block ``n`` in the backward pass.
    """
    global _STATE_LOG
    log: dict[str, dict[int, tuple[torch.Tensor, ...]]] = {"forward": {}, "backward": {}}
    _STATE_LOG = log
    try:
        yield log
    finally:
        _STATE_LOG = None


def _log(phase: str, n: int, *state: torch.Tensor) -> None:
    if _STATE_LOG is not None:
        _STATE_LOG[phase][n] = tuple(t.clone() for t in state)


def evaluate(
    n: int, f: Callable, x: torch.Tensor, args: tuple, kwargs: dict, residual: bool
) -> torch.Tensor:
    """The residual branch ``g = f_n(x)`` (``f_n(x) - x`` for blocks with their own skip)."""
    y = f(x, *args, **kwargs)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(
            f"momres: block {n} ({type(f).__name__}) maps x of shape {tuple(x.shape)} to "
            f"{got}; every block of a memory-free stage must keep the shape of its input. Keep "
            "shape-changing layers (strided or channel-changing blocks) outside the stage."
        )
    return y if residual else y - x


@dataclass
class Stage:
    """A stage of blocks as a memory-free Function sees it (everything but the tensors)."""

    functions: list[nn.Module]
    residual: bool
    params: list[torch.Tensor]  # trainable parameters, in the order they enter the Function
    block_params: list[list[int]]  # per block: indices of its parameters in ``params``
    arg_spec: pytree.TreeSpec
    arg_leaves: list[Any]  # flattened (args, kwargs); tensors replaced at call time

    @property
    def n_params(self) -> int:
        return len(self.params)

    def arguments(self, tensors: tuple[torch.Tensor, ...]) -> tuple[tuple, dict]:
        """Rebuild ``(args, kwargs)`` with ``tensors`` in place of the tensor leaves."""
        it = iter(tensors)
        leaves = [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.arg_leaves]
        return pytree.tree_unflatten(leaves, self.arg_spec)


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


def build_stage(
    functions: list[nn.Module], residual: bool, args: tuple, kwargs: dict
) -> tuple[Stage, list[torch.Tensor], list[torch.Tensor]]:
    """The stage description, its trainable parameters and the tensors among the arguments."""
    params: list[torch.Tensor] = []
    index: dict[int, int] = {}
    block_params = []
    for f in functions:
        mine = []
        for p in f.parameters():
            if p.requires_grad:
                if id(p) not in index:
                    index[id(p)] = len(params)
                    params.append(p)
                mine.append(index[id(p)])
        block_params.append(mine)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    return Stage(functions, residual, params, block_params, spec, leaves), params, tensors


def _check_range(rule: Rule, x0: torch.Tensor, v0: torch.Tensor, gmax: list) -> None:
    """Raise unless every fixed-point value stayed inside the exactly representable range.

    Float64 integers do not wrap around, but past 2**53 they silently round.  A bound on the
    largest ``|x|`` and ``|v|`` reached, from ``|x_0|``, ``|v_0|`` and each block's largest
    ``|g|``, proves they did not; one device synchronisation per forward pass.
    """
    gamma, limit = rule.gamma, _exact.range_limit(rule.frac_bits)
    extremes = [*torch.aminmax(x0.detach()), *torch.aminmax(v0.detach()), *gmax]
    values = torch.stack([t.double() for t in extremes]).abs().view(-1, 2).amax(1).tolist()
    x_bound, v_bound, *peaks = values
    for n, peak in enumerate(peaks):
        if not math.isfinite(peak):
            raise FloatingPointError(
                f"momres: block {n} returned non-finite values (inf or nan); the exact "
                "memory-free backward cannot run. Check the learning rate, the input scaling, "
                "or train with a loss scaler."
            )
        v_bound = gamma * v_bound + (1 - gamma) * peak
        x_bound += v_bound
    if not x_bound < limit:
        raise OverflowError(
            f"momres: activations of the momentum stage may reach {x_bound:.3g}, beyond the "
            f"exact fixed-point range +-{limit:.3g} (frac_bits={rule.frac_bits}). Rescale the "
            "input or the blocks (normalisation), lower frac_bits (each bit fewer doubles the "
            "range and halves the resolution), or use exact=False."
        )


class Recorder:
    """Forward side of a memory-free Function: runs blocks without a graph and remembers what
    the backward pass must replay (generator states, autocast, arguments)."""

    def __init__(self, ctx, stage: Stage, arg_tensors: tuple[torch.Tensor, ...],
                 device: torch.device) -> None:
        self.stage, self.device, self.arg_tensors = stage, device, arg_tensors
        self.args, self.kwargs = stage.arguments(arg_tensors)
        self.rng: dict[int, RngState] = {}
        ctx.stage, ctx.device, ctx.autocast = stage, device, AutocastState.capture(device)

    def __call__(self, n: int, x: torch.Tensor) -> torch.Tensor:
        """``g = f_n(x)``, as the backward pass will recompute it."""
        f, before, version = self.stage.functions[n], RngState.capture(self.device), x._version
        # Without grad, attention would take fused kernels that the recompute (with grad)
        # cannot: both passes must compute the same numbers.
        with mha_fast_path_off():
            g = evaluate(n, f, x, self.args, self.kwargs, self.stage.residual)
        if x._version != version:
            raise RuntimeError(
                f"momres: block {n} ({type(f).__name__}) modified its input in place; the "
                "memory-free backward needs it intact. Use inplace=False for its first op."
            )
        if before.differs_from(RngState.capture(self.device)):
            self.rng[n] = before
        return g

    def save(self, ctx, state: list[torch.Tensor]) -> None:
        """Everything the backward needs goes through ``save_for_backward`` (and is counted)."""
        ctx.n_state = len(state)
        ctx.rng_blocks = sorted(self.rng)
        ctx.rng_has_cuda = [self.rng[n].cuda is not None for n in ctx.rng_blocks]
        rng_tensors = [t for n in ctx.rng_blocks for t in self.rng[n].tensors()]
        ctx.save_for_backward(*state, *rng_tensors, *self.arg_tensors)


class Replayer:
    """Backward side: evaluates each block once more, with grad, exactly as in the forward
    pass, and accumulates the gradients of its parameters and tensor arguments."""

    def __init__(self, ctx, first_param: int, remedy: str) -> None:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "momres: double backward (create_graph=True) through a memory-free stage is "
                f"not supported. Use {remedy} for higher-order gradients."
            )
        self.stage: Stage = ctx.stage
        self.device, self.autocast = ctx.device, ctx.autocast
        saved = ctx.saved_tensors
        self.state, rest = list(saved[: ctx.n_state]), saved[ctx.n_state :]
        self.rng: dict[int, RngState] = {}
        for n, has_cuda in zip(ctx.rng_blocks, ctx.rng_has_cuda, strict=True):
            self.rng[n] = RngState(rest[0], rest[1] if has_cuda else None)
            rest = rest[2 if has_cuda else 1 :]
        needs = ctx.needs_input_grad[first_param:]
        self.param_needs = needs[: self.stage.n_params]
        self.arg_needs = needs[self.stage.n_params :]
        # One leaf per argument tensor that needs a gradient, shared by all blocks.
        leaves = [t.detach().requires_grad_() if need else t
                  for t, need in zip(rest, self.arg_needs, strict=True)]
        self.args, self.kwargs = self.stage.arguments(tuple(leaves))
        self.grad_args = [t for t, need in zip(leaves, self.arg_needs, strict=True) if need]
        self.param_grads: list[torch.Tensor | None] = [None] * self.stage.n_params
        self.arg_grads: list[torch.Tensor | None] = [None] * len(self.grad_args)

    def pull(self, n: int, x: torch.Tensor, cotangent: torch.Tensor, scale: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block ``n`` at ``x``, evaluated once: its value ``g`` and ``J_x^T cotangent``.

        ``scale * (dg/dtheta)^T cotangent`` is added to the gradients of the block's parameters
        and of the tensor arguments.
        """
        x = x.detach().requires_grad_()
        f = self.stage.functions[n]
        with torch.enable_grad(), self.autocast.replay(), restored_rng(
            self.rng.get(n), self.device
        ), frozen_batchnorm(f):
            g = evaluate(n, f, x, self.args, self.kwargs, self.stage.residual)
        mine = [j for j in self.stage.block_params[n] if self.param_needs[j]]
        wrt = [x, *(self.stage.params[j] for j in mine), *self.grad_args]
        grads = torch.autograd.grad(g, wrt, cotangent, allow_unused=True)
        _accumulate(self.param_grads, mine, grads[1 : 1 + len(mine)], scale)
        _accumulate(self.arg_grads, range(len(self.grad_args)), grads[1 + len(mine) :], scale)
        return g.detach(), grads[0]

    def input_grads(self) -> list[torch.Tensor | None]:
        """Gradients for the Function's parameter and argument inputs, in their order."""
        it = iter(self.arg_grads)
        return [*self.param_grads, *(next(it) if need else None for need in self.arg_needs)]


class MomentumFunction(torch.autograd.Function):
    """Forward: the momentum stage without a graph.  Backward: rebuild and backpropagate."""

    @staticmethod
    def forward(ctx, stage: Stage, rule: Rule, x0: torch.Tensor, v0: torch.Tensor,
                *inputs: torch.Tensor):
        # The parameters are inputs only so that their gradients leave through backward();
        # the blocks use them directly.
        run = Recorder(ctx, stage, inputs[stage.n_params :], x0.device)
        ctx.rule, dtype = rule, x0.dtype
        ctx.dtype = dtype
        if rule.exact:
            k, num, den = rule.frac_bits, rule.num, rule.den
            scale, unit = (1 - rule.gamma) * 2.0**k, 2.0**-k
            X, V = _exact.to_grid(x0, k), _exact.to_units(v0, k)
            buf = torch.zeros_like(X)
            checksum = torch.stack([X.sum(), V.sum()])
            schedule, bound = _exact.spill_schedule(num, den, len(stage.functions))
            spilled, gmax = [], []
            step = fused(_exact.forward_step_, X)
            for n in range(len(stage.functions)):
                _log("forward", n, X, V, buf)
                if schedule[n]:
                    spilled.append(buf)
                    buf = torch.zeros_like(X)
                g = run(n, X.to(dtype, copy=True)).to(dtype)
                gmax.extend(torch.aminmax(g))
                # Scratch space only while the step runs, not under the block's temporaries.
                V, buf, _ = step(X, V, buf, torch.empty_like(X), g, num, den, scale, unit)
            _check_range(rule, x0, v0, gmax)
            x_out, remainder = _exact.split_grid_(X, k, dtype)  # X is consumed
            v_out = _exact.from_units(V, k, dtype)
            ctx.has_remainder = remainder is not None
            state = [x_out, *([remainder] if ctx.has_remainder else []), V,
                     _exact.narrow(buf, bound), checksum, *spilled]
        else:
            gamma = rule.gamma
            X, V = x0.detach().clone(), v0.detach().clone()
            for n in range(len(stage.functions)):
                g = run(n, X)
                V.mul_(gamma).add_(g, alpha=1 - gamma)
                X.add_(V)
            x_out, v_out = X, V
            state = [X, V]
        run.save(ctx, state)
        ctx.set_materialize_grads(False)  # an unused output gets no tensor of zeros
        return x_out, v_out

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor, grad_v: torch.Tensor):
        replay = Replayer(ctx, 4, "MomentumNet(..., memory_efficient=False)")
        stage, state, rule = replay.stage, replay.state, ctx.rule
        gamma, dtype = rule.gamma, ctx.dtype
        if rule.exact:
            k, num, den = rule.frac_bits, rule.num, rule.den
            scale, unit = (1 - gamma) * 2.0**k, 2.0**-k
            remainder = state.pop(1) if ctx.has_remainder else None
            X = _exact.join_grid(state[0], remainder, k)
            # V is internal to the Function: rebuilt in place unless a later backward pass
            # (retain_graph=True) needs it again.
            V = state[1].clone() if _graph_kept() else state[1]
            buf = state[2].to(torch.float64, copy=True)
            checksum, spilled = state[3], state[4:]
            schedule, _ = _exact.spill_schedule(num, den, len(stage.functions))
            step = fused(_exact.backward_step_, X)
            leftovers = []
        else:
            X, V = state[0].clone(), state[1].clone()

        # b = dL/dx_{n+1} + dL/dv_{n+1};  dL/dx_n = a_x + (1-gamma) J^T b;  dL/dv_n = gamma b.
        # The vector-Jacobian product is taken with b itself and scaled when accumulated.
        # a_x and a_v are our own copies (an unused output's gradient arrives as None), so b
        # is formed in a_v's memory: two gradient-sized tensors, not three, while a block runs.
        a_x = torch.zeros_like(state[0], dtype=dtype) if grad_x is None else grad_x.clone()
        a_v = torch.zeros_like(a_x) if grad_v is None else grad_v.clone()
        for n in reversed(range(len(stage.functions))):
            if rule.exact:
                X.sub_(V, alpha=unit)  # x_n = x_{n+1} - v_{n+1}
                x = X.to(dtype, copy=True)
            else:
                x = X.sub_(V)
            b = a_v.add_(a_x)
            # One evaluation of the block, used for the gradient and to rebuild v_n.
            g, grad = replay.pull(n, x, b, 1 - gamma)
            if grad is not None:
                a_x.add_(grad, alpha=1 - gamma)
            a_v = b.mul_(gamma)  # after pull: a gradient there may be b itself
            if rule.exact:
                V, buf, _ = step(V, buf, torch.empty_like(X), g.to(dtype), num, den, scale)
                if schedule[n]:
                    leftovers.append(buf.any())
                    buf = spilled.pop()
                _log("backward", n, X, V, buf)
            else:
                V.sub_(g, alpha=1 - gamma).div_(gamma)

        if rule.exact:
            intact = torch.equal(torch.stack([X.sum(), V.sum()]), checksum)
            if not intact or bool(buf.any()) or any(bool(t) for t in leftovers):
                raise RuntimeError(
                    "momres: the backward pass did not rebuild the forward's exact state, so "
                    "its gradients would be wrong. Every block must compute the same function "
                    "twice: likely causes are non-deterministic kernels (try "
                    "torch.use_deterministic_algorithms(True)), random numbers drawn outside "
                    "torch's generators, parameters or buffers changed between forward and "
                    "backward, or layers with side effects (e.g. spectral norm's power "
                    "iteration) inside the blocks."
                )
        return (None, None, a_x, a_v, *replay.input_grads())


def _graph_kept() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``).

    Asked through the private query PyTorch's own compiled autograd uses; if it ever goes
    away, assume the graph is kept (the safe answer: the saved state is then copied).
    """
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _accumulate(total: list, indices, grads, scale: float) -> None:
    """``total[j] += scale * grad``."""
    for j, grad in zip(indices, grads, strict=True):
        if grad is not None:
            total[j] = grad * scale if total[j] is None else total[j].add_(grad, alpha=scale)
