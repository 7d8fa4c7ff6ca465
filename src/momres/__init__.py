"""momres: Momentum Residual Networks with exact, memory-free backpropagation.

The library: ``MomentumNet`` and ``ReversibleStage`` (memory-free stages), ``to_momentum``
(convert a ResNet or transformer in place of its stages), ``Strategy`` and ``plan`` (how each
stage runs: stored, checkpointed or memory-free, chosen for the least peak or a budget),
``momres.models`` (a registry of CIFAR/ImageNet ResNets, their momentum twins and RevNets),
``momres.memory`` (what a step saves and peaks at) and ``momres.debug``.  The ``momres``
command lives in ``momres.cli``, on top.
"""

from . import debug, memory, models
from .convert import to_momentum
from .memory import activation_memory
from .momentum import MomentumNet, Strategy
from .plan import plan
from .reversible import ReversibleStage

__all__ = ["MomentumNet", "ReversibleStage", "Strategy", "activation_memory", "debug", "memory",
           "models", "plan", "to_momentum"]
__version__ = "0.1.0"
