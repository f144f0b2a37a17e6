"""Results files that a long measurement writes row by row, so it can stop and resume.

Each of the shipped model's long measurements (`label_free`, `self_labels`, `recovery`)
writes a JSON object with a `rows` list after every finished row (`report.write_json`
writes under a temporary name and renames, so an interruption never leaves half a file).
A rerun loads the file through `resume`, skips the rows it already has and appends the
rest; a file it cannot read is refused with the reason, never silently overwritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable


class ResumeError(ValueError):
    """A results file that cannot be resumed; the message says which file, why, and what to do."""


@dataclass
class Resumed:
    """A results file as loaded: its data (with a `rows` list) and the keys of its rows."""

    data: dict
    done: set = field(default_factory=set)

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def seconds(self) -> float:
        """Wall seconds the earlier runs of this measurement already spent (0 for a new one)."""
        return float(self.data.get("seconds", 0))


def resume(path: str | Path, key: Callable[[dict], Hashable], fresh: dict | None = None) -> Resumed:
    """The results at `path` and the `key` of every finished row; `fresh` with no rows where
    the file does not exist yet. A file that is not valid JSON, not an object with a `rows`
    list, or has a row without the key's fields raises ResumeError naming the file and why."""
    path = Path(path)
    if not path.exists():
        return Resumed({**(fresh or {}), "rows": []})
    fix = "move it away (or restore it with git) to start the measurement again"
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ResumeError(f"{path} cannot be resumed: it is not a text file; {fix}") from None
    except json.JSONDecodeError as err:
        raise ResumeError(f"{path} cannot be resumed: it is not valid JSON (line {err.lineno}, column {err.colno}: "
                         f"{err.msg}; cut short?); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ResumeError(f"{path} cannot be resumed: it is not a results file (a JSON object with a list of "
                         f"rows); {fix}")
    done = set()
    for number, row in enumerate(data["rows"], 1):
        try:
            done.add(key(row))
        except KeyError as err:
            raise ResumeError(f"{path} cannot be resumed: row {number} has no {err.args[0]!r}, so it cannot tell "
                              f"which point it measured; {fix}") from None
        except (TypeError, ValueError, AttributeError) as err:
            raise ResumeError(f"{path} cannot be resumed: row {number} is not a row this measurement writes "
                              f"({err}); {fix}") from None
    return Resumed(data, done)
