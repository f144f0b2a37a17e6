"""Self-labelled against labelled calibration, measured on the shipped model.

    python -m ecoflap.toy.self_labels [--out assets/shapes-blip2/self-labelled.json] [--threads 1]

The same 128 shipped calibration images, once with their ground-truth captions and once
with the full model's own greedy captions as targets (what a person gets who calibrates
on their own pictures without captions). For Wanda and zeroth-order ECoFLaP at 0.6 and
0.7 (ECoFLaP with seeds 0, 1, 2), one prune per point with default options, scored as
the card's pruning table is (`quick_score`: exact match on the sweep's 500 generated
questions, seed 1234). Rows are written as they finish and a rerun keeps them, so a long
measurement can be stopped and resumed; the informative points come first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..answers import ask
from ..data import DEFAULT_CALIBRATION
from ..models import load_model
from ..options import PruneOptions
from ..report import write_json
from ..scoring import SCORE_SEED, quick_score
from ..sources import Source, labeller, parse
from ..workbench import Workbench
from .pruning_curves import EVAL_N
from .resumable import ResumeError, resume

FILE = "self-labelled.json"
COMMAND = "python -m ecoflap.toy.self_labels"
LABELS = ("labelled", "self-labelled")
POINTS = [("wanda", 0.6, 0), ("ecoflap_zeroth", 0.6, 0), ("wanda", 0.7, 0), ("ecoflap_zeroth", 0.7, 0),
          ("ecoflap_zeroth", 0.6, 1), ("ecoflap_zeroth", 0.7, 1), ("ecoflap_zeroth", 0.6, 2),
          ("ecoflap_zeroth", 0.7, 2)]


def key(row: dict) -> tuple:
    """What identifies a row: the point and which targets it calibrated on."""
    return row["method"], float(row["sparsity"]), int(row["seed"]), row["targets"]


def calibrations(workbench: Workbench) -> dict:
    """The shipped set with its captions, and the same images with the full model's captions."""
    labelled = parse(None).draw(128)
    images = Source("images", "the shipped calibration images",
                    files=tuple(str(p) for p in sorted(DEFAULT_CALIBRATION.glob("*.png"))))
    own = images.draw(128, labeller=labeller(
        lambda im, q: workbench.using(None, lambda loaded: ask(loaded, im, q))))
    return {"labelled": labelled, "self-labelled": own}


def measure(folder: Path, out: Path, log=print, threads: int = 2) -> dict:
    resumed = resume(out, key)
    torch.set_num_threads(threads)
    workbench = Workbench(load_model(str(folder), device="cpu"))
    rows = resumed.rows
    started = time.perf_counter() - resumed.seconds()
    sets = calibrations(workbench)
    differ = sum(a.answer.strip() != b.answer.strip()
                 for a, b in zip(sets["labelled"].examples, sets["self-labelled"].examples))
    full = workbench.using(None, lambda loaded: quick_score(loaded, EVAL_N, SCORE_SEED))["value"]
    for method, sparsity, seed in POINTS:
        for targets in LABELS:
            if (method, sparsity, seed, targets) in resumed.done:
                continue
            result, _, score = workbench.prune(method, sparsity, PruneOptions(seed=seed), sets[targets],
                                               then=lambda loaded, _r: quick_score(loaded, EVAL_N, SCORE_SEED))
            rows.append({"method": method, "sparsity": sparsity, "seed": seed, "targets": targets,
                         "accuracy": score["value"], "calibration_sha256": result.calibration["sha256"]})
            log(f"{method:16s} {sparsity:.2f} seed {seed} {targets:14s} accuracy {score['value']:.3f}")
            write_json(summary(rows, full, differ, time.perf_counter() - started), out)
    return summary(rows, full, differ, time.perf_counter() - started)


def summary(rows: list[dict], full: float, differ: int, seconds: float) -> dict:
    return {"model": "shapes-blip2", "command": COMMAND, "full_accuracy": full,
            "measured_on": f"exact match on {EVAL_N} generated shapes questions (seed {SCORE_SEED}); calibration: "
                           f"the 128 shipped images with their captions, or with the full model's own captions",
            "self_labels_differing": differ, "calibration_images": 128, "rows": rows, "seconds": round(seconds)}


def table(data: dict) -> str:
    """Markdown: method and sparsity by labelled / self-labelled accuracy (mean and range over seeds)."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in data["rows"]:
        groups.setdefault((r["method"], r["sparsity"]), {}).setdefault(r["targets"], []).append(r["accuracy"])
    names = {"wanda": "Wanda", "ecoflap_zeroth": "ECoFLaP (zeroth-order)"}
    lines = ["| method | sparsity | seeds | labelled | self-labelled | difference |", "|---|---|---|---|---|---|"]
    for (method, sparsity), by in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] != "wanda")):
        if len(by) < 2:
            continue
        n = min(len(by[t]) for t in LABELS)
        means = {t: sum(by[t][:n]) / n for t in LABELS}
        cells = [f"{means[t]:.1%}" + (f" ({min(by[t][:n]):.1%} to {max(by[t][:n]):.1%})" if n > 1 else "")
                 for t in LABELS]
        lines.append(f"| {names.get(method, method)} | {sparsity:g} | {n} | {cells[0]} | {cells[1]} | "
                     f"{(means['self-labelled'] - means['labelled']) * 100:+.1f} points |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="assets/shapes-blip2")
    parser.add_argument("--out", default=None, help=f"default: the model folder's {FILE}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine shared with others)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    try:
        print(table(measure(folder, Path(args.out) if args.out else folder / FILE, threads=args.threads)))
    except ResumeError as err:
        parser.exit(2, f"{err}\n")


if __name__ == "__main__":
    main()
