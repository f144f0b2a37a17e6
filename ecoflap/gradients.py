"""Gradients of the prunable weights, each consumed the moment it exists.

Scores and histograms need one number (or a small sample) per matrix, never a whole set
of gradients: only the prunable weights require grad, and a post-accumulate hook hands
each gradient over and frees it, so memory stays near inference plus activations.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .anatomy import PrunableLayer


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
