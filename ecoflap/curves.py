"""Accuracy-against-sparsity curves measured ahead of time and shipped with a model.

A model folder may hold `pruning-curves.json` (written by the command it names), so a
class sees the curves before anyone presses a button. Rows are per (method, sparsity,
seed); this module summarises them per (method, sparsity) as mean, min and max over seeds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from statistics import mean

log = logging.getLogger(__name__)
FILE = "pruning-curves.json"


def shipped_curves(source: str | None) -> dict | None:
    """The curves shipped in a model folder, summarised; None where there are none."""
    if not source or not (Path(source) / FILE).is_file():
        return None
    try:
        data = json.loads((Path(source) / FILE).read_text())
        return {**{k: v for k, v in data.items() if k != "rows"}, "rows": summarise(data["rows"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring %s of %s: %s", FILE, Path(source).name, err)
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


def leaders(summary: list[dict]) -> str:
    """Which method scored highest (mean over seeds) at each sparsity, in one sentence."""
    best = []
    for s in sorted({r["sparsity"] for r in summary}):
        top = max(r["score"] for r in summary if r["sparsity"] == s)
        names = ", ".join(r["label"] for r in summary if r["sparsity"] == s and r["score"] == top)
        best.append(f"at {s:g}, {names} with {top:.1%}")
    return "Highest mean accuracy: " + "; ".join(best) + "."
