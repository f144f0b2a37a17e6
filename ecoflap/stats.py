"""Numbers about a pruned model: per-layer sparsity, and weight/gradient distributions."""

from __future__ import annotations

import numpy as np
import torch

from .anatomy import MODALITIES, PrunableLayer
from .data import calibration_loss
from .gradients import LossScale, consumed_gradients
from .offload import is_offloaded, read_weight


def layer_table(layers: list[PrunableLayer]) -> list[dict]:
    """Per layer, in forward order: name, modality, stack, block, numel, columns (the length of
    a row, which stage 2 prunes a whole number of weights from), zeros, sparsity."""
    rows = []
    for layer in layers:
        zeros = int((read_weight(layer.module) == 0).sum().item())
        rows.append(
            {
                "name": layer.name,
                "modality": layer.modality,
                "stack": layer.stack,
                "block": layer.block,
                "numel": layer.numel,
                "columns": layer.module.in_features,
                "zeros": zeros,
                "sparsity": zeros / layer.numel,
            }
        )
    return rows


def achieved_sparsity(table: list[dict]) -> float:
    """Zeros over all prunable weights, measured on the weights."""
    total = sum(r["numel"] for r in table)
    return sum(r["zeros"] for r in table) / total if total else 0.0


def sparsity_by_modality(table: list[dict]) -> dict[str, float]:
    result = {}
    for m in MODALITIES:
        rows = [r for r in table if r["modality"] == m]
        if rows:
            result[m] = sum(r["zeros"] for r in rows) / sum(r["numel"] for r in rows)
    return result


SAMPLE_PER_LAYER = 65_536


def _sample(tensor: torch.Tensor, limit: int = SAMPLE_PER_LAYER) -> np.ndarray:
    """A deterministic, evenly strided sample of a tensor's magnitudes (all of a small one)."""
    flat = tensor.detach().flatten()
    if flat.numel() > limit:
        flat = flat[:: -(-flat.numel() // limit)]
    return flat.float().abs().cpu().numpy()


def magnitude_histograms(samples_by_modality: dict[str, list[np.ndarray]], bins: int = 60) -> dict[str, dict]:
    """Log10-magnitude histograms per modality with shared bin edges; zeros counted apart.

    Log-spaced bins because weights and gradients span several orders of magnitude.
    """
    values, zeros = {}, {}
    for modality, parts in samples_by_modality.items():
        flat = np.concatenate(parts) if parts else np.array([], dtype=np.float32)
        zeros[modality] = int((flat == 0).sum())
        flat = flat[flat > 0]
        values[modality] = np.log10(flat) if flat.size else flat
    present = [v for v in values.values() if v.size]
    if not present:
        return {}
    lo = min(float(v.min()) for v in present)
    hi = max(float(v.max()) for v in present)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    return {
        modality: {
            "log10_edges": edges.tolist(),
            "counts": np.histogram(v, bins=edges)[0].tolist(),
            "nonzero": int(v.size),
            "zeros": zeros[modality],
        }
        for modality, v in values.items()
    }


def weight_histograms(layers: list[PrunableLayer], bins: int = 60) -> dict[str, dict]:
    """|W| distribution per modality (sampled per layer), zeros counted apart."""
    grouped: dict[str, list[np.ndarray]] = {}
    for layer in layers:
        grouped.setdefault(layer.modality, []).append(_sample(read_weight(layer.module)))
    return magnitude_histograms(grouped, bins)


def gradient_histograms(model, layers: list[PrunableLayer], batch: dict, bins: int = 60) -> dict[str, dict]:
    """|dL/dW| distribution per modality for one calibration batch (sampled per layer).

    Each gradient is sampled and freed as soon as it exists (in float16, unscaled from
    a `LossScale`).
    """
    if is_offloaded(model):
        raise ValueError("gradient distributions need every weight on the device at once for the backward pass, "
                         "which offloading avoids; weight distributions are available")
    grouped: dict[str, list[np.ndarray]] = {}
    scale = LossScale(layers[0].module.weight.dtype)
    with consumed_gradients(model, layers, lambda layer, g: grouped.setdefault(layer.modality, []).append(
            _sample(scale.unscaled(g)))):
        while True:
            grouped.clear()
            scale.backward(calibration_loss(model, batch))
            if scale.passed():
                break
    return magnitude_histograms(grouped, bins)
