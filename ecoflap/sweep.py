"""Score against sparsity: prune, score, restore, for every method and sparsity."""

from __future__ import annotations

from typing import Callable

from .pipeline import PruneOptions, preset, prune
from .scoring import quick_score
from .weights import WeightStore
from .anatomy import INCLUDE_CHOICES, prunable_layers


def sweep(
    loaded,
    presets: list[str],
    sparsities: list[float],
    options: PruneOptions | None = None,
    calibration=None,
    eval_n: int = 200,
    progress: Callable[[str, int, int], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Rows {method, sparsity, metric, score, achieved_sparsity, seconds}; the model ends unpruned.

    `progress` may raise to stop the sweep; the full weights are restored either way.
    """
    for name in presets:
        preset(name)
    store = WeightStore(prunable_layers(loaded.model, INCLUDE_CHOICES))
    rows = []
    total = len(presets) * len(sparsities)
    try:
        for name in presets:
            for sparsity in sparsities:
                method, opts = preset(name, options)
                if progress:
                    progress(f"sweep: {name} at {sparsity:.2f}", len(rows), total)
                result = prune(loaded, method, sparsity, opts, calibration, progress)
                score = quick_score(loaded, eval_n)
                row = {"method": name, "sparsity": sparsity, "metric": score["metric"], "score": score["value"],
                       "achieved_sparsity": result.achieved_sparsity, "seconds": result.timings["total_s"]}
                rows.append(row)
                if on_row:
                    on_row(row)
                store.restore()
    finally:
        store.restore()
    return rows
