"""Where the prunable weights of a vision-language model are, in forward order.

Each model family (see `families`) knows how it names its modules and which input
positions of each stack are real tokens, and describes its stacks; this module turns
them into prunable layers, groups them and counts them. Everything else works on
`Stack` and `PrunableLayer` objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import families
from .families import Positions, Stack, every_position

MODALITIES = ("vision", "qformer", "projection", "language")
DEFAULT_INCLUDE = ("vision", "language")
INCLUDE_CHOICES = MODALITIES
GRANULARITIES = ("layer", "block", "model")


@dataclass
class PrunableLayer:
    """One prunable linear layer, where it sits, and which of its input rows are real."""

    name: str
    module: nn.Linear
    modality: str
    stack: str
    block: int
    positions: Positions = every_position
    index: int = 0

    @property
    def numel(self) -> int:
        return self.module.weight.numel()

    @property
    def block_name(self) -> str:
        return f"{self.stack}.{self.block}"

    def real_rows(self, x: torch.Tensor, batch: dict) -> torch.Tensor:
        """The layer's input `x` as (rows, features), keeping only real tokens.

        `x` may be (batch, positions, features) or flattened to (batch * positions,
        features), as OPT's feed-forward layers receive it.
        """
        mask = self.positions(batch)
        features = x.shape[-1]
        if mask is None:
            return x.reshape(-1, features)
        mask = mask.to(x.device)
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask]
        if x.dim() == 2 and x.shape[0] == mask.numel():
            return x[mask.reshape(-1)]
        raise ValueError(
            f"{self.name}: an input of shape {tuple(x.shape)} does not line up with the "
            f"{tuple(mask.shape)} positions its tokens come from"
        )


def stacks(model) -> list[Stack]:
    """All block stacks of a model, in forward order, as its family describes them."""
    return families.of(model).stacks(model)


def transformer_blocks(model) -> list[nn.Module]:
    """Every transformer block of the model, in forward order (not a bare projection)."""
    return [block for stack in stacks(model) if stack.transformer for block in stack.blocks]


def prunable_layers(model, include=DEFAULT_INCLUDE) -> list[PrunableLayer]:
    """The linear layers to prune, in forward order; `include` picks the stacks. What the
    family marks unused (computed, but never reaching the output) is never prunable."""
    names = {module: name for name, module in model.named_modules()}
    layers = []
    for stack in stacks(model):
        if stack.modality not in include:
            continue
        for b, block in enumerate(stack.blocks):
            linears = [block] if isinstance(block, nn.Linear) else [
                m for m in block.modules() if isinstance(m, nn.Linear)
            ]
            for module in linears:
                if module in stack.unused:
                    continue
                layers.append(PrunableLayer(names[module], module, stack.modality, stack.name, b,
                                            stack.rows.get(module, stack.positions)))
    for i, layer in enumerate(layers):
        layer.index = i
    return layers


def group_key(layer: PrunableLayer, granularity: str) -> str:
    """The name of the group a layer belongs to at a granularity."""
    if granularity == "layer":
        return layer.name
    if granularity == "block":
        return layer.block_name
    if granularity == "model":
        return layer.modality
    raise ValueError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")


def parameter_counts(model, include=DEFAULT_INCLUDE) -> dict:
    """Total parameters, prunable weights of the `include` sets, and of every set per
    modality; `unused`: what the model computes but never uses (never pruned), and why."""
    per_modality = {m: 0 for m in MODALITIES}
    for layer in prunable_layers(model, INCLUDE_CHOICES):
        per_modality[layer.modality] += layer.numel
    names = {module: name for name, module in model.named_modules()}
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "prunable": sum(per_modality[m] for m in include),
        "prunable_by_modality": per_modality,
        "unused": {names[m]: why for stack in stacks(model) for m, why in stack.unused.items()},
    }
