"""SparseGPT: choose the mask by OBS saliency and update the surviving weights.

Follows the published algorithm: H = 2 X X^T / n with 1% mean-diagonal dampening,
columns in blocks of 128, saliency w^2 / [H^-1]_jj^2 inside each block, and the error of
each pruned column pushed onto the columns not yet processed via the Cholesky factor of
H^-1. Within a block exactly floor(numel * s) weights are chosen (the reference code
thresholds, which can take a few more on ties).
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

    `count` is the exact number of zeros for the layer (default floor(numel * s)); it is
    spread over the column blocks in proportion to their width.
    """
    W = weight.detach().float().clone()
    rows, columns = W.shape
    H = hessian_sum.to(W.device).float() * (2.0 / max(tokens, 1))
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(columns, device=W.device)
    try:
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
    except RuntimeError as err:
        raise RuntimeError(
            "SparseGPT: the layer's input Hessian is not positive definite even after "
            "dampening; use more calibration samples"
        ) from err
    mask = torch.zeros_like(W, dtype=torch.bool)
    if count is None:
        count = int(math.floor(W.numel() * sparsity + 1e-9))
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        width = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = torch.diag(Hinv1).reshape(1, -1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            k = count * i2 // columns - count * i1 // columns
            if k > 0:
                saliency = (W1**2 / diag**2).flatten()
                mask1.view(-1)[torch.topk(saliency, k, largest=False).indices] = True
        for i in range(width):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                saliency = W1[:, i : i + nm[1]] ** 2 / diag[:, i : i + nm[1]] ** 2
                idx = torch.topk(saliency, nm[0], dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        mask[:, i1:i2] = mask1
    weight.copy_(W.to(weight.dtype))
    return mask | dead.unsqueeze(0)
