"""Which calibration loss a run uses, as the examples the loss is computed on.

- `answer` (the default): the language-model loss of each example's target (its caption or
  answer) given the image and the prompt.
- `prefix_lm`: the ECoFLaP reference's caption recipe, as its BLIP-2 scripts calibrate on
  CC3M: the caption is lowercased, stripped of punctuation and cut to 50 words (BLIP's
  caption processor), then cut at a random character position in its first half; the
  prefix is input to the language model and only the rest is scored. The cuts are drawn
  from the run's seed, so a run is reproducible. The cut is applied to whole tokens: the
  prefix's tokens are those that fit in its characters (none where the cut falls inside
  the first token). For an encoder-decoder language model the reference puts the prefix
  in the encoder; here it is the decoder's given start.

The loss itself is always `data.calibration_loss`; what changes is which tokens are labelled.
"""

from __future__ import annotations

import random
import re
import threading
from collections import OrderedDict

from .data import Example

LOSSES = ("answer", "prefix_lm")
LABELS = {"answer": "the target's language-model loss", "prefix_lm": "prefix-LM captions (the ECoFLaP reference's)"}
MAX_WORDS = 50
_kept: OrderedDict[tuple, list[Example]] = OrderedDict()
_kept_lock = threading.Lock()


def caption_text(caption: str, max_words: int = MAX_WORDS) -> str:
    """BLIP's caption processor: lowercase, punctuation to spaces, single spaces, at most 50 words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def prefix_lm(examples: list[Example], seed: int) -> list[Example]:
    """Each caption processed and cut at a random character in [1, len/2] (seeded): the
    characters before the cut are input, the rest is the target."""
    rng = random.Random(seed)
    cut = []
    for example in examples:
        text = caption_text(example.answer)
        position = rng.randint(1, len(text) // 2) if len(text) >= 2 else 0
        cut.append(Example(example.image, example.question, text, target_from=position))
    return cut


def examples_for(loss: str, examples: list[Example], seed: int) -> list[Example]:
    """The examples a loss is computed on. The same (loss, seed, examples) gives the same
    objects, so their encoding is reused across runs."""
    if loss == "answer":
        return list(examples)
    if loss != "prefix_lm":
        raise ValueError(f"unknown calibration loss {loss!r}: use one of {', '.join(LOSSES)}")
    key = (loss, seed, *map(id, examples))
    with _kept_lock:
        hit = _kept.get(key)
        if hit is not None:
            _kept.move_to_end(key)
            return hit[1]
    made = prefix_lm(examples, seed)
    with _kept_lock:
        _kept[key] = (list(examples), made)  # holding the inputs keeps their ids from being reused
        while len(_kept) > 4:
            _kept.popitem(last=False)
    return made
