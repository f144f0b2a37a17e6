"""The JSON report and the export of a pruned model (safetensors + report).

Files are written under a temporary name and renamed, so an interrupted run never
leaves a half-written file that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_json(data: dict, path: str | Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


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
