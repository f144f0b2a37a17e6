"""LLaVA-1.5 and LLaVA-NeXT: a CLIP vision tower, an MLP projector, and a Llama-family
language model (Vicuna, Mistral, ...).

The projector reads the hidden states after one vision block (`vision_feature_layer`,
-2 in the published checkpoints), so the blocks after it run but never reach the
output: they are left out of the stack, and so out of every allocation and chart.
LLaVA-NeXT cuts an image into tiles at any resolution; the model drops the padding
tiles before the tower, so every row the tower sees is real.
"""

from __future__ import annotations

from .base import Family, Stack, submodule, text_positions

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHECKPOINT_PREFIXES = (
    ("model.language_model.", ("language_model.model.",)),
    ("model.vision_tower.", ("vision_tower.", "vision_tower.vision_model.")),
    ("model.multi_modal_projector.", ("multi_modal_projector.",)),
)


def vision_layers(tower):
    """The encoder blocks of a vision tower (CLIP, SigLIP, with or without `vision_model`)."""
    return submodule(tower, "encoder.layers", "vision_model.encoder.layers")


def used_vision_blocks(feature_layer, blocks: int) -> int:
    """How many vision blocks the projector's input depends on.

    hidden_states[k] is the output of block k - 1 (hidden_states[0]: the embeddings), so
    reading layer k (or several) needs the blocks before the last one read.
    """
    layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    return max(k % (blocks + 1) for k in layers)


class Llava(Family):
    name = "LLaVA-1.5"
    short = "LLaVA"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    chat_template = CHAT_TEMPLATE
    checkpoint_prefixes = CHECKPOINT_PREFIXES

    def stacks(self, model) -> list[Stack]:
        inner = model.model
        layers = list(vision_layers(inner.vision_tower))
        feature_layer = model.config.vision_feature_layer
        used = used_vision_blocks(feature_layer, len(layers))
        why = (f"the projector reads the vision features after block {used - 1} "
               f"(vision_feature_layer={feature_layer}), so this block's output never reaches the language model")
        return [
            Stack("vision", "vision", inner.vision_tower, layers[:used], unused={b: why for b in layers[used:]}),
            Stack("projection", "projection", inner.multi_modal_projector, [inner.multi_modal_projector],
                  transformer=False),
            Stack("language", "language", inner.language_model, list(inner.language_model.layers), text_positions),
        ]

    def max_image_tokens(self, processor, config) -> int:
        return config.image_seq_length


class LlavaNext(Llava):
    """Tiles of the image at the best-fitting grid resolution, plus the whole image."""

    name = short = "LLaVA-NeXT"
    model_types = ("llava_next",)
    model_class = "LlavaNextForConditionalGeneration"

    def max_image_tokens(self, processor, config) -> int:
        """The base image, every tile of the largest grid, and one newline per row of features."""
        tile = config.vision_config.image_size
        side = tile // config.vision_config.patch_size
        tiles = max(h * w for h, w in config.image_grid_pinpoints) // (tile * tile)
        return side * side + tiles * side * (side + 1)
