"""Soak a running deployment with simulated students, and check what a class depends on.

    python -m ecoflap soak --url http://127.0.0.1:7860 --users 20 --minutes 3

Each student is its own client (its own session): they prune with every method, ask,
compare, sweep, export, stop a prune midway and sometimes leave and come back as a new
session. Throughout, the soak checks that the full model's answers never change, that
every session sees exactly its own runs, that no run disappears without its owner being
told, and that nobody reaches another session's run; it samples the server's memory and
export disk, and times answers while others prune. It talks to the app's public API with
gradio_client, like any client would; point it only at your own deployment (loopback by
default; another host needs --yes-i-own-it). Users and minutes are bounded.

    python -m ecoflap soak --attacker ...

adds one stranger next to the class, from an address of its own, replaying in a loop what
could take a Space from a class: floods of new sessions, more prunes than its share, model
exports, upload bombs, and values no form sends (megabyte settings, markup, lone
surrogates, hand-made file payloads). The report then also says how often the stranger
was refused, that every refusal was one calm line, and whether any student was refused.
Each simulated person sends its own X-Forwarded-For address: start the app with
ECOFLAP_BEHIND_PROXY=1 so the deployment tells them apart, as it would behind a proxy.

    python -m ecoflap soak --same-runs ...

plays the lesson where the teacher says "everyone: Wanda at 0.5": every student's prune
is one of the same two runs (`SAME_RUNS`), so the report's computations (from `/stats`)
against prunes served say how much the deployment shared.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import uuid
import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from ..data import example_prompts
from ..methods import METHODS

MAX_USERS = 50
MAX_MINUTES = 30
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
DROPPED = re.compile(r"Your run (.+?) was dropped")
REFUSED = ("already have", "serving as many people", "uploaded", "space for uploads", "per person")
ATTACKER = "10.66.0.1"
# /prune's values in the page's order, as a script sends them raw (a quick magnitude at 0.5)
PRUNE_FIELDS = ("method", "sparsity", "granularity", "max_sparsity", "samples", "stage1_samples", "eps", "nm",
                "modules", "batch_size", "owl_m", "owl_lambda", "vision_sparsity", "calibration",
                "calibration_images", "calibration_question", "loss")
PRUNE_VALUES = ("magnitude", 0.5, "block", 0, 32, 8, 0.001, "off", ["vision", "language"], 8, 5, 0.08, "", "", [], "",
                "answer")
FAST = {"samples": 32, "stage1_samples": 8}
# What a stranger sends that no form does; each must come back as one calm line (the soak's
# attacker and tests/test_attacks.py send them).
MARKUP = "<img src=x onerror=alert(1)>"
JUNK_PRUNES = (dict(nm="2:" + "4" * 1_000_000), dict(vision_sparsity=MARKUP, method="per_modality"),
               dict(nm="\ud800"), dict(method="x" * 100_000), dict(sparsity="abc"))
FOREIGN_FILES = ({"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, {"path": "/etc/passwd"},
                 "/etc/passwd", ["/etc/passwd"], [{"path": "/etc/passwd"}], 7)


def prune_values(**changes) -> list:
    """/prune's values as a script sends them raw: PRUNE_VALUES but for `changes` (by field name)."""
    return [changes.get(name, value) for name, value in zip(PRUNE_FIELDS, PRUNE_VALUES)]


def raw_call(url: str, api: str, data: list, address: str | None = None,
             session: str | None = None) -> tuple[str | None, object]:
    """The raw /call API as a script uses it, without gradio_client, from `address` (sent as
    X-Forwarded-For): POST the values, then read the event stream: ("complete" | "error",
    its data), or ("refused", the text) where the POST itself is refused. The body is ASCII
    JSON, so a lone surrogate can travel."""
    import httpx

    base = url.rstrip("/") + "/gradio_api"
    headers = {"X-Forwarded-For": address} if address else {}
    body = json.dumps({"data": data, "session_hash": session or uuid.uuid4().hex})
    posted = httpx.post(f"{base}/call/{api}", content=body, timeout=60,
                        headers={**headers, "content-type": "application/json"})
    if posted.status_code != 200:
        return "refused", posted.text
    kind = None
    with httpx.stream("GET", f"{base}/call/{api}/{posted.json()['event_id']}", headers=headers,
                      timeout=300) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                return kind, json.loads(line.split(":", 1)[1])
    return kind, None


