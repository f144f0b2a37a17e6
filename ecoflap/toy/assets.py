"""Write the shipped calibration set and example images: python -m ecoflap.toy.assets --out assets

calibration/: 128 image-caption pairs (captioning, as the paper calibrates on image-text
pairs), PNGs of 96 to 256 px, indexed by examples.jsonl. examples/: a few scenes for the
UI with suggested questions in questions.json. Seeds differ from training and evaluation.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ..shapes.world import caption, questions, random_scene, render

CALIBRATION_SEED = 20_000
EXAMPLES_SEED = 30_000


def write_calibration(folder: Path, n: int = 128, seed: int = CALIBRATION_SEED):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scene = random_scene(rng)
        name = f"{i:03d}.png"
        render(scene, rng.randint(96, 256), rng).save(folder / name, optimize=True)
        rows.append({"image": name, "question": "", "answer": caption(scene)})
    (folder / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_examples(folder: Path, n: int = 8, seed: int = EXAMPLES_SEED):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    suggested = {}
    for i in range(n):
        scene = random_scene(rng)
        name = f"scene{i + 1}.png"
        render(scene, 224, rng).save(folder / name, optimize=True)
        suggested[name] = [{"question": s.question, "answer": s.answer} for s in questions(scene, rng)]
    (folder / "questions.json").write_text(json.dumps(suggested, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="assets")
    out = Path(parser.parse_args(argv).out)
    write_calibration(out / "calibration")
    write_examples(out / "examples")
    print(f"wrote {out / 'calibration'} and {out / 'examples'}")


if __name__ == "__main__":
    main()
