"""``momres.plan``: choose how every momentum stage of a model runs, from measurements.

The peak of a training step is what decides whether it fits.  Traced on the example batch,
one whole training step per strategy (all stages alike: plain autograd, checkpointed per block,
memory-free exact and, if allowed, float; and, with checkpointing allowed, each stage of ``n``
momentum blocks checkpointed in segments of ``StageMeasure.segment`` = ceil(sqrt(n)) blocks) is
cut into phases at marks set by hooks: the forward and the backward of each stage's first
(plain) blocks, of its momentum blocks (block by block under plain autograd or checkpointed),
and of the parts between stages (stem, head, loss).  Each phase is
summed up as ``(peak, delta)``: how far the allocated bytes rise above their level at its start,
and where they end.  A plan picks, per stage, a strategy for its momentum blocks and whether its
plain blocks are checkpointed, and its predicted peak replays the phases in order:

    level = 0; peak = max over phases of (level + phase.peak); level += phase.delta

so stores accumulate stage by stage in the forward pass, and during the backward pass each
stage's working set lands on what is still stored (plus the parameter gradients already made).
A stage that keeps its last ``k`` blocks (``Strategy(mode, keep_last=k)``) is the memory-free
phase followed by those blocks' own phases under plain autograd; checkpointed, it is its trace's
phases up to block ``n - k`` (any block per block; in segments, after whole segments) followed
by the same.  The ordinary modules around
the stages (``convert.find_parts``: a ResNet's stem, its head) are planned per gap between
stages: stored, as the autograd trace ran them, or checkpointed, as the checkpoint trace did.

Time is a model, not a stopwatch, so that the same model, input and budget always give the same
plan: a step costs three forward passes' FLOPs (forward and backward), plus one forward of
every block recomputed (checkpointed or memory-free, whatever the segment), plus the
fixed-point (or float) arithmetic of every memory-free block, counted as ``ARITHMETIC_FLOPS``
per element of the state.  FLOPs are counted by ``torch.utils.flop_counter``; times are
reported relative to a plain-autograd step.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from . import memory
from .convert import (
    FoundPart,
    MomentumStage,
    Part,
    checkpoint_part,
    find_parts,
    momentum_stages,
    part_checkpointed,
)
from .momentum import BLOCK_OBSERVERS, MODES, Strategy

#: Strategies a plan chooses from by default: those whose gradients equal plain autograd's.
EXACT_MODES = ("autograd", "checkpoint", "exact")
#: Cost of a memory-free block's own arithmetic (both passes), in forward FLOPs per element of
#: the state: a dozen float64 passes in exact mode, a few in float mode (measured on CPU at
#: about a third of a 32-channel conv block's forward, and a tenth of that).
ARITHMETIC_FLOPS = {"exact": 400, "float": 40}
#: Above this many combinations, ``keep_last`` is offered in powers of two only.
_MAX_COMBINATIONS = 2_000_000
#: The traced run in which every stage is checkpointed in segments (``StageMeasure.segment``).
SEGMENTS = "checkpoint, segments"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from ``value``: a number, or a string such as ``"6GiB"``, ``"500MB"``, ``"1e9"``."""
    given = value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", value)
        unit = _UNITS.get(match.group(2).lower()) if match else None
        try:
            number = float(match.group(1)) * unit if unit else math.nan
        except ValueError:
            number = math.nan
        if math.isnan(number):
            raise ValueError(f"momres: cannot read the memory budget {value!r}; write a number of "
                             "bytes or one with a unit, such as '6GiB' or '500MB'.")
        value = number
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
            or math.isinf(value):
        raise ValueError(f"momres: a memory budget must be a positive number of bytes, got "
                         f"{given!r}.")
    return int(value)


def format_bytes(n: float) -> str:
    """``n`` bytes in KiB, MiB or GiB, for people."""
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KiB"


@dataclass(frozen=True)
class Phase:
    """A stretch of a traced step: the rise above its starting level, and the net change."""

    peak: int
    delta: int


def _then(phases: Iterable[Phase]) -> Phase:
    """Several phases in a row, as one."""
    peak = level = 0
    for p in phases:
        peak, level = max(peak, level + p.peak), level + p.delta
    return Phase(peak, level)


