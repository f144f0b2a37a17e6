"""The shapes world: seeded scenes of 1 to 3 coloured shapes, and questions about them.

Spec (also how users probe the model): RGB image, plain light background, 1 to 3
non-overlapping shapes, each a circle, square or triangle in red, green, blue, yellow,
purple or orange. Prompt `Question: {q} Answer:`; questions:
  what color is the {shape}?          (shape appears once)  -> colour
  what shape is the {color} object?   (colour appears once)  -> shape
  how many shapes are there?                                -> one / two / three
  is there a {color} {shape}?                               -> yes / no
An empty question asks for a caption: shapes left to right, "a red circle",
"a red circle and a blue square", "a red circle, a blue square and a green triangle".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
NUMBERS = ("one", "two", "three")
QUESTION_TYPES = ("color", "shape", "count", "exists", "caption")


@dataclass(frozen=True)
class Shape:
    """A shape in unit coordinates: centre (x, y) and size (width = height) as a fraction of the image."""

    kind: str
    color: str
    x: float
    y: float
    size: float

    def contains(self, px: float, py: float) -> bool:
        """Whether a point (unit coordinates) lies inside the drawn shape."""
        h = self.size / 2
        dx, dy = px - self.x, py - self.y
        if self.kind == "circle":
            return dx * dx + dy * dy <= h * h
        if self.kind == "square":
            return abs(dx) <= h and abs(dy) <= h
        # upright triangle: apex at top centre, base along the bottom edge
        if not -h <= dy <= h:
            return False
        half_width = h * (dy + h) / (2 * h)
        return abs(dx) <= half_width


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]


@dataclass(frozen=True)
class Sample:
    """One training or evaluation example: a scene, a question (may be empty), an answer."""

    scene: Scene
    kind: str
    question: str
    answer: str


def random_scene(rng: random.Random, min_size: float = 0.15, max_size: float = 0.38) -> Scene:
    """1 to 3 non-overlapping shapes with free kinds, colours, sizes and positions."""
    count = rng.randint(1, 3)
    while True:
        shapes: list[Shape] = []
        for _ in range(count):
            for _attempt in range(50):
                size = rng.uniform(min_size, max_size)
                x = rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02)
                y = rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02)
                if all(max(abs(x - s.x), abs(y - s.y)) > (size + s.size) / 2 + 0.03 for s in shapes):
                    shapes.append(Shape(rng.choice(KINDS), rng.choice(list(COLORS)), x, y, size))
                    break
        if len(shapes) == count:
            break
    background = tuple(rng.randint(228, 255) for _ in range(3))
    return Scene(tuple(sorted(shapes, key=lambda s: s.x)), background)


def render(scene: Scene, size: int = 128, rng: random.Random | None = None) -> Image.Image:
    """Draw a scene at `size` x `size` pixels (colours jittered slightly when rng is given)."""
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        base = COLORS[s.color]
        color = tuple(min(255, max(0, c + (rng.randint(-18, 18) if rng else 0))) for c in base)
        h = s.size * size / 2
        cx, cy = s.x * size, s.y * size
        if s.kind == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=color)
        elif s.kind == "square":
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=color)
        else:
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=color)
    return image


def caption(scene: Scene) -> str:
    """Shapes left to right: 'a red circle', '... and ...', 'a, b and c'."""
    parts = [f"a {s.color} {s.kind}" for s in scene.shapes]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def questions(scene: Scene, rng: random.Random) -> list[Sample]:
    """One sample of every question type that the scene allows (plus its caption)."""
    kinds = [s.kind for s in scene.shapes]
    colors = [s.color for s in scene.shapes]
    out = [Sample(scene, "count", "how many shapes are there?", NUMBERS[len(kinds) - 1]),
           Sample(scene, "caption", "", caption(scene))]
    unique_kinds = [k for k in KINDS if kinds.count(k) == 1]
    if unique_kinds:
        kind = rng.choice(unique_kinds)
        out.append(Sample(scene, "color", f"what color is the {kind}?", colors[kinds.index(kind)]))
    unique_colors = [c for c in COLORS if colors.count(c) == 1]
    if unique_colors:
        color = rng.choice(unique_colors)
        out.append(Sample(scene, "shape", f"what shape is the {color} object?", kinds[colors.index(color)]))
    if rng.random() < 0.5:
        s = rng.choice(scene.shapes)
        color, kind, answer = s.color, s.kind, "yes"
    else:
        present = {(s.color, s.kind) for s in scene.shapes}
        absent = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
        # half of the "no" cases share the colour or the kind of a present shape: harder negatives
        near = [(c, k) for c, k in absent if c in colors or k in kinds]
        color, kind = rng.choice(near if near and rng.random() < 0.7 else absent)
        answer = "no"
    out.append(Sample(scene, "exists", f"is there a {color} {kind}?", answer))
    return out


def samples(n: int, seed: int, kinds: tuple[str, ...] = QUESTION_TYPES) -> list[Sample]:
    """n samples with question types drawn evenly from `kinds` (deterministic for a seed)."""
    rng = random.Random(seed)
    out: list[Sample] = []
    while len(out) < n:
        wanted = kinds[len(out) % len(kinds)]
        scene = random_scene(rng)
        match = [s for s in questions(scene, rng) if s.kind == wanted]
        if match:
            out.append(match[0])
    return out


def image_size_for(index: int, seed: int, low: int = 96, high: int = 256) -> int:
    """A deterministic image size per sample, so the model sees every resolution."""
    return random.Random(seed * 1_000_003 + index).randint(low, high)


def draw_sample(sample: Sample, index: int, seed: int) -> Image.Image:
    """The image of the index-th sample of a seeded set, at its own size and colour jitter."""
    size = image_size_for(index, seed)
    return render(sample.scene, size, random.Random(seed * 7919 + index))


def pixel_shape_labels(scene: Scene, grid: int, sub: int = 4) -> tuple[list[int], list[int], list[int]]:
    """Per grid cell: colour index + 1, kind index + 1 and left-to-right position + 1 of the
    shape covering most of it; 0 for background.

    Used to pretrain the vision encoder (patch cells) with supervision of what is where.
    """
    color_ids, kind_ids, order_ids = [], [], []
    colors = list(COLORS)
    for gy in range(grid):
        for gx in range(grid):
            votes: dict[int, int] = {}
            for sy in range(sub):
                for sx in range(sub):
                    px = (gx + (sx + 0.5) / sub) / grid
                    py = (gy + (sy + 0.5) / sub) / grid
                    for i, s in enumerate(scene.shapes):
                        if s.contains(px, py):
                            votes[i] = votes.get(i, 0) + 1
                            break
            best = max(votes, key=votes.get) if votes else None
            if best is None or votes[best] < math.ceil(sub * sub / 4):
                color_ids.append(0)
                kind_ids.append(0)
                order_ids.append(0)
            else:
                color_ids.append(colors.index(scene.shapes[best].color) + 1)
                kind_ids.append(KINDS.index(scene.shapes[best].kind) + 1)
                order_ids.append(best + 1)
    return color_ids, kind_ids, order_ids
