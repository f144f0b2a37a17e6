"""Magnitude pruning: zero the smallest |W| of each layer. Needs no calibration data."""

from __future__ import annotations

import torch

from .masks import matrix_mask, nm_mask


@torch.no_grad()
def prune_magnitude(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    count: int | None = None) -> torch.Tensor:
    """Zero weights in place (`count` of them, default floor(numel * s)); returns the mask."""
    scores = weight.abs().float()
    mask = nm_mask(scores, *nm) if nm else matrix_mask(scores, sparsity, count)
    weight[mask] = 0
    return mask
