"""What a long job says about itself, and how it is asked to stop: two separate signals.

Progress is for people (a bar, a status line); it never decides anything. Stopping is its
own signal: a `StopCheck` the job asks between layers and inside its long loops (global
magnitude's bisection, each SparseGPT layer, a sweep point's scoring), so a Stop takes
effect within one layer whether or not anything was reported meanwhile.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str, int, int], None]  # (what, done, total)
StopCheck = Callable[[], bool]  # True once the job should stop


class Cancelled(Exception):
    """The user stopped a job; nothing was stored and the model has its full weights."""


def stop_if_asked(should_stop: StopCheck | None, why: str = "stopped by the user"):
    """Raise `Cancelled` if the job was asked to stop."""
    if should_stop is not None and should_stop():
        raise Cancelled(why)


def prefixed(progress: Progress | None, prefix: str) -> Progress | None:
    """The same progress with `prefix` before each message (None stays None)."""
    if progress is None:
        return None
    return lambda what, done, total: progress(f"{prefix}{what}", done, total)
