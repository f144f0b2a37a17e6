"""A second, independently written renderer of the shapes spec, to check robustness.

It shares no drawing code with `shapes.render`: numpy rasterisation at pixel centres,
other RGB values for the six colours, a flat grey-ish background, shapes a fifth to a
third of the image width, any image size from 96 to 256 px. Questions and answers come
from the same spec (`shapes.questions`), which only reads the scene's kinds and colours.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from .evaluate import EvalExample
from .world import KINDS, Scene, Shape, questions

OTHER_RGB = {
    "red": (230, 25, 25),
    "green": (30, 160, 40),
    "blue": (30, 60, 230),
    "yellow": (250, 220, 0),
    "purple": (130, 40, 170),
    "orange": (255, 150, 0),
}


def independent_scene_examples(rng: random.Random) -> list[EvalExample]:
    """One scene drawn by this renderer, with one example of every question type it allows."""
    size = rng.randint(96, 256)
    count = rng.randint(1, 3)
    while True:
        shapes: list[Shape] = []
        for _ in range(count):
            side = rng.uniform(0.2, 0.33)
            x = rng.uniform(side / 2 + 0.02, 1 - side / 2 - 0.02)
            y = rng.uniform(side / 2 + 0.02, 1 - side / 2 - 0.02)
            if all(max(abs(x - o.x), abs(y - o.y)) > (side + o.size) / 2 + 0.02 for o in shapes):
                shapes.append(Shape(rng.choice(KINDS), rng.choice(list(OTHER_RGB)), x, y, side))
        if len(shapes) == count:
            break
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    canvas = np.full((size, size, 3), rng.randint(235, 250), dtype=np.uint8)
    for s in shapes:
        h = s.size / 2
        if s.kind == "circle":
            inside = (xx - s.x) ** 2 + (yy - s.y) ** 2 <= h * h
        elif s.kind == "square":
            inside = (abs(xx - s.x) <= h) & (abs(yy - s.y) <= h)
        else:  # upright: apex at the top, base at the bottom
            t = (yy - (s.y - h)) / s.size
            inside = (t >= 0) & (t <= 1) & (abs(xx - s.x) <= t * h)
        canvas[inside] = OTHER_RGB[s.color]
    image = Image.fromarray(canvas)
    scene = Scene(tuple(sorted(shapes, key=lambda s: s.x)), (240, 240, 240))
    return [EvalExample(image, q.kind, q.question, q.answer) for q in questions(scene, rng)]


def independent_examples(scenes: int, seed: int = 99) -> list[EvalExample]:
    """Every question type for `scenes` scenes drawn by the independent renderer."""
    rng = random.Random(seed)
    return [e for _ in range(scenes) for e in independent_scene_examples(rng)]
