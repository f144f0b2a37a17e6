"""Exact-match accuracy of a model on generated shapes questions, per question type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from PIL import Image

from ..answers import ask
from ..progress import StopCheck, stop_if_asked
from ..quality import exact_match
from .world import QUESTION_TYPES, Sample, draw_sample, samples


@dataclass
class EvalExample:
    image: Image.Image
    kind: str
    question: str
    answer: str


CARD_SEED = 10_000  # the model card's 1,000 held-out questions (`python -m ecoflap eval`)


def make_eval_set(n: int = 1000, seed: int = CARD_SEED) -> list[EvalExample]:
    """n held-out examples (types in equal shares, images 96 to 256 px); training uses other seeds."""
    chosen: list[Sample] = samples(n, seed)
    return [EvalExample(draw_sample(s, i, seed), s.kind, s.question, s.answer) for i, s in enumerate(chosen)]


def evaluate(loaded, examples: list[EvalExample], batch_size: int = 64,
             progress: Callable[[int, int], None] | None = None, should_stop: StopCheck | None = None) -> dict:
    """{"overall", "by_type": {type: accuracy}, "n", "mistakes": first few wrong answers}."""
    correct = {t: 0 for t in QUESTION_TYPES}
    total = {t: 0 for t in QUESTION_TYPES}
    mistakes = []
    for start in range(0, len(examples), batch_size):
        stop_if_asked(should_stop)
        chunk = examples[start : start + batch_size]
        answers = ask(loaded, [e.image for e in chunk], [e.question for e in chunk])
        for e, got in zip(chunk, answers):
            total[e.kind] += 1
            if exact_match(got, e.answer):
                correct[e.kind] += 1
            elif len(mistakes) < 20:
                mistakes.append({"kind": e.kind, "question": e.question, "expected": e.answer, "got": got})
        if progress:
            progress(min(start + batch_size, len(examples)), len(examples))
    n = sum(total.values())
    return {
        "overall": sum(correct.values()) / n if n else 0.0,
        "by_type": {t: correct[t] / total[t] for t in QUESTION_TYPES if total[t]},
        "n": n,
        "mistakes": mistakes,
    }