class _Timeline:
    """A marked allocation trace: the level of allocated bytes after every event, and where
    each mark sits (how many allocation events precede it)."""

    def __init__(self, trace: list[int | str]) -> None:
        self.levels, self.at = [0], {}
        for event in trace:
            if isinstance(event, int):
                self.levels.append(self.levels[-1] + event)
            elif event in self.at:
                raise ValueError(f"momres: plan: the mark {event!r} was reached twice in one "
                                 "step; a stage that runs twice per step cannot be planned.")
            else:
                self.at[event] = len(self.levels) - 1

    def span(self, a: str, b: str) -> Phase:
        """The stretch from mark ``a`` to mark ``b``.  Marks with no allocation between them
        sit at the same place, so the order in which their hooks fired does not matter (the
        gradient of a stage's output is the gradient of the next stage's input)."""
        start, end = self.where(a), self.where(b)
        if end < start:
            raise RuntimeError(f"momres: plan: the step reached {b!r} before {a!r}.")
        return Phase(max(self.levels[start:end + 1]) - self.levels[start],
                     self.levels[end] - self.levels[start])

    def where(self, label: str) -> int:
        """Where mark ``label`` sits.  The gradient of an input that needs none never arrives
        (a first stage fed the data itself): its backward runs to the end of the step."""
        if label not in self.at and label[0] in "MD":
            return self.at["stop"]
        return self.at[label]

    @property
    def peak(self) -> int:
        return max(self.levels)


@dataclass(frozen=True)
class Option:
    """One way to run one stage, and what it costs: memory (its forward and backward, each
    as one phase) and time (extra forward FLOPs beyond a plain step)."""

    strategy: Strategy
    checkpoint: bool  # its plain blocks recomputed
    forward: Phase
    backward: Phase
    extra_flops: float

    def dominates(self, other: Option) -> bool:
        return (self.extra_flops <= other.extra_flops
                and self.forward.peak <= other.forward.peak
                and self.forward.delta <= other.forward.delta
                and self.backward.peak <= other.backward.peak
                and self.forward.delta + self.backward.delta
                <= other.forward.delta + other.backward.delta)


@dataclass(frozen=True)
class GapOption:
    """One way to run what lies before, between or after the stages (``gap`` g: before stage
    g; the last, after the last stage, holds the head, the loss and the head's backward):
    its parts stored or checkpointed, its forward and backward as phases."""

    checkpoint: bool
    forward: Phase
    backward: Phase
    extra_flops: float


def sqrt_segment(blocks: int) -> int:
    """ceil(sqrt(blocks)): the segment the planner checkpoints ``blocks`` momentum blocks in,
    as ``torch.utils.checkpoint_sequential`` over sqrt(n) segments stores about as many states
    as it recomputes blocks at once."""
    return math.isqrt(blocks - 1) + 1


@dataclass
class StageMeasure:
    """What the traces and the FLOP count say about one stage."""

    path: str
    stage: MomentumStage
    plain_flops: float = 0.0
    block_flops: list[float] = field(default_factory=list)
    elements: int = 0  # of the momentum state x

    @property
    def segment(self) -> int:
        """Blocks per segment of the segmented checkpoint the planner traces and offers."""
        return sqrt_segment(len(self.stage.momentum.functions))


@dataclass
class StagePlan:
    """A row of ``Plan``: how a stage runs, what it stores and its working set."""

    path: str
    strategy: Strategy
    checkpoint: bool
    stored: int  # bytes its forward pass leaves allocated
    working: int  # bytes its backward pass rises above what is allocated when it starts
    time: float  # its share of the step, relative to a whole plain-autograd step


@dataclass
class PartPlan:
    """A row of ``Plan`` for the parts that run in one gap between stages (``gap`` g: before
    stage g), stored or checkpointed together."""

    gap: int
    parts: tuple[Part, ...]
    checkpoint: bool
    stored: int
    working: int
    time: float


