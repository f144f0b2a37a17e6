"""ecoflap workbench: prune BLIP-2 in the browser and see where the sparsity went.

A thin Gradio layer over the `ecoflap` library: layout, events and per-session state.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr

import ecoflap
from ecoflap import plots
from ecoflap.anatomy import prunable_layers
from ecoflap.answers import open_image
from ecoflap.data import batches, default_calibration, example_prompts
from ecoflap.methods import METHODS
from ecoflap.options import PruneOptions
from ecoflap.registry import ModelRegistry
from ecoflap.report import layers_csv, save_pruned, write_json, write_text
from ecoflap.scoring import quick_score
from ecoflap.stats import gradient_histograms, weight_histograms
from ecoflap.sweep import sweep
from ecoflap.workbench import Cancelled

log = logging.getLogger("ecoflap.app")

METHOD_LABELS = {m.label: m.name for m in METHODS.values()}
PRESET_LABELS = {v: k for k, v in METHOD_LABELS.items()}
MODULE_LABELS = {"Vision encoder": "vision", "Q-Former": "qformer", "Projection": "projection", "Language model": "language"}
EXPORT_DIR = Path(tempfile.gettempdir()) / "ecoflap-exports"

EXPLANATION = """
**Magnitude** zeroes the smallest weights of each layer; it needs no data.
**Wanda** scores each weight by |W| times the norm of its input feature over calibration tokens
and zeroes the lowest scores of every output row, block by block, each block seeing the
outputs of the already-pruned blocks before it. **SparseGPT** chooses the zeros with
second-order (OBS) saliency and updates the surviving weights to compensate.
**ECoFLaP** first decides *how sparse each block may be* from how much the whole
vision-language model's loss depends on it (zeroth-order: two forward passes with each
matrix nudged along a random direction, no gradients and so no extra memory; first-order: exact
gradients), gives important blocks more weights to keep (no block sparser than the cap),
then prunes layer by layer with Wanda or SparseGPT at those sparsities. *One perturbation
per group* nudges all matrices of a block together (two forward passes per block instead of
per matrix): faster, but a different estimate from the paper's.

