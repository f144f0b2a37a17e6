"""Fresh shapes scenes to fine-tune on, from seeds of their own.

Recovery must not learn the questions it is scored on: evaluation draws from seeds
10000 (model card), 1234 (quick score) and 4321 (split selection), the shipped
calibration from 20000 and the examples from 30000; recovery draws from 50000 + seed.
Every question type and captions come in equal shares, as `world.samples` deals them.
"""

from __future__ import annotations

from typing import Iterator

from ..data import Example
from .world import draw_sample, samples

RECOVERY_SEED = 50_000


def fresh_batches(batch_size: int, steps: int, seed: int = 0) -> Iterator[list[Example]]:
    """`steps` batches of `batch_size` new examples, each image drawn only when its batch comes."""
    stream = RECOVERY_SEED + seed
    chosen = samples(batch_size * steps, stream)
    for start in range(0, len(chosen), batch_size):
        yield [Example(draw_sample(s, i, stream), s.question, s.answer)
               for i, s in enumerate(chosen[start : start + batch_size], start)]
