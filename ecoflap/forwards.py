"""Temporarily giving a module another forward, without model surgery.

Replay, checkpointing and early stops all run the model through its own `forward`
and only swap what one module computes. An instance-level forward already there
(accelerate's device-map hooks install one) is put back afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Callable

from torch import nn


@contextlib.contextmanager
def replaced_forward(module: nn.Module, forward: Callable, attribute: str = "forward"):
    """Within the block, `module(...)` calls `forward` instead of its own forward
    (`attribute`: the instance attribute to swap, such as accelerate's `_old_forward`)."""
    previous = module.__dict__.get(attribute)
    setattr(module, attribute, forward)
    try:
        yield
    finally:
        if previous is None:
            delattr(module, attribute)
        else:
            setattr(module, attribute, previous)