@dataclass
class Plan:
    """How a model's stages run, chosen by ``momres.plan``, with its predicted peak.

    ``peak``: predicted peak of tensor memory of one training step (forward, loss, backward)
    above what was in use before it; ``plain_peak``: the same under plain autograd (traced);
    ``least_peak``: the least any plan reaches; ``time``: predicted step time relative to plain
    autograd's; ``traced_peak``: this plan's peak traced after it was set (``verify=True``).
    """

    stages: list[StagePlan]
    peak: int
    plain_peak: int
    least_peak: int
    time: float
    budget: int | None = None
    traced_peak: int | None = None
    parts: list[PartPlan] = field(default_factory=list)
    peak_at: str = ""  # the phase where the predicted peak is reached
    stored_at_peak: int = 0  # what is allocated when that phase starts

    def apply(self, model: nn.Module) -> None:
        """Run ``model``'s stages (found by path) and parts as this plan says."""
        stages = momentum_stages(model)
        for row in self.stages:
            stages[row.path].strategy, stages[row.path].checkpoint = row.strategy, row.checkpoint
        for gap in self.parts:
            for part in gap.parts:
                checkpoint_part(model, part, gap.checkpoint)

    def __str__(self) -> str:
        def part_row(gap: PartPlan) -> tuple[str, ...]:
            return (", ".join(map(str, gap.parts)), "checkpoint" if gap.checkpoint else "autograd",
                    "", format_bytes(gap.stored), format_bytes(gap.working), f"{gap.time:.2f}x")

        def stage_row(s: StagePlan) -> tuple[str, ...]:
            return (s.path, str(s.strategy), "checkpoint" if s.checkpoint else "stored",
                    format_bytes(s.stored), format_bytes(s.working), f"{s.time:.2f}x")

        gaps = {g.gap: g for g in self.parts}
        rows = [("stage / part", "strategy", "first blocks", "stored", "working set", "time")]
        for i, s in enumerate(self.stages):
            rows += [part_row(gaps[i])] if i in gaps else []
            rows.append(stage_row(s))
        rows += [part_row(gaps[len(self.stages)])] if len(self.stages) in gaps else []
        widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if k < 3 else c.rjust(w)
                           for k, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        budget = "least peak" if self.budget is None else f"budget {format_bytes(self.budget)}"
        lines += ["", f"{budget}: predicted peak {format_bytes(self.peak)} "
                  f"({self.peak / self.plain_peak:.2f}x plain autograd's "
                  f"{format_bytes(self.plain_peak)}), predicted step time {self.time:.2f}x plain",
                  f"the peak is reached in {self.peak_at}, on {format_bytes(self.stored_at_peak)} "
                  "already allocated (what earlier parts store, and gradients)"]
        if self.traced_peak is not None:
            lines.append(f"traced peak of this plan: {format_bytes(self.traced_peak)} "
                         f"({self.traced_peak / self.plain_peak:.2f}x plain)")
        lines.append("time: a model from counted FLOPs (3 passes per step, +1 per recompute, "
                     "+ the memory-free arithmetic). Parts (modules around the stages) of one "
                     "gap are stored or checkpointed together; after the last stage, their "
                     "stored bytes include the loss and the head's backward.")
        return "\n".join(lines)


def _loss(out) -> torch.Tensor:
    """A scalar from whatever the model returns: the mean square of each floating tensor."""
    leaves = [t for t in pytree.tree_leaves(out)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise ValueError("momres: plan: the model's output has no tensor that requires grad, "
                         "so a training step has nothing to differentiate.")
    return sum(t.float().square().mean() for t in leaves)


class _Marks:
    """Hooks that mark a step's trace at the boundaries of every stage and momentum block."""

    def __init__(self, stages: list[StageMeasure], by_block: bool) -> None:
        self.handles, self.seen = [], set()  # marks are set once: not again in a recompute
        for i, m in enumerate(stages):
            self.handles += [
                m.stage.register_forward_pre_hook(self._hook(f"f{i}", input_grad=f"D{i}")),
                m.stage.momentum.register_forward_pre_hook(self._hook(f"m{i}",
                                                                      input_grad=f"M{i}")),
                m.stage.register_forward_hook(self._output_hook(f"e{i}", f"B{i}")),
            ]
        # Blocks are marked where the rule runs them, without hooks of their own (which would
        # keep them from running as they run unobserved: ``momentum.BLOCK_OBSERVERS``).
        self.blocks = {id(block): self._hook(f"b{i}.{n}", input_grad=f"M{i}.{n}")
                       for i, m in enumerate(stages) if by_block
                       for n, block in enumerate(list(m.stage.momentum.functions)[1:], 1)}
        BLOCK_OBSERVERS.append(self._observe)

    def _observe(self, block: nn.Module, x: torch.Tensor) -> None:
        hook = self.blocks.get(id(block))
        if hook is not None:
            hook(block, (x,))

    def _hook(self, label: str, input_grad: str):
        def hook(module, args):
            if not torch.is_grad_enabled() or label in self.seen:
                return  # a recompute, or a block called under no_grad (marks in the memory-free
                # backward's recompute land after the marks used, and are not read)
            self.seen.add(label)
            memory.mark(label)
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(lambda _: memory.mark(input_grad))
        return hook

    def _output_hook(self, label: str, grad_label: str):
        def hook(module, args, out):
            if not torch.is_grad_enabled() or label in self.seen:
                return
            self.seen.add(label)
            memory.mark(label)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda _: memory.mark(grad_label))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        BLOCK_OBSERVERS.remove(self._observe)


