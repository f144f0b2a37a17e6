"""A deployment: the models it serves, the sessions of the people using it, and its bounds.

Everything a public deployment must bound is bounded here: models in memory, stored runs
per session and in all, sweep points, sessions in all and per client, idle sessions,
jobs per session and per client, requests of one client in the web queue, export files on
disk, uploads per client and in all. The bounds
come from `Limits` (`Limits.from_environment()` reads the ECOFLAP_* variables, refusing
a bad value with a message that names it). Loading a model never blocks the users of
other models: the registry's lock only guards its table, never a load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..memory import resident_bytes
from ..models import DEFAULT_MODEL, ModelLoadError, display_name, load_model, not_on_hub
from ..sources import Source, SourceError, parse
from ..workbench import Workbench
from .runs import RunStore
from .session import Session, same_prune
from .sharing import Flights

log = logging.getLogger(__name__)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
MAX_NAME = 200


class ConfigError(ValueError):
    """A deployment setting (an environment variable) has a value that cannot be used."""


class Busy(PermissionError):
    """A bound of the deployment is reached for now: the request is refused, nothing is lost."""


@dataclass
class Limits:
    """What one deployment allows; the defaults suit a small public Space."""

    max_models: int = 2
    runs_per_session: int = 8
    run_memory_mb: float = 1024
    sweep_points: int = 24
    recover_steps: int = 300
    sessions: int = 200
    sessions_per_client: int = 30
    jobs_per_session: int = 2
    jobs_per_client: int = 4
    session_idle_minutes: float = 60
    export_minutes: float = 30
    export_disk_mb: float = 2048
    allow_model_export: bool = True
    allow_local_models: bool = False
    allowed_models: tuple[str, ...] | None = None
    upload_mb: float = 20
    queue_size: int = 64
    queued_per_client: int = 16
    uploads_per_client: int = 20
    upload_client_mb: float = 100
    upload_total_mb: float = 1024
    upload_minutes: float = 30
    behind_proxy: bool = False
    allowed_datasets: tuple[str, ...] = ()
    calibration: str | None = None
    local_data: str | None = None
    curves: str | None = None

    ENVIRONMENT = {
        "max_models": "ECOFLAP_MAX_MODELS",
        "runs_per_session": "ECOFLAP_MAX_RUNS",
        "run_memory_mb": "ECOFLAP_MAX_RUN_MB",
        "sweep_points": "ECOFLAP_MAX_SWEEP_POINTS",
        "recover_steps": "ECOFLAP_MAX_RECOVER_STEPS",
        "sessions": "ECOFLAP_MAX_SESSIONS",
        "sessions_per_client": "ECOFLAP_MAX_SESSIONS_PER_CLIENT",
        "jobs_per_session": "ECOFLAP_MAX_JOBS_PER_SESSION",
        "jobs_per_client": "ECOFLAP_MAX_JOBS_PER_CLIENT",
        "session_idle_minutes": "ECOFLAP_SESSION_IDLE_MINUTES",
        "export_minutes": "ECOFLAP_EXPORT_MINUTES",
        "export_disk_mb": "ECOFLAP_MAX_EXPORT_MB",
        "allow_model_export": "ECOFLAP_ALLOW_MODEL_EXPORT",
        "allow_local_models": "ECOFLAP_LOCAL_MODELS",
        "allowed_models": "ECOFLAP_ALLOWED_MODELS",
        "upload_mb": "ECOFLAP_MAX_UPLOAD_MB",
        "queue_size": "ECOFLAP_QUEUE_SIZE",
        "queued_per_client": "ECOFLAP_MAX_QUEUED_PER_CLIENT",
        "uploads_per_client": "ECOFLAP_MAX_UPLOADS_PER_CLIENT",
        "upload_client_mb": "ECOFLAP_MAX_UPLOAD_CLIENT_MB",
        "upload_total_mb": "ECOFLAP_MAX_UPLOAD_TOTAL_MB",
        "upload_minutes": "ECOFLAP_UPLOAD_MINUTES",
        "behind_proxy": "ECOFLAP_BEHIND_PROXY",
        "allowed_datasets": "ECOFLAP_DATASETS",
        "calibration": "ECOFLAP_CALIBRATION",
        "local_data": "ECOFLAP_LOCAL_DATA",
        "curves": "ECOFLAP_CURVES",
    }
    TEXT = ("calibration", "local_data", "curves")

    @classmethod
    def from_environment(cls, environ=None) -> "Limits":
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = cls.ENVIRONMENT[f.name]
            raw = environ.get(name)
            if raw is None or raw.strip() == "":
                continue
            raw = raw.strip()
            if f.name == "allowed_models":
                values[f.name] = tuple(m.strip() for m in raw.split(",") if m.strip())
            elif f.name == "allowed_datasets":
                values[f.name] = tuple(d.strip().removeprefix("hf:") for d in raw.split(",") if d.strip())
            elif f.name in cls.TEXT:
                values[f.name] = raw
            elif isinstance(f.default, bool):
                if raw not in ("0", "1"):
                    raise ConfigError(f"{name} must be 0 or 1 (got {raw[:40]!r})")
                values[f.name] = raw == "1"
            else:
                values[f.name] = _positive(name, raw, whole=f.type == "int")
        limits = cls(**values)
        limits.check_data()
        return limits

    def check_data(self):
        """The deployment's own data settings must name something usable (checked at start)."""
        if self.calibration:
            try:
                parse(self.calibration)
            except SourceError as err:
                raise ConfigError(f"ECOFLAP_CALIBRATION: {err}") from None
        if self.local_data and not Path(self.local_data).is_dir():
            raise ConfigError("ECOFLAP_LOCAL_DATA must be a folder (of calibration sets, one per sub-folder)")
        if self.curves and not Path(self.curves).exists():
            raise ConfigError("ECOFLAP_CURVES must be a sweep's JSON file (python -m ecoflap sweep --json) or a "
                              "folder of them")


