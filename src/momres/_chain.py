"""Momentum stages whose parent runs the blocks itself: one autograd Function per block.

A Hugging Face decoder (and most transformer code) loops over its ``nn.ModuleList`` of layers,
slices it (``self.layers[: n]``), passes each layer arguments of its own (masks, rotary
embeddings, a KV cache) and may wrap layers in its own checkpointing.  A stage-level Function
(``_rule.MomentumFunction``) cannot run under such a loop.  So here each converted block
becomes one *link* of a chain, whatever calls it:

* the block keeps its place and its name in the module tree (parameter names and state dicts
  are unchanged); only its class is swapped for a cached subclass whose ``forward`` runs the
  link, around the original ``forward``;
* the link computes ``v <- gamma v + (1 - gamma) (block(x) - x); x <- x + v`` and returns the
  new ``x``.  The velocity never reaches the parent: it travels in a ``Chain`` attached to the
  returned tensor, which the next link finds on its input;
* training memory-free, link ``n`` is an autograd Function from ``x_n`` (and the block's
  parameters and tensor arguments) to ``x_{n+1}``.  Its forward advances the chain's
  ``Inversion`` state and stores nothing else.  Autograd runs the links' backward passes from
  the top; the first one turns the chain's final state into the backward state, and each
  link rebuilds its input from its output (``retreat``/``rebuild``), recomputes its block
  with grad (``Replayer``), returns ``dL/dx_n`` and the parameter gradients to autograd, and
  leaves ``dL/dv_n`` in the chain for link ``n - 1``.

A link continues a chain only if its input is the previous link's output, untouched, and it is
the next block; a chain starts only at the stage's first link.  Anything else (the parent
changing the hidden states between layers, skipping or repeating a layer) would compute another
function, so it is refused.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _exact
from ._recompute import Recorder, Replayer, Stage, build_stage, graph_kept
from ._replay import checkpointed
from ._rule import Inversion, Rule, backward_step
from .momentum import _snapped, momentum_rule


@dataclass
class ChainOptions:
    """The options of one converted layer stack, shared by its links (switchable in place)."""

    gamma_fraction: tuple[int, int]
    depth: int  # links in the stack
    memory_efficient: bool = True
    exact: bool = True
    frac_bits: int | None = None
    checkpoint: bool = False  # for the blocks left plain (``plain``)

    @classmethod
    def make(cls, gamma: float, depth: int, **options) -> ChainOptions:
        fraction = _snapped(gamma)
        if options.get("memory_efficient", True) and fraction == 0:
            raise ValueError(
                f"momres: gamma={gamma!r} is used as 0, a plain ResNet, which is not invertible, "
                "so it cannot be trained memory-free. Use memory_efficient=False."
            )
        return cls((fraction.numerator, fraction.denominator), depth, **options)

    @property
    def gamma(self) -> float:
        num, den = self.gamma_fraction
        return num / den


@dataclass(frozen=True)
class LinkSpec:
    """What a converted block knows: its stack's options and its place in the stack's chain
    (``index`` counts links; ``None`` for a block left plain at the start of the stack)."""

    options: ChainOptions
    index: int | None


class Chain:
    """One pass through a stack: the velocity (plain links) or the ``Inversion`` state
    (memory-free links), and, in the backward pass, the gradient of the velocity."""

    def __init__(self, options: ChainOptions, v: torch.Tensor) -> None:
        self.options, self.v = options, v
        self.next = 0  # index of the link that may continue the chain
        self.state: Inversion | None = None  # from the first memory-free link on
        self.start = 0  # that link
        self.rule: Rule | None = None  # the rule the state follows, fixed when it starts
        self.saved: tuple[list[torch.Tensor], object] | None = None  # the final state, finished
        self.back: Inversion | None = None  # the state the backward pass rebuilds
        self.back_next: int | None = None  # the link whose backward pass comes next
        self.grad_v: torch.Tensor | None = None  # dL/dv of that link's output
        self.token = object()  # marks the KV caches this pass left unfilled

    def begin(self, n: int, x: torch.Tensor) -> None:
        """Start the memory-free state at link ``n`` from ``(x, v)``; ``v`` moves into it."""
        o = self.options
        self.rule = Rule(*o.gamma_fraction, o.exact,
                         o.frac_bits or _exact.default_frac_bits(x.dtype))
        self.start, self.state = n, self.rule.inversion(x.dtype, o.depth - n)
        self.state.start(x, self.v)
        self.v = None

    def backward_state(self, n: int, dtype: torch.dtype) -> Inversion:
        """The state at link ``n``'s output, as the backward pass rebuilds it."""
        if self.state is not None:  # the first backward pass: finish the forward's state
            _, _, saved, layout = self.state.finish()
            self.saved, self.state = (saved, layout), None
        if n == self.next - 1:  # a backward pass starts at the chain's last link
            if self.saved is None:
                raise RuntimeError(
                    "momres: backward through a memory-free momentum chain a second time; its "
                    "state was consumed. Use retain_graph=True in the first backward call."
                )
            self.back = self.rule.inversion(dtype, self.options.depth - self.start)
            self.back.resume(*self.saved)
            if not graph_kept():  # resume rebuilds in the saved tensors themselves
                self.saved = None
            self.grad_v = None
        elif n != self.back_next:
            raise RuntimeError(
                f"momres: the backward pass reached layer {n} of a memory-free momentum chain "
                f"that ended at layer {self.next - 1} without passing through the layers "
                "above it: the loss must depend on the output of the last layer run. Use "
                "memory_efficient=False for such a model."
            )
        self.back_next = n - 1
        return self.back


