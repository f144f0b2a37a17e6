"""Per-layer tables, histograms, figures and exports built from plain data."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from ecoflap.anatomy import prunable_layers
from ecoflap.data import batches
from ecoflap.options import PruneOptions
from ecoflap.pipeline import prune
from ecoflap.plots import group_scores_figure, histogram_figure, sparsity_figure, sweep_figure
from ecoflap.report import layers_csv
from ecoflap.stats import gradient_histograms, magnitude_histograms, weight_histograms


def test_histograms_count_every_sampled_value_and_zeros_apart():
    values = np.array([0.0, 0.0, 1e-3, 1e-2, 1e-1, 1.0], dtype=np.float32)
    hist = magnitude_histograms({"vision": [values]}, bins=3)["vision"]
    assert hist["zeros"] == 2 and hist["nonzero"] == 4
    assert sum(hist["counts"]) == 4
    assert abs(hist["log10_edges"][0] + 3) < 1e-6 and abs(hist["log10_edges"][-1]) < 1e-6


def test_weight_and_gradient_histograms_per_modality(loaded, examples):
    layers = prunable_layers(loaded.model)
    prune(loaded, "magnitude", 0.5)
    weights = weight_histograms(layers)
    total = sum(layer.numel for layer in layers if layer.modality == "vision")
    assert weights["vision"]["zeros"] + weights["vision"]["nonzero"] == total
    assert weights["vision"]["zeros"] == total // 2
    batch = batches(loaded, examples[:4], 4)[0]
    grads = gradient_histograms(loaded.model, layers, batch)
    assert set(grads) == {"vision", "language"}
    assert all(p.grad is None for p in loaded.model.parameters())
    assert all(p.requires_grad for p in loaded.model.parameters())


def test_figures_and_csv_from_a_report(loaded, examples):
    result = prune(loaded, "ecoflap", 0.5, PruneOptions(samples=8, stage1_samples=8), examples).to_dict()
    runs = [{"label": "a", "layers": result["layers"], "target_sparsity": 0.5},
            {"label": "b", "layers": result["layers"], "target_sparsity": 0.5}]
    fig = sparsity_figure(runs)
    plotted = sum(len(t.x) for t in fig.data)
    assert plotted == 2 * len(result["layers"])
    assert [t.line.color for t in fig.data][0] != [t.line.color for t in fig.data][1]
    assert all("target 0.50" in t.name for t in fig.data)
    names = {row[0] for t in fig.data for row in t.customdata}
    assert names == {r["name"] for r in result["layers"]}
    groups = group_scores_figure([{"label": "a", "groups": result["groups"]}, {"label": "b", "groups": result["groups"]}])
    bars = [t for t in groups.data if t.type == "bar"]
    assert len(bars) == 2 and len(bars[0].x) == len(result["groups"])
    assert sum(bars[0].y) == pytest.approx(1.0)
    share = [g["score"] / sum(x["score"] for x in result["groups"]) for g in result["groups"]]
    assert list(bars[1].y) == pytest.approx(share)
    unscored = [{**g, "score": None} for g in result["groups"]]  # per-modality, global: no scores
    mixed = group_scores_figure([{"label": "a", "groups": result["groups"]}, {"label": "c", "groups": unscored}])
    assert [t.visible is not False for t in mixed.data if t.type == "bar"] == [True, False]
    assert [list(t.y) for t in mixed.data if t.type == "scatter"][1] == [g["sparsity"] for g in unscored]
    assert histogram_figure({"x": {"vision": {"log10_edges": [0, 1, 2], "counts": [1, 2], "nonzero": 3, "zeros": 1}}},
                            "t", "v").data
    assert sweep_figure([{"method": "wanda", "sparsity": 0.5, "score": 0.9}], "accuracy").data
    rows = list(csv.DictReader(io.StringIO(layers_csv(result))))
    assert [r["name"] for r in rows] == [r["name"] for r in result["layers"]]
    assert float(rows[0]["sparsity"]) == result["layers"][0]["sparsity"]


def test_shipped_curves_are_summarised_over_seeds_and_drawn(tmp_path):
    from ecoflap.curves import FILE, leaders, shipped_curves, summarise
    from ecoflap.plots import curves_figure

    rows = [{"method": "wanda", "label": "Wanda", "sparsity": 0.5, "seed": 0, "score": 0.9},
            {"method": "eco", "label": "ECoFLaP", "sparsity": 0.5, "seed": 0, "score": 0.8},
            {"method": "eco", "label": "ECoFLaP", "sparsity": 0.5, "seed": 1, "score": 1.0},
            {"method": "eco", "label": "ECoFLaP", "sparsity": 0.7, "seed": 0, "score": 0.5},
            {"method": "wanda", "label": "Wanda", "sparsity": 0.7, "seed": 0, "score": 0.4}]
    eco = {r["sparsity"]: r for r in summarise(rows) if r["method"] == "eco"}
    assert eco[0.5]["score"] == pytest.approx(0.9) and (eco[0.5]["score_min"], eco[0.5]["score_max"]) == (0.8, 1.0)
    assert eco[0.5]["seeds"] == 2 and eco[0.7]["seeds"] == 1
    # a tie names both; the mean over seeds decides, not the best seed
    assert leaders(summarise(rows)) == "Highest mean accuracy: at 0.5, Wanda, ECoFLaP with 90.0%; at 0.7, ECoFLaP with 50.0%."

    (tmp_path / FILE).write_text(json.dumps({"metric": "accuracy", "measured_on": "m", "command": "c", "rows": rows}))
    shipped = shipped_curves(str(tmp_path))
    assert len(shipped["rows"]) == 4 and len(curves_figure(shipped).data) == 2
    (tmp_path / FILE).write_text("{not json")
    assert shipped_curves(str(tmp_path)) is None and shipped_curves(None) is None

    real = shipped_curves(str(Path(__file__).resolve().parent.parent / "assets" / "shapes-blip2"))
    methods = {r["method"] for r in real["rows"]}
    assert {"wanda", "owl", "global_magnitude", "per_modality", "ecoflap_zeroth", "ecoflap_first"} <= methods
    assert {r["sparsity"] for r in real["rows"]} == {0.5, 0.6, 0.7, 0.75, 0.8}
    zeroth = [r for r in real["rows"] if r["method"] == "ecoflap_zeroth"]
    assert all(r["seeds"] == 3 and r["score_min"] < r["score_max"] for r in zeroth)  # three different seeds


def _sweep_row(method, sparsity, seed=0, shapes=True, **figures):
    """A sweep row as `sweep.sweep` writes it, with its quality columns written out here."""
    row = {"method": method, "label": method.title(), "sparsity": sparsity, "seed": seed,
           "achieved_sparsity": sparsity - 0.001, "seconds": 1.25, "wall_seconds": 2.5,
           "kl_mean": sparsity / 10, "kl_median": sparsity / 20, "kl_p99": sparsity, "kl_p999": 2 * sparsity,
           "same_top": 1 - sparsity / 2, "same_answer": 1 - sparsity, **figures}
    if shapes:
        row.update(metric="accuracy", accuracy=0.9 - sparsity, full_accuracy=0.95, right_to_wrong=int(10 * sparsity),
                   wrong_to_right=1)
        row["score"] = row["accuracy"]
    else:
        row.update(metric="calibration loss", score=2 + sparsity)
    row.update(figures)
    return row


def test_the_sweep_chart_draws_the_chosen_column_and_the_full_models_line():
    from ecoflap.plots import sweep_chart
    from ecoflap.sweep import default_y, y_choices

    rows = [_sweep_row(m, s) for m in ("wanda", "magnitude") for s in (0.7, 0.3)]
    choices = dict((y, name) for name, y in y_choices(rows))
    # the score is the accuracy here, so it is offered once
    assert list(choices) == ["accuracy", "kl_mean", "kl_median", "kl_p99", "kl_p999", "same_top", "same_answer",
                             "right_to_wrong", "wrong_to_right"] and default_y(rows) == "accuracy"
    # the full model: its own accuracy on the same questions, no divergence, full agreement, no flips
    full_line = {"accuracy": 0.95, "kl_mean": 0, "kl_median": 0, "kl_p99": 0, "kl_p999": 0, "same_top": 1,
                 "same_answer": 1, "right_to_wrong": 0, "wrong_to_right": 0}
    for y in choices:
        figure = sweep_chart(rows, y)
        assert [t.name for t in figure.data] == ["Wanda", "Magnitude"]
        for trace, method in zip(figure.data, ("wanda", "magnitude")):
            by_hand = sorted((r["sparsity"], r[y]) for r in rows if r["method"] == method)
            assert list(trace.x) == [s for s, _ in by_hand] and list(trace.y) == [v for _, v in by_hand]
        assert figure.layout.yaxis.title.text == choices[y] and choices[y] in figure.layout.title.text
        assert [s.y0 for s in figure.layout.shapes if s.type == "line"] == [full_line[y]]
    # another y changes only the y data: the same points, nothing measured again
    assert list(sweep_chart(rows, "kl_p99").data[0].y) == [0.3, 0.7]
    assert list(sweep_chart(rows, "same_answer").data[0].y) == pytest.approx([0.7, 0.3])
    with pytest.raises(ValueError, match="the y-axis is one of"):
        sweep_chart(rows, "loss")


def test_a_sweep_without_labels_is_drawn_by_its_distance_from_the_full_model():
    from ecoflap.plots import sweep_chart
    from ecoflap.sweep import KL_SCORE, default_y, full_value, y_choices

    rows = [_sweep_row("wanda", s, shapes=False, metric=KL_SCORE, score=s / 10) for s in (0.3, 0.5)]
    # the score is the mean KL there: offered once, and never the shapes loss of a model that does not speak shapes
    assert [y for _, y in y_choices(rows)] == ["kl_mean", "kl_median", "kl_p99", "kl_p999", "same_top", "same_answer"]
    assert default_y(rows) == "kl_mean" and full_value(rows, "score") == 0
    with pytest.raises(ValueError, match="accuracy was not measured"):
        sweep_chart(rows, "accuracy")
    # a score of its own (measured apart from the quality) gets the full model's line only from its own measure
    own = [_sweep_row("wanda", s, shapes=False) for s in (0.3, 0.5)]
    assert [y for _, y in y_choices(own)][:2] == ["score", "kl_mean"]
    full = {"metric": "calibration loss", "value": 1.5}
    assert full_value(own, "score", full) == 1.5 and full_value(own, "score", {"metric": "accuracy", "value": 1}) \
        is None and full_value(own, "score") is None
    drawn = sweep_chart(own, "score", full)
    assert list(drawn.data[0].y) == [2.3, 2.5] and [s.y0 for s in drawn.layout.shapes] == [1.5]
    # a shapes model whose accuracy is measured on a source's held-out examples: the quick score is its own column
    apart = [_sweep_row("wanda", s, score=0.5) for s in (0.3, 0.5)]
    assert dict((y, n) for n, y in y_choices(apart))["score"] == "accuracy (quick score)"
    assert full_value(apart, "score") is None


def test_repeated_seeds_are_drawn_as_their_mean_and_range():
    from ecoflap.plots import sweep_chart

    rows = [_sweep_row("ecoflap_zeroth", 0.5, seed=s, kl_mean=k) for s, k in ((0, 0.1), (1, 0.3), (2, 0.2))]
    trace = sweep_chart(rows, "kl_mean").data[0]
    assert list(trace.y) == pytest.approx([0.2]) and list(trace.error_y.array) == pytest.approx([0.1])
    assert list(trace.error_y.arrayminus) == pytest.approx([0.1])


def test_the_sweep_table_and_export_hold_the_quality_columns():
    from ecoflap.report import table_csv
    from ecoflap.sweep import export_columns, table

    rows = [_sweep_row("wanda", 0.5)]
    headers, data = table(rows)
    assert headers == ["method", "sparsity", "accuracy", "KL mean", "KL p99", "same top-1", "same answer",
                       "right→wrong", "wrong→right", "achieved", "prune s", "point s"]
    assert data == [["Wanda", 0.5, 0.4, 0.05, 0.5, 0.75, 0.5, 5, 1, 0.499, 1.25, 2.5]]
    written = list(csv.DictReader(io.StringIO(table_csv(rows, export_columns(rows)))))
    for key in ("kl_mean", "kl_median", "kl_p99", "kl_p999", "same_top", "same_answer", "accuracy", "full_accuracy",
                "right_to_wrong", "wrong_to_right", "score", "seconds", "wall_seconds"):
        assert float(written[0][key]) == pytest.approx(rows[0][key]), key
    unlabelled = [_sweep_row("wanda", 0.5, shapes=False, metric="mean KL from the full model", score=0.05)]
    assert table(unlabelled)[0][2:7] == ["KL mean", "KL p99", "same top-1", "same answer", "achieved"]
    assert "accuracy" not in export_columns(unlabelled) and "kl_p999" in export_columns(unlabelled)


def test_titles_wrap_to_fit_a_phone_and_keep_names_whole():
    """A phone's chart holds about 34 characters of title per line: longer titles wrap at
    words, a run's label or a measure's name is never split, notes go small under it."""
    from ecoflap.plots import NOTE_CHARS, TITLE_CHARS, curves_figure

    layer = {"name": "vision_model.encoder.layers.0.mlp.fc1", "modality": "vision", "stack": "vision", "block": 0,
             "numel": 10, "zeros": 5, "sparsity": 0.5}
    label = "ECoFLaP (zeroth-order, one perturbation per group) @ 0.50"
    one = sparsity_figure([{"label": label, "layers": [layer], "target_sparsity": 0.5,
                            "warnings": ["the calibration data is not what the model was trained on: a long note"]}])
    text = one.layout.title.text
    big, _, small = text.partition("<br><sup>")
    assert big.split("<br>") == ["Sparsity of each prunable layer:", label]  # the label whole, on its own line
    notes = [line.removeprefix("<sup>").removesuffix("</sup>") for line in ("<sup>" + small).split("<br>")]
    assert " ".join(notes).startswith("⚠ the calibration data") and all(len(n) <= NOTE_CHARS for n in notes)
    assert one.layout.title.yanchor == "bottom" and one.layout.margin.t == 64 + 24 + 16 * len(notes)
    two = sparsity_figure([{"label": "Wanda @ 0.50", "layers": [layer], "target_sparsity": 0.5},
                           {"label": "OWL @ 0.50", "layers": [layer], "target_sparsity": 0.5}])
    assert two.layout.title.text == "Sparsity of each prunable layer"
    name = "99th percentile KL(full || pruned) of the answer"
    long = sweep_figure([{"method": "wanda", "sparsity": 0.5, "score": 1.0}], name).layout.title.text
    assert long.split("<br>") == [name, "against sparsity"]
    curves = curves_figure({"metric": "accuracy", "rows": [{"method": "wanda", "sparsity": 0.5, "score": 0.9,
                                                            "score_min": 0.8, "score_max": 0.95, "seeds": 3}]})
    lines = curves.layout.title.text.split("<br>")
    assert lines[0] == "accuracy against sparsity" and all(len(line) <= TITLE_CHARS for line in lines[:1])
    assert "measured ahead of time" in lines[1]
