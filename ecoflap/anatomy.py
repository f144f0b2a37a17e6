"""Where the prunable weights of a BLIP-2 are, in forward order.

This is the one place that knows how BLIP-2's modules are named. Everything else works on
`Stack` and `PrunableLayer` objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

MODALITIES = ("vision", "qformer", "language")
DEFAULT_INCLUDE = ("vision", "language")
INCLUDE_CHOICES = ("vision", "qformer", "projection", "language")
GRANULARITIES = ("layer", "block", "model")


@dataclass
class Stack:
    """A run of transformer blocks executed one after another inside `container`.

    `container` is the module whose output everything downstream depends on; once the
    stack is done its output can be replayed instead of recomputed.
    """

    name: str
    modality: str
    container: nn.Module
    blocks: list[nn.Module]
    include_key: str


@dataclass
class PrunableLayer:
    """One prunable linear layer and where it sits."""

    name: str
    module: nn.Linear
    modality: str
    stack: str
    block: int
    index: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.module.weight.numel()

    @property
    def block_name(self) -> str:
        return f"{self.stack}.{self.block}"


def stacks(model) -> list[Stack]:
    """All block stacks of a Blip2ForConditionalGeneration, in forward order."""
    result = [
        Stack("vision", "vision", model.vision_model, list(model.vision_model.encoder.layers), "vision"),
        Stack("qformer", "qformer", model.qformer, list(model.qformer.encoder.layer), "qformer"),
        Stack("projection", "qformer", model.language_projection, [model.language_projection], "projection"),
    ]
    lm = model.language_model
    if model.config.use_decoder_only_language_model:
        decoder = lm.get_decoder()
        result.append(Stack("language", "language", decoder, list(_block_list(decoder)), "language"))
    else:
        encoder, decoder = lm.get_encoder(), lm.get_decoder()
        result.append(Stack("language.encoder", "language", encoder, list(_block_list(encoder)), "language"))
        result.append(Stack("language.decoder", "language", decoder, list(_block_list(decoder)), "language"))
    return result


def _block_list(stack_module: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks of a language-model stack (OPT `layers`, T5 `block`)."""
    for attr in ("layers", "block"):
        blocks = getattr(stack_module, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"no transformer block list found in {type(stack_module).__name__}")


def prunable_layers(model, include=DEFAULT_INCLUDE) -> list[PrunableLayer]:
    """The linear layers to prune, in forward order; `include` picks the stacks."""
    unknown = set(include) - set(INCLUDE_CHOICES)
    if unknown:
        raise ValueError(f"unknown module set(s) {sorted(unknown)}: choose from {', '.join(INCLUDE_CHOICES)}")
    names = {module: name for name, module in model.named_modules()}
    layers = []
    for stack in stacks(model):
        if stack.include_key not in include:
            continue
        for b, block in enumerate(stack.blocks):
            linears = [block] if isinstance(block, nn.Linear) else [
                m for m in block.modules() if isinstance(m, nn.Linear)
            ]
            for module in linears:
                layers.append(PrunableLayer(names[module], module, stack.modality, stack.name, b))
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
    """Total parameters and prunable weights per modality."""
    per_modality = {m: 0 for m in MODALITIES}
    for layer in prunable_layers(model, include):
        per_modality[layer.modality] += layer.numel
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "prunable": sum(per_modality.values()),
        "prunable_by_modality": per_modality,
    }
