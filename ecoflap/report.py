"""The JSON report and the export of a pruned model (safetensors + report).

Files are written under a temporary name and renamed, so an interrupted run never
leaves a half-written file that looks complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path


def write_json(data: dict, path: str | Path):
    write_text(json.dumps(data, indent=2), path)


def save_pruned(loaded, report: dict, folder: str | Path):
    """A `save_pretrained` folder (safetensors) with the processor and `ecoflap_report.json`."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        loaded.model.save_pretrained(staging, safe_serialization=True)
        loaded.processor.save_pretrained(staging)
        write_json(report, staging / "ecoflap_report.json")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


LAYER_COLUMNS = ("name", "modality", "stack", "block", "numel", "zeros", "sparsity", "target_sparsity")


def layers_csv(report: dict) -> str:
    """The per-layer table of a report as CSV text."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=LAYER_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(report["layers"])
    return out.getvalue()


def write_text(text: str, path: str | Path):
    """Write text atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
