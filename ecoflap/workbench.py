"""One loaded model shared by many sessions, and the units of work they do on it.

The model holds its full weights between units of work. A unit (one prune, one sweep
point, one answer) takes the model, swaps in whatever variant it needs, works, and puts
the full weights back before it lets go: nobody ever sees another user's zeros, and the
full model's answers never change. Long units (pruning) wait in a queue of their own,
sessions served in turn (one session's many units never starve another's), and a waiting
short unit (an answer) goes before the first of them: an answer waits for the long unit in
progress, and for one more only if that one has already waited `ModelLock.patience`
seconds (so answers cannot starve it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Callable

import torch

from .anatomy import INCLUDE_CHOICES, parameter_counts, prunable_layers
from .answers import ask as ask_model
from .data import Example
from .methods import Method
from .models import LoadedModel
from .options import PruneOptions
from .pipeline import prune
from .progress import Cancelled, Progress, StopCheck, stop_if_asked
from .quality import Reference
from .recover import OnStep, Recovery, RecoverOptions, recover
from .report import PruneResult
from .scoring import reference_for
from .stats import layer_table
from .weights import RunWeights, WeightStore

log = logging.getLogger(__name__)
REFERENCES_KEPT = 4


class FairQueue:
    """The turn of long units: one at a time, owners (sessions) served in rotation, each
    owner's own units in arrival order, so one session's queue never starves the others.
    A waiter can give up when asked to stop."""

    def __init__(self):
        self._condition = threading.Condition()
        self._waiting: OrderedDict[object, deque[object]] = OrderedDict()  # owners in turn order
        self._held = False

    def acquire(self, owner: object = None, should_stop: StopCheck | None = None, poll: float = 0.1):
        ticket = object()
        with self._condition:
            self._waiting.setdefault(owner, deque()).append(ticket)
            try:
                while self._held or not self._first(ticket):
                    _check(should_stop)
                    self._condition.wait(poll)
            except BaseException:
                self._leave(owner, ticket)
                self._condition.notify_all()
                raise
            queue = self._waiting.pop(owner)
            queue.popleft()
            if queue:
                self._waiting[owner] = queue  # its next unit goes after every other owner's
            self._held = True

    def _first(self, ticket: object) -> bool:
        queue = next(iter(self._waiting.values()), None)
        return queue is not None and queue[0] is ticket

    def _leave(self, owner: object, ticket: object):
        queue = self._waiting.get(owner)
        if queue is not None:
            queue.remove(ticket)
            if not queue:
                del self._waiting[owner]

    def release(self):
        with self._condition:
            self._held = False
            self._condition.notify_all()

    @property
    def waiting(self) -> int:
        with self._condition:
            return sum(len(q) for q in self._waiting.values())


class ModelLock:
    """Who uses the model now: one unit at a time, and waiting answers go before a waiting
    long unit, unless it has waited `patience` seconds (so answers cannot starve it)."""

    def __init__(self, patience: float = 1.0):
        self.patience = patience
        self._condition = threading.Condition()
        self._busy = False
        self.short_waiting = 0
        self._long_since: float | None = None

    def acquire(self, long: bool, should_stop: StopCheck | None = None, poll: float = 0.05):
        with self._condition:
            if long:
                self._long_since = time.monotonic()
                try:
                    while self._busy or (self.short_waiting and not self._long_overdue()):
                        _check(should_stop)
                        self._condition.wait(poll)
                finally:
                    self._long_since = None
            else:
                self.short_waiting += 1
                try:
                    while self._busy or self._long_overdue():
                        self._condition.wait(poll)
                finally:
                    self.short_waiting -= 1
            self._busy = True

    def _long_overdue(self) -> bool:
        return self._long_since is not None and time.monotonic() - self._long_since >= self.patience

    def release(self):
        with self._condition:
            self._busy = False
            self._condition.notify_all()


def _check(should_stop: StopCheck | None):
    stop_if_asked(should_stop, "stopped while waiting for the model")


class Workbench:
    """Thread-safe pruning and answering on one model."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.store = WeightStore.of(loaded)
        self.long_queue = FairQueue()
        self.model_lock = ModelLock()
        self._references: dict[tuple, tuple[list[Example], Reference]] = {}
        self._references_lock = threading.Lock()

    @contextlib.contextmanager
    def unit(self, long: bool = False, should_stop: StopCheck | None = None, owner: object = None):
        """Hold the model for one unit of work; the full weights are back when it ends.
        Long units take turns by `owner` (a session id; None: one shared line)."""
        if long:
            self.long_queue.acquire(owner, should_stop)
        try:
            self.model_lock.acquire(long, should_stop)
            try:
                yield self.loaded
            finally:
                self.model_lock.release()
        finally:
            if long:
                self.long_queue.release()

    def describe(self) -> dict:
        """Which model, where, and how many weights are prunable per modality."""
        first = next(self.loaded.model.parameters())
        return {
            "name": self.loaded.name,
            "family": self.loaded.family,
            "device": str(first.device),
            "dtype": str(self.loaded.dtype).replace("torch.", ""),
            "full_weights": "read back from the model's files" if not self.store.copies else
            f"kept as a copy ({self.store.copied_bytes / 2**20:,.1f} MiB)",
            **parameter_counts(self.loaded.model),
        }

    def prune(self, method: str | Method, sparsity: float, options: PruneOptions | None = None,
              calibration: list[Example] | None = None, progress: Progress | None = None,
              should_stop: StopCheck | None = None,
              then: Callable[[LoadedModel, PruneResult], object] | None = None,
              held_out: list[Example] | None = None, owner: object = None) -> tuple[PruneResult, RunWeights, object]:
        """One prune as one unit: returns its report, its compact weights and then(loaded,
        result) computed on the pruned model (a sweep's score), the full weights restored.
        With `held_out` examples, the report's `quality` compares the run with the full model."""
        reference = self.reference(held_out, should_stop, owner) if held_out is not None else None
        with self.unit(long=True, should_stop=should_stop, owner=owner) as loaded:
            try:
                result = prune(loaded, method, sparsity, options, calibration, progress, reference, should_stop)
                weights = RunWeights.capture(self.store, [r["name"] for r in result.layers])
                stop_if_asked(should_stop)
                extra = then(loaded, result) if then is not None else None
            except torch.OutOfMemoryError as err:
                raise MemoryError(
                    "out of memory while pruning: the run was abandoned and the full model restored; "
                    "try fewer calibration samples or a smaller batch size"
                ) from err
            finally:
                self.store.restore()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return result, weights, extra

    def recover(self, weights: RunWeights, options: RecoverOptions, calibration: list[Example] | None = None,
                progress: Progress | None = None, should_stop: StopCheck | None = None,
                on_step: OnStep | None = None, owner: object = None) -> tuple[Recovery, list[dict], RunWeights]:
        """Fine-tune a variant with its zeros held, as one long unit: returns what happened,
        the per-layer table and the recovered weights; the full weights are back afterwards."""

        def report(what, done, total):
            if should_stop is not None and should_stop():
                raise Cancelled("stopped by the user")
            if progress is not None:
                progress(what, done, total)

        with self.unit(long=True, should_stop=should_stop, owner=owner) as loaded:
            names = set(weights.names)
            layers = [layer for layer in prunable_layers(loaded.model, INCLUDE_CHOICES) if layer.name in names]
            try:
                with weights.applied(self.store):
                    recovery = recover(loaded, layers, options, calibration, report, on_step)
                    table = layer_table(layers)
                    recovered = RunWeights.capture(self.store, weights.names)
            except torch.OutOfMemoryError as err:
                raise MemoryError("out of memory while fine-tuning: the recovery was abandoned and the full "
                                  "model restored; try a smaller batch size or the LoRA way") from err
            finally:
                self.store.restore()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return recovery, table, recovered

    def reference(self, examples: list[Example], should_stop: StopCheck | None = None,
                  owner: object = None) -> Reference:
        """The full model on held-out examples (its answers and next-token distributions),
        measured once per set of examples and kept: the full model never changes."""
        key = tuple(map(id, examples))
        with self._references_lock:
            kept = self._references.get(key)
        if kept is not None:
            return kept[1]
        reference = self.using(None, lambda loaded: reference_for(loaded, examples), long=True,
                               should_stop=should_stop, owner=owner)
        with self._references_lock:
            self._references[key] = (list(examples), reference)  # the examples pin their ids
            while len(self._references) > REFERENCES_KEPT:
                self._references.pop(next(iter(self._references)))
        return reference

    def using(self, weights: RunWeights | None, fn: Callable[[LoadedModel], object], long: bool = False,
              should_stop: StopCheck | None = None, owner: object = None):
        """fn(loaded) with a variant's weights in place (None: the full model), as one unit."""
        with self.unit(long, should_stop, owner) as loaded:
            if weights is None:
                return fn(loaded)
            with weights.applied(self.store):
                return fn(loaded)

    def ask(self, images, questions: list[str], weights: RunWeights | None = None, max_new_tokens: int = 20) -> list[str]:
        """Answers of the full model (weights None) or of a variant."""
        return self.using(weights, lambda loaded: ask_model(loaded, images, questions, max_new_tokens))

    def ask_each(self, images, questions: list[str], variants: list[RunWeights | None],
                 max_new_tokens: int = 20) -> list[list[str]]:
        """The answers of several variants (None: the full model) in one short unit, so a
        person's question never waits behind more than the one long unit in progress."""
        answers = []
        with self.unit() as loaded:
            for weights in variants:
                with weights.applied(self.store) if weights is not None else contextlib.nullcontext():
                    answers.append(ask_model(loaded, images, questions, max_new_tokens))
        return answers

    def restore(self) -> bool:
        """Put the full weights back (they already are between units); True if identical."""
        with self.unit(long=True):
            self.store.restore()
            return self.store.is_original()
