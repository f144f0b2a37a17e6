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
from .report import SWEEP_COLUMNS
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
KL_SCORE = "mean KL from the full model"  # the score of a model without labels
# what the full model scores against itself: the line every curve of that measure falls from
FULL_MODEL = {"kl_mean": 0.0, "kl_median": 0.0, "kl_p99": 0.0, "kl_p999": 0.0, "same_top": 1.0, "same_answer": 1.0,
              "right_to_wrong": 0, "wrong_to_right": 0}
# the picker's order: the score, then what a reader looks at first
AXIS_ORDER = ("score", "accuracy", *(c for c in QUALITY_COLUMNS if c != "accuracy"))
# the table's columns beside method and sparsity, short enough for a phone's width
TABLE_NAMES = {"accuracy": "accuracy", "kl_mean": "KL mean", "kl_p99": "KL p99", "same_top": "same top-1",
               "same_answer": "same answer", "right_to_wrong": "right→wrong", "wrong_to_right": "wrong→right"}


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
    answers are generated once, not twice); where it has none (a model that does not
    speak the shapes world), the score is the mean KL from the full model. `seconds` is the prune's own time,
    `wall_seconds` the whole point's: the prune, scoring it, and any wait for the shared model."""
    method = get_method(method)

    def score_of(loaded, result):
        quality = result.quality or {}
        if score_from_quality and "accuracy" in quality:
            return {"metric": "accuracy", "value": quality["accuracy"]}
        if quality and "accuracy" not in quality:
            # a model without the shapes world's labels is scored by its distance from the full model,
            # never by a loss on cartoons (and no second pass over other questions is spent on it)
            return {"metric": KL_SCORE, "value": quality["kl_mean"]}
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
    flat = {k: quality[k] for k in (*QUALITY_COLUMNS, "full_accuracy") if k in quality}
    flat.update(quality.get("flips", {}))
    return flat


def measured(rows: list[dict]) -> list[str]:
    """The y columns every row has, in `AXIS_ORDER`; the score only where it is not
    the accuracy column again (the shapes model's score is its held-out accuracy)."""
    present = [y for y in AXIS_ORDER if rows and all(y in r for r in rows)]
    if "score" in present and _score_is(rows) in present:
        present.remove("score")
    return present


def _score_is(rows: list[dict]) -> str | None:
    """The quality column the score repeats (accuracy, or the mean KL of a model without
    labels), if it repeats one."""
    for column, metric in (("accuracy", "accuracy"), ("kl_mean", KL_SCORE)):
        if rows and all(r["metric"] == metric and r.get(column) == r["score"] for r in rows):
            return column
    return None


def y_name(rows: list[dict], y: str) -> str:
    """What column `y` is called on an axis; the score by its metric, marked as the quick
    score where the sweep also has an accuracy of its own (on other questions)."""
    if y != "score":
        return Y_NAMES[y]
    metric = rows[0]["metric"] if rows else "score"
    return f"{metric} (quick score)" if "accuracy" in measured(rows) else metric


def y_choices(rows: list[dict]) -> list[tuple[str, str]]:
    """(name, column) of every y-axis this sweep can be drawn with."""
    return [(y_name(rows, y), y) for y in measured(rows)]


def default_y(rows: list[dict]) -> str:
    """Accuracy where the model has labels, else the mean KL from the full model (never
    the shapes loss of a model that does not speak the shapes world), else the score."""
    present = measured(rows)
    return next((y for y in ("accuracy", "kl_mean") if y in present), "score")


def full_value(rows: list[dict], y: str, full_score: dict | None = None) -> float | None:
    """The full model's value of column `y`: its own accuracy on the same held-out
    questions, 0 for a divergence or a flip count, 1 for an agreement; for the score,
    `full_score` (the full model's quick score) where it is the same measure, else the
    value of the column the score repeats. None: no line."""
    if y == "score":
        same = full_score is not None and rows and full_score.get("metric") == rows[0]["metric"]
        repeated = _score_is(rows)
        return full_score["value"] if same else full_value(rows, repeated) if repeated else None
    if y == "accuracy":
        return rows[0].get("full_accuracy") if rows else None
    return FULL_MODEL.get(y)


def table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The sweep as the app's table: headers and one row per point (method, sparsity, the
    score where it is its own measure, the quality figures measured, the achieved
    sparsity, the prune's seconds and the point's: prune, scoring and any wait). Short
    headers: twelve columns fit a laptop's width."""
    present = measured(rows)
    shown = [y for y in ("score", *TABLE_NAMES) if y in present]
    headers = ["method", "sparsity", *(y_name(rows, y) if y == "score" else TABLE_NAMES[y] for y in shown),
               "achieved", "prune s", "point s"]
    data = [[r["label"], r["sparsity"], *(round(r[y], 4) for y in shown), round(r["achieved_sparsity"], 4),
             round(r["seconds"], 2), round(r["wall_seconds"], 2)] for r in rows]
    return headers, data


def export_columns(rows: list[dict]) -> tuple[str, ...]:
    """The CSV's columns: every point's settings, score and times, and the quality figures
    the sweep measured (the full model's accuracy beside the accuracy)."""
    quality = [k for k in (*QUALITY_COLUMNS, "full_accuracy") if rows and all(k in r for r in rows)]
    return (*SWEEP_COLUMNS, *quality)


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