def _continue(spec: LinkSpec, x: torch.Tensor, name: str) -> Chain | None:
    """The chain that link ``spec.index`` continues (``None``: it starts one), or an error.

    The first link always starts a chain (a parent may run its stack twice: two momentum
    stages); every other link must continue the chain on its input, right after its
    predecessor.
    """
    n = spec.index
    if n == 0:
        return None
    link = getattr(x, "_momres_link", None)  # (chain, next link, version), set by a link
    if link is None or link[0].options is not spec.options:
        raise RuntimeError(
            f"momres: layer {n} ({name}) of a momentum stage was called on hidden states "
            f"that are not the output of layer {n - 1}; the parent model changes them between "
            "layers, which the momentum rule, carrying a velocity from layer to layer, cannot "
            "follow. Convert a stack whose parent passes each layer's output to the next (and "
            "does not checkpoint the layers: memory-free layers need no checkpointing)."
        )
    chain, after, version = link
    if x._version != version:
        raise RuntimeError(
            f"momres: the hidden states reaching layer {n} ({name}) were modified in place "
            "after the previous layer; a momentum chain needs them as that layer returned them."
        )
    if not after == chain.next == n or chain.back_next is not None:
        raise RuntimeError(
            f"momres: layer {n} ({name}) of a momentum stage was called on the output of layer "
            f"{after - 1}, after the chain had moved on to layer {chain.next}: a momentum stage "
            "runs its layers in order, each once per pass. Skipping or repeating layers would "
            "compute another function. (A parent that checkpoints its layers calls them again "
            "in the backward pass: turn its checkpointing off, memory-free layers need none.)"
        )
    return chain


def _is_cache(value: object) -> bool:
    """A KV cache object (transformers' ``Cache`` and look-alikes): duck-typed."""
    return hasattr(value, "get_seq_length") and hasattr(value, "update")


class _Inner(nn.Module):
    """The original block, called through its original ``forward`` (not the link, and without
    the block's hooks, which fire once, around the link).

    One per block, made on its first call and kept on it (``_inner``): the graph audit
    (``_recompute``) remembers the audited blocks by this module, so a new one per call would
    audit every step (a graph built in the forward pass and walked in both).
    """

    def __init__(self, block: nn.Module, base: type[nn.Module]) -> None:
        super().__init__()
        self.block, self.base = block, base
        self.rest: tuple = ()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.rest = ()
        y = self.base.forward(self.block, x, *args, **kwargs)
        if isinstance(y, tuple):  # (hidden_states, attentions, ...): the rest passes through
            y, *rest = y
            self.rest = tuple(rest)
        return y


def _inner(block: nn.Module, base: type[nn.Module]) -> _Inner:
    """The block's ``_Inner``, kept in its ``__dict__`` (not a submodule: the module tree, state
    dicts and parameter names are unchanged; ``deepcopy`` copies it with the block)."""
    inner = block.__dict__.get("_momres_inner")
    if inner is None or inner.block is not block or inner.base is not base:
        inner = _Inner(block, base)
        object.__setattr__(block, "_momres_inner", inner)
    return inner


