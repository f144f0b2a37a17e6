"""What one person does with the workbench: their own runs and the use cases around them.

The same calls serve a notebook, the CLI and the app:

    server = ecoflap.Server()                  # or Server.from_environment()
    me = server.open_session()
    run = me.prune("ecoflap_zeroth", 0.6)
    me.ask("cat.png", "what is this?").full, me.ask("cat.png").runs
    me.compare(["wanda", "ecoflap_zeroth"], 0.6), me.sweep(["wanda"], [0.5, 0.7])
    me.distributions(run.id), me.export(run.id)
    better = me.recover(run.id, steps=200)     # a new run: fine-tuned, every zero held

A session owns its runs: their ids are unguessable and never reused, another session's
id (or a stale one) reaches nothing, and a quota of its own bounds them. When the
server's shared memory for runs must drop one, or its model is unloaded, only its owner
is told, the next time they look (`notices()`). Every long job can be stopped (`stop()`,
its own `should_stop`, or the session ending): it stops within one layer and stores
nothing.

Identical prunes of different sessions (same model, method, sparsity, options and seed,
and a public calibration source: never a person's own uploads) are computed once and
shared as a result (see `sharing`): each session still gets a run of its own, with its
own id, label and quota, and the weights are held once however many runs share them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from PIL import Image

from .. import sources
from ..answers import MAX_QUESTION_CHARS, fit_question
from ..anatomy import prunable_layers
from ..curves import shipped_curves, shipped_recovery
from ..data import batches, default_calibration
from ..echo import is_text
from ..forms import from_settings, number, sparsity_list, sparsity_value
from ..images import open_image
from ..methods import Method, get_method
from ..models import display_name
from ..options import PruneOptions, applicable, as_report
from ..offload import is_offloaded
from ..progress import Progress, StopCheck, prefixed
from ..recover import OnStep, recover_options
from ..report import SWEEP_COLUMNS, PruneResult, layers_csv, save_pruned, table_csv, write_json, write_text
from ..quality import labelled_counts
from ..scoring import SCORE_SEED, held_out_examples, quality_against_full, quick_score, speaks_shapes
from ..sources import Calibration
from ..stats import gradient_histograms, weight_histograms
from ..sweep import KL_SCORE, export_columns, sweep
from ..weights import RunWeights
from ..workbench import Cancelled, Workbench

log = logging.getLogger(__name__)
MAX_NEW_TOKENS = 64
_FULL_SCORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # workbench -> {questions: score}
TABLE_COLUMNS = {"sweep": SWEEP_COLUMNS,
                 "comparison": ("label", "metric", "score", "vision_sparsity", "language_sparsity", "answer")}
QUALITY_N = 100  # held-out examples each run is measured on against the full model


@dataclass
class Run:
    """A pruned variant a session made: its report and its compact weights."""

    id: str
    label: str
    result: PruneResult
    weights: RunWeights = field(repr=False)
    workbench: Workbench = field(repr=False)
    owner: str = field(repr=False)
    created: float = field(default_factory=time.time)
    shared: tuple | None = field(default=None, repr=False)  # what names it for other sessions (None: never)

    def summary(self) -> dict:
        return {"id": self.id, "label": self.label, "method": self.result.method,
                "target_sparsity": self.result.target_sparsity, "achieved_sparsity": self.result.achieved_sparsity}


@dataclass
class Answers:
    """One question about one image, answered by the full model and by each run."""

    question: str
    full: str
    runs: list[dict]
    notice: str | None = None

    def to_dict(self) -> dict:
        return {"question": self.question, "full": self.full, "runs": self.runs, "notice": self.notice}


@dataclass
class Comparison:
    """Methods side by side at one sparsity: their runs, a score per model, answers."""

    sparsity: float
    runs: list[Run]
    rows: list[dict]
    metric: str
    higher_is_better: bool
    measured_on: str
    question: str | None

    def to_dict(self) -> dict:
        return {"sparsity": self.sparsity, "runs": [r.summary() for r in self.runs], "rows": self.rows,
                "metric": self.metric, "higher_is_better": self.higher_is_better, "measured_on": self.measured_on,
                "question": self.question}

    def table(self) -> list[dict]:
        """One flat row per model (the full model first), as the table shows and the CSV holds."""
        return [{"label": r["label"], "metric": self.metric, "score": r["score"],
                 "vision_sparsity": r["sparsity_by_modality"].get("vision"),
                 "language_sparsity": r["sparsity_by_modality"].get("language"), "answer": r["answer"]}
                for r in self.rows]


def settings_key(method: Method, sparsity: float, options: PruneOptions) -> tuple:
    """The settings a prune's result depends on, defaults resolved: a cap left unset and the
    same cap typed (the Prune tab shows the default's value) name one computation, and an
    option the method never reads (OWL's M for Wanda) does not tell two prunes apart."""
    used = applicable(method)
    resolved = as_report(method, sparsity, options)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in resolved.items() if k in used))