def _configure(model: nn.Module, stages: list[StageMeasure], parts: list[FoundPart],
               strategies: Sequence[Strategy], checkpoint: bool) -> None:
    """Run each stage as its strategy says (one per stage), and the plain blocks and the parts
    stored or checkpointed."""
    for m, strategy in zip(stages, strategies, strict=True):
        m.stage.strategy, m.stage.checkpoint = strategy, checkpoint
    for found in parts:
        checkpoint_part(model, found.part, checkpoint)


def _traced_step(model: nn.Module, inputs: tuple, kwargs: dict, stages: list[StageMeasure],
                 by_block: bool = False) -> tuple[list[int | str], float]:
    """The allocation trace of one training step, marked at every stage boundary, and its
    loss."""
    marks = _Marks(stages, by_block)
    loss = []

    def step() -> None:
        memory.mark("start")
        loss.append(_loss(model(*inputs, **kwargs)))
        loss[0].backward()
        memory.mark("stop")

    try:
        return memory.allocation_trace(step), loss[0].item()
    finally:
        marks.remove()
        for p in model.parameters():
            p.grad = None


def _count_flops(model: nn.Module, inputs: tuple, kwargs: dict,
                 stages: list[StageMeasure]) -> tuple[float, list[FoundPart]]:
    """Forward FLOPs of the whole model; per stage, of its plain blocks and of each momentum
    block (filled in ``stages``); and the model's parts, with theirs."""
    counter = FlopCounterMode(display=False)
    at: dict[str, float] = {}
    handles = []
    for i, m in enumerate(stages):
        m.block_flops = []

        def pre(label: str):
            def hook(*_) -> None:  # a pre-hook's value would replace the arguments
                at.setdefault(label, counter.get_total_flops())
            return hook

        handles += [m.stage.register_forward_pre_hook(pre(f"f{i}")),
                    m.stage.momentum.register_forward_pre_hook(pre(f"m{i}")),
                    m.stage.register_forward_hook(pre(f"e{i}"))]
        blocks = list(m.stage.momentum.functions)
        handles += [b.register_forward_pre_hook(pre(f"b{i}.{n}")) for n, b in enumerate(blocks)]
        handles.append(blocks[0].register_forward_pre_hook(
            lambda module, args, m=m: setattr(m, "elements", args[0].numel())))
    try:
        with torch.no_grad(), counter, find_parts(model, counter.get_total_flops) as parts:
            model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for i, m in enumerate(stages):
        n_blocks = len(m.stage.momentum.functions)
        bounds = [at[f"b{i}.{n}"] for n in range(n_blocks)] + [at[f"e{i}"]]
        m.plain_flops = at[f"m{i}"] - at[f"f{i}"]
        m.block_flops = [b - a for a, b in itertools.pairwise(bounds)]
    return float(counter.get_total_flops()), parts


