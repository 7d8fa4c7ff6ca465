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
from ._replay import AutocastState, RngState, frozen_batchnorm, restored_rng

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
            f"{got}; every block of a momentum stage must keep the shape of x. Keep "
            "shape-changing layers (strided or channel-changing blocks) outside the stage."
        )
    return y if residual else y - x


@dataclass
class Stage:
    """Everything about one momentum stage that is not a tensor input of the Function."""

    functions: list[nn.Module]
    residual: bool
    num: int
    den: int
    exact: bool
    frac_bits: int
    params: list[torch.Tensor]  # trainable parameters, in the order they enter the Function
    block_params: list[list[int]]  # per block: indices of its parameters among the inputs
    arg_spec: pytree.TreeSpec
    arg_leaves: list[Any]  # flattened (args, kwargs); tensors replaced at call time

    @property
    def n_params(self) -> int:
        return len(self.params)

    @property
    def gamma(self) -> float:
        return self.num / self.den

    def arguments(self, tensors: tuple[torch.Tensor, ...]) -> tuple[tuple, dict]:
        """Rebuild ``(args, kwargs)`` with ``tensors`` in place of the tensor leaves."""
        it = iter(tensors)
        leaves = [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.arg_leaves]
        return pytree.tree_unflatten(leaves, self.arg_spec)


def build_stage(
    functions: list[nn.Module], residual: bool, num: int, den: int, exact: bool, frac_bits: int,
    args: tuple, kwargs: dict,
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
    stage = Stage(functions, residual, num, den, exact, frac_bits, params, block_params, spec,
                  leaves)
    return stage, params, tensors


def _check_range(stage: Stage, x0: torch.Tensor, v0: torch.Tensor, gmax: list) -> None:
    """Raise unless every fixed-point value stayed inside the exactly representable range.

    Float64 integers do not wrap around, but past 2**53 they silently round.  A bound on the
    largest ``|x|`` and ``|v|`` reached, from ``|x_0|``, ``|v_0|`` and each block's largest
    ``|g|``, proves they did not; one device synchronisation per forward pass.
    """
    gamma, limit = stage.gamma, _exact.range_limit(stage.frac_bits)
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
            f"exact fixed-point range +-{limit:.3g} (frac_bits={stage.frac_bits}). Rescale the "
            "input or the blocks (normalisation), lower frac_bits (each bit fewer doubles the "
            "range and halves the resolution), or use exact=False."
        )


