"""ecoflap workbench: prune a vision-language model in the browser and see where the sparsity went.

Layout and events over `ecoflap`'s session API. Everything a person does is a call on
their own `ecoflap.Session`; this file only turns page values into those calls and their
results into the page, and knows what only Gradio can know: which files it received as
uploads, and whether the page that started a job is still waiting for it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import html
import json
import logging
import os
import secrets
import threading
from pathlib import Path

import gradio as gr
import pandas as pd
from starlette.middleware import Middleware
from gradio.utils import get_upload_folder

import ecoflap

log = logging.getLogger("ecoflap.app")

MODULE_LABELS = {"vision": "Vision encoder", "qformer": "Q-Former", "projection": "Projection",
                 "language": "Language model"}
# grouped by what they do: the allocation first, then stage 2 within it
PRUNE_METHODS = [(m.label, m.name) for m in sorted(
    ecoflap.METHODS.values(), key=lambda m: ecoflap.methods.ALLOCATIONS.index(m.allocation))]
# The Prune tab asks the paper's two questions in turn; the method is what the answers make.
ALLOCATION_LABELS = {"uniform": "Uniform", "ecoflap": "ECoFLaP", "owl": "OWL", "modality": "Per-modality",
                     "global": "Global"}
STAGE2_LABELS = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}
VARIANT_LABELS = {("zeroth", "matrix"): "Zeroth-order (the paper's)", ("zeroth", "group"): "Zeroth-order, one nudge "
                  "per group", ("first", "matrix"): "First-order (gradients)"}
ALLOCATION_INFO = ("Uniform: every layer at the target. ECoFLaP: by each block's importance to the whole model. "
                   "OWL: by outliers. Per-modality: one sparsity for the vision encoder. Global: one |W| threshold.")
STAGE2_INFO = "Magnitude: the smallest |W|, no data. Wanda: |W| x input norm. SparseGPT: second order, with updates."
START_METHOD = ecoflap.METHODS["ecoflap_zeroth"]
START_SPARSITY = 0.5
# the advanced settings each shown for the methods that read them (ecoflap.options.applicable)
OPTION_IDS = {"granularity": "prune-granularity", "max_sparsity": "prune-max-sparsity",
              "stage1_samples": "prune-stage1-samples", "eps": "prune-eps", "nm": "prune-nm",
              "samples": "prune-samples", "batch_size": "prune-batch-size", "include": "prune-modules",
              "vision_sparsity": "prune-vision-sparsity", "owl_m": "prune-owl-m", "owl_lambda": "prune-owl-lambda",
              "loss": "calibration-data"}
TEACH_DEFAULT = ["wanda", "ecoflap_zeroth"]
SWEEP_COLUMNS = ["method", "sparsity", "accuracy or KL", "achieved", "prune s", "point s"]
DEFAULTS = ecoflap.PruneOptions()  # the advanced settings start at the library's defaults
# Stopping is a normal action: one calm line, whichever route stopped the work first.
STOPPED = "Stopped. Nothing from the stopped job was stored, and the shared model keeps its full weights."
STOPPED_COMPARISON = ("Stopped. The runs that finished before the stop are kept; nothing else was stored, and the "
                      "shared model keeps its full weights.")
NOTHING_RUNNING = "Nothing of yours was running."
OWN_PICTURE = ("This is not one of the shapes pictures: the shipped model knows only coloured circles, squares and "
               "triangles, so whatever this picture shows, the answers above are about shapes (and likely wrong).")
NO_IMAGE_FOR_QUESTION = ("> Your question was not asked: it needs an image. Pick or upload one above to see each "
                         "model's answer.\n\n")
MAX_CALIBRATION_UPLOADS = 256
LOSS_CHOICES = [("Target given image and prompt", "answer"), ("Prefix-LM captions (the ECoFLaP paper's)", "prefix_lm")]
# gradio 6.31's screen-reader status line announces these keys untranslated
SCREEN_READER_WORDS = gr.I18n(en={"common.complete": "Complete", "common.error": "Error"})
SHAPES_NOTE = (
    "The shipped model was trained only on pictures of coloured circles, squares and triangles (1 to 3 per "
    "picture): about anything else it answers with shapes, confidently and wrongly. Load a real BLIP-2 "
    "(e.g. Salesforce/blip2-opt-2.7b) under *Load another model* for photos."
)
EXPLANATION = """
Every method decides **how sparse each layer may be** (the allocation), then **which weights of a layer
become zero** (stage 2), block by block, each block calibrated on the outputs of the already-pruned
blocks before it. The total number of zeros is the same for every allocation at one sparsity.

*Stage 2.* **Magnitude** zeroes the smallest |W|; it needs no data. **Wanda** scores each weight by |W|
times the norm of its input feature over the calibration tokens and zeroes the lowest scores of every
output row. **SparseGPT** chooses the zeros with second-order (OBS) saliency and updates the surviving
weights to compensate.

