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
from .quality import Reference, against_full, exact_match, full_reference
from .sources import Calibration
from .shapes.tokenizer import build_tokenizer

__all__ = ["exact_match", "held_out_examples", "quality_against_full", "quick_score", "speaks_shapes"]
HELD_OUT_N = 200
HELD_OUT_SEED = 1234  # the sweep's questions: for the shapes model, accuracy is the sweep's score


def speaks_shapes(loaded: LoadedModel) -> bool:
    """True when the model is a BLIP-2 (OPT or T5) whose vocabulary is the shapes world's."""
    if not isinstance(families.of(loaded.model), families.Blip2):
        return False
    language = "opt" if loaded.decoder_only else "t5"
    return loaded.processor.tokenizer.get_vocab() == build_tokenizer(language).get_vocab()


@torch.no_grad()
def mean_loss(loaded: LoadedModel, examples, batch_size: int = 8) -> float:
    data = batches(loaded, examples, batch_size)
    losses = [calibration_loss(loaded.model, b).float().item() * len(b["input_ids"]) for b in data]
    return sum(losses) / len(examples)


def quick_score(
    loaded: LoadedModel, n: int = 200, seed: int = 1234, progress: Callable[[int, int], None] | None = None
) -> dict:
    """{"metric": "accuracy"|"calibration loss", "value", "higher_is_better", "by_type"?, "n", "measured_on"}."""
    if speaks_shapes(loaded):
        from .shapes.evaluate import evaluate, make_eval_set

        result = evaluate(loaded, make_eval_set(n, seed), progress=progress)
        return {"metric": "accuracy", "value": result["overall"], "higher_is_better": True,
                "by_type": result["by_type"], "n": result["n"],
                "measured_on": f"exact match on {result['n']} generated shapes questions (seed {seed}; "
                               f"the same questions for every model)"}
    examples = list(default_calibration()[:n])
    return {"metric": "calibration loss", "value": mean_loss(loaded, examples), "higher_is_better": False,
            "n": len(examples),
            "measured_on": f"language-model loss on the first {len(examples)} shipped calibration pairs "
                           f"(lower is better)"}


def fingerprint(image) -> str:
    """The pixels of an image, as a digest: the same picture read twice has the same one."""
    image = image.convert("RGB")
    return hashlib.sha1(f"{image.size}".encode() + image.tobytes()).hexdigest()


def held_out_examples(calibration: Calibration | list[Example] | None = None, n: int = HELD_OUT_N,
                      seed: int = HELD_OUT_SEED, pool: list[Example] | None = None) -> list[Example]:
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
    from .shapes.evaluate import make_eval_set

    return tuple(Example(e.image, e.question, e.answer) for e in make_eval_set(n, seed))


def quality_against_full(loaded: LoadedModel, reference: Reference, progress=None) -> dict:
    """The report's `quality` entry for the loaded (pruned) model; accuracy and flips where
    the model speaks the shapes world, so that exact match can score its answers."""
    return against_full(loaded, reference, labelled=speaks_shapes(loaded), progress=progress)


def reference_for(loaded: LoadedModel, examples: list[Example], progress=None) -> Reference:
    """The full model's side of the comparison; call it on the unpruned model."""
    return full_reference(loaded, examples, progress=progress)
