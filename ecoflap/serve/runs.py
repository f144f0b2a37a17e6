"""Every stored run of a deployment in one place: who owns each, and the bounds on them.

A session's runs are the runs it owns here; nothing else keeps a list of them, so a run
that goes for any reason (its owner's quota, the memory shared by everyone, its model
unloaded, its owner clearing or leaving) is gone from everywhere at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable


class RunStore:
    """The runs of every session, oldest first, bounded per session and in memory together."""

    def __init__(self, limits):
        self.limits = limits  # runs_per_session and run_memory_mb
        self._runs: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.RLock()

    def add(self, owner: str, make: Callable[[list], object]) -> tuple[object, list[tuple[object, str]]]:
        """Store the run `make(owner's runs)` builds (under the lock, so a label that counts
        the owner's runs is never given twice); then drop the owner's oldest beyond its
        bound, and the oldest runs of anyone while the memory is over its bound (never the
        new run's weights; weights shared by several runs count once and go together).
        Returns the run, and each dropped run with why, for its owner to be told."""
        per_session, memory_mb = self.limits.runs_per_session, self.limits.run_memory_mb
        dropped = []
        with self._lock:
            run = make(self.of(owner))
            self._runs[run.id] = run
            mine = self.of(owner)
            for old in mine[:max(0, len(mine) - per_session)]:
                self._runs.pop(old.id)
                dropped.append((old, f"each session keeps at most {per_session} runs (the oldest goes first)"))
            while held_bytes(self._runs.values()) > memory_mb * 2**20:
                oldest = next((r for r in self._runs.values() if r.weights is not run.weights), None)
                if oldest is None:
                    break
                for victim in [r for r in self._runs.values() if r.weights is oldest.weights]:
                    self._runs.pop(victim.id)
                    dropped.append((victim, f"the server's memory for stored runs ({memory_mb:g} MiB, shared "
                                            f"by everyone) was full"))
        return run, dropped

    def of(self, owner: str) -> list:
        with self._lock:
            return [r for r in self._runs.values() if r.owner == owner]

    def get(self, owner: str, run_id) -> object | None:
        """The run of an id if `owner` owns it; any other id, stale or guessed, is None."""
        with self._lock:
            run = self._runs.get(run_id) if isinstance(run_id, str) else None
        return run if run is not None and run.owner == owner else None

    def remove(self, which: Callable[[object], bool]) -> list:
        """Drop every run `which` picks; returns them, oldest first."""
        with self._lock:
            gone = [r for r in self._runs.values() if which(r)]
            for run in gone:
                self._runs.pop(run.id)
        return gone

    def latest(self, which: Callable[[object], bool]) -> object | None:
        """The newest run `which` picks, of any owner."""
        with self._lock:
            return next((r for r in reversed(self._runs.values()) if which(r)), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return held_bytes(self._runs.values())


def held_bytes(runs) -> int:
    """The memory the runs' weights take, each set of weights counted once however many
    runs share it."""
    return sum(w.nbytes for w in {id(r.weights): r.weights for r in runs}.values())
