"""Which input rows count: statistics over exactly the real tokens, whatever the batching.

The reference here is independent of the library's token rules: every example run alone
(batch size 1 has no padding, so every position is real), inputs captured by hooks of
the test's own on every prunable layer.
"""

import pytest
import torch

from ecoflap.anatomy import INCLUDE_CHOICES, prunable_layers
from ecoflap.data import batches
from ecoflap.replay import BlockReplay

from conftest import inputs_alone, masks_at_batch_sizes, tiny_model


def test_statistics_are_sums_over_exactly_the_real_tokens(family, examples):
    loaded = tiny_model(family)
    layers = prunable_layers(loaded.model, INCLUDE_CHOICES)
    chosen = examples[:12]
    seen = {}
    for block in BlockReplay(loaded.model, batches(loaded, chosen, 8)).blocks(layers):
        seen.update(block.input_statistics(hessian=True))
    reference = inputs_alone(loaded, layers, chosen)
    assert set(seen) == {layer.name for layer in layers}
    for name, (sq, hessian, rows) in reference.items():
        stats = seen[name]
        assert stats.tokens == rows, name
        assert torch.allclose(stats.sq_norm.double(), sq, rtol=1e-4, atol=1e-6), name
        assert torch.allclose(stats.hessian.double(), hessian, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_masks_do_not_depend_on_the_batch_size(family, examples, method):
    """Batch size 1 has no padding; batch size 8 pads (the shipped set is 17% padding)."""
    masks = masks_at_batch_sizes(tiny_model(family), method, (1, 8), examples, samples=16)
    for name, mask in masks[0].items():
        assert torch.equal(mask, masks[1][name]), (name, (mask != masks[1][name]).float().mean().item())
