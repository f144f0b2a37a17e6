"""Score against sparsity: for every method and sparsity, prune, score, restore.

Each point is one unit of work on the shared model (see `Workbench.prune`), so other
people's work goes on between points, and a stop takes effect within one block. Methods
whose result depends on the seed (zeroth-order ECoFLaP) are measured once per seed, the
others once.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Sequence

from .methods import get_method
from .options import PruneOptions
from .scoring import quick_score
from .workbench import StopCheck, Workbench

Progress = Callable[[str, int, int], None]
EVAL_SEED = 1234


def sweep(
    workbench: Workbench,
    methods: list[str],
    sparsities: list[float],
    options: PruneOptions | None = None,
    calibration=None,
    eval_n: int = 200,
    progress: Progress | None = None,
    should_stop: StopCheck | None = None,
    on_row: Callable[[dict], None] | None = None,
    seeds: Sequence[int] | None = None,
    owner: object = None,
) -> list[dict]:
    """Rows {method, label, sparsity, seed, metric, score, achieved_sparsity, seconds,
    scoring_seconds, split?};
    `seeds` default to the options' one seed."""
    options = options or PruneOptions()
    seeds = list(seeds) if seeds else [options.seed]
    points = [(get_method(name), s, seed) for name in methods for s in sparsities
              for seed in (seeds if get_method(name).seeded else seeds[:1])]
    rows = []
    for i, (method, sparsity, seed) in enumerate(points):
        step = f"point {i + 1} of {len(points)}: {method.label} @ {sparsity:.2f}"
        if progress:
            progress(step, i, len(points))
        row = measure_point(workbench, method.name, sparsity, replace(options, seed=seed), calibration, eval_n,
                            progress=(lambda what, done, total: progress(f"{step} · {what}", done, total))
                            if progress else None, should_stop=should_stop, owner=owner)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def measure_point(workbench: Workbench, method: str, sparsity: float, options: PruneOptions, calibration=None,
                  eval_n: int = 200, eval_seed: int = EVAL_SEED, progress: Progress | None = None,
                  should_stop: StopCheck | None = None, owner: object = None) -> dict:
    """One prune and its quick score on `eval_n` questions drawn with `eval_seed`, as a row
    (with the vision/language split where the allocation has one): `seconds` is the prune's
    own time, `scoring_seconds` the score's, so the two add up to the point's wall time."""
    method = get_method(method)

    def scored(loaded, _result):
        started = time.perf_counter()
        return quick_score(loaded, eval_n, eval_seed), time.perf_counter() - started

    result, _, (score, scoring_seconds) = workbench.prune(method.name, sparsity, options, calibration,
                                                          progress=progress, should_stop=should_stop, owner=owner,
                                                          then=scored)
    row = {"method": method.name, "label": method.label, "sparsity": sparsity, "seed": options.seed,
           "metric": score["metric"], "score": score["value"], "achieved_sparsity": result.achieved_sparsity,
           "seconds": result.timings["total_s"], "scoring_seconds": scoring_seconds}
    if "split" in result.options:
        row["split"] = result.options["split"]
    return row

