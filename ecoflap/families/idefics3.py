"""Idefics3 and SmolVLM: a SigLIP-style vision encoder, a pixel-shuffle connector, and a
Llama-family language model (SmolLM for SmolVLM).

An image becomes tiles (a grid of crops plus the whole image), each `image_seq_len`
image tokens after the connector. A batch pads every sample to the same number of
tiles with all-zero tiles, which the model drops before the encoder; inside a tile,
patches the pixel mask leaves out are padding as well (their keys are masked out).

SmolVLM's processor always builds a video processor (torchvision) and needs num2words
(for video frame timestamps); without them the image processor and the tokenizer are
loaded alone.
"""

from __future__ import annotations

import logging

import torch
from transformers import SmolVLMProcessor
from transformers.models.smolvlm import processing_smolvlm
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_num2words_available, is_torchvision_available

from .base import Family, Stack, text_positions

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def tile_positions(patch_size: int):
    """Real patches of the real tiles, (tiles, patches), by the model's own rule."""

    def positions(batch: dict) -> torch.Tensor:
        pixels = batch["pixel_values"]
        tiles = pixels.reshape(-1, *pixels.shape[2:])
        real = (tiles == 0).sum(dim=(-1, -2, -3)) != tiles.shape[1:].numel()
        real[0] |= ~real.any()
        mask = batch.get("pixel_attention_mask")
        if mask is None:
            mask = torch.ones((tiles.shape[0], *tiles.shape[2:]), dtype=torch.bool, device=tiles.device)
        else:
            mask = mask.reshape(-1, *mask.shape[2:])
        grid = mask[real].unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)
        return (grid.sum(dim=(-1, -2)) > 0).reshape(grid.shape[0], -1)

    return positions


class Idefics3(Family):
    name = short = "Idefics3"
    model_types = ("idefics3",)
    model_class = "Idefics3ForConditionalGeneration"
    chat_template = CHAT_TEMPLATE
    end_token = "<end_of_utterance>"

    def stacks(self, model) -> list[Stack]:
        inner = model.model
        patch = model.config.vision_config.patch_size
        return [
            Stack("vision", "vision", inner.vision_model, list(inner.vision_model.encoder.layers),
                  tile_positions(patch)),
            Stack("projection", "projection", inner.connector, [inner.connector], transformer=False),
            Stack("language", "language", inner.text_model, list(inner.text_model.layers), text_positions),
        ]

    def process(self, processor, images: list, prompts: list[str]) -> dict:
        """One list of images per sample."""
        return super().process(processor, [[image] for image in images], prompts)

    def max_image_tokens(self, processor, config) -> int:
        """Every tile of the largest grid and the whole image, each with its image tokens,
        a tile marker and a separator around it."""
        images = processor.image_processor
        per_side = -(-images.size.longest_edge // images.max_image_size["longest_edge"])
        return (per_side * per_side + 1) * (processor.image_seq_len + 3)


class SmolVLM(Idefics3):
    name = short = "SmolVLM"
    model_types = ("smolvlm",)
    model_class = "SmolVLMForConditionalGeneration"
    chat_template = processing_smolvlm.DEFAULT_CHAT_TEMPLATE

    def load_processor(self, source: str):
        if is_torchvision_available() and is_num2words_available():
            return super().load_processor(source)
        log.warning("%s: image processor and tokenizer loaded without the video processor, which needs "
                    "torchvision and num2words (not installed): images work, videos do not", self.name)
        return ImageOnlySmolVLMProcessor.from_pretrained(source)


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLM's processor without its video processor and without num2words.

    As `base.image_only`, with SmolVLM's own keyword spelled out; num2words only spells
    video frame counts, so a stand-in is put in place while the parent initialises, and
    chat templates are rendered as every other processor does (SmolVLM's own method
    reads the video processor's frame settings).
    """

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None,
                 **kwargs):
        spelled = processing_smolvlm.num2words
        if spelled is None:
            processing_smolvlm.num2words = str
        try:
            super().__init__(image_processor, tokenizer, video_processor=None, image_seq_len=image_seq_len,
                             chat_template=chat_template, **kwargs)
        finally:
            processing_smolvlm.num2words = spelled

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


ImageOnlySmolVLMProcessor.__name__ = ImageOnlySmolVLMProcessor.__qualname__ = SmolVLMProcessor.__name__
