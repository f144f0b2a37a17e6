"""Score against sparsity: prune, score, restore, for every method and sparsity."""

from __future__ import annotations

from typing import Callable

from .methods import get_method
from .options import PruneOptions
from .pipeline import prune
from .scoring import quick_score
from .weights import WeightStore


def sweep(
    loaded,
    methods: list[str],
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
    methods = [get_method(name).name for name in methods]
    store = WeightStore.of(loaded.model)
    rows = []
    total = len(methods) * len(sparsities)
    try:
        for name in methods:
            for sparsity in sparsities:
                if progress:
                    progress(f"sweep: {name} at {sparsity:.2f}", len(rows), total)
                result = prune(loaded, name, sparsity, options, calibration, progress)
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
