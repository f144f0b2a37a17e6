"""Published architectures written out as configs, with a tokenizer and a processor that
need no download, so `bench --arch` can build them with random weights.

The tokenizer is word-level over the shapes world's words and the words of every
family's prompts, with the family's special tokens (never split); the configs keep
their published vocabulary sizes, so the embeddings are full size and only the first
few rows are ever read.
"""

from __future__ import annotations

import re

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
    Qwen2VLImageProcessorPil,
)

from ..shapes.tokenizer import PUNCTUATION, WORDS
from .base import CAPTION_REQUEST, image_only
from .blip2 import InstructBlip
from .llava import CHAT_TEMPLATE as LLAVA_CHAT_TEMPLATE
from .qwen2_vl import CHAT_TEMPLATE as QWEN_CHAT_TEMPLATE

PROMPT_WORDS = re.findall(r"[a-z]+", f"{CAPTION_REQUEST} {InstructBlip.caption_instruction} caption answer en "
                                    f"question user assistant system".lower())


def word_tokenizer(specials: list[str], *, pad: str, eos: str, bos: str | None = None, unk: str = "<unk>",
                   prepend_bos: bool = False, **named: str) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer; `specials` (and pad, eos, bos, unk) are special
    tokens, never split. `prepend_bos`: every text starts with `bos` (Llama-style).
    `named`: named special tokens (image_token="<image>" gives tokenizer.image_token_id)."""
    ordered = list(dict.fromkeys(t for t in (pad, eos, bos, unk, *specials) if t is not None))
    words = list(dict.fromkeys([*PUNCTUATION, "-", *WORDS, *PROMPT_WORDS]))
    vocab = {token: i for i, token in enumerate(ordered + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if prepend_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    core.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ordered])
    kwargs = {"pad_token": pad, "eos_token": eos, "unk_token": unk, "model_max_length": 4096}
    if bos is not None:
        kwargs["bos_token"] = bos
    if named:
        kwargs["extra_special_tokens"] = dict(named)
    return PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)


def llava_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(["<image>"], pad="<pad>", eos="</s>", bos="<s>", prepend_bos=True, image_token="<image>")


def llava_architecture(tokenizer, vision: dict, text: dict):
    """A LLaVA-1.5 config (CLIP tower read at its second-to-last block, a two-layer GELU
    projector, a Llama language model) and its processor."""
    vision_config = CLIPVisionConfig(**vision)
    size, patch = vision_config.image_size, vision_config.patch_size
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=LlamaConfig(**text, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id).to_dict(),
        image_token_index=tokenizer.image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=(size // patch) ** 2, tie_word_embeddings=False,
    )
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    return config, processor


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2-style: no BOS, turns end with <|im_end|>."""
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    return word_tokenizer(specials, pad="<|endoftext|>", eos="<|im_end|>", image_token="<|image_pad|>",
                          video_token="<|video_pad|>", vision_bos_token="<|vision_start|>",
                          vision_eos_token="<|vision_end|>")


def qwen2_5_vl_architecture(tokenizer, vision: dict, text: dict, min_pixels: int, max_pixels: int):
    """A Qwen2.5-VL config and its processor (images only)."""
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        vision_config=Qwen2_5_VLVisionConfig(**vision).to_dict(),
        text_config=Qwen2_5_VLTextConfig(**text, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                                         eos_token_id=tokenizer.eos_token_id).to_dict(),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    images = Qwen2VLImageProcessorPil(patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                                      temporal_patch_size=vision["temporal_patch_size"],
                                      size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    processor = image_only(Qwen2_5_VLProcessor)(image_processor=images, tokenizer=tokenizer,
                                                chat_template=QWEN_CHAT_TEMPLATE)
    return config, processor


def llava_1_5_7b():
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px, Vicuna-7B v1.5."""
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
    text = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
    return llava_architecture(llava_tokenizer(), vision, text)


def qwen2_5_vl_7b():
    """Qwen/Qwen2.5-VL-7B-Instruct."""
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]})
    return qwen2_5_vl_architecture(qwen_tokenizer(), vision, text, min_pixels=3136, max_pixels=12845056)
