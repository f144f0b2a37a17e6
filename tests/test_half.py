"""Half precision: ECoFLaP's zeroth-order estimate, the loss and the model casts."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ecoflap.data import batches, calibration_loss
from ecoflap.gradients import LossScale
from ecoflap.importance import MIN_STEP, directional_derivative, resolvable_step
from ecoflap.models import load_model
from ecoflap.options import PruneOptions
from ecoflap.pipeline import prune
from ecoflap.precision import allocation_drift, cast, gradient_underflow, rank_correlation

from conftest import random_examples, tiny_model
from tiny_families import tiny, varied_examples


class LinearLoss(nn.Module):
    """A 'model' whose loss is sum(G * W) in float64: its exact directional derivative
    along any step d is G . d, so the estimator can be checked by hand."""

    def __init__(self, weight: torch.Tensor, gradient: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.gradient = gradient

    def forward(self, use_cache=False):
        return SimpleNamespace(loss=(self.gradient * self.weight.double()).sum())


def test_the_difference_is_divided_by_the_step_really_taken():
    """bfloat16 keeps 8 significant bits: at 1.5 the spacing is 2^-7, at 384 it is 2, so a
    step of 2^-7 moves 1.5 exactly and 384 not at all. With eps = 2^-7 and z = (1, 1, -2, 1)
    the step applied is d = 2^-6 (1, 0, -2, 0); the estimate is the derivative along d
    (G.d / |d|) times |z|, where the nominal 2 eps would give G.d / 2^-6 = -5."""
    weight = torch.tensor([1.5, 384.0, 1.5, 384.0], dtype=torch.bfloat16)
    gradient = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    model = LinearLoss(weight.clone(), gradient)
    estimate = directional_derivative(model, model.weight, {}, torch.tensor([1.0, 1.0, -2.0, 1.0]), 2.0**-7)
    assert estimate == pytest.approx(-5 * (7 / 5) ** 0.5, rel=1e-9)
    assert torch.equal(model.weight, weight)


def test_dividing_by_the_step_taken_keeps_the_estimate_unbiased_where_steps_are_lost():
    """Half the weights too large for the step (it rounds away): over many directions the
    mean |estimate| still matches E|G.z| = sqrt(2 / pi) |G|, where dividing by the nominal
    2 eps loses the lost half's share (about 1 / sqrt(2) of it)."""
    n, draws, eps = 2000, 400, 2.0**-7
    generator = torch.Generator().manual_seed(0)
    weight = torch.where(torch.arange(n) % 2 == 0, 1.5, 384.0).to(torch.bfloat16)
    gradient = torch.randn(n, generator=generator, dtype=torch.float64)
    model = LinearLoss(weight.clone(), gradient)
    expected = (2 / torch.pi) ** 0.5 * float(gradient.norm())
    applied, nominal = 0.0, 0.0
    for _ in range(draws):
        z = torch.randn(n, generator=generator).clamp(-3, 3)
        estimate = directional_derivative(model, model.weight, {}, z, eps)
        applied += abs(estimate) / draws
        moved = (weight.float() + eps * z).to(torch.bfloat16).double() - (weight.float() - eps * z).to(torch.bfloat16).double()
        nominal += abs(float(gradient @ moved)) / (2 * eps) / draws
    assert applied == pytest.approx(expected, rel=0.1)
    assert nominal < 0.8 * expected


def test_a_step_lost_everywhere_is_refused():
    model = LinearLoss(torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="lost to rounding"):
        directional_derivative(model, model.weight, {}, torch.ones(3), 1e-3)


def test_half_precision_takes_a_step_it_can_resolve():
    assert resolvable_step(1e-3, torch.float32) == 1e-3
    assert resolvable_step(1e-3, torch.bfloat16) == MIN_STEP[torch.bfloat16] > 1e-3
    assert resolvable_step(1e-3, torch.float16) == MIN_STEP[torch.float16] > 1e-3
    assert resolvable_step(0.05, torch.bfloat16) == 0.05


