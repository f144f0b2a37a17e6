"""Gradients of the prunable weights, each consumed the moment it exists.

Scores and histograms need one number (or a small sample) per matrix, never a whole set
of gradients: only the prunable weights require grad, and a post-accumulate hook hands
each gradient over and frees it, so memory stays near inference plus activations.
Activation checkpointing per transformer block then keeps only each block's input for
the backward pass, recomputing the block's inside when its gradients are needed.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .anatomy import PrunableLayer, transformer_blocks
from .forwards import replaced_forward


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
