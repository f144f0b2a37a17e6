"""Numbers about a pruned model: per-layer sparsity, and weight/gradient distributions."""

from __future__ import annotations

import numpy as np
import torch

from .anatomy import MODALITIES, PrunableLayer


def layer_table(layers: list[PrunableLayer]) -> list[dict]:
    """Per layer, in forward order: name, modality, stack, block, numel, zeros, sparsity."""
    rows = []
    for l in layers:
        zeros = int((l.module.weight == 0).sum().item())
        rows.append(
            {
                "name": l.name,
                "modality": l.modality,
                "stack": l.stack,
                "block": l.block,
                "numel": l.numel,
                "zeros": zeros,
                "sparsity": zeros / l.numel,
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


def magnitude_histograms(
    tensors_by_modality: dict[str, list[torch.Tensor]], bins: int = 60, skip_zeros: bool = True
) -> dict[str, dict]:
    """Log10-magnitude histograms per modality with shared bin edges.

    Log-spaced bins because weights and gradients span several orders of magnitude.
    """
    values = {}
    for modality, tensors in tensors_by_modality.items():
        flat = np.concatenate([t.detach().float().abs().flatten().cpu().numpy() for t in tensors]) if tensors else np.array([])
        if skip_zeros:
            flat = flat[flat > 0]
        values[modality] = np.log10(flat) if flat.size else flat
    present = [v for v in values.values() if v.size]
    if not present:
        return {}
    lo = min(float(v.min()) for v in present)
    hi = max(float(v.max()) for v in present)
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    result = {}
    for modality, v in values.items():
        counts, _ = np.histogram(v, bins=edges)
        result[modality] = {
            "log10_edges": edges.tolist(),
            "counts": counts.tolist(),
            "total": int(v.size),
        }
    return result


def weight_histograms(layers: list[PrunableLayer], bins: int = 60) -> dict[str, dict]:
    """|W| distribution per modality over the non-zero prunable weights."""
    grouped: dict[str, list[torch.Tensor]] = {}
    for l in layers:
        grouped.setdefault(l.modality, []).append(l.module.weight)
    return magnitude_histograms(grouped, bins)