def _options(i: int, m: StageMeasure, traces: dict[str, _Timeline], modes: Sequence[str],
             dense_keep: bool) -> list[Option]:
    """Every way to run stage ``i`` that no other beats on both time and memory."""
    n_blocks = len(m.stage.momentum.functions)
    auto = traces["autograd"]
    # Under plain autograd, block n runs from its mark to the next block's (the stage's end);
    # its backward from the gradient of its output (block n + 1's input; the stage's output
    # for the last block) to the gradient of its input.
    start = lambda n: f"m{i}" if n == 0 else f"b{i}.{n}"  # noqa: E731
    stop = lambda n: f"e{i}" if n == n_blocks - 1 else f"b{i}.{n + 1}"  # noqa: E731
    grad = lambda n: f"M{i}" if n == 0 else f"M{i}.{n}"  # noqa: E731
    out_grad = lambda n: f"B{i}" if n == n_blocks - 1 else grad(n + 1)  # noqa: E731
    block_forward = lambda n: auto.span(start(n), stop(n))  # noqa: E731
    block_backward = lambda n: auto.span(out_grad(n), grad(n))  # noqa: E731
    plains = [False, True] if m.stage.plain else [False]
    # How many last blocks a strategy that recomputes may store instead: any number, or
    # (checkpointed in segments) the blocks after a whole number of its traced segments.
    any_keep = list(range(n_blocks)) if dense_keep else sorted(
        {0, *(2**j for j in range(n_blocks.bit_length()) if 2**j < n_blocks)})
    runs = []  # (mode, segment, the trace it ran in, the numbers of blocks it may keep)
    for mode in modes:
        if mode == "autograd":
            runs.append((mode, 1, auto, [n_blocks]))
            continue
        runs.append((mode, 1, traces[mode], any_keep))
        if mode == "checkpoint" and m.segment > 1:
            s = m.segment
            runs.append((mode, s, traces[SEGMENTS], sorted({0, *range(n_blocks - s, 0, -s)})))
    options = []
    for (mode, segment, trace, keeps), checkpoint in itertools.product(runs, plains):
        plain = traces["checkpoint" if checkpoint else "autograd"]
        for keep in keeps:
            kept = range(n_blocks - keep, n_blocks)  # blocks under plain autograd
            recomputed = n_blocks - keep
            forward = [plain.span(f"f{i}", f"m{i}")]
            backward = [block_backward(n) for n in reversed(kept)]
            if recomputed and keep and mode != "checkpoint":
                # With blocks kept, the velocity leaving the Function is used and its gradient
                # comes back: its memory-free phases are those of a run that kept one block.
                kept_one = traces[f"{mode}+1"]
                forward.append(kept_one.span(f"m{i}", f"b{i}.{n_blocks - 1}"))
                backward.append(kept_one.span(f"M{i}.{n_blocks - 1}", f"M{i}"))
            elif recomputed and keep:
                # Checkpointed, the blocks kept start where the trace stored (x, v) and went on
                # checkpointing: its phases up to there are those of the recomputed blocks.
                forward.append(trace.span(f"m{i}", f"b{i}.{recomputed}"))
                backward.append(trace.span(f"M{i}.{recomputed}", f"M{i}"))
            elif recomputed:
                forward.append(trace.span(f"m{i}", f"e{i}"))
                backward.append(trace.span(f"B{i}", f"M{i}"))
            forward += [block_forward(n) for n in kept]
            backward.append(plain.span(f"M{i}", f"D{i}"))
            extra = (sum(m.block_flops[:recomputed])
                     + recomputed * m.elements * ARITHMETIC_FLOPS.get(mode, 0)
                     + (m.plain_flops if checkpoint else 0))
            strategy = Strategy(mode, keep if mode != "autograd" else 0, segment)
            options.append(Option(strategy, checkpoint, _then(forward), _then(backward), extra))
    options.sort(key=lambda o: (o.extra_flops, o.forward.peak, o.backward.peak,
                                o.strategy.mode, o.strategy.keep_last, o.strategy.segment,
                                o.checkpoint))
    return [o for k, o in enumerate(options)
            if not any(p.dominates(o) for p in options[:k])]


def _gap(g: int, k: int, trace: _Timeline) -> tuple[Phase, Phase]:
    """Forward and backward of gap ``g`` of ``k`` stages (before stage ``g``; the last, after
    the last stage, is the head, the loss and the head's backward, all in its forward)."""
    forward = trace.span("start" if g == 0 else f"e{g - 1}", f"f{g}" if g < k else f"B{k - 1}")
    backward = Phase(0, 0) if g == k else trace.span(f"D{g}", f"B{g - 1}" if g else "stop")
    return forward, backward


def _gap_options(k: int, parts: list[FoundPart], traces: dict[str, _Timeline]
                 ) -> list[list[GapOption]]:
    """Every gap stored as plain autograd ran it, and, where it holds parts, checkpointed as
    in the checkpoint trace (every part recomputed once more)."""
    options = []
    for g in range(k + 1):
        mine = [p for p in parts if p.gap == g]
        options.append([GapOption(False, *_gap(g, k, traces["autograd"]), 0.0)])
        if mine:
            options[-1].append(GapOption(True, *_gap(g, k, traces["checkpoint"]),
                                         sum(p.flops for p in mine)))
    return options


