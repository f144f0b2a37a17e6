"""ECoFLaP stage 1: how much the calibration loss depends on each prunable matrix.

Scores come from the loss of the whole multimodal model, either from forward passes only
(zeroth-order: a central finite difference along a random direction) or from exact
gradients (first-order).

In half precision the finite difference needs three things float32 gives for free: the
loss in float32 (`calibration_loss`), the difference divided by the step the weights
really took (W + eps z and W - eps z are rounded to the weight's dtype), and a step
larger than the rounding noise of a half-precision forward pass (`resolvable_step`).
First-order gradients in float16 are taken under a `LossScale`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

from .anatomy import PrunableLayer
from .data import calibration_loss
from .gradients import LossScale, checkpointed_blocks, consumed_gradients
from .progress import StopCheck, stop_if_asked
from .replay import BlockReplay

# The smallest zeroth-order step per weight dtype. A half-precision forward pass rounds
# every activation, and at the paper's eps = 1e-3 the loss moves by less than that noise:
# the estimate's median error against float32 is about 100% in bfloat16 (shipped model,
# tiny T5, tiny LLaVA) and 14% in float16. A larger step trades the noise for the loss's
# curvature (at 1e-2 even float32's allocation of the shipped model moves by 0.041); at
# these steps every one of those models allocates within float32's seed-to-seed spread.
MIN_STEP = {torch.bfloat16: 5e-3, torch.float16: 2e-3}


def resolvable_step(eps: float, dtype: torch.dtype) -> float:
    """The zeroth-order step for weights of a dtype: eps, or the dtype's smallest step if larger."""
    return max(eps, MIN_STEP.get(dtype, 0.0))


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
        self.seed = seed
        self.generators: dict[int, torch.Generator] = {}

    def draw(self, layer: PrunableLayer) -> torch.Tensor:
        """The next direction of the layer's stream, in float32 whatever the weight's
        dtype, so a model in half precision is moved along the same directions."""
        weight = layer.module.weight
        generator = self.generators.get(layer.index)
        if generator is None:
            stream = (self.seed * self.MIX + layer.index) % 2**32
            generator = torch.Generator(device=weight.device).manual_seed(stream)
            self.generators[layer.index] = generator
        return torch.randn(weight.shape, generator=generator, device=weight.device, dtype=torch.float32)


def directional_derivative(model, weight: torch.Tensor, batch: dict, z: torch.Tensor, eps: float) -> float:
    """The derivative of the loss along z, times |z|, by a central difference of step
    eps z (as applied in the weight's dtype); W is put back bit for bit."""
    return joint_directional_derivative(model, [weight], batch, [z], eps)


@torch.no_grad()
def joint_directional_derivative(model, weights: list[torch.Tensor], batch: dict, zs: list[torch.Tensor],
                                 eps: float) -> float:
    """The same central difference with every W_i moved along its z_i at once; weights
    are put back bit for bit.

    The weights move to W + eps z and W - eps z rounded to their dtype, so the step
    really taken is d = round(W + eps z) - round(W - eps z), not 2 eps z: in bfloat16 a
    step smaller than half a weight's spacing is lost. The loss difference is the
    derivative along d times |d|; scaled to the length of z it is (L+ - L-) |z| / |d|,
    which is (L+ - L-) / (2 eps) wherever nothing was rounded (float32, up to 1e-7).
    """
    originals = [w.detach().clone() for w in weights]

    def moved(sign: float) -> float:
        for w, o, z in zip(weights, originals, zs):
            w.copy_(o.float().add(z, alpha=sign * eps))
        return calibration_loss(model, batch).item()

    try:
        plus = moved(1.0)
        minus = moved(-1.0)
    finally:
        for w, o in zip(weights, originals):
            w.copy_(o)
    step = applied_step(originals, zs, eps)
    if step == 0:
        raise ValueError(f"a step of {eps:g} along the random direction is lost to rounding in "
                         f"{weights[0].dtype}: raise eps")
    length = sum(float(torch.sum(z.float() ** 2)) for z in zs) ** 0.5
    return (plus - minus) * length / step


def applied_step(weights: list[torch.Tensor], zs: list[torch.Tensor], eps: float) -> float:
    """|round(W + eps z) - round(W - eps z)| over all the matrices, rounded to each W's dtype."""
    total = 0.0
    for w, z in zip(weights, zs):
        plus = w.float().add(z, alpha=eps).to(w.dtype).float()
        minus = w.float().add(z, alpha=-eps).to(w.dtype).float()
        total += float(torch.sum((plus - minus) ** 2))
    return total ** 0.5


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

    Weights in half precision are moved by `resolvable_step(eps, dtype)` instead of eps.
    """
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
    step = resolvable_step(eps, weights[0].dtype)
    total = 0.0
    for batch in batches:
        for _ in range(noise_samples):
            zs = [directions.draw(m) for m in members]
            total += abs(joint_directional_derivative(model, weights, batch, zs, step)) / noise_samples
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
    with `checkpoint` each block keeps only its input for the backward pass. In float16
    the loss is scaled (`LossScale`) and a batch whose gradients overflow runs again.
    """
    scores = {layer.name: 0.0 for layer in layers}
    scale = LossScale(layers[0].module.weight.dtype)
    pending: dict[str, float] = {}

    def accumulate(layer, grad):
        g = scale.unscaled(grad)
        value = (g.abs() * layer.module.weight.detach().float().abs()).sum().item()
        pending[layer.name] = pending.get(layer.name, 0.0) + value

    recompute = checkpointed_blocks(model) if checkpoint else contextlib.nullcontext()
    with consumed_gradients(model, layers, accumulate), recompute:
        for b, batch in enumerate(batches):
            stop_if_asked(should_stop)
            while True:
                pending.clear()
                scale.backward(calibration_loss(model, batch))
                if scale.passed():
                    break
            for name, value in pending.items():
                scores[name] += value
            if progress:
                progress("stage 1 (first-order)", b + 1, len(batches))
    return {name: s / len(batches) for name, s in scores.items()}
