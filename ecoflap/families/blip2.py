"""BLIP-2 and InstructBLIP: a ViT, a Q-Former, a linear projection, and a language model
that is decoder-only (OPT; Vicuna/Llama) or an encoder-decoder (FlanT5).

The image reaches the language model as `num_query_tokens` image tokens in front of the
prompt. InstructBLIP's Q-Former also reads the instruction, so its rows include the
instruction's tokens (without their padding).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoTokenizer, Blip2Config, Blip2Processor, BlipImageProcessorPil

from .base import IGNORE, Family, Stack, pad_rows, target_positions, text_positions, with_targets

IMAGE_TOKEN = "<image>"


def prompt_for(question: str) -> str:
    """The BLIP-2 VQA prompt; an empty question means captioning, with no prompt at all."""
    question = (question or "").strip()
    return f"Question: {question} Answer:" if question else ""


def encode(processor, examples, decoder_only: bool, with_target: bool = True) -> dict:
    """BLIP-2 tensors for a batch: pixel_values, input_ids, attention_mask, labels."""
    pixel_values = processor.image_processor(
        [ex.image for ex in examples], return_tensors="pt"
    )["pixel_values"]
    text = encode_text(
        processor.tokenizer, processor.num_query_tokens, [ex.question for ex in examples],
        [ex.answer for ex in examples] if with_target else None, decoder_only,
    )
    return {"pixel_values": pixel_values, **text}


def encode_text(tokenizer, num_query_tokens: int, questions: list[str], answers: list[str] | None,
                decoder_only: bool) -> dict:
    """input_ids, attention_mask, labels for (question, answer) pairs; answers None: prompts only.

    Built at token level (image tokens + prompt + target) so that exactly the target
    tokens carry labels, whatever the tokenizer.
    """
    image_ids = [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] * num_query_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inputs, labels = [], []
    for i, question in enumerate(questions):
        prompt = tokenizer(prompt_for(question))["input_ids"]
        if answers is None:
            inputs.append(image_ids + prompt)
            labels.append([IGNORE])
        elif decoder_only:
            target = tokenizer(" " + answers[i].strip(), add_special_tokens=False)["input_ids"]
            target = target + [tokenizer.eos_token_id]
            inputs.append(image_ids + prompt + target)
            labels.append([IGNORE] * (len(image_ids) + len(prompt)) + target)
        else:
            inputs.append(image_ids + prompt)
            labels.append(tokenizer(answers[i].strip())["input_ids"])
    input_ids, attention_mask = pad_rows(inputs, pad)
    label_ids, _ = pad_rows(labels, IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


def blip_stacks(model, qformer_rows: dict | None = None, qformer_unused: dict | None = None) -> list[Stack]:
    """The stacks of a BLIP-2-layout model (not wrapped in `.model`), in forward order."""
    result = [
        Stack("vision", "vision", model.vision_model, list(model.vision_model.encoder.layers)),
        Stack("qformer", "qformer", model.qformer, list(model.qformer.encoder.layer),
              rows=qformer_rows or {}, unused=qformer_unused or {}),
        Stack("projection", "projection", model.language_projection, [model.language_projection],
              transformer=False),
    ]
    lm = model.language_model
    if model.config.use_decoder_only_language_model:
        decoder = lm.get_decoder()
        result.append(Stack("language", "language", decoder, list(_block_list(decoder)), text_positions))
    else:
        encoder, decoder = lm.get_encoder(), lm.get_decoder()
        blocks = list(_block_list(decoder))
        # Cross-attention keys and values read the encoder's sequence, not the decoder's.
        cross = {m: text_positions for block in blocks for m in _cross_attention_inputs(block)}
        result.append(Stack("language.encoder", "language", encoder, list(_block_list(encoder)), text_positions))
        result.append(Stack("language.decoder", "language", decoder, blocks, target_positions, rows=cross))
    return result


def _block_list(stack_module: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks of a language-model stack (OPT/Llama `layers`, T5 `block`)."""
    for attr in ("layers", "block"):
        blocks = getattr(stack_module, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"no transformer block list found in {type(stack_module).__name__}")


def _cross_attention_inputs(block: nn.Module) -> set[nn.Module]:
    """The key and value projections of a T5 decoder block's cross-attention."""
    layers = getattr(block, "layer", [])
    cross = [layer.EncDecAttention for layer in layers if hasattr(layer, "EncDecAttention")]
    return {m for attention in cross for m in (attention.k, attention.v)}


class BlipLayout(Family):
    """What BLIP-2 and InstructBLIP share: an OPT/Vicuna or a FlanT5 language model."""

    def decoder_only(self, config) -> bool:
        return config.use_decoder_only_language_model

    def refuses_float16(self, config) -> str | None:
        return None if self.decoder_only(config) else "FlanT5 overflows in float16: use --dtype bfloat16 or float32"


