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
        if "metric" not in summary:  # not setdefault: its default would be read even where the file names it
            summary["metric"] = data["rows"][0]["metric"] if data["rows"] else "score"
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


RECOVERY_FILE = "recovery.json"


def shipped_recovery(source: str | None) -> list[dict] | None:
    """Recovery measured ahead of time in a model folder (`recovery.json`, written by the
    command it names), one row per (method, way, sparsity, steps, lr): the mean score
    before and after over seeds, their ranges, the seed count and the mean CPU time (rows
    without a way are the full way); None where absent."""
    if not source or not (Path(source) / RECOVERY_FILE).is_file():
        return None
    try:
        rows = json.loads((Path(source) / RECOVERY_FILE).read_text())["rows"]
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            groups.setdefault((row["method"], row.get("way", "full"), float(row["sparsity"]), int(row["steps"]),
                               float(row["lr"])), []).append(row)
        return [{"method": method, "label": members[0].get("label", method), "way": way,
                 "rank": members[0].get("rank"), "sparsity": sparsity, "steps": steps, "lr": lr,
                 "before": mean(r["before"] for r in members), "after": mean(r["after"] for r in members),
                 "before_min": min(r["before"] for r in members), "before_max": max(r["before"] for r in members),
                 "after_min": min(r["after"] for r in members), "after_max": max(r["after"] for r in members),
                 "seeds": len(members), "cpu_s": mean(r["recover_cpu_s"] for r in members),
                 "merge_densification": (max(r.get("merge_densification", 0) for r in members)
                                         if way == "lora" else None)}
                for (method, way, sparsity, steps, lr), members in groups.items()]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring %s of %s: %s", RECOVERY_FILE, Path(source).name, err)
        return None


def recovery_sentence(summary: list[dict]) -> str:
    """What recovery brought back, per sparsity and number of steps, in one sentence (the
    full way, the Recover tab's default, where it was measured)."""
    summary = [r for r in summary if r.get("way", "full") == "full"] or summary
    parts = []
    several = len({r["lr"] for r in summary}) > 1
    for key in sorted({(r["sparsity"], r["steps"], r["lr"]) for r in summary}):
        rows = [r for r in summary if (r["sparsity"], r["steps"], r["lr"]) == key]
        at = f"at {key[0]:g} after {key[1]} steps" + (f" (lr {key[2]:g})" if several else "")
        parts.append(f"{at}: " + ", ".join(f"{r['label']} {r['before']:.1%} → {r['after']:.1%}" for r in rows))
    lr = "" if several else f", lr {summary[0]['lr']:g}"
    return f"Recovery measured on this model (fine-tuning with every zero held{lr}): " + "; ".join(parts) + "."