def same_prune(run: "Run", key: tuple) -> bool:
    """Whether `run` holds the weights of the prune `key` names, however its quality was
    measured (a key's last part: see `Session._share_key`)."""
    return bool(run.shared) and run.shared[:-1] == key[:-1]


class Session:
    """One person's runs on one model, and everything they can do with them."""

    def __init__(self, server, session_id: str, client: str | None = None):
        self.server = server
        self.id = session_id
        self.client = client  # who opened it (an address), for the per-client bounds
        self.model_name = server.default_model
        self._notices: list[str] = []
        self._jobs: set[threading.Event] = set()
        self._lock = threading.Lock()
        self.last_used = time.monotonic()
        self.ended = False

    # housekeeping

    def touch(self):
        self.last_used = time.monotonic()

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    @property
    def empty(self) -> bool:
        """No runs and no jobs: closing it costs its owner nothing."""
        return not self._jobs and not self.server.runs.of(self.id)

    def tell(self, message: str):
        with self._lock:
            self._notices.append(message)

    def notices(self) -> list[str]:
        """What happened to this session's runs since it last looked (each said once)."""
        self._check_model()
        with self._lock:
            told, self._notices = self._notices, []
        return told

    def clear_runs(self) -> int:
        """Forget every run of this session; returns how many there were."""
        return len(self.server.runs.remove(lambda r: r.owner == self.id))

    def stop(self) -> int:
        """Stop every job of this session that is running now; returns how many."""
        with self._lock:
            jobs = list(self._jobs)
        for flag in jobs:
            flag.set()
        return len(jobs)

    def end(self):
        """The session is over (tab closed, idle, evicted): stop its jobs, free its runs and files."""
        self.ended = True
        self.stop()
        self.clear_runs()
        self.server.delete_exports(self.id)

    @contextlib.contextmanager
    def _job(self, should_stop: StopCheck | None):
        """A long job of this session: yields its stop check (stop(), end() or the caller's).
        Busy if the session or its client already has as many jobs as the deployment allows."""
        flag = threading.Event()
        self.server.start_job(self, flag)
        self.touch()
        try:
            yield lambda: flag.is_set() or self.ended or (should_stop is not None and bool(should_stop()))
        finally:
            with self._lock:
                self._jobs.discard(flag)
            self.touch()

    # the model

    @property
    def workbench(self) -> Workbench:
        self._check_model()
        return self.server.models.get(self.model_name, checked=True)

    def _check_model(self):
        """A model unloaded by the server: back to the default, its runs are gone, say so."""
        if self.model_name != self.server.default_model and self.server.models.current(self.model_name) is None:
            self.tell(f"The model {display_name(self.model_name)} was unloaded to make room for another; "
                      f"you are back on the default model. Load it again to go on with it.")
            self.model_name = self.server.default_model
        current = self.server.models.current(self.model_name)
        self.server.runs.remove(lambda r: r.owner == self.id and r.workbench is not current)

    def describe(self) -> dict:
        self.touch()
        info = self.workbench.describe()
        info["runs"] = [r.summary() for r in self.runs()]
        info["speaks_shapes"] = speaks_shapes(self.workbench.loaded)  # knows only the shapes world
        return info

    def shipped_curves(self) -> dict | None:
        """Scores against sparsity measured ahead of time for this model: the deployment's own
        (ECOFLAP_CURVES) or the model folder's, if any."""
        loaded = self.workbench.loaded
        return shipped_curves(loaded.source, self.server.limits.curves, loaded.name)

    def shipped_recovery(self) -> list[dict] | None:
        """Recovery measured ahead of time for this model (before and after, per method,
        sparsity and steps), if it ships it."""
        return shipped_recovery(self.workbench.loaded.source)

    def load_model(self, name) -> str:
        """Switch this session to another model (loading it if needed); returns what happened."""
        self.touch()
        name = self.server.models.check_allowed(name)
        bench = self.server.models.get(name, checked=True)
        with self._lock:
            self.model_name = name
        previous = self.server.runs.remove(lambda r: r.owner == self.id)
        dropped = (f" Your {len(previous)} run(s) of the previous model were dropped: a session keeps the runs "
                   f"of its current model only." if previous else "")
        return f"Loaded {bench.loaded.name}.{dropped}"

    # runs

    def runs(self) -> list[Run]:
        self._check_model()
        return self.server.runs.of(self.id)

    def run(self, run_id) -> Run:
        """This session's run of an id; any other id, stale or guessed, is unknown."""
        self._check_model()
        run = self.server.runs.get(self.id, run_id)
        if run is None:
            raise KeyError("no run with that id in this session (runs are per session and bounded; "
                           "prune again, or pick one of your runs)")
        return run

    def prune(self, method, sparsity, options: PruneOptions | None = None, calibration=None,
              progress: Progress | None = None, should_stop: StopCheck | None = None, calibration_images=None,
              calibration_question="", **settings) -> Run:
        """Prune and store the run for this session. `settings` are raw values from a form or
        an API (checked one by one); `options` a PruneOptions built in code. Calibration:
        `calibration_images` (a person's own uploads, labelled by the full model, answering
        `calibration_question` or captioning), else `calibration` (a source's name, see
        `Server.calibration_source`, or examples drawn in code), else the deployment's default."""
        method = get_method(method)
        sparsity = sparsity_value(sparsity)
        if options is None:
            options = from_settings(**settings)
        options.check(method, sparsity)  # refused at once, not when the job's turn comes
        if calibration_images and isinstance(calibration_images, (list, tuple)):
            # a person's few pictures: calibrate on all of them rather than refuse for too few
            k = len(calibration_images)
            options = replace(options, samples=min(options.samples, k),
                              stage1_samples=min(options.stage1_sample_count(method), k))
        bench = self.workbench
        key = self._share_key(bench, method, sparsity, options, calibration, calibration_images, ("held-out", QUALITY_N))

        def compute(progress, stopped):
            drawn = self.calibration_for(method, options, calibration, calibration_images, calibration_question, bench)
            result, weights, _ = bench.prune(method, sparsity, options, drawn, progress, stopped,
                                             owner=self.id, held_out=held_out_examples(drawn, QUALITY_N))
            return result, weights

        with self._job(should_stop) as stopped:
            if key is not None:
                return self._shared(key, compute, progress, stopped,
                                    lambda result, weights: self._keep(method, result, weights, bench, shared=key))
            result, weights = compute(progress, stopped)
            if stopped():
                raise Cancelled("stopped by the user")
        return self._keep(method, result, weights, bench)

    def _identical(self, key: tuple | None) -> Run | None:
        """This session's latest run with the same weights as `key` names (however it was
        measured), so a comparison reuses it instead of making "Wanda @ 0.60 #2"."""
        if key is None:
            return None
        return next((r for r in reversed(self.server.runs.of(self.id)) if same_prune(r, key)), None)

    def _share_key(self, bench: Workbench, method: Method, sparsity: float, options: PruneOptions, calibration,
                   images, measured: tuple) -> tuple | None:
        """What names a prune for other sessions, or None for one never shared: one calibrated
        on a person's own uploads, or on examples handed over in code."""
        if images:
            return None
        if not method.calibrated:
            source = "none"
        elif isinstance(calibration, (Calibration, list)):
            return None
        elif calibration in (None, ""):
            source = "default"
        else:
            self.server.calibration_source(calibration)  # refused here, before anybody waits
            source = calibration.strip()
        return (bench, method.name, float(sparsity), settings_key(method, sparsity, options), source, measured)

    def _shared(self, key: tuple, compute, progress: Progress | None, stopped: StopCheck, keep) -> Run:
        """A prune computed once for everyone asking for it at once (or a result still held):
        this session waits for it, following its progress, and keeps its own run of it. Its
        Stop stops only its own wait; the computation stops when nobody waits for it."""
        flights = self.server.flights
        flight = flights.join(key, compute, f"prune of {self.id[:16]}")
        try:
            result, weights = flights.wait(flight, progress, stopped)
            if stopped():
                raise Cancelled("stopped by the user")
            return keep(result, weights)  # stored before leaving, so the next identical request finds it
        finally:
            flights.leave(flight)

    def calibration_for(self, method: Method, options: PruneOptions, calibration=None, images=None,
                        question="", bench: Workbench | None = None) -> Calibration | list | None:
        """What a prune of this session calibrates on (None: the shipped shapes set), labelled
        by `bench`'s model (default: the session's). Drawn sets are kept, so pruning again on
        the same data reads and labels it once."""
        bench = bench or self.workbench
        if not method.calibrated:
            return None
        if images:
            if not isinstance(images, (list, tuple)) or not all(isinstance(p, (str, Path)) for p in images):
                raise ValueError("your calibration images must be uploaded image files")
            if not isinstance(question, str) or len(question) > MAX_QUESTION_CHARS:
                raise ValueError(f"the question for your images is text of at most {MAX_QUESTION_CHARS} characters")
            source = sources.uploads([str(p) for p in images], question)
        elif isinstance(calibration, (Calibration, list)):
            return calibration
        elif calibration not in (None, ""):
            source = self.server.calibration_source(calibration)
        else:
            default = self.server.limits.calibration
            if not default or speaks_shapes(bench.loaded):
                return None
            source = sources.parse(default)
        n = options.samples_used(method)
        label = sources.labeller(lambda pictures, questions: bench.ask(pictures, questions))
        # and held-out examples of the same source, that the run is measured on against the full model
        return sources.draw_kept(source, n, QUALITY_N, labeller=label, labelled_by=bench)

    def recover(self, run_id, steps=100, lr=2e-5, weight_decay=0.05, schedule="cosine", way="full", rank=8,
                batch_size=8, seed=0, eval_n=200, calibration=None, progress: Progress | None = None,
                should_stop: StopCheck | None = None, on_step: OnStep | None = None) -> Run:
        """Fine-tune one of this session's runs with its zeros held; the result is a new run
        ("Wanda @ 0.70 + 200 steps") whose report says how it went (`result.recovery`):
        steps, settings, loss curve, time, peak memory and the score before and after. At
        most `Limits.recover_steps` steps; a stopped recovery stores nothing."""
        source = self.run(run_id)
        options = recover_options(steps, lr, weight_decay, schedule, batch_size, way, rank, seed, eval_n,
                                  max_steps=self.server.limits.recover_steps)
        bench = self.workbench
        if source.workbench is not bench:
            raise KeyError("that run belongs to a model that is no longer loaded")
        with self._job(should_stop) as stopped:
            recovery, table, weights = bench.recover(source.weights, options, calibration, progress, stopped, on_step,
                                                     owner=self.id)
            if stopped():
                raise Cancelled("stopped by the user")
        targets = {row["name"]: row.get("target_sparsity") for row in source.result.layers}
        layers = [{**row, "target_sparsity": targets.get(row["name"])} for row in table]
        result = replace(source.result, layers=layers, quality=None,  # measured on the pruned weights, not these
                         recovery={"from": source.label, **recovery.to_dict()})
        way_note = " (LoRA)" if options.way == "lora" else ""
        return self._keep(get_method(result.method), result, weights, bench,
                          label=f"{source.label} + {options.steps} steps{way_note}")

    def _keep(self, method: Method, result: PruneResult, weights: RunWeights, bench: Workbench,
              label: str | None = None, shared: tuple | None = None) -> Run:
        if self.ended:
            raise Cancelled("the session ended")
        label = label or f"{method.label} @ {result.target_sparsity:.2f}"

        run_id = self.server.new_id("run")  # before the store locks: its lock is never held around the server's

        def make(mine: list[Run]) -> Run:
            same = sum(1 for r in mine if r.label.split(" #")[0] == label)
            return Run(run_id, f"{label} #{same + 1}" if same else label, result, weights, bench, self.id,
                       shared=shared)

        return self.server.store(self.id, make)

    # use cases

    def ask(self, image, question="", max_new_tokens=20) -> Answers:
        """The full model's answer and each of this session's runs' answers."""
        self.touch()
        image, question, notice = self._inputs(image, question, max_new_tokens)
        runs = self.runs()
        full, *pruned = self.workbench.ask_each([image], [question], [None] + [r.weights for r in runs],
                                                int(max_new_tokens))
        answers = [{"run": r.id, "label": r.label, "answer": a[0]} for r, a in zip(runs, pruned)]
        return Answers(question, full[0], answers, notice)

    def _inputs(self, image, question, max_new_tokens) -> tuple[Image.Image, str, str | None]:
        if question is None:
            question = ""
        if not isinstance(question, str):
            raise ValueError("the question must be text (or empty, for a caption)")
        if not is_text(question):
            raise ValueError("the question has characters that are not text (a lone surrogate): type it again")
        number(max_new_tokens, "new tokens", 1, MAX_NEW_TOKENS, whole=True)
        if isinstance(image, Image.Image):
            picture = image
        elif isinstance(image, (str, Path)):
            picture = open_image(image)
        else:
            raise ValueError("upload an image (or pick an example) first")
        asked = question.strip()
        fitted, cut = fit_question(self.workbench.loaded, asked, int(max_new_tokens))
        notice = None
        if cut:
            notice = (f"Your question had {len(asked):,} characters; only the first {len(fitted):,} were used "
                      f"(at most {MAX_QUESTION_CHARS} characters, and what the model's positions can hold).")
        return picture, fitted, notice

    def compare(self, methods, sparsity, image=None, question="", eval_n: int = 200,
                progress: Progress | None = None, should_stop: StopCheck | None = None) -> Comparison:
        """Prune with each method at one sparsity (each its own run; an identical run this
        session already has is reused, not made again), measure every run
        against the full model on the same held-out questions (accuracy and flips where
        the model speaks the shapes world, else the mean KL from the full model), and
        answer one question with each."""
        chosen = [get_method(m) for m in _listed(methods, "methods")]
        if not 2 <= len(chosen) <= 4 or len(set(chosen)) != len(chosen):
            raise ValueError("choose two to four different methods to compare")
        sparsity = sparsity_value(sparsity)
        eval_n = number(eval_n, "questions to score", 10, 1000, whole=True)
        picture = fitted = None
        if image is not None:
            picture, fitted, _ = self._inputs(image, question, 20)
        bench = self.workbench
        runs, qualities = [], []
        with self._job(should_stop) as stopped:
            # held out from the source the runs calibrate on (a real model's deployment data, not
            # cartoons): after the hungriest method's samples, so no method calibrates on them
            hungriest = max(chosen, key=PruneOptions().samples_used)
            held_out = held_out_examples(self.calibration_for(hungriest, PruneOptions()), eval_n, SCORE_SEED)
            reference = bench.reference(held_out, stopped, self.id)
            measured = ("score", eval_n, SCORE_SEED, PruneOptions().samples_used(hungriest))  # names the questions

            def measure(weights: RunWeights, stopped: StopCheck) -> dict:
                return bench.using(weights, lambda loaded: quality_against_full(loaded, reference), long=True,
                                   should_stop=stopped, owner=self.id)

            for i, method in enumerate(chosen):
                step = f"{method.label} @ {sparsity:.2f} ({i + 1} of {len(chosen)})"
                key = self._share_key(bench, method, sparsity, PruneOptions(), None, None, measured)
                run = self._identical(key)
                if run is None:
                    def compute(progress, stopped, method=method, key=key):
                        held = self.server.held(key, measured_otherwise=True)
                        if held is not None:  # the same weights, measured on other questions: measured here
                            result, weights = held
                            return replace(result, quality=measure(weights, stopped)), weights
                        result, weights, _ = bench.prune(method, sparsity, PruneOptions(),
                                                         self.calibration_for(method, PruneOptions(), bench=bench),
                                                         progress=progress, should_stop=stopped, owner=self.id,
                                                         held_out=held_out)
                        return result, weights

                    run = self._shared(key, compute, prefixed(progress, f"{step} · "), stopped,
                                       lambda result, weights, method=method, key=key:
                                       self._keep(method, result, weights, bench, shared=key))
                quality = run.result.quality if run.shared == key else measure(run.weights, stopped)
                runs.append(run)
                qualities.append(quality)
            labelled = "accuracy" in qualities[0]
            full = {"n": len(held_out), "kl_mean": 0.0, "same_top": 1.0, "same_answer": 1.0}
            if labelled:
                full.update(labelled_counts(reference.answers, reference.answers, reference.expected))
            rows = []
            for label, quality, weights in [("Full model", full, None)] + [(r.label, q, r.weights)
                                                                          for r, q in zip(runs, qualities)]:
                if stopped():
                    raise Cancelled("stopped by the user")
                answer = bench.ask([picture], [fitted], weights)[0] if picture is not None else None
                rows.append({"label": label, "score": quality["accuracy" if labelled else "kl_mean"],
                             "quality": quality, "answer": answer,
                             "sparsity_by_modality": next((r.result.sparsity_by_modality for r in runs
                                                           if r.label == label), {})})
        n = len(held_out)
        if labelled:
            return Comparison(sparsity, runs, rows, "accuracy", True,
                              f"exact match on {n} generated shapes questions (seed {SCORE_SEED}; the same "
                              f"questions for every model, none of them a calibration image)", fitted)
        return Comparison(sparsity, runs, rows, KL_SCORE, False,
                          f"KL(full || pruned) of the next-token distributions over the answer tokens of {n} "
                          f"held-out examples that no calibration sample shows, teacher-forced on "
                          f"{reference.from_references} reference answers and {n - reference.from_references} of "
                          f"the full model's own", fitted)

    def full_score(self, eval_n: int = 200, should_stop: StopCheck | None = None) -> dict:
        """The full model's quick score, the baseline of every comparison and sweep: computed
        once per loaded model and question count, then shared (it is the same for everyone)."""
        bench = self.workbench
        scores = _FULL_SCORES.setdefault(bench, {})
        if eval_n not in scores:
            scores[eval_n] = bench.using(None, lambda loaded: quick_score(loaded, eval_n), long=True,
                                         should_stop=should_stop, owner=self.id)
        return scores[eval_n]

    def sweep(self, methods, sparsities, eval_n: int = 200, progress: Progress | None = None,
              should_stop: StopCheck | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
        """Score against sparsity, each point one prune and one score (other users' work goes
        on between points); at most `Limits.sweep_points` points."""
        chosen = [get_method(m) for m in _listed(methods, "methods")]
        if len(set(chosen)) != len(chosen):
            raise ValueError("each method may appear only once")
        limit = self.server.limits.sweep_points
        values = (sparsity_list(sparsities, limit) if isinstance(sparsities, str)
                  else [sparsity_value(s) for s in _numbers(sparsities)])
        if not chosen or not values:
            raise ValueError("choose at least one method and one sparsity")
        if len(chosen) * len(values) > limit:
            raise ValueError(f"a sweep takes at most {limit} points (methods x sparsities) on this deployment; "
                             f"this one has {len(chosen) * len(values)}")
        eval_n = number(eval_n, "questions to score", 10, 1000, whole=True)
        bench = self.workbench
        hungriest = max(chosen, key=PruneOptions().samples_used)
        with self._job(should_stop) as stopped:
            return sweep(bench, chosen, values, calibration=self.calibration_for(hungriest, PruneOptions()),
                         eval_n=eval_n, progress=progress, should_stop=stopped, on_row=on_row, owner=self.id)

    def distributions(self, run_id=None, other_id=None) -> dict:
        """Weight and gradient magnitude histograms per modality: the full model's, and one or
        two runs' (Wanda against ECoFLaP, say); an offloaded model has no gradient
        distributions (its load says so)."""
        self.touch()
        runs = list({run.id: run for run in (self.run(i) for i in (run_id, other_id) if i not in (None, ""))}.values())
        bench = self.workbench
        calibration = list(default_calibration()[:8])

        def measure(loaded):
            layers = prunable_layers(loaded.model)
            batch = batches(loaded, calibration, 8)[0]
            gradients = {} if is_offloaded(loaded.model) else gradient_histograms(loaded.model, layers, batch)
            return {"weights": weight_histograms(layers), "gradients": gradients}

        series = {"full": bench.using(None, measure)}
        for run in runs:
            series[run.label] = bench.using(run.weights, measure)
        return {"series": series, "batch": len(calibration)}

    def export(self, run_id, with_model: bool = False) -> list[Path]:
        """A run's JSON report and per-layer CSV (and its pruned model, zipped), named after
        the run, in this session's export folder (replacing its previous export)."""
        run = self.run(run_id)
        limits = self.server.limits
        if not isinstance(with_model, bool):
            raise ValueError("whether to include the model must be true or false")
        if with_model and not limits.allow_model_export:
            raise PermissionError("saving pruned models is turned off on this deployment")
        if with_model:
            needed = sum(p.numel() * p.element_size() for p in run.workbench.loaded.model.parameters())
            if self.server.export_disk_bytes() + needed > limits.export_disk_mb * 2**20:
                raise MemoryError("the server's space for exported files is full right now; try again in a few "
                                  "minutes (exports are deleted after "
                                  f"{limits.export_minutes:g} minutes)")
        self.touch()
        folder = self.server.export_folder(self.id)
        stem = _file_stem(run.label)
        report = run.result.to_dict()
        files = [folder / f"{stem}.report.json", folder / f"{stem}.layers.csv"]
        write_json(report, files[0])
        write_text(layers_csv(report), files[1])
        if with_model:
            model_folder = folder / f"{stem}.model"
            with self._job(None) as stopped:
                run.workbench.using(run.weights, lambda loaded: save_pruned(loaded, report, model_folder), long=True,
                                    should_stop=stopped, owner=self.id)
            files.append(Path(shutil.make_archive(str(model_folder), "zip", model_folder)))
            shutil.rmtree(model_folder, ignore_errors=True)
        return files

    def export_table(self, kind: str, rows: list[dict]) -> list[Path]:
        """A sweep's or a comparison's rows as CSV and JSON, in this session's export folder
        for that kind (replacing its previous one); small, so no disk check beyond the TTL."""
        if kind not in TABLE_COLUMNS:
            raise ValueError(f"tables are exported for {', '.join(TABLE_COLUMNS)}")
        self.touch()
        folder = self.server.export_folder(self.id, kind)
        files = [folder / f"{kind}.csv", folder / f"{kind}.json"]
        columns = export_columns(rows) if kind == "sweep" else TABLE_COLUMNS[kind]  # with the quality measured
        write_text(table_csv(rows, columns), files[0])
        write_json({"kind": kind, "model": self.describe()["name"], "rows": rows}, files[1])
        return files

    def restore(self) -> bool:
        """The model holds its full weights between units of work; check they are bit-identical."""
        self.touch()
        return self.workbench.restore()


def _listed(values, what: str) -> list[str]:
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{what} must be a list of names")
    return list(values)


def _numbers(values) -> list:
    if not isinstance(values, (list, tuple)) or isinstance(values, str):
        raise ValueError("sparsities must be a list of numbers, or text like 0.1,0.3,0.5")
    if len(set(values)) != len(values):
        raise ValueError("each sparsity may appear only once")
    return list(values)


def _file_stem(label: str) -> str:
    """'ECoFLaP (zeroth-order) @ 0.60 #2' -> 'ecoflap-zeroth-order-0.60-2'."""
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-.") or "run"
