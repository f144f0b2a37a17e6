"""ECoFLaP stage 1: how important is each group of weights, and how sparse may it be.

Scores come from the calibration loss of the whole multimodal model, either from
forward passes only (zeroth-order: a central finite difference along a random
direction) or from exact gradients (first-order). `allocate_sparsity` turns group scores
into per-group keep counts that hit the global keep budget exactly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .anatomy import PrunableLayer, group_key
from .data import calibration_loss
from .gradients import checkpointed_blocks, consumed_gradients
from .pruners.sequential import SequentialRunner

AGGREGATES = ("sum", "avg")
SCORE_KINDS = ("zeroth", "first")
# Zeroth-order perturbations: one per matrix (the paper's estimator), or one joint
# perturbation of all matrices of a group (fewer forward passes, a different estimate).
PERTURBATIONS = ("matrix", "group")


@dataclass
class Group:
    """Prunable matrices that share one sparsity."""

    name: str
    layers: list[PrunableLayer]
    score: float

    @property
    def numel(self) -> int:
        return sum(l.numel for l in self.layers)


def _noise(weight: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    return torch.randn(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)


def directional_derivative(model, weight: torch.Tensor, batch: dict, z: torch.Tensor, eps: float) -> float:
    """(L(W + eps z) - L(W - eps z)) / (2 eps); W is put back bit for bit."""
    return joint_directional_derivative(model, [weight], batch, [z], eps)


@torch.no_grad()
def joint_directional_derivative(model, weights: list[torch.Tensor], batch: dict, zs: list[torch.Tensor],
                                 eps: float) -> float:
    """The same central difference with every W_i moved along its z_i at once; weights
    are put back bit for bit."""
    originals = [w.detach().clone() for w in weights]

    def restore():
        for w, o in zip(weights, originals):
            w.copy_(o)

    def moved(sign: float) -> float:
        for w, z in zip(weights, zs):
            w.add_(z, alpha=sign * eps)
        return calibration_loss(model, batch).item()

    try:
        plus = moved(1.0)
        restore()
        minus = moved(-1.0)
    finally:
        restore()
    return (plus - minus) / (2 * eps)


def zeroth_order_scores(
    model,
    layers: list[PrunableLayer],
    batches: list[dict],
    eps: float = 1e-3,
    noise_samples: int = 1,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    replay: bool = True,
    group_of: Callable[[PrunableLayer], str] | None = None,
) -> dict[str, float]:
    """Sum over batches of |directional derivative| along fresh Gaussian directions.

    Forward passes only (no autograd graph). With `replay` (the default) each perturbed
    forward pass starts at the perturbed block: everything before it is replayed from
    cached outputs of the unperturbed model, which the perturbation cannot change. The
    estimate is the same as running the whole model (replay=False, as the reference
    code does), up to floating-point rounding.

    Scores are per matrix, each perturbed alone (the paper's estimator). With `group_of`
    the matrices of a group are perturbed together, along the same per-matrix
    directions, and the scores are per group name: one pair of forward passes per group
    instead of per matrix. A group of one matrix gets exactly its per-matrix score.
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive (got {eps})")
    if noise_samples < 1:
        raise ValueError(f"noise samples must be at least 1 (got {noise_samples})")
    units: dict[str, list[PrunableLayer]] = {}
    for layer in layers:
        units.setdefault(group_of(layer) if group_of else layer.name, []).append(layer)
    first_of = {members[0].name: name for name, members in units.items()}
    scores: dict[str, float] = {}

    def score(layer: PrunableLayer, run):
        if layer.name not in first_of:
            return
        name = first_of[layer.name]
        members = units[name]
        weights = [m.module.weight for m in members]
        total = 0.0

        def one_batch(b, batch):
            nonlocal total
            for k in range(noise_samples):
                zs = [_noise(m.module.weight, seed * 1_000_003 + m.index * 10_007 + b * 101 + k) for m in members]
                total += abs(joint_directional_derivative(model, weights, batch, zs, eps)) / noise_samples

        run(one_batch)
        scores[name] = total
        if progress:
            progress(f"stage 1 (zeroth-order): {name}", len(scores), len(units))

    with torch.no_grad():
        if replay:
            runner = SequentialRunner(model, batches)
            runner.walk(layers, lambda stack, b, block_layers, run: [score(l, run) for l in block_layers])
        else:
            for layer in layers:
                score(layer, lambda fn: [fn(b, batch) for b, batch in enumerate(batches)])
    return scores


def first_order_scores(
    model,
    layers: list[PrunableLayer],
    batches: list[dict],
    progress: Callable[[str, int, int], None] | None = None,
    checkpoint: bool = True,
) -> dict[str, float]:
    """Mean over batches of sum_ij |dL/dW_ij| * |W_ij|, by exact gradients.

    Each gradient is reduced to one number the moment it exists and then freed, and only
    the prunable weights require gradients, so no full set of gradients is ever held;
    with `checkpoint` each block keeps only its input for the backward pass.
    """
    scores = {l.name: 0.0 for l in layers}

    def accumulate(layer, grad):
        scores[layer.name] += (grad.float().abs() * layer.module.weight.detach().float().abs()).sum().item()

    recompute = checkpointed_blocks(model) if checkpoint else contextlib.nullcontext()
    with consumed_gradients(model, layers, accumulate), recompute:
        for b, batch in enumerate(batches):
            calibration_loss(model, batch).backward()
            if progress:
                progress("stage 1 (first-order)", b + 1, len(batches))
    return {name: s / len(batches) for name, s in scores.items()}


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
