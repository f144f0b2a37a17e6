"""Asking a vision-language model about an image: a question, or an empty one for a caption."""

from __future__ import annotations

import torch
from PIL import Image

from . import families
from .data import Example, encode_examples, on_model
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
    config, processor = loaded.model.config, loaded.processor
    positions = getattr(config.text_config, "max_position_embeddings", None)
    if positions is None:
        return question, cut
    family = families.of(loaded.model)
    limit = positions - family.max_image_tokens(processor, config) - max_new_tokens - 2
    words = question.split()
    while words and len(processor.tokenizer(family.prompt(processor, " ".join(words)))["input_ids"]) > limit:
        words = words[: max(0, min(len(words) - 1, int(len(words) * 0.9)))]
        cut = True
    return " ".join(words), cut


@torch.no_grad()
def ask(loaded, images: list[Image.Image], questions: list[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy answers, one per (image, question); empty questions get captions.

    Images asked with the same question are answered in one batch where their prompts
    come out the same length; where the image decides the number of image tokens
    (tiles, variable resolution) each is answered alone, so no answer ever depends on
    padding or on who else asked.
    """
    if len(images) != len(questions):
        raise ValueError("ask needs one question per image")
    questions = [fit_question(loaded, q, max_new_tokens)[0] for q in questions]
    answers: list[str | None] = [None] * len(images)
    by_question: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_question.setdefault(q, []).append(i)
    for question, idx in by_question.items():
        examples = [Example(prepare_image(images[i]), question, "") for i in idx]
        batch = encode_examples(loaded, examples, with_target=False)
        if bool(batch["attention_mask"].all()):
            runs = [(idx, batch)]
        else:
            runs = [([i], encode_examples(loaded, [ex], with_target=False)) for i, ex in zip(idx, examples)]
        for members, inputs in runs:
            for i, text in zip(members, _generate(loaded, inputs, max_new_tokens)):
                answers[i] = text
    return answers


def _generate(loaded, batch: dict, max_new_tokens: int) -> list[str]:
    """Greedy continuations of an unpadded batch, decoded."""
    inputs = on_model({k: v for k, v in batch.items() if k != "labels"}, loaded.device, loaded.dtype)
    out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    if loaded.decoder_only:
        out = out[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in loaded.processor.batch_decode(out, skip_special_tokens=True)]