class LinkFunction(torch.autograd.Function):
    """Link ``n``: ``x_n -> x_{n+1}`` memory-free; ``v`` travels in the chain."""

    @staticmethod
    def forward(ctx, chain: Chain, n: int, stage: Stage, x: torch.Tensor,
                *inputs: torch.Tensor) -> torch.Tensor:
        run = Recorder(ctx, stage, inputs[stage.n_params :], x.device)
        if n == chain.start:  # the state starts here: the block sees x on the exact grid
            x = chain.state.position()
        chain.state.advance(n - chain.start, run(0, x))
        run.save(ctx, [])
        ctx.chain, ctx.n, ctx.dtype = chain, n, x.dtype
        ctx.set_materialize_grads(False)
        # A copy: the state goes on changing under the next links.  The exact state's
        # position is one already (its float64 grid in the activations' dtype), the float
        # state's is the state itself.
        x_out = chain.state.position()
        return x_out if chain.rule.exact else x_out.clone()

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        chain, n = ctx.chain, ctx.n
        replay = Replayer(ctx, 4, "to_momentum(..., memory_efficient=False)")
        state = chain.backward_state(n, ctx.dtype)
        # dL/dv_{n+1} comes from the link above through the chain, dL/dv_n goes down to the next.
        # grad_x is autograd's (held by it until this returns): read, not copied.
        a_x, chain.grad_v = backward_step(state, replay, n - chain.start, 0, chain.rule.gamma,
                                          grad_x, chain.grad_v, own_a_x=False)
        if n == chain.start:
            state.verify()
            # The pass is over (v_start came from no graph): free the state now, not when the
            # last reference to this graph (the loss, the outputs) goes away.
            chain.grad_v = chain.back = None
        return (None, None, None, a_x, *replay.input_grads())


def _without_caches(chain: Chain, n: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments with every KV cache replaced by ``None``, for a memory-free link.

    A block that writes a cache in its forward pass would write it again in the recompute, and
    cached keys and values computed without grad could not be differentiated later: as under
    gradient checkpointing, the cache is left unfilled (and marked, so that reusing it is
    refused instead of silently attending to nothing).
    """
    caches = [v for v in (*args, *kwargs.values()) if _is_cache(v)]
    if not caches:
        return args, kwargs
    for cache in caches:
        _refuse_unfilled(chain, cache)
        if cache.get_seq_length() > 0:
            raise RuntimeError(
                "momres: a KV cache with past tokens reached a memory-free momentum stage with "
                "grad enabled; the memory-free backward cannot differentiate through cached "
                "keys and values. Train without a cache, generate under torch.no_grad(), or "
                "convert with memory_efficient=False."
            )
        cache._momres_unfilled = chain.token
    if n == 0:
        warnings.warn(
            "momres: a memory-free momentum stage trains without the KV cache it was given (as "
            "under gradient checkpointing); the cache stays empty. Pass use_cache=False to "
            "silence this.", UserWarning, stacklevel=5,
        )
    args = tuple(None if _is_cache(v) else v for v in args)
    return args, {k: None if _is_cache(v) else v for k, v in kwargs.items()}


def _refuse_unfilled(chain: Chain, cache: object) -> None:
    if getattr(cache, "_momres_unfilled", chain.token) is not chain.token:
        raise RuntimeError(
            "momres: this KV cache was left empty by a memory-free momentum stage trained with "
            "it; using it now would attend to no past tokens. Fill caches under "
            "torch.no_grad() or with memory_efficient=False."
        )


# Under torch.compile each link is a graph break, like a memory-free MomentumNet: the exact
# arithmetic needs eager kernels, and the chain rides on attributes of the hidden states.
@torch.compiler.disable
def _run_link(block: nn.Module, spec: LinkSpec, base: type[nn.Module], x: torch.Tensor,
              args: tuple, kwargs: dict) -> torch.Tensor | tuple:
    """Link ``spec.index`` on ``x``: ``x_{n+1}`` (and whatever else the block returns)."""
    options, n = spec.options, spec.index
    inner = _inner(block, base)
    chain = _continue(spec, x, type(block).__name__)
    if chain is None:
        chain = Chain(options, torch.zeros_like(x))
    chain.next = n + 1
    memory_free = options.memory_efficient and torch.is_grad_enabled()
    if memory_free:
        _refuse_recorded_outputs(n, type(block).__name__)
        args, kwargs = _without_caches(chain, n, args, kwargs)
        stage, params, tensors = build_stage([inner], False, args, kwargs)
        # The memory-free part of the chain starts at the first link that needs a gradient
        # (links below it, frozen, run plainly and hand it their velocity).
        if chain.state is None and (x.requires_grad or params
                                    or any(t.requires_grad for t in tensors)):
            chain.begin(n, x)
        memory_free = chain.state is not None
    else:
        if chain.state is not None:  # v lives in the memory-free state now
            raise RuntimeError(
                f"momres: layer {n} ({type(block).__name__}) runs without grad (or with "
                "memory_efficient switched off) in a pass whose earlier layers ran memory-free; "
                "a chain keeps one mode from its first differentiated layer to its end."
            )
        for value in (*args, *kwargs.values()):
            if _is_cache(value):
                _refuse_unfilled(chain, value)
    if memory_free:
        y = LinkFunction.apply(chain, n, stage, x, *params, *tensors)
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in inner.rest):
            # Computed without grad: a loss on them would get no gradient through them.
            raise RuntimeError(
                f"momres: layer {n} ({type(block).__name__}) returns tensors besides its "
                "hidden states (attention weights, a position bias); memory-free they would carry "
                "no gradient. "
                "Do not ask the layers for them while training (output_attentions=False), or "
                "convert with memory_efficient=False."
            )
    else:
        # The rule itself (no grad, or plain autograd): v carries its own graph, if any.
        y, chain.v = momentum_rule([inner], options.gamma, x, chain.v, args, kwargs, False)
    y._momres_link = (chain, n + 1, y._version)
    return (y, *inner.rest) if inner.rest else y


def _refuse_recorded_outputs(n: int, name: str) -> None:
    """Refuse transformers' recording of outputs from inside the layers (attention weights,
    MoE router logits) in a memory-free pass: computed without grad, a loss on them (an
    auxiliary loss) would get no gradient through them.  Duck-typed: only if transformers is
    imported, through its output collector; the layers' own outputs (hidden states) are
    recorded around the link and keep their gradient."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    recorded = collector.get() if collector is not None else None
    inner = [k for k in recorded or () if k != "hidden_states" and not k.startswith("_")]
    if inner:
        raise RuntimeError(
            f"momres: the model records {', '.join(inner)} from inside layer {n} ({name}) "
            "while training memory-free; those tensors would carry no gradient. Train without "
            "asking for them (output_attentions=False, output_router_logits=False), or "
            "convert with memory_efficient=False."
        )