def _phases(choice: Sequence[Option], gaps: Sequence[GapOption]
            ) -> list[tuple[str, str, int, Phase]]:
    """The phases of a step whose stages run as ``choice`` and the gaps around them as
    ``gaps``, in order, each as ``(direction, "stage" or "gap", its index, phase)``."""
    k = len(choice)
    phases = [("forward", "gap", 0, gaps[0].forward)]
    for i, option in enumerate(choice):
        phases += [("forward", "stage", i, option.forward),
                   ("forward", "gap", i + 1, gaps[i + 1].forward)]
    for i in reversed(range(k)):
        phases += [("backward", "stage", i, choice[i].backward),
                   ("backward", "gap", i, gaps[i].backward)]
    return phases


def _simulate(choice: Sequence[Option], gaps: Sequence[GapOption]) -> int:
    """Predicted peak of a step whose stages run as ``choice`` and the gaps around them as
    ``gaps``."""
    return _then(phase for *_, phase in _phases(choice, gaps)).peak


def _peak_at(choice: Sequence[Option], gaps: Sequence[GapOption], paths: Sequence[str]
             ) -> tuple[str, int]:
    """Where ``_simulate``'s peak is reached, and what is allocated when that phase starts."""
    k = len(choice)

    def label(direction: str, kind: str, i: int) -> str:
        if kind == "stage":
            return f"{paths[i]}'s {direction}"
        where = "the stem" if i == 0 else "the head" if i == k else \
            f"the parts after {paths[i - 1]}"
        last = direction == "forward" and i == k > 0
        return f"{where}'s {direction}" + (", the loss and its backward" if last else "")

    level, best = 0, (-1, "", 0)
    for direction, kind, i, phase in _phases(choice, gaps):
        if level + phase.peak > best[0]:
            best = (level + phase.peak, label(direction, kind, i), level)
        level += phase.delta
    return best[1], best[2]


@contextlib.contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Run training steps on ``model`` and leave no trace: buffers (BatchNorm statistics),
    gradients and the random generators are as they were afterwards; meanwhile every step
    starts without gradients, as after ``zero_grad()``."""
    buffers = [b.clone() for b in model.buffers()]
    grads = [p.grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g


@dataclass
class Measurements:
    """What ``measure`` found: the traces of a step under each strategy, and the FLOPs; each
    ``choose`` sets the model's stages for a budget without measuring again."""

    model: nn.Module
    stages: list[StageMeasure]
    parts: list[FoundPart]
    traces: dict[str, _Timeline]
    modes: tuple[str, ...]
    flops: float  # of one forward pass of the whole model
    _scored: list | None = None

    @property
    def plain_peak(self) -> int:
        return self.traces["autograd"].peak

    def scored(self) -> list[tuple[int, float, int, tuple]]:
        """Every plan worth considering as ``(peak, extra FLOPs, index, options)``, by peak;
        ``options``: one per stage, then one per gap."""
        if self._scored is None:
            k = len(self.stages)
            gaps = _gap_options(k, self.parts, self.traces)
            # (Checkpointing in segments as one more mode.)
            dense = math.prod(len(m.stage.momentum.functions) * (len(self.modes) + 1) * 2
                              for m in self.stages) * math.prod(map(len, gaps)) \
                <= _MAX_COMBINATIONS
            options = [_options(i, m, self.traces, self.modes, dense)
                       for i, m in enumerate(self.stages)]
            self._scored = sorted(
                (_simulate(choice[:k], choice[k:]), sum(o.extra_flops for o in choice), n,
                 choice)
                for n, choice in enumerate(itertools.product(*options, *gaps)))
        return self._scored

    def choose(self, budget: int | float | str | None = None) -> Plan:
        """Set the stages for ``budget`` (``None``: the least peak) and describe the plan."""
        wanted = None if budget is None else parse_bytes(budget)
        scored = self.scored()
        least = scored[0][0]
        if wanted is None:
            peak, extra, _, choice = scored[0]
        else:
            fitting = [s for s in scored if s[0] <= wanted]
            if not fitting:
                raise ValueError(
                    f"momres: plan: the budget {format_bytes(wanted)} is below the least peak "
                    f"any plan reaches on this batch, {format_bytes(least)} ({least} bytes); "
                    "raise the budget or lower the batch size.")
            peak, extra, _, choice = min(fitting, key=lambda s: (s[1], s[0], s[2]))
        step = 3 * self.flops
        k = len(self.stages)
        rows = []
        for m, option in zip(self.stages, choice[:k], strict=True):
            m.stage.strategy, m.stage.checkpoint = option.strategy, option.checkpoint
            own = 3 * (m.plain_flops + sum(m.block_flops))
            rows.append(StagePlan(m.path, option.strategy, option.checkpoint,
                                  option.forward.delta, option.backward.peak,
                                  (own + option.extra_flops) / step))
        gap_rows = []
        for g, option in enumerate(choice[k:]):
            mine = [p for p in self.parts if p.gap == g]
            for found in mine:
                checkpoint_part(self.model, found.part, option.checkpoint)
            if mine:
                own = 3 * sum(p.flops for p in mine)
                gap_rows.append(PartPlan(g, tuple(p.part for p in mine), option.checkpoint,
                                         option.forward.delta,
                                         option.backward.peak if g < k else option.forward.peak,
                                         (own + option.extra_flops) / step))
        where, below = _peak_at(choice[:k], choice[k:], [m.path for m in self.stages])
        return Plan(rows, peak, self.plain_peak, least, (step + extra) / step, wanted,
                    parts=gap_rows, peak_at=where, stored_at_peak=below)


