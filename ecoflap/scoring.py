"""A quick quality score for a (pruned) model.

Accuracy on the generated shapes evaluation set for a model that speaks the shapes
world (same closed vocabulary as the shipped model); otherwise the calibration loss
(language-model loss of the shipped image-text pairs), where lower is better.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import families
from .data import batches, calibration_loss, default_calibration
from .models import LoadedModel
from .shapes.tokenizer import build_tokenizer


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
