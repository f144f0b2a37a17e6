"""ECoFLaP stage 1: how much the calibration loss depends on each prunable matrix.

Scores come from the loss of the whole multimodal model, either from forward passes only
(zeroth-order: a central finite difference along a random direction) or from exact
gradients (first-order).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

from .anatomy import PrunableLayer
from .data import calibration_loss
from .gradients import checkpointed_blocks, consumed_gradients
from .progress import StopCheck, stop_if_asked
from .replay import BlockReplay


class Directions:
    """Random directions z ~ N(0, I), one stream per matrix.

    Each matrix draws from its own generator and its draws for (batch, draw) are
    consecutive numbers of that stream, so no two (matrix, batch, draw) triples of a run
    share a direction, however many there are. A CPU generator keeps only 32 bits of its
    seed, so the stream's seed is (seed * K + matrix index) mod 2^32 with K odd: one to
    one in the matrix for a given seed, and in the seed for a given matrix.
    """

    MIX = 0x9E3779B1

    def __init__(self, seed: int):
        if not 0 <= seed < 2**31:
            raise ValueError(f"the seed must be a whole number in [0, 2^31) (got {seed})")
        self.seed = seed
        self.generators: dict[int, torch.Generator] = {}

    def draw(self, layer: PrunableLayer) -> torch.Tensor:
        weight = layer.module.weight
        generator = self.generators.get(layer.index)
        if generator is None:
            stream = (self.seed * self.MIX + layer.index) % 2**32
            generator = torch.Generator(device=weight.device).manual_seed(stream)
            self.generators[layer.index] = generator
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
    should_stop: StopCheck | None = None,
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
    directions = Directions(seed)
    scores: dict[str, float] = {}
    if replay:
        starts_unit = {members[0].name: name for name, members in units.items()}
        for block in BlockReplay(model, batches).blocks(layers):
            for layer in block.layers:
                if layer.name in starts_unit:
                    stop_if_asked(should_stop)
                    name = starts_unit[layer.name]
                    scores[name] = unit_score(model, units[name], block.batches(), directions, noise_samples, eps)
                    if progress:
                        progress(f"stage 1 (zeroth-order): {name}", len(scores), len(units))
    else:
        for name, members in units.items():
            stop_if_asked(should_stop)
            scores[name] = unit_score(model, members, batches, directions, noise_samples, eps)
            if progress:
                progress(f"stage 1 (zeroth-order): {name}", len(scores), len(units))
    return scores


@torch.no_grad()
def unit_score(model, members: list[PrunableLayer], batches: Iterable[dict], directions: Directions,
               noise_samples: int, eps: float) -> float:
    """Sum over batches of the mean |directional derivative| over `noise_samples` draws,
    the members' matrices moved together (one member: the paper's per-matrix score)."""
    weights = [m.module.weight for m in members]
    total = 0.0
    for batch in batches:
        for _ in range(noise_samples):
            zs = [directions.draw(m) for m in members]
            total += abs(joint_directional_derivative(model, weights, batch, zs, eps)) / noise_samples
    return total


def first_order_scores(
    model,
    layers: list[PrunableLayer],
    batches: list[dict],
    progress: Callable[[str, int, int], None] | None = None,
    checkpoint: bool = True,
    should_stop: StopCheck | None = None,
) -> dict[str, float]:
    """Mean over batches of sum_ij |dL/dW_ij| * |W_ij|, by exact gradients.

    Each gradient is reduced to one number the moment it exists and then freed, and only
    the prunable weights require gradients, so no full set of gradients is ever held;
    with `checkpoint` each block keeps only its input for the backward pass.
    """
    scores = {layer.name: 0.0 for layer in layers}

    def accumulate(layer, grad):
        scores[layer.name] += (grad.float().abs() * layer.module.weight.detach().float().abs()).sum().item()

    recompute = checkpointed_blocks(model) if checkpoint else contextlib.nullcontext()
    with consumed_gradients(model, layers, accumulate), recompute:
        for b, batch in enumerate(batches):
            stop_if_asked(should_stop)
            calibration_loss(model, batch).backward()
            if progress:
                progress("stage 1 (first-order)", b + 1, len(batches))
    return {name: s / len(batches) for name, s in scores.items()}
