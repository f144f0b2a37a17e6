"""Qwen2-VL and Qwen2.5-VL: a ViT over variable-size images, a patch merger, and a Qwen2
language model with multimodal rotary positions (M-RoPE).

The vision blocks see the patches of every image of a batch packed into one sequence,
(patches, features), separated by `cu_seqlens`: no batch dimension and no padding, so
every row is real, and the number of image tokens follows each image's size. The
blocks and the merger run inline in `model.visual.forward`, so the vision stack has no
container of its own (see `Stack`); the merger's stack uses `model.visual`.

Their processors always build a video processor, which needs torchvision; without it,
the image processor and the tokenizer are loaded alone.
"""

from __future__ import annotations

import logging

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.utils import is_torchvision_available

from .base import Family, Stack, image_only, text_positions

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen2VL(Family):
    name = short = "Qwen2-VL"
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = Qwen2VLProcessor
    chat_template = CHAT_TEMPLATE
    answer_separator = ""  # the answer starts its own line
    end_token = "<|im_end|>"
    checkpoint_prefixes = (("model.language_model.", ("model.",)), ("model.visual.", ("visual.",)))

    def load_processor(self, source: str):
        if is_torchvision_available():
            return super().load_processor(source)
        log.warning("%s: image processor and tokenizer loaded without the video processor, which needs "
                    "torchvision (not installed): images work, videos do not", self.name)
        return image_only(self.processor_class).from_pretrained(source)

    def stacks(self, model) -> list[Stack]:
        visual, language = model.model.visual, model.model.language_model
        return [
            Stack("vision", "vision", None, list(visual.blocks)),
            Stack("projection", "projection", visual, [visual.merger], transformer=False),
            Stack("language", "language", language, list(language.layers), text_positions),
        ]

    def max_image_tokens(self, processor, config) -> int:
        """Images are resized to at most `longest_edge` pixels; each token merges
        merge_size x merge_size patches."""
        images = processor.image_processor
        return images.size.longest_edge // (images.patch_size * images.merge_size) ** 2


class Qwen2_5VL(Qwen2VL):
    """Qwen2-VL with window attention in most vision blocks and a SwiGLU vision MLP."""

    name = short = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = Qwen2_5_VLProcessor
