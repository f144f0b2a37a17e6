"""The allocation strategies: ECoFLaP's keep counts against hand-worked cases and random
budgets, and the others (OWL, per-modality, global magnitude), each checked against a
recomputation of its own: hooks, sorts and bisections written here."""

import math
import random

import numpy as np
import pytest
import torch

from ecoflap.allocation import allocate_sparsity, kth_smallest_magnitude, split_count
from ecoflap.anatomy import prunable_layers
from ecoflap.data import batches
from ecoflap.forms import from_settings, seed_list
from ecoflap.options import PruneOptions
from ecoflap.owl import outlier_ratio, owl_keep_counts, owl_sparsities
from ecoflap.pipeline import prune
from ecoflap.weights import WeightStore

from conftest import tiny_model

ALL = ("vision", "qformer", "projection", "language")


def budget(total, sparsity):
    return math.floor(total * (1 - sparsity) + 1e-9)


def reference_owl(ratios, sparsity, lam):
    """luuyin/OWL lib/prune_all.py (prune_wanda_outlier), re-typed: the unweighted mean."""
    a = np.array(ratios, dtype=float)
    a = (a - a.min()) * (1 / (a.max() - a.min()) * lam * 2)
    a = a - np.mean(a) + (1 - sparsity)
    return [1 - x for x in a]


def banded_by_bisection(ratios, sizes, sparsity, lam):
    """The block sparsities OWL here promises, found numerically: min-max spread of 2 lam,
    one shift, clipped to [s - lam, s + lam], size-weighted mean equal to s."""
    low, high = min(ratios), max(ratios)
    norm = [0.0 if high == low else (r - low) / (high - low) * 2 * lam for r in ratios]
    lo, hi = max(0.0, sparsity - lam), min(1.0, sparsity + lam)

    def at(c):
        return [min(max(sparsity + lam - x + c, lo), hi) for x in norm]

    a, b = -1.0, 1.0
    for _ in range(200):
        c = (a + b) / 2
        if sum(n * s for n, s in zip(sizes, at(c))) < sparsity * sum(sizes):
            a = c
        else:
            b = c
    return at((a + b) / 2)


# OWL on a tiny BLIP-2 ------------------------------------------------------------------

