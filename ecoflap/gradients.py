"""Gradients of the prunable weights, each consumed the moment it exists.

Scores and histograms need one number (or a small sample) per matrix, never a whole set
of gradients: only the prunable weights require grad, and a post-accumulate hook hands
each gradient over and frees it, so memory stays near inference plus activations.
Activation checkpointing per transformer block then keeps only each block's input for
the backward pass, recomputing the block's inside when its gradients are needed.

In float16 the gradients of a model with a small loss fall below float16's smallest
normal number (6.1e-5), where digits are lost, or to zero; a `LossScale` multiplies the
loss before the backward pass and divides each gradient in float32.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .anatomy import PrunableLayer, transformer_blocks
from .forwards import replaced_forward


class LossScale:
    """Dynamic loss scaling for float16 gradients, as torch.amp's GradScaler, one backward
    pass at a time: the loss is multiplied by `scale`, each gradient is divided by it in
    float32 (`unscaled`), and a gradient with an inf or NaN means the scale was too large:
    `passed()` halves it and says the pass must run again. After `growth_interval` passes
    in a row without overflow the scale doubles. In any other dtype (float32, or bfloat16
    with float32's exponent range), or with `enabled=False`, the scale stays 1.
    """

    SMALLEST = 2.0**-16

    def __init__(self, dtype: torch.dtype, initial: float = 2.0**16, growth_interval: int = 8,
                 enabled: bool | None = None):
        self.enabled = dtype == torch.float16 if enabled is None else enabled
        self.scale = initial if self.enabled else 1.0
        self.growth_interval = growth_interval
        self.overflowed = False
        self.clean_passes = 0

    def backward(self, loss: torch.Tensor):
        if not torch.isfinite(loss):
            raise ValueError(f"the calibration loss is {loss.item()}: the model overflows in its dtype")
        self.overflowed = False
        (loss * self.scale).backward()

    def unscaled(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient in float32, divided by the scale (an inf or NaN marks an overflow)."""
        g = grad.float()
        if self.scale != 1.0:
            g = g / self.scale
        if not torch.isfinite(g).all():
            self.overflowed = True
        return g

    def passed(self) -> bool:
        """Whether the last backward pass was free of overflow; if not, the scale is halved."""
        if self.overflowed:
            if not self.enabled or self.scale <= self.SMALLEST:
                raise ValueError(f"the gradients overflow {self.scale:g} times the loss")
            self.scale /= 2
            self.clean_passes = 0
            return False
        self.clean_passes += 1
        if self.enabled and self.clean_passes % self.growth_interval == 0:
            self.scale *= 2
        return True


@contextlib.contextmanager
def consumed_gradients(model, layers: list[PrunableLayer], consume: Callable[[PrunableLayer, torch.Tensor], None]):
    """Within the block, backward() calls consume(layer, grad) per prunable weight."""
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    handles = []

    def hook_for(layer):
        def hook(p):
            consume(layer, p.grad)
            p.grad = None
        return hook

    try:
        for p in params:
            p.requires_grad_(False)
        for layer in layers:
            layer.module.weight.requires_grad_(True)
            handles.append(layer.module.weight.register_post_accumulate_grad_hook(hook_for(layer)))
        with torch.enable_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
            p.grad = None


@contextlib.contextmanager
def checkpointed_blocks(model):
    """Within the block, every transformer block of the model runs under activation checkpointing.

    Non-reentrant checkpointing in eval mode (no dropout) recomputes exactly the same
    values, so gradients are unchanged; only the memory for activations shrinks.
    """

    def wrap(forward):
        def checkpointed(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpointed

    with contextlib.ExitStack() as swapped:
        for block in transformer_blocks(model):
            swapped.enter_context(replaced_forward(block, wrap(block.forward)))
        yield
