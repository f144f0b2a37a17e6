"""Files strangers upload to a deployment: bounded per client (count and bytes) and in all,
and deleted when they expire or are refused.

A web app asks `reserve(client, size)` before it reads an upload's body (the size the
client declared; a refusal costs no disk), then `keep(ticket, paths)` with the files the
upload was saved as, or `cancel(ticket)` if it failed. An upload that would take a client
past its count is deleted at once; every upload is deleted `minutes` after it arrived.
The same file uploaded again (same folder and name) belongs to the newest upload.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .server import Busy

MiB = 2**20


@dataclass
class Ticket:
    """Room held for one upload while its body arrives."""

    client: str
    size: int


@dataclass
class Upload:
    client: str
    size: int
    paths: list[str]
    at: float = field(default_factory=time.time)


class Uploads:
    """The uploads a deployment holds, with its bounds."""

    def __init__(self, per_client: int = 20, client_mb: float = 100, total_mb: float = 1024,
                 minutes: float = 30, clock=time.time):
        self.per_client, self.client_bytes, self.total_bytes = per_client, client_mb * MiB, total_mb * MiB
        self.minutes, self.clock = minutes, clock
        self._kept: list[Upload] = []
        self._pending: list[Ticket] = []
        self._lock = threading.Lock()

    @classmethod
    def from_limits(cls, limits) -> "Uploads":
        return cls(limits.uploads_per_client, limits.upload_client_mb, limits.upload_total_mb, limits.upload_minutes)

    def reserve(self, client: str, size: int) -> Ticket:
        """Room for an upload of `size` bytes from `client`, or Busy saying which bound it meets."""
        self.tidy()
        with self._lock:
            live = self._live()
            theirs = [u for u in live if u.client == client] + [t for t in self._pending if t.client == client]
            files = sum(len(u.paths) if isinstance(u, Upload) else 1 for u in theirs)
            used = sum(u.size for u in theirs)
            total = sum(u.size for u in live) + sum(t.size for t in self._pending)
            later = f"uploads are deleted {self.minutes:g} minutes after they arrive"
            if files >= self.per_client:
                raise Busy(f"you have uploaded {files} files in the last {self.minutes:g} minutes (at most "
                           f"{self.per_client}); {later}")
            if used + size > self.client_bytes:
                raise Busy(f"your uploads would take {(used + size) / MiB:,.1f} MiB (at most "
                           f"{self.client_bytes / MiB:g} MiB per person); {later}")
            if total + size > self.total_bytes:
                raise Busy(f"this deployment's space for uploads is full right now ({self.total_bytes / MiB:g} MiB "
                           f"for everyone); try again in a few minutes")
            ticket = Ticket(client, size)
            self._pending.append(ticket)
            return ticket

    def keep(self, ticket: Ticket, paths: list[str]) -> Upload:
        """Record the files an upload was saved as; Busy (and the files deleted) if they take
        its client past its count."""
        paths = [os.path.realpath(p) for p in paths]
        with self._lock:
            self._pending.remove(ticket)
            files = sum(len(u.paths) for u in self._live() if u.client == ticket.client)
            refused = files + len(paths) > self.per_client
            if not refused:
                for older in self._kept:
                    older.paths = [p for p in older.paths if p not in paths]
                upload = Upload(ticket.client, ticket.size, paths, self.clock())
                self._kept.append(upload)
            else:  # deleted now, and again at the next tidy should a file land after this
                self._kept.append(Upload(ticket.client, 0, paths, self.clock() - self.minutes * 60 - 1))
        if refused:
            _delete(paths)
            raise Busy(f"an upload may bring at most {self.per_client} files per person in "
                       f"{self.minutes:g} minutes (this one had {len(paths)}, you had {files})")
        return upload

    def _live(self) -> list[Upload]:
        now = self.clock()
        return [u for u in self._kept if now - u.at <= self.minutes * 60]

    def cancel(self, ticket: Ticket):
        with self._lock:
            if ticket in self._pending:
                self._pending.remove(ticket)

    def tidy(self):
        """Delete the files of expired uploads (an expired record stays ten minutes more, so a
        file that lands late is deleted too)."""
        now = self.clock()
        with self._lock:
            expired = [u for u in self._kept if now - u.at > self.minutes * 60]
            self._kept = [u for u in self._kept if now - u.at <= (self.minutes + 10) * 60]
        for upload in expired:
            _delete(upload.paths)
            upload.size = 0

    def held(self) -> dict:
        """Bytes and files held now, in all and per client (for the owner's /stats)."""
        with self._lock:
            live = self._live()
        return {"upload_files": sum(len(u.paths) for u in live),
                "upload_mib": round(sum(u.size for u in live) / MiB, 3),
                "upload_clients": len({u.client for u in live})}


def _delete(paths: list[str]):
    for path in paths:
        try:
            Path(path).unlink()
        except OSError:
            continue
        try:
            Path(path).parent.rmdir()  # gradio keeps each upload in a folder of its own
        except OSError:
            pass