*Allocations.* **Uniform** (Magnitude, Wanda, SparseGPT): every layer at the target. **ECoFLaP** scores
how much the whole vision-language model's loss depends on each block (zeroth-order: two forward passes
with each matrix nudged along a random direction, no gradients and so no extra memory; first-order:
exact gradients) and gives important blocks more weights to keep, no block sparser than the cap;
*one perturbation per group* nudges a whole block at once (faster, a different estimate). **OWL** gives
blocks with more outlier Wanda scores (above M times the block's mean) lower sparsity, within lambda of
the target. **Per-modality** puts one sparsity on the vision encoder (Advanced) and lets the language
model take the rest of the budget. **Global magnitude** uses one |W| threshold across the whole model.

Zeros alone do not make a model faster or smaller on disk: dense kernels multiply zeros like any other
number. The **2:4** pattern (N:M in the advanced panel) is what sparse tensor cores can accelerate.
"""
RECOVER_TEXT = """
**Recover** fine-tunes one of your runs so that every zero stays zero: the gradient and the
update of each pruned matrix are masked (or a LoRA is merged as W + ΔW ⊙ M), so the result
has exactly the same sparsity. It is a new run, usable on every tab. The defaults are the
paper's fine-tuning settings (AdamW, lr 2e-5, weight decay 0.05, cosine), but for tens to
hundreds of steps on fresh examples, not the paper's 10 epochs: it shows how much comes back
quickly, and which pruning recovers best. Stop stores nothing.
"""

WHY_TEXT = """
Each curve is one part of the model (colour: blue vision, purple Q-Former, brown projection, red
language) for the full model (solid) or a chosen run (dashed, then dotted for a second). The x-axis is the magnitude on a log
scale; the y-axis is the fraction of *all* that part's weights in each bin. Zeros have no place on a log
axis, so they are left out of the curve but counted in the total: a run that zeroed 60% of a part
draws a curve whose area is 40% of the full model's, and the legend says "(60% zeros)".
Pruning removes the left (small) end of the weight curve; where ECoFLaP gave a part less sparsity,
more of its curve survives. The gradients are those of the calibration loss for one batch: parts
whose loss gradients are large matter more to the output, which is what ECoFLaP's scores measure.
"""


# A status line is where a job's progress shows: it keeps room for the tracker even when empty
# (the old text stays readable under it: Stop writes there while the job winds down).
CSS = """
.status-box { min-height: 4.5em; }
/* on a phone the charts' toolbar would sit over their titles: touch zooms and pans there anyway */
@media (max-width: 640px) {
  .js-plotly-plot .modebar-container { display: none !important; }
  /* a Stop button beside a status that wraps to many lines keeps a button's height */
  #teach-stop, #sweep-stop { align-self: flex-start; }
  /* the comparison's table scrolls sideways rather than breaking its words a letter a line */
  #teach-result table { display: block; overflow-x: auto; border: 0; }
  #teach-result th, #teach-result td { white-space: nowrap; }
}
"""
MAX_MESSAGE = 400  # a refusal's length, whatever it quotes
MALFORMED = ("The request does not have the form this endpoint takes: one value per input, and images as "
             "files uploaded to this page (see Use via API).")


class Refused(Exception):
    """An expected refusal: shown to the person, logged as one line."""


def _gradio_upload_roots() -> list[str]:
    return [os.path.realpath(get_upload_folder()), os.path.realpath(ecoflap.EXAMPLES)]


def uploaded_file(payload) -> str | None:
    """The path of a file Gradio received as an upload (or a shipped example), or None for
    no file. Any other path, sent by hand through the API, is refused without opening it."""
    if payload in (None, "", {}):
        return None
    path = payload.get("path") if isinstance(payload, dict) else payload if isinstance(payload, str) else None
    if not isinstance(path, str) or not path or len(path) > 4096 or "\x00" in path:
        raise Refused("send the image as an uploaded file")
    real = os.path.realpath(path)
    if not any(real == root or real.startswith(root + os.sep) for root in _gradio_upload_roots()):
        raise Refused("only images uploaded to this page can be used: upload the image again")
    return real


def _event_alive():
    """Whether the page or client that started this event is still waiting for it."""
    try:
        from gradio.context import LocalContext

        blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
        queue = blocks._queue
    except (ImportError, AttributeError, LookupError):
        return lambda: True
    if event_id is None:
        return lambda: True

    def alive() -> bool:
        event = queue.event_ids_to_events.get(event_id)
        return event is not None and event.alive

    return alive


async def in_worker(work, *args, **kwargs):
    """Run work(*args, should_stop=..., **kwargs) in a thread; it stops within one layer if
    the event is cancelled (Stop, job.cancel()) or its client goes away. A cancelled event
    still waits for its thread to stop, so the concurrency limit counts real work."""
    cancelled = threading.Event()
    alive = _event_alive()

    def should_stop() -> bool:
        return cancelled.is_set() or not alive()

    task = asyncio.ensure_future(asyncio.to_thread(work, *args, should_stop=should_stop, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancelled.set()
        try:
            await task
        except BaseException:  # the job's own end (Cancelled, or anything) is moot: nobody waits for it
            pass
        log.info("stopped: %s (the event was cancelled or its client left)", getattr(work, "__name__", "a job"))
        raise


def refusal(err: Exception) -> gr.Error:
    """Turn a library refusal into a message for the page; one log line, no traceback."""
    if isinstance(err, KeyError) and err.args:
        message = str(err.args[0])
    elif isinstance(err, (Refused, ValueError, PermissionError, MemoryError, ecoflap.ModelLoadError)):
        message = str(err)
    else:
        log.exception("unexpected error")
        message = "something went wrong on the server; your model and runs are as they were"
    message = message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    log.info("refused: %s", message)
    text = message[:1].upper() + message[1:]
    # the page renders a message as HTML: whatever a person typed is shown, never run
    return gr.Error(html.escape(text if text.endswith(".") else text + ".", quote=False), print_exception=False)


EXPECTED = (Refused, ValueError, KeyError, PermissionError, MemoryError, ecoflap.ModelLoadError)


def clicked_on_the_page() -> bool:
    """Whether a person on the page started this event (a button or a component sent it),
    rather than an API client, which names no trigger."""
    try:
        from gradio.context import LocalContext

        event = LocalContext.blocks.get(None)._queue.event_ids_to_events.get(LocalContext.event_id.get(None))
        return event is not None and event.data is not None and event.data.trigger_id is not None
    except (ImportError, AttributeError, LookupError):
        return False


def refuse(err: Exception, outputs: int):
    """A refusal, as calm as Stop: on the page one toast, and every output left as it was
    (gradio would badge each output "Error" after gr.Error); an API client gets the error."""
    error = refusal(err)
    if not clicked_on_the_page():
        raise error
    gr.Warning(error.message, title="Not done")
    return gr.skip() if outputs == 1 else (gr.skip(),) * outputs


def progress_reporter(progress: gr.Progress):
    """Progress for the page in readable module names ("vision block 1 · attention"); gradio's
    own tracker shows the elapsed time beside it."""
    def report(what: str, done: int, total: int):
        progress((done, total), desc=ecoflap.naming.friendly_text(what))

    return report


def requester(server: ecoflap.Server) -> str | None:
    """Who sent the event being handled: the socket's address, or behind a trusted proxy
    (ECOFLAP_BEHIND_PROXY=1) the address the proxy saw."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    if request is None:
        return None
    peer = request.client.host if request.client else None
    return ecoflap.client_address(peer, request.headers.get("x-forwarded-for"), server.limits.behind_proxy)


def session_of(server: ecoflap.Server, token) -> ecoflap.Session:
    """The session of this page, opened for its client within the deployment's bounds."""
    try:
        return server.session(token, requester(server))
    except ecoflap.Busy as err:
        raise refusal(err) from None


def with_notices(me: ecoflap.Session, text: str) -> str:
    told = me.notices()
    return text + "".join(f"\n\n> {note}" for note in told)


def run_lists(me: ecoflap.Session, selected=None, latest=None):
    choices = [(r.label, r.id) for r in me.runs()]
    ids = [c[1] for c in choices]
    overlay = [i for i in (selected or []) if i in ids] or ([latest] if latest in ids else ids[-1:])
    single = latest if latest in ids else (ids[-1] if ids else None)
    return (gr.update(choices=choices, value=overlay), gr.update(choices=choices, value=single),
            gr.update(choices=choices, value=single))


def charts(me: ecoflap.Session, ids):
    runs = [r for r in me.runs() if r.id in (ids or [])]
    if not runs:
        return None, gr.update(value=None, visible=False)
    sparsity = ecoflap.plots.sparsity_figure(
        [{"label": r.label, "layers": r.result.layers, "target_sparsity": r.result.target_sparsity,
          "warnings": r.result.warnings} for r in runs])
    grouped = [{"label": r.label, "groups": r.result.groups} for r in runs if r.result.groups]
    # one chart compares runs with the same groups: those of the latest such run
    names = [g["name"] for g in grouped[-1]["groups"]] if grouped else []
    grouped = [g for g in grouped if [x["name"] for x in g["groups"]] == names]
    groups = ecoflap.plots.group_scores_figure(grouped) if grouped else None
    return sparsity, gr.update(value=groups, visible=groups is not None)


def describe(server: ecoflap.Server, token):
    """The model this session works on."""
    me = session_of(server, token)
    info = me.describe()
    per = info["prunable_by_modality"]
    unused = (f" · never pruned, since their output is never used: {len(info['unused'])} module(s)"
              if info.get("unused") else "")
    extra = " and ".join(f"{MODULE_LABELS[m]} {per[m]:,}" for m in ("qformer", "projection") if per[m])
    return with_notices(me, (
        f"**Model** `{info['name']}` · {info['family']} · device **{info['device']}** · {info['dtype']} · "
        f"{info['total']:,} parameters · prunable by default: {info['prunable']:,} (vision {per['vision']:,}, "
        f"language {per['language']:,}{f'; {extra} on request' if extra else ''}){unused}"))


def curves(server: ecoflap.Server, token):
    """The shipped accuracy-against-sparsity curves of this session's model, if any: the
    lesson in plain words and one takeaway from the numbers; how they were measured apart."""
    me = session_of(server, token)
    data = me.shipped_curves()
    if data is None:
        return gr.update(value=None, visible=False), "", ""
    full, higher = data.get("full_score"), data.get("higher_is_better", True)
    recovered = me.shipped_recovery()
    recovery = f"\n\n{ecoflap.curves.recovery_sentence(recovered)} (Recover tab)" if recovered else ""
    lesson = (f"{ecoflap.lessons.opening(data['metric'], full)}\n\n"
              f"**Takeaway:** {ecoflap.lessons.takeaway(data['rows'], data['metric'], higher, full)}{recovery}")
    leaders = ecoflap.curves.leaders(data["rows"], data["metric"], higher)
    return (gr.update(value=ecoflap.plots.curves_figure(data), visible=True), lesson,
            f"{leaders} Measured ahead of time on this model: {data.get('measured_on', 'see its file')}. "
            f"The model's owner regenerates them with "
            f"`{data.get('command', 'python -m ecoflap sweep --json FILE')}`.")


def calibration_note(server: ecoflap.Server) -> str:
    """What this deployment calibrates on by default and which data a person may name."""
    limits = server.limits
    default = (f"`{limits.calibration}` for models other than the shapes model" if limits.calibration else
               "the shipped shapes set (a model that was not trained on it is pruned with a warning)")
    named = [f"`hf:{d}`" for d in limits.allowed_datasets] + [f"`local:{n}`" for n in server.local_sets()]
    return (f"Default: {default}. You may name: `shapes`{''.join(', ' + n for n in named)}. Your own images need "
            f"no captions: the full model's own answers become the targets, and the report says so.")


def load_model(server: ecoflap.Server, name, token):
    """Switch this session to another model (a hub id; local folders where the deployment allows)."""
    me = session_of(server, token)
    try:
        message = me.load_model(name)
    except EXPECTED as err:
        return refuse(err, 7)
    return (describe(server, token), message, *run_lists(me), None, gr.update(value=None, visible=False))


def status_of(run: ecoflap.Run) -> str:
    r = run.result
    stages = ", ".join(f"{k.removesuffix('_s').replace('stage', 'stage ')} {v:.1f} s" for k, v in r.timings.items())
    parts = ", ".join(f"{ecoflap.plots.MODALITY_NAMES.get(m, m).lower()} {s:.3f}"
                      for m, s in r.sparsity_by_modality.items())
    memory = ("GPU memory allocated" if r.peak_memory_kind == "cuda_max_allocated"
              else "growth of the process's memory")
    c = r.calibration
    split = f" ({c['split']})" if c and c["split"] else ""
    data = f" Calibrated on {c['count']} samples of {c['id']}{split}, loss {c['loss']}." if c else ""
    warnings = "".join(f"\n\n> ⚠ {w[:1].upper() + w[1:]}" for w in r.warnings)
    under = ecoflap.lessons.rounding_reason(r.layers, r.target_sparsity, r.achieved_sparsity)
    under = f" {under}" if under else ""
    return (f"**{run.label}** done: achieved sparsity **{r.achieved_sparsity:.4f}** (target "
            f"{r.target_sparsity:.2f}); {parts}.{under} Time: {stages}. Peak during the run: "
            f"{r.peak_memory_bytes / 2**20:,.1f} MiB ({memory}).{data}"
            + (f"\n\n**Against the full model** {ecoflap.quality.summary(r.quality)}." if r.quality else "")
            + warnings)


def variant_label(m: ecoflap.Method) -> str:
    return VARIANT_LABELS.get((m.estimator, m.perturb), m.label)


def method_line(m: ecoflap.Method) -> str:
    """What the two choices make: the method's name, as its runs are labelled."""
    paper = ": the ECoFLaP paper's method" if m.name == "ecoflap_zeroth" else ""
    return f"Method: **{m.label}** = {ALLOCATION_LABELS[m.allocation]} allocation + {STAGE2_LABELS[m.stage2]}{paper}"


def method_controls(m: ecoflap.Method) -> dict:
    """The choices that go with a method, and which advanced settings it reads."""
    stages = ecoflap.methods.stage2_for(m.allocation)
    kinds = ecoflap.methods.variants(m.allocation, m.stage2)
    used = ecoflap.options.applicable(m)
    return {"stage2": ([(STAGE2_LABELS[s], s) for s in stages], m.stage2),
            "variant": ([(variant_label(v), v.name) for v in kinds], m.name, len(kinds) > 1),
            "shown": {field: field in used for field in OPTION_IDS}}


STAGE1_DEFAULTS = {DEFAULTS.stage1_sample_count(m) for m in ecoflap.METHODS.values() if m.allocation == "ecoflap"}


def choose_method(allocation, stage2, variant, stage1_samples):
    """The method of the two choices (and ECoFLaP's scores), and only the settings it reads;
    stage-1 samples left at one estimator's default take the new one's."""
    m = ecoflap.methods.compose(allocation, stage2, variant)
    c = method_controls(m)
    (stage_choices, stage), (kinds, kind, several) = c["stage2"], c["variant"]
    shown = {field: gr.update(visible=c["shown"][field]) for field in OPTION_IDS}
    if m.allocation == "ecoflap" and (stage1_samples in (None, 0) or stage1_samples in STAGE1_DEFAULTS):
        shown["stage1_samples"] = gr.update(visible=True, value=DEFAULTS.stage1_sample_count(m))
    return (gr.update(choices=stage_choices, value=stage), gr.update(choices=kinds, value=kind, visible=several),
            m.name, method_line(m), *shown.values())


def shown_defaults():
    """What the Advanced panel shows on open for the tab's starting sparsity and method."""
    return DEFAULTS.cap(START_SPARSITY), DEFAULTS.stage1_sample_count(START_METHOD), f"{START_SPARSITY:.2f}"


def follow_target(sparsity, max_sparsity, vision_sparsity, previous):
    """The settings whose default follows the sparsity (ECoFLaP's cap, the per-modality vision
    sparsity) move with it while they hold that default; a value a person typed stays."""
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        return gr.skip(), gr.skip(), previous
    cap = gr.update(value=DEFAULTS.cap(sparsity)) if max_sparsity in (None, 0, DEFAULTS.cap(previous)) else gr.skip()
    followed = str(vision_sparsity or "").strip() in ("", f"{previous:.2f}", str(previous))
    vision = gr.update(value=f"{sparsity:.2f}") if followed else gr.skip()
    return cap, vision, sparsity


def uploaded_images(payload) -> list[str]:
    """The paths of several uploaded images (none: an empty list), each checked as an upload."""
    if payload in (None, "", [], {}):
        return []
    if not isinstance(payload, list):
        payload = [payload]
    if len(payload) > MAX_CALIBRATION_UPLOADS:
        raise Refused(f"calibrate on at most {MAX_CALIBRATION_UPLOADS} of your own images")
    return [uploaded_file(item) for item in payload]


async def prune(server: ecoflap.Server, method, sparsity, granularity, max_sparsity, samples, stage1_samples, eps,
                nm, modules, batch_size, owl_m, owl_lambda, vision_sparsity, calibration, calibration_images,
                calibration_question, loss, token, progress=gr.Progress()):
    """Prune with a method at a sparsity; the run is stored for this session. Calibration: your
    own images (the full model labels them), else a dataset this deployment allows, else its default."""
    me = session_of(server, token)
    try:
        run = await in_worker(me.prune, method, sparsity, progress=progress_reporter(progress),
                              calibration=calibration or None, calibration_images=uploaded_images(calibration_images),
                              calibration_question=calibration_question or "",
                              granularity=granularity, max_sparsity=max_sparsity, samples=samples,
                              stage1_samples=stage1_samples, eps=eps, nm=nm, modules=modules,
                              batch_size=batch_size, owl_m=owl_m, owl_lambda=owl_lambda,
                              vision_sparsity=vision_sparsity, loss=loss)
    except ecoflap.Cancelled:
        log.info("stopped: a prune of session %s", me.id[:12])
        return (gr.skip(),) * 8  # the Stop button has said so
    except EXPECTED as err:
        return refuse(err, 8)
    sparsity_chart, groups_chart = charts(me, [run.id])
    return (with_notices(me, status_of(run)), sparsity_chart, groups_chart, *run_lists(me, latest=run.id),
            run.id, run.result.to_dict())


# The Stop buttons stop the session's jobs through the library, not with gradio's
# `cancels`: in gradio 6.31 a cancelled event leaves the page's button dead (the next
# click sends nothing) or badged "Error". The stopped handler ends normally instead.
def recover_choices(server: ecoflap.Server, selected, token):
    """This session's runs to recover (kept: the one chosen, else the latest)."""
    choices = [(r.label, r.id) for r in session_of(server, token).runs()]
    ids = [c[1] for c in choices]
    return gr.update(choices=choices, value=selected if selected in ids else (ids[-1] if ids else None))


async def recover(server: ecoflap.Server, run_id, steps, way, lr, weight_decay, schedule, rank, eval_n, token,
                  progress=gr.Progress()):
    """Fine-tune one of this session's runs with every zero held; the loss is drawn as it
    goes, and the result is a new run, shown beside the run it came from."""
    me = session_of(server, token)
    losses: list[float] = []
    try:
        if not run_id:  # nothing picked yet: the latest run, as the Prune tab just made it
            latest = me.runs()[-1:]
            if not latest:
                raise Refused("prune first, then pick one of your runs to recover")
            run_id = latest[0].id
        total = steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None
        task = asyncio.ensure_future(in_worker(
            me.recover, run_id, steps=steps, way=way, lr=lr, weight_decay=weight_decay, schedule=schedule,
            rank=rank, eval_n=eval_n, progress=progress_reporter(progress),
            on_step=lambda step, loss: losses.append(loss)))
        try:
            shown = 0
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                if len(losses) > shown:
                    shown = len(losses)
                    yield (gr.skip(), ecoflap.plots.loss_figure(losses[:shown], total), *(gr.skip(),) * 5)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        better = task.result()
    except ecoflap.Cancelled:
        log.info("stopped: a recovery of session %s", me.id[:12])
        yield (gr.skip(),) * 7  # the Stop button has said so
        return
    except EXPECTED as err:
        yield refuse(err, 7)
        return
    source = next((r for r in me.runs() if r.label == better.result.recovery["from"]), None)
    full = None
    if better.result.recovery["before"] is not None:
        try:  # the same questions the recovery was scored on (computed once per model, then shared)
            full = await in_worker(me.full_score, better.result.recovery["options"]["eval_n"])
        except ecoflap.Cancelled:
            pass  # the recovered run is kept; its table then leaves the full model's score out
    yield (with_notices(me, recovery_text(better)),
           ecoflap.plots.loss_figure(better.result.recovery["losses"]),
           recovered_answers(me, source, better, full), *run_lists(me, latest=better.id), recover_choices(
               server, better.id, token))


def recovery_text(run: ecoflap.Run) -> str:
    r = run.result.recovery
    o = r["options"]
    scores = ""
    if r["before"] is not None:
        better = "higher is better" if r["before"]["higher_is_better"] else "lower is better"
        scores = (f" {r['before']['metric'].capitalize()} ({better}) **{r['before']['value']:.3f} → "
                  f"{r['after']['value']:.3f}** on {r['after']['measured_on']}.")
    held = "identical in every layer" if r["zeros_before"] == r["zeros_after"] else "CHANGED (please report this)"
    merge = ""
    if r["merge_densification"] is not None:
        merge = (f" LoRA merged as W + ΔW ⊙ M: {r['merge_densification']} new nonzeros (a plain merge would have "
                 f"filled {r['plain_merge_would_fill']:,} zeros).")
    memory = ("GPU memory allocated" if r["peak_memory_kind"] == "cuda_max_allocated"
              else "growth of the process's memory")
    return (f"**{run.label}** done: {o['steps']} steps ({o['way']}, AdamW lr {o['lr']:g}, weight decay "
            f"{o['weight_decay']:g}, {o['schedule']}, batch {o['batch_size']}) on {r['data']}.{scores} Loss "
            f"{sum(r['losses'][:10]) / len(r['losses'][:10]):.3f} → {sum(r['losses'][-10:]) / len(r['losses'][-10:]):.3f} "
            f"(mean of the first and last 10 steps). Zeros: {sum(r['zeros_after'].values()):,}, {held}.{merge} "
            f"Time: {r['timings']['train_s']:.1f} s training, {r['seconds']:.1f} s with scoring. Peak during "
            f"the recovery: {r['peak_memory_bytes'] / 2**20:,.1f} MiB ({memory}).")


def recovered_answers(me: ecoflap.Session, source, better, full: dict | None = None) -> str:
    """The score before and after (beside the full model's `full` score on the same
    questions), and the shipped example questions answered by the full model, the run and
    its recovery, side by side."""
    wanted = [r.label for r in (source, better) if r is not None]
    rows = []
    before, after = better.result.recovery["before"], better.result.recovery["after"]
    if before is not None:
        scores = [f"{before['value']:.3f}", f"{after['value']:.3f}"][-len(wanted):]
        same = full is not None and full["metric"] == before["metric"] and full["n"] == before["n"]
        cells = [f"<b>{html.escape(before['metric'])}</b> on {before['n']} questions",
                 f"{full['value']:.3f}" if same else "<i>(not measured)</i>", *scores]
        rows.append("<tr>" + "".join(f"<td style='padding:4px 8px'>{c}</td>" for c in cells) + "</tr>")
    for path, question in ecoflap.example_prompts():
        answers = me.ask(path, question)
        by = {a["label"]: a["answer"] for a in answers.runs}
        cells = [html.escape(question) or "<i>(caption)</i>", html.escape(answers.full)]
        cells += [html.escape(by.get(label, "")) or "<i>(empty)</i>" for label in wanted]
        rows.append("<tr>" + "".join(f"<td style='padding:4px 8px'>{c}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th style='text-align:left;padding:4px 8px'>{html.escape(h)}</th>"
                     for h in ["Question (shipped example)", "Full model", *wanted])
    return f"<div style='overflow-x:auto'><table><tr>{header}</tr>{''.join(rows)}</table></div>"


def stop(server: ecoflap.Server, token):
    """Stop this session's running jobs: a stopped job stores nothing."""
    return STOPPED if session_of(server, token).stop() else NOTHING_RUNNING


def stop_comparison(server: ecoflap.Server, token):
    """Stop this session's running jobs; the runs a comparison finished stay."""
    return STOPPED_COMPARISON if session_of(server, token).stop() else NOTHING_RUNNING


def overlay(server: ecoflap.Server, selected, token):
    return charts(session_of(server, token), selected)


def clear_runs(server: ecoflap.Server, token):
    """Drop every run of this session."""
    me = session_of(server, token)
    cleared = me.clear_runs()
    return (with_notices(me, f"{cleared} run(s) cleared."), *run_lists(me), None,
            gr.update(value=None, visible=False))


def verify(server: ecoflap.Server, token):
    """Check the shared model holds its full weights, bit for bit (it always returns to them)."""
    me = session_of(server, token)
    identical = me.restore()
    return with_notices(me, "The shared model holds its full weights, bit-identical to the loaded ones; "
                            "your runs are kept (Clear my runs drops them)." if identical else
                            "The model's weights differ from the loaded ones: please report this.")


def ask(server: ecoflap.Server, image, question, token):
    """Answer a question about an image with the full model and every run of this session."""
    me = session_of(server, token)
    try:
        path = uploaded_file(image)
        if path is None:
            raise Refused("upload an image (or pick an example) first")
        answers = me.ask(path, question)
    except EXPECTED as err:
        return refuse(err, 2)
    own = me.describe()["speaks_shapes"] and not shipped_picture(path)
    return answers_page(answers, me.notices(), OWN_PICTURE if own else ""), answers.to_dict()


@functools.cache
def _shipped_digests() -> frozenset[str]:
    return frozenset(hashlib.sha256(Path(p).read_bytes()).hexdigest() for p, _ in ecoflap.example_prompts())


def shipped_picture(path: str) -> bool:
    """Whether an image is one of the shipped example pictures (gradio hands back copies,
    so by content, not by path)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() in _shipped_digests()


def distributions(server: ecoflap.Server, run_id, other_id, token):
    """Weight and gradient magnitude histograms: the full model against one or two of this
    session's runs, and one sentence on what the gradients say about this model."""
    me = session_of(server, token)
    try:
        data = me.distributions(run_id or None, other_id or None)
    except EXPECTED as err:
        return refuse(err, 3)
    reading = ecoflap.lessons.gradient_reading(data["series"]["full"]["gradients"])
    return (*ecoflap.plots.distribution_figures(data), f"**Reading:** {reading}" if reading else "")


def why_choices(server: ecoflap.Server, other, token):
    """This session's runs for the second comparison, the choice kept where it still exists."""
    choices = [(r.label, r.id) for r in session_of(server, token).runs()]
    return gr.update(choices=[("(none)", "")] + choices, value=other if other in [c[1] for c in choices] else "")


async def compare(server: ecoflap.Server, methods, sparsity, image, question, token, progress=gr.Progress()):
    """Prune with two to four methods at one sparsity; allocations, scores and answers side by side."""
    me = session_of(server, token)
    before = {r.id for r in me.runs()}
    try:
        path = uploaded_file(image)
        result = await in_worker(me.compare, methods, sparsity, path, question,
                                 progress=progress_reporter(progress))
    except ecoflap.Cancelled:
        log.info("stopped: a comparison of session %s", me.id[:12])
        return stopped_comparison(me, [r for r in me.runs() if r.id not in before])
    except EXPECTED as err:
        return refuse(err, 7)
    unasked = (NO_IMAGE_FOR_QUESTION if path is None and isinstance(question, str) and question.strip() else "")
    own = path is not None and me.describe()["speaks_shapes"] and not shipped_picture(path)
    return (with_notices(me, unasked + comparison_text(result, OWN_PICTURE if own else "")), runs_figure(result.runs),
            *run_lists(me, [r.id for r in result.runs], result.runs[-1].id),
            [str(p) for p in me.export_table("comparison", result.table())],
            f"Compared {len(result.runs)} methods at {result.sparsity:.2f}: the table and the chart are below.")


def runs_figure(runs):
    return ecoflap.plots.sparsity_figure(
        [{"label": r.label, "layers": r.result.layers, "target_sparsity": r.result.target_sparsity,
          "warnings": r.result.warnings} for r in runs])


def stopped_comparison(me: ecoflap.Session, finished):
    """What a stopped comparison leaves: the runs it finished, their chart, and no table (the
    scores need every run); the old table and chart go, since they belong to another set."""
    if not finished:
        return ("", None, *run_lists(me), None, with_notices(me, STOPPED_COMPARISON + " No run had finished."))
    names = ", ".join(r.label for r in finished)
    return ("", runs_figure(finished), *run_lists(me, [r.id for r in finished], finished[-1].id), None,
            with_notices(me, f"{STOPPED_COMPARISON} Finished before the stop: {names} (their chart is below; "
                             "compare again for the scores)."))


async def sweep(server: ecoflap.Server, methods, sparsities, token, progress=gr.Progress()):
    """Score against sparsity for the chosen methods (the shared model is never left pruned),
    beside the full model's score, with every quality figure measured against the full
    model. A stopped sweep keeps the points it finished."""
    me = session_of(server, token)
    finished: list[dict] = []
    try:
        rows = await in_worker(me.sweep, methods, sparsities, progress=progress_reporter(progress),
                               on_row=finished.append)
        # the full model's quick score only where the score is a measure of its own (once per model, shared)
        full = await in_worker(me.full_score) if "score" in ecoflap.sweep.measured(rows) else None
    except ecoflap.Cancelled:
        log.info("stopped: a sweep of session %s", me.id[:12])
        kept = (f"the {len(finished)} point(s) finished before the stop are below." if finished
                else "no point had finished.")
        return sweep_outputs(me, finished, None, f"Stopped: {kept} Nothing else was stored, and the shared model "
                                                 "keeps its full weights.")
    except EXPECTED as err:
        return refuse(err, 6)
    prune_s, wall_s = sum(r["seconds"] for r in rows), sum(r["wall_seconds"] for r in rows)
    return sweep_outputs(me, rows, full,
                         f"{len(rows)} points measured in {wall_s:.1f} s: {prune_s:.1f} s pruning, the rest scoring "
                         f"each pruned model (and waiting for the shared model).")


def sweep_outputs(me: ecoflap.Session, rows: list[dict], full: dict | None, status: str):
    """Chart, table, status, files, y-axis choices and the stored rows of one sweep: always
    the same rows in all of them."""
    y = ecoflap.sweep.default_y(rows)
    headers, table = ecoflap.sweep.table(rows)
    chart = ecoflap.plots.sweep_chart(rows, y, full) if rows else None
    baseline = ecoflap.sweep.full_value(rows, y, full) if rows else None
    if baseline is not None:
        itself = "; against itself: KL 0, agreement 1" if "kl_mean" in rows[0] and y != "kl_mean" else ""
        status += f" The grey line is the full model ({ecoflap.sweep.y_name(rows, y)} {baseline:.4f}{itself})."
    files = [str(p) for p in me.export_table("sweep", rows)] if rows else None
    picker = gr.update(choices=ecoflap.sweep.y_choices(rows), value=y if rows else None)
    return (chart, pd.DataFrame(table, columns=headers), with_notices(me, status), files, picker,
            {"rows": rows, "full": full})


def sweep_axis(stored, y):
    """The last sweep's chart with another y-axis, drawn from its stored rows."""
    if not stored or not stored["rows"] or y not in ecoflap.sweep.measured(stored["rows"]):
        return gr.skip()
    return ecoflap.plots.sweep_chart(stored["rows"], y, stored["full"])


def export(server: ecoflap.Server, run_id, with_model, token):
    """The run's JSON report and per-layer CSV (and the pruned model, zipped, where allowed)."""
    me = session_of(server, token)
    try:
        return [str(p) for p in me.export(run_id, with_model)]
    except EXPECTED as err:
        return refuse(err, 1)


def new_session(server: ecoflap.Server) -> str:
    """A token for a new page; the server holds nothing for it until the page first acts."""
    return server.session_token()


def page_closed(server: ecoflap.Server, token):
    server.close_session(token, "the page was closed")


class OwnerStats:
    """/stats: sessions, jobs, stored runs, memory and export disk of this deployment right
    now. They tell how busy the server is, so they are for its owner, who sets
    ECOFLAP_STATS_TOKEN and sends it as `key`; without one set, /stats answers nobody."""

    def __init__(self, server: ecoflap.Server, owner_key: str | None):
        self.server, self.owner_key = server, owner_key
        self.__name__ = "stats"

    def __call__(self, key: str = "") -> dict:
        if not self.owner_key or not isinstance(key, str) or not secrets.compare_digest(
                key.encode("utf-8", "replace"), self.owner_key.encode()):
            raise refusal(Refused("these statistics are for the deployment's owner (the key set in "
                                  "ECOFLAP_STATS_TOKEN)"))
        return self.server.stats()


class Handler(functools.partial):
    """A module-level handler with this deployment's server bound as its first argument.
    Gradio reads its name, docstring and remaining parameters; gr.State copies the initial
    value it is given, and a handler is code, not state: a copy is the handler itself."""

    def __deepcopy__(self, memo):
        return self


def bind(server: ecoflap.Server, handler) -> Handler:
    bound = Handler(handler, server)
    bound.__name__, bound.__doc__ = handler.__name__, handler.__doc__
    return bound


class UploadGuard:
    """ASGI middleware before gradio's upload route: an upload is admitted only within the
    deployment's bounds (per client, count and bytes, and in all), judged on its declared
    length before its body is read; the files it became are handed to `server.uploads`,
    which deletes them when they expire."""

    def __init__(self, app, server: ecoflap.Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/upload"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        peer = (scope.get("client") or (None,))[0]
        client = ecoflap.client_address(peer, headers.get("x-forwarded-for"), self.server.limits.behind_proxy)
        length = headers.get("content-length", "")
        if not length.isdigit():
            return await _plain(send, 411, "Send the upload with its length (a Content-Length header).")
        try:
            ticket = self.server.uploads.reserve(client, int(length))
        except ecoflap.Busy as err:
            return await _plain(send, 413, refusal(err).message)
        held, body = [], []

        async def hold(message):
            (held if message["type"] == "http.response.start" else body).append(message)

        try:
            await self.app(scope, receive, hold)
        except BaseException:
            self.server.uploads.cancel(ticket)
            raise
        status = held[0]["status"] if held else 500
        if status != 200:
            self.server.uploads.cancel(ticket)
        else:
            try:
                paths = json.loads(b"".join(m.get("body", b"") for m in body))
                self.server.uploads.keep(ticket, [p for p in paths if isinstance(p, str)])
            except ecoflap.Busy as err:
                return await _plain(send, 413, refusal(err).message)
            except ValueError:
                self.server.uploads.cancel(ticket)
        for message in held + body:
            await send(message)


async def _plain(send, status: int, text: str):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": text.encode("utf-8")})


class QueueGuard:
    """Gradio's queue holds `ECOFLAP_QUEUE_SIZE` requests for everyone, and the job bounds act
    only once a request's turn comes (inside its handler): one client could fill the queue
    with asks or comparisons from many sessions, and everyone else would be turned away.
    This stands in front of the queue's `push`: a client with `Limits.queued_per_client`
    requests already waiting or running is refused there, in one line, before its request
    takes a place."""

    def __init__(self, queue, server: ecoflap.Server):
        self.queue, self.server, self.push = queue, server, queue.push

    def client_of(self, request) -> str | None:
        if request is None:
            return None
        peer = request.client.host if getattr(request, "client", None) else None
        return ecoflap.client_address(peer, request.headers.get("x-forwarded-for"), self.server.limits.behind_proxy)

    def held_by(self, client: str) -> int:
        waiting = [e for q in self.queue.event_queue_per_concurrency_id.values() for e in q.queue]
        running = [e for job in self.queue.active_jobs if job for e in job]
        return sum(1 for e in waiting + running if not getattr(e, "closed", False)
                   and self.client_of(getattr(e, "request", None)) == client)

    async def __call__(self, body, request, username):
        limit = self.server.limits.queued_per_client
        client = self.client_of(request)
        if client is not None:
            held = self.held_by(client)
            if held >= limit:
                log.info("refused: a client with %d requests in the queue", held)
                return (False, f"You already have {held} requests waiting or running here (at most {limit} per "
                               f"person): wait for them to finish.", "queue_full")
        return await self.push(body, request, username)


def guard_queue(demo: gr.Blocks, server: ecoflap.Server):
    """Bound each client's places in gradio's queue (call after `demo.queue()`)."""
    demo._queue.push = QueueGuard(demo._queue, server)


class Page(gr.Blocks):
    """The page's Blocks. A request gradio itself cannot read (a hand-made FileData, a
    string or a list where a file goes, too few values) gets one calm line, not an empty
    error and a traceback in the log."""

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except Exception as err:
            log.info("refused: a request of a form this endpoint does not take (%s)", type(err).__name__)
            raise gr.Error(MALFORMED, print_exception=False) from None


def build_app(server: ecoflap.Server, stats_key: str | None = None) -> gr.Blocks:
    """The page: layout, then its events, each bound to a handler above (`stats_key`: the
    owner's key for /stats; without one, /stats answers nobody)."""
    examples = ecoflap.example_prompts()
    # Teach opens with an example and its question, so each model's answer shows by default
    lesson_image, lesson_question = next(((p, q) for p, q in examples if q), (None, ""))
    with Page(title="ecoflap: prune a vision-language model", delete_cache=(600, 3600)) as demo:
        token = gr.State(bind(server, new_session), delete_callback=bind(server, page_closed))
        gr.Markdown("# ecoflap — prune a vision-language model and see where the sparsity went")
        model_info = gr.Markdown(elem_id="model-info")
        with gr.Accordion("Load another model", open=False):
            with gr.Row():
                model_name = gr.Textbox(label="Hub id", placeholder="Salesforce/blip2-opt-2.7b", scale=4, max_length=200)
                load_button = gr.Button("Load", scale=1)
            load_status = gr.Markdown()
        with gr.Tabs(overflow_behavior="wrap") as tabs:  # a phone sees every tab, on a second row, not a menu
            with gr.Tab("Prune"):
                with gr.Row():
                    with gr.Column(scale=1):
                        sparsity = gr.Slider(0.0, ecoflap.MAX_SPARSITY, value=START_SPARSITY, step=0.05, label="Sparsity",
                                             elem_id="prune-sparsity")
                        first = method_controls(START_METHOD)
                        allocation = gr.Radio([(label, a) for a, label in ALLOCATION_LABELS.items()],
                                              value=START_METHOD.allocation, elem_id="prune-allocation",
                                              label="1 · Allocation: how sparse each layer may be",
                                              info=ALLOCATION_INFO)
                        stage2 = gr.Radio(first["stage2"][0], value=first["stage2"][1], elem_id="prune-stage2",
                                          label="2 · Stage 2: which weights of each layer go", info=STAGE2_INFO)
                        variant = gr.Radio(first["variant"][0], value=first["variant"][1], elem_id="prune-variant",
                                           label="ECoFLaP's importance scores", visible=first["variant"][2])
                        method_name = gr.Markdown(method_line(START_METHOD), elem_id="prune-method-name")
                        # what the API's /prune takes: a method name, set here from the choices above
                        method = gr.Radio(PRUNE_METHODS, value=START_METHOD.name, label="Method", visible=False,
                                          elem_id="prune-method")
                        shown = first["shown"]
                        target = gr.State(START_SPARSITY)  # the sparsity the following defaults were set for
                        with gr.Accordion("Advanced", open=False, elem_id="prune-advanced"):
                            granularity = gr.Radio(list(ecoflap.GRANULARITIES), value=DEFAULTS.granularity,
                                                   label="ECoFLaP: granularity (what one score covers)",
                                                   elem_id=OPTION_IDS["granularity"], visible=shown["granularity"])
                            max_sparsity = gr.Number(value=0, label="ECoFLaP: max per-layer sparsity",
                                                     info="by default the sparsity + 0.1 (it follows the slider)",
                                                     elem_id=OPTION_IDS["max_sparsity"], visible=shown["max_sparsity"])
                            zeroth, first_order = (DEFAULTS.stage1_sample_count(ecoflap.METHODS[n])
                                                   for n in ("ecoflap_zeroth", "ecoflap_first"))
                            stage1_samples = gr.Number(
                                value=0, precision=0,
                                label="ECoFLaP: stage-1 samples", elem_id=OPTION_IDS["stage1_samples"],
                                info=f"by default {zeroth} for zeroth-order, {first_order} for first-order scores",
                                visible=shown["stage1_samples"])
                            eps = gr.Number(value=DEFAULTS.eps, label="ECoFLaP zeroth-order: eps (the step of the nudge)",
                                            elem_id=OPTION_IDS["eps"], visible=shown["eps"])
                            nm = gr.Dropdown(["off", "2:4", "4:8", "1:4"], value="off", allow_custom_value=True,
                                             elem_id=OPTION_IDS["nm"], visible=shown["nm"],
                                             label="N:M (uniform allocation; sets the sparsity to N/M)")
                            samples = gr.Number(value=DEFAULTS.samples, precision=0, elem_id=OPTION_IDS["samples"],
                                                label="Calibration samples (layer-wise stage)", visible=shown["samples"])
                            batch_size = gr.Number(value=DEFAULTS.batch_size, precision=0, label="Batch size",
                                                   elem_id=OPTION_IDS["batch_size"], visible=shown["batch_size"])
                            modules = gr.CheckboxGroup([(label, key) for key, label in MODULE_LABELS.items()],
                                                       value=list(DEFAULTS.include), label="Modules to prune",
                                                       elem_id=OPTION_IDS["include"])
                            vision_sparsity = gr.Textbox(value="", max_lines=1, elem_id=OPTION_IDS["vision_sparsity"],
                                                         visible=shown["vision_sparsity"],
                                                         info="by default the target (it follows the slider); the "
                                                              "language model takes the rest of the budget",
                                                         label="Per-modality: vision sparsity")
                            owl_m = gr.Number(value=DEFAULTS.owl_m, label="OWL: M (outlier = score above M x mean)",
                                              elem_id=OPTION_IDS["owl_m"], visible=shown["owl_m"])
                            owl_lambda = gr.Number(value=DEFAULTS.owl_lambda, label="OWL: lambda (band around the target)",
                                                   elem_id=OPTION_IDS["owl_lambda"], visible=shown["owl_lambda"])
                        with gr.Accordion("Calibration data", open=False, elem_id=OPTION_IDS["loss"],
                                          visible=shown["loss"]) as calibration_box:
                            gr.Markdown(calibration_note(server))
                            calibration = gr.Textbox(value="", max_lines=1, max_length=200, elem_id="calibration-source",
                                                     label="Dataset (empty: this deployment's default)",
                                                     placeholder="hf:OWNER/NAME:SPLIT, local:NAME or shapes")
                            calibration_images = gr.File(value=[], file_count="multiple", file_types=["image"],
                                                         label="Or your own images (the full model labels them)",
                                                         elem_id="calibration-images", height=140)
                            calibration_question = gr.Textbox(value="", max_lines=1, max_length=500,
                                                              label="Question the full model answers for your images "
                                                                    "(empty: it captions them)")
                            loss = gr.Radio(LOSS_CHOICES, value=DEFAULTS.loss, label="Calibration loss")
                        with gr.Row():
                            prune_button = gr.Button("Prune", variant="primary")
                            stop_button = gr.Button("Stop", elem_id="prune-stop")
                        with gr.Row():
                            verify_button = gr.Button("Check full weights", size="sm")
                            clear_button = gr.Button("Clear my runs", size="sm")
                    with gr.Column(scale=2):
                        status = gr.Markdown("Pick a method and a sparsity, then Prune.", elem_id="prune-status",
                                             elem_classes=["status-box"])
                        sparsity_plot = gr.Plot(label="Per-layer sparsity", show_label=False, elem_id="prune-chart")
                        runs_selected = gr.CheckboxGroup([], label="Overlay runs of this session",
                                                         elem_id="overlay-runs")
                        groups_plot = gr.Plot(label="Allocation groups", show_label=False, visible=False)
                last_run = gr.Textbox(visible=False)
                last_report = gr.JSON(visible=False)
                with gr.Accordion("What the methods do", open=False):
                    gr.Markdown(EXPLANATION)
            with gr.Tab("Recover") as recover_tab:
                gr.Markdown(RECOVER_TEXT)
                with gr.Row():
                    with gr.Column(scale=1):
                        recover_run = gr.Dropdown([], label="Run to recover", value=None, elem_id="recover-run")
                        recover_steps = gr.Number(value=100, precision=0, label="Steps", elem_id="recover-steps",
                                                  info=f"at most {server.limits.recover_steps} on this deployment")
                        recover_way = gr.Radio([("Full (the pruned matrices)", "full"), ("Masked LoRA", "lora")],
                                               value="full", label="Way")
                        with gr.Accordion("Advanced", open=False):
                            recover_lr = gr.Number(value=2e-5, label="Learning rate (AdamW)")
                            recover_decay = gr.Number(value=0.05, label="Weight decay")
                            recover_schedule = gr.Radio(["cosine", "constant"], value="cosine", label="Schedule")
                            recover_rank = gr.Number(value=8, precision=0, label="LoRA rank")
                            recover_eval = gr.Number(value=200, precision=0,
                                                     label="Questions scored before and after (0: none)")
                        with gr.Row():
                            recover_button = gr.Button("Recover", variant="primary", elem_id="recover-button")
                            recover_stop = gr.Button("Stop", elem_id="recover-stop")
                    with gr.Column(scale=2):
                        recover_status = gr.Markdown("Prune on the Prune tab, pick the run here, then Recover.",
                                                     elem_id="recover-status")
                        loss_plot = gr.Plot(show_label=False, elem_id="recover-loss")
                        recover_answers = gr.HTML(elem_id="recover-answers")
            with gr.Tab("Ask"):
                with gr.Row():
                    with gr.Column():
                        gr.Markdown(SHAPES_NOTE, elem_classes=["note"])
                        image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"])
                        question = gr.Textbox(label="Question (empty: a caption)", placeholder="what color is the circle?",
                                              max_length=2000)
                        ask_button = gr.Button("Ask the full and the pruned models", variant="primary")
                        if examples:
                            gr.Examples([list(pair) for pair in examples], inputs=[image, question],
                                        examples_per_page=8)
                    with gr.Column():
                        answers_html = gr.HTML()
                        answers_json = gr.JSON(label="Answers (raw)", visible=False)
            with gr.Tab("Why") as why_tab:
                gr.Markdown(WHY_TEXT)
                with gr.Row():
                    dist_run = gr.Dropdown([], label="Compare the full model with run", value=None)
                    dist_other = gr.Dropdown([("(none)", "")], label="and with run (optional)", value="",
                                             elem_id="why-other")
                    dist_button = gr.Button("Show weight and gradient distributions")
                why_reading = gr.Markdown(elem_id="why-reading")
                weights_plot = gr.Plot(show_label=False, elem_id="why-weights")
                grads_plot = gr.Plot(show_label=False, elem_id="why-gradients")
            with gr.Tab("Teach"):
                teach_curve = gr.Plot(show_label=False, elem_id="teach-curve")
                teach_curve_note = gr.Markdown(elem_id="teach-lesson")
                with gr.Accordion("How these curves were measured", open=False):
                    teach_curve_details = gr.Markdown()
                gr.Markdown("**Try it:** prune with each chosen method at the same sparsity, see where each put the "
                            "zeros, score every model on the same questions, and answer your question with each.")
                with gr.Row():
                    teach_methods = gr.CheckboxGroup(PRUNE_METHODS, value=TEACH_DEFAULT, label="Methods (two to four)",
                                                     elem_id="teach-methods", min_width=340)
                    teach_sparsity = gr.Slider(0.0, ecoflap.MAX_SPARSITY, value=0.6, step=0.05, label="Sparsity",
                                               elem_id="teach-sparsity")
                with gr.Row():
                    teach_image = gr.Image(lesson_image, type="filepath", label="Image (optional)",
                                           sources=["upload", "clipboard"], elem_id="teach-image")
                    with gr.Column():
                        gr.Markdown(SHAPES_NOTE, elem_classes=["note"])
                        teach_question = gr.Textbox(lesson_question, label="Question (empty: a caption)", max_length=2000,
                                                    elem_id="teach-question")
                # the status sits beside its buttons: where a person looks after a click
                with gr.Row(equal_height=True):
                    teach_button = gr.Button("Compare", variant="primary", scale=1)
                    teach_stop = gr.Button("Stop", elem_id="teach-stop", scale=1)
                    teach_status = gr.Markdown("Choose methods and a sparsity, then Compare.", elem_id="teach-status",
                                               elem_classes=["status-box"], scale=2, min_width=240)
                teach_text = gr.Markdown(elem_id="teach-result")
                teach_plot = gr.Plot(show_label=False, elem_id="teach-chart")
                teach_files = gr.File(label="This comparison (CSV, JSON)", file_count="multiple", height=110,
                                      elem_id="teach-files")
            with gr.Tab("Sweep"):
                with gr.Row():
                    sweep_methods = gr.CheckboxGroup(PRUNE_METHODS, value=TEACH_DEFAULT, label="Methods", min_width=340,
                                                    elem_id="sweep-methods")
                    sweep_sparsities = gr.Textbox(value="0.3,0.5,0.6,0.7", label="Sparsities",
                                                  info=f"at most {server.limits.sweep_points} points in all")
                with gr.Row(equal_height=True):
                    sweep_button = gr.Button("Run sweep", variant="primary", scale=1)
                    sweep_stop = gr.Button("Stop", elem_id="sweep-stop", scale=1)
                    sweep_status = gr.Markdown("Choose methods and sparsities, then Run sweep.",
                                               elem_id="sweep-status", elem_classes=["status-box"], scale=2,
                                               min_width=240)
                sweep_y = gr.Dropdown([], label="Y-axis", elem_id="sweep-y", interactive=True,
                                      info="the measures this sweep has; changing it redraws the same points")
                sweep_rows = gr.State(None)
                sweep_plot = gr.Plot(show_label=False, elem_id="sweep-chart")
                sweep_table = gr.Dataframe(headers=SWEEP_COLUMNS, elem_id="sweep-table",
                                           label="Each point: the figures against the full model, the achieved "
                                                 "sparsity, the prune's seconds and the point's (prune, scoring, "
                                                 "waiting for the shared model)")
                sweep_files = gr.File(label="This sweep (CSV, JSON)", file_count="multiple", height=110,
                                      elem_id="sweep-files")
            with gr.Tab("Export"):
                export_run = gr.Dropdown([], label="Run")
                export_model = gr.Checkbox(value=False, label="Also save the pruned model (safetensors, zipped)",
                                           interactive=server.limits.allow_model_export)
                export_button = gr.Button("Export")
                export_files = gr.File(label="Files", file_count="multiple")

        # a chart drawn while its tab was hidden took plotly's default width (700 px, wider than a
        # phone): the resize plotly listens for redraws it at its tab's width once the tab shows
        tabs.select(None, js="() => { setTimeout(() => window.dispatchEvent(new Event('resize')), 100); }")
        run_outputs = [runs_selected, export_run, dist_run]
        demo.load(bind(server, describe), token, model_info, api_name="describe")
        # The page shows each default's value; the API's /prune keeps 0 and "" for "the default"
        # (gradio_client sends a component's first value for a parameter left out).
        demo.load(shown_defaults, None, [max_sparsity, stage1_samples, vision_sparsity], api_visibility="private",
                  queue=False)
        demo.load(bind(server, curves), token, [teach_curve, teach_curve_note, teach_curve_details], api_visibility="private")
        load_button.click(
            bind(server, load_model), [model_name, token],
            [model_info, load_status, *run_outputs, sparsity_plot, groups_plot], api_name="load_model",
            preprocess=False).then(bind(server, curves), token, [teach_curve, teach_curve_note, teach_curve_details],
                                   api_visibility="private")
        option_boxes = {"granularity": granularity, "max_sparsity": max_sparsity, "stage1_samples": stage1_samples,
                        "eps": eps, "nm": nm, "samples": samples, "batch_size": batch_size, "include": modules,
                        "vision_sparsity": vision_sparsity, "owl_m": owl_m, "owl_lambda": owl_lambda,
                        "loss": calibration_box}
        for choice in (allocation, stage2, variant):
            choice.input(choose_method, [allocation, stage2, variant, stage1_samples],
                         [stage2, variant, method, method_name, *(option_boxes[f] for f in OPTION_IDS)],
                         api_visibility="private", queue=False)
        sparsity.change(follow_target, [sparsity, max_sparsity, vision_sparsity, target],
                        [max_sparsity, vision_sparsity, target], api_visibility="private", queue=False)
        prune_button.click(
            bind(server, prune),
            [method, sparsity, granularity, max_sparsity, samples, stage1_samples, eps, nm, modules, batch_size,
             owl_m, owl_lambda, vision_sparsity, calibration, calibration_images, calibration_question, loss, token],
            [status, sparsity_plot, groups_plot, *run_outputs, last_run, last_report],
            api_name="prune", preprocess=False, show_progress_on=[status], concurrency_limit=8,
            concurrency_id="long")
        stop_button.click(bind(server, stop), token, status, api_visibility="private", queue=False)
        runs_selected.change(bind(server, overlay), [runs_selected, token], [sparsity_plot, groups_plot],
                             api_visibility="private")
        verify_button.click(bind(server, verify), token, status, api_name="restore")
        clear_button.click(bind(server, clear_runs), token, [status, *run_outputs, sparsity_plot, groups_plot],
                           api_name="clear_runs")
        ask_button.click(bind(server, ask), [image, question, token], [answers_html, answers_json], api_name="ask",
                         preprocess=False)
        why_tab.select(bind(server, why_choices), [dist_other, token], dist_other, api_visibility="private")
        dist_button.click(bind(server, distributions), [dist_run, dist_other, token],
                          [weights_plot, grads_plot, why_reading],
                          api_name="distributions", preprocess=False)
        teach_button.click(
            bind(server, compare), [teach_methods, teach_sparsity, teach_image, teach_question, token],
            [teach_text, teach_plot, *run_outputs, teach_files, teach_status], api_name="compare", preprocess=False,
            show_progress_on=[teach_status], concurrency_limit=8, concurrency_id="long")
        teach_stop.click(bind(server, stop_comparison), token, teach_status, api_visibility="private", queue=False)
        sweep_button.click(
            bind(server, sweep), [sweep_methods, sweep_sparsities, token],
            [sweep_plot, sweep_table, sweep_status, sweep_files, sweep_y, sweep_rows], api_name="sweep",
            preprocess=False, show_progress_on=[sweep_status], concurrency_limit=8, concurrency_id="long")
        sweep_y.input(sweep_axis, [sweep_rows, sweep_y], sweep_plot, api_visibility="private", queue=False)
        sweep_stop.click(bind(server, stop), token, sweep_status, api_visibility="private", queue=False)
        recover_tab.select(bind(server, recover_choices), [recover_run, token], recover_run,
                           api_visibility="private")
        recover_button.click(
            bind(server, recover),
            [recover_run, recover_steps, recover_way, recover_lr, recover_decay, recover_schedule, recover_rank,
             recover_eval, token],
            [recover_status, loss_plot, recover_answers, *run_outputs, recover_run], api_name="recover",
            preprocess=False, show_progress_on=[recover_status], concurrency_limit=8, concurrency_id="long")
        recover_stop.click(bind(server, stop), token, recover_status, api_visibility="private", queue=False)
        export_button.click(bind(server, export), [export_run, export_model, token], export_files,
                            api_name="export", preprocess=False)
        gr.api(OwnerStats(server, stats_key), api_name="stats")
    for fn in demo.fns.values():
        if getattr(fn.fn, "func", None) is new_session:
            fn.api_visibility = "private"  # the page's own start, not an API
    return demo


def answers_page(answers: ecoflap.Answers, notices: list[str], beside: str = "") -> str:
    """The full model's answer, then each run's; a run that answers differently is marked."""
    q = html.escape(answers.question) if answers.question else "<i>(caption)</i>"
    cards = [("Full model", answers.full, False)] + [(r["label"], r["answer"], r["answer"] != answers.full)
                                                     for r in answers.runs]
    body = "".join(
        f"<div class='answer{' differs' if differs else ''}' style='flex:1;min-width:160px;border:1px solid "
        f"{'#d97706' if differs else '#ddd'};border-radius:8px;padding:10px'>"
        f"<div style='font-weight:600;margin-bottom:6px'>{html.escape(label)}</div>"
        f"<div style='font-size:1.1em'>{html.escape(text) or '<i>(empty)</i>'}</div>"
        + ("<div style='color:#b45309;font-size:0.85em;margin-top:6px'>differs from the full model</div>"
           if differs else "") + "</div>"
        for label, text, differs in cards
    )
    told = [answers.notice] if answers.notice else []
    extra = "".join(f"<p style='color:#a60'>{html.escape(n)}</p>" for n in told + notices)
    changed = sum(differs for *_, differs in cards)
    hint = ("<p style='color:#666'>Prune on the Prune tab to see pruned answers here.</p>" if not answers.runs else
            f"<p style='color:#666'>{changed} of {len(answers.runs)} pruned model(s) answer differently from the "
            "full model.</p>")
    aside = f"<p class='own-picture' style='color:#b45309'>{html.escape(beside)}</p>" if beside else ""
    return (f"{extra}<p>Question: {q}</p><div style='display:flex;gap:10px;flex-wrap:wrap'>{body}</div>{aside}{hint}")


def comparison_text(result: ecoflap.Comparison, beside: str = "") -> str:
    """The comparison's one-sentence takeaway, its table (with `beside` right under it: what
    to make of the answers to this picture), and what was measured."""
    better = "higher is better" if result.higher_is_better else "lower is better"
    takeaway = ecoflap.lessons.comparison_takeaway(result.rows, result.metric, result.higher_is_better,
                                                   result.sparsity)
    answer_column = result.question is not None
    flips = "accuracy" in result.rows[0]["quality"]
    header = (f"| model | {result.metric} ({better}) | same top | same answer |"
              + (" flips r→w / w→r |" if flips else " KL p99 |")
              + " vision | language |" + (" answer |" if answer_column else ""))
    lines = [f"**Takeaway:** {takeaway}", "", header, "|---" * (8 if answer_column else 7) + "|"]
    for row in result.rows:
        by, q = row["sparsity_by_modality"], row["quality"]
        cells = [html.escape(row["label"]), f"{row['score']:.3f}", f"{q['same_top']:.1%}", f"{q['same_answer']:.1%}",
                 f"{q['flips']['right_to_wrong']} / {q['flips']['wrong_to_right']}" if flips
                 else f"{q.get('kl_p99', 0):.3f}", f"{by.get('vision', 0):.2f}", f"{by.get('language', 0):.2f}"]
        if answer_column:
            cells.append(html.escape(row["answer"] or "") or "(empty)")
        lines.append("| " + " | ".join(cells) + " |")
    if beside and answer_column:
        lines += ["", f"> ⚠ {html.escape(beside)}"]
    question = (html.escape(result.question) or "(caption)") if answer_column else ""
    asked = f"Question: {question}{'' if question[-1] in '.?!)' else '.'} " if answer_column else ""
    return "\n".join(lines) + f"\n\n{result.metric.capitalize()}: {result.measured_on}. {asked}" \
        "Same top: the share of answer tokens whose most likely next token is the full model's; same answer: " \
        "the share of greedy answers identical to the full model's" + \
        ("; flips: answers that went right→wrong / wrong→right against the full model's" if flips else "") + \
        ". Vision and language columns: the sparsity each part received."


def main(argv=None):
    parser = argparse.ArgumentParser(description="ecoflap workbench")
    parser.add_argument("--model", default=os.environ.get("ECOFLAP_MODEL"), help="hub id or local folder")
    parser.add_argument("--device", default=os.environ.get("ECOFLAP_DEVICE", "auto"))
    parser.add_argument("--dtype", default=os.environ.get("ECOFLAP_DTYPE", "auto"))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"))
    parser.add_argument("--port", type=int, default=int(os.environ["GRADIO_SERVER_PORT"])
                        if os.environ.get("GRADIO_SERVER_PORT", "").isdigit() else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ecoflap.return_freed_memory_to_the_system()
    try:
        # exports live in gradio's own cache folder, so gradio serves them where they are
        # instead of keeping a copy that the export bounds would not reach
        server = ecoflap.Server.from_environment(args.model, device=args.device, dtype=args.dtype,
                                                 export_root=Path(get_upload_folder()) / "ecoflap-exports")
    except (ecoflap.ConfigError, ecoflap.ModelLoadError) as err:
        raise SystemExit(f"error: {err}") from None
    demo = build_app(server, os.environ.get("ECOFLAP_STATS_TOKEN") or None)
    demo.queue(max_size=server.limits.queue_size, default_concurrency_limit=4)
    guard_queue(demo, server)
    demo.launch(server_name=args.host, server_port=args.port,
                max_file_size=f"{int(server.limits.upload_mb)}mb", i18n=SCREEN_READER_WORDS, css=CSS,
                app_kwargs={"middleware": [Middleware(UploadGuard, server=server)]})


if __name__ == "__main__":
    main()
