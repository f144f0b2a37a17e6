"""One loaded model shared by many users, each with their own pruned runs.

The model in memory always holds the full weights between calls. A pruning run, or an
answer from a pruned run, takes the lock, swaps the run's weights in, works, and puts
the full weights back before releasing it: nobody ever sees another user's zeros, and
the full model's answers never change. Stored runs are bounded in number and bytes; the
oldest is dropped first, and the caller is told which.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from .anatomy import parameter_counts
from .answers import ask as ask_model
from .data import Example
from .models import LoadedModel
from .options import PruneOptions
from .pipeline import prune
from .report import PruneResult
from .weights import WeightStore

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The user stopped a long job; the model is back to its full weights."""


@dataclass
class Run:
    """A pruned variant: its report and the weights of the layers it changed (on CPU)."""

    id: str
    label: str
    result: PruneResult
    weights: dict[str, torch.Tensor] = field(repr=False)
    created: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())


class Workbench:
    """Thread-safe pruning and answering on one model, with bounded stored runs."""

    def __init__(self, loaded: LoadedModel, max_runs: int = 8, max_bytes: int | None = None):
        self.loaded = loaded
        self.lock = threading.RLock()
        self.store = WeightStore.of(loaded.model)
        self.runs: OrderedDict[str, Run] = OrderedDict()
        self.max_runs = max_runs
        self.max_bytes = max_bytes
        self._ids = itertools.count(1)

    def describe(self) -> dict:
        """Which model, where, and how many weights are prunable per modality."""
        first = next(self.loaded.model.parameters())
        counts = parameter_counts(self.loaded.model)
        return {
            "name": self.loaded.name,
            "family": self.loaded.family,
            "device": str(first.device),
            "dtype": str(self.loaded.dtype).replace("torch.", ""),
            **counts,
        }

    def _acquire(self):
        self.lock.acquire()

    def prune(
        self,
        method: str,
        sparsity: float,
        options: PruneOptions | None = None,
        calibration: list[Example] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        label: str | None = None,
    ) -> tuple[Run, list[Run]]:
        """Prune a copy-free variant; returns the new run and any runs dropped to make room."""

        def report(what, done, total):
            if should_stop is not None and should_stop():
                raise Cancelled("stopped by the user")
            if progress is not None:
                progress(what, done, total)

        self._acquire()
        try:
            try:
                result = prune(self.loaded, method, sparsity, options, calibration, report)
                weights = {r["name"]: self.loaded.model.get_submodule(r["name"]).weight.detach().to("cpu", copy=True)
                           for r in result.layers}
            except torch.OutOfMemoryError as err:
                raise MemoryError(
                    "out of memory while pruning: the run was abandoned and the full model restored; "
                    "try fewer calibration samples or a smaller batch size"
                ) from err
            finally:
                self.store.restore()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        finally:
            self.lock.release()
        run_id = f"run{next(self._ids)}"
        run = Run(run_id, label or f"{method} {sparsity:.2f}", result, weights)
        dropped = self._add(run)
        return run, dropped

    def _add(self, run: Run) -> list[Run]:
        with self.lock:
            self.runs[run.id] = run
            dropped = []
            while len(self.runs) > 1 and (
                len(self.runs) > self.max_runs
                or (self.max_bytes is not None and sum(r.nbytes for r in self.runs.values()) > self.max_bytes)
            ):
                _, old = self.runs.popitem(last=False)
                dropped.append(old)
                log.info("dropped stored run %s (%s) to bound memory", old.id, old.label)
            return dropped

    def get(self, run_id: str) -> Run | None:
        return self.runs.get(run_id)

    def ask(self, images, questions: list[str], run_id: str | None = None, max_new_tokens: int = 20) -> list[str]:
        """Answers of the full model (run_id None) or of a stored run."""
        return self.with_run(run_id, lambda loaded: ask_model(loaded, images, questions, max_new_tokens))

    def with_run(self, run_id: str | None, fn: Callable[[LoadedModel], object]):
        """Call fn(loaded) with a run's weights in place (None: the full model), then restore."""
        run = self.runs.get(run_id) if run_id is not None else None
        if run_id is not None and run is None:
            raise KeyError(f"run {run_id} is no longer stored (runs are bounded); prune again")
        self._acquire()
        try:
            if run is not None:
                self.store.load(run.weights)
            return fn(self.loaded)
        finally:
            if run is not None:
                self.store.load({name: self.store.original[name] for name in run.weights})
            self.lock.release()

    def restore(self) -> bool:
        """Put the full weights back (they already are between calls); True if identical."""
        self._acquire()
        try:
            self.store.restore()
            return self.store.is_original()
        finally:
            self.lock.release()
