"""Every bound of a pruning setting at its edges, written here by hand: the edge (what a
person, an API or the command line sends) and the library's check (`PruneOptions.check`)
accept the same values and refuse the same ones with the same single message."""

import math

import pytest

from ecoflap.forms import from_settings, sparsity_value
from ecoflap.methods import get_method
from ecoflap.options import PruneOptions

ECOFLAP = get_method("ecoflap_zeroth")  # the cap is checked against the target only where ECoFLaP allocates

# (setting, accepted, refused, the message before " (got ...)")
BOUNDS = [
    ("sparsity", [0, 0.0, -0.0, 0.5, 0.95], [0.9500001, 1, 1.0, -0.1, -1e-12, math.nan, math.inf],
     "sparsity must be a number from 0 to 0.95"),
    ("eps", [1e-8, 1e-3, 0.1], [0.99e-8, 0.0, -0.0, -1e-3, 0.1000001, 1, math.nan],
     "eps (the zeroth-order step; the paper's is 1e-3) must be a number from 1e-08 to 0.1"),
    ("seed", [0, 1, 2**31 - 1], [-1, 2**31, 2**64, 2.5], "seed must be a whole number from 0 to 2147483647"),
    ("samples", [1, 10_000], [0, -1, 10_001, 1.5], "calibration samples must be a whole number from 1 to 10000"),
    ("stage1_samples", [1, 10_000], [-1, 10_001], "stage-1 samples must be a whole number from 1 to 10000"),
    ("batch_size", [1, 64], [0, 65, 1000], "batch size must be a whole number from 1 to 64"),
    ("noise_samples", [1, 64], [0, 65], "noise samples must be a whole number from 1 to 64"),
    ("max_sparsity", [0.5, 1, 1.0], [1.0000001, 2, -0.5], "max per-layer sparsity must be a number from 0 to 1"),
    ("owl_m", [1, 5, 100], [0.999, 100.001, -5], "OWL's M (outliers are scores above M times the block's mean) "
                                               "must be a number from 1 to 100"),
    ("owl_lambda", [0, -0.0, 0.5], [-0.01, 0.5000001], "OWL's lambda (how far a block's sparsity may be from the "
                                                      "target) must be a number from 0 to 0.5"),
    ("vision_sparsity", [0, 0.95], [0.9500001, 1, -0.1], "vision sparsity must be a number from 0 to 0.95"),
]
CASES = [(name, value, message) for name, _, refused, message in BOUNDS for value in refused]
ACCEPTED = [(name, value) for name, accepted, _, _ in BOUNDS for value in accepted]


def at_the_edge(name, value):
    return sparsity_value(value) if name == "sparsity" else getattr(from_settings(**{name: value}), name)


def in_the_library(name, value, target=0.5):
    if name == "sparsity":
        return PruneOptions().check(ECOFLAP, value)
    return PruneOptions(**{name: value}).check(ECOFLAP, target)


@pytest.mark.parametrize("name,value,message", CASES)
def test_each_bound_refuses_with_one_message_at_the_edge_and_in_the_library(name, value, message):
    expected = f"{message} (got {value!r})"
    with pytest.raises(ValueError) as edge:
        at_the_edge(name, value)
    with pytest.raises(ValueError) as library:
        in_the_library(name, value)
    assert str(edge.value) == str(library.value) == expected


@pytest.mark.parametrize("name,value", ACCEPTED)
def test_each_bound_accepts_its_ends_at_the_edge_and_in_the_library(name, value):
    parsed = at_the_edge(name, value)
    assert parsed == value
    if value == 0:
        assert math.copysign(1, parsed) == 1  # the edge hands on -0.0 as 0.0
    in_the_library(name, value, target=0.0 if name == "max_sparsity" else 0.5)


def test_the_edge_reads_text_and_the_library_takes_numbers_only():
    assert sparsity_value(" 0.95 ") == 0.95 and from_settings(seed="2147483647").seed == 2**31 - 1
    assert from_settings(eps="1e-8").eps == 1e-8 and from_settings(batch_size="64.0").batch_size == 64
    for text, message in [("0.9500001", "sparsity must be a number from 0 to 0.95 (got '0.9500001')"),
                          ("abc", "sparsity must be a number from 0 to 0.95 (got 'abc')")]:
        with pytest.raises(ValueError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
            sparsity_value(text)
    with pytest.raises(ValueError, match=r"^seed must be a whole number from 0 to 2147483647 \(got '7'\)$"):
        PruneOptions(seed="7").check(ECOFLAP, 0.5)
    with pytest.raises(ValueError, match=r"^sparsity must be a number from 0 to 0.95 \(got True\)$"):
        PruneOptions().check(ECOFLAP, True)


def test_zero_and_blank_mean_the_default_where_the_default_is_not_a_number():
    options = from_settings(max_sparsity=0, stage1_samples="", vision_sparsity="  ")
    assert (options.max_sparsity, options.stage1_samples, options.vision_sparsity) == (None, None, None)
    assert from_settings(vision_sparsity=0).vision_sparsity == 0.0  # a dense encoder, not "the target"
    assert from_settings() == PruneOptions()


@pytest.mark.parametrize("edge,options,message", [
    (dict(modules=["vision", "nope"]), dict(include=("vision", "nope")),
     "each module set must be one of vision, qformer, projection, language (got 'nope')"),
    (dict(modules=[]), dict(include=()), "choose at least one module set to prune"),
    (dict(granularity="row"), dict(granularity="row"), "granularity must be one of layer, block, model (got 'row')"),
    (dict(aggregate="max"), dict(aggregate="max"), "aggregate must be one of sum, avg (got 'max')"),
    (dict(loss="mse"), dict(loss="mse"), "the calibration loss must be one of answer, prefix_lm (got 'mse')"),
    (dict(nm="4:2"), dict(nm="4:2"), "N:M needs 0 < N < M, e.g. 2:4 (got '4:2')"),
])
def test_choices_refuse_with_one_message_at_the_edge_and_in_the_library(edge, options, message):
    with pytest.raises(ValueError) as at_edge:
        from_settings(**edge)
    with pytest.raises(ValueError) as in_library:
        PruneOptions(**options).check(ECOFLAP, 0.5)
    assert str(at_edge.value) == str(in_library.value) == message


@pytest.mark.parametrize("method,sparsity,options,message", [
    ("ecoflap_zeroth", 0.5, PruneOptions(max_sparsity=0.4999), "max per-layer sparsity (0.4999) is below the target"),
    ("wanda", 0.6, PruneOptions(nm="2:4"), "2:4 zeroes 2 of every 4 weights, a sparsity of 0.50: set the sparsity"),
    ("owl", 0.5, PruneOptions(nm="2:4"), "N:M mode fixes every layer's sparsity"),
])
def test_what_depends_on_the_method_and_target_is_the_checks(method, sparsity, options, message):
    with pytest.raises(ValueError, match=message.replace("(", "[(]").replace(")", "[)]")):
        options.check(get_method(method), sparsity)
    assert PruneOptions(max_sparsity=0.5).check(ECOFLAP, 0.5) is None  # the cap may equal the target
    assert PruneOptions(nm="2:4").check(get_method("wanda"), 0.5) == (2, 4)