def measure(model: nn.Module, *example_inputs, modes: Sequence[str] = EXACT_MODES,
            **kwargs) -> Measurements:
    """Trace one training step of ``model(*example_inputs, **kwargs)`` under each strategy of
    ``modes`` (and plain autograd and checkpointing, always), count its FLOPs, and leave the
    model as it was (see ``plan``)."""
    modes = tuple(modes)
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"momres: plan: modes must be among {', '.join(MODES)}; got "
                         f"{list(modes)!r}.")
    found = momentum_stages(model)
    if not found:
        raise ValueError(f"momres: plan: {type(model).__name__} has no momentum stage; convert "
                         "it first (momres.to_momentum, or a registry model m<name>).")
    stages = [StageMeasure(path, stage) for path, stage in found.items()]
    before = [(m.stage.strategy, m.stage.checkpoint) for m in stages]
    traces: dict[str, _Timeline] = {}
    losses: dict[str, float] = {}
    parts: list[FoundPart] = []
    parts_before: list[bool] = []
    try:
        with _state_kept(model):
            # (A part found runs the same whether it is checkpointed now or not.)
            flops, parts = _count_flops(model, example_inputs, kwargs, stages)
            parts_before = [part_checkpointed(model, p.part) for p in parts]
            generator = torch.get_rng_state()  # every run draws the same random numbers
            alike = lambda strategy: [strategy] * len(stages)  # noqa: E731
            runs = [(m, alike(Strategy(m)))
                    for m in dict.fromkeys(["autograd", "checkpoint", *modes])]
            runs += [(f"{m}+1", alike(Strategy(m, keep_last=1)))
                     for m in modes if Strategy(m).memory_free]
            if "checkpoint" in modes and any(m.segment > 1 for m in stages):
                runs.append((SEGMENTS, [Strategy("checkpoint", segment=m.segment)
                                        for m in stages]))
            for name, strategies in runs:
                # Parts are checkpointed with the first blocks, in every run but autograd's.
                torch.set_rng_state(generator)
                _configure(model, stages, parts, strategies, checkpoint=name != "autograd")
                # Blocks are marked one by one where some run under autograd, and where they
                # are checkpointed (a plan may store the last ones from any block on).
                by_block = not strategies[0].memory_free or strategies[0].keep_last > 0
                trace, losses[name] = _traced_step(model, example_inputs, kwargs, stages,
                                                   by_block)
                traces[name] = _Timeline(trace)
    finally:
        for m, (strategy, checkpoint) in zip(stages, before, strict=True):
            m.stage.strategy, m.stage.checkpoint = strategy, checkpoint
        for p, on in zip(parts, parts_before, strict=False):
            checkpoint_part(model, p.part, on)
    if parts and not math.isclose(losses["checkpoint"], losses["autograd"], rel_tol=1e-4,
                                  abs_tol=1e-12):
        raise ValueError(
            "momres: plan: with its parts (" + ", ".join(str(p.part) for p in parts) + ") "
            "checkpointed the model computes another loss: its forward uses an intermediate "
            "output of one of them elsewhere. Plan without them: parts=False.")
    order = sorted(range(len(stages)), key=lambda i: traces["autograd"].at[f"f{i}"])
    if order != list(range(len(stages))):
        raise ValueError("momres: plan: the model runs its stages in another order than it "
                         "holds them; such a model cannot be planned yet.")
    return Measurements(model, stages, parts, traces, modes, flops)


