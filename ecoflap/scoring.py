"""Scores for a (pruned) model.

`quick_score`: accuracy on the generated shapes evaluation set for a model that speaks
the shapes world (same closed vocabulary as the shipped model); otherwise the calibration
loss (language-model loss of the shipped image-text pairs), where lower is better.

`quality_against_full`: the pruned model against the full one on held-out examples that
no calibration sample overlaps (see `quality`), with accuracy and flips where the model
speaks the shapes world.
"""

from __future__ import annotations

import functools
import hashlib
import random
from typing import Callable

import torch

from . import families
from .data import Example, batches, calibration_loss, default_calibration
from .models import LoadedModel
from .progress import StopCheck, stop_if_asked
from .quality import Reference, against_full, exact_match, full_reference
from .shapes.evaluate import evaluate, make_eval_set
from .sources import Calibration
from .shapes.tokenizer import build_tokenizer

__all__ = ["exact_match", "held_out_examples", "quality_against_full", "quick_score", "speaks_shapes"]
HELD_OUT_N = 200
# The quick score's questions (sweeps, comparisons, recovery), the same for every model; held-out
# examples are drawn with it too, so for the shapes model accuracy there is the sweep's score.
SCORE_SEED = 1234


def speaks_shapes(loaded: LoadedModel) -> bool:
    """True when the model is a BLIP-2 (OPT or T5) whose vocabulary is the shapes world's."""
    if not isinstance(families.of(loaded.model), families.Blip2):
        return False
    language = "opt" if loaded.decoder_only else "t5"
    return loaded.processor.tokenizer.get_vocab() == build_tokenizer(language).get_vocab()


@torch.no_grad()
def mean_loss(loaded: LoadedModel, examples, batch_size: int = 8, should_stop: StopCheck | None = None) -> float:
    losses = []
    for batch in batches(loaded, examples, batch_size):
        stop_if_asked(should_stop)
        losses.append(calibration_loss(loaded.model, batch).float().item() * len(batch["input_ids"]))
    return sum(losses) / len(examples)


def quick_score(
    loaded: LoadedModel, n: int = 200, seed: int = SCORE_SEED, progress: Callable[[int, int], None] | None = None,
    should_stop: StopCheck | None = None,
) -> dict:
    """{"metric": "accuracy"|"calibration loss", "value", "higher_is_better", "by_type"?, "n", "measured_on"};
    `should_stop` is asked before each batch of questions."""
    if speaks_shapes(loaded):
        result = evaluate(loaded, make_eval_set(n, seed), progress=progress, should_stop=should_stop)
        return {"metric": "accuracy", "value": result["overall"], "higher_is_better": True,
                "by_type": result["by_type"], "n": result["n"],
                "measured_on": f"exact match on {result['n']} generated shapes questions (seed {seed}; "
                               f"the same questions for every model)"}
    examples = list(default_calibration()[:n])
    return {"metric": "calibration loss", "value": mean_loss(loaded, examples, should_stop=should_stop),
            "higher_is_better": False,
            "n": len(examples),
            "measured_on": f"language-model loss on the first {len(examples)} shipped calibration pairs "
                           f"(lower is better)"}


def fingerprint(image) -> str:
    """The pixels of an image, as a digest: the same picture read twice has the same one."""
    image = image.convert("RGB")
    return hashlib.sha1(f"{image.size}".encode() + image.tobytes()).hexdigest()


def held_out_examples(calibration: Calibration | list[Example] | None = None, n: int = HELD_OUT_N,
                      seed: int = SCORE_SEED, pool: list[Example] | None = None) -> list[Example]:
    """n examples whose images no calibration sample shows.

    A source's own held-out examples where it was drawn with some (`Source.draw(n,
    held_out=...)`); from `pool` where given: a seeded draw among those the calibration
    did not use. Otherwise from the shapes world the shipped set is drawn from: its
    generated questions of every type (captions included) with their reference answers,
    with a seed of their own (the shipped calibration set is 128 captions, all of them
    used by a default run, so none of it is left over).
    """
    if n <= 0:
        raise ValueError(f"the number of held-out examples must be at least 1 (got {n})")
    if isinstance(calibration, Calibration):
        if calibration.held_out:
            return list(calibration.held_out[:n])
        calibration = calibration.examples
    used = {fingerprint(e.image) for e in (default_calibration() if calibration is None else calibration)}
    if pool is not None:
        free = [e for e in pool if fingerprint(e.image) not in used]
        if not free:
            raise ValueError("every example of the source was used for calibration: none is left to hold out")
        return random.Random(seed).sample(free, min(n, len(free)))
    return [e for e in generated_examples(n, seed) if fingerprint(e.image) not in used]


@functools.lru_cache(maxsize=8)
def generated_examples(n: int, seed: int) -> tuple[Example, ...]:
    """Generated shapes questions as examples, the same objects for the same (n, seed), so
    the full model's reference on them is measured once (it is kept by their identity)."""
    return tuple(Example(e.image, e.question, e.answer) for e in make_eval_set(n, seed))


def quality_against_full(loaded: LoadedModel, reference: Reference, progress=None) -> dict:
    """The report's `quality` entry for the loaded (pruned) model; accuracy and flips where
    the model speaks the shapes world, so that exact match can score its answers."""
    return against_full(loaded, reference, labelled=speaks_shapes(loaded), progress=progress)


def reference_for(loaded: LoadedModel, examples: list[Example], progress=None) -> Reference:
    """The full model's side of the comparison; call it on the unpruned model."""
    return full_reference(loaded, examples, progress=progress)