Zeros alone do not make a model faster or smaller on disk: dense kernels multiply zeros like
any other number. The **2:4** pattern (N:M in the advanced panel) is what sparse tensor cores
can accelerate.
"""


def _progress_callback(progress: gr.Progress, started: float):
    def report(what: str, done: int, total: int):
        progress((done, total), desc=f"{what} · {time.perf_counter() - started:.0f} s")
    return report


def build_app(registry: ModelRegistry) -> gr.Blocks:
    default_name = registry.default_name

    def session_bench(session: dict):
        return registry.get(session.get("model") or default_name)

    def describe(session: dict) -> str:
        info = session_bench(session).describe()
        per = info["prunable_by_modality"]
        return (
            f"**Model** `{info['name']}` · {info['family'].upper()} language model · "
            f"device **{info['device']}** · {info['dtype']} · {info['total']:,} parameters · "
            f"prunable: {info['prunable']:,} (vision {per['vision']:,}, language {per['language']:,}; "
            f"Q-Former {registry.qformer_count(session.get('model') or default_name):,} and projection optional)"
        )

    stop_flags: dict[str, threading.Event] = {}

    def stop_flag(session: dict) -> threading.Event:
        """A fresh stop flag for this session's next long job."""
        flag = stop_flags[session["id"]] = threading.Event()
        return flag

    def request_stop(session: dict):
        flag = stop_flags.get(session["id"])
        if flag is not None:
            flag.set()

    def new_session() -> dict:
        return {"model": default_name, "runs": [], "id": uuid.uuid4().hex[:12]}

    def load_other(name: str, session: dict):
        name = (name or "").strip()
        if not name:
            raise gr.Error("Type a hub id (e.g. Salesforce/blip2-opt-2.7b) or a local folder.")
        try:
            registry.get(name, load=True)
        except (ecoflap.ModelLoadError, PermissionError, MemoryError) as err:
            raise gr.Error(str(err)) from None
        session = {**session, "model": name, "runs": []}
        return session, describe(session), "Loaded. Runs of the previous model are not shown for this one."

    def options_from(granularity, max_sparsity, samples, stage1_samples, eps, nm, modules, batch_size):
        include = tuple(MODULE_LABELS[m] for m in modules)
        if not include:
            raise gr.Error("Choose at least one module set to prune.")
        return PruneOptions(
            nm=None if nm in (None, "", "off") else nm,
            include=include,
            samples=int(samples),
            batch_size=int(batch_size),
            granularity=granularity,
            max_sparsity=None if max_sparsity in (None, 0) else float(max_sparsity),
            eps=float(eps),
            stage1_samples=None if stage1_samples in (None, 0) else int(stage1_samples),
        )

    def run_status(run, dropped) -> str:
        r = run.result
        t = r.timings
        stages = ", ".join(f"{k.removesuffix('_s').replace('stage', 'stage ')} {v:.1f} s" for k, v in t.items())
        by_modality = ", ".join(f"{m} {s:.3f}" for m, s in r.sparsity_by_modality.items())
        text = (
            f"**{run.label}** done: achieved sparsity **{r.achieved_sparsity:.4f}** (target {r.target_sparsity:.2f}); "
            f"{by_modality}. Time: {stages}. Peak memory: {r.peak_memory_bytes / 2**20:,.0f} MiB "
            f"({'GPU allocated' if r.peak_memory_kind == 'cuda_max_allocated' else 'process RSS'})."
        )
        if dropped:
            text += " Memory for stored runs is bounded: dropped " + ", ".join(d.label for d in dropped) + "."
        return text

    def session_runs(session: dict) -> list:
        bench = session_bench(session)
        return [bench.get(rid) for rid in session["runs"] if bench.get(rid) is not None]

    def run_choices(session: dict) -> list[tuple[str, str]]:
        return [(r.label, r.id) for r in session_runs(session)]

    def figures_for(runs) -> tuple:
        if not runs:
            return None, None
        fig = plots.sparsity_figure(
            [{"label": r.label, "layers": r.result.layers, "target_sparsity": r.result.target_sparsity} for r in runs]
        )
        eco = [r for r in runs if r.result.groups]
        groups = plots.group_scores_figure(eco[-1].result.groups, eco[-1].label) if eco else None
        return fig, groups

    def do_prune(method_label, sparsity, granularity, max_sparsity, samples, stage1_samples, eps, nm, modules,
                 batch_size, session, progress=gr.Progress()):
        """Prune with a method at a sparsity; the result is stored for this session."""
        name = METHOD_LABELS.get(method_label, method_label)
        try:
            method, options = name, options_from(granularity, max_sparsity, samples, stage1_samples, eps,
                                                 nm, modules, batch_size)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        bench = session_bench(session)
        stop = stop_flag(session)
        started = time.perf_counter()
        label = f"{PRESET_LABELS.get(name, name)} @ {float(sparsity):.2f}"
        try:
            run, dropped = bench.prune(method, float(sparsity), options, progress=_progress_callback(progress, started),
                                       should_stop=stop.is_set, label=label)
        except Cancelled:
            raise gr.Error("Stopped. The model is back to its full weights.") from None
        except (ValueError, FileNotFoundError, MemoryError, RuntimeError) as err:
            raise gr.Error(str(err)) from None
        session = {**session, "runs": session["runs"] + [run.id]}
        runs = session_runs(session)
        sparsity_fig, groups_fig = figures_for(runs[-1:])
        choices = run_choices(session)
        return (session, run_status(run, dropped), sparsity_fig, groups_fig,
                gr.update(choices=choices, value=[run.id]), gr.update(choices=choices, value=run.id), run.id,
                run.result.to_dict())

    def overlay(selected, session):
        runs = [r for r in session_runs(session) if r.id in (selected or [])]
        return figures_for(runs)

    def do_ask(image_path, question, session, max_new_tokens=20):
        """Answer a question about an image with the full model and every pruned run of this session."""
        bench = session_bench(session)
        image, question, notice = _read_inputs(image_path, question, bench.loaded)
        full = bench.ask([image], [question], None, int(max_new_tokens))[0]
        answers = {"question": question, "full": full, "runs": []}
        for run in session_runs(session):
            answers["runs"].append({"run": run.id, "label": run.label,
                                    "answer": bench.ask([image], [question], run.id, int(max_new_tokens))[0]})
        return _answers_html(answers, notice), answers

    def do_restore(session):
        """Put the full weights back and check they are bit-identical to the loaded ones."""
        identical = session_bench(session).restore()
        return ("Full model restored: weights bit-identical to the loaded ones." if identical
                else "Restored, but the weights differ from the loaded ones: please report this.")

    def do_distributions(run_id, session):
        bench = session_bench(session)
        calibration = list(default_calibration()[:8])

        def measure(loaded):
            layers = prunable_layers(loaded.model)
            batch = batches(loaded, calibration, 8)[0]
            return weight_histograms(layers), gradient_histograms(loaded.model, layers, batch)

        try:
            full_w, full_g = bench.with_run(None, measure)
            label = "full"
            series_w = [(f"{m} · full", h) for m, h in full_w.items()]
            series_g = [(f"{m} · full", h) for m, h in full_g.items()]
            if run_id:
                run = bench.get(run_id)
                pruned_w, pruned_g = bench.with_run(run_id, measure)
                label = run.label
                series_w += [(f"{m} · {label}", h) for m, h in pruned_w.items()]
                series_g += [(f"{m} · {label}", h) for m, h in pruned_g.items()]
        except KeyError as err:
            raise gr.Error(str(err.args[0])) from None
        return (plots.histogram_figure(series_w, "Weight magnitudes per modality (zeros excluded)", "|W|"),
                plots.histogram_figure(series_g, "Gradient magnitudes of the calibration loss per modality", "|dL/dW|"))

    def do_teach(sparsity, image_path, question, session, progress=gr.Progress()):
        """Prune with Wanda and with ECoFLaP at one sparsity; compare allocations, answers and scores."""
        bench = session_bench(session)
        image, question, _notice = _read_inputs(image_path, question, bench.loaded)
        started = time.perf_counter()
        runs, dropped_all = [], []
        for name in ("wanda", "ecoflap_zeroth"):
            method, options = name, PruneOptions()
            label = f"{PRESET_LABELS[name]} @ {float(sparsity):.2f}"
            try:
                run, dropped = bench.prune(method, float(sparsity), options,
                                           progress=_progress_callback(progress, started), label=label)
            except (ValueError, FileNotFoundError, MemoryError, RuntimeError) as err:
                raise gr.Error(str(err)) from None
            runs.append(run)
            dropped_all += dropped
        session = {**session, "runs": session["runs"] + [r.id for r in runs]}
        fig, _ = figures_for(runs)
        rows = []
        full_score = bench.with_run(None, lambda loaded: quick_score(loaded, 200))
        rows.append(("Full model", full_score["value"], bench.ask([image], [question])[0]))
        for run in runs:
            score = bench.with_run(run.id, lambda loaded: quick_score(loaded, 200))
            rows.append((run.label, score["value"], bench.ask([image], [question], run.id)[0]))
        metric = full_score["metric"]
        table = "| model | " + metric + " | answer |\n|---|---|---|\n" + "\n".join(
            f"| {label} | {value:.3f} | {html.escape(answer) or '(empty)'} |" for label, value, answer in rows)
        vis = {r.label: r.result.sparsity_by_modality for r in runs}
        summary = " · ".join(f"{label}: " + ", ".join(f"{m} {s:.2f}" for m, s in v.items()) for label, v in vis.items())
        text = f"{table}\n\nSparsity by modality — {summary}"
        if dropped_all:
            text += "\n\nMemory for stored runs is bounded: dropped " + ", ".join(d.label for d in dropped_all) + "."
        choices = run_choices(session)
        return session, fig, text, gr.update(choices=choices), gr.update(choices=choices)

    def do_sweep(methods, sparsities_text, session, progress=gr.Progress()):
        """Score against sparsity for the chosen methods (the model ends unpruned)."""
        names = [METHOD_LABELS.get(m, m) for m in (methods or [])]
        if not names:
            raise gr.Error("Choose at least one method to sweep.")
        try:
            sparsities = [float(x) for x in str(sparsities_text).replace(" ", "").split(",") if x]
        except ValueError:
            raise gr.Error("Sparsities must be numbers separated by commas, e.g. 0.1,0.3,0.5") from None
        if not sparsities or any(not 0 <= s < 1 for s in sparsities):
            raise gr.Error("Each sparsity must be in [0, 1).")
        bench = session_bench(session)
        stop = stop_flag(session)
        started = time.perf_counter()
        report = _progress_callback(progress, started)

        def checked(what, done, total):
            if stop.is_set():
                raise Cancelled("stopped by the user")
            report(what, done, total)

        try:
            rows = bench.with_run(None, lambda loaded: sweep(loaded, names, sparsities, progress=checked))
        except Cancelled:
            raise gr.Error("Sweep stopped. The model is back to its full weights.") from None
        except (ValueError, FileNotFoundError, MemoryError, RuntimeError) as err:
            raise gr.Error(str(err)) from None
        metric = rows[0]["metric"] if rows else "score"
        table = [[PRESET_LABELS.get(r["method"], r["method"]), r["sparsity"], round(r["score"], 4),
                  round(r["achieved_sparsity"], 4), round(r["seconds"], 2)] for r in rows]
        return plots.sweep_figure(rows, metric), table

    def do_export(run_id, save_model, session):
        """Write the run's JSON report and per-layer CSV (and the pruned model, if asked)."""
        bench = session_bench(session)
        run = bench.get(run_id) if run_id else None
        if run is None:
            raise gr.Error("Choose a stored run to export (prune first).")
        folder = EXPORT_DIR / f"{session.get('id', 'session')}-{run.id}-{int(time.time())}"
        report = run.result.to_dict()
        write_json(report, folder / "report.json")
        write_text(layers_csv(report), folder / "layers.csv")
        files = [str(folder / "report.json"), str(folder / "layers.csv")]
        if save_model:
            if not registry.allow_model_export:
                raise gr.Error("Saving pruned models is turned off on this deployment (ECOFLAP_ALLOW_MODEL_EXPORT=0).")
            bench.with_run(run.id, lambda loaded: save_pruned(loaded, report, folder / "model"))
            archive = _zip_folder(folder / "model")
            files.append(archive)
        return files

    with gr.Blocks(title="ecoflap: prune BLIP-2") as demo:
        session = gr.State(new_session)
        gr.Markdown("# ecoflap — prune a vision-language model and see where the sparsity went")
        with gr.Row():
            model_info = gr.Markdown()
        with gr.Accordion("Load another model", open=False):
            with gr.Row():
                model_name = gr.Textbox(label="Hub id or local folder", placeholder="Salesforce/blip2-opt-2.7b", scale=4)
                load_button = gr.Button("Load", scale=1)
            load_status = gr.Markdown()
        with gr.Tabs():
            with gr.Tab("Prune"):
                with gr.Row():
                    with gr.Column(scale=1):
                        sparsity = gr.Slider(0.0, 0.9, value=0.5, step=0.05, label="Sparsity")
                        method = gr.Radio(list(METHOD_LABELS), value="ECoFLaP (zeroth-order)", label="Method")
                        with gr.Accordion("Advanced", open=False):
                            granularity = gr.Radio(["layer", "block", "model"], value="block", label="ECoFLaP granularity")
                            max_sparsity = gr.Number(value=0, label="Max per-layer sparsity (0: sparsity + 0.1)")
                            samples = gr.Number(value=128, precision=0, label="Calibration samples (layer-wise stage)")
                            stage1_samples = gr.Number(value=0, precision=0, label="Stage-1 samples (0: 32 zeroth / 128 first)")
                            eps = gr.Number(value=1e-3, label="Zeroth-order eps")
                            nm = gr.Dropdown(["off", "2:4", "4:8", "1:4"], value="off", allow_custom_value=True,
                                             label="N:M (not for ECoFLaP)")
                            batch_size = gr.Number(value=8, precision=0, label="Batch size")
                            modules = gr.CheckboxGroup(list(MODULE_LABELS), value=["Vision encoder", "Language model"],
                                                       label="Modules to prune")
                        with gr.Row():
                            prune_button = gr.Button("Prune", variant="primary")
                            stop_button = gr.Button("Stop")
                        restore_button = gr.Button("Restore full model")
                    with gr.Column(scale=2):
                        status = gr.Markdown("Pick a method and a sparsity, then Prune.")
                        sparsity_plot = gr.Plot(label="Per-layer sparsity")
                        runs_selected = gr.CheckboxGroup([], label="Overlay runs of this session")
                        groups_plot = gr.Plot(label="ECoFLaP group scores")
                last_run = gr.Textbox(visible=False)
                last_report = gr.JSON(visible=False)
                with gr.Accordion("What the methods do", open=False):
                    gr.Markdown(EXPLANATION)
            with gr.Tab("Ask"):
                with gr.Row():
                    with gr.Column():
                        image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"])
                        question = gr.Textbox(label="Question (empty: a caption)", placeholder="what color is the circle?")
                        ask_button = gr.Button("Ask the full and the pruned models", variant="primary")
                        examples = example_prompts()
                        if examples:
                            gr.Examples([list(pair) for pair in examples], inputs=[image, question])
                    with gr.Column():
                        answers_html = gr.HTML()
                        answers_json = gr.JSON(label="Answers (raw)", visible=False)
            with gr.Tab("Why: distributions"):
                dist_run = gr.Dropdown([], label="Compare the full model with run", value=None)
                dist_button = gr.Button("Show weight and gradient distributions")
                weights_plot = gr.Plot()
                grads_plot = gr.Plot()
            with gr.Tab("Teach: Wanda vs ECoFLaP"):
                gr.Markdown("Prunes with Wanda (uniform sparsity) and ECoFLaP (zeroth-order allocation) at the same "
                            "sparsity, overlays the two allocations, and compares a quick score and the answers.")
                with gr.Row():
                    teach_sparsity = gr.Slider(0.1, 0.9, value=0.6, step=0.05, label="Sparsity")
                    teach_image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"])
                    teach_question = gr.Textbox(label="Question (empty: a caption)")
                teach_button = gr.Button("Compare", variant="primary")
                teach_plot = gr.Plot()
                teach_text = gr.Markdown()
            with gr.Tab("Sweep"):
                sweep_methods = gr.CheckboxGroup(list(METHOD_LABELS), value=["Wanda", "ECoFLaP (zeroth-order)"], label="Methods")
                sweep_sparsities = gr.Textbox(value="0.1,0.3,0.5,0.6,0.7,0.8", label="Sparsities")
                with gr.Row():
                    sweep_button = gr.Button("Run sweep", variant="primary")
                    sweep_stop = gr.Button("Stop")
                sweep_plot = gr.Plot()
                sweep_table = gr.Dataframe(headers=["method", "sparsity", "score", "achieved", "seconds"])
            with gr.Tab("Export"):
                export_run = gr.Dropdown([], label="Run")
                export_model = gr.Checkbox(value=False, label="Also save the pruned model (safetensors, zipped)")
                export_button = gr.Button("Export")
                export_files = gr.File(label="Files", file_count="multiple")

        demo.load(describe, session, model_info, api_name="describe")
        load_button.click(load_other, [model_name, session], [session, model_info, load_status], api_name="load_model")
        prune_event = prune_button.click(
            do_prune,
            [method, sparsity, granularity, max_sparsity, samples, stage1_samples, eps, nm, modules, batch_size, session],
            [session, status, sparsity_plot, groups_plot, runs_selected, export_run, last_run, last_report],
            api_name="prune", concurrency_limit=1, concurrency_id="model",
        )
        prune_event.then(lambda s: gr.update(choices=run_choices(s)), session, dist_run, api_visibility="private")
        stop_button.click(request_stop, session, None, api_visibility="private")
        runs_selected.change(overlay, [runs_selected, session], [sparsity_plot, groups_plot], api_visibility="private")
        restore_button.click(do_restore, session, status, api_name="restore")
        # preprocess=False: the upload reaches _read_inputs untouched, so any file gets a clear message
        ask_button.click(do_ask, [image, question, session], [answers_html, answers_json], api_name="ask",
                         preprocess=False)
        dist_button.click(do_distributions, [dist_run, session], [weights_plot, grads_plot], api_name="distributions",
                          concurrency_limit=1, concurrency_id="model")
        teach_button.click(do_teach, [teach_sparsity, teach_image, teach_question, session],
                           [session, teach_plot, teach_text, runs_selected, export_run], api_name="compare",
                           concurrency_limit=1, concurrency_id="model", preprocess=False)
        sweep_button.click(do_sweep, [sweep_methods, sweep_sparsities, session], [sweep_plot, sweep_table],
                                         api_name="sweep", concurrency_limit=1, concurrency_id="model")
        sweep_stop.click(request_stop, session, None, api_visibility="private")
        export_button.click(do_export, [export_run, export_model, session], export_files, api_name="export")
    return demo


