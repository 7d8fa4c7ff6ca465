"""momres: Momentum Residual Networks with exact, memory-free backpropagation."""

from .convert import to_momentum
from .memory import activation_memory
from .momentum import MomentumNet

__all__ = ["MomentumNet", "activation_memory", "to_momentum"]
__version__ = "0.1.0"