def _run_plain(block: nn.Module, spec: LinkSpec, base: type[nn.Module], args: tuple,
               kwargs: dict) -> Any:
    """A block left plain at the start of the stack (the first block of a named stage)."""
    forward = base.forward.__get__(block)
    if spec.options.checkpoint and torch.is_grad_enabled():
        return checkpointed(forward, block, *args, **kwargs)
    return forward(*args, **kwargs)


_LINK_CLASSES: dict[type, type] = {}


def link_class(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` with a ``forward`` that runs the block as a link (one class per base)."""
    if base in _LINK_CLASSES:
        return _LINK_CLASSES[base]
    names = list(inspect.signature(base.forward).parameters)
    hidden = names[1] if names[0] == "self" and len(names) > 1 else names[0]

    def forward(self: nn.Module, *args, **kwargs) -> Any:
        spec: LinkSpec = self.momres_link
        if spec.index is None:
            return _run_plain(self, spec, base, args, kwargs)
        if args:
            x, args = args[0], args[1:]
        elif hidden in kwargs:
            x = kwargs.pop(hidden)
        else:
            raise TypeError(f"momres: {base.__name__} was called without its hidden states.")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"momres: {base.__name__} of a momentum stage expects "
                            "floating-point hidden states.")
        return _run_link(self, spec, base, x, args, kwargs)

    # Its own name: pickling a whole converted model fails loudly rather than come back as the
    # plain block class (state dicts are the way to save).
    cls = type(f"Momentum{base.__name__}", (base,), {"__module__": __name__})
    # Set after creation: a base's __init_subclass__ (transformers' gradient checkpointing)
    # may wrap the forward of a new subclass, and the chain must not run inside a checkpoint.
    cls.forward = forward
    _LINK_CLASSES[base] = cls
    return cls


def convert_stack(blocks: nn.ModuleList, gamma: float, plain: int = 0, **options) -> ChainOptions:
    """Turn ``blocks`` into a momentum chain in place: the first ``plain`` stay ordinary blocks
    (checkpointed with ``checkpoint=True``), the others become links."""
    if not 0 <= plain < len(blocks):
        raise ValueError(
            f"momres: a stage of {len(blocks)} blocks with {plain} run plainly leaves no "
            "block to convert."
        )
    if len({id(block) for block in blocks}) < len(blocks):
        # One module object cannot hold two places in a chain.
        raise ValueError(
            "momres: this layer stack holds the same layer object several times (shared "
            "weights); a chain needs one object per place. Run such a stack through "
            "momres.MomentumNet, which accepts repeated blocks."
        )
    chain_options = ChainOptions.make(gamma, len(blocks) - plain, **options)
    for i, block in enumerate(blocks):
        if hasattr(block, "momres_link"):
            raise ValueError("momres: this layer stack is already a momentum stage.")
        index = None if i < plain else i - plain
        block.__class__ = link_class(type(block))
        object.__setattr__(block, "momres_link", LinkSpec(chain_options, index))
    return chain_options
