"""SparseGPT: choose the mask by OBS saliency and update the surviving weights.

Follows the published algorithm: H = 2 X X^T / n with 1% mean-diagonal dampening,
columns in blocks of 128, saliency w^2 / [H^-1]_jj^2 inside each block, and the error of
each pruned column pushed onto the columns not yet processed via the Cholesky factor of
H^-1. The layer's exact count (floor(numel * s), or the allocation's) is split over the
column blocks, cumulative floors in proportion to their live columns, and each block
chooses exactly its share (the reference code thresholds each block at numel * s, which
can take a few more on ties).

Dead inputs (a column whose input is zero on every calibration token, as behind a ReLU
that never fires) cost nothing to prune, so their weights are the first zeros of the
layer's count, smallest first, and N:M groups take them first too; the reference zeroes
them on top of the count, which breaks exact budgets and N:M patterns. Where a layer has
more dead weights than zeros to place, the rest keep their values (no calibration token
ever reads them).

Memory: the Hessian is the largest object (columns^2 floats, 462 MiB for an 11,008-wide
input). It is consumed: scaled, damped on its diagonal, factored and inverted in its own
storage (LAPACK works on its column-major view, so no transposed copy is made).
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def prune_sparsegpt(
    weight: torch.Tensor,
    hessian_sum: torch.Tensor,
    tokens: int,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    count: int | None = None,
) -> torch.Tensor:
    """Prune `weight` in place from the summed X^T X of its inputs; returns the zero mask.

    `hessian_sum` (float32) is overwritten: the caller hands it over. `count` is the exact
    number of zeros for the layer (default floor(numel * s)), dead inputs' weights first,
    the rest spread over the column blocks in proportion to their live columns.
    """
    W = weight if weight.dtype == torch.float32 else weight.float()
    rows, columns = W.shape
    Hinv, dead = _inverse_cholesky(hessian_sum.to(W.device, torch.float32), tokens, percdamp)
    mask = torch.zeros_like(W, dtype=torch.bool)
    if count is None:
        count = int(math.floor(W.numel() * sparsity + 1e-9))
    blocks = [(i1, min(i1 + blocksize, columns)) for i1 in range(0, columns, blocksize)]
    counts = _block_counts(count, W, dead, blocks)
    for (i1, i2), k in zip(blocks, counts):
        width = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag, dead1 = torch.diag(Hinv1), dead[i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None and k > 0:
            saliency = _saliency(W1, diag, dead1).flatten()
            mask1.view(-1)[torch.topk(saliency, k, largest=False).indices] = True
        for i in range(width):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                saliency = _saliency(W1[:, group], diag[group], dead1[group])
                idx = torch.topk(saliency, nm[0], dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
        mask[:, i1:i2] = mask1
    if W is not weight:
        weight.copy_(W.to(weight.dtype))
    return mask


def _inverse_cholesky(H: torch.Tensor, tokens: int, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of (2 H / n + damp I)^-1, computed in H's storage, and
    which inputs are dead.

    A dead input (zero row and column) gets 1 on the diagonal, which decouples it: no
    error flows into or out of its column.
    """
    H.mul_(2.0 / max(tokens, 1))
    diagonal = H.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal.add_(percdamp * torch.mean(diagonal))
    column_major = H.mT  # LAPACK's layout: factoring this view needs no copy of H
    try:
        torch.linalg.cholesky(column_major, out=column_major)
        torch.cholesky_inverse(column_major, out=column_major)
        torch.linalg.cholesky(column_major, upper=True, out=column_major)
    except RuntimeError as err:
        raise RuntimeError(
            "SparseGPT: the layer's input Hessian is not positive definite even after "
            "dampening; use more calibration samples"
        ) from err
    return column_major, dead


def _block_counts(count: int, W: torch.Tensor, dead: torch.Tensor, blocks: list[tuple[int, int]]) -> list[int]:
    """Zeros per column block, `count` in all: every dead weight first, the rest in
    proportion to the live columns (cumulative floors, so exact). Where the count does
    not reach every dead weight, the smallest dead weights of the whole layer."""
    rows = W.shape[0]
    dead_per_block = [int(dead[i1:i2].sum()) * rows for i1, i2 in blocks]
    dead_total = sum(dead_per_block)
    if count <= dead_total:
        chosen = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
        magnitudes = torch.where(dead.reshape(1, -1), W.abs(), torch.inf).flatten()
        chosen.view(-1)[torch.topk(magnitudes, count, largest=False).indices] = True
        return [int(chosen[:, i1:i2].sum()) for i1, i2 in blocks]
    live_per_block = [(i2 - i1) * rows - d for (i1, i2), d in zip(blocks, dead_per_block)]
    return [d + s for d, s in zip(dead_per_block, _split(count - dead_total, live_per_block))]


def _split(count: int, sizes: list[int]) -> list[int]:
    total, done, parts = sum(sizes), 0, []
    for size in sizes:
        parts.append(count * (done + size) // total - count * done // total if total else 0)
        done += size
    return parts


def _saliency(W1: torch.Tensor, diag: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """OBS saliency w^2 / [H^-1]_jj^2; a dead input's weights rank below every live one
    (pruning them changes no calibration output), the smallest first."""
    saliency = W1**2 / diag.reshape(1, -1) ** 2
    if dead.any():
        saliency[:, dead] = -1.0 / (1.0 + W1[:, dead] ** 2)
    return saliency
