"""momres: Momentum Residual Networks with exact, memory-free backpropagation."""

from .memory import activation_memory
from .momentum import MomentumNet

__all__ = ["MomentumNet", "activation_memory"]
__version__ = "0.1.0"
