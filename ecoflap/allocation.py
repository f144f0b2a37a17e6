"""Where the sparsity goes: from importance scores to an exact number of zeros per layer.

`allocate_sparsity` turns ECoFLaP's group scores into per-group keep counts that hit the
global keep budget exactly, no group sparser than the cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .anatomy import PrunableLayer, group_key

AGGREGATES = ("sum", "avg")


@dataclass
class LayerBudget:
    """How sparse each layer becomes: a target per layer and, where an allocation fixes
    it, the exact number of zeros (None: stage 2's own rounding, floor(in * s) per row)."""

    sparsity: dict[str, float]
    zeros: dict[str, int | None]
    groups: list[dict] = field(default_factory=list)


def uniform_budget(layers: list[PrunableLayer], sparsity: float) -> LayerBudget:
    """Every layer at the target (Magnitude, Wanda and SparseGPT as published)."""
    return LayerBudget({l.name: sparsity for l in layers}, {l.name: None for l in layers})


def ecoflap_budget(groups: list["Group"], sparsity: float, max_sparsity: float) -> LayerBudget:
    """ECoFLaP: keep counts per group from their scores, split exactly over the group's layers."""
    keep = allocate_sparsity([g.score for g in groups], [g.numel for g in groups], sparsity, max_sparsity)
    budget = LayerBudget({}, {})
    for g, k in zip(groups, keep):
        group_sparsity = 1 - k / g.numel
        for layer, zeros in zip(g.layers, split_count(g.numel - k, [l.numel for l in g.layers])):
            budget.sparsity[layer.name] = group_sparsity
            budget.zeros[layer.name] = zeros
        budget.groups.append({"name": g.name, "numel": g.numel, "score": g.score, "keep": k,
                              "sparsity": group_sparsity, "modality": g.layers[0].modality})
    return budget


@dataclass
class Group:
    """Prunable matrices that share one sparsity."""

    name: str
    layers: list[PrunableLayer]
    score: float

    @property
    def numel(self) -> int:
        return sum(l.numel for l in self.layers)


def group_scores(
    layers: list[PrunableLayer], layer_scores: dict[str, float], granularity: str, aggregate: str = "sum",
    by_group: bool = False,
) -> list[Group]:
    """Groups in forward order with the sum (or per-weight mean) of their matrices' scores
    (`by_group`: the scores are already one per group, from a joint perturbation)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}: use one of {', '.join(AGGREGATES)}")
    groups: dict[str, list[PrunableLayer]] = {}
    for layer in layers:
        groups.setdefault(group_key(layer, granularity), []).append(layer)
    result = []
    for name, members in groups.items():
        score = layer_scores[name] if by_group else sum(layer_scores[l.name] for l in members)
        if aggregate == "avg":
            score /= sum(l.numel for l in members)
        result.append(Group(name, members, score))
    return result


def allocate_sparsity(
    scores: list[float], sizes: list[int], sparsity: float, max_sparsity: float
) -> list[int]:
    """Keep counts per group: exactly floor(N (1 - s)) in all, none sparser than the cap
    (by more than one weight, where the cap equals the target and rounding forces it).

    Every group first keeps ceil(n (1 - s_max)); the rest of the budget goes in
    proportion to the scores (largest remainder, so the total is exact), groups that
    fill up drop out and what they could not take is shared again.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1) (got {sparsity})")
    if not sparsity <= max_sparsity <= 1:
        raise ValueError(
            f"max per-layer sparsity ({max_sparsity}) must be between the target ({sparsity}) and 1"
        )
    if len(scores) != len(sizes) or not sizes:
        raise ValueError("allocate_sparsity needs one score per group and at least one group")
    if any(s < 0 or not math.isfinite(s) for s in scores):
        raise ValueError("group scores must be finite and non-negative")
    total = sum(sizes)
    budget = int(math.floor(total * (1 - sparsity) + 1e-9))
    floors = [int(math.floor(n * (1 - max_sparsity) + 1e-9)) for n in sizes]
    if sum(floors) > budget:
        raise ValueError(
            f"max per-layer sparsity {max_sparsity} cannot reach the target {sparsity}: raise it"
        )
    keep = [min(n, math.ceil(n * (1 - max_sparsity) - 1e-9)) for n in sizes]
    # With the cap at (or within rounding of) the target, the ceilings can overshoot the
    # budget; the groups with the smallest fractional need round down (cap +1 weight).
    excess = sum(keep) - budget
    if excess > 0:
        fractional = [k for k in range(len(sizes)) if keep[k] > floors[k]]
        fractional.sort(key=lambda k: (sizes[k] * (1 - max_sparsity) - floors[k], scores[k]))
        for k in fractional[:excess]:
            keep[k] -= 1
    remaining = budget - sum(keep)
    while remaining > 0:
        active = [k for k in range(len(sizes)) if keep[k] < sizes[k]]
        weights = [scores[k] for k in active]
        if sum(weights) <= 0:
            weights = [sizes[k] - keep[k] for k in active]
        norm = sum(weights)
        shares = [w / norm * remaining for w in weights]
        add = [int(math.floor(s)) for s in shares]
        order = sorted(range(len(active)), key=lambda i: (shares[i] - add[i], weights[i]), reverse=True)
        for i in order[: remaining - sum(add)]:
            add[i] += 1
        for i, k in enumerate(active):
            keep[k] += min(add[i], sizes[k] - keep[k])
        remaining = budget - sum(keep)
    return keep


def split_count(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over parts in proportion to `sizes`, exactly (largest remainder)."""
    whole = sum(sizes)
    shares = [total * n / whole for n in sizes]
    parts = [int(math.floor(x)) for x in shares]
    order = sorted(range(len(sizes)), key=lambda i: shares[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts
