"""What a run did, as plain data, and the files it can be exported as.

The JSON report is `PruneResult` serialised; the CSVs are its per-layer table and a
sweep's rows; a pruned model is a `save_pretrained` folder (safetensors) with its report.
Files are written under a temporary name and renamed, so an interrupted run never leaves
a half-written file that looks complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .offload import full_state_dict, is_offloaded


@dataclass
class PruneResult:
    """What a run did, in plain data (the JSON report is this, serialised)."""

    model: str
    method: str
    target_sparsity: float
    achieved_sparsity: float
    options: dict
    layers: list[dict]
    sparsity_by_modality: dict
    groups: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    recovery: dict = field(default_factory=dict)
    quality: dict | None = None  # the pruned model against the full one (see `quality`), when measured
    calibration: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def write_json(data: dict, path: str | Path):
    write_text(json.dumps(data, indent=2), path)


def save_pruned(loaded, report: dict, folder: str | Path):
    """A `save_pretrained` folder (safetensors) with the processor and `ecoflap_report.json`."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        offloaded = full_state_dict(loaded.model) if is_offloaded(loaded.model) else None
        loaded.model.save_pretrained(staging, safe_serialization=True, state_dict=offloaded)
        loaded.processor.save_pretrained(staging)
        write_json(report, staging / "ecoflap_report.json")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


LAYER_COLUMNS = ("name", "modality", "stack", "block", "numel", "columns", "zeros", "sparsity", "target_sparsity")
SWEEP_COLUMNS = ("method", "sparsity", "metric", "score", "achieved_sparsity", "seconds", "wall_seconds", "seed",
                 "label")


def layers_csv(report: dict) -> str:
    """The per-layer table of a report as CSV text."""
    return table_csv(report["layers"], LAYER_COLUMNS)


def table_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_text(text: str, path: str | Path):
    """Write text atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shipped or exported file from its readers
    os.replace(tmp, path)
