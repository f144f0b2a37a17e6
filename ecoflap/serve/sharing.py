"""One computation for a class: identical prunes are computed once and shared as a result.

A teacher says "everyone: Wanda at 0.5" and thirty sessions ask for the same prune. A
request names what it wants by a key (the model, the method, the sparsity, every option
and seed, a public calibration source and how the run is measured); requests with the same
key join one computation (a flight) instead of queueing thirty, and a finished result
is reused for as long as some session's run still holds it. Whoever asks still gets a run
of their own (the session makes it from the shared result); requests that cannot be
named by a key (a person's own uploads) are never shared.

The computation runs in a thread of its own, so nobody's request is the one that carries
it: each waiter follows its progress from its own thread (a web page's progress belongs
to the thread of its request) and may stop waiting at any time; the computation itself
stops only when its last waiter has stopped.
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable

from ..progress import Cancelled, Progress, StopCheck

Compute = Callable[[Progress, StopCheck], object]


class Flight:
    """One computation and the requests waiting for it."""

    def __init__(self, key: Hashable):
        self.key = key
        self.waiters = 0
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.value: object = None
        self.error: BaseException | None = None
        self.progress: tuple[str, int, int] | None = None
        self.version = 0  # bumped at each progress report, so each waiter passes on what is new
        self.computed = False  # a computation (False: a finished result still held, handed out)

    def report(self, what: str, done: int, total: int):
        self.progress = (what, done, total)
        self.version += 1


class Flights:
    """The table of computations in progress, at most one per key.

    `held(key)` says where a finished result is still kept (the server's stored runs):
    that result is handed out without computing. `computations` counts the computations
    started, `shared` the requests that got a result they did not compute.
    """

    def __init__(self, held: Callable[[Hashable], object | None] | None = None):
        self.held = held or (lambda key: None)
        self._lock = threading.Lock()
        self._flights: dict[Hashable, Flight] = {}
        self.computations = 0
        self.shared = 0

    def join(self, key: Hashable, compute: Compute, name: str = "shared computation") -> Flight:
        """The flight of `key`: one in progress, a finished one still held, or a new one
        that starts `compute(progress, should_stop)` in its own thread. Every join must be
        followed by one `leave`."""
        start = False
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                kept = self.held(key)
                flight = self._flights[key] = Flight(key)
                if kept is not None:
                    flight.value = kept
                    flight.done.set()
                else:
                    flight.computed = start = True
                    self.computations += 1
            if not start:
                self.shared += 1
            flight.waiters += 1
        if start:
            threading.Thread(target=self._compute, args=(flight, compute), name=name, daemon=True).start()
        return flight

    @staticmethod
    def _compute(flight: Flight, compute: Compute):
        try:
            flight.value = compute(flight.report, flight.cancel.is_set)
        except BaseException as err:  # handed to every waiter, raised in each one's own thread
            flight.error = err
        finally:
            flight.done.set()

    def wait(self, flight: Flight, progress: Progress | None = None, should_stop: StopCheck | None = None,
             poll: float = 0.1):
        """The flight's result (or its error), passing its progress on; Cancelled as soon
        as `should_stop` says so (the computation goes on for the other waiters)."""
        seen = 0
        while not flight.done.wait(poll):
            if should_stop is not None and should_stop():
                raise Cancelled("stopped by the user")
            if progress is not None and flight.version != seen and flight.progress is not None:
                seen = flight.version
                progress(*flight.progress)
        if flight.error is not None:
            raise flight.error
        return flight.value

    def leave(self, flight: Flight):
        """A waiter is done with the flight (it has its result and keeps it, or it stopped).
        The last one to leave takes it off the table; one leaving before the end stops it."""
        with self._lock:
            flight.waiters -= 1
            if flight.waiters > 0:
                return
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]
            if not flight.done.is_set():
                flight.cancel.set()

    @property
    def in_progress(self) -> int:
        with self._lock:
            return sum(1 for f in self._flights.values() if not f.done.is_set())
