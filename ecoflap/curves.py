"""Score-against-sparsity curves measured ahead of time, shown before anyone presses a button.

A model folder may hold `pruning-curves.json` (written by the command it names). A
deployment may add its own (ECOFLAP_CURVES: a sweep's JSON, `python -m ecoflap sweep
--json`, or a folder of them), matched to a model by the file's `model`, since a class
cannot wait for a live sweep of a real model. Rows are per (method, sparsity, seed); this
module summarises them per (method, sparsity) as mean, min and max over seeds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from statistics import mean

log = logging.getLogger(__name__)
FILE = "pruning-curves.json"


def shipped_curves(source: str | None, deployment: str | None = None, model: str | None = None) -> dict | None:
    """The curves for a model, summarised: the deployment's own for this model (a file or
    a folder of files, `deployment`) first, then the model folder's; None where there are none."""
    if deployment:
        files = sorted(Path(deployment).glob("*.json")) if Path(deployment).is_dir() else [Path(deployment)]
        for path in files:
            data = read(path)
            if data is not None and data.get("model") == model:
                return data
    if not source or not (Path(source) / FILE).is_file():
        return None
    return read(Path(source) / FILE)


def read(path: Path) -> dict | None:
    """A curves file summarised; None (and a log line) where it cannot be read."""
    try:
        data = json.loads(path.read_text())
        summary = {**{k: v for k, v in data.items() if k != "rows"}, "rows": summarise(data["rows"])}
        summary.setdefault("metric", data["rows"][0]["metric"] if data["rows"] else "score")
        return summary
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        log.warning("ignoring curves file %s: %s", path.name, err)
        return None


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (method, sparsity): the mean score, its range over seeds, the seed count."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], float(row["sparsity"])), []).append(row)
    summary = []
    for (method, sparsity), members in groups.items():
        scores = [float(r["score"]) for r in members]
        summary.append({"method": method, "label": members[0].get("label", method), "sparsity": sparsity,
                        "score": mean(scores), "score_min": min(scores), "score_max": max(scores),
                        "seeds": len(members), "split": members[0].get("split")})
    return summary


def leaders(summary: list[dict], metric: str = "accuracy", higher_is_better: bool = True) -> str:
    """Which method scored best (mean over seeds) at each sparsity, in one sentence."""
    pick = max if higher_is_better else min
    best = []
    for s in sorted({r["sparsity"] for r in summary}):
        top = pick(r["score"] for r in summary if r["sparsity"] == s)
        names = ", ".join(r["label"] for r in summary if r["sparsity"] == s and r["score"] == top)
        best.append(f"at {s:g}, {names} with {top:.1%}" if metric == "accuracy" else f"at {s:g}, {names} with {top:.4g}")
    return f"{'Highest' if higher_is_better else 'Lowest'} mean {metric}: " + "; ".join(best) + "."
