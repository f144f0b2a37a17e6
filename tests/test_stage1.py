"""ECoFLaP stage 1: the zeroth-order estimate, the first-order scores, and their costs."""

import torch

from ecoflap.importance import (
    Directions,
    directional_derivative,
    first_order_scores,
    joint_directional_derivative,
    zeroth_order_scores,
)
from ecoflap.anatomy import prunable_layers, stacks
from ecoflap.data import batches, calibration_loss

from conftest import tiny_model


def _data(loaded, examples, n=8, batch_size=4):
    return batches(loaded, examples[:n], batch_size)


def _fd_vs_autograd(loaded, examples, eps):
    model = loaded.model
    batch = _data(loaded, examples)[0]
    pairs = []
    for layer in prunable_layers(model):
        weight = layer.module.weight
        z = torch.randn(weight.shape, generator=torch.Generator().manual_seed(layer.index)).to(weight.dtype)
        before = weight.detach().clone()
        estimate = directional_derivative(model, weight, batch, z, eps)
        assert torch.equal(weight, before)
        model.zero_grad()
        loss = calibration_loss(model, batch)
        loss.backward()
        pairs.append((layer.name, estimate, (weight.grad * z).sum().item()))
        model.zero_grad()
    return loss.item(), pairs


def test_finite_difference_matches_autograd_in_float32(family, examples):
    """At the paper's eps = 1e-3, on a smooth model: within 10% (curvature) plus the float32
    resolution of the loss (transformers computes the loss in float32)."""
    loaded = tiny_model(family, smooth=True)
    loss, pairs = _fd_vs_autograd(loaded, examples, 1e-3)
    resolution = torch.finfo(torch.float32).eps * abs(loss) / 2e-3
    for name, estimate, exact in pairs:
        assert abs(estimate - exact) <= 0.1 * abs(exact) + 4 * resolution, (name, estimate, exact)


def test_zeroth_order_leaves_weights_bit_identical_and_builds_no_graph(loaded, examples):
    model = loaded.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad_modes = []
    handle = model.register_forward_hook(lambda m, a, o: grad_modes.append(torch.is_grad_enabled()))
    try:
        scores = zeroth_order_scores(model, prunable_layers(model), _data(loaded, examples))
    finally:
        handle.remove()
    assert grad_modes and not any(grad_modes)
    assert all(s >= 0 for s in scores.values())
    # random vision weights barely move the loss (below float32 resolution), language ones do
    assert any(s > 0 for name, s in scores.items() if name.startswith("language_model"))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None


def test_replayed_zeroth_order_equals_running_the_whole_model(loaded, examples):
    """Starting each perturbed pass at its block changes nothing but the cost."""
    model = loaded.model
    data = _data(loaded, examples, n=8, batch_size=4)
    layers = prunable_layers(model)
    fast = zeroth_order_scores(model, layers, data, seed=3)
    slow = zeroth_order_scores(model, layers, data, seed=3, replay=False)
    resolution = 4 * torch.finfo(torch.float32).eps * 8 / 2e-3
    for layer in layers:
        assert abs(fast[layer.name] - slow[layer.name]) <= 1e-3 * slow[layer.name] + resolution, layer.name


def test_first_order_equals_plain_autograd(loaded, examples):
    model = loaded.model
    data = _data(loaded, examples)
    layers = prunable_layers(model)
    lean = first_order_scores(model, layers, data)
    plain = {layer.name: 0.0 for layer in layers}
    for batch in data:
        model.zero_grad()
        calibration_loss(model, batch).backward()
        for layer in layers:
            plain[layer.name] += (layer.module.weight.grad.abs() * layer.module.weight.abs()).sum().item() / len(data)
    model.zero_grad()
    for name, value in plain.items():
        assert abs(lean[name] - value) <= 1e-4 * abs(value) + 1e-9, name
    assert all(p.grad is None for p in model.parameters())


def test_first_order_checkpoints_every_block_and_restores_forward(loaded, examples):
    """Blocks run twice per batch (forward, then recomputed in backward): counted on the
    first prunable matrix of each block. Scores are unchanged; forwards come back."""
    model = loaded.model
    data = _data(loaded, examples, n=4)
    layers = prunable_layers(model)
    firsts = list({layer.block_name: layer.module for layer in reversed(layers)}.values())
    calls = {id(m): 0 for m in firsts}
    handles = [m.register_forward_pre_hook(lambda m, a: calls.__setitem__(id(m), calls[id(m)] + 1))
               for m in firsts]
    try:
        plain = first_order_scores(model, layers, data, checkpoint=False)
        plain_calls = dict(calls)
        calls.update({k: 0 for k in calls})
        checkpointed = first_order_scores(model, layers, data)
    finally:
        for h in handles:
            h.remove()
    assert set(plain_calls.values()) == {len(data)}
    assert set(calls.values()) == {2 * len(data)}
    for name, value in plain.items():
        assert abs(checkpointed[name] - value) <= 1e-5 * abs(value) + 1e-9, name
    blocks = [b for s in stacks(model) for b in s.blocks]
    assert all("forward" not in b.__dict__ for b in blocks)