def _positive(name: str, raw: str, whole: bool):
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{name} must be {kind} of at least 1 (got {raw[:40]!r})") from None
    if not value >= 1 or value != value or value == float("inf"):
        raise ConfigError(f"{name} must be at least 1 (got {raw[:40]!r})")
    return value


class ModelRegistry:
    """The workbenches of the models in memory: the default one, plus others on request.

    Loads happen outside the table's lock (two requests for one model share one load;
    different models load side by side, one at a time, without stopping anyone's work).
    The least recently used model beyond `max_models` is unloaded, never the default nor
    the one just loaded (with `max_models` 1, only the default is served);
    `on_unload` hears of it, so the runs made on it can be dropped and their owners told.
    """

    def __init__(self, default_name: str, device: str, dtype: str, limits: Limits, on_unload=None):
        self.default_name = default_name
        self.device, self.dtype = device, dtype
        self.limits = limits
        self.on_unload = on_unload
        self._benches: OrderedDict[str, Workbench] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._one_load = threading.Lock()
        self._lock = threading.Lock()
        self.get(default_name, checked=True)

    def check_allowed(self, name) -> str:
        """The name if this deployment may load it, else PermissionError/ValueError."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("type a hub id such as Salesforce/blip2-opt-2.7b")
        name = name.strip()
        if len(name) > MAX_NAME:
            raise ValueError(f"a model name is at most {MAX_NAME} characters (got {len(name):,})")
        if name == self.default_name:
            return name
        if self.limits.max_models <= 1:
            raise PermissionError(f"this deployment keeps one model in memory: {display_name(self.default_name)} only")
        allowed = self.limits.allowed_models
        if allowed is not None:
            if name not in allowed:
                shown = ", ".join(display_name(m) for m in (self.default_name, *allowed))
                raise PermissionError(f"this deployment serves these models: {shown}")
            return name
        if self.limits.allow_local_models:
            return name
        if HUB_ID.fullmatch(name):
            if Path(name).expanduser().exists():
                # a hub id that is also a folder here gets the words of a hub id that does not
                # exist, so nobody learns from the answer what is on this server
                raise ModelLoadError(not_on_hub(name))
            return name
        raise PermissionError("this deployment loads models from the Hugging Face hub by id (owner/name), "
                              "not from folders on the server")

    def current(self, name: str) -> Workbench | None:
        with self._lock:
            return self._benches.get(name)

    def loaded(self) -> list[Workbench]:
        with self._lock:
            return list(self._benches.values())

    def get(self, name: str, checked: bool = False) -> Workbench:
        """The workbench of a model, loading it if needed."""
        if not checked:
            name = self.check_allowed(name)
        with self._lock:
            bench = self._benches.get(name)
            if bench is not None:
                self._benches.move_to_end(name)
                return bench
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:
            with self._lock:
                bench = self._benches.get(name)
                if bench is not None:
                    return bench
            try:
                with self._one_load:
                    bench = Workbench(load_model(name, device=self.device, dtype=self.dtype))
            finally:
                with self._lock:
                    self._loading.pop(name, None)
            with self._lock:
                self._benches[name] = bench
                unloaded = []
                while len(self._benches) > max(2, self.limits.max_models):  # the default and the newcomer stay
                    oldest = next(n for n in self._benches if n not in (self.default_name, name))
                    unloaded.append(self._benches.pop(oldest))
            for old in unloaded:
                log.info("unloaded %s to make room", old.loaded.name)
                if self.on_unload is not None:
                    self.on_unload(old)
            return bench


@dataclass
class _Ended:
    reason: str
    at: float = field(default_factory=time.time)


class Server:
    """One deployment: models, sessions, stored runs across sessions, export files."""

    def __init__(self, default_model: str | None = None, device: str = "auto", dtype: str = "auto",
                 limits: Limits | None = None, export_root: str | Path | None = None):
        self.limits = limits or Limits()
        self.models = ModelRegistry(default_model or DEFAULT_MODEL, device, dtype, self.limits,
                                    on_unload=self._model_unloaded)
        self.export_root = Path(export_root) if export_root else Path(tempfile.mkdtemp(prefix="ecoflap-exports-"))
        self.export_root.mkdir(parents=True, exist_ok=True)
        self._sessions: OrderedDict[str, "Session"] = OrderedDict()
        self._ended: OrderedDict[str, _Ended] = OrderedDict()
        self.runs = RunStore(self.limits)  # every session's runs: the one place they are kept
        self._issued: set[str] = set()
        self._lock = threading.RLock()
        self._tidied = 0.0
        self.flights = Flights(held=self.held)
        from .uploads import Uploads

        self.uploads = Uploads.from_limits(self.limits)

    @classmethod
    def from_environment(cls, model: str | None = None, device: str = "auto", dtype: str = "auto",
                         export_root: str | Path | None = None) -> "Server":
        """A server configured by the ECOFLAP_* environment variables (see `Limits`)."""
        return cls(model or os.environ.get("ECOFLAP_MODEL") or DEFAULT_MODEL, device, dtype,
                   Limits.from_environment(), export_root)

    @property
    def default_model(self) -> str:
        return self.models.default_name

    def new_id(self, prefix: str) -> str:
        """An unguessable id, never issued before by this process."""
        with self._lock:
            while True:
                token = f"{prefix}-{secrets.token_urlsafe(12)}"
                if token not in self._issued:
                    self._issued.add(token)
                    return token

    # sessions

    def session_token(self) -> str:
        """An unguessable id for a page's session; nothing is held until it is first used
        (so asking for tokens in a loop costs the server nothing)."""
        return f"session-{secrets.token_urlsafe(16)}"

    def open_session(self, client: str | None = None) -> "Session":
        return self.session(self.session_token(), client)

    def session(self, session_id: str, client: str | None = None) -> "Session":
        """The live session of an id, or a new one for `client` if the bounds admit it (a
        session that ended is reopened empty, and told why); Busy if they do not."""
        self.tidy()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                self._sessions.move_to_end(session_id)
                session.touch()
                return session
            evicted = self._room_for(client)
            ended = self._ended.pop(session_id, None)
            session = Session(self, session_id, client)
            if ended is not None:
                session.tell(f"Your earlier session ended ({ended.reason}); its runs and exports are gone.")
            self._sessions[session_id] = session
        for old in evicted:
            old.end()
        return session

    def _room_for(self, client: str | None) -> list["Session"]:
        """Which sessions to close so a new one of `client` fits: only sessions without runs
        or jobs, least recently used first; Busy when every candidate holds someone's work."""
        limits = self.limits
        evicted = []
        mine = [s for s in self._sessions.values() if client is not None and s.client == client]
        if len(mine) >= limits.sessions_per_client:
            victim = next((s for s in mine if s.empty), None)
            if victim is None:
                raise Busy(f"you already have {len(mine)} sessions with work in them open here (at most "
                           f"{limits.sessions_per_client} per person): go on in one of them, or clear the runs of "
                           f"one you no longer need")
            evicted.append((victim, f"you opened more than {limits.sessions_per_client} sessions"))
        elif len(self._sessions) >= limits.sessions:
            victim = next((s for s in self._sessions.values() if s.empty), None)
            if victim is None:
                raise Busy(f"this deployment is serving as many people as it can ({limits.sessions} sessions, "
                           f"each with work in it); try again in a few minutes")
            evicted.append((victim, f"this deployment keeps at most {limits.sessions} sessions, and yours "
                                       f"had no runs"))
        return [self._retire(victim.id, reason) for victim, reason in evicted]

    def close_session(self, session_id: str, reason: str = "closed"):
        with self._lock:
            session = self._retire(session_id, reason)
        if session is not None:
            session.end()

    def _retire(self, session_id: str, reason: str) -> "Session | None":
        """Take a session off the table (under the lock), remembering why for its owner."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._ended[session_id] = _Ended(reason)
            while len(self._ended) > 10 * self.limits.sessions:
                self._ended.popitem(last=False)
        return session

    def tidy(self, force: bool = False):
        """Close idle sessions and delete expired exports (at most every 30 s unless forced)."""
        now = time.monotonic()
        if not force and now - self._tidied < 30:
            return
        self._tidied = now
        idle = self.limits.session_idle_minutes * 60
        with self._lock:
            stale = [s.id for s in self._sessions.values() if now - s.last_used > idle and not s.busy]
        for session_id in stale:
            self.close_session(session_id, f"idle for more than {self.limits.session_idle_minutes:g} minutes")
        self.uploads.tidy()
        cutoff = time.time() - self.limits.export_minutes * 60
        for folder in self.export_root.iterdir():
            try:
                if folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                continue

    @property
    def sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def stats(self) -> dict:
        """What the deployment holds now: for its owner's monitoring and the soak command."""
        with self._lock:
            sessions = list(self._sessions.values())
        return {
            "sessions": len(sessions),
            "jobs_running": sum(len(s._jobs) for s in sessions),
            "stored_runs": len(self.runs),
            "stored_run_mib": round(self.runs.nbytes / 2**20, 3),
            "computations": self.flights.computations,
            "shared_results": self.flights.shared,
            "models": [b.loaded.name for b in self.models.loaded()],
            "resident_mib": round(resident_bytes() / 2**20, 1),
            "export_mib": round(self.export_disk_bytes() / 2**20, 3),
            **self.uploads.held(),
        }

    # jobs (prunes, comparisons, sweeps, model exports), bounded per session and per client

    def start_job(self, session: "Session", flag: threading.Event):
        """Count a new job of `session`, or Busy if it or its client already has its share."""
        limits = self.limits
        with self._lock:
            if len(session._jobs) >= limits.jobs_per_session:
                raise Busy(f"you already have {len(session._jobs)} job(s) running or waiting here (at most "
                           f"{limits.jobs_per_session} per session): wait for one to finish, or Stop it")
            if session.client is not None:
                theirs = sum(len(s._jobs) for s in self._sessions.values() if s.client == session.client)
                if theirs >= limits.jobs_per_client:
                    raise Busy(f"you already have {theirs} jobs running or waiting (at most "
                               f"{limits.jobs_per_client} per person, across your sessions): wait for one to finish")
            with session._lock:
                session._jobs.add(flag)

    # runs of all sessions (kept in `runs`), bounded per session and in memory together

    def store(self, owner: str, make) -> object:
        """Store the run `make(the owner's runs)` builds (see `RunStore.add`); the owner of
        every run dropped to make room is told which and why, the next time they look."""
        run, dropped = self.runs.add(owner, make)
        self._tell_dropped(dropped)
        return run

    def held(self, key, measured_otherwise: bool = False) -> tuple | None:
        """The result and weights of a stored run of any session that `key` names (see
        `Session._share_key`), for an identical request to reuse; None if none is held.
        `measured_otherwise`: a run with the same weights, however its quality was measured."""
        same = (lambda r: same_prune(r, key)) if measured_otherwise else (lambda r: r.shared == key)
        run = self.runs.latest(same)
        return None if run is None else (run.result, run.weights)

    @property
    def stored_run_bytes(self) -> int:
        return self.runs.nbytes

    def _model_unloaded(self, bench: Workbench):
        why = (f"its model {bench.loaded.name} was unloaded to make room for another "
               f"(this deployment keeps {self.limits.max_models} models)")
        self._tell_dropped([(run, why) for run in self.runs.remove(lambda r: r.workbench is bench)])

    def _tell_dropped(self, dropped):
        for run, why in dropped:
            with self._lock:
                owner = self._sessions.get(run.owner)
            if owner is not None:
                owner.tell(f"Your run {run.label} was dropped: {why}.")

    # calibration data

    def calibration_source(self, spec) -> "Source":
        """A source a person names (checked against what this deployment allows): `shapes`,
        `hf:OWNER/NAME[:SPLIT]` from ECOFLAP_DATASETS, or `local:NAME[:SPLIT]`, a set in
        ECOFLAP_LOCAL_DATA. Paths on the server are never taken from a person."""
        if not isinstance(spec, str) or len(spec) > MAX_NAME:
            raise ValueError("a calibration source is text: hf:OWNER/NAME[:SPLIT], local:NAME or shapes")
        spec = spec.strip()
        if spec == "shapes":
            return parse(None)
        if spec.startswith("hf:"):
            return parse(spec, allowed_datasets=self.limits.allowed_datasets)
        if spec.startswith("local:"):
            name, _, split = spec.removeprefix("local:").partition(":")
            sets = self.local_sets()
            if not sets:
                raise SourceError("this deployment has no calibration sets of its own (its owner can add them in "
                                  "ECOFLAP_LOCAL_DATA)")
            if name not in sets:
                raise SourceError(f"this deployment has no calibration set named {name[:40]!r} (it has: "
                                  f"{', '.join(sets)})")
            return parse(str(Path(self.limits.local_data) / name), split=split or None)
        raise SourceError("calibration data comes from a hub dataset (hf:OWNER/NAME), one of this deployment's "
                          "sets (local:NAME), the shipped set (shapes) or your own uploaded images, never from a "
                          "path on the server")

    def local_sets(self) -> list[str]:
        """The names of this deployment's own calibration sets (sub-folders of ECOFLAP_LOCAL_DATA)."""
        if not self.limits.local_data:
            return []
        return sorted(p.name for p in Path(self.limits.local_data).iterdir()
                      if p.is_dir() and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", p.name))

    # exports

    def export_folder(self, session_id: str, kind: str = "run") -> Path:
        """A fresh, unguessable folder for a session's export of one kind (a run, a sweep, a
        comparison); its previous export of that kind is deleted. Its files are the only
        copies (a web app serves them from where they are), so the cap, the lifetime and the
        deletions here cover every byte of every export."""
        for old in self.export_root.glob(f"{_export_prefix(session_id)}.{kind}.*"):
            shutil.rmtree(old, ignore_errors=True)
        folder = self.export_root / f"{_export_prefix(session_id)}.{kind}.{secrets.token_hex(8)}"
        folder.mkdir()
        return folder

    def delete_exports(self, session_id: str):
        for old in self.export_root.glob(f"{_export_prefix(session_id)}.*"):
            shutil.rmtree(old, ignore_errors=True)

    def export_disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.export_root.rglob("*") if p.is_file())


def _export_prefix(session_id: str) -> str:
    """A session's exports by name, without the session's id in any URL."""
    return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()[:16]


def client_address(peer: str | None, forwarded_for: str | None, behind_proxy: bool) -> str:
    """Who is asking, for the per-client bounds: the socket's address; behind a trusted
    proxy, the last X-Forwarded-For entry (the one that proxy wrote; the entries before
    it are whatever the client claimed)."""
    if behind_proxy and forwarded_for:
        last = forwarded_for.split(",")[-1].strip()
        if last:
            return last[:64]
    return peer or "unknown"

