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