def test_joint_perturbation_of_single_matrices_is_the_per_matrix_estimate(loaded, examples):
    model = loaded.model
    data = _data(loaded, examples)
    layers = prunable_layers(model)
    alone = zeroth_order_scores(model, layers, data, seed=5)
    joint = zeroth_order_scores(model, layers, data, seed=5, group_of=lambda layer: layer.name)
    assert joint == alone


def test_joint_finite_difference_matches_autograd_per_block(family, examples):
    """One perturbation of a whole block: the central difference is the sum over its
    matrices of <dL/dW, z>, checked against autograd on a smooth float32 model."""
    loaded = tiny_model(family, smooth=True)
    model = loaded.model
    batch = _data(loaded, examples)[0]
    by_block: dict = {}
    for layer in prunable_layers(model):
        by_block.setdefault(layer.block_name, []).append(layer)
    model.zero_grad()
    loss = calibration_loss(model, batch)
    loss.backward()
    resolution = torch.finfo(torch.float32).eps * abs(loss.item()) / 2e-3
    for name, members in by_block.items():
        weights = [m.module.weight for m in members]
        zs = [torch.randn(w.shape, generator=torch.Generator().manual_seed(m.index)) for w, m in zip(weights, members)]
        before = [w.detach().clone() for w in weights]
        estimate = joint_directional_derivative(model, weights, batch, zs, 1e-3)
        exact = sum((w.grad * z).sum().item() for w, z in zip(weights, zs))
        assert all(torch.equal(w, b) for w, b in zip(weights, before))
        assert abs(estimate - exact) <= 0.1 * abs(exact) + 4 * resolution, (name, estimate, exact)
    model.zero_grad()


def test_joint_perturbation_needs_one_pair_of_passes_per_group(loaded, examples):
    model = loaded.model
    data = _data(loaded, examples)
    layers = prunable_layers(model)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        zeroth_order_scores(model, layers, data, replay=False)
        per_matrix = len(calls)
        calls.clear()
        scores = zeroth_order_scores(model, layers, data, replay=False, group_of=lambda layer: layer.block_name)
        per_block = len(calls)
    finally:
        handle.remove()
    blocks = {layer.block_name for layer in layers}
    assert set(scores) == blocks
    assert per_matrix == 2 * len(data) * len(layers)
    assert per_block == 2 * len(data) * len(blocks)


def test_replaced_forward_puts_back_an_instance_forward_such_as_accelerates():
    from torch import nn

    from ecoflap.forwards import replaced_forward

    plain, hooked = nn.Linear(2, 2), nn.Linear(2, 2)

    def accelerate_like(*args, **kwargs):
        return "hooked"

    hooked.forward = accelerate_like
    x = torch.zeros(1, 2)
    for module in (plain, hooked):
        with replaced_forward(module, lambda *a, **k: "swapped"):
            assert module(x) == "swapped"
    assert "forward" not in plain.__dict__ and isinstance(plain(x), torch.Tensor)
    assert hooked.__dict__["forward"] is accelerate_like and hooked(x) == "hooked"


def test_no_two_random_directions_are_the_same(loaded, examples):
    """Every (matrix, batch, draw) gets its own direction; the old seed arithmetic gave
    two draws the same one once noise samples reached 102."""
    layers = prunable_layers(loaded.model)[:3]
    directions = Directions(0)
    seen = set()
    for layer in layers:
        for _ in range(3 * 110):
            seen.add(hash(directions.draw(layer).numpy().tobytes()))
    assert len(seen) == 3 * 3 * 110


def test_zeroth_order_draws_a_fresh_direction_per_batch_and_draw(loaded, examples, monkeypatch):
    drawn = []
    real = Directions.draw
    monkeypatch.setattr(Directions, "draw", lambda self, layer: drawn.append(real(self, layer)) or drawn[-1])
    layers = prunable_layers(loaded.model)[:2]
    zeroth_order_scores(loaded.model, layers, _data(loaded, examples, n=12, batch_size=4), noise_samples=2)
    assert len(drawn) == 2 * 3 * 2
    assert len({hash(z.numpy().tobytes()) for z in drawn}) == len(drawn)


def test_the_seed_changes_the_directions_and_the_scores(loaded, examples):
    """(A CPU generator keeps 32 bits of its seed: a seed above them would be ignored.)"""
    layer = prunable_layers(loaded.model)[0]
    first = Directions(0).draw(layer)
    for seed in (1, 2**31 - 1):
        assert not torch.equal(first, Directions(seed).draw(layer)), seed
    data = _data(loaded, examples)
    layers = prunable_layers(loaded.model)
    language = [layer for layer in layers if layer.modality == "language"]
    one = zeroth_order_scores(loaded.model, language, data, seed=0)
    other = zeroth_order_scores(loaded.model, language, data, seed=1)
    assert one != other
