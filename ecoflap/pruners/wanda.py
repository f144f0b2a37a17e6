"""Wanda: score |W_ij| * ||X_j||_2, zero the lowest scores of each output row.

The reference code's ViT path thresholds over the whole matrix; the published rule,
used here everywhere, compares weights within one output row.
"""

from __future__ import annotations

import torch

from .masks import nm_mask, row_mask


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    return weight.abs().float() * sq_norm.sqrt().to(weight.device).unsqueeze(0)


@torch.no_grad()
def prune_wanda(
    weight: torch.Tensor,
    sq_norm: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    count: int | None = None,
) -> torch.Tensor:
    """Zero weights in place given the per-input sum of squares; returns the mask.

    `count`, when given, is the exact number of zeros for the layer (ECoFLaP's budget).
    """
    scores = wanda_scores(weight, sq_norm)
    mask = nm_mask(scores, *nm) if nm else row_mask(scores, sparsity, count)
    weight[mask] = 0
    return mask