def dense_sq_norms(loaded, examples):
    """Per prunable layer, the sum of squares of its inputs over full forward passes of the
    dense model, one example per batch (no padding: every input row is a real token)."""
    layers = prunable_layers(loaded.model)
    sums = {layer.name: torch.zeros(layer.module.in_features, dtype=torch.float64) for layer in layers}
    handles = []
    for layer in layers:
        def hook(_module, args, name=layer.name):
            x = args[0].detach().double()
            sums[name] += (x.reshape(-1, x.shape[-1]) ** 2).sum(0)
        handles.append(layer.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches(loaded, examples, 1):
                loaded.model(**batch)
    finally:
        for h in handles:
            h.remove()
    return layers, sums


def block_ratios(layers, sums, m):
    blocks = {}
    for layer in layers:
        scores = layer.module.weight.detach().double().abs() * sums[layer.name].sqrt()
        blocks.setdefault(layer.block_name, []).append(scores.flatten())
    ratios = {}
    for name, parts in blocks.items():
        every = torch.cat(parts)
        ratios[name] = 100.0 * float((every > every.mean() * m).sum()) / every.numel()
    return ratios


@pytest.mark.parametrize("sparsity,lam", [(0.6, 0.08), (0.5, 0.2)])
def test_owl_ratios_band_and_budget_on_a_tiny_blip2(family, examples, sparsity, lam):
    loaded = tiny_model(family)
    layers, sums = dense_sq_norms(loaded, examples[:16])
    expected = block_ratios(layers, sums, 5.0)
    result = prune(loaded, "owl", sparsity, PruneOptions(samples=16, batch_size=8, owl_lambda=lam), examples)
    groups = result.groups
    assert [g["name"] for g in groups] == list(expected)
    for g in groups:  # the same scores up to float32 against float64: at most one score flips
        assert g["score"] == pytest.approx(expected[g["name"]], abs=100.0 / g["numel"] + 1e-9), g["name"]
    assert len({round(g["score"], 6) for g in groups}) > 1
    total = sum(r["numel"] for r in result.layers)
    zeros = sum(r["zeros"] for r in result.layers)
    assert total - zeros == budget(total, sparsity)
    assert sum(g["numel"] - g["keep"] for g in groups) == zeros
    lo, hi = sparsity - lam, sparsity + lam
    assert result.options["band"] == pytest.approx([lo, hi])
    wanted = banded_by_bisection([g["score"] for g in groups], [g["numel"] for g in groups], sparsity, lam)
    for g, s in zip(groups, wanted):
        assert abs(g["keep"] - g["numel"] * (1 - s)) <= 1 + 1e-6, g["name"]
        assert lo - 1 / g["numel"] - 1e-12 <= g["sparsity"] <= hi + 1 / g["numel"] + 1e-12
    by_block = {g["name"]: g for g in groups}
    block_of = {layer.name: layer.block_name for layer in layers}
    for row in result.layers:  # every layer at its block's sparsity, its exact count applied
        assert abs(row["sparsity"] - by_block[block_of[row["name"]]]["sparsity"]) <= 1 / row["numel"] + 1e-12
    assert len({round(g["sparsity"], 4) for g in groups}) > 1


def test_owl_sparsegpt_keeps_the_same_budget(loaded, examples):
    result = prune(loaded, "owl_sparsegpt", 0.7, PruneOptions(samples=16), examples)
    total = sum(r["numel"] for r in result.layers)
    assert total - sum(r["zeros"] for r in result.layers) == budget(total, 0.7)
    assert all(0.62 - 1 / g["numel"] <= g["sparsity"] <= 0.78 + 1 / g["numel"] for g in result.groups)


# OWL's arithmetic --------------------------------------------------------------------

def test_outlier_ratio_takes_one_mean_over_the_whole_block():
    # mean (10 * 1 + 10 * 10) / 20 = 5.5, threshold 8.25: the ten 10s -> 50 %; per
    # matrix no score exceeds 1.5 times its own mean.
    assert outlier_ratio([torch.ones(2, 5), torch.full((2, 5), 10.0)], 1.5) == pytest.approx(50.0)
    # strict: 5 is not above 5 times the mean 1
    assert outlier_ratio([torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0]])], 5) == 0.0
    assert outlier_ratio([torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0]])], 4.9) == pytest.approx(20.0)


def test_owl_hand_worked_cases():
    # equal sizes: norm [0, .1, .2], sparsities .6 - norm + shift 0 = [.6, .5, .4]
    assert owl_sparsities([1, 2, 3], [100] * 3, 0.5, 0.1) == pytest.approx([0.6, 0.5, 0.4])
    assert owl_keep_counts([1, 2, 3], [100] * 3, 0.5, 0.1) == [40, 50, 60]
    # unequal sizes: the reference gives [.6, .4] and keeps 40 + 180 = 220 of a budget of
    # 200; here the band [.4, .6] holds and 100 * .6 + 300 * (.4 + c) = 200, c = 1/15.
    assert reference_owl([0.0, 1.0], 0.5, 0.1) == pytest.approx([0.6, 0.4])
    assert owl_sparsities([0.0, 1.0], [100, 300], 0.5, 0.1) == pytest.approx([0.6, 0.4 + 1 / 15])
    assert owl_keep_counts([0.0, 1.0], [100, 300], 0.5, 0.1) == [40, 160]


@pytest.mark.parametrize("seed", range(3))
def test_owl_equals_the_reference_for_equal_blocks_inside_the_band(seed):
    rng = random.Random(seed)
    half = [rng.uniform(0, 4) for _ in range(4)]
    ratios = half + [8 - r for r in half] + [0.0, 8.0]  # symmetric: the reference stays in the band
    ref = reference_owl(ratios, 0.6, 0.08)
    assert owl_sparsities(ratios, [4096] * len(ratios), 0.6, 0.08) == pytest.approx(ref, abs=1e-12)


