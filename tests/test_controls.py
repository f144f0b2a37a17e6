"""What the Prune tab's controls stand on: a method is two choices (allocation, stage 2), each
method reads only some options, and the achieved sparsity's shortfall is explained by numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ecoflap
from conftest import tiny_model
from ecoflap.lessons import rounding_reason
from ecoflap.methods import ALLOCATIONS, METHODS, STAGE2, compose, stage2_for, variants
from ecoflap.options import PruneOptions, applicable

# a value unlike the default for every option a method may ignore (N:M aside: it is refused)
OTHER = {"include": ("vision", "language", "qformer"), "samples": 8, "batch_size": 2, "granularity": "layer",
         "aggregate": "avg", "max_sparsity": 0.95, "eps": 1e-2, "noise_samples": 2, "stage1_samples": 4,
         "blocksize": 32, "percdamp": 0.05, "seed": 7, "owl_m": 3.0, "owl_lambda": 0.2, "vision_sparsity": 0.3,
         "loss": "prefix_lm"}


def test_every_method_is_its_allocation_and_its_stage2():
    assert set(ALLOCATIONS) == {m.allocation for m in METHODS.values()}
    assert set(STAGE2) == {m.stage2 for m in METHODS.values()}
    for m in METHODS.values():
        assert compose(m.allocation, m.stage2, m.name) is m
        assert m in variants(m.allocation, m.stage2) and m.stage2 in stage2_for(m.allocation)
    assert stage2_for("global") == ["magnitude"] and stage2_for("uniform") == ["magnitude", "wanda", "sparsegpt"]
    assert stage2_for("ecoflap") == stage2_for("owl") == stage2_for("modality") == ["wanda", "sparsegpt"]
    # a choice that does not go with the allocation gives way to one that does
    assert compose("global", "wanda").name == "global_magnitude"
    assert compose("owl", "magnitude").name == "owl"
    assert compose("ecoflap", "sparsegpt", "ecoflap_first").name == "ecoflap_sparsegpt"
    assert compose("ecoflap", "wanda", "ecoflap_first").name == "ecoflap_first"
    assert [m.name for m in variants("ecoflap", "wanda")] == ["ecoflap_zeroth", "ecoflap_zeroth_group",
                                                              "ecoflap_first"]
    with pytest.raises(ValueError, match="unknown allocation"):
        compose("wanda")


@pytest.fixture(scope="module")
def calibration():
    from conftest import random_examples

    return random_examples(16)


def _masks(method, options, calibration):
    loaded = tiny_model("opt")
    result = ecoflap.prune(loaded, method, 0.5, options, calibration=calibration)
    layers = ecoflap.prunable_layers(loaded.model, ecoflap.INCLUDE_CHOICES)
    return {layer.name: layer.module.weight.detach() == 0 for layer in layers}, result


@pytest.mark.parametrize("name", list(METHODS))
def test_an_option_a_method_does_not_read_changes_nothing(name, calibration):
    """The tab hides what `applicable` leaves out: here each of those is changed at once, and
    every weight the method zeroes is the same."""
    method = METHODS[name]
    base = PruneOptions(samples=16, stage1_samples=8)
    ignored = {k: v for k, v in OTHER.items() if k not in applicable(method)}
    assert ignored, name
    before, _ = _masks(method, base, calibration)
    after, _ = _masks(method, dataclasses.replace(base, **ignored), calibration)
    assert before.keys() == after.keys()
    for layer in before:
        assert torch.equal(before[layer], after[layer]), (name, layer, sorted(ignored))
    if not method.allows_nm:  # N:M is refused, not ignored
        with pytest.raises(ValueError, match="N:M"):
            ecoflap.prune(tiny_model("opt"), method, 0.5, dataclasses.replace(base, nm="2:4"), calibration)


def test_what_a_method_reads_does_change_it(calibration):
    """The other way round, for the options the tab shows to one allocation only."""
    base = PruneOptions(samples=16, stage1_samples=8)
    for name, changed in [("per_modality", {"vision_sparsity": 0.3}), ("owl", {"owl_lambda": 0.2}),
                          ("ecoflap_zeroth", {"max_sparsity": 0.52}), ("ecoflap_zeroth", {"eps": 0.05})]:
        assert set(changed) <= applicable(METHODS[name])
        _, one = _masks(name, base, calibration)
        _, two = _masks(name, dataclasses.replace(base, **changed), calibration)
        assert [r["zeros"] for r in one.layers] != [r["zeros"] for r in two.layers], (name, changed)


def test_the_rounding_reason_by_hand():
    fc1 = "vision_model.encoder.layers.0.mlp.fc1"
    layers = [{"name": fc1, "columns": 10, "numel": 30, "zeros": 15, "target_sparsity": 0.56},
              {"name": "language_model.model.decoder.layers.1.fc2", "columns": 4, "numel": 8, "zeros": 4,
               "target_sparsity": 0.56}]
    text = rounding_reason(layers, 0.56, 19 / 38)
    # 3 rows of 10 at 0.56 zero 5 each (5.6 asked): 1.8 short; 2 rows of 4 zero 2 each (2.24 asked): 0.48 short
    assert "vision block 1 · feed-forward has rows of 10 weights" in text
    assert "each row zeroes 5, not 5.6" in text and "in all 19 zeros where the target asks for 21" in text
    assert rounding_reason(layers, 0.56, 0.56) == ""  # on target: nothing to explain
    exact = [{**layers[0], "zeros": 16}, layers[1]]  # an exact count (an allocation), not a per-row floor
    assert rounding_reason(exact, 0.56, 20 / 38) == ""


def test_wandas_shortfall_is_explained_from_its_own_report():
    loaded = ecoflap.load_model(device="cpu", dtype="float32")
    result = ecoflap.prune(loaded, "wanda", 0.6, PruneOptions(samples=8))
    layers = ecoflap.prunable_layers(loaded.model)
    assert [r["columns"] for r in result.layers] == [layer.module.in_features for layer in layers]
    zeros = sum(int((layer.module.weight == 0).sum()) for layer in layers)
    assert zeros / sum(layer.numel for layer in layers) == pytest.approx(result.achieved_sparsity)
    assert result.achieved_sparsity < 0.5995  # 0.5957: every row of 128 weights zeroes 76, not 76.8
    text = rounding_reason(result.layers, 0.6, result.achieved_sparsity)
    assert f"in all {zeros:,} zeros" in text and "rows of 128 weights" in text and "zeroes 76, not 76.8" in text
