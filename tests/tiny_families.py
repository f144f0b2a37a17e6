"""Tiny random models of every family beyond BLIP-2, built offline from configs.

Hidden size 32, 2 heads, 2 vision and 2 language blocks (InstructBLIP: 2 Q-Former
layers, and a FlanT5 variant with 2 encoder and 2 decoder blocks), 32 px images in 8 px patches (Qwen: 4 px patches merged 2 x 2): tens of
thousands of parameters, built in a fraction of a second. Tokenizers are word-level
with each family's special tokens; LLaVA-1.5 and Qwen2.5-VL are built by the same
functions as `bench --arch`, at this size.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from transformers import (
    BlipImageProcessorPil,
    CLIPVisionConfig,
    GemmaConfig,
    Idefics3Config,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    InstructBlipConfig,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PaliGemmaConfig,
    PaliGemmaProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen2VLTextConfig,
    Qwen2VLVisionConfig,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMImageProcessorPil,
    SmolVLMVisionConfig,
    T5Config,
)
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

from ecoflap import families
from ecoflap.data import Example
from ecoflap.families.architectures import (
    llava_architecture,
    llava_tokenizer,
    qwen2_5_vl_architecture,
    qwen_tokenizer,
    word_tokenizer,
)
from ecoflap.families.base import image_only
from ecoflap.families.idefics3 import CHAT_TEMPLATE as IDEFICS3_CHAT_TEMPLATE
from ecoflap.families.idefics3 import ImageOnlySmolVLMProcessor
from ecoflap.families.llava import CHAT_TEMPLATE as LLAVA_CHAT_TEMPLATE
from ecoflap.families.qwen2_vl import CHAT_TEMPLATE as QWEN_CHAT_TEMPLATE
from ecoflap.models import LoadedModel
from ecoflap.synthetic import build_random
from ecoflap.shapes.tokenizer import build_tokenizer

HIDDEN, HEADS, SIZE, PATCH = 32, 2, 32, 8
VISION = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
              image_size=SIZE, patch_size=PATCH)
WORDS = "red green blue yellow circle square triangle one two three yes no".split()
QUESTIONS = ["", "what color is the circle?", "how many shapes are there?", "is there a red square?"]
# Aspect ratios that give different numbers of tiles and image tokens where a family allows it.
IMAGE_SIZES = [(40, 30), (64, 64), (80, 20), (24, 56), (50, 50), (30, 70), (64, 40), (33, 33)]


def llama(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=512)


def llama_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(**llama(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)


def _loaded(config, processor, name: str, seed: int) -> LoadedModel:
    model = build_random(families.for_model_type(config.model_type), config, seed)
    return LoadedModel(model, processor, f"tiny-{name}", torch.device("cpu"), torch.float32)


def tiny_instructblip(seed: int = 0, language: str = "llama") -> LoadedModel:
    """A Llama (Vicuna-style) or FlanT5 language model; the Q-Former has a tokenizer of its
    own. The LM tokenizer names no image token: InstructBlipProcessor adds `<image>` itself."""
    if language == "llama":
        tokenizer = word_tokenizer(["<image>"], pad="<pad>", eos="</s>", bos="<s>", prepend_bos=True)
        text = llama_config(tokenizer)
    else:
        tokenizer = build_tokenizer("t5")
        text = T5Config(vocab_size=len(tokenizer), d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=2 * HIDDEN,
                        num_layers=2, num_decoder_layers=2, num_heads=HEADS, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    qformer_tokenizer = word_tokenizer([], pad="[PAD]", eos="[SEP]", unk="[UNK]")
    qformer = InstructBlipQFormerConfig(vocab_size=len(qformer_tokenizer), hidden_size=HIDDEN, num_hidden_layers=2,
                                        num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                                        encoder_hidden_size=HIDDEN, cross_attention_frequency=1,
                                        pad_token_id=qformer_tokenizer.pad_token_id, max_position_embeddings=128)
    config = InstructBlipConfig(vision_config=InstructBlipVisionConfig(**VISION, initializer_range=0.02).to_dict(),
                                qformer_config=qformer.to_dict(), text_config=text.to_dict(), num_query_tokens=4,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    processor = InstructBlipProcessor(image_processor=BlipImageProcessorPil(size={"height": SIZE, "width": SIZE}),
                                      tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer, num_query_tokens=4)
    loaded = _loaded(config, processor, "instructblip" if language == "llama" else "instructblip_t5", seed)
    with torch.no_grad():
        loaded.model.query_tokens.normal_(0.0, 0.02)  # they start at exactly zero
    return loaded


def tiny_instructblip_t5(seed: int = 2) -> LoadedModel:
    """Seed 2: its greedy answers are words (at seed 0 the decoder only says <pad>)."""
    return tiny_instructblip(seed, language="t5")


def tiny_llava(seed: int = 0) -> LoadedModel:
    tokenizer = llava_tokenizer()
    config, processor = llava_architecture(tokenizer, dict(VISION, projection_dim=HIDDEN), llama(tokenizer))
    return _loaded(config, processor, "llava", seed)


def tiny_llava_next(seed: int = 0) -> LoadedModel:
    """Grids of up to 2 x 2 tiles of 32 px."""
    tokenizer = llava_tokenizer()
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**VISION).to_dict(),
                             text_config=llama_config(tokenizer).to_dict(), image_token_index=tokenizer.image_token_id,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=pinpoints, image_seq_length=(SIZE // PATCH) ** 2,
                             tie_word_embeddings=False)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                        image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_CHAT_TEMPLATE)
    return _loaded(config, processor, "llava_next", seed)


def _qwen_text(tokenizer) -> dict:
    """Head size 16: the rotary half, 8, splits into M-RoPE's (time, height, width) sections."""
    return dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def _qwen_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def tiny_qwen2_vl(seed: int = 0) -> LoadedModel:
    """Images resized to 4 to 16 merged 8 px units."""
    tokenizer = qwen_tokenizer()
    vision = Qwen2VLVisionConfig(depth=2, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=HEADS, mlp_ratio=2,
                                 patch_size=4, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.02)
    text = Qwen2VLTextConfig(**_qwen_text(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                             eos_token_id=tokenizer.eos_token_id)
    config = Qwen2VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), tie_word_embeddings=False,
                           **_qwen_ids(tokenizer))
    images = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 4 * 64, "longest_edge": 16 * 64})
    processor = image_only(Qwen2VLProcessor)(image_processor=images, tokenizer=tokenizer,
                                             chat_template=QWEN_CHAT_TEMPLATE)
    return _loaded(config, processor, "qwen2_vl", seed)


