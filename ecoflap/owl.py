"""OWL, outlier-weighted layer-wise sparsity (Yin et al., ICML 2024): blocks whose Wanda
scores hold more outliers keep more of their weights.

As the reference code (luuyin/OWL) computes it: on the dense model, a block's outlier
ratio is the percentage of its Wanda scores |W_ij| * ||X_j||_2 (all its matrices
together) above M times their mean; the ratios are min-max normalised to a spread of
2 lambda, and more outliers means a lower sparsity. The reference then subtracts the
unweighted mean over blocks, so its overall sparsity misses the target whenever blocks
differ in size (a vision encoder beside a language model). Here one common shift is
solved for instead, weighted by block size, with every block held in
[s - lambda, s + lambda], and the keep counts are rounded so that exactly
floor(N (1 - s)) weights stay.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .allocation import Group, LayerBudget, group_budget, grouped, keep_budget
from .anatomy import PrunableLayer
from .progress import Progress, StopCheck, stop_if_asked
from .pruners.wanda import wanda_scores
from .replay import BlockReplay

DEFAULT_M = 5.0  # the reference README's recipes (its argparse default is 3)
DEFAULT_LAMBDA = 0.08



def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Percentage of the scores strictly above m times the mean of all of them.

    One mean over the whole block (the reference concatenates its matrices' scores), so
    larger matrices weigh more; not an average of per-matrix ratios. A factor shared by
    every score (the reference's 1/nsamples) does not change it.
    """
    numel = sum(s.numel() for s in scores)
    if numel == 0:
        raise ValueError("an outlier ratio needs at least one score")
    threshold = m * sum(torch.sum(s, dtype=torch.float64).item() for s in scores) / numel
    return 100.0 * sum(int(torch.count_nonzero(s > threshold)) for s in scores) / numel


@torch.no_grad()
def dense_outlier_ratios(model, layers: list[PrunableLayer], batches: list[dict], m: float,
                         progress: Progress | None = None, should_stop: StopCheck | None = None) -> dict[str, float]:
    """Each block's outlier ratio, from the dense model's inputs (nothing is pruned while
    they are gathered, as in the reference's first pass). Computed while the block is
    visited, so its scores never outlive it (and an offloaded block is still onloaded)."""
    ratios: dict[str, float] = {}
    for block in BlockReplay(model, batches).blocks(layers, progress):
        stop_if_asked(should_stop)
        stats = block.input_statistics()
        scores = [wanda_scores(layer.module.weight, stats[layer.name].sq_norm) for layer in block.layers]
        ratios[block.layers[0].block_name] = outlier_ratio(scores, m)
    return {g.name: ratios[g.name] for g in grouped(layers, "block")}


def band(sparsity: float, lam: float) -> tuple[float, float]:
    """The sparsities a block may take: [s - lambda, s + lambda] within [0, 1]."""
    return max(0.0, round(sparsity - lam, 10)), min(1.0, round(sparsity + lam, 10))


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities in the band whose size-weighted mean is exactly the target.

    base_l = s + lambda - norm_l, norm_l the ratio min-max normalised to [0, 2 lambda]
    (the reference's order and spread: most outliers at s - lambda, fewest at
    s + lambda); then the one shift c with sum_l n_l clip(base_l + c, band) = N s. That
    sum is continuous, non-decreasing and piecewise linear in c, so c is solved exactly
    on the piece that holds the target. With equal sizes and values inside the band this
    is the reference's formula; a common shift and the clip keep its order.
    """
    _check(ratios, sizes)
    low, high = min(ratios), max(ratios)
    norm = [0.0] * len(ratios) if high == low else [(r - low) / (high - low) * 2 * lam for r in ratios]
    base = [sparsity + lam - x for x in norm]
    lo, hi = band(sparsity, lam)
    shift = _solve_shift(base, sizes, lo, hi, sparsity * sum(sizes))
    return [min(max(b + shift, lo), hi) for b in base]


def owl_keep_counts(ratios: Sequence[float], sizes: Sequence[int], sparsity: float, lam: float) -> list[int]:
    """Weights each block keeps, exactly floor(N (1 - s)) in all: the floor of each real
    count n_l (1 - s_l), and one more for the largest fractional parts (ties: more
    outliers first, then forward order). Each block is within one weight of its real
    count, so inside the band but for one weight where rounding forces it."""
    exact = [n * (1 - s) for n, s in zip(sizes, owl_sparsities(ratios, sizes, sparsity, lam))]
    keep = [min(n, max(0, math.floor(x))) for n, x in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda k: (-(exact[k] - keep[k]), -ratios[k], k))
    missing = keep_budget(sum(sizes), sparsity) - sum(keep)
    while missing:
        step = 1 if missing > 0 else -1
        for k in order if step > 0 else reversed(order):
            if missing and 0 <= keep[k] + step <= sizes[k]:
                keep[k] += step
                missing -= step
    return keep


def owl_budget(groups: list[Group], sparsity: float, lam: float) -> LayerBudget:
    """OWL's keep counts for groups scored by their outlier ratios, split over their layers."""
    ratios, sizes = [g.score for g in groups], [g.numel for g in groups]
    return group_budget(groups, owl_keep_counts(ratios, sizes, sparsity, lam), {"band": list(band(sparsity, lam))})


def _check(ratios, sizes):
    """What the measurement must give; the target and lambda come checked (`PruneOptions.check`)."""
    if len(ratios) != len(sizes) or not sizes:
        raise ValueError("OWL needs one outlier ratio per block and at least one block")
    if not all(math.isfinite(r) for r in ratios) or any(n <= 0 for n in sizes):
        raise ValueError("OWL needs finite outlier ratios and blocks of at least one weight")


def _solve_shift(base: list[float], sizes: Sequence[int], lo: float, hi: float, target: float) -> float:
    """c with sum_l n_l clip(base_l + c, lo, hi) = target, for a target in [N lo, N hi]."""

    def mass(c: float) -> float:
        return sum(n * min(max(b + c, lo), hi) for n, b in zip(sizes, base))

    points = sorted({lo - b for b in base} | {hi - b for b in base})
    if mass(points[0]) >= target:
        return points[0]
    if mass(points[-1]) <= target:
        return points[-1]
    left = points[0]
    for right in points[1:]:
        if mass(right) >= target:
            break
        left = right
    middle = (left + right) / 2
    free = [k for k, b in enumerate(base) if lo < b + middle < hi]
    slope = sum(sizes[k] for k in free)
    if slope == 0:
        return left
    clipped = sum(n * min(max(b + middle, lo), hi) for k, (n, b) in enumerate(zip(sizes, base)) if k not in free)
    shift = (target - clipped - sum(sizes[k] * base[k] for k in free)) / slope
    return min(max(shift, left), right)