def plan(model: nn.Module, *example_inputs, budget: int | float | str | None = None,
         modes: Sequence[str] = EXACT_MODES, verify: bool = True, **kwargs) -> Plan:
    """Measure the model's stages on the example batch and set how each runs, in place.

    ``budget=None``: the plan with the least peak of a training step (forward, loss, backward;
    tensor memory above what was in use before it, parameter gradients included); a budget in
    bytes (or ``"6GiB"``, ``"500MB"``): the fastest plan whose predicted peak fits it.  A budget
    below the least possible peak is an error that names that peak.  ``modes``: the strategies
    to choose from (default: those whose gradients are plain autograd's; add ``"float"`` to
    allow the float inverse).  ``verify``: trace one more step under the chosen plan and report
    its peak (``plan.traced_peak``).  ``kwargs`` reach the model; its output's floating tensors
    give the loss (their mean squares).

    Measuring traces a few training steps on the example batch (CPU), one under plain autograd
    among them, so it needs that much memory; the model's parameters, gradients, buffers
    (BatchNorm statistics) and the random generators are left as they were.
    """
    if budget is not None:
        parse_bytes(budget)  # a bad budget is refused before anything is measured
    measured = measure(model, *example_inputs, modes=modes, **kwargs)
    result = measured.choose(budget)
    if verify:
        trace = lambda: traced_peak(model, *example_inputs, **kwargs)  # noqa: E731
        result.traced_peak = trace()
        if budget is not None:
            result = _fitted(measured, result, parse_bytes(budget), trace)
    return result


def _fitted(measured: Measurements, result: Plan, budget: int, trace: Callable[[], int]
            ) -> Plan:
    """A plan whose traced peak fits ``budget``, from ``result``, whose may not: the
    prediction can miss by a few percent, so the planner aims that much lower and traces
    again (three times at most); a warning says by how much the last plan is over if none
    fits."""
    least = measured.scored()[0][0]
    for _ in range(3):
        over = result.traced_peak - budget
        if over <= 0:
            return result
        aim = max(result.peak - over, least)  # the same error on a plan predicted at aim fits
        if aim >= result.peak:  # no plan is predicted lower
            break
        result = measured.choose(aim)
        result.budget, result.traced_peak = budget, trace()
    if result.traced_peak > budget:
        warnings.warn(
            f"momres: plan: the chosen plan's traced peak {format_bytes(result.traced_peak)} "
            f"is {result.traced_peak / budget - 1:.1%} over the budget {format_bytes(budget)} "
            f"(its predicted peak {format_bytes(result.peak)}); no plan was found whose traced "
            "peak fits. Raise the budget or lower the batch size.", UserWarning, stacklevel=3)
    return result


def traced_peak(model: nn.Module, *inputs, **kwargs) -> int:
    """The traced peak of one training step as ``model`` now runs (its state left as it was)."""
    with _state_kept(model):
        return memory.peak_bytes(lambda: _loss(model(*inputs, **kwargs)).backward(), "cpu")


def traced_peak_over_gradients(model: nn.Module, *inputs, **kwargs) -> int:
    """The traced peak of one training step above the weights *and their gradients*: the
    gradients are allocated (zeros, as ``zero_grad(set_to_none=False)`` leaves them after a
    first step) before the traced step, which accumulates into them.  Issue 12's first table
    measures this way (growth over a step with weights and gradients allocated); ``traced_peak``
    counts the gradients the step allocates.  The model's state is left as it was."""
    with _state_kept(model):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        return memory.peak_bytes(lambda: _loss(model(*inputs, **kwargs)).backward(), "cpu")
