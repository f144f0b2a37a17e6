"""Does the label-free measure rank pruned models as accuracy does? Measured on the shipped model.

    python -m ecoflap.toy.label_free [--out assets/shapes-blip2/label-free.json] [--by method] [--threads 1]

For every method, sparsity and seed of the model card's pruning table (the per-modality
rows at the split the card chose), one prune with the shipped calibration set and default
options, then the pruned model against the full one on the sweep's 200 generated
questions (seed 1234; no image of the calibration set among them): KL(full || pruned)
over the answer tokens teacher-forced on the reference answers, same top, same answer,
accuracy and flips. Then the Spearman rank correlation, over all rows, of each
label-free figure with accuracy. Rows are written as they finish, and a rerun keeps the
rows its file already has, so a long measurement can be stopped and resumed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..curves import FILE as CURVES_FILE
from ..models import load_model
from ..options import PruneOptions
from ..precision import rank_correlation
from ..report import write_json
from ..scoring import HELD_OUT_N, SCORE_SEED, held_out_examples, quality_against_full, reference_for
from ..workbench import Workbench
from .pruning_curves import METHODS, SEEDS, SPARSITIES
from .resumable import ResumeError, resume

FILE = "label-free.json"
COMMAND = "python -m ecoflap.toy.label_free"
ORDER = (0.7, 0.8, 0.6, 0.5, 0.75)  # the informative sparsities first, so a partial file already ranks
BY_METHOD = ("wanda", "global_magnitude", "owl", "ecoflap_first", "ecoflap_zeroth", "per_modality")
FIGURES = ("kl_mean", "kl_median", "kl_p99", "same_top", "same_answer")


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (`precision.rank_correlation`: ties share their mean
    rank); None where either side is constant."""
    if len(set(map(float, x))) < 2 or len(set(map(float, y))) < 2:
        return None
    return rank_correlation(list(x), list(y))


def points(folder: Path, by: str = "sparsity") -> list[dict]:
    """The card's table as (method, sparsity, seed, vision sparsity) points, informative ones
    first: whole columns of the table (`by="sparsity"`), or whole rows (`by="method"`, the
    cheapest methods first, ECoFLaP's other seeds last), so a partial file is a whole part."""
    splits = {}
    curves = folder / CURVES_FILE
    if curves.is_file():
        for row in json.loads(curves.read_text())["rows"]:
            if row["method"] == "per_modality":
                splits[float(row["sparsity"])] = row["split"]["vision"]
    out = []
    for seed_pass in (0, 1):
        for s in ORDER:
            for method in (*METHODS, "per_modality"):
                seeds = SEEDS if method == "ecoflap_zeroth" else SEEDS[:1]
                for seed in (seeds[:1] if seed_pass == 0 else seeds[1:]):
                    if method == "per_modality" and s not in splits:
                        continue
                    out.append({"method": method, "sparsity": s, "seed": seed,
                                "vision_sparsity": splits.get(s) if method == "per_modality" else None})
    out = [p for p in out if p["sparsity"] in SPARSITIES]
    if by == "method":
        out.sort(key=lambda p: (p["seed"] > 0, BY_METHOD.index(p["method"]), p["seed"], ORDER.index(p["sparsity"])))
    return out


def key(row: dict) -> tuple:
    """What identifies a row (and a point to measure)."""
    return row["method"], float(row["sparsity"]), int(row["seed"])


def correlations(rows: list[dict]) -> dict:
    accuracy = [r["quality"]["accuracy"] for r in rows]
    return {f: spearman([r["quality"][f] for r in rows], accuracy) for f in FIGURES}


def correlations_by_sparsity(rows: list[dict]) -> dict:
    """The same correlations among the runs of one sparsity (at least three), where the
    sparsity itself cannot do the ranking: does the measure tell the methods apart?"""
    out = {}
    for s in sorted({float(r["sparsity"]) for r in rows}):
        same = [r for r in rows if float(r["sparsity"]) == s]
        if len(same) > 2:
            out[f"{s:g}"] = {"rows": len(same), **correlations(same)}
    return out