def _head_loss(loaded, batch):
    """The loss from the last hidden state by hand: float32 logits, cross-entropy on the labels."""
    head = loaded.model.get_output_embeddings()
    seen = {}
    handle = head.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            loaded.model(**batch, use_cache=False)
    finally:
        handle.remove()
    logits = F.linear(seen["x"].float(), head.weight.float())
    labels = batch["labels"]
    if loaded.decoder_only:
        logits, labels = logits[:, -labels.shape[1]:][:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("family", ["t5", "opt"])
def test_the_loss_is_float32_from_float32_logits(family, examples):
    loaded = tiny_model(family)
    with cast(loaded, torch.bfloat16) as half:
        batch = batches(half, examples[:4], 4)[0]
        with torch.no_grad():
            loss = calibration_loss(half.model, batch)
            plain = half.model(**batch, use_cache=False).loss
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(_head_loss(half, batch).item(), rel=1e-5)
        if family == "t5":
            assert plain.dtype == torch.bfloat16  # what transformers alone returns


def test_cast_puts_every_tensor_back_bit_for_bit():
    loaded = tiny(("qwen2_vl"))
    before = {n: (t.dtype, t.clone()) for n, t in [*loaded.model.named_parameters(), *loaded.model.named_buffers()]}
    with cast(loaded, torch.float16) as half:
        assert half.dtype == torch.float16 and loaded.dtype == torch.float32
        assert all(p.dtype == torch.float16 for p in loaded.model.parameters())
    for n, t in [*loaded.model.named_parameters(), *loaded.model.named_buffers()]:
        assert t.dtype == before[n][0] and torch.equal(t, before[n][1]), n


def test_rank_correlation_hand_worked():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2, 3) against (1.5, 1.5, 3): 1 - 6 sum d^2 / ... does not hold with ties;
    # Pearson on the ranks: x - mean = (-1, 0, 1), y - mean = (-0.5, -0.5, 1) -> 1.5 / sqrt(2 * 1.5)
    assert rank_correlation([1, 2, 3], [5, 5, 9]) == pytest.approx(1.5 / 3**0.5)


def test_the_report_names_the_step_taken(examples):
    loaded = tiny_model("opt")
    options = PruneOptions(samples=4, stage1_samples=4, batch_size=4)
    assert prune(loaded, "ecoflap", 0.5, options, examples).options["zeroth_step"] == 1e-3
    with cast(loaded, torch.bfloat16) as half:
        assert prune(half, "ecoflap", 0.5, options, examples).options["zeroth_step"] == MIN_STEP[torch.bfloat16]


def _assert_within_float32_spread(drift):
    spread = drift["float32_seeds"]["max_sparsity_difference"]
    for dtype, distance in drift.items():
        assert distance["max_sparsity_difference"] <= spread, (dtype, drift)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llava"])
def test_bfloat16_allocation_is_as_close_to_float32_as_another_seed(family):
    """ECoFLaP's allocation in bfloat16 differs from float32's (same seed) by no more than
    float32's own allocations of two seeds."""
    loaded = tiny_model("t5") if family == "t5" else tiny("llava")
    examples = random_examples(32) if family == "t5" else varied_examples(32)
    _assert_within_float32_spread(allocation_drift(loaded, ("bfloat16",), calibration=examples))


@pytest.mark.slow
def test_shipped_model_allocates_in_half_precision_as_in_float32():
    _assert_within_float32_spread(allocation_drift(load_model(dtype="float32"), ("bfloat16", "float16")))


def test_loss_scale_lifts_small_float16_gradients_out_of_the_subnormal_range():
    """d/dw of 1e-6 * w (a float32 loss, as `calibration_loss` gives) is 1e-6, a float16
    subnormal (spacing 6e-8, so 6% off); scaled by 2^16 it is a normal number, and
    unscaled in float32 it is 1e-6 to float16's 11 bits."""
    weight = nn.Parameter(torch.ones(4, dtype=torch.float16))
    for initial, tolerance in [(1.0, 0.1), (2.0**16, 1e-3)]:
        scale = LossScale(torch.float16, initial=initial)
        scale.backward((weight.float() * 1e-6).sum())
        raw = weight.grad.clone()
        weight.grad = None
        assert scale.passed()
        assert scale.unscaled(raw).tolist() == pytest.approx([1e-6] * 4, rel=tolerance)
        assert (raw.abs() < torch.finfo(torch.float16).tiny).all() == (initial == 1.0)