SAME_RUNS = [("wanda", 0.5), ("ecoflap_zeroth", 0.6)]  # what the whole class asks for with --same-runs


@dataclass
class Findings:
    """What the students saw, shared by all of them (guarded by `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    asks: list[tuple[float, bool]] = field(default_factory=list)
    prunes: list[float] = field(default_factory=list)
    actions: dict[str, int] = field(default_factory=dict)
    changed_answers: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    silent_losses: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # students turned away by a bound
    attacks: dict[str, int] = field(default_factory=dict)
    attacker_refused: int = 0
    uncalm: list[str] = field(default_factory=list)  # an answer to the attacker that was not one calm line
    pruning_now: int = 0
    owners: dict[str, int] = field(default_factory=dict)  # run id -> the session it was returned to
    sessions: itertools.count = field(default_factory=itertools.count)

    def own(self, run_id: str, student: int):
        with self.lock:
            self.owners.setdefault(run_id, student)

    def count(self, action: str):
        with self.lock:
            self.actions[action] = self.actions.get(action, 0) + 1


class Student:
    """One simulated person with their own session and their own idea of their runs."""

    def __init__(self, url: str, baseline: dict, findings: Findings, rng: random.Random, examples,
                 same_runs: bool = False):
        from gradio_client import Client

        with findings.lock:
            self.index = next(findings.sessions)  # a new session each time a student comes back
        self.url, self.baseline, self.findings = url, baseline, findings
        self.rng, self.examples = rng, examples
        self.client = Client(url, verbose=False, headers={"X-Forwarded-For": f"10.20.{self.index // 250}."
                                                                             f"{self.index % 250 + 1}"})
        self.runs: dict[str, str] = {}  # run id -> label
        self.same_runs = same_runs

    def leave(self):
        self.client.close()

    def _told(self, text: str):
        for label in DROPPED.findall(text or ""):
            self.runs = {i: kept for i, kept in self.runs.items() if kept != label}

    def prune(self):
        if self.same_runs:
            method, sparsity = self.rng.choice(SAME_RUNS)
        else:
            method = self.rng.choice(list(METHODS))
            sparsity = self.rng.choice([0.3, 0.5, 0.6, 0.7])
        with self.findings.lock:
            self.findings.pruning_now += 1
        started = time.perf_counter()
        try:
            status, _c, _g, overlay, _e, _d, run_id, _r = self.client.predict(method, sparsity, api_name="/prune",
                                                                              **FAST)
        finally:
            with self.findings.lock:
                self.findings.pruning_now -= 1
        with self.findings.lock:
            self.findings.prunes.append(time.perf_counter() - started)
        self.findings.own(run_id, self.index)
        self._told(status)
        self.runs[run_id] = dict((i, label) for label, i in overlay["choices"])[run_id]

    def ask(self):
        image, question = self.rng.choice(self.examples)
        from gradio_client import handle_file

        with self.findings.lock:
            during_prune = self.findings.pruning_now > 0
        started = time.perf_counter()
        page, answers = self.client.predict(handle_file(image), question, api_name="/ask")
        elapsed = time.perf_counter() - started
        self._told(page)
        with self.findings.lock:
            self.findings.asks.append((elapsed, during_prune))
            if answers["full"] != self.baseline[(image, question)]:
                self.findings.changed_answers.append(f"{question!r}: {answers['full']!r}")
        seen = {r["run"]: r["label"] for r in answers["runs"]}
        with self.findings.lock:
            for run_id in set(seen) - set(self.runs):
                owner = self.findings.owners.get(run_id)
                if owner is not None and owner != self.index:
                    self.findings.leaks.append(f"a session saw run {run_id} of another session")
            for run_id in set(self.runs) - set(seen):
                self.findings.silent_losses.append(f"run {self.runs[run_id]} vanished without a notice")
        # a run nobody was told of is this session's own: a prune whose reply was lost
        # (a client timeout, a stop that came after the run was stored)
        for run_id in set(seen) - set(self.runs):
            if self.findings.owners.get(run_id, self.index) == self.index:
                self.findings.own(run_id, self.index)
        self.runs = {i: seen[i] for i in seen if self.findings.owners.get(i) == self.index}

    def export(self):
        if self.runs:
            self.client.predict(self.rng.choice(list(self.runs)), self.rng.random() < 0.2, api_name="/export")
        with self.findings.lock:
            others = [i for i, owner in self.findings.owners.items() if owner != self.index]
        if others:
            try:
                self.client.predict(self.rng.choice(others), False, api_name="/export")
            except Exception as err:  # the expected refusal
                if "no run with that id" not in str(err).lower():
                    raise
            else:
                with self.findings.lock:
                    self.findings.leaks.append("a session exported another session's run")

    def compare(self):
        text, _plot, overlay, *_ = self.client.predict(["wanda", "ecoflap_zeroth"], 0.6, None, "",
                                                       api_name="/compare")
        self._told(text)
        for label, run_id in overlay["choices"]:
            if label.startswith(("Wanda @ 0.60", "ECoFLaP (zeroth-order) @ 0.60")) and run_id not in self.runs:
                self.runs[run_id] = label
                self.findings.own(run_id, self.index)

    def sweep(self):
        _chart, _table, status, *_ = self.client.predict(["magnitude"], "0.3,0.6", api_name="/sweep")
        self._told(status)

    def stop_midway(self):
        job = self.client.submit("ecoflap_zeroth", 0.5, api_name="/prune", **FAST)
        deadline = time.time() + 30
        while job.status().code.name not in ("PROGRESS", "FINISHED") and time.time() < deadline:
            time.sleep(0.05)
        job.cancel()
        time.sleep(0.5)

    ACTIONS = {"prune": 4, "ask": 8, "export": 2, "compare": 0.3, "sweep": 0.3, "stop": 1, "leave": 0.3}

    def act(self) -> str:
        names, weights = zip(*self.ACTIONS.items())
        action = self.rng.choices(names, weights)[0]
        {"prune": self.prune, "ask": self.ask, "export": self.export, "compare": self.compare,
         "sweep": self.sweep, "stop": self.stop_midway, "leave": lambda: None}[action]()
        self.findings.count(action)
        return action


class Attacker:
    """One stranger, one address, many sessions: the attacks of a hostile visitor in a loop.
    Nothing it does may cost a student a run, an answer or a turn."""

    def __init__(self, url: str, findings: Findings):
        self.url, self.findings = url.rstrip("/"), findings
        self.base = self.url + "/gradio_api"
        self.headers = {"X-Forwarded-For": ATTACKER}

    def _client(self):
        from gradio_client import Client

        return Client(self.url + "/", verbose=False, headers=self.headers)

    def _call(self, api: str, data: list, session: str | None = None) -> tuple[str | None, object]:
        """The raw /call API, as a script would use it; a refusal must be one calm line."""
        kind, payload = raw_call(self.url, api, data, ATTACKER, session)
        if kind == "error":
            self._refused(payload.get("error") if isinstance(payload, dict) else None, api)
        return kind, payload

    def _refused(self, message, what: str):
        with self.findings.lock:
            self.findings.attacker_refused += 1
            if not isinstance(message, str) or not message or len(message) > 500 or "<" in message:
                self.findings.uncalm.append(f"{what}: {str(message)[:120]!r}")

    def flood_sessions(self):
        for _ in range(35):  # past its share of sessions: its own empty ones make room, never a student's
            self._call("describe", [])
        for _ in range(10):
            self._call("new_session", [])

    def flood_jobs(self):
        clients = [self._client() for _ in range(3)]
        jobs = [c.submit("ecoflap_zeroth", 0.5, api_name="/prune") for c in clients for _ in range(4)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(j.done() for j in jobs):
            time.sleep(0.2)
        for job in jobs:
            if job.done() and job.exception() is not None:
                self._refused(str(job.exception()), "prune")
            else:
                job.cancel()
        for c in clients:
            c.close()

    def flood_exports(self):
        session = uuid.uuid4().hex
        kind, result = self._call("prune", prune_values(), session)
        if kind == "complete":
            for _ in range(4):
                self._call("export", [result[-2], True], session)

    def flood_uploads(self):
        import httpx

        for _ in range(8):
            posted = httpx.post(f"{self.base}/upload", headers=self.headers, timeout=60,
                                files=[("files", ("bomb.png", os.urandom(2**20), "image/png"))])
            if posted.status_code != 200:
                self._refused(posted.text, "upload")

    def junk(self):
        for junk in JUNK_PRUNES:
            self._call("prune", prune_values(**{"method": "wanda", **junk}))
        for image in FOREIGN_FILES:
            self._call("ask", [image, "\ud800"])
        self._call("ask", [None, "<script>alert(1)</script>"])
        self._call("load_model", ["assets/shapes-blip2"])
        self._call("stats", ["guess"])

    ATTACKS = ("junk", "flood_jobs", "flood_uploads", "flood_exports", "flood_sessions")

    def act(self) -> str:
        attack = self.ATTACKS[sum(self.findings.attacks.values()) % len(self.ATTACKS)]
        getattr(self, attack)()
        with self.findings.lock:
            self.findings.attacks[attack] = self.findings.attacks.get(attack, 0) + 1
        return attack


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def soak(url: str, users: int = 20, minutes: float = 3, seed: int = 0, allow_remote: bool = False,
         log=print, stats_key: str | None = None, attacker: bool = False, same_runs: bool = False) -> dict:
    """Run the students (and with `attacker`, one stranger) against `url`; returns the
    findings and the server's samples. `same_runs`: every prune is one of `SAME_RUNS`."""
    from gradio_client import Client, handle_file

    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and not allow_remote:
        raise ValueError(f"{host} is not this machine: soak only your own deployment (add --yes-i-own-it)")
    if not 1 <= users <= MAX_USERS or not 0 < minutes <= MAX_MINUTES:
        raise ValueError(f"users must be 1 to {MAX_USERS} and minutes above 0 and at most {MAX_MINUTES}")
    if not stats_key:
        raise ValueError("the soak samples the deployment's memory and disk through /stats: give its "
                         "ECOFLAP_STATS_TOKEN (--stats-key)")
    examples = example_prompts()
    if not examples:
        raise ValueError("the shipped example images are missing")
    probe = Client(url, verbose=False)
    baseline = {(image, q): probe.predict(handle_file(image), q, api_name="/ask")[1]["full"] for image, q in examples}
    findings = Findings()
    samples: list[dict] = []
    stop_at = time.monotonic() + minutes * 60
    started = time.monotonic()

    def monitor():
        while time.monotonic() < stop_at:
            stats = probe.predict(stats_key, api_name="/stats")
            samples.append({"t": round(time.monotonic() - started, 1), **stats})
            time.sleep(5)

    def student_loop(index: int):
        rng = random.Random(seed * 1000 + index)
        student = None
        while time.monotonic() < stop_at:
            try:
                student = student or Student(url, baseline, findings, rng, examples, same_runs)
                if student.act() == "leave":
                    student.leave()
                    student = None
            except Exception as err:  # counted; the soak goes on
                with findings.lock:
                    findings.errors.append(f"{type(err).__name__}: {str(err)[:200]}")
                    if any(words in str(err) for words in REFUSED):
                        findings.refused.append(str(err)[:200])
                time.sleep(0.5)
        if student is not None:
            student.leave()

    def attacker_loop():
        stranger = Attacker(url, findings)
        while time.monotonic() < stop_at:
            try:
                stranger.act()
            except Exception as err:  # the attacker's own failures are no finding; its answers are
                log(f"attacker: {type(err).__name__}: {str(err)[:120]}")
                time.sleep(0.5)

    threads = [threading.Thread(target=monitor, daemon=True)]
    threads += [threading.Thread(target=student_loop, args=(i,), daemon=True) for i in range(users)]
    if attacker:
        threads.append(threading.Thread(target=attacker_loop, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(minutes * 60 + 600)
    samples.append({"t": round(time.monotonic() - started, 1), **probe.predict(stats_key, api_name="/stats")})
    probe.close()
    return summarise(findings, samples, users, minutes, attacker, same_runs)


def summarise(findings: Findings, samples: list[dict], users: int, minutes: float, attacker: bool = False,
              same_runs: bool = False) -> dict:
    during = [t for t, busy in findings.asks if busy]
    everything = [t for t, _ in findings.asks]
    warm = [s for s in samples if s["t"] >= samples[-1]["t"] / 3] or samples
    longest_prune = max(findings.prunes, default=0.0)
    return {
        "users": users,
        "minutes": minutes,
        "actions": findings.actions,
        "changed_full_answers": len(findings.changed_answers),
        "leaks": len(findings.leaks),
        "silent_losses": len(findings.silent_losses),
        "errors": len(findings.errors),
        "examples": (findings.changed_answers + findings.leaks + findings.silent_losses + findings.errors)[:10],
        "ask_seconds": {"n": len(everything), "p50": percentile(everything, 0.5), "p95": percentile(everything, 0.95),
                        "max": max(everything, default=float("nan"))},
        "ask_seconds_while_pruning": {"n": len(during), "p50": percentile(during, 0.5),
                                      "p95": percentile(during, 0.95), "max": max(during, default=float("nan"))},
        "prune_seconds": {"n": len(findings.prunes), "p50": percentile(findings.prunes, 0.5),
                          "p95": percentile(findings.prunes, 0.95), "max": longest_prune},
        "students_refused": len(findings.refused),
        "same_runs": same_runs,
        # prunes computed on the server (a deployment that does not share them does not count them)
        "computations": samples[-1].get("computations"),
        "shared_results": samples[-1].get("shared_results"),
        "resident_mib": {"start": samples[0]["resident_mib"], "after_warm_up": warm[0]["resident_mib"],
                         "max_after_warm_up": max(s["resident_mib"] for s in warm),
                         "end": samples[-1]["resident_mib"]},
        "export_mib": {"max": max(s["export_mib"] for s in samples), "end": samples[-1]["export_mib"]},
        "upload_mib": {"max": max(s.get("upload_mib", 0) for s in samples), "end": samples[-1].get("upload_mib", 0)},
        "stored_run_mib": {"max": max(s["stored_run_mib"] for s in samples), "end": samples[-1]["stored_run_mib"]},
        "sessions": {"max": max(s["sessions"] for s in samples), "end": samples[-1]["sessions"]},
        "attacker": {"attacks": findings.attacks, "refused": findings.attacker_refused,
                     "uncalm": len(findings.uncalm), "examples": findings.uncalm[:5]} if attacker else None,
        "samples": samples,
        "ok": not (findings.changed_answers or findings.leaks or findings.silent_losses or findings.uncalm
                   or (attacker and (findings.refused or not findings.prunes))),
    }
