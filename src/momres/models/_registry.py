"""The registry behind ``momres.models``: names to constructors, in timm's style."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable

from torch import nn

from ..convert import to_momentum

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, constructor: Callable[..., nn.Module]) -> None:
    """Make ``create_model(name, **kwargs)`` call ``constructor(**kwargs)``."""
    if name in _MODELS:
        raise ValueError(f"momres: a model named {name!r} is already registered.")
    _MODELS[name] = constructor


def _create(
    build: Callable[..., nn.Module],
    momentum: bool,
    *,
    gamma: float = 0.9,
    memory_efficient: bool = True,
    exact: bool = True,
    checkpoint: bool = True,
    **kwargs,
) -> nn.Module:
    # The registry's momentum models are built for the least memory: the first block of each
    # stage, which changes the shape and cannot be inverted, is recomputed in the backward
    # pass too (checkpoint=False stores its activations instead).
    model = build(**kwargs)
    if not momentum:
        return model  # a plain ResNet has no momentum options to apply
    return to_momentum(
        model, gamma, memory_efficient=memory_efficient, exact=exact, checkpoint=checkpoint
    )


def register_pair(name: str, build: Callable[..., nn.Module]) -> None:
    """Register the plain model ``name`` and its momentum twin ``m<name>``.

    ``build(**kwargs)`` makes the plain model; the twin is ``to_momentum`` of it.  Both
    constructors accept ``gamma``, ``memory_efficient``, ``exact`` and ``checkpoint`` (the
    plain one ignores them), so that one call can create any model of the registry.
    """
    register_model(name, functools.partial(_create, build, False))
    register_model(f"m{name}", functools.partial(_create, build, True))


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching the shell-style ``pattern``, sorted with
    numbers in numeric order (``resnet20`` before ``resnet110``)."""
    natural = lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
    return sorted(fnmatch.filter(_MODELS, pattern), key=natural)


def create_model(name: str, **kwargs) -> nn.Module:
    """A new model ``name``, built with ``kwargs``.

    Every model accepts ``num_classes``, ``in_channels`` (3), ``gamma`` (0.9),
    ``memory_efficient`` (True), ``exact`` (True) and ``checkpoint`` (False), the options of
    ``to_momentum``; the ImageNet family also ``stem``.
    """
    if name not in _MODELS:
        raise ValueError(
            f"momres: no model named {name!r}. Registered models: {', '.join(list_models())}."
        )
    return _MODELS[name](**kwargs)