class MomentumFunction(torch.autograd.Function):
    """Forward: the momentum stage without a graph.  Backward: rebuild and backpropagate."""

    @staticmethod
    def forward(ctx, stage: Stage, x0: torch.Tensor, v0: torch.Tensor, *inputs: torch.Tensor):
        # The parameters are inputs only so that their gradients leave through backward();
        # the blocks use them directly.
        arg_tensors = inputs[stage.n_params :]
        args, kwargs = stage.arguments(arg_tensors)
        device, dtype = x0.device, x0.dtype
        ctx.stage, ctx.device, ctx.dtype = stage, device, dtype
        ctx.autocast = AutocastState.capture(device)
        rng: dict[int, RngState] = {}

        def run(n: int, f: nn.Module, x: torch.Tensor) -> torch.Tensor:
            before = RngState.capture(device)
            version = x._version
            g = evaluate(n, f, x, args, kwargs, stage.residual)
            if x._version != version:
                raise RuntimeError(
                    f"momres: block {n} ({type(f).__name__}) modified its input in place; the "
                    "memory-free backward needs it intact. Use inplace=False for its first op."
                )
            if before.differs_from(RngState.capture(device)):
                rng[n] = before
            return g

        if stage.exact:
            k, num, den = stage.frac_bits, stage.num, stage.den
            scale, unit = (1 - stage.gamma) * 2.0**k, 2.0**-k
            X, V = _exact.to_grid(x0, k), _exact.to_units(v0, k)
            buf, tmp = torch.zeros_like(X), torch.empty_like(X)
            checksum = torch.stack([X.sum(), V.sum()])
            schedule = _exact.spill_schedule(num, den, len(stage.functions))
            spilled, gmax = [], []
            step = fused(_exact.forward_step_, X)
            for n, f in enumerate(stage.functions):
                _log("forward", n, X, V, buf)
                if schedule[n]:
                    spilled.append(buf)
                    buf = torch.zeros_like(X)
                g = run(n, f, X.to(dtype, copy=True)).to(dtype)
                gmax.extend(torch.aminmax(g))
                V, buf, tmp = step(X, V, buf, tmp, g, num, den, scale, unit)
            _check_range(stage, x0, v0, gmax)
            x_out, remainder = _exact.split_grid(X, k, dtype)
            v_out = _exact.from_units(V, k, dtype)
            ctx.has_remainder = remainder is not None
            state = [x_out, *([remainder] if ctx.has_remainder else []), V, buf, checksum,
                     *spilled]
        else:
            gamma = stage.gamma
            X, V = x0.detach().clone(), v0.detach().clone()
            for n, f in enumerate(stage.functions):
                g = run(n, f, X)
                V.mul_(gamma).add_(g, alpha=1 - gamma)
                X.add_(V)
            x_out, v_out = X, V
            state = [X, V]
        ctx.n_state = len(state)
        ctx.rng_blocks = sorted(rng)
        ctx.rng_has_cuda = [rng[n].cuda is not None for n in ctx.rng_blocks]
        rng_tensors = [t for n in ctx.rng_blocks for t in rng[n].tensors()]
        ctx.save_for_backward(*state, *rng_tensors, *arg_tensors)
        return x_out, v_out

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor, grad_v: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "momres: double backward (create_graph=True) through a memory-free momentum "
                "stage is not supported. Use MomentumNet(..., memory_efficient=False) for "
                "higher-order gradients."
            )
        stage: Stage = ctx.stage
        saved = ctx.saved_tensors
        state, rest = saved[: ctx.n_state], saved[ctx.n_state :]
        rng: dict[int, RngState] = {}
        for n, has_cuda in zip(ctx.rng_blocks, ctx.rng_has_cuda, strict=True):
            rng[n] = RngState(rest[0], rest[1] if has_cuda else None)
            rest = rest[2 if has_cuda else 1 :]
        arg_tensors = rest
        needs = ctx.needs_input_grad[3:]
        param_needs, arg_needs = needs[: stage.n_params], needs[stage.n_params :]
        params = stage.params
        # Leaves to differentiate with respect to, one per argument tensor needing a gradient.
        arg_leaves = [t.detach().requires_grad_() if need else t
                      for t, need in zip(arg_tensors, arg_needs, strict=True)]
        args, kwargs = stage.arguments(tuple(arg_leaves))
        grad_args = [leaf for leaf, need in zip(arg_leaves, arg_needs, strict=True) if need]
        param_grads: list[torch.Tensor | None] = [None] * stage.n_params
        arg_grads: list[torch.Tensor | None] = [None] * len(grad_args)

        gamma, dtype = stage.gamma, ctx.dtype
        if stage.exact:
            k, num, den = stage.frac_bits, stage.num, stage.den
            scale, unit = (1 - gamma) * 2.0**k, 2.0**-k
            if ctx.has_remainder:
                X = _exact.join_grid(state[0], state[1], k)
                state = state[2:]
            else:
                X, state = _exact.join_grid(state[0], None, k), state[1:]
            V, buf = state[0].clone(), state[1].clone()
            checksum, spilled = state[2], list(state[3:])
            tmp = torch.empty_like(X)
            schedule = _exact.spill_schedule(num, den, len(stage.functions))
            step = fused(_exact.backward_step_, X)
            leftovers = []
        else:
            X, V = state[0].clone(), state[1].clone()

        # b = dL/dx_{n+1} + dL/dv_{n+1};  dL/dx_n = a_x + (1-gamma) J^T b;  dL/dv_n = gamma b.
        # The vector-Jacobian product is taken with b itself and scaled when accumulated.
        a_x, a_v = grad_x.clone(), grad_v
        for n in reversed(range(len(stage.functions))):
            f = stage.functions[n]
            if stage.exact:
                X.sub_(V, alpha=unit)  # x_n = x_{n+1} - v_{n+1}
                x = X.to(dtype, copy=True).requires_grad_()
            else:
                X.sub_(V)
                x = X.detach().requires_grad_()
            with torch.enable_grad(), ctx.autocast.replay(), restored_rng(
                rng.get(n), ctx.device
            ), frozen_batchnorm(f):
                g = evaluate(n, f, x, args, kwargs, stage.residual)
            # Rebuild v_n from the same evaluation used for the gradient below.
            if stage.exact:
                V, buf, tmp = step(V, buf, tmp, g.detach().to(dtype), num, den, scale)
                if schedule[n]:
                    leftovers.append(buf.any())
                    buf = spilled.pop()
                _log("backward", n, X, V, buf)
            else:
                V.sub_(g.detach(), alpha=1 - gamma).div_(gamma)
            b = a_x + a_v
            mine = [j for j in stage.block_params[n] if param_needs[j]]
            wrt = [x, *(params[j] for j in mine), *grad_args]
            grads = torch.autograd.grad(g, wrt, b, allow_unused=True)
            if grads[0] is not None:
                a_x.add_(grads[0], alpha=1 - gamma)
            _accumulate(param_grads, mine, grads[1 : 1 + len(mine)], 1 - gamma)
            _accumulate(arg_grads, range(len(grad_args)), grads[1 + len(mine) :], 1 - gamma)
            a_v = b.mul_(gamma)  # last: a gradient above may be b itself

        if stage.exact:
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
        it = iter(arg_grads)
        arg_out = [next(it) if need else None for need in arg_needs]
        return (None, a_x, a_v, *param_grads, *arg_out)


def _accumulate(total: list, indices, grads, scale: float) -> None:
    """``total[j] += scale * grad``."""
    for j, grad in zip(indices, grads, strict=True):
        if grad is not None:
            total[j] = grad * scale if total[j] is None else total[j].add_(grad, alpha=scale)
