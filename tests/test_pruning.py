"""End-to-end pruning of tiny BLIP-2s (OPT and T5) against independent references."""

import math

import pytest
import torch

from ecoflap.anatomy import prunable_layers, stacks
from ecoflap.data import batches
from ecoflap.options import PruneOptions
from ecoflap.pipeline import prune
from ecoflap.pruners.masks import per_row_count
from ecoflap.weights import WeightStore

from conftest import tiny_model

ALL = ("vision", "qformer", "projection", "language")


def test_anatomy_forward_order_and_tags(loaded, family):
    layers = prunable_layers(loaded.model)
    assert {layer.modality for layer in layers} == {"vision", "language"}
    order = [s.name for s in stacks(loaded.model)]
    positions = [(order.index(layer.stack), layer.block) for layer in layers]
    assert positions == sorted(positions)
    assert layers[0].name.startswith("vision_model.encoder.layers.0.")
    assert all("lm_head" not in layer.name and "embed" not in layer.name for layer in layers)
    everything = prunable_layers(loaded.model, ALL)
    assert {layer.modality for layer in everything} == {"vision", "qformer", "projection", "language"}
    assert any(layer.name == "language_projection" for layer in everything)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_uniform_methods_hit_the_target(loaded, examples, method, sparsity):
    result = prune(loaded, method, sparsity, PruneOptions(samples=16, batch_size=8), examples)
    for row in result.layers:
        layer = loaded.model.get_submodule(row["name"])
        rows, columns = layer.weight.shape
        if method == "wanda":
            per_row = (layer.weight == 0).sum(dim=1)
            assert (per_row == per_row_count(columns, sparsity)).all(), row["name"]
        else:
            assert row["zeros"] == math.floor(rows * columns * sparsity + 1e-9), row["name"]
    total = sum(r["numel"] for r in result.layers)
    rows_total = sum(loaded.model.get_submodule(r["name"]).weight.shape[0] for r in result.layers)
    zeros = result.achieved_sparsity * total
    assert total * sparsity - rows_total - 1e-6 <= zeros <= total * sparsity + 1e-6


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_every_group_has_n_zeros(loaded, examples, method):
    result = prune(loaded, method, 0.5, PruneOptions(samples=8, nm="2:4"), examples)
    for row in result.layers:
        w = loaded.model.get_submodule(row["name"]).weight
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all(), row["name"]


def _inputs_seen_by(model, layer, batches_):
    """Sum of squares of a layer's inputs from plain full forward passes, one example per
    batch (no padding, so every input row is a real token)."""
    total = torch.zeros(layer.module.in_features)
    seen = {}
    handle = layer.module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    try:
        with torch.no_grad():
            for batch in batches_:
                model(**batch)
                x = seen["x"].reshape(-1, seen["x"].shape[-1])
                total += (x * x).sum(0)
    finally:
        handle.remove()
    return total


def test_wanda_zeros_are_the_lowest_scores_with_sequential_inputs(family, examples):
    loaded = tiny_model(family)
    layers = prunable_layers(loaded.model)
    store = WeightStore(layers)
    original_weights = store.originals(store.layers)
    prune(loaded, "wanda", 0.5, PruneOptions(samples=8, batch_size=4), examples)
    pruned = {layer.name: layer.module.weight.detach().clone() for layer in layers}
    data = batches(loaded, examples[:8], 1)
    order = [s.name for s in stacks(loaded.model)]
    checked = 0
    for target in layers:
        if target.block not in (0, 1):
            continue
        # Blocks before the target's are pruned, the target's block and later ones are not:
        # exactly what the target saw during sequential calibration.
        key = (order.index(target.stack), target.block)
        with torch.no_grad():
            for layer in layers:
                before = (order.index(layer.stack), layer.block) < key
                layer.module.weight.copy_((pruned if before else original_weights)[layer.name])
        sq = _inputs_seen_by(loaded.model, target, data)
        original = original_weights[target.name]
        scores = original.abs() * sq.sqrt()
        zero = pruned[target.name] == 0
        k = per_row_count(original.shape[1], 0.5)
        assert (zero.sum(1) == k).all()
        worst_pruned = torch.where(zero, scores, torch.full_like(scores, -1)).max(1).values
        best_kept = torch.where(~zero, scores, torch.full_like(scores, float("inf"))).min(1).values
        assert (worst_pruned <= best_kept * (1 + 1e-4) + 1e-12).all(), target.name
        checked += 1
    assert checked >= 8
    store.restore()


