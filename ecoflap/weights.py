"""The full weights, kept aside so that any pruning can be undone bit for bit.

Only prunable matrices ever change, so only they are copied (to CPU memory, so that the
accelerator holds one model). Pruned variants are stored the same way and swapped in.
"""

from __future__ import annotations

import torch

from .anatomy import INCLUDE_CHOICES, PrunableLayer, prunable_layers


class WeightStore:
    """Original values of a set of layers, and the means to put them (or a variant) back."""

    def __init__(self, layers: list[PrunableLayer]):
        self.layers = {l.name: l.module for l in layers}
        self.original = self.snapshot()

    @classmethod
    def of(cls, model) -> "WeightStore":
        """The store of every layer any method may prune (all module sets)."""
        return cls(prunable_layers(model, INCLUDE_CHOICES))

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the current weights of the tracked layers."""
        return {name: m.weight.detach().to("cpu", copy=True) for name, m in self.layers.items()}

    @torch.no_grad()
    def load(self, weights: dict[str, torch.Tensor]):
        """Copy stored weights back into the model (same dtype: bit-identical)."""
        for name, tensor in weights.items():
            self.layers[name].weight.copy_(tensor)

    def restore(self):
        self.load(self.original)

    def is_original(self) -> bool:
        return all(torch.equal(m.weight.detach().cpu(), self.original[n]) for n, m in self.layers.items())
