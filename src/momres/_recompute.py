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

The recompute must differentiate the function the forward pass computed, not merely give its
values.  Until a block has passed one backward, its memory-free forward is audited: it runs with
grad on leaves of its own, and the tensors its output reaches through the graph (its input, its
parameters, the tensor arguments) are compared with those the recompute's graph reaches
(``reach``).  A block that detaches its input in one call only, or that reuses a tensor it
derived from a parameter in an earlier call, is refused instead of silently losing gradients.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from . import _tail
from ._replay import AutocastState, RngState, frozen_batchnorm, mha_fast_path_off, restored_rng

#: What a block's graph may reach: its input ``"x"``, ``("parameter", j)`` (index in
#: ``Stage.params``) or ``("argument", k)`` (index among the stage's tensor arguments).
Key = str | tuple[str, int]

#: Blocks whose recompute was found to differentiate what their forward pass did: not audited
#: again (``Stage.audit``).
_AUDITED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


#: One parameter slot of a block: the ``_parameters`` dict of the (sub)module holding it, the
#: name there, and what goes in it: a tensor, or the parameter's index in ``Stage.params``.
Slot = tuple[dict, str, "int | torch.Tensor"]


def evaluate(
    n: int, f: Callable, x: torch.Tensor, args: tuple, kwargs: dict, residual: bool,
    swaps: list[tuple[dict, str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The residual branch ``g = f_n(x)`` (``f_n(x) - x`` for blocks with their own skip);
    with ``swaps``, ``f`` runs with those tensors in place of its parameters."""
    y = block_output(n, f, x, args, kwargs, swaps)
    return y if residual else y - x


def block_output(
    n: int, f: Callable, x: torch.Tensor, args: tuple, kwargs: dict,
    swaps: list[tuple[dict, str, torch.Tensor]] | None = None,
    tail: _tail.Branch | None = None,
) -> torch.Tensor:
    """``f_n(x)`` itself, checked to keep the shape of ``x``; with ``swaps`` (``(parameter
    dict, name, tensor)``: every slot of the block, ``Stage.block_slots``), ``f`` runs with
    those tensors in its parameter slots, put back afterwards; with ``tail`` (``Stage.tails``),
    the block's branch ``r`` alone (it computes ``relu(r + x)``).

    What ``torch.func.functional_call`` does with the block's parameter names, without its
    per-call cost (resolving names, untying, swapping through ``setattr``): the slots are found
    once per stage call, tied parameters (one tensor in several slots) included, and the
    tensors go straight into the dicts, as BatchNorm's statistics do in ``frozen_batchnorm``.
    """
    def call() -> object:
        return f(x, *args, **kwargs) if tail is None else tail(f, x)

    if swaps is None:
        y = call()
    else:
        originals = [(slots, name, slots[name]) for slots, name, _ in swaps]
        try:
            for slots, name, t in swaps:
                slots[name] = t
            y = call()
        finally:
            for slots, name, t in originals:
                slots[name] = t
    return shape_checked(n, f, x, y)


def shape_checked(n: int, f: Callable, x: torch.Tensor, y: object) -> torch.Tensor:
    """``y``, the output of block ``n`` at ``x`` (or its branch), if a tensor of ``x``'s shape;
    else an error that says what to do."""
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(
            f"momres: block {n} ({type(f).__name__}) maps x of shape {tuple(x.shape)} to "
            f"{got}; every block of a memory-free stage must keep the shape of its input. Keep "
            "shape-changing layers (strided or channel-changing blocks) outside the stage."
        )
    return y


@dataclass
class Stage:
    """A stage of blocks as a memory-free Function sees it (everything but the tensors)."""

    functions: list[nn.Module]
    residual: bool
    params: list[torch.Tensor]  # trainable parameters, in the order they enter the Function
    block_params: list[list[int]]  # per block: indices of its parameters in ``params``
    block_names: list[list[str]]  # per block: the names of those parameters in the block
    block_slots: list[list[Slot]]  # per block: every slot holding one of its parameters
    block_norms: list[list[nn.Module] | None]  # per block: its BatchNorm layers (not sharded)
    versions: list[tuple[torch.Tensor, int]]  # every parameter (frozen too), its version then
    arg_spec: pytree.TreeSpec
    arg_leaves: list[Any]  # flattened (args, kwargs); tensors replaced at call time
    audit: list[bool]  # per block: not yet audited (forward and recompute graphs compared)
    sharded: list[bool]  # per block: managed by FSDP2 (its parameters are not inputs)
    tails: list[_tail.Branch | None]  # per block: its branch, if it ends in relu(r + x)

    @property
    def n_params(self) -> int:
        return len(self.params)

    def swaps(self, n: int, leaves: dict[int, torch.Tensor] | list[torch.Tensor]
              ) -> list[tuple[dict, str, torch.Tensor]]:
        """Block ``n``'s slots with ``leaves[j]`` for trainable parameter ``j``; frozen ones
        get the tensors the forward pass saw (``torch.func.functional_call`` by the user may
        have swapped them too)."""
        return [(slots, name, src if isinstance(src, torch.Tensor) else leaves[src])
                for slots, name, src in self.block_slots[n]]

    def arguments(self, tensors: tuple[torch.Tensor, ...]) -> tuple[tuple, dict]:
        """Rebuild ``(args, kwargs)`` with ``tensors`` in place of the tensor leaves."""
        it = iter(tensors)
        leaves = [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.arg_leaves]
        return pytree.tree_unflatten(leaves, self.arg_spec)

    def describe(self, n: int, keys: set[Key]) -> str:
        """``keys`` of block ``n`` in words: its input, parameter names, argument positions."""
        names = dict(zip(self.block_params[n], self.block_names[n], strict=True))
        words = ["its input x" if key == "x" else
                 f"parameter {names[key[1]]!r}" if key[0] == "parameter" else
                 f"tensor argument {key[1]}" for key in sorted(keys, key=str)]
        return ", ".join(words)


def build_stage(
    functions: list[nn.Module], residual: bool, args: tuple, kwargs: dict
) -> tuple[Stage, list[torch.Tensor], list[torch.Tensor]]:
    """The stage description, its trainable parameters and the tensors among the arguments."""
    params: list[torch.Tensor] = []
    index: dict[int, int] = {}
    block_params, block_names, block_slots, block_norms, versions = [], [], [], [], []
    fsdp = sys.modules.get("torch.distributed.fsdp")  # imported by whoever sharded a block
    sharded = [fsdp is not None and isinstance(f, fsdp.FSDPModule) for f in functions]
    dtensor = fsdp and sys.modules["torch.distributed.tensor"].DTensor
    for n, f in enumerate(functions):
        mine, names, slots, norms = [], [], [], []
        # FSDP2 swaps its blocks' parameters between passes and reduces their gradients
        # itself: they are not inputs of the Function (``Replayer._pull_sharded``).
        for name, p, slot in ([] if sharded[n] else _parameters(f, slots, norms)):
            if not slot:
                continue
            if dtensor and isinstance(p, dtensor):
                raise _partly_sharded(n, f, name)
            versions.append((p, p._version))
            if p.requires_grad:  # frozen ones stay tensors in the block's slots
                if id(p) not in index:
                    index[id(p)] = len(params)
                    params.append(p)
                mine.append(index[id(p)])
                names.append(name)
        block_params.append(mine)
        block_names.append(names)
        block_slots.append([(d, local, index.get(id(p), p)) for d, local, p in slots])
        block_norms.append(None if sharded[n] else norms)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    audit = [not whole and f not in _AUDITED for f, whole in zip(functions, sharded, strict=True)]
    # Blocks ending in relu(r + x) are run as their branch r: the rule's pass takes the add and
    # the ReLU (``_tail``).  Decided here, once: the backward pass follows the forward's choice.
    tails = [None if residual or whole else _tail.branch(f, args, kwargs)
             for f, whole in zip(functions, sharded, strict=True)]
    stage = Stage(functions, residual, params, block_params, block_names, block_slots,
                  block_norms, versions, spec, leaves, audit, sharded, tails)
    return stage, params, tensors


class Recorder:
    """Forward side of a memory-free Function: runs blocks without a graph and remembers what
    the backward pass must replay (generator states, autocast, arguments)."""

    def __init__(self, ctx, stage: Stage, arg_tensors: tuple[torch.Tensor, ...],
                 device: torch.device) -> None:
        self.stage, self.device, self.arg_tensors = stage, device, arg_tensors
        self.args, self.kwargs = stage.arguments(arg_tensors)
        self.rng: dict[int, RngState] = {}
        # The generators' state after the last block: the next block's state before it, as
        # nothing between two blocks of a stage (the rule's arithmetic) draws random numbers.
        self.rng_now: RngState | None = None
        self.reads: dict[int, set[Key]] = {}  # audited blocks: what their graph reaches
        ctx.stage, ctx.device, ctx.autocast = stage, device, AutocastState.capture(device)

    def __call__(self, n: int, x: torch.Tensor, skip: bool = True) -> torch.Tensor:
        """``g = f_n(x)``, as the backward pass will recompute it; ``skip=False``: for a block
        with its own skip connection, its output ``y``, whose ``y - x`` the caller takes in
        its own pass, or, for a block ending in ``relu(r + x)`` (``Stage.tails``), its branch
        ``r``, whose ``relu(r + x) - x`` the caller takes."""
        f, version, tail = self.stage.functions[n], x._version, self.stage.tails[n]
        before = RngState.capture(self.device) if self.rng_now is None else self.rng_now
        # Without grad, attention would take fused kernels that the recompute (with grad)
        # cannot: both passes must compute the same numbers.
        with mha_fast_path_off():
            if self.stage.audit[n]:
                g = self._audited(n, f, x, tail)
            else:
                g = block_output(n, f, x, self.args, self.kwargs, tail=tail)
        if skip and not self.stage.residual:
            g = (g if tail is None else _tail.output(g, x)) - x
        if x._version != version:
            raise _modified_input(n, f)
        self.rng_now = RngState.capture(self.device)
        if before.differs_from(self.rng_now):
            self.rng[n] = before
        return g

    def _audited(self, n: int, f: nn.Module, x: torch.Tensor, tail: _tail.Branch | None
                 ) -> torch.Tensor:
        """``block_output``, with grad on leaves of its own, recording in ``reads`` which of
        them the block's output reaches; refuses tensors requiring grad that it reaches
        besides."""
        stage = self.stage
        keys: dict[int, Key] = {}
        x_leaf = _leaf(x, "x", keys)
        params = {j: _leaf(stage.params[j], ("parameter", j), keys)
                  for j in stage.block_params[n]}
        args, kwargs = stage.arguments(tuple(
            _leaf(t, ("argument", k), keys) if t.requires_grad else t
            for k, t in enumerate(self.arg_tensors)))
        # A saved-tensor hook of its own hides this short-lived graph from an
        # outer one (``activation_memory`` counts what the forward pass keeps for backward).
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_alias, _alias):
            try:
                y = block_output(n, f, x_leaf, args, kwargs, stage.swaps(n, params), tail)
            except RuntimeError as error:
                if "leaf Variable that requires grad" in str(error):
                    raise _modified_input(n, f) from None
                raise
        self.reads[n], foreign = reach(y, keys)
        if foreign:
            raise RuntimeError(
                f"momres: block {n} ({type(f).__name__}) uses a tensor that requires grad but "
                f"is neither its input, one of its parameters nor a tensor argument of the stage "
                f"(shape {tuple(foreign[0].shape)}: an attribute or a closure?); the memory-free "
                "backward cannot give it its gradient. Register it as an nn.Parameter of the "
                "block, pass it to the stage as an argument, or detach it."
            )
        return y.detach()

    def save(self, ctx, state: list[torch.Tensor]) -> None:
        """Everything the backward needs goes through ``save_for_backward`` (and is counted)."""
        ctx.n_state, ctx.reads = len(state), self.reads
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
        self.device, self.autocast, self.reads = ctx.device, ctx.autocast, ctx.reads
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
        self.arg_leaves = leaves
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

    def pull(self, n: int, x: torch.Tensor, cotangent: torch.Tensor, scale: float = 1.0,
             use: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
             skip: bool = True, tail: bool = False
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Block ``n`` at ``x``, evaluated once: its value ``g`` and ``J_x^T cotangent``.

        ``scale * (dg/dtheta)^T cotangent`` is added to the gradients of the block's parameters
        and of the tensor arguments.  With ``use``, ``g`` is handed to ``use(g)`` as soon as it
        exists and is not kept (``None`` is returned in its place): the block's backward, where
        a memory-free step peaks, then runs without its output in memory (through the output's
        gradient edge), unless the graph itself keeps it.

        ``skip=False``, for a block with its own skip connection (``residual=False``): ``g``
        and its product are the block's output ``y`` and ``J_y^T cotangent``, without the
        skip's ``- x`` and ``- cotangent``, which the caller takes in its own fused passes.

        ``tail`` (with ``skip=False`` and ``use``), for a block ending in ``relu(r + x)``
        (``Stage.tails``): ``g`` is its branch ``r``, and ``use(r)`` returns the cotangent the
        ReLU hands the branch; the product is the branch's with it.
        """
        x = x.detach().requires_grad_()
        skip = skip and not self.stage.residual
        if self.stage.sharded[n]:
            g, grad = self._pull_sharded(n, x, cotangent, scale, skip)
        else:
            g, grad = self._pull(n, x, cotangent, scale, use, skip,
                                 self.stage.tails[n] if tail else None)
        if use is not None and g is not None:  # not used yet
            use(g)
            g = None
        return g, grad

    def _pull(self, n: int, x: torch.Tensor, cotangent: torch.Tensor, scale: float,
              use: Callable[[torch.Tensor], torch.Tensor | None] | None, skip: bool,
              tail: _tail.Branch | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``pull`` for a block that is not sharded: ``g`` is ``None`` if ``use`` took it;
        ``skip``: subtract the block's own skip connection; ``tail``: run its branch."""
        f, indices = self.stage.functions[n], self.stage.block_params[n]
        with torch.enable_grad(), self.autocast.replay(), restored_rng(
            self.rng.get(n), self.device
        ), frozen_batchnorm(f, self.stage.block_norms[n]):
            y = block_output(n, f, x, self.args, self.kwargs, self.stage.swaps(n, self.leaves),
                             tail)
            if n in self.reads:
                self._audit(n, x, y)
        mine = [j for j in indices if self.param_needs[j]]
        wrt = [x, *(self.leaves[j] for j in mine), *self.grad_args]
        # A block with its own skip: g = y - x, whose vector-Jacobian product is the block's
        # minus the cotangent.  Taken outside the graph: one node and two passes fewer.
        g = y.detach() - x.detach() if skip else y.detach()
        if use is not None and (y.grad_fn is not None or tail is not None):
            given = use(g)  # a tail's cotangent is needed now, whatever the graph
            if tail is not None:
                cotangent = given
            g = None
            if y.grad_fn is not None:
                y = torch.autograd.graph.get_gradient_edge(y)
        grads = torch.autograd.grad(y, wrt, cotangent, allow_unused=True)
        _accumulate(self.param_grads, mine, grads[1 : 1 + len(mine)], scale)
        _accumulate(self.arg_grads, range(len(self.grad_args)), grads[1 + len(mine) :], scale)
        grad = grads[0]
        if skip:
            grad = -cotangent if grad is None else grad - cotangent
        return g, grad

    def _pull_sharded(self, n: int, x: torch.Tensor, cotangent: torch.Tensor, scale: float,
                      skip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``pull`` for a block sharded by FSDP2 (``fully_shard(block)``).

        The block is called as such: its hooks all-gather its parameters, as they do for an
        activation-checkpointing recompute, and reduce-scatter the gradients that the backward
        below accumulates in the gathered parameters (scaled there by a hook of ours).
        """
        f = self.stage.functions[n]
        with torch.enable_grad(), self.autocast.replay(), restored_rng(
            self.rng.get(n), self.device
        ), frozen_batchnorm(f):
            y = block_output(n, f, x, self.args, self.kwargs)
            g = y - x if skip else y
        params = [p for p in f.parameters() if p.requires_grad]  # gathered, while backward runs
        hooks = [p.register_hook(lambda grad: grad * scale) for p in params if scale != 1]
        try:
            torch.autograd.backward(g, cotangent, inputs=[x, *params, *self.grad_args])
        finally:
            for hook in hooks:
                hook.remove()
        grads = [t.grad for t in self.grad_args]
        for t in self.grad_args:
            t.grad = None
        _accumulate(self.arg_grads, range(len(grads)), grads, scale)
        _restart_fsdp_cycle(f)
        return g.detach(), x.grad

    def _audit(self, n: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Refuse a recompute whose graph does not reach what the forward pass's did."""
        f = self.stage.functions[n]
        keys: dict[int, Key] = {id(x): "x"}
        keys |= {id(self.leaves[j]): ("parameter", j) for j in self.stage.block_params[n]
                 if self.param_needs[j]}
        keys |= {id(t): ("argument", k) for k, (t, need)
                 in enumerate(zip(self.arg_leaves, self.arg_needs, strict=True)) if need}
        found, foreign = reach(y, keys)
        lost, gained = self.reads[n] - found, found - self.reads[n]
        if lost or gained or foreign:
            differences = []
            if lost:
                differences.append(f"the forward pass differentiates "
                                   f"{self.stage.describe(n, lost)} and the recompute does not")
            if gained:
                differences.append(f"the recompute differentiates "
                                   f"{self.stage.describe(n, gained)} and the forward pass does "
                                   "not")
            if foreign:
                differences.append("the recompute reaches a tensor that requires grad from "
                                   "outside the block (kept from an earlier call?)")
            raise RuntimeError(
                f"momres: block {n} ({type(f).__name__}) builds another graph in the backward "
                f"pass's recompute than in the forward pass: {'; '.join(differences)}. Its "
                "gradients would not be plain autograd's. Every call of a block must compute "
                "its output from its input, parameters and arguments the same way: likely "
                "causes are x.detach() or torch.no_grad() in some calls only, or a tensor "
                "derived from a parameter and kept from an earlier call (a cache); compute it "
                "in every call."
            )
        _AUDITED.add(f)

    def input_grads(self) -> list[torch.Tensor | None]:
        """Gradients for the Function's parameter and argument inputs, in their order."""
        it = iter(self.arg_grads)
        return [*self.param_grads, *(next(it) if need else None for need in self.arg_needs)]


def reach(y: torch.Tensor, keys: dict[int, Key]) -> tuple[set[Key], list[torch.Tensor]]:
    """The keys of the leaves (``keys``: by ``id``) that ``y``'s graph reaches, and the other
    leaves requiring grad that it reaches."""
    leaves = [y] if y.grad_fn is None and y.requires_grad else []  # y itself (an identity)
    todo, seen = [y.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf requiring grad
            leaves.append(node.variable)
        todo.extend(child for child, _ in node.next_functions)
    found = {keys[id(t)] for t in leaves if id(t) in keys}
    return found, [t for t in leaves if id(t) not in keys]


def _parameters(f: nn.Module, slots: list, norms: list):
    """``f.named_parameters()`` with a flag that is false where a parameter is met again (tied);
    one walk of ``f`` that also lists every slot ``(parameter dict, name, parameter)`` in
    ``slots``, tied ones included (each must be swapped), and the BatchNorm layers in
    ``norms`` (``frozen_batchnorm``)."""
    seen: set[int] = set()
    for prefix, module in f.named_modules():  # as named_parameters walks them
        if isinstance(module, _BatchNorm):
            norms.append(module)
        for local, p in module._parameters.items():
            if p is None:
                continue
            slots.append((module._parameters, local, p))
            first = id(p) not in seen
            seen.add(id(p))
            yield (f"{prefix}.{local}" if prefix else local), p, first


def _leaf(t: torch.Tensor, key: Key, keys: dict[int, Key]) -> torch.Tensor:
    """A leaf requiring grad with ``t``'s data, registered in ``keys``."""
    leaf = t.detach().requires_grad_()
    keys[id(leaf)] = key
    return leaf


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A saved tensor's data without its autograd identity: returning ``t`` itself would tie
    a node to an output it saved in a reference cycle that keeps the graph alive; autograd
    gives the unpacked tensor its identity back."""
    return t.detach()


def _partly_sharded(n: int, f: nn.Module, name: str) -> ValueError:
    """The error for a sharded parameter (FSDP2 on a part of a block, tensor parallelism) in a
    block that FSDP2 does not manage as a whole: its gradient would be lost."""
    return ValueError(
        f"momres: parameter {name!r} of block {n} ({type(f).__name__}) is a sharded DTensor, "
        "but the block itself is not an FSDP2 module; the memory-free backward supports FSDP2 "
        "on whole blocks only. Shard each block of the stage (fully_shard(block)) and then the "
        "model, or shard only the model."
    )


def _modified_input(n: int, f: nn.Module) -> RuntimeError:
    return RuntimeError(
        f"momres: block {n} ({type(f).__name__}) modified its input in place; the memory-free "
        "backward needs it intact. Use inplace=False for its first op."
    )


def graph_kept() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``).

    Asked through the private query PyTorch's own compiled autograd uses; if it ever goes
    away, assume the graph is kept (the safe answer: the saved state is then copied).
    """
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _accumulate(total: list, indices, grads, scale: float) -> None:
    """``total[j] += scale * grad`` (``scale * grad`` where ``total[j]`` is ``None``): one
    foreach call each way, the same numbers as a loop of ``mul`` and ``add_`` without a
    Python call per tensor (a block has half a dozen parameters, each a few microseconds)."""
    given = [(j, grad) for j, grad in zip(indices, grads, strict=True) if grad is not None]
    first = [(j, grad) for j, grad in given if total[j] is None]
    more = [(j, grad) for j, grad in given if total[j] is not None]
    if first:
        scaled = torch._foreach_mul([grad for _, grad in first], scale)
        for (j, _), t in zip(first, scaled, strict=True):
            total[j] = t
    if more:
        torch._foreach_add_([total[j] for j, _ in more], [grad for _, grad in more], alpha=scale)


def _restart_fsdp_cycle(f: nn.Module) -> None:
    """Leave FSDP2's state of ``f`` idle after its recompute, so that the next call of the same
    block (shared across depths, or in a later stage) runs a whole cycle again: all-gather,
    then reduce-scatter of its gradients.  Left in its backward state, FSDP would take that
    call for an activation-checkpointing recompute whose gradients it never reduces."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        f._get_fsdp_state()._training_state = TrainingState.IDLE
    except (ImportError, AttributeError) as error:  # FSDP2's internals moved
        raise RuntimeError(
            f"momres: this PyTorch ({torch.__version__}) changed the FSDP2 internals that the "
            f"memory-free backward of a sharded block relies on ({error}); its gradients "
            "cannot be guaranteed. Shard only the model (fully_shard(model)), not its blocks."
        ) from None
