"""Debugging switches for memory-free momentum stages; off by default.

    with momres.debug.record_states() as log:
        loss = net(x).sum()
        loss.backward()
    log["forward"][n]   # (x_n, v_n, ...) entering block n in the forward pass
    log["backward"][n]  # the same state as the backward pass rebuilt it

The state is the one the stage's inversion works with: for exact stages the fixed-point
integers ``(x_n, v_n, buffer_n)`` (so forward and rebuilt states are equal bit for bit), for
float stages ``(x_n, v_n)``.  Each entry is a copy: logging costs a copy of the state per block,
and is decided once per stage call, not inside the per-block loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

StateLog = dict[str, dict[int, tuple[torch.Tensor, ...]]]

_state_log: StateLog | None = None


@contextlib.contextmanager
def record_states() -> Iterator[StateLog]:
    """Log the state of every block of every memory-free momentum stage run inside."""
    global _state_log
    log: StateLog = {"forward": {}, "backward": {}}
    outer, _state_log = _state_log, log
    try:
        yield log
    finally:
        _state_log = outer


def state_log() -> StateLog | None:
    """The log being recorded, if any (read once per stage call by the engine)."""
    return _state_log
