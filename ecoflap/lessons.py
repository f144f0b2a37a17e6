"""What the Teach page says, in plain words, computed from the numbers it shows.

A class reads one paragraph and one takeaway, not the measurement protocol: the
sentences here are built from the same plain rows the charts draw ({label, sparsity,
score}), so the words always agree with the picture. The protocol (seeds, questions,
the command that made the curves) stays in the report and a "how it was measured" note.
"""

from __future__ import annotations

import math

from .naming import friendly

CLOSE = 0.03  # within three points of accuracy: "about as good as the full model" for a class


def score_text(value: float, metric: str) -> str:
    """Accuracy as a percentage; any other measure as a plain number."""
    return f"{value:.1%}" if metric == "accuracy" else f"{value:.3f}"


def opening(metric: str, full_score: float | None, questions: int | None = None) -> str:
    """What the curves are, for someone who has never pruned a model."""
    asked = f"{questions} questions" if questions else "the same questions"
    what = ("how many it answered correctly" if metric == "accuracy"
            else f"its {metric} (lower is better)" if metric == "loss" else f"its {metric}")
    full = (f" The grey line is the full model before pruning ({score_text(full_score, metric)})."
            if full_score is not None else "")
    return ("**Pruning** sets a share of a model's weights to zero (the *sparsity*) so that it needs less memory "
            "and compute. Each coloured line is one way of choosing which weights go: at each sparsity the pruned "
            f"model answered {asked} about pictures of shapes, and the line shows {what}.{full} A line that "
            "stays near the grey one means a pruned model that still answers well.")


def takeaway(rows: list[dict], metric: str, higher_is_better: bool = True, full_score: float | None = None) -> str:
    """One sentence from the curves: how far every method stays close to the full model,
    and the sparsity where the methods differ most (which is best there, which worst)."""
    sign = 1 if higher_is_better else -1
    sparsities = sorted({r["sparsity"] for r in rows})
    if not sparsities:
        return ""
    at = {s: sorted((r for r in rows if r["sparsity"] == s), key=lambda r: -sign * r["score"]) for s in sparsities}
    safe = None
    if full_score is not None and metric == "accuracy":
        for s in sparsities:
            if sign * (full_score - at[s][-1]["score"]) > CLOSE:
                break
            safe = s
    start = (f"up to {safe:.0%} sparsity every method stays within {CLOSE * 100:.0f} points of the full model; "
             if safe is not None else "")
    spread = {s: sign * (at[s][0]["score"] - at[s][-1]["score"]) for s in sparsities}
    widest = max(spread, key=lambda s: (spread[s], s))
    best, worst = at[widest][0], at[widest][-1]
    if best is worst:
        sentence = f"{start}at {widest:.0%}, {best['label']} scores {score_text(best['score'], metric)}."
    elif spread[widest] < 0.005:
        sentence = f"{start}the methods score alike at every sparsity measured: where the zeros go matters little here."
    else:
        sentence = (f"{start}at {widest:.0%}, {best['label']} scores {score_text(best['score'], metric)} where "
                    f"{worst['label']} scores {score_text(worst['score'], metric)}: which weights go matters most "
                    "when many go.")
    return sentence[:1].upper() + sentence[1:]


def comparison_takeaway(rows: list[dict], metric: str, higher_is_better: bool, sparsity: float) -> str:
    """One sentence for a live comparison: rows are the full model's first, then each run's."""
    full, runs = rows[0], rows[1:]
    if not runs:
        return ""
    sign = 1 if higher_is_better else -1
    ranked = sorted(runs, key=lambda r: -sign * r["score"])
    best, worst = ranked[0], ranked[-1]
    closest = (f"At {sparsity:.0%} sparsity, {best['label']} comes closest to the full model "
               f"({score_text(best['score'], metric)} against {score_text(full['score'], metric)})")
    if best["score"] == worst["score"]:
        return closest + ", and every method scores the same."
    return closest + f"; {worst['label']} is furthest ({score_text(worst['score'], metric)})."


PART_NAMES = {"vision": "vision encoder", "qformer": "Q-Former", "projection": "projection",
              "language": "language model"}


def typical_magnitude(hist: dict) -> float | None:
    """The geometric mean of a histogram's nonzero magnitudes (bin centres on the log scale)."""
    edges, counts = hist["log10_edges"], hist["counts"]
    total = sum(counts)
    if not total:
        return None
    return 10 ** (sum(c * (a + b) / 2 for c, a, b in zip(counts, edges[:-1], edges[1:])) / total)


def gradient_reading(gradients: dict[str, dict]) -> str:
    """One sentence on the full model's gradient plot: whose gradients are larger, by how much."""
    typical = {m: t for m, h in gradients.items() if (t := typical_magnitude(h)) is not None}
    if len(typical) < 2:
        return ""
    ranked = sorted(typical, key=typical.get, reverse=True)
    top, low = ranked[0], ranked[-1]
    ratio = typical[top] / typical[low]
    if ratio < 1.5:
        return (f"In this model the gradients of every part are of about the same size (typical |dL/dW| within "
                f"{ratio:.1f}x): no part's weights move the loss much more than another's.")
    return (f"In this model the {PART_NAMES.get(top, top)}'s gradients are the largest and the "
            f"{PART_NAMES.get(low, low)}'s the smallest (typical |dL/dW| {typical[top]:.1e} against "
            f"{typical[low]:.1e}, {ratio:.0f}x): a change to one {PART_NAMES.get(top, top)} weight moves the loss "
            "more, which is what ECoFLaP's scores measure.")


def rounding_reason(layers: list[dict], target: float, achieved: float) -> str:
    """Why a run's achieved sparsity is under its target, from its report's layers, when the
    reason is that every row zeroes a whole number of weights, floor(columns x s) (Wanda,
    Magnitude and SparseGPT at a uniform target do); otherwise nothing."""
    if achieved >= target - 5e-5 or not layers or any(not r.get("columns") for r in layers):
        return ""

    def per_row(r):
        return int(math.floor(r["columns"] * r["target_sparsity"] + 1e-9))

    if any(r.get("target_sparsity") is None or r["zeros"] != r["numel"] // r["columns"] * per_row(r)
           for r in layers):
        return ""  # some layer was given an exact count, not a per-row share: rounding is not the story
    short = {r["name"]: r["numel"] * r["target_sparsity"] - r["zeros"] for r in layers}
    worst = max(layers, key=lambda r: short[r["name"]])
    asked = sum(r["numel"] for r in layers) * target
    made = sum(r["zeros"] for r in layers)
    exact = worst["columns"] * worst["target_sparsity"]
    return (f"Under the target because each row of a matrix zeroes a whole number of its weights, rounded down: "
            f"{friendly(worst['name'])} has rows of {worst['columns']} weights, and at "
            f"{worst['target_sparsity']:.2f} each row zeroes {per_row(worst)}, not {exact:.4g}; in all "
            f"{made:,} zeros where the target asks for {asked:,.0f}.")
