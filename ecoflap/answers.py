"""Asking a BLIP-2 about an image: a question, or an empty one for a caption."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .data import Example, encode, prompt_for

MAX_QUESTION_CHARS = 500
MAX_IMAGE_PIXELS = 64_000_000


def open_image(path) -> Image.Image:
    """Open an uploaded file as an RGB image, or raise ValueError with a human message.

    Images over MAX_IMAGE_PIXELS are refused before decoding (decompression bombs).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ValueError(
                        f"the image is {width} x {height} pixels; the limit is {MAX_IMAGE_PIXELS:,} pixels"
                    )
                img.load()
                return prepare_image(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"the image is too large to decode safely (limit {MAX_IMAGE_PIXELS:,} pixels)") from None
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except UnidentifiedImageError:
        raise ValueError("the file is not an image that can be read (PNG, JPEG, GIF, WebP, BMP, TIFF ...)") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"the image is truncated or corrupt ({err})") from None


def prepare_image(image: Image.Image) -> Image.Image:
    """Any PIL image (RGBA, CMYK, 16-bit, palette, animated) as the RGB frame models expect."""
    if getattr(image, "is_animated", False):
        image.seek(0)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        image = Image.fromarray((array / top * 255).astype("uint8"))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


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
