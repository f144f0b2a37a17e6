"""PaliGemma: a SigLIP vision tower, a linear projector, and a Gemma language model.

Not a chat model: the prompt is a task prefix ("caption en", "answer en <question>"),
the processor puts the image tokens and <bos> in front of it and a newline after it,
and the answer is a suffix the model reads causally while the prefix attends both ways
(token_type_ids 1 on the suffix, 0 on the prefix).
"""

from __future__ import annotations

from .base import Family, Stack, text_positions
from .llava import CHECKPOINT_PREFIXES, vision_layers


class PaliGemma(Family):
    name = short = "PaliGemma"
    model_types = ("paligemma",)
    model_class = "PaliGemmaForConditionalGeneration"
    answer_separator = ""  # the answer starts its own line
    target_types = {"token_type_ids": 1}
    checkpoint_prefixes = CHECKPOINT_PREFIXES

    def stacks(self, model) -> list[Stack]:
        inner = model.model
        return [
            Stack("vision", "vision", inner.vision_tower, list(vision_layers(inner.vision_tower))),
            Stack("projection", "projection", inner.multi_modal_projector, [inner.multi_modal_projector],
                  transformer=False),
            Stack("language", "language", inner.language_model, list(inner.language_model.layers), text_positions),
        ]

    def prompt(self, processor, question: str) -> str:
        question = (question or "").strip()
        return processor.image_token + (f"answer en {question}" if question else "caption en")

    def answer_context(self, prompt: str) -> str:
        return prompt + "\n"

    def max_image_tokens(self, processor, config) -> int:
        return processor.image_seq_length
