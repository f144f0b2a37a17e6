"""Accuracy against sparsity for every allocation strategy, measured on the shipped model.

    python -m ecoflap.toy.card --curves

Same model, calibration (the shipped set, default options) and scorer (`quick_score`:
500 generated questions, seed 1234) for every method; zeroth-order ECoFLaP once per seed.
The per-modality split is chosen per sparsity on 200 *other* questions (seed 4321), from
a grid of vision sparsities around the target, and only the chosen split is scored on
the 500, so the table does not reward picking the luckiest split on the questions it
reports. Writes `pruning-curves.json` (read by `ecoflap.curves` and the model card).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..allocation import modality_budget
from ..anatomy import prunable_layers
from ..curves import FILE
from ..options import PruneOptions
from ..report import write_json
from ..scoring import quick_score
from ..scoring import SCORE_SEED
from ..sweep import measure_point, sweep
from ..workbench import Workbench

COMMAND = "python -m ecoflap.toy.card --curves"
SPARSITIES = (0.5, 0.6, 0.7, 0.75, 0.8)
METHODS = ("wanda", "owl", "global_magnitude", "ecoflap_zeroth", "ecoflap_first")
SEEDS = (0, 1, 2)
EVAL_N = 500
SPLIT_OFFSETS = (-0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15)  # vision sparsity minus the target
SELECTION_N, SELECTION_SEED = 200, 4321

Log = Callable[[str], None]


def measure_curves(workbench: Workbench, log: Log = print) -> dict:
    """The curves file's content: one row per method, sparsity and (where it matters) seed."""
    started = time.perf_counter()
    full = workbench.using(None, lambda loaded: quick_score(loaded, EVAL_N, SCORE_SEED))
    rows = sweep(workbench, list(METHODS), list(SPARSITIES), PruneOptions(), eval_n=EVAL_N, seeds=SEEDS,
                 on_row=lambda r: log(f"{r['method']:18s} {r['sparsity']:.2f} seed {r['seed']}  {r['score']:.4f}"))
    search = []
    for sparsity in SPARSITIES:
        tried = split_search(workbench, sparsity)
        search.extend(tried)
        best = max(tried, key=lambda t: (t["selection_score"], -abs(t["vision"] - sparsity)))
        row = measure_point(workbench, "per_modality", sparsity, PruneOptions(vision_sparsity=best["vision"]),
                            eval_n=EVAL_N)
        log(f"per_modality       {sparsity:.2f} vision {best['vision']:.2f}  {row['score']:.4f}")
        rows.append(row)
    return {
        "model": "shapes-blip2",
        "metric": full["metric"],
        "measured_on": f"{full['measured_on']}; calibration: the shipped set with default options; "
                       f"per-modality split chosen per sparsity on {SELECTION_N} other questions "
                       f"(seed {SELECTION_SEED}) from vision sparsities target "
                       f"{', '.join(f'{d:+.2f}' for d in SPLIT_OFFSETS)}",
        "command": COMMAND,
        "full_score": full["value"],
        "rows": [{k: r[k] for k in ("method", "label", "sparsity", "seed", "score", "achieved_sparsity", "split")
                  if k in r} for r in rows],
        "split_search": search,
        "seconds": round(time.perf_counter() - started),
    }


def split_search(workbench: Workbench, sparsity: float) -> list[dict]:
    """Every feasible vision sparsity of the grid at one target, scored on the selection set."""
    layers = prunable_layers(workbench.loaded.model)
    tried = []
    for offset in SPLIT_OFFSETS:
        vision = round(sparsity + offset, 4)
        try:
            modality_budget(layers, sparsity, vision)
        except ValueError:  # the language model cannot take the rest of the budget
            continue
        row = measure_point(workbench, "per_modality", sparsity, PruneOptions(vision_sparsity=vision),
                            eval_n=SELECTION_N, eval_seed=SELECTION_SEED)
        tried.append({"sparsity": sparsity, "vision": vision, "language": row["split"]["language"],
                      "selection_score": row["score"]})
    return tried


def write_curves(folder: Path, curves: dict) -> Path:
    path = Path(folder) / FILE
    write_json(curves, path)
    return path