@pytest.mark.parametrize("method", ["ecoflap_zeroth", "ecoflap_zeroth_group", "ecoflap_first"])
@pytest.mark.parametrize("granularity", ["layer", "block", "model"])
def test_ecoflap_keeps_exactly_the_budget(loaded, examples, method, granularity):
    options = PruneOptions(samples=16, stage1_samples=8, granularity=granularity)
    result = prune(loaded, method, 0.5, options, examples)
    total = sum(r["numel"] for r in result.layers)
    zeros = sum(r["zeros"] for r in result.layers)
    assert total - zeros == math.floor(total * 0.5)
    assert sum(g["numel"] - g["keep"] for g in result.groups) == zeros
    for g in result.groups:
        assert g["sparsity"] <= 0.6 + 1e-9
    assert result.timings["stage1_s"] > 0 and result.timings["stage2_s"] > 0
    assert result.peak_memory_bytes > 0


def test_ecoflap_with_sparsegpt_and_all_modules(loaded, examples):
    options = PruneOptions(samples=16, stage1_samples=8, include=ALL, granularity="layer")
    result = prune(loaded, "ecoflap_sparsegpt", 0.6, options, examples)
    total = sum(r["numel"] for r in result.layers)
    assert total - sum(r["zeros"] for r in result.layers) == math.floor(total * 0.4 + 1e-9)
    assert set(result.sparsity_by_modality) == {"vision", "qformer", "projection", "language"}


def _with_dead_neurons(dead: int = 32):
    """The tiny OPT with `dead` feed-forward neurons per language block that never fire
    (ReLU behind a bias of -1e4): the first `dead` inputs of every fc2 are always zero."""
    loaded = tiny_model("opt")
    fc2s = []
    with torch.no_grad():
        for layer in loaded.model.language_model.model.decoder.layers:
            layer.fc1.bias[:dead] = -1e4
            fc2s.append(layer.fc2)
    return loaded, fc2s


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_with_dead_neurons_keeps_exact_counts(examples, sparsity):
    loaded, fc2s = _with_dead_neurons()
    result = prune(loaded, "sparsegpt", sparsity, PruneOptions(samples=16, blocksize=32), examples)
    for row in result.layers:
        assert row["zeros"] == math.floor(row["numel"] * sparsity + 1e-9), row["name"]
    total = sum(r["numel"] for r in result.layers)
    assert sum(r["zeros"] for r in result.layers) == sum(math.floor(r["numel"] * sparsity + 1e-9)
                                                         for r in result.layers)
    assert abs(result.achieved_sparsity - sparsity) * total < len(result.layers)
    for fc2 in fc2s:  # the dead inputs were the first zeros
        assert (fc2.weight[:, :32] == 0).all()


def test_sparsegpt_with_dead_neurons_keeps_exact_nm_groups(examples):
    loaded, fc2s = _with_dead_neurons(dead=48)
    result = prune(loaded, "sparsegpt", 0.5, PruneOptions(samples=16, nm="2:4"), examples)
    for row in result.layers:
        w = loaded.model.get_submodule(row["name"]).weight
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), row["name"]


def test_ecoflap_sparsegpt_with_dead_neurons_keeps_its_budget(examples):
    loaded, _ = _with_dead_neurons(dead=64)
    options = PruneOptions(samples=16, stage1_samples=8, granularity="layer", blocksize=32)
    result = prune(loaded, "ecoflap_sparsegpt", 0.5, options, examples)
    total = sum(r["numel"] for r in result.layers)
    zeros = sum(r["zeros"] for r in result.layers)
    assert total - zeros == math.floor(total * 0.5)
    assert {g["name"]: g["numel"] - g["keep"] for g in result.groups} == {r["name"]: r["zeros"] for r in result.layers}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "ecoflap"])