def _read_inputs(image_path, question, loaded) -> tuple:
    """The uploaded image (read by us, not by gradio, so a bad file gets a clear message)."""
    if isinstance(image_path, dict):
        image_path = image_path.get("path")
    if not image_path:
        raise gr.Error("Upload an image (or pick an example) first.")
    try:
        image = open_image(image_path)
    except ValueError as err:
        raise gr.Error(str(err)) from None
    asked = (question or "").strip()
    fitted, cut = ecoflap.answers.fit_question(loaded, asked)
    notice = (f"Your question had {len(asked):,} characters; only the first {len(fitted):,} were used."
              if cut else None)
    return image, fitted, notice


def _answers_html(answers: dict, notice: str | None) -> str:
    q = html.escape(answers["question"]) if answers["question"] else "<i>(caption)</i>"
    cards = [("Full model", answers["full"])] + [(r["label"], r["answer"]) for r in answers["runs"]]
    body = "".join(
        f"<div style='flex:1;min-width:160px;border:1px solid #ddd;border-radius:8px;padding:10px'>"
        f"<div style='font-weight:600;margin-bottom:6px'>{html.escape(label)}</div>"
        f"<div style='font-size:1.1em'>{html.escape(text) or '<i>(empty)</i>'}</div></div>"
        for label, text in cards
    )
    extra = f"<p style='color:#a60'>{html.escape(notice)}</p>" if notice else ""
    hint = "" if answers["runs"] else "<p style='color:#666'>Prune on the Prune tab to see pruned answers here.</p>"
    return f"{extra}<p>Question: {q}</p><div style='display:flex;gap:10px;flex-wrap:wrap'>{body}</div>{hint}"


def _zip_folder(folder: Path) -> str:
    import shutil

    return shutil.make_archive(str(folder), "zip", folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description="ecoflap workbench")
    parser.add_argument("--model", default=os.environ.get("ECOFLAP_MODEL"), help="hub id or local folder")
    parser.add_argument("--device", default=os.environ.get("ECOFLAP_DEVICE", "auto"))
    parser.add_argument("--dtype", default=os.environ.get("ECOFLAP_DTYPE", "auto"))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"))
    parser.add_argument("--port", type=int, default=int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        registry = ModelRegistry.from_environment(args.model, device=args.device, dtype=args.dtype)
    except ecoflap.ModelLoadError as err:
        raise SystemExit(f"error: {err}") from None
    demo = build_app(registry)
    demo.queue(max_size=int(os.environ.get("ECOFLAP_QUEUE_SIZE", "64")), default_concurrency_limit=4)
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(EXPORT_DIR)])


if __name__ == "__main__":
    main()
