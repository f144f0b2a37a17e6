"""Score against sparsity: for every method and sparsity, prune, score, restore.

Each point is one unit of work on the shared model (see `Workbench.prune`), so other
people's work goes on between points, and a stop takes effect within one layer. Methods
whose result depends on the seed (zeroth-order ECoFLaP) are measured once per seed, the
others once. Every point is also measured against the full model on the same held-out
questions (KL, same top, same answer; accuracy and flips with labels), and any of these
columns can be the curve's y-axis.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Sequence

from .methods import Method, get_method
from .options import PruneOptions
from .progress import Progress, StopCheck, prefixed
from .scoring import SCORE_SEED, held_out_examples, quick_score
from .workbench import Workbench

QUALITY_COLUMNS = ("kl_mean", "kl_median", "kl_p99", "kl_p999", "same_top", "same_answer", "accuracy",
                   "right_to_wrong", "wrong_to_right")
Y_CHOICES = ("score", *QUALITY_COLUMNS)
Y_NAMES = {"kl_mean": "mean KL(full || pruned)", "kl_median": "median KL(full || pruned)",
           "kl_p99": "99th percentile KL(full || pruned)", "kl_p999": "99.9th percentile KL(full || pruned)",
           "same_top": "same top-1 as the full model", "same_answer": "same answer as the full model",
           "accuracy": "accuracy", "right_to_wrong": "answers flipped right to wrong",
           "wrong_to_right": "answers flipped wrong to right"}


def sweep(
    workbench: Workbench,
    methods: list[str | Method],
    sparsities: list[float],
    options: PruneOptions | None = None,
    calibration=None,
    eval_n: int = 200,
    progress: Progress | None = None,
    should_stop: StopCheck | None = None,
    on_row: Callable[[dict], None] | None = None,
    seeds: Sequence[int] | None = None,
    held_out: list | None = None,
    owner: object = None,
) -> list[dict]:
    """Rows {method, label, sparsity, seed, metric, score, achieved_sparsity, seconds,
    wall_seconds, split?, and the quality columns}; `seeds` default to the options' one
    seed; `held_out` to `eval_n` examples drawn with the scoring seed that no calibration
    sample shows."""
    options = options or PruneOptions()
    # the shipped set leaves nothing over: the held-out examples are then the scored questions
    own_questions = held_out is None and not getattr(calibration, "held_out", None)
    if held_out is None:
        held_out = held_out_examples(calibration, eval_n, SCORE_SEED)
    seeds = list(seeds) if seeds else [options.seed]
    methods = [get_method(m) for m in methods]
    points = [(method, s, seed) for method in methods for s in sparsities
              for seed in (seeds if method.seeded else seeds[:1])]
    rows = []
    for i, (method, sparsity, seed) in enumerate(points):
        step = f"point {i + 1} of {len(points)}: {method.label} @ {sparsity:.2f}"
        if progress:
            progress(step, i, len(points))
        row = measure_point(workbench, method, sparsity, replace(options, seed=seed), calibration, eval_n,
                            progress=prefixed(progress, f"{step} · "), should_stop=should_stop, held_out=held_out,
                            score_from_quality=own_questions, owner=owner)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def measure_point(workbench: Workbench, method: str | Method, sparsity: float, options: PruneOptions, calibration=None,
                  eval_n: int = 200, eval_seed: int = SCORE_SEED, progress: Progress | None = None,
                  should_stop: StopCheck | None = None, held_out: list | None = None,
                  score_from_quality: bool = False, owner: object = None) -> dict:
    """One prune and its quick score on `eval_n` questions drawn with `eval_seed`, as a row
    (with the vision/language split where the allocation has one); with `held_out`, also
    the run against the full model on them. `score_from_quality`: the held-out examples
    are those questions, so where the quality has an accuracy it is the score (the
    answers are generated once, not twice). `seconds` is the prune's own time,
    `wall_seconds` the whole point's: the prune, scoring it, and any wait for the shared model."""
    method = get_method(method)

    def score_of(loaded, result):
        quality = result.quality or {}
        if score_from_quality and "accuracy" in quality:
            return {"metric": "accuracy", "value": quality["accuracy"]}
        return quick_score(loaded, eval_n, eval_seed, should_stop=should_stop)

    started = time.perf_counter()
    result, _, score = workbench.prune(method, sparsity, options, calibration, progress=progress,
                                       should_stop=should_stop, owner=owner, then=score_of, held_out=held_out)
    row = {"method": method.name, "label": method.label, "sparsity": sparsity, "seed": options.seed,
           "metric": score["metric"], "score": score["value"], "achieved_sparsity": result.achieved_sparsity,
           "seconds": result.timings["total_s"], "wall_seconds": time.perf_counter() - started}
    if "split" in result.options:
        row["split"] = result.options["split"]
    if result.quality is not None:
        row.update(quality_columns(result.quality))
    return row


def quality_columns(quality: dict) -> dict:
    """A run's quality entry as flat sweep columns."""
    flat = {k: quality[k] for k in QUALITY_COLUMNS if k in quality}
    flat.update(quality.get("flips", {}))
    return flat


def with_y(rows: list[dict], y: str) -> tuple[list[dict], str]:
    """The rows with `y` as their score, and its name for the axis."""
    if y not in Y_CHOICES:
        raise ValueError(f"the y-axis is one of {', '.join(Y_CHOICES)} (got {y!r})")
    if y == "score":
        return rows, rows[0]["metric"] if rows else "score"
    missing = [r for r in rows if y not in r]
    if missing:
        raise ValueError(f"{y} was not measured for this model (accuracy and flips need a model that speaks "
                         f"the shapes world)")
    return [{**r, "score": r[y]} for r in rows], Y_NAMES[y]

