"""Models built from a config with random weights, nothing downloaded: small BLIP-2s (the
tests' tiny models, the start of the shipped shapes model's training) and the published
full-size architectures, for timing and memory (`python -m ecoflap bench --arch`).
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    OPTConfig,
    T5Config,
)

from . import families
from .families import Family
from .families.architectures import llava_1_5_7b, qwen2_5_vl_7b
from .families.blip2 import IMAGE_TOKEN
from .models import LoadedModel, resolve_device, resolve_dtype
from .shapes.tokenizer import build_tokenizer


def blip2_config(tokenizer, family: str, vision: dict, qformer: dict, text: dict, num_query_tokens: int) -> Blip2Config:
    """A BLIP-2 config from the sizes of its three parts, with an OPT or a T5 language
    model whose special tokens and image token come from `tokenizer`."""
    if family == "opt":
        text_config = OPTConfig(**text, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id)
    elif family == "t5":
        text_config = T5Config(**text, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               decoder_start_token_id=tokenizer.pad_token_id)
    else:
        raise ValueError(f"unknown language model family {family!r}: use 'opt' or 't5'")
    return Blip2Config(
        vision_config=Blip2VisionConfig(**vision).to_dict(),
        qformer_config=Blip2QFormerConfig(**qformer).to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )


def small_blip2_config(
    tokenizer,
    family: str = "opt",
    hidden: int = 32,
    vision_layers: int = 2,
    qformer_layers: int = 1,
    language_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    num_query_tokens: int = 4,
    heads: int = 2,
) -> Blip2Config:
    """A small BLIP-2 config (OPT or T5 language model) whose vocabulary fits `tokenizer`.

    Every Q-Former layer cross-attends to the image (BLIP-2's default is every second
    one, which leaves a 1- or 2-layer Q-Former nearly blind).
    """
    vocab = len(tokenizer)
    vision = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=vision_layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size, initializer_range=0.02)
    qformer = dict(hidden_size=hidden, num_hidden_layers=qformer_layers, num_attention_heads=heads,
                   intermediate_size=4 * hidden, encoder_hidden_size=hidden, vocab_size=vocab,
                   cross_attention_frequency=1)
    if family == "opt":
        text = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=language_layers, ffn_dim=4 * hidden,
                    num_attention_heads=heads, max_position_embeddings=128, word_embed_proj_dim=hidden)
    else:
        text = dict(vocab_size=vocab, d_model=hidden, d_kv=hidden // heads, d_ff=4 * hidden,
                    num_layers=language_layers, num_decoder_layers=language_layers, num_heads=heads,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return blip2_config(tokenizer, family, vision, qformer, text, num_query_tokens)


# The published BLIP-2 architectures, written out so no config needs downloading.
_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
              image_size=224, patch_size=14, initializer_range=0.02)
_QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                encoder_hidden_size=1408, cross_attention_frequency=2)


def blip2_architecture(family: str, text: dict):
    """A published BLIP-2 (ViT-g, 32 queries) with an OPT or a T5 language model, and its
    processor over the shapes world's tokenizer."""
    tokenizer = build_tokenizer(family)
    config = blip2_config(tokenizer, family, _VIT_G, _QFORMER, text, num_query_tokens=32)
    return config, build_processor(tokenizer, config)


# name -> () -> (config, processor)
ARCHITECTURES = {
    "blip2-opt-2.7b": partial(blip2_architecture, "opt", dict(
        hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32, word_embed_proj_dim=2560,
        vocab_size=50304, max_position_embeddings=2048)),
    "blip2-flan-t5-xl": partial(blip2_architecture, "t5", dict(
        d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
        feed_forward_proj="gated-gelu", vocab_size=32128, tie_word_embeddings=False)),
    "llava-1.5-7b": llava_1_5_7b,
    "qwen2.5-vl-7b": qwen2_5_vl_7b,
}


def random_model(arch: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """A full-size published architecture with random weights (no download), for time and
    memory. `device="meta"` builds it without allocating its weights."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    config, processor = ARCHITECTURES[arch]()
    family = families.for_model_type(config.model_type)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target, family, config)
    with torch.device(target):
        model = build_blip2(config) if isinstance(config, Blip2Config) else build_random(family, config)
    model.to(dtype=torch_dtype)
    return LoadedModel(model, processor, f"{arch} (random init)", target, torch_dtype)


def build_random(family: Family, config, seed: int = 0) -> torch.nn.Module:
    """A model of a family with random weights, in eval mode."""
    torch.manual_seed(seed)
    return family.model_loader()(config).eval()


def build_blip2(config: Blip2Config, seed: int = 0) -> Blip2ForConditionalGeneration:
    """A randomly initialised BLIP-2 that is not degenerate.

    transformers' defaults start the ViT at ~zero (initializer_range 1e-10) and the
    query tokens at exactly zero; either one keeps the vision path from ever learning.
    """
    config.vision_config.initializer_range = max(config.vision_config.initializer_range, 0.02)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
    return model.eval()


def build_processor(tokenizer, config: Blip2Config) -> Blip2Processor:
    """A processor for a model built from a config (image size from the vision config)."""
    size = config.vision_config.image_size
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=config.num_query_tokens)