def test_loss_scale_backs_off_on_overflow_and_grows_after_clean_passes():
    """A gradient of 40,000 overflows float16 (max 65,504) at any scale above 1: the scale
    halves on each overflow, 16 times from 2^16, and the pass then goes through; after
    `growth_interval` clean passes it doubles."""
    weight = nn.Parameter(torch.ones(2, dtype=torch.float16))
    scale = LossScale(torch.float16, growth_interval=3)
    reruns = 0
    while True:
        scale.backward((weight.float() * 40000.0).sum())
        got = scale.unscaled(weight.grad)
        weight.grad = None
        if scale.passed():
            break
        reruns += 1
    assert reruns == 16 and scale.scale == 1.0 and got.tolist() == [40000.0, 40000.0]
    for _ in range(3):
        scale.backward(weight.float().sum())
        scale.unscaled(weight.grad)
        weight.grad = None
        assert scale.passed()
    assert scale.scale == 2.0
    assert LossScale(torch.bfloat16).scale == LossScale(torch.float32).scale == 1.0
    with pytest.raises(ValueError, match="loss is inf"):
        scale.backward(torch.tensor(float("inf"), requires_grad=True))


@pytest.mark.slow
def test_float16_first_order_loses_no_more_gradients_than_float32():
    """The shipped model's loss is small, so without scaling about half its float16
    gradient entries are subnormal; under the loss scale the zeros are float32's own and
    almost nothing is subnormal."""
    shares = gradient_underflow(load_model(dtype="float32"), samples=8)
    assert shares["float16_unscaled"]["subnormal"] > 0.3
    assert shares["float16_scaled"]["zero"] <= shares["float32"]["zero"] + 1e-4
    assert shares["float16_scaled"]["subnormal"] < 1e-3


def test_the_float32_head_runs_inside_accelerates_offload_hooks():
    """With the weights offloaded (accelerate's hooks bring them in for each forward),
    the head's inner forward is the one swapped: same float32 loss as the model held whole."""
    import dataclasses

    from accelerate import cpu_offload

    loaded = tiny("llava")
    loaded.model.to(torch.bfloat16)
    loaded = dataclasses.replace(loaded, dtype=torch.bfloat16)
    batch = batches(loaded, varied_examples(4), 4)[0]
    with torch.no_grad():
        whole = calibration_loss(loaded.model, batch)
        cpu_offload(loaded.model, execution_device=torch.device("cpu"))
        assert loaded.model.get_output_embeddings().weight.device.type == "meta"
        offloaded = calibration_loss(loaded.model, batch)
    assert whole.dtype == offloaded.dtype == torch.float32 and torch.equal(whole, offloaded)


def test_float16_gradient_histograms_see_the_gradients_float32_sees():
    """The app's gradient histograms of the shipped model in float16: under the loss scale
    each modality counts float32's zeros (not a few thousand underflowed ones more) and
    its smallest sampled magnitude is near float32's, far below float16's subnormal range."""
    from ecoflap.anatomy import prunable_layers
    from ecoflap.data import default_calibration
    from ecoflap.stats import gradient_histograms

    loaded = load_model(dtype="float32")
    examples = list(default_calibration())[:8]
    full = gradient_histograms(loaded.model, prunable_layers(loaded.model), batches(loaded, examples, 8)[0])
    with cast(loaded, torch.float16) as half:
        halved = gradient_histograms(half.model, prunable_layers(half.model), batches(half, examples, 8)[0])
    for modality, h in full.items():
        assert halved[modality]["zeros"] == h["zeros"], modality
        assert halved[modality]["log10_edges"][0] == pytest.approx(h["log10_edges"][0], abs=0.5)
    assert full["language"]["log10_edges"][0] < -9  # where float16 alone has no numbers
