"""Where the sparsity goes: an exact number of zeros for every layer.

Every strategy but `uniform` fixes each layer's number of zeros so that exactly
floor(N (1 - s)) of the N prunable weights stay (stage 2 then removes each count exactly):

- `uniform_budget`: every layer at the target, each rounded by stage 2 as published
  (Wanda floor(in * s) per row; Magnitude and SparseGPT floor(numel * s) per layer);
- `modality_budget`: one sparsity for the vision encoder, the language model at whatever
  completes the budget (does equal sparsity across modalities matter?);
- `global_magnitude_budget`: one |W| threshold over every prunable weight;
- `ecoflap_budget`: ECoFLaP's group scores turned into keep counts, no group sparser
  than the cap (`allocate_sparsity`);
- OWL, in `owl.py`: per-block outlier ratios of the dense model's Wanda scores.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import torch

from .anatomy import PrunableLayer, group_key
from .offload import read_weight
from .progress import StopCheck, stop_if_asked

AGGREGATES = ("sum", "avg")


@dataclass
class LayerBudget:
    """How sparse each layer becomes: a target per layer and, where an allocation fixes
    it, the exact number of zeros (None: stage 2's own rounding of the target, floor(in * s)
    per row for Wanda, floor(numel * s) per layer for Magnitude and SparseGPT).

    `groups` are the allocation's units (blocks, modalities) as report rows; `resolved`
    what it derived from the options (the language sparsity of a per-modality split, the
    global threshold, OWL's band), reported with the options.
    """

    sparsity: dict[str, float]
    zeros: dict[str, int | None]
    groups: list[dict] = field(default_factory=list)
    resolved: dict = field(default_factory=dict)


@dataclass
class Group:
    """Prunable matrices that share one sparsity, and the allocation's score (if it has one)."""

    name: str
    layers: list[PrunableLayer]
    score: float | None = None

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def modality(self) -> str:
        return self.layers[0].modality


def keep_budget(total: int, sparsity: float) -> int:
    """The weights a model keeps at a target sparsity: floor(N (1 - s))."""
    return int(math.floor(total * (1 - sparsity) + 1e-9))


def grouped(layers: list[PrunableLayer], granularity: str) -> list[Group]:
    """The layers' groups at a granularity (layer, block or modality), in forward order."""
    groups: dict[str, list[PrunableLayer]] = {}
    for layer in layers:
        groups.setdefault(group_key(layer, granularity), []).append(layer)
    return [Group(name, members) for name, members in groups.items()]


def group_budget(groups: list[Group], keep: list[int], resolved: dict | None = None) -> LayerBudget:
    """Each group keeps its count, its zeros split exactly over its layers by size."""
    budget = LayerBudget({}, {}, resolved=resolved or {})
    for g, k in zip(groups, keep):
        group_sparsity = 1 - k / g.numel
        for layer, zeros in zip(g.layers, split_count(g.numel - k, [layer.numel for layer in g.layers])):
            budget.sparsity[layer.name] = group_sparsity
            budget.zeros[layer.name] = zeros
        budget.groups.append({"name": g.name, "numel": g.numel, "score": g.score, "keep": k,
                              "sparsity": group_sparsity, "modality": g.modality})
    return budget


def uniform_budget(layers: list[PrunableLayer], sparsity: float) -> LayerBudget:
    """Every layer at the target (Magnitude, Wanda and SparseGPT as published)."""
    return LayerBudget({layer.name: sparsity for layer in layers}, {layer.name: None for layer in layers})


def ecoflap_budget(groups: list[Group], sparsity: float, max_sparsity: float) -> LayerBudget:
    """ECoFLaP: keep counts per group from their scores, split exactly over the group's layers."""
    keep = allocate_sparsity([g.score for g in groups], [g.numel for g in groups], sparsity, max_sparsity)
    return group_budget(groups, keep)


def modality_budget(layers: list[PrunableLayer], sparsity: float, vision_sparsity: float | None) -> LayerBudget:
    """The vision encoder at `vision_sparsity` (default: the target), the Q-Former and the
    projection (when pruned) at the target, and the language model at whatever keeps
    exactly floor(N (1 - s)) weights in all; within a modality every layer alike.

    Refused when the language model would have to be fully pruned or denser than dense.
    """
    groups = grouped(layers, "model")
    by_name = {g.name: g for g in groups}
    if not {"vision", "language"} <= set(by_name):
        raise ValueError("a per-modality split needs both the vision encoder and the language model "
                         "among the pruned modules")
    vision = sparsity if vision_sparsity is None else vision_sparsity
    fixed = {g.name: g.numel - int(math.floor(g.numel * (vision if g.name == "vision" else sparsity) + 1e-9))
             for g in groups if g.name != "language"}
    language = by_name["language"].numel
    kept_language = keep_budget(sum(g.numel for g in groups), sparsity) - sum(fixed.values())
    if not 0 < kept_language <= language:
        rest = kept_language + fixed["vision"]  # what vision and language keep together
        n_vision = by_name["vision"].numel
        low, high = max(0.0, 1 - (rest - 1) / n_vision), 1 - (rest - language) / n_vision
        upper = "below 1" if high >= 1 else f"{math.floor(high * 1000) / 1000:.3f}"
        raise ValueError(
            f"with the vision encoder at sparsity {vision:g} the language model would need "
            f"{1 - kept_language / language:.3f} to reach {sparsity:g} overall, outside [0, 1): choose a vision "
            f"sparsity from {math.ceil(low * 1000) / 1000:.3f} to {upper}")
    keep = [kept_language if g.name == "language" else fixed[g.name] for g in groups]
    split = {g.name: 1 - k / g.numel for g, k in zip(groups, keep) if g.name in ("vision", "language")}
    return group_budget(groups, keep, {"split": split})


def global_magnitude_budget(layers: list[PrunableLayer], sparsity: float,
                            should_stop: StopCheck | None = None) -> LayerBudget:
    """One threshold over every prunable |W|: the N - floor(N (1 - s)) smallest become zero.

    Ties at the threshold are shared out by each layer's number of tied weights, so the
    count is exact and every zeroed |W| is at most every kept |W| across the model.
    Groups are the blocks (no score: the threshold is one number, in `resolved`).
    """
    total = sum(layer.numel for layer in layers)
    zeros = total - keep_budget(total, sparsity)
    threshold = kth_smallest_magnitude(layers, zeros, should_stop) if zeros else None
    if threshold is None:
        per_layer = [0] * len(layers)
    else:
        below = [_count(layer, lambda a: a < threshold) for layer in layers]
        ties = [_count(layer, lambda a: a == threshold) for layer in layers]
        per_layer = [b + t for b, t in zip(below, split_count(zeros - sum(below), ties))]
    zeros_of = {layer.name: z for layer, z in zip(layers, per_layer)}
    budget = LayerBudget({layer.name: zeros_of[layer.name] / layer.numel for layer in layers}, zeros_of,
                         resolved={"threshold": threshold})
    for g in grouped(layers, "block"):
        lost = sum(zeros_of[layer.name] for layer in g.layers)
        budget.groups.append({"name": g.name, "numel": g.numel, "score": None, "keep": g.numel - lost,
                              "sparsity": lost / g.numel, "modality": g.modality})
    return budget


def kth_smallest_magnitude(layers: list[PrunableLayer], k: int, should_stop: StopCheck | None = None) -> float:
    """The k-th smallest |W| over all layers (k >= 1), exactly, holding one layer at a time:
    a bisection over float32 bit patterns, which order like the non-negative values they encode.
    About 31 passes over every layer: `should_stop` is asked before each layer is counted."""
    if not 1 <= k <= sum(layer.numel for layer in layers):
        raise ValueError(f"k must be between 1 and the number of weights (got {k})")
    low, high = 0, 0x7F800000  # 0.0 and +inf
    while low < high:
        middle = (low + high) // 2
        value = _float32(middle)
        at_most = 0
        for layer in layers:
            stop_if_asked(should_stop)
            at_most += _count(layer, lambda a: a <= value)
        if at_most >= k:
            high = middle
        else:
            low = middle + 1
    return _float32(low)


def _float32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


@torch.no_grad()
def _count(layer: PrunableLayer, test) -> int:
    return int(torch.count_nonzero(test(read_weight(layer.module).detach().abs().float())))


def group_scores(
    layers: list[PrunableLayer], layer_scores: dict[str, float], granularity: str, aggregate: str = "sum",
    by_group: bool = False,
) -> list[Group]:
    """Groups in forward order with the sum (or per-weight mean) of their matrices' scores
    (`by_group`: the scores are already one per group, from a joint perturbation)."""
    result = grouped(layers, granularity)
    for g in result:
        g.score = layer_scores[g.name] if by_group else sum(layer_scores[layer.name] for layer in g.layers)
        if aggregate == "avg":
            g.score /= g.numel
    return result


def allocate_sparsity(
    scores: list[float], sizes: list[int], sparsity: float, max_sparsity: float
) -> list[int]:
    """Keep counts per group: exactly floor(N (1 - s)) in all, none sparser than the cap
    (by more than one weight, where the cap equals the target and rounding forces it).

    Every group first keeps ceil(n (1 - s_max)); the rest of the budget goes in
    proportion to the scores (largest remainder, so the total is exact), groups that
    fill up drop out and what they could not take is shared again. The target and the cap
    come checked (`PruneOptions.check`).
    """
    if len(scores) != len(sizes) or not sizes:
        raise ValueError("allocate_sparsity needs one score per group and at least one group")
    if any(s < 0 or not math.isfinite(s) for s in scores):
        raise ValueError("group scores must be finite and non-negative")
    budget = keep_budget(sum(sizes), sparsity)
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