class Blip2(BlipLayout):
    name = short = "BLIP-2"
    model_types = ("blip-2",)
    model_class = "Blip2ForConditionalGeneration"

    def gpu_dtype(self, config) -> torch.dtype:
        """float16 for OPT, bfloat16 for T5."""
        return torch.float16 if self.decoder_only(config) else torch.bfloat16

    def load_processor(self, source: str) -> Blip2Processor:
        """The PIL image backend: no torchvision is needed."""
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = BlipImageProcessorPil.from_pretrained(source)
        config = Blip2Config.from_pretrained(source)
        return Blip2Processor(image_processor, tokenizer, num_query_tokens=config.num_query_tokens)

    def stacks(self, model) -> list[Stack]:
        return blip_stacks(model)

    def prompt(self, processor, question: str) -> str:
        return prompt_for(question)

    def encode(self, processor, config, examples, with_target: bool = True) -> dict:
        return encode(processor, examples, self.decoder_only(config), with_target)

    def max_image_tokens(self, processor, config) -> int:
        return config.num_query_tokens


class InstructBlip(BlipLayout):
    """BLIP-2's layout with an instruction-aware Q-Former; the instruction is the prompt."""

    name = short = "InstructBLIP"
    model_types = ("instructblip",)
    model_class = "InstructBlipForConditionalGeneration"
    # One of InstructBLIP's own captioning instructions.
    caption_instruction = "A short image caption:"

    def gpu_dtype(self, config) -> torch.dtype:
        return super().gpu_dtype(config) if self.decoder_only(config) else torch.bfloat16

    def stacks(self, model) -> list[Stack]:
        rows, unused = _instruction_rows(model.qformer, model.config.num_query_tokens)
        return blip_stacks(model, rows, unused)

    def prompt(self, processor, question: str) -> str:
        return (question or "").strip() or self.caption_instruction

    def process(self, processor, images: list, prompts: list[str]) -> dict:
        """The Q-Former numbers its positions from the first one, so its rows are padded on
        the right whatever the tokenizer's side (the language model's are re-padded later)."""
        encoded = super().process(processor, images, prompts)
        ids, mask = encoded["qformer_input_ids"], encoded["qformer_attention_mask"].bool()
        rows = [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]
        encoded["qformer_input_ids"], encoded["qformer_attention_mask"] = pad_rows(
            rows, processor.qformer_tokenizer.pad_token_id)
        return encoded

    def encode(self, processor, config, examples, with_target: bool = True) -> dict:
        """Decoder-only: the answer follows the instruction. Encoder-decoder: the decoder
        predicts the answer. The processor pads the text before it puts the query
        tokens in front, so rows are re-padded on the right either way; the Q-Former
        reads the instruction only, never the answer."""
        if self.decoder_only(config):
            return super().encode(processor, config, examples, with_target)
        prompts = [self.prompt(processor, ex.question) for ex in examples]
        tokenizer = processor.tokenizer
        encoded = with_targets(self.process(processor, [ex.image for ex in examples], prompts), None,
                               tokenizer.pad_token_id)
        if with_target:
            encoded["labels"] = pad_rows([tokenizer(ex.answer.strip())["input_ids"] for ex in examples], IGNORE)[0]
        return encoded

    def max_image_tokens(self, processor, config) -> int:
        return config.num_query_tokens


def _instruction_rows(qformer: nn.Module, query_tokens: int) -> tuple[dict, dict]:
    """Which rows each Q-Former linear layer reads, and what never reaches the output.

    Self-attention runs over the queries and the instruction, the instruction's own
    feed-forward over the instruction, everything else over the queries (or the image
    for cross-attention keys and values): all real but the instruction's padding. Only
    the query positions leave the Q-Former, so the last layer's instruction feed-forward
    is computed for nothing.
    """

    def instruction(batch: dict) -> torch.Tensor:
        return batch["qformer_attention_mask"].bool()

    def queries_and_instruction(batch: dict) -> torch.Tensor:
        text = instruction(batch)
        queries = torch.ones(text.shape[0], query_tokens, dtype=torch.bool, device=text.device)
        return torch.cat([queries, text], dim=1)

    layers = list(qformer.encoder.layer)
    rows, unused = {}, {}
    for i, layer in enumerate(layers):
        attention = layer.attention
        for m in (attention.attention.query, attention.attention.key, attention.attention.value,
                  attention.output.dense):
            rows[m] = queries_and_instruction
        for m in (layer.intermediate.dense, layer.output.dense):
            if i == len(layers) - 1:
                unused[m] = "only the query positions leave the Q-Former, so the last layer's feed-forward " \
                            "of the instruction tokens never reaches the output"
            else:
                rows[m] = instruction
    return rows, unused
