"""Score against sparsity: for every method and sparsity, prune, score, restore.

Each point is one unit of work on the shared model (see `Workbench.prune`), so other
people's work goes on between points, and a stop takes effect within one block.
"""

from __future__ import annotations

from typing import Callable

from .methods import get_method
from .options import PruneOptions
from .scoring import quick_score
from .workbench import Workbench

Progress = Callable[[str, int, int], None]


def sweep(
    workbench: Workbench,
    methods: list[str],
    sparsities: list[float],
    options: PruneOptions | None = None,
    calibration=None,
    eval_n: int = 200,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_row: Callable[[dict], None] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Rows {method, label, sparsity, metric, score, achieved_sparsity, seconds}."""
    points = [(get_method(name), s) for name in methods for s in sparsities]
    options = options or PruneOptions()
    if seed != options.seed:
        options = PruneOptions(**{**options.__dict__, "seed": seed})
    rows = []
    for i, (method, sparsity) in enumerate(points):
        step = f"point {i + 1} of {len(points)}: {method.label} @ {sparsity:.2f}"
        if progress:
            progress(step, i, len(points))
        result, _, score = workbench.prune(
            method.name, sparsity, options, calibration,
            progress=(lambda what, done, total: progress(f"{step} · {what}", done, total)) if progress else None,
            should_stop=should_stop, then=lambda loaded, _result: quick_score(loaded, eval_n))
        row = {"method": method.name, "label": method.label, "sparsity": sparsity, "metric": score["metric"],
               "score": score["value"], "achieved_sparsity": result.achieved_sparsity,
               "seconds": result.timings["total_s"]}
        rows.append(row)
        if on_row:
            on_row(row)
    return rows
