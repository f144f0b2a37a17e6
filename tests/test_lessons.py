"""The Teach page's sentences, from plain rows: hand-worked cases, and the shipped curves."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecoflap import lessons
from ecoflap.curves import shipped_curves
from ecoflap.plots import curves_figure, sweep_figure

ROWS = [{"label": "A", "sparsity": 0.5, "score": 0.95}, {"label": "B", "sparsity": 0.5, "score": 0.94},
        {"label": "A", "sparsity": 0.6, "score": 0.93}, {"label": "B", "sparsity": 0.6, "score": 0.90},
        {"label": "A", "sparsity": 0.7, "score": 0.80}, {"label": "B", "sparsity": 0.7, "score": 0.50},
        {"label": "A", "sparsity": 0.8, "score": 0.30}, {"label": "B", "sparsity": 0.8, "score": 0.20}]


def test_takeaway_names_the_safe_range_and_the_widest_gap():
    # worst at 0.5 is 2 points below 0.96 (within 3), at 0.6 it is 6 below; widest gap: 0.7 (30 points)
    assert lessons.takeaway(ROWS, "accuracy", True, 0.96) == (
        "Up to 50% sparsity every method stays within 3 points of the full model; at 70%, A scores 80.0% where "
        "B scores 50.0%: which weights go matters most when many go.")
    # no full model: no safe range; every method 4 points below it: none either
    assert lessons.takeaway(ROWS, "accuracy", True).startswith("At 70%, A scores 80.0% where B")
    assert lessons.takeaway(ROWS, "accuracy", True, 0.99).startswith("At 70%, A")


def test_takeaway_for_a_lower_is_better_measure_and_for_alike_methods():
    losses = [{"label": "A", "sparsity": 0.5, "score": 2.0}, {"label": "B", "sparsity": 0.5, "score": 2.5},
              {"label": "A", "sparsity": 0.6, "score": 3.0}, {"label": "B", "sparsity": 0.6, "score": 2.2}]
    # lower is better: at 0.6 B (2.2) is best, A (3.0) worst, a gap of 0.8 against 0.5 at 0.5
    assert lessons.takeaway(losses, "loss", False, 1.9) == (
        "At 60%, B scores 2.200 where A scores 3.000: which weights go matters most when many go.")
    alike = [{"label": n, "sparsity": 0.5, "score": 0.9} for n in "AB"]
    assert "score alike" in lessons.takeaway(alike, "accuracy", True, 0.9)
    assert lessons.takeaway([{"label": "A", "sparsity": 0.5, "score": 0.9}], "accuracy") == "At 50%, A scores 90.0%."
    assert lessons.takeaway([], "accuracy") == ""


def test_comparison_takeaway_ranks_the_runs_against_the_full_model():
    rows = [{"label": "Full model", "score": 0.965}, {"label": "Wanda @ 0.60", "score": 0.87},
            {"label": "ECoFLaP @ 0.60", "score": 0.93}, {"label": "Magnitude @ 0.60", "score": 0.41}]
    assert lessons.comparison_takeaway(rows, "accuracy", True, 0.6) == (
        "At 60% sparsity, ECoFLaP @ 0.60 comes closest to the full model (93.0% against 96.5%); "
        "Magnitude @ 0.60 is furthest (41.0%).")
    same = [{"label": "Full model", "score": 2.0}, {"label": "a", "score": 2.5}, {"label": "b", "score": 2.5}]
    assert lessons.comparison_takeaway(same, "loss", False, 0.5).endswith("every method scores the same.")


def test_opening_is_plain_words_with_the_full_model():
    text = lessons.opening("accuracy", 0.966)
    assert "96.6%" in text and "grey line" in text
    for jargon in ("seed", "target", "python -m", "calibration"):
        assert jargon not in text
    assert "grey line" not in lessons.opening("loss", None)


def test_the_shipped_curves_draw_the_full_model_line():
    curves = shipped_curves(str(Path(__file__).resolve().parent.parent / "assets" / "shapes-blip2"))
    figure = curves_figure(curves)
    lines = [s for s in figure.layout.shapes if s.type == "line"]
    assert len(lines) == 1 and lines[0].y0 == lines[0].y1 == curves["full_score"]
    assert not sweep_figure(curves["rows"], "accuracy").layout.shapes


def test_gradient_reading_compares_typical_magnitudes():
    # vision: all mass at bin centre 10^-6; language: half at 10^-4, half at 10^-3 -> 10^-3.5
    gradients = {"vision": {"log10_edges": [-6.5, -5.5], "counts": [10]},
                 "language": {"log10_edges": [-4.5, -3.5, -2.5], "counts": [5, 5]}}
    assert lessons.typical_magnitude(gradients["language"]) == pytest.approx(10 ** -3.5)
    assert lessons.gradient_reading(gradients) == (
        "In this model the language model's gradients are the largest and the vision encoder's the smallest "
        "(typical |dL/dW| 3.2e-04 against 1.0e-06, 316x): a change to one language model weight moves the loss "
        "more, which is what ECoFLaP's scores measure.")
    alike = {"vision": {"log10_edges": [-6.5, -5.5], "counts": [3]}, "language": {"log10_edges": [-6.4, -5.4],
                                                                                  "counts": [4]}}
    assert "about the same size" in lessons.gradient_reading(alike)
    assert lessons.gradient_reading({"vision": gradients["vision"]}) == ""