def test_owl_clips_what_the_reference_lets_out_of_the_band():
    ratios = [9.0] + [1.0] * 7  # one outlier-heavy block: the reference gives it .7 - .16 + .02
    assert reference_owl(ratios, 0.7, 0.08)[0] == pytest.approx(0.56)
    ours = owl_sparsities(ratios, [1000] * 8, 0.7, 0.08)
    assert ours[0] == pytest.approx(0.62) and sum(ours) / 8 == pytest.approx(0.7)


def test_owl_budget_is_exact_where_the_reference_misses_it():
    # a LLaVA-1.5-7B-like model: 24 CLIP-L blocks, 32 Vicuna-7B blocks
    sizes = [12_582_912] * 24 + [202_375_168] * 32
    ratios = [0.5] * 24 + [3.0] * 32
    ref = reference_owl(ratios, 0.7, 0.08)
    assert sum(n * s for n, s in zip(sizes, ref)) / sum(sizes) == pytest.approx(0.6386, abs=1e-4)
    keep = owl_keep_counts(ratios, sizes, 0.7, 0.08)
    assert sum(keep) == budget(sum(sizes), 0.7)
    assert 1 - keep[0] / sizes[0] == pytest.approx(0.78)


@pytest.mark.parametrize("seed", range(30))
def test_owl_random_cases_budget_band_and_order(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    sizes = [rng.choice([1, 3, 77, 1000, 12_288, 202_375_168]) for _ in range(n)]
    ratios = [round(rng.uniform(0, 6), rng.choice([0, 3])) for _ in range(n)]
    s, lam = rng.choice([0.0, 0.1, 0.5, 0.7, 0.93]), rng.choice([0.0, 0.02, 0.08, 0.3])
    keep = owl_keep_counts(ratios, sizes, s, lam)
    assert sum(keep) == budget(sum(sizes), s)
    sp = owl_sparsities(ratios, sizes, s, lam)
    lo, hi = max(0.0, s - lam), min(1.0, s + lam)
    assert all(lo - 1e-12 <= x <= hi + 1e-12 for x in sp)
    assert sp == pytest.approx(banded_by_bisection(ratios, sizes, s, lam), abs=1e-9)
    for k, size, x in zip(keep, sizes, sp):
        assert 0 <= k <= size and abs(k - size * (1 - x)) <= 1 + 1e-6
    for i in range(n):
        for j in range(n):
            if ratios[i] > ratios[j]:
                assert sp[i] <= sp[j] + 1e-12


def test_owl_equal_ratios_are_uniform():
    assert owl_keep_counts([2.0, 2.0], [10, 30], 0.5, 0.08) == [5, 15]


# per-modality ----------------------------------------------------------------------------

@pytest.mark.parametrize("include", [("vision", "language"), ALL])
def test_per_modality_targets(loaded, examples, include):
    result = prune(loaded, "per_modality", 0.6, PruneOptions(samples=16, include=include, vision_sparsity=0.45),
                   examples)
    numel, zeros = {}, {}
    for row in result.layers:
        numel[row["modality"]] = numel.get(row["modality"], 0) + row["numel"]
        zeros[row["modality"]] = zeros.get(row["modality"], 0) + row["zeros"]
    total = sum(numel.values())
    assert total - sum(zeros.values()) == budget(total, 0.6)
    assert zeros["vision"] == math.floor(numel["vision"] * 0.45 + 1e-9)
    for modality in set(numel) - {"vision", "language"}:  # the Q-Former and projection at the target
        assert zeros[modality] == math.floor(numel[modality] * 0.6 + 1e-9)
    language = zeros["language"] / numel["language"]
    assert language > 0.6
    assert result.options["split"] == pytest.approx({"vision": zeros["vision"] / numel["vision"], "language": language})
    for row in result.layers:
        share = zeros[row["modality"]] / numel[row["modality"]]
        assert abs(row["zeros"] - row["numel"] * share) < 1, row["name"]
    assert [g["name"] for g in result.groups] == [m for m in ALL if m in include]


def test_per_modality_default_is_equal_sparsity(loaded, examples):
    result = prune(loaded, "per_modality", 0.5, PruneOptions(samples=8), examples)
    assert result.options["vision_sparsity"] == 0.5
    assert result.sparsity_by_modality["vision"] == pytest.approx(0.5, abs=1e-5)
    assert result.sparsity_by_modality["language"] == pytest.approx(0.5, abs=1e-5)


@pytest.mark.parametrize("include,vision,message", [
    (("vision", "language"), 0.0, r"language model would need .* choose a vision sparsity from"),
    (("vision",), 0.5, "both the vision encoder and the language model"),
])
def test_per_modality_impossible_splits_are_refused_untouched(loaded, examples, include, vision, message):
    store = WeightStore(prunable_layers(loaded.model, ALL))
    with pytest.raises(ValueError, match=message):
        prune(loaded, "per_modality", 0.9, PruneOptions(samples=8, include=include, vision_sparsity=vision), examples)
    assert store.is_original()


# global magnitude -------------------------------------------------------------------------

@pytest.mark.parametrize("quantised", [False, True])
def test_global_magnitude_is_one_threshold(loaded, quantised):
    layers = prunable_layers(loaded.model)
    if quantised:  # many equal |W| across layers: ties at the threshold must still give the exact count
        with torch.no_grad():
            for layer in layers:
                layer.module.weight.copy_(torch.round(layer.module.weight * 50) / 50)
    before = {layer.name: layer.module.weight.detach().abs().clone() for layer in layers}
    result = prune(loaded, "global_magnitude", 0.55)
    every = torch.cat([w.flatten() for w in before.values()])
    zeroed = torch.cat([before[layer.name][layer.module.weight == 0] for layer in layers])
    kept = torch.cat([before[layer.name][layer.module.weight != 0] for layer in layers])
    assert zeroed.numel() == every.numel() - budget(every.numel(), 0.55)
    assert zeroed.max() <= kept.min()
    assert result.options["threshold"] == float(torch.sort(every).values[zeroed.numel() - 1])
    assert len({round(r["sparsity"], 3) for r in result.layers}) > 1


def test_kth_smallest_magnitude_matches_a_sort(loaded):
    layers = prunable_layers(loaded.model)
    every = torch.sort(torch.cat([layer.module.weight.detach().abs().flatten() for layer in layers])).values
    for k in (1, 2, 1000, every.numel() // 2, every.numel()):
        assert kth_smallest_magnitude(layers, k) == float(every[k - 1])


# settings ---------------------------------------------------------------------------------

def test_settings_parse_the_new_knobs():
    options = from_settings(owl_m="7", owl_lambda=0.1, vision_sparsity="0.4")
    assert (options.owl_m, options.owl_lambda, options.vision_sparsity) == (7.0, 0.1, 0.4)
    assert from_settings(vision_sparsity="").vision_sparsity is None
    assert from_settings(vision_sparsity=0).vision_sparsity == 0.0
    for bad, message in [({"owl_m": 0.5}, "OWL's M"), ({"owl_lambda": 0.9}, "OWL's lambda"),
                         ({"vision_sparsity": 1.0}, "vision sparsity")]:
        with pytest.raises(ValueError, match=message):
            from_settings(**bad)
    assert seed_list("0, 1,2") == [0, 1, 2]
    with pytest.raises(ValueError, match="only once"):
        seed_list("1,1")


@pytest.mark.parametrize("method,options,message", [
    ("owl", PruneOptions(owl_m=0.0), "OWL's M"),
    ("owl", PruneOptions(owl_lambda=-0.1), "OWL's lambda"),
    ("per_modality", PruneOptions(vision_sparsity=1.0), "vision sparsity"),
    ("owl", PruneOptions(nm="2:4"), "N:M"),
])
def test_bad_allocation_settings_are_rejected(loaded, examples, method, options, message):
    with pytest.raises(ValueError, match=message):
        prune(loaded, method, 0.5, options, examples)


# the model card's table ----------------------------------------------------------------------

def test_card_table_is_read_from_the_curves():
    from ecoflap.toy.card import _pruning_table

    curves = {"full_score": 0.9, "rows": [
        {"method": "wanda", "label": "Wanda", "sparsity": 0.5, "seed": 0, "score": 0.8},
        {"method": "ecoflap_zeroth", "label": "ECoFLaP", "sparsity": 0.5, "seed": 0, "score": 0.7},
        {"method": "ecoflap_zeroth", "label": "ECoFLaP", "sparsity": 0.5, "seed": 1, "score": 0.9},
        {"method": "per_modality", "label": "Per-modality", "sparsity": 0.5, "seed": 0, "score": 0.85,
         "split": {"vision": 0.4, "language": 0.6}},
    ]}
    lines = _pruning_table(curves).splitlines()
    assert lines[2] == "| full model | 90.0% |"
    assert lines[3] == "| Wanda | 80.0% |"
    assert lines[4] == "| ECoFLaP, 2 seeds | 80.0% (70.0% to 90.0%) |"
    assert lines[5] == "| Per-modality | 85.0% (vision 0.40, language 0.60) |"


# ECoFLaP's keep counts per group (allocate_sparsity)


def test_hand_worked_proportional_case():
    # K = 100; each group first keeps ceil(100 * 0.4) = 40; the other 20 go 3:1.
    keep = allocate_sparsity([3.0, 1.0], [100, 100], sparsity=0.5, max_sparsity=0.6)
    assert keep == [55, 45]


def test_hand_worked_case_with_a_full_group():
    # K = 55; base keep [1, 10]; 44 to share: group 0 would take 43.6 but holds only 9 more,
    # so it fills up and group 1 takes the remaining 35.
    keep = allocate_sparsity([100.0, 1.0], [10, 100], sparsity=0.5, max_sparsity=0.9)
    assert keep == [10, 45]


def test_all_scores_zero_spreads_by_capacity():
    keep = allocate_sparsity([0.0, 0.0], [100, 300], sparsity=0.5, max_sparsity=1.0)
    assert keep == [50, 150]


@pytest.mark.parametrize("seed", range(200))
def test_random_cases_budget_cap_and_order(seed):
    rng = random.Random(seed)
    groups = rng.randint(1, 12)
    sizes = [rng.choice([64, 64, 256, rng.randint(1, 5000)]) for _ in range(groups)]
    scores = [rng.random() ** 3 * 10 for _ in range(groups)]
    s = rng.choice([0.1, 0.3, 0.5, 0.6, 0.7, 0.9])
    cap = min(1.0, s + rng.choice([0.0, 0.05, 0.1, 0.3]))
    keep = allocate_sparsity(scores, sizes, s, cap)
    assert sum(keep) == math.floor(sum(sizes) * (1 - s) + 1e-9)
    for k, n in zip(keep, sizes):
        assert 0 <= k <= n
        assert k >= math.floor(n * (1 - cap) + 1e-9)
        if cap > s:
            assert 1 - k / n <= cap + 1e-12
    for i in range(groups):
        for j in range(groups):
            if sizes[i] == sizes[j] and scores[i] > scores[j]:
                assert keep[i] >= keep[j]


def test_cap_below_target_is_rejected():
    with pytest.raises(ValueError, match="max per-layer sparsity"):
        allocate_sparsity([1.0, 1.0], [10, 10], sparsity=0.5, max_sparsity=0.4)


def test_split_count_is_exact_and_proportional():
    parts = split_count(101, [10, 20, 70])
    assert sum(parts) == 101
    assert parts == [10, 20, 71]
