"""Turning per-weight scores into a pruning mask (True = set to zero)."""

from __future__ import annotations

import math

import torch

from ..echo import shown


def parse_nm(text: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): in every M consecutive inputs of a row, N are zeroed."""
    if text in (None, "", "none"):
        return None
    try:
        n_text, m_text = str(text).split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise ValueError(f"N:M must look like 2:4 (got {shown(text)})") from None
    if not (0 < n < m):
        raise ValueError(f"N:M needs 0 < N < M, e.g. 2:4 (got {shown(text)})")
    return n, m


def per_row_count(columns: int, sparsity: float) -> int:
    """How many weights each output row loses: floor(in * s), as Wanda does."""
    return int(math.floor(columns * sparsity + 1e-9))


def row_mask(scores: torch.Tensor, sparsity: float, count: int | None = None) -> torch.Tensor:
    """Zero the floor(in * s) lowest-scoring weights of every output row.

    With `count` (an exact number of zeros for the layer) every row loses
    floor(count / rows), and the rows whose next-lowest score is smallest lose one more.
    """
    rows, columns = scores.shape
    if count is None:
        base, extra = per_row_count(columns, sparsity), 0
    else:
        base, extra = divmod(count, rows)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    k = min(base + (1 if extra else 0), columns)
    if k == 0:
        return mask
    values, idx = torch.topk(scores, k, dim=1, largest=False)
    if extra:
        last = values[:, -1]
        take_extra = torch.zeros(rows, dtype=torch.bool, device=scores.device)
        take_extra[torch.topk(last, extra, largest=False).indices] = True
        keep_cols = torch.arange(k, device=scores.device).unsqueeze(0) < base
        selected = keep_cols | take_extra.unsqueeze(1)
        mask.scatter_(1, idx, selected)
    else:
        mask.scatter_(1, idx, True)
    return mask


def matrix_mask(scores: torch.Tensor, sparsity: float, count: int | None = None) -> torch.Tensor:
    """Zero the `count` (default floor(numel * s)) lowest-scoring weights of the whole matrix."""
    k = int(math.floor(scores.numel() * sparsity + 1e-9)) if count is None else count
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.flatten(), k, largest=False).indices
        mask[idx] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of M consecutive inputs of a row, zero the N lowest scores."""
    rows, columns = scores.shape
    if columns % m:
        raise ValueError(f"N:M with M={m} needs the input width ({columns}) to be a multiple of {m}")
    groups = scores.reshape(rows, columns // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.reshape(rows, columns)