def tiny_qwen2_5_vl(seed: int = 0) -> LoadedModel:
    """Block 0 attends within windows of 2 x 2 merged units, block 1 over the whole image."""
    vision = dict(depth=2, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_heads=HEADS, out_hidden_size=HIDDEN,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                  fullatt_block_indexes=[1], initializer_range=0.02)
    tokenizer = qwen_tokenizer()
    config, processor = qwen2_5_vl_architecture(tokenizer, vision, _qwen_text(tokenizer), 4 * 64, 16 * 64)
    return _loaded(config, processor, "qwen2_5_vl", seed)


def tiny_paligemma(seed: int = 0) -> LoadedModel:
    """The processor adds PaliGemma's 1024 location and 128 segmentation tokens to the
    tokenizer, so the vocabulary is sized after it is built. No MAP head, as PaliGemma."""
    tokenizer = word_tokenizer(["<image>"], pad="<pad>", eos="<eos>", bos="<bos>", image_token="<image>")
    images = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    images.image_seq_length = (SIZE // PATCH) ** 2
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)
    text = GemmaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                       num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=1,
                       head_dim=HIDDEN // HEADS, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = PaliGemmaConfig(vision_config=SiglipVisionConfig(**VISION, vision_use_head=False).to_dict(),
                             text_config=text.to_dict(), image_token_index=tokenizer.image_token_id,
                             projection_dim=HIDDEN, hidden_size=HIDDEN, vocab_size=len(tokenizer))
    return _loaded(config, processor, "paligemma", seed)


IDEFICS_SPECIALS = (["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<|im_start|>"]
                    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])


def _idefics_tokenizer():
    return word_tokenizer(IDEFICS_SPECIALS, pad="<|finetune_right_pad_id|>", eos="<end_of_utterance>",
                          bos="<|begin_of_text|>", image_token="<image>", fake_image_token="<fake_token_around_image>",
                          global_image_token="<global-img>", end_of_utterance_token="<end_of_utterance>")


def _idefics_config(config_class, vision_class, tokenizer):
    """Pixel shuffle by 2: 16 patches of a tile become 4 image tokens."""
    return config_class(vision_config=vision_class(**VISION, initializer_range=0.02).to_dict(),
                        text_config=llama_config(tokenizer).to_dict(),
                        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2,
                        pad_token_id=tokenizer.pad_token_id)


def _tiles(image_processor_class):
    """Images resized to at most 64 px, cut into 32 px tiles, plus the whole image."""
    return image_processor_class(size={"longest_edge": 2 * SIZE}, max_image_size={"longest_edge": SIZE},
                                 do_image_splitting=True)


def tiny_idefics3(seed: int = 0) -> LoadedModel:
    tokenizer = _idefics_tokenizer()
    processor = Idefics3Processor(image_processor=_tiles(Idefics3ImageProcessorPil), tokenizer=tokenizer,
                                  image_seq_len=4, chat_template=IDEFICS3_CHAT_TEMPLATE)
    return _loaded(_idefics_config(Idefics3Config, Idefics3VisionConfig, tokenizer), processor, "idefics3", seed)


def tiny_smolvlm(seed: int = 0) -> LoadedModel:
    tokenizer = _idefics_tokenizer()
    processor = ImageOnlySmolVLMProcessor(image_processor=_tiles(SmolVLMImageProcessorPil), tokenizer=tokenizer,
                                          image_seq_len=4, chat_template=DEFAULT_CHAT_TEMPLATE)
    return _loaded(_idefics_config(SmolVLMConfig, SmolVLMVisionConfig, tokenizer), processor, "smolvlm", seed)


BUILDERS = {
    "instructblip": tiny_instructblip,
    "instructblip_t5": tiny_instructblip_t5,
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "paligemma": tiny_paligemma,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
}


def tiny(family: str) -> LoadedModel:
    return BUILDERS[family]()


def varied_examples(n: int, seed: int = 0) -> list[Example]:
    """Random images of several aspect ratios with shapes-world questions (some empty) and answers."""
    rng = random.Random(seed)
    state = np.random.RandomState(seed)
    examples = []
    for i in range(n):
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        image = Image.fromarray((state.rand(height, width, 3) * 255).astype("uint8"))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        examples.append(Example(image, rng.choice(QUESTIONS), answer))
    return examples
