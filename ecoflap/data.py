"""Image-text examples, their encoding through each family's processor, and the
calibration loss.

The loss is the language-model loss of the target text given the image and prompt:
for a decoder-only language model, prompt and target in one sequence with only the
target labelled; for an encoder-decoder (T5), the encoder gets image and prompt and
the decoder predicts the target. How a family writes its prompt lives with the family.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import families
from .families.base import IGNORE
from .forwards import replaced_forward
from .models import ASSETS

DEFAULT_CALIBRATION = ASSETS / "calibration"
ENCODED_SETS_KEPT = 4
_encoded: OrderedDict[tuple, tuple] = OrderedDict()
_encoded_lock = threading.Lock()
HALF = (torch.float16, torch.bfloat16)
# The output head in float32 is computed this many weights at a time (its rows in
# float32), so a 150,000-word vocabulary never needs a float32 copy of the whole head.
HEAD_CHUNK_WEIGHTS = 2**24


@dataclass
class Example:
    """An image with a question (empty for a caption) and its target answer; the answer's
    characters before `target_from` are given to the model, not scored (a prefix-LM loss)."""

    image: Image.Image
    question: str
    answer: str
    target_from: int = 0


def load_examples(folder: str | Path = DEFAULT_CALIBRATION, limit: int | None = None) -> list[Example]:
    """Read `examples.jsonl` ({"image", "question", "answer"} per line) from a folder."""
    folder = Path(folder)
    index = folder / "examples.jsonl"
    if not index.exists():
        raise FileNotFoundError(f"no calibration set at {folder} (expected {index.name})")
    examples = []
    with open(index) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            with Image.open(folder / row["image"]) as img:
                image = img.convert("RGB")
            examples.append(Example(image, row.get("question", ""), row["answer"]))
            if limit is not None and len(examples) >= limit:
                break
    return examples


@functools.lru_cache(maxsize=1)
def default_calibration() -> tuple[Example, ...]:
    """The shipped calibration set, read once per process (the same objects every time,
    so their encoding is reused too)."""
    return tuple(load_examples(DEFAULT_CALIBRATION))


def take(examples: list[Example], n: int, what: str) -> list[Example]:
    """The first n examples, or a clear error if there are not that many."""
    if n <= 0:
        raise ValueError(f"{what}: the number of calibration samples must be at least 1 (got {n})")
    if n > len(examples):
        raise ValueError(
            f"{what}: {n} calibration samples were asked for but the calibration set has "
            f"only {len(examples)}"
        )
    return list(examples[:n])


def encode_examples(loaded, examples: list[Example], with_target: bool = True) -> dict:
    """CPU tensors for a batch of examples, as the loaded model's family encodes them:
    the processor's inputs, and labels on the target answer's tokens only."""
    model = loaded.model
    encoded = families.of(model).encode(loaded.processor, model.config, examples, with_target)
    if with_target and any(ex.target_from for ex in examples):
        if not loaded.decoder_only:  # the decoder still reads the whole target; only the rest is scored
            encoded["decoder_input_ids"] = model.language_model._shift_right(encoded["labels"])
        given_prefixes(loaded.processor.tokenizer, encoded["labels"], examples)
    return encoded


def given_prefixes(tokenizer, labels: torch.Tensor, examples: list[Example]):
    """Unlabel (in place) each row's target tokens that spell the answer's first
    `target_from` characters: the longest run of whole tokens that fits in them."""
    for row, example in zip(labels, examples):
        if not example.target_from:
            continue
        where = (row != IGNORE).nonzero().flatten()
        ids = row[where].tolist()
        given = 0
        while given < len(ids) - 1 and len(
                tokenizer.decode(ids[: given + 1], skip_special_tokens=True).lstrip()) <= example.target_from:
            given += 1
        row[where[:given]] = IGNORE


def batches(loaded, examples: list[Example], batch_size: int) -> list[dict]:
    """Examples encoded in batches for a loaded model, on its device and in its dtype.

    Encoding (resizing images, tokenising) costs about half a forward pass of a small
    model, and the workbench prunes again and again on the same calibration set, so the
    CPU tensors of the last few sets are kept and reused. The key is the identity of
    the processor and of every example; the cache holds on to them, so no identity can
    be reused by another object while its entry lives. Treat the tensors as read-only.
    """
    if batch_size <= 0:
        raise ValueError(f"batch size must be at least 1 (got {batch_size})")
    processor, decoder_only = loaded.processor, loaded.decoder_only
    key = (id(processor), batch_size, decoder_only, *map(id, examples))
    with _encoded_lock:
        hit = _encoded.get(key)
        if hit is not None:
            _encoded.move_to_end(key)
    if hit is not None:
        encoded = hit[2]
    else:
        encoded = [encode_examples(loaded, examples[start : start + batch_size])
                   for start in range(0, len(examples), batch_size)]
        with _encoded_lock:
            _encoded[key] = (processor, list(examples), encoded)
            while len(_encoded) > ENCODED_SETS_KEPT:
                _encoded.popitem(last=False)
    return [on_model(batch, loaded.device, loaded.dtype) for batch in encoded]


def on_model(batch: dict, device, dtype) -> dict:
    """A batch on the model's device; floating-point tensors in the model's dtype."""
    return {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def calibration_loss(model, batch: dict) -> torch.Tensor:
    """Mean token cross-entropy of the target text, given image and prompt, in float32.

    In half precision the logits are computed in float32 from the last hidden state
    (`float32_logits`): rounded to bfloat16 a logit near 10 is only known to 0.06, far
    coarser than the loss differences ECoFLaP's zeroth-order stage measures, and T5 would
    return its loss in bfloat16 too.

    No key/value cache: one full-sequence pass needs none, and a checkpointed block that
    recomputes its forward must not append to a cache a second time.
    """
    with float32_logits(model):
        return model(**batch, use_cache=False).loss.float()


@contextlib.contextmanager
def float32_logits(model):
    """Within the block, a half-precision output head computes its logits in float32
    (hidden state and weights upcast, a slice of rows at a time); otherwise nothing changes.

    Where accelerate's hooks hold the head (a device map), its inner forward is swapped,
    so the hooks still bring the weights to the device first.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.weight.dtype not in HALF:
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = head.weight, head.bias
        x = hidden.to(weight.device).float()
        logits = torch.empty(*x.shape[:-1], weight.shape[0], device=x.device, dtype=torch.float32)
        rows = max(1, HEAD_CHUNK_WEIGHTS // weight.shape[1])
        for start in range(0, weight.shape[0], rows):
            end = min(start + rows, weight.shape[0])
            part_bias = None if bias is None else bias[start:end].float()
            logits[..., start:end] = F.linear(x, weight[start:end].float(), part_bias)
        return logits

    inner = "_old_forward" if hasattr(head, "_hf_hook") and hasattr(head, "_old_forward") else "forward"
    with replaced_forward(head, forward, inner):
        yield


EXAMPLES = ASSETS / "examples"


def example_prompts(folder: Path = EXAMPLES) -> list[tuple[str, str]]:
    """(image path, question) pairs shipped for the UI: each example image with a different
    kind of suggested question, so the list shows every question type (and captions)."""
    images = sorted(folder.glob("*.png"))
    index = folder / "questions.json"
    suggested = json.loads(index.read_text()) if index.exists() else {}
    pairs = []
    for i, image in enumerate(images):
        options = suggested.get(image.name) or [{"question": ""}]
        pairs.append((str(image), options[i % len(options)]["question"]))
    return pairs
