"""Half precision against float32: how far ECoFLaP's allocation moves, and how many
float16 gradients are lost.

A random estimator cannot be asked to agree with float32 more closely than float32
agrees with itself under another seed, so an allocation in float16 or bfloat16 is put
beside two float32 allocations of different seeds: the largest difference of a group's
sparsity and the rank correlation of the group scores, half against float32 (same
seed, same directions) and float32 against float32 (two seeds).

First-order scores in float16 lose the gradient entries float16 cannot hold: zero or
subnormal (below 6.1e-5, fewer digits). `gradient_underflow` counts them with and
without the `LossScale`, beside float32's own zeros.

The model is cast in place and put back bit for bit (its floating-point tensors are
kept on the CPU meanwhile), so no second model is ever on the device.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from .anatomy import prunable_layers
from .data import Example, batches, calibration_loss, default_calibration, take
from .gradients import LossScale, consumed_gradients
from .losses import examples_for
from .methods import get_method
from .models import LoadedModel
from .options import PruneOptions
from .pipeline import allocate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def cast(loaded: LoadedModel, dtype: torch.dtype):
    """Within the block, the loaded model with its floating-point parameters and buffers
    in `dtype` (a LoadedModel that says so); afterwards every tensor is the original again,
    dtype and bits."""
    model = loaded.model
    kept = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is not None and tensor.is_floating_point():
                    kept.append((table, key, tensor.data.to("cpu", copy=True)))
    model.to(dtype)
    try:
        yield dataclasses.replace(loaded, dtype=dtype)
    finally:
        with torch.no_grad():
            for table, key, original in kept:
                tensor = table[key]
                tensor.data = original.to(tensor.device)


def group_allocation(loaded: LoadedModel, method: str, sparsity: float, options: PruneOptions,
                     calibration: list[Example]) -> dict[str, tuple[float, float]]:
    """{group: (sparsity, score)} of a method's stage 1 on the loaded model; no weight changes."""
    method = get_method(method)
    options.check(method, sparsity)
    layers = prunable_layers(loaded.model, options.include)
    examples = examples_for(options.loss, calibration, options.seed)
    budget = allocate(loaded, method, layers, sparsity, options, examples, None)
    return {g["name"]: (g["sparsity"], g["score"]) for g in budget.groups}


def allocation_distance(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> dict:
    """The largest difference of a group's sparsity, and the rank correlation of the scores."""
    names = list(a)
    return {"max_sparsity_difference": max(abs(a[n][0] - b[n][0]) for n in names),
            "score_rank_correlation": rank_correlation([a[n][1] for n in names], [b[n][1] for n in names])}


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's correlation (ties share their mean rank)."""
    rx, ry = (torch.tensor(ranks(v), dtype=torch.float64) for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / denominator if denominator else 1.0


def ranks(values) -> list[float]:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    v = [float(x) for x in values]
    return [sum(u < x for u in v) + (sum(u == x for u in v) + 1) / 2 for x in v]


def allocation_drift(
    loaded: LoadedModel,
    dtypes: tuple[str, ...] = ("bfloat16", "float16"),
    method: str = "ecoflap_zeroth",
    sparsity: float = 0.5,
    options: PruneOptions | None = None,
    calibration: list[Example] | None = None,
    seeds: tuple[int, int] = (0, 1),
) -> dict:
    """{"float32_seeds": distance of two float32 seeds, dtype: distance to float32, ...}.

    Each distance is `allocation_distance`; a half precision is as good as float32 where
    its sparsity difference is no larger than float32's between the two seeds.
    """
    options = options or PruneOptions()
    calibration = list(calibration if calibration is not None else default_calibration())
    seeded = [dataclasses.replace(options, seed=s) for s in seeds]
    with cast(loaded, torch.float32) as full:
        reference = [group_allocation(full, method, sparsity, o, calibration) for o in seeded]
    result = {"float32_seeds": allocation_distance(*reference)}
    for name in dtypes:
        with cast(loaded, DTYPES[name]) as half:
            result[name] = allocation_distance(reference[0], group_allocation(half, method, sparsity, seeded[0],
                                                                              calibration))
    return result


def gradient_underflow(loaded: LoadedModel, calibration: list[Example] | None = None, samples: int = 32,
                       batch_size: int = 8, include: tuple[str, ...] | None = None) -> dict:
    """Shares of the prunable weights' gradient entries that are zero or subnormal as the
    dtype holds them: float32; float16 without loss scaling; float16 under a `LossScale`
    (its final scale too). Over `samples` calibration examples, one backward pass per batch."""
    options = PruneOptions() if include is None else PruneOptions(include=include)
    examples = take(list(calibration if calibration is not None else default_calibration()), samples,
                    "gradient underflow")

    def shares(dtype: torch.dtype, scaled: bool) -> dict:
        with cast(loaded, dtype) as model_in_dtype:
            model = model_in_dtype.model
            scale = LossScale(dtype, enabled=scaled)
            counts = {"zero": 0, "subnormal": 0, "entries": 0}
            tally: dict[str, int] = {}

            def count(_layer, grad):
                tiny = torch.finfo(grad.dtype).tiny
                tally["zero"] += int((grad == 0).sum())
                tally["subnormal"] += int(((grad != 0) & (grad.abs() < tiny)).sum())
                tally["entries"] += grad.numel()
                scale.unscaled(grad)

            with consumed_gradients(model, prunable_layers(model, options.include), count):
                for batch in batches(model_in_dtype, examples, batch_size):
                    while True:
                        tally.update(zero=0, subnormal=0, entries=0)
                        scale.backward(calibration_loss(model, batch))
                        if scale.passed():
                            break
                    for key in counts:
                        counts[key] += tally[key]
        return {"zero": counts["zero"] / counts["entries"], "subnormal": counts["subnormal"] / counts["entries"],
                "scale": scale.scale}

    return {"float32": shares(torch.float32, False), "float16_unscaled": shares(torch.float16, False),
            "float16_scaled": shares(torch.float16, True)}
