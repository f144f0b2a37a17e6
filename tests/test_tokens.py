"""Which input rows count: statistics over exactly the real tokens, whatever the batching.

The reference here is independent of the library's token rules: every example run alone
(batch size 1 has no padding, so every position is real), inputs captured by hooks of
the test's own on every prunable layer.
"""

import pytest
import torch

from conftest import assert_replay_sees_inputs_alone, masks_at_batch_sizes, tiny_model


def test_statistics_are_sums_over_exactly_the_real_tokens(family, examples):
    assert_replay_sees_inputs_alone(tiny_model(family), examples[:12], 8)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_masks_do_not_depend_on_the_batch_size(family, examples, method):
    """Batch size 1 has no padding; batch size 8 pads (the shipped set is 17% padding)."""
    masks = masks_at_batch_sizes(tiny_model(family), method, (1, 8), examples, samples=16)
    for name, mask in masks[0].items():
        assert torch.equal(mask, masks[1][name]), (name, (mask != masks[1][name]).float().mean().item())
