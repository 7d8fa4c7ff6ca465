"""The recompute machinery shared by every memory-free stage (momentum and reversible).

A memory-free stage is one ``torch.autograd.Function``.  Its forward pass runs the blocks
without building a graph (``Recorder``); its backward pass walks them from the top, rebuilds
each block's input from its output by the stage's own inverse, and evaluates the block once
more with grad enabled (``Replayer.pull``), replaying exactly what the forward pass did:
random numbers, autocast, BatchNorm statistics (``_replay``).  How an input is rebuilt from an
output is the stage's business (``_rule`` for momentum stages, ``reversible`` for couplings);
everything else is here.

Parameters (and tensors among the blocks' extra arguments) enter the Function as explicit
inputs, so their gradients leave it like any other gradient: DistributedDataParallel's hooks,
gradient accumulation and weights shared between blocks keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ._replay import AutocastState, RngState, frozen_batchnorm, mha_fast_path_off, restored_rng


def evaluate(
    n: int, f: Callable, x: torch.Tensor, args: tuple, kwargs: dict, residual: bool,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The residual branch ``g = f_n(x)`` (``f_n(x) - x`` for blocks with their own skip);
    with ``params``, ``f`` runs with those tensors in place of its parameters."""
    if params is None:
        y = f(x, *args, **kwargs)
    else:
        y = torch.func.functional_call(f, params, (x, *args), kwargs)
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
    block_names: list[list[str]]  # per block: the names of those parameters in the block
    block_frozen: list[dict[str, torch.Tensor]]  # per block: its frozen parameters, by name
    versions: list[tuple[torch.Tensor, int]]  # every parameter (frozen too), its version then
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


def build_stage(
    functions: list[nn.Module], residual: bool, args: tuple, kwargs: dict
) -> tuple[Stage, list[torch.Tensor], list[torch.Tensor]]:
    """The stage description, its trainable parameters and the tensors among the arguments."""
    params: list[torch.Tensor] = []
    index: dict[int, int] = {}
    block_params, block_names, block_frozen, versions = [], [], [], []
    for f in functions:
        mine, names, frozen = [], [], {}
        for name, p in f.named_parameters():
            versions.append((p, p._version))
            if not p.requires_grad:
                frozen[name] = p
            else:
                if id(p) not in index:
                    index[id(p)] = len(params)
                    params.append(p)
                mine.append(index[id(p)])
                names.append(name)
        block_params.append(mine)
        block_names.append(names)
        block_frozen.append(frozen)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    stage = Stage(functions, residual, params, block_params, block_names, block_frozen,
                  versions, spec, leaves)
    return stage, params, tensors


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
        self._check_versions()
        # The recompute differentiates the very tensors the forward pass used, through leaves
        # of its own: the parameters' hooks then fire once, when the Function hands their
        # gradients back, and tensors swapped in by torch.func.functional_call get theirs.
        self.leaves = [p.detach().requires_grad_(need)
                       for p, need in zip(self.stage.params, self.param_needs, strict=True)]

    def _check_versions(self) -> None:
        """Refuse, as autograd does for saved tensors, parameters changed in place since the
        forward pass: the recompute would differentiate another function."""
        if any(p._version != version for p, version in self.stage.versions):
            raise RuntimeError(
                "momres: a parameter of a memory-free stage was modified in place between the "
                "forward and the backward pass (optimizer.step() or an in-place update before "
                "backward()?); its gradients would be those of another function. Call "
                "backward() before changing the parameters."
            )

    def pull(self, n: int, x: torch.Tensor, cotangent: torch.Tensor, scale: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block ``n`` at ``x``, evaluated once: its value ``g`` and ``J_x^T cotangent``.

        ``scale * (dg/dtheta)^T cotangent`` is added to the gradients of the block's parameters
        and of the tensor arguments.
        """
        x = x.detach().requires_grad_()
        f, indices = self.stage.functions[n], self.stage.block_params[n]
        # Frozen parameters too: torch.func.functional_call may have swapped them as well.
        params = {**self.stage.block_frozen[n],
                  **{name: self.leaves[j]
                     for name, j in zip(self.stage.block_names[n], indices, strict=True)}}
        with torch.enable_grad(), self.autocast.replay(), restored_rng(
            self.rng.get(n), self.device
        ), frozen_batchnorm(f):
            y = evaluate(n, f, x, self.args, self.kwargs, True, params)
        mine = [j for j in indices if self.param_needs[j]]
        wrt = [x, *(self.leaves[j] for j in mine), *self.grad_args]
        grads = torch.autograd.grad(y, wrt, cotangent, allow_unused=True)
        _accumulate(self.param_grads, mine, grads[1 : 1 + len(mine)], scale)
        _accumulate(self.arg_grads, range(len(self.grad_args)), grads[1 + len(mine) :], scale)
        if self.stage.residual:
            return y.detach(), grads[0]
        # A block with its own skip: g = y - x, whose vector-Jacobian product is the block's
        # minus the cotangent.  Taken outside the graph: one node and two passes fewer.
        g = y.detach() - x.detach()
        return g, -cotangent if grads[0] is None else grads[0] - cotangent

    def input_grads(self) -> list[torch.Tensor | None]:
        """Gradients for the Function's parameter and argument inputs, in their order."""
        it = iter(self.arg_grads)
        return [*self.param_grads, *(next(it) if need else None for need in self.arg_needs)]


def graph_kept() -> bool:
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
