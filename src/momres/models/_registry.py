"""The registry behind ``momres.models``: names to constructors, in timm's style."""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Callable

from torch import nn

from ..convert import to_momentum
from ..momentum import Strategy

#: The options every momentum model takes beside those of its plain twin (``to_momentum``'s).
MOMENTUM_OPTIONS = ("gamma", "memory_efficient", "exact", "checkpoint", "strategy")

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}


def _keywords(constructor: Callable) -> tuple[str, ...]:
    """The options ``constructor`` takes by keyword."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in inspect.signature(constructor).parameters.values()
                 if p.kind in kinds)


def register_model(name: str, constructor: Callable[..., nn.Module],
                   options: tuple[str, ...] | None = None) -> None:
    """Make ``create_model(name, **kwargs)`` call ``constructor(**kwargs)``.

    ``options`` are the keyword options it accepts (default: those of its signature); any
    other is refused by ``create_model`` with an error naming it.
    """
    if name in _MODELS:
        raise ValueError(f"momres: a model named {name!r} is already registered.")
    _MODELS[name] = constructor
    _OPTIONS[name] = _keywords(constructor) if options is None else options


def register_pair(name: str, build: Callable[..., nn.Module]) -> None:
    """Register the plain model ``name`` and its momentum twin ``m<name>``.

    ``build(**kwargs)`` makes the plain model; the twin is ``to_momentum`` of it and takes
    ``build``'s options plus ``gamma``, ``memory_efficient``, ``exact``, ``checkpoint`` and
    ``strategy``.
    """

    def momentum(*, gamma: float = 0.9, memory_efficient: bool = True, exact: bool = True,
                 checkpoint: bool | None = None, strategy: Strategy | str | None = None,
                 **kwargs) -> nn.Module:
        return to_momentum(build(**kwargs), gamma, memory_efficient=memory_efficient,
                           exact=exact, checkpoint=checkpoint, strategy=strategy)

    register_model(name, build)
    register_model(f"m{name}", momentum, _keywords(build) + MOMENTUM_OPTIONS)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching the shell-style ``pattern``, sorted with
    numbers in numeric order (``resnet20`` before ``resnet110``)."""
    natural = lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
    return sorted(fnmatch.filter(_MODELS, pattern), key=natural)


def model_options(name: str) -> tuple[str, ...]:
    """The keyword options ``create_model(name, ...)`` accepts."""
    _check_name(name)
    return _OPTIONS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """A new model ``name``, built with ``kwargs``.

    Every model accepts ``num_classes`` and ``in_channels`` (3); the ImageNet family also
    ``stem``; momentum models (``m...``) the options of ``to_momentum``: ``gamma`` (0.9),
    ``memory_efficient`` (True), ``exact`` (True), ``strategy`` (default: per stage, see
    ``to_momentum``) and ``checkpoint`` (default: as
    ``memory_efficient``); RevNets ``memory_efficient``.  An option a model does not take is a
    ``TypeError`` (``model_options(name)`` lists those it does).
    """
    _check_name(name)
    unknown = [key for key in kwargs if key not in _OPTIONS[name]]
    if unknown:
        raise TypeError(
            f"momres: model {name!r} takes no option {', '.join(map(repr, unknown))}; its options "
            f"are {', '.join(_OPTIONS[name])}."
            + (f" Momentum options belong to its twin 'm{name}'."
               if f"m{name}" in _MODELS and set(unknown) <= set(MOMENTUM_OPTIONS) else "")
        )
    return _MODELS[name](**kwargs)


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(
            f"momres: no model named {name!r}. Registered models: {', '.join(list_models())}."
        )
