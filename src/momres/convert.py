"""Drop-in conversion of residual networks into Momentum ResNets: ``to_momentum``.

A stage of blocks that keep the shape of ``x`` becomes one momentum stage over the very same
blocks.  Blocks that add their own skip connection (torchvision's ``BasicBlock`` and
``Bottleneck``, transformer layers) enter the rule as ``f(x) = block(x) - x``
(``MomentumNet(..., residual=False)``), so at ``gamma = 0`` the converted model computes the
original function, and the original weights keep their meaning.

The converted stages keep their blocks under their original names, so state dicts load both
ways between a model and its converted twin.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len
from torchvision.models.vision_transformer import Encoder as VitEncoder

from ._chain import ChainOptions, LinkSpec, convert_stack
from ._replay import checkpointed
from .momentum import MomentumNet, Strategy

#: The default runs a stage memory-free from this many momentum blocks on, and checkpoints it
#: per block below: a memory-free stage's backward holds a working set of several activations
#: (the rebuilt state, the gradients, one block's graph), which only a deep enough stage's
#: savings repay, so that the step's peak never rises above plain autograd's.
MEMORY_FREE_FROM = 6


def default_strategy(blocks: int, exact: bool = True) -> Strategy:
    """The strategy ``to_momentum`` gives a stage of ``blocks`` momentum blocks."""
    if blocks >= MEMORY_FREE_FROM:
        return Strategy("exact" if exact else "float")
    return Strategy("checkpoint")


class MomentumStage(nn.Sequential):
    """An ``nn.Sequential`` of blocks, under their original names, run as a momentum stage.

    The first ``plain`` blocks run as ordinary blocks (the first block of a ResNet stage
    changes the shape); the others form ``self.momentum``, a ``MomentumNet(residual=False)``
    over the same module objects.  That net is kept outside the module tree, so parameter
    names (and state dicts) are those of the original ``nn.Sequential``.

    With ``checkpoint=True`` the plain blocks are recomputed in the backward pass
    (``torch.utils.checkpoint``, non-reentrant, BatchNorm statistics updated once) instead of
    storing their activations.  ``strategy`` (``momres.Strategy`` or a mode name; default: as
    ``memory_efficient`` and ``exact``) is how the momentum blocks run: ``stage.strategy``.

    ``stage(x, *args, **kwargs)`` passes ``args``/``kwargs`` to every block.
    """

    def __init__(
        self,
        blocks: Mapping[str, nn.Module],
        gamma: float = 0.9,
        *,
        plain: int = 0,
        memory_efficient: bool = True,
        exact: bool = True,
        checkpoint: bool = False,
        strategy: Strategy | str | None = None,
    ) -> None:
        super().__init__(OrderedDict(blocks))
        if not 0 <= plain < len(self):
            raise ValueError(
                f"momres: a stage of {len(self)} blocks with {plain} run plainly leaves no "
                "block to convert."
            )
        self.plain = plain
        self.checkpoint = checkpoint
        if strategy is not None:
            memory_efficient = Strategy.of(strategy).memory_free
        momentum = MomentumNet(
            list(self._modules.values())[plain:], gamma, residual=False,
            memory_efficient=memory_efficient, exact=exact,
        )
        if strategy is not None:
            momentum.strategy = strategy
        object.__setattr__(self, "momentum", momentum)  # not registered: see the docstring

    @property
    def strategy(self) -> Strategy:
        """How the momentum blocks run (``momres.Strategy``); ``checkpoint`` is how the plain
        blocks do."""
        return self.momentum.strategy

    @strategy.setter
    def strategy(self, value: Strategy | str) -> None:
        self.momentum.strategy = value

    @property
    def gamma(self) -> float:
        return self.momentum.gamma

    def extra_repr(self) -> str:
        return f"plain={self.plain}, checkpoint={self.checkpoint}, {self.momentum.extra_repr()}"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        blocks = list(self._modules.values())
        self._follow(blocks[self.plain :])
        for block in blocks[: self.plain]:
            if self.checkpoint and torch.is_grad_enabled():
                x = checkpointed(block, block, x, *args, **kwargs)
            else:
                x = block(x, *args, **kwargs)
        return self.momentum(x, *args, **kwargs)

    def _follow(self, blocks: list[nn.Module]) -> None:
        """Run the blocks the stage holds now: ``stage[1] = new_block`` (or ``append``,
        ``del``) after conversion replaces the block in the momentum net too."""
        current = list(self.momentum.functions)
        if current != blocks:  # nn.Module compares by identity
            if not blocks:
                raise ValueError("momres: this momentum stage has no block left to run.")
            self.momentum.functions = nn.ModuleList(blocks)


class MomentumTransformerEncoder(nn.Module):
    """``nn.TransformerEncoder`` with its layers as one momentum stage (same parameter names).

    Masks are prepared as in ``nn.TransformerEncoder.forward`` and ``mask``,
    ``src_key_padding_mask`` and ``is_causal`` reach every layer.  The nested-tensor fast path
    is never taken: where torch's encoder would return zeros at padded positions (eval mode,
    no grad, a padding mask), this returns the layers' values there.
    """

    def __init__(self, encoder: nn.TransformerEncoder, gamma: float = 0.9, **options) -> None:
        super().__init__()
        self.layers = MomentumStage(encoder.layers._modules, gamma, **options)
        self.norm = encoder.norm
        self.batch_first = encoder.layers[0].self_attn.batch_first

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(mask), other_name="mask", target_type=src.dtype,
        )
        mask = F._canonical_mask(
            mask=mask, mask_name="mask", other_type=None, other_name="", target_type=src.dtype,
            check_other=False,
        )
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, self.batch_first))
        x = self.layers(
            src, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask
        )
        return x if self.norm is None else self.norm(x)


def _resnet_stages(module: nn.Module, keep_first: bool) -> list[tuple[str, int]]:
    """``layer1``, ``layer2``, ... of a ResNet (torchvision, timm, momres' CIFAR ResNets).

    Duck-typed: consecutive children ``layer<k>`` that are ``nn.Sequential`` of blocks with a
    ``downsample`` attribute.  A first block with a downsample changes the shape, so it stays
    plain even without ``keep_first``.
    """
    found = []
    for k in range(1, len(module._modules) + 1):
        stage = module._modules.get(f"layer{k}")
        if type(stage) is not nn.Sequential or not all(
            hasattr(block, "downsample") for block in stage
        ):
            break
        plain = 1 if keep_first or stage[0].downsample is not None else 0
        if len(stage) > plain:
            found.append((f"layer{k}", plain))
    return found


def _is_layer_stack(module: nn.Module) -> bool:
    """A transformer's layer stack (Hugging Face's ``h``, ``layers``, ``layer``): duck-typed as
    an ``nn.ModuleList`` of at least two blocks of one class defined outside ``torch.nn``, each
    with submodules, and with parameters of the same names and shapes."""
    if type(module) is not nn.ModuleList or len(module) < 2:
        return False
    if len({id(block) for block in module}) < len(module):  # a shared layer, not a stack
        return False
    first = module[0]
    if type(first).__module__.startswith("torch.") or not list(first.children()):
        return False
    shapes = [(name, p.shape) for name, p in first.named_parameters()]
    return bool(shapes) and all(
        type(block) is type(first)
        and [(name, p.shape) for name, p in block.named_parameters()] == shapes
        for block in module
    )


def _stages_of(module: nn.Module, keep_first: bool) -> list[tuple[str, int]]:
    """Stages of ``module`` as ``(path relative to module, number of plain blocks)``."""
    if isinstance(module, nn.TransformerEncoder):
        return [("", 0)]
    if isinstance(module, VitEncoder):
        return [("layers", 0)]
    if _is_layer_stack(module):
        return [("", 0)]
    return _resnet_stages(module, keep_first)


def _find_stages(model: nn.Module, keep_first: bool) -> list[tuple[str, int]]:
    found, claimed = [], []
    for path, module in model.named_modules():
        if any(path == c or path.startswith(c + ".") for c in claimed):
            continue  # inside a model already converted as a whole
        stages = _stages_of(module, keep_first)
        if stages:
            claimed.append(path)
            found.extend((".".join(p for p in (path, sub) if p), plain) for sub, plain in stages)
    return found


def _candidates(model: nn.Module) -> str:
    lines = [
        f"  {path} ({type(m).__name__}, {len(m)} blocks)"
        for path, m in model.named_modules()
        if path and isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) > 1
    ]
    if len(lines) > 20:
        lines = [*lines[:20], f"  ... and {len(lines) - 20} more"]
    return "\n".join(lines) or "  (none: the model has no nn.Sequential or nn.ModuleList)"


def _chain_options(options: dict) -> dict:
    """``to_momentum``'s options for a chain, which runs its links memory-free (exact or float)
    or under autograd: a transformer layer stores far more under autograd than the chain's
    working set, so memory-free is its default whatever its depth."""
    options = dict(options)
    strategy = options.pop("strategy")
    if strategy is not None:
        strategy = Strategy.of(strategy)
        if strategy.mode == "checkpoint" or strategy.keep_last:
            raise ValueError(
                f"momres: strategy {strategy} is not available for a layer stack that its parent "
                "runs (an nn.ModuleList, converted into a chain of per-layer links); use "
                "'exact', 'float' or 'autograd' there."
            )
        options["memory_efficient"] = strategy.memory_free
        options["exact"] = strategy.mode != "float"
    return options


def _convert(module: nn.Module, path: str, gamma: float, plain: int, options: dict) -> nn.Module:
    if isinstance(module, MomentumStage | MomentumTransformerEncoder) or (
        isinstance(module, nn.ModuleList) and any(hasattr(b, "momres_link") for b in module)
    ):
        raise ValueError(f"momres: stage {path!r} is already a momentum stage.")
    if isinstance(module, nn.ModuleList):
        # The parent runs the blocks (loops, slices, per-layer arguments): each block becomes
        # a link of a chain, in place (``_chain``).
        convert_stack(module, gamma, plain, **_chain_options(options))
        return module
    if options["strategy"] is None and options["memory_efficient"] and gamma != 0:
        # (at gamma = 0, memory_efficient=True is refused by MomentumNet, as everywhere)
        blocks = module.layers if isinstance(module, nn.TransformerEncoder) else module
        if isinstance(blocks, nn.Sequential | nn.ModuleList):
            options = {**options, "strategy": default_strategy(len(blocks) - plain,
                                                               options["exact"])}
    if isinstance(module, nn.TransformerEncoder):
        return MomentumTransformerEncoder(module, gamma, plain=plain, **options)
    if isinstance(module, nn.Sequential):
        return MomentumStage(module._modules, gamma, plain=plain, **options)
    raise TypeError(
        f"momres: stage {path!r} is a {type(module).__name__}; a stage must be an "
        "nn.Sequential, an nn.ModuleList or an nn.TransformerEncoder."
    )


def to_momentum(
    model: nn.Module,
    gamma: float = 0.9,
    *,
    memory_efficient: bool = True,
    exact: bool = True,
    stages: Sequence[str] | None = None,
    keep_first: bool = True,
    checkpoint: bool | None = None,
    strategy: Strategy | str | None = None,
) -> nn.Module:
    """A Momentum ResNet twin of ``model``: a deep copy, ``model`` itself is left untouched.

    Stages are found automatically in torchvision ``ResNet``s (also ResNeXt, Wide-ResNet),
    timm ResNets and momres' CIFAR ResNets (``layer1``, ``layer2``, ...), torchvision
    ``VisionTransformer``s (``encoder.layers``), ``nn.TransformerEncoder``s and the layer stacks
    of transformers (an ``nn.ModuleList`` of identical layers: Hugging Face's GPT-2, BERT,
    Llama, ViT, ...), wherever they sit in ``model``.  An ``nn.ModuleList`` stage is run by its
    parent, one block at a time (``momres._chain``): the parent may loop over it, slice it and
    pass each block arguments of its own.  ``stages=["path.to.stage", ...]`` names them
    instead: each an ``nn.Sequential`` or ``nn.ModuleList`` of blocks that keep the shape of
    ``x`` (or an ``nn.TransformerEncoder``).

    Every block is used as a whole block with its own skip connection (``f(x) = block(x) -
    x``): at ``gamma = 0`` (with ``memory_efficient=False``) the converted model computes the
    original function.  Parameter names do not change, so state dicts load both ways.

    Args:
        gamma, memory_efficient, exact: as in ``MomentumNet``.  With ``memory_efficient``
            (and no ``strategy``), each stage runs by ``default_strategy``: memory-free (exact,
            or float with ``exact=False``) from ``MEMORY_FREE_FROM`` momentum blocks on,
            checkpointed per block below, so that the peak of a training step stays at or
            below plain autograd's.  ``momres.plan`` chooses from measurements instead.
        stages: dotted paths of the stages to convert; ``None`` finds them.
        keep_first: run the first block of each ResNet stage, and of each stage named in
            ``stages``, as an ordinary block (in a ResNet it changes the shape, and is kept
            anyway where it does).  Transformer stages found automatically are converted
            whole.
        checkpoint: recompute those ordinary blocks in the backward pass
            (``torch.utils.checkpoint``) rather than store their activations.  Default
            (``None``): as ``memory_efficient``, so that a memory-free conversion stores no
            block's activations; the registry's momentum models follow the same rule.

    ``momres.convert.momentum_stages(converted)`` lists what was converted.
    """
    if stages is None:
        found = _find_stages(model, keep_first)
        if not found:
            raise ValueError(
                f"momres: found no stage to convert in {type(model).__name__}. Name the "
                "nn.Sequential or nn.ModuleList stages of shape-preserving blocks with "
                "to_momentum(model, stages=['path.to.stage', ...]). Candidates:\n"
                + _candidates(model)
            )
    else:
        if isinstance(stages, str):
            raise TypeError("momres: stages must be a list of dotted paths, not one string.")
        found = [(path, 1 if keep_first else 0) for path in stages]
    model = copy.deepcopy(model)
    checkpoint = memory_efficient if checkpoint is None else checkpoint
    options = {"memory_efficient": memory_efficient, "exact": exact, "checkpoint": checkpoint,
               "strategy": strategy}
    for path, plain in found:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"momres: {type(model).__name__} has no submodule {path!r}. Candidates:\n"
                + _candidates(model)
            ) from None
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if name == "layers" else None
        if isinstance(parent, nn.TransformerEncoder):
            # Its forward would hand the layers nested tensors (eval, no grad) and loop over
            # them itself: convert the encoder whole, which runs the layers as one stage.
            path, module = parent_path, parent
        converted = _convert(module, path, gamma, plain, options)
        if not path:
            return converted
        model.set_submodule(path, converted)
    return model


def momentum_chains(model: nn.Module) -> dict[str, ChainOptions]:
    """The converted ``nn.ModuleList`` stages of a model, by dotted path: the options their
    blocks share (``gamma``, ``memory_efficient``, ``exact``, switchable in place)."""
    found = {}
    for path, m in model.named_modules():
        spec = getattr(m, "momres_link", None)
        if isinstance(spec, LinkSpec):
            found.setdefault(path.rpartition(".")[0], spec.options)
    return found


def momentum_stages(model: nn.Module) -> dict[str, MomentumStage]:
    """The momentum stages of a converted model, by dotted path.

    Each shows its options (``stage.gamma``, ``stage.plain``) and holds its ``MomentumNet`` as
    ``stage.momentum``, whose ``memory_efficient`` and ``exact`` may be switched in place.
    """
    return {path: m for path, m in model.named_modules() if isinstance(m, MomentumStage)}


def momentum_blocks(model: nn.Module) -> list[nn.Module]:
    """The distinct blocks of the model's momentum stages (``MomentumNet`` anywhere, converted
    stages), each once however often it is used: what to shard block by block (FSDP2)."""
    nets = [m for m in model.modules() if isinstance(m, MomentumNet)]
    nets += [stage.momentum for stage in momentum_stages(model).values()]
    return list(dict.fromkeys(f for net in nets for f in net.functions))


# Parts: the ordinary modules around the stages (a ResNet's stem and head), stored or
# checkpointed.


@dataclass(frozen=True)
class Part:
    """A run of ordinary modules that a model calls one after the other, each on the previous
    one's output, beside its momentum stages: a ResNet's stem (``conv1, bn1, relu, maxpool``),
    its pooling, a ViT's patch embedding.  ``parent``: the dotted path of the module that
    holds them; ``names``: its children, in the order they run.  ``checkpoint_part`` runs it
    under ``torch.utils.checkpoint`` (its input stored, its activations recomputed in the
    backward pass) instead of storing its activations.  Found by ``find_parts``."""

    parent: str
    names: tuple[str, ...]

    def __str__(self) -> str:
        prefix = f"{self.parent}." if self.parent else ""
        return "+".join(prefix + name for name in self.names)

    def modules(self, model: nn.Module) -> list[nn.Module]:
        parent = model.get_submodule(self.parent)
        return [parent.get_submodule(name) for name in self.names]


class _Relay:
    """What a checkpointed part's first module hands to the modules after it."""

    value: torch.Tensor | None = None


