"""Asking a BLIP-2 about an image: a question, or an empty one for a caption."""

from __future__ import annotations

import torch
from PIL import Image

from .data import Example, encode, prompt_for
from .images import prepare_image

MAX_QUESTION_CHARS = 500


def fit_question(loaded, question: str, max_new_tokens: int = 20) -> tuple[str, bool]:
    """The question cut (at a word) to what the language model's positions can hold."""
    question = (question or "").strip()
    if len(question) > MAX_QUESTION_CHARS:
        question = question[:MAX_QUESTION_CHARS].rsplit(" ", 1)[0]
        cut = True
    else:
        cut = False
    positions = getattr(loaded.model.config.text_config, "max_position_embeddings", None)
    if positions is None:
        return question, cut
    limit = positions - loaded.model.config.num_query_tokens - max_new_tokens - 2
    words = question.split()
    while words and len(loaded.processor.tokenizer(prompt_for(" ".join(words)))["input_ids"]) > limit:
        words = words[: max(0, min(len(words) - 1, int(len(words) * 0.9)))]
        cut = True
    return " ".join(words), cut


@torch.no_grad()
def ask(loaded, images: list[Image.Image], questions: list[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy answers, one per (image, question); empty questions get captions."""
    if len(images) != len(questions):
        raise ValueError("ask needs one question per image")
    model, processor = loaded.model, loaded.processor
    decoder_only = model.config.use_decoder_only_language_model
    questions = [fit_question(loaded, q, max_new_tokens)[0] for q in questions]
    answers: list[str | None] = [None] * len(images)
    # One batch per prompt: equal lengths, so no padding inside a generation batch.
    by_prompt: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_prompt.setdefault(prompt_for(q), []).append(i)
    for _prompt, idx in by_prompt.items():
        examples = [Example(prepare_image(images[i]), questions[i], "") for i in idx]
        batch = encode(processor, examples, decoder_only, with_target=False)
        inputs = {
            "pixel_values": batch["pixel_values"].to(loaded.device, loaded.dtype),
            "input_ids": batch["input_ids"].to(loaded.device),
            "attention_mask": batch["attention_mask"].to(loaded.device),
        }
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        if decoder_only:
            out = out[:, inputs["input_ids"].shape[1]:]
        for i, text in zip(idx, processor.batch_decode(out, skip_special_tokens=True)):
            answers[i] = text.strip()
    return answers
