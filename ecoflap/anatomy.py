"""Where the prunable weights of a vision-language model are, in forward order.

This is the one place that knows how a model family names its modules and which input
positions of each layer are real tokens. Everything else works on `Stack` and
`PrunableLayer` objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .data import IGNORE

MODALITIES = ("vision", "qformer", "projection", "language")
DEFAULT_INCLUDE = ("vision", "language")
INCLUDE_CHOICES = MODALITIES
GRANULARITIES = ("layer", "block", "model")

# Which positions of a batch are real tokens, as a (batch, positions) bool mask; None: all.
Positions = Callable[[dict], "torch.Tensor | None"]


def every_position(batch: dict) -> None:
    return None


def text_positions(batch: dict) -> torch.Tensor:
    """Positions of the language model's input sequence that are not padding."""
    return batch["attention_mask"].bool()


def target_positions(batch: dict) -> torch.Tensor:
    """Positions of an encoder-decoder's decoder sequence: the target tokens (labels)."""
    return batch["labels"] != IGNORE


@dataclass
class Stack:
    """A run of transformer blocks executed one after another inside `container`.

    `container` is the module whose output everything downstream depends on; once the
    stack is done its output can be replayed instead of recomputed. `positions` says
    which positions of the blocks' hidden states are real for a batch.
    """

    name: str
    modality: str
    container: nn.Module
    blocks: list[nn.Module]
    positions: Positions = every_position
    transformer: bool = True


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
    """All block stacks of a Blip2ForConditionalGeneration, in forward order."""
    result = [
        Stack("vision", "vision", model.vision_model, list(model.vision_model.encoder.layers)),
        Stack("qformer", "qformer", model.qformer, list(model.qformer.encoder.layer)),
        Stack("projection", "projection", model.language_projection, [model.language_projection],
              transformer=False),
    ]
    lm = model.language_model
    if model.config.use_decoder_only_language_model:
        decoder = lm.get_decoder()
        result.append(Stack("language", "language", decoder, list(_block_list(decoder)), text_positions))
    else:
        encoder, decoder = lm.get_encoder(), lm.get_decoder()
        result.append(Stack("language.encoder", "language", encoder, list(_block_list(encoder)), text_positions))
        result.append(Stack("language.decoder", "language", decoder, list(_block_list(decoder)), target_positions))
    return result


def transformer_blocks(model) -> list[nn.Module]:
    """Every transformer block of the model, in forward order (not a bare projection)."""
    return [block for stack in stacks(model) if stack.transformer for block in stack.blocks]


def _block_list(stack_module: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks of a language-model stack (OPT `layers`, T5 `block`)."""
    for attr in ("layers", "block"):
        blocks = getattr(stack_module, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"no transformer block list found in {type(stack_module).__name__}")


def _layer_positions(stack: Stack, block: nn.Module, module: nn.Linear, encoder: Stack | None) -> Positions:
    """Cross-attention keys and values read the encoder's sequence, not the block's own."""
    if encoder is not None and module in _cross_attention_inputs(block):
        return encoder.positions
    return stack.positions


def _cross_attention_inputs(block: nn.Module) -> set[nn.Module]:
    """The key and value projections of a T5 decoder block's cross-attention."""
    layers = getattr(block, "layer", [])
    cross = [l.EncDecAttention for l in layers if hasattr(l, "EncDecAttention")]
    return {m for attention in cross for m in (attention.k, attention.v)}


def prunable_layers(model, include=DEFAULT_INCLUDE) -> list[PrunableLayer]:
    """The linear layers to prune, in forward order; `include` picks the stacks."""
    unknown = set(include) - set(INCLUDE_CHOICES)
    if unknown:
        raise ValueError(f"unknown module set(s) {sorted(unknown)}: choose from {', '.join(INCLUDE_CHOICES)}")
    names = {module: name for name, module in model.named_modules()}
    all_stacks = stacks(model)
    encoder = next((s for s in all_stacks if s.name == "language.encoder"), None)
    layers = []
    for stack in all_stacks:
        if stack.modality not in include:
            continue
        for b, block in enumerate(stack.blocks):
            linears = [block] if isinstance(block, nn.Linear) else [
                m for m in block.modules() if isinstance(m, nn.Linear)
            ]
            for module in linears:
                cross_source = encoder if stack.name == "language.decoder" else None
                layers.append(PrunableLayer(names[module], module, stack.modality, stack.name, b,
                                            _layer_positions(stack, block, module, cross_source)))
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
    """Total parameters, prunable weights of the `include` sets, and of every set per modality."""
    per_modality = {m: 0 for m in MODALITIES}
    for layer in prunable_layers(model, INCLUDE_CHOICES):
        per_modality[layer.modality] += layer.numel
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "prunable": sum(per_modality[m] for m in include),
        "prunable_by_modality": per_modality,
    }