class _PartForward:
    """The forward of a checkpointed part's first module: the whole part, under
    ``torch.utils.checkpoint`` (non-reentrant, generator states preserved, BatchNorm statistics
    updated once) where grad is enabled.  The modules after it return its output
    (``_Handed``), so the model's own forward, which calls them one by one, is unchanged."""

    def __init__(self, modules: list[nn.Module], relay: _Relay) -> None:
        self.modules, self.relay = modules, relay
        self.norms = [m for module in modules for m in module.modules()
                      if isinstance(m, _BatchNorm)]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.modules:
            x = type(module).forward(module, x)
        return x

    def __call__(self, x, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not isinstance(x, torch.Tensor):
            raise TypeError("momres: a checkpointed part takes one tensor; this module was "
                            "called otherwise than when its part was found (find_parts).")
        out = (checkpointed(self._run, None, x, layers=self.norms) if torch.is_grad_enabled()
               else self._run(x))
        self.relay.value = out if len(self.modules) > 1 else None
        return out


class _Handed:
    """The forward of a checkpointed part's later modules: the part's output, handed on."""

    def __init__(self, relay: _Relay, last: bool) -> None:
        self.relay, self.last = relay, last

    def __call__(self, x, *args, **kwargs) -> torch.Tensor:
        if x is not self.relay.value or args or kwargs:
            raise RuntimeError("momres: a module of a checkpointed part was called out of its "
                               "part's order; turn the part's checkpoint off (checkpoint_part).")
        if self.last:
            self.relay.value = None  # hold the output no longer than the model does
        return x


def checkpoint_part(model: nn.Module, part: Part, on: bool = True) -> None:
    """Recompute ``part`` of ``model`` in the backward pass (``on``) or store its activations
    (``on=False``, as it was).  What the model computes does not change."""
    modules = part.modules(model)
    for module in modules:
        module.__dict__.pop("forward", None)
    if on:
        relay = _Relay()
        modules[0].forward = _PartForward(modules, relay)
        for n, module in enumerate(modules[1:], 2):
            module.forward = _Handed(relay, last=n == len(modules))


def part_checkpointed(model: nn.Module, part: Part) -> bool:
    return isinstance(part.modules(model)[0].__dict__.get("forward"), _PartForward)


@dataclass
class FoundPart:
    """A part, where it runs (``gap``: how many stages began before it) and its forward
    FLOPs (as counted by the ``clock`` given to ``find_parts``)."""

    part: Part
    gap: int
    flops: float = 0.0


@dataclass
class _Call:
    parent: str
    name: str
    module: nn.Module
    kind: str = "module"  # or "stage", or "holder" (holds a stage): no part crosses those
    input: torch.Tensor | None = None
    version: int = 0  # of the input, before
    output: torch.Tensor | None = None
    made: int = 0  # the output's version, when made
    modified: bool = True  # the input, in place
    clock: tuple[float, float] = (0.0, 0.0)
    gap: int = 0


@contextlib.contextmanager
def find_parts(model: nn.Module, clock: Callable[[], float] = lambda: 0.0
               ) -> Iterator[list[FoundPart]]:
    """While active, watch the model run (one forward pass); on exit, the list holds its
    parts: the runs of ordinary modules, children of the model or of a module that holds a
    momentum stage, that run once each, one after the other, each on the previous one's output
    alone (the first module's output a new tensor, its input left unmodified).  Where a
    model's forward used such an intermediate output elsewhere, checkpointing the part would
    change what it computes: ``momres.plan`` checks that it does not."""
    stages = momentum_stages(model)
    holders = {""} | {".".join(p.split(".")[:k]) for p in stages
                      for k in range(1, p.count(".") + 1)}
    calls: list[_Call] = []
    handles = []

    def watch(parent: str, name: str, module: nn.Module, kind: str) -> None:
        def pre(_, args, kwargs):
            call = _Call(parent, name, module, kind, clock=(clock(), 0.0))
            single = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
            if kind == "module" and single:
                call.input, call.version = args[0], args[0]._version
            calls.append(call)

        def post(_, args, kwargs, out):
            call = next((c for c in reversed(calls) if c.module is module), None)
            if call is None or call.input is None:
                return
            call.modified = call.input._version != call.version
            call.clock = (call.clock[0], clock())
            if isinstance(out, torch.Tensor):
                call.output, call.made = out, out._version
        handles.extend([module.register_forward_pre_hook(pre, with_kwargs=True),
                        module.register_forward_hook(post, with_kwargs=True)])

    for holder in sorted(holders):
        for name, child in model.get_submodule(holder).named_children():
            path = f"{holder}.{name}" if holder else name
            kind = "stage" if path in stages else "holder" if path in holders else "module"
            watch(holder, name, child, kind)
    found: list[FoundPart] = []
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
    times = Counter(id(c.module) for c in calls)
    runs: list[list[_Call]] = []
    for call in calls:
        usable = call.kind == "module" and call.output is not None and times[id(call.module)] == 1
        previous = runs[-1][-1] if runs and runs[-1] else None
        if usable and previous is not None and previous.parent == call.parent \
                and call.input is previous.output and call.version == previous.made:
            runs[-1].append(call)
        elif usable and not call.modified and call.output is not call.input:
            runs.append([call])
        else:
            runs.append([])
    gap = 0
    for call in calls:
        call.gap = gap
        gap += call.kind == "stage"
    for run in runs:
        if run:
            found.append(FoundPart(Part(run[0].parent, tuple(c.name for c in run)),
                                   run[0].gap, run[-1].clock[1] - run[0].clock[0]))