def measure(folder: Path, out: Path, log=print, by: str = "sparsity", threads: int = 2) -> dict:
    resumed = resume(out, key)
    torch.set_num_threads(threads)
    workbench = Workbench(load_model(str(folder), device="cpu"))
    rows = resumed.rows
    started = time.perf_counter() - resumed.seconds()
    examples = held_out_examples(n=HELD_OUT_N, seed=SCORE_SEED)
    reference = workbench.using(None, lambda loaded: reference_for(loaded, examples))
    for p in points(folder, by):
        if key(p) in resumed.done:
            continue
        options = PruneOptions(seed=p["seed"], vision_sparsity=p["vision_sparsity"])
        result, _, quality = workbench.prune(p["method"], p["sparsity"], options,
                                             then=lambda loaded, _r: quality_against_full(loaded, reference))
        rows.append({**{k: v for k, v in p.items() if v is not None}, "quality": quality,
                     "achieved_sparsity": result.achieved_sparsity})
        q = quality
        log(f"{p['method']:18s} {p['sparsity']:.2f} seed {p['seed']}  acc {q['accuracy']:.3f}  "
            f"KL {q['kl_mean']:.4f}  same top {q['same_top']:.3f}  flips {q['flips']}")
        write_json(summary(rows, reference_accuracy(rows), time.perf_counter() - started), out)
    return summary(rows, reference_accuracy(rows), time.perf_counter() - started)


def reference_accuracy(rows: list[dict]) -> float | None:
    return rows[0]["quality"]["full_accuracy"] if rows else None


def summary(rows: list[dict], full_accuracy, seconds: float) -> dict:
    return {
        "model": "shapes-blip2",
        "measured_on": f"{HELD_OUT_N} generated shapes questions of every type (seed {SCORE_SEED}), "
                       f"teacher-forced on their reference answers; calibration: the shipped set, default options",
        "command": COMMAND,
        "full_accuracy": full_accuracy,
        "spearman_with_accuracy": correlations(rows) if len(rows) > 2 else {},
        "spearman_by_sparsity": correlations_by_sparsity(rows),
        "rows": rows,
        "seconds": round(seconds),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="assets/shapes-blip2")
    parser.add_argument("--out", default=None, help=f"default: the model folder's {FILE}")
    parser.add_argument("--by", choices=("sparsity", "method"), default="sparsity",
                        help="which whole part of the card's table to measure first: its columns or its rows")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine shared with others)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    try:
        result = measure(folder, Path(args.out) if args.out else folder / FILE, by=args.by, threads=args.threads)
    except ResumeError as err:
        parser.exit(2, f"{err}\n")
    print(json.dumps(result["spearman_with_accuracy"], indent=1))


if __name__ == "__main__":
    main()


def table(data: dict) -> str:
    """The measured rows, most informative sparsity first, and the rank correlations."""
    order = {s: i for i, s in enumerate(ORDER)}
    rows = sorted(data["rows"], key=lambda r: (order.get(r["sparsity"], len(order)), r["method"], r["seed"]))
    lines = ["| method | sparsity | seed | accuracy | flips right→wrong / wrong→right | mean KL | median KL | "
             "p99 KL | same top | same answer |", "|---" * 10 + "|"]
    for r in rows:
        q = r["quality"]
        lines.append(f"| {r['method']} | {r['sparsity']:g} | {r['seed']} | {q['accuracy']:.1%} | "
                     f"{q['flips']['right_to_wrong']} / {q['flips']['wrong_to_right']} | {q['kl_mean']:.4f} | "
                     f"{q['kl_median']:.5f} | {q['kl_p99']:.3f} | {q['same_top']:.1%} | {q['same_answer']:.1%} |")
    rho = data["spearman_with_accuracy"]
    names = {"kl_mean": "mean KL", "kl_median": "median KL", "kl_p99": "p99 KL", "same_top": "same top",
             "same_answer": "same answer"}
    measured = ", ".join(f"{names[k]} {v:+.3f}" if v is not None else f"{names[k]} undefined (constant)"
                         for k, v in rho.items())
    text = "\n".join(lines) + (f"\n\nSpearman rank correlation with accuracy over these {len(rows)} rows: "
                               f"{measured}." if rho else "")
    within = correlations_by_sparsity(data["rows"])
    if not within:
        return text
    lines = ["| sparsity | runs | " + " | ".join(names[f] for f in FIGURES) + " |", "|---" * (len(FIGURES) + 2) + "|"]
    for s, rho in within.items():
        lines.append(f"| {s} | {rho['rows']} | " + " | ".join("constant" if rho[f] is None else f"{rho[f]:+.3f}"
                                                            for f in FIGURES) + " |")
    return (text + "\n\nThe same correlations among the runs of one sparsity, where the sparsity cannot do the "
            "ranking (the methods against each other; ECoFLaP's seeds count as runs):\n\n" + "\n".join(lines))