def test_restore_is_bit_identical_after_any_method(loaded, examples, method):
    layers = prunable_layers(loaded.model, ALL)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    store = WeightStore(layers)
    for _ in range(3):
        prune(loaded, method, 0.6, PruneOptions(samples=8, stage1_samples=8, include=ALL), examples)
        assert not store.is_original()
        store.restore()
    for n, p in loaded.model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize(
    "method,sparsity,options,message",
    [
        ("nope", 0.5, PruneOptions(), "unknown method"),
        ("wanda", 1.0, PruneOptions(), "sparsity must be a number from 0 to 0.95"),
        ("wanda", -0.1, PruneOptions(), "sparsity must be a number from 0 to 0.95"),
        ("ecoflap", 0.5, PruneOptions(max_sparsity=0.4), "below the target"),
        ("ecoflap", 0.5, PruneOptions(eps=0), "eps"),
        ("wanda", 0.5, PruneOptions(nm="4:2"), "N:M"),
        ("wanda", 0.5, PruneOptions(samples=0), "calibration samples must be a whole number from 1 to 10000"),
        ("wanda", 0.5, PruneOptions(samples=10_000), "only 32"),
        ("ecoflap", 0.5, PruneOptions(granularity="row"), "granularity"),
        ("ecoflap", 0.5, PruneOptions(aggregate="max"), "aggregate"),
        ("ecoflap_first", 0.5, PruneOptions(nm="2:4"), "N:M"),
    ],
)
def test_bad_settings_are_rejected_before_any_change(loaded, examples, method, sparsity, options, message):
    store = WeightStore(prunable_layers(loaded.model, ALL))
    with pytest.raises(ValueError, match=message):
        prune(loaded, method, sparsity, options, examples)
    assert store.is_original()


def test_joint_group_scores_are_the_same_replayed_or_not(loaded, examples):
    """One joint perturbation per modality starts at the modality's first block when
    replayed; the estimate must equal running the whole model."""
    from ecoflap.importance import zeroth_order_scores
    from ecoflap.anatomy import group_key
    from ecoflap.data import batches

    data = batches(loaded, examples[:8], 4)
    layers = prunable_layers(loaded.model)
    for granularity in ("block", "model"):
        group_of = lambda layer: group_key(layer, granularity)  # noqa: E731
        fast = zeroth_order_scores(loaded.model, layers, data, seed=2, group_of=group_of)
        slow = zeroth_order_scores(loaded.model, layers, data, seed=2, replay=False, group_of=group_of)
        assert set(fast) == {group_of(layer) for layer in layers}
        resolution = 4 * torch.finfo(torch.float32).eps * 8 / 2e-3
        for name in fast:
            assert abs(fast[name] - slow[name]) <= 1e-3 * slow[name] + resolution, (granularity, name)


def test_calibration_encoding_is_reused_for_the_same_examples(loaded, examples):
    from ecoflap.data import ENCODED_SETS_KEPT, batches
    from ecoflap.families.blip2 import encode

    decoder_only = loaded.decoder_only

    def encoded(chunk):
        return batches(loaded, chunk, 4)

    first = encoded(list(examples[:8]))
    again = encoded(list(examples[:8]))
    assert first[0]["pixel_values"] is again[0]["pixel_values"]
    direct = encode(loaded.processor, examples[4:8], decoder_only)
    assert all(torch.equal(direct[k], first[1][k]) for k in direct)
    shifted = encoded(examples[1:9])
    assert shifted[0]["pixel_values"] is not first[0]["pixel_values"]
    for start in range(2, 2 + ENCODED_SETS_KEPT):
        encoded(examples[start : start + 4])
    assert encoded(examples[:8])[0]["pixel_values"] is not first[0]["pixel_values"]


def test_sparsegpt_frees_each_layers_hessian_once_it_is_pruned(examples, monkeypatch):
    """A block's Hessians do not all live until the block ends: when a layer is pruned,
    the Hessians of the layers pruned before it are gone, freed as their last reference
    goes (no garbage collection asked for), and the Hessian is consumed."""
    import weakref

    import ecoflap.pipeline as pipeline

    real, seen, alive_when_pruning = pipeline.prune_sparsegpt, [], []

    def watched(weight, hessian, *args, **kwargs):
        alive_when_pruning.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(hessian))
        before = hessian.clone()
        mask = real(weight, hessian, *args, **kwargs)
        assert not torch.equal(hessian, before)  # factored in its own storage
        return mask

    monkeypatch.setattr(pipeline, "prune_sparsegpt", watched)
    prune(tiny_model("opt"), "sparsegpt", 0.5, PruneOptions(samples=8), examples)
    assert len(seen) > 8 and alive_when_pruning == [0] * len(seen)
