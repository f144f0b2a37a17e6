"""Command line: python -m ecoflap {prune, recover, ask, eval, sweep, bench, soak} ..."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from tqdm import tqdm

from .anatomy import INCLUDE_CHOICES, prunable_layers
from .answers import ask
from .benchmark import bench, sparsegpt_layer_peak
from .forms import from_settings, seed_list, sparsity_list, sparsity_value
from .images import open_image
from .losses import LOSSES
from .methods import METHODS, get_method, method_names
from .models import ModelLoadError, load_model, offloaded, resolve_device
from .offload import resolve_offload
from .options import DEFAULTS
from .pipeline import prune
from .plots import sweep_chart
from .recover import recover, recover_options
from .report import save_pruned, table_csv, write_json, write_text
from .quality import summary
from .scoring import held_out_examples, quality_against_full, quick_score, reference_for
from .shapes.evaluate import CARD_SEED
from .serve.soak import soak
from .sources import deployment_default, labeller, parse
from .stats import achieved_sparsity, layer_table
from .sweep import Y_CHOICES, default_y, export_columns, full_value, sweep
from .synthetic import random_model
from .workbench import Workbench

log = logging.getLogger("ecoflap")


class TqdmProgress:
    """Adapts the library's progress callback (what, done, total) to tqdm bars."""

    def __init__(self):
        self.bar = None
        self.stage = None

    def __call__(self, what: str, done: int, total: int):
        stage = what.split(":")[0]
        if self.bar is None or stage != self.stage or self.bar.total != total:
            self.close()
            self.bar = tqdm(total=total, desc=stage, file=sys.stderr, leave=True)
            self.stage = stage
        self.bar.set_postfix_str(what[len(stage) + 1 :].strip()[-40:], refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None, help="hub id or local folder (default: the shipped shapes model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device-map", default=None, help="'auto' to spread a large model over devices (accelerate)")
    p.add_argument("--offload", default=None, choices=["cpu", "disk"],
                   help="a model larger than the device: weights stay in CPU memory (or on disk) and each block "
                        "comes to the device for its turn (default: $ECOFLAP_OFFLOAD)")
    p.add_argument("--offload-folder", default=None,
                   help="where --offload disk writes the weights (default: $ECOFLAP_OFFLOAD_FOLDER)")


def _calibration_arg(p: argparse.ArgumentParser):
    p.add_argument("--calibration", default=None,
                   help="calibration data: a folder with examples.jsonl, a folder of images (the full model labels "
                        "them), a datasets save_to_disk or parquet folder (FOLDER:SPLIT picks a split), or "
                        "hf:OWNER/NAME[:SPLIT] (default: $ECOFLAP_CALIBRATION for a model that is not the shapes "
                        "model, else the shipped shapes set)")
    p.add_argument("--image-column", default=None, help="a dataset's image column (default: found by type)")
    p.add_argument("--text-column", default=None, help="a dataset's text column (default: found by name and type)")
    p.add_argument("--question", default="", help="images without captions: the question the full model answers "
                   "to make their targets (default: none, a caption)")
    p.add_argument("--loss", default=DEFAULTS.loss, choices=LOSSES,
                   help="answer: the target's loss given image and prompt; prefix_lm: the ECoFLaP reference's "
                        "recipe (lowercased captions cut at a random point in their first half)")


def _calibration(args, loaded, methods: list[str], options, held_out: int = 0):
    """The calibration drawn from --calibration (or the deployment's default) for these
    methods' sample counts, and `held_out` more examples that none of it overlaps; None
    for the shipped set, which the pipeline takes itself."""
    spec = args.calibration or deployment_default(loaded)
    if spec is None:
        return None
    source = parse(spec, image_column=args.image_column, text_column=args.text_column, question=args.question)
    n = max(options.samples_used(get_method(m)) for m in methods) or options.samples
    return source.draw(n, held_out, labeller=labeller(lambda images, questions: ask(loaded, images, questions)))


def _warn(warnings: list[str]):
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ecoflap", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a vision-language model and report every layer")
    _model_args(p)
    p.add_argument("--method", default="ecoflap", help=f"one of {', '.join(METHODS)}; ecoflap is ecoflap_zeroth")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nm", default=None, help="semi-structured N:M, e.g. 2:4 (uniform methods)")
    p.add_argument("--include", default=",".join(DEFAULTS.include),
                   help=f"comma-separated module sets to prune, from {','.join(INCLUDE_CHOICES)}")
    _calibration_arg(p)
    p.add_argument("--samples", type=int, default=DEFAULTS.samples, help="calibration samples for the layer-wise stage")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--granularity", default=DEFAULTS.granularity, help="ecoflap groups: layer, block or model")
    p.add_argument("--aggregate", default=DEFAULTS.aggregate, help="group score: sum or avg")
    p.add_argument("--max-sparsity", type=float, default=None, help="per-layer cap (default: sparsity + 0.1)")
    p.add_argument("--eps", type=float, default=DEFAULTS.eps, help="zeroth-order perturbation size")
    p.add_argument("--noise-samples", type=int, default=DEFAULTS.noise_samples, help="zeroth-order draws per batch")
    p.add_argument("--stage1-samples", type=int, default=None, help="default 32 (zeroth) or 128 (first)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--owl-m", type=float, default=DEFAULTS.owl_m,
                   help="owl: outliers are Wanda scores above M times their block's mean")
    p.add_argument("--owl-lambda", type=float, default=DEFAULTS.owl_lambda,
                   help="owl: every block's sparsity stays within the target +/- lambda")
    p.add_argument("--vision-sparsity", type=float, default=None,
                   help="per_modality: the vision encoder's sparsity (default: the target); the language "
                        "model takes the rest of the budget")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--save", default=None, help="write the pruned model (safetensors) and report here")

    r = sub.add_parser("recover", help="fine-tune a pruned model (a folder prune --save wrote), every zero held")
    _model_args(r)
    r.add_argument("--steps", type=int, default=None, help="fine-tuning steps (required)")
    r.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (the paper's reference: 2e-5)")
    r.add_argument("--weight-decay", type=float, default=0.05)
    r.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    r.add_argument("--way", default="full", choices=["full", "lora"],
                   help="full: the pruned matrices, gradient and update masked; lora: a LoRA merged as W + dW * mask")
    r.add_argument("--rank", type=int, default=8, help="LoRA rank")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--seed", type=int, default=0, help="which fresh scenes (shapes model) or shuffles")
    r.add_argument("--eval-n", type=int, default=200, help="questions scored before and after (0: none)")
    r.add_argument("--calibration", default=None,
                   help="captioned examples to fine-tune on, any labelled calibration source: a folder with "
                        "examples.jsonl, a datasets save_to_disk or parquet folder (FOLDER:SPLIT), or "
                        "hf:OWNER/NAME[:SPLIT] (default: fresh shapes scenes for the shapes model, else "
                        "$ECOFLAP_CALIBRATION or the shipped calibration set)")
    r.add_argument("--samples", type=int, default=128, help="examples drawn from --calibration (cycled)")
    r.add_argument("--image-column", default=None, help="a dataset's image column (default: found by type)")
    r.add_argument("--text-column", default=None, help="a dataset's text column (default: found by name and type)")
    r.add_argument("--report", default=None, help="write the JSON report here")
    r.add_argument("--save", default=None, help="write the recovered model (safetensors) and report here")

    a = sub.add_parser("ask", help="answer a question about an image (no question: a caption)")
    _model_args(a)
    a.add_argument("--image", default=None)
    a.add_argument("--question", default="")
    a.add_argument("--jsonl", default=None, help='many: one {"image": path, "question": q} per line')
    a.add_argument("--max-new-tokens", type=int, default=20)
    e = sub.add_parser("eval", help="score the model: accuracy per question type (shapes model) or calibration "
                       "loss; with --full or --method, against the full model")
    _model_args(e)
    e.add_argument("--n", type=int, default=1000, help="evaluation examples")
    e.add_argument("--seed", type=int, default=CARD_SEED, help="seed of the evaluation and held-out examples")
    e.add_argument("--full", default=None, help="compare --model (a pruned model, as prune --save writes it) with "
                   "this full model: KL, same top, same answer (accuracy and flips for a shapes model)")
    e.add_argument("--method", default=None, help="prune --model with this method first (default options), then "
                   "compare it with the full model")
    e.add_argument("--sparsity", type=float, default=0.5, help="with --method")
    e.add_argument("--samples", type=int, default=DEFAULTS.samples, help="calibration samples (held-out examples come after them)")
    _calibration_arg(e)
    e.add_argument("--held-out", type=int, default=200, help="held-out examples for the comparison with the full "
                   "model (never a calibration image)")
    e.add_argument("--json", default=None, help="also write the score as JSON here")

    w = sub.add_parser("sweep", help="score against sparsity for several methods")
    _model_args(w)
    w.add_argument("--methods", default="wanda,ecoflap_zeroth", help="comma-separated: " + ",".join(METHODS))
    w.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8")
    _calibration_arg(w)
    w.add_argument("--samples", type=int, default=DEFAULTS.samples)
    w.add_argument("--eval-n", type=int, default=500, help="evaluation examples per point")
    w.add_argument("--seeds", default="0", help="comma-separated seeds for the methods that use one "
                   "(zeroth-order ECoFLaP); the others are measured once")
    w.add_argument("--json", default=None, help="also write the rows as JSON here")
    w.add_argument("--csv", default="sweep.csv")
    w.add_argument("--html", default="sweep.html", help="plotly chart")
    w.add_argument("--y", default=None, choices=Y_CHOICES, help="the chart's y-axis: the score (accuracy, or "
                   "the mean KL for a model without labels) or a figure against the full model (accuracy and "
                   "flips: shapes models); default: accuracy where the model has labels, else the mean KL")
    b = sub.add_parser("bench", help="time and memory of every method, side by side, in one process")
    _model_args(b)
    b.add_argument("--arch", default=None, help="build a full-size architecture instead of loading: "
                   "blip2-opt-2.7b, blip2-flan-t5-xl, llava-1.5-7b or qwen2.5-vl-7b (with --random-init)")
    b.add_argument("--random-init", action="store_true", help="random weights for --arch (no download)")
    b.add_argument("--methods", default="magnitude,wanda,sparsegpt,ecoflap_zeroth,ecoflap_zeroth_group,ecoflap_first",
                   help="comma-separated: " + ",".join(METHODS))
    b.add_argument("--sparsity", type=float, default=0.5)
    _calibration_arg(b)
    b.add_argument("--samples", type=int, default=DEFAULTS.samples)
    b.add_argument("--stage1-samples", type=int, default=None, help="default 32 (zeroth) or 128 (first)")
    b.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    b.add_argument("--no-naive", action="store_true", help="skip timing the reference-style zeroth-order loop")
    b.add_argument("--held-out", type=int, default=0, help="also measure each method against the full model on "
                   "this many held-out examples (after the timings, so they are not counted)")
    b.add_argument("--no-half", action="store_true", help="skip the half-precision comparison with float32")
    b.add_argument("--json", default=None)
    b.add_argument("--sparsegpt-layer", action="append", default=None, metavar="ROWSxCOLUMNS",
                   help="instead: SparseGPT's peak memory on one float32 CPU layer of this shape "
                        "(repeatable; a LLaMA-7B MLP: 4096x11008 and 11008x4096)")

    k = sub.add_parser("soak", help="simulated students against a running app: isolation, answers, latency, memory")
    k.add_argument("--url", default="http://127.0.0.1:7860/")
    k.add_argument("--users", type=int, default=20)
    k.add_argument("--minutes", type=float, default=3)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--yes-i-own-it", action="store_true", help="allow a host other than this machine")
    k.add_argument("--json", default=None, help="write every finding and server sample here")
    k.add_argument("--attacker", action="store_true",
                   help="add one stranger replaying attacks (session, job, export and upload floods, junk values) "
                        "next to the students; start the app with ECOFLAP_BEHIND_PROXY=1")
    k.add_argument("--same-runs", action="store_true",
                   help="every student's prune is one of the same two runs (Wanda at 0.5, ECoFLaP at 0.6): "
                        "the report says how many the server computed")
    k.add_argument("--stats-key", default=os.environ.get("ECOFLAP_STATS_TOKEN"),
                   help="the deployment's ECOFLAP_STATS_TOKEN, to sample its memory and disk (default: $ECOFLAP_STATS_TOKEN)")
    return parser


def _load(args):
    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                      offload=args.offload, offload_folder=args.offload_folder)


def cmd_prune(args) -> int:
    """The same edge as the app's and the API's (`from_settings`: bounds, "0 means default"),
    then the library's own check, before the model loads."""
    method, sparsity = get_method(args.method), sparsity_value(args.sparsity)
    options = from_settings(
        nm=args.nm,
        modules=[x.strip() for x in args.include.split(",") if x.strip()],
        samples=args.samples,
        stage1_samples=args.stage1_samples,
        batch_size=args.batch_size,
        granularity=args.granularity,
        aggregate=args.aggregate,
        max_sparsity=args.max_sparsity,
        eps=args.eps,
        noise_samples=args.noise_samples,
        seed=args.seed,
        owl_m=args.owl_m,
        owl_lambda=args.owl_lambda,
        vision_sparsity=args.vision_sparsity,
        loss=args.loss,
    )
    options.check(method, sparsity)
    loaded = _load(args)
    calibration = _calibration(args, loaded, [args.method], options)
    progress = TqdmProgress()
    try:
        result = prune(loaded, method, sparsity, options, calibration, progress)
    finally:
        progress.close()
    report = result.to_dict()
    _warn(result.warnings)
    print(
        f"{result.method} on {result.model}: target sparsity {result.target_sparsity:.3f}, "
        f"achieved {result.achieved_sparsity:.4f} "
        + ", ".join(f"{m} {s:.3f}" for m, s in result.sparsity_by_modality.items())
        + f"; {result.timings['total_s']:.1f} s; peak memory {result.peak_memory_bytes / 2**20:.0f} MiB"
    )
    if result.calibration:
        c = result.calibration
        split = f" ({c['split']})" if c["split"] else ""
        print(f"calibration: {c['count']} samples of {c['id']}{split}, targets {c['targets']}, loss {c['loss']}")
    if result.groups:
        low = min(result.groups, key=lambda g: g["sparsity"])
        high = max(result.groups, key=lambda g: g["sparsity"])
        print(f"{len(result.groups)} groups, sparsity from {low['sparsity']:.4f} ({low['name']}) "
              f"to {high['sparsity']:.4f} ({high['name']})")
    return _write_outputs(args, loaded, report, "pruned model")


def _write_outputs(args, loaded, report: dict, what: str) -> int:
    """The report and the saved folder a command was asked for, each named on stdout."""
    if args.report:
        write_json(report, args.report)
        print(f"report: {args.report}")
    if args.save:
        save_pruned(loaded, report, args.save)
        print(f"{what}: {args.save}")
    return 0


def _recovery_examples(args, loaded):
    """Examples to fine-tune on from --calibration (or the deployment's default); None:
    fresh scenes (shapes model) or the shipped set. Sources that need the full model to
    label them are refused: a pruned folder has no full model to ask."""
    spec = args.calibration or deployment_default(loaded)
    if spec is None:
        return None
    drawn = parse(spec, image_column=args.image_column, text_column=args.text_column).draw(args.samples)
    _warn(drawn.warnings)
    return drawn.examples


def cmd_recover(args) -> int:
    options = recover_options(args.steps, args.lr, args.weight_decay, args.schedule, args.batch_size, args.way,
                              args.rank, args.seed, args.eval_n)
    pruned_report = Path(args.model or "") / "ecoflap_report.json"
    if not args.model or not pruned_report.is_file():
        raise ValueError("--model must be a folder that `python -m ecoflap prune --save` wrote "
                         "(it holds ecoflap_report.json, which names the pruned layers)")
    report = json.loads(pruned_report.read_text())
    loaded = _load(args)
    names = {row["name"] for row in report["layers"]}
    layers = [layer for layer in prunable_layers(loaded.model, INCLUDE_CHOICES) if layer.name in names]
    if len(layers) != len(names):
        raise ValueError("the folder's ecoflap_report.json names layers this model does not have")
    progress = TqdmProgress()
    try:
        recovery = recover(loaded, layers, options, _recovery_examples(args, loaded), progress)
    finally:
        progress.close()
    targets = {row["name"]: row.get("target_sparsity") for row in report["layers"]}
    table = [{**row, "target_sparsity": targets[row["name"]]} for row in layer_table(layers)]
    report.update(layers=table, achieved_sparsity=achieved_sparsity(table), quality=None,
                  recovery={"from": str(args.model), **recovery.to_dict()})
    held = "identical" if recovery.zeros_before == recovery.zeros_after else "CHANGED"
    scores = ""
    if recovery.before is not None:
        scores = (f"; {recovery.before['metric']} {recovery.before['value']:.4f} -> "
                  f"{recovery.after['value']:.4f} on {recovery.after['n']} examples")
    print(f"{options.steps} steps ({options.way}, lr {options.lr:g}, {options.schedule}): loss "
          f"{recovery.losses[0]:.4f} -> {recovery.losses[-1]:.4f}{scores}; zeros per layer {held}; "
          f"{recovery.timings['train_s']:.1f} s training; peak memory {recovery.peak_memory_bytes / 2**20:.0f} MiB")
    if recovery.merge_densification is not None:
        print(f"LoRA merge densification: {recovery.merge_densification} (a plain merge would have filled "
              f"{recovery.plain_merge_would_fill:,} zeros)")
    return _write_outputs(args, loaded, report, "recovered model")


def cmd_ask(args) -> int:
    if bool(args.image) == bool(args.jsonl):
        raise ValueError("give either --image (with an optional --question) or --jsonl")
    if args.jsonl:
        with open(args.jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for n, row in enumerate(rows, 1):
            if "image" not in row:
                raise ValueError(f"{args.jsonl} line {n}: no \"image\" field")
    else:
        rows = [{"image": args.image, "question": args.question}]
    images = []
    for row in rows:
        try:
            images.append(open_image(row["image"]))
        except ValueError as err:
            raise ValueError(f"{row['image']}: {err}") from None
    loaded = _load(args)
    answers = ask(loaded, images, [r.get("question") or "" for r in rows], args.max_new_tokens)
    if args.jsonl:
        for row, answer in zip(rows, answers):
            print(json.dumps({"image": row["image"], "question": row.get("question") or "", "answer": answer}))
    else:
        print(answers[0])
    return 0


def cmd_eval(args) -> int:
    if args.full or args.method:
        return _eval_against_full(args)
    loaded = _load(args)
    bar = tqdm(total=args.n, desc="evaluating", file=sys.stderr)
    try:
        score = quick_score(loaded, args.n, args.seed, progress=lambda done, total: bar.update(done - bar.n))
    finally:
        bar.close()
    print(f"{score['metric']}: {score['value']:.4f} on {score['n']} examples ({loaded.name})")
    for kind, value in score.get("by_type", {}).items():
        print(f"  {kind:8s} {value:.4f}")
    if args.json:
        write_json(score, args.json)
    return 0


def _eval_against_full(args) -> int:
    """A pruned model against its full model on held-out examples."""
    if args.full and args.method:
        raise ValueError("give --full (compare a saved pruned model with its full model) or --method (prune now), "
                         "not both")
    if args.held_out <= 0:
        raise ValueError(f"--held-out must be at least 1 (got {args.held_out})")
    options = from_settings(samples=args.samples)
    if args.method:
        method, sparsity = get_method(args.method), sparsity_value(args.sparsity)
        options.check(method, sparsity)
    progress = TqdmProgress()
    try:
        if args.full:
            full = load_model(args.full, device=args.device, dtype=args.dtype, device_map=args.device_map)
            calibration = _calibration(args, full, ["wanda"], options, args.held_out)
            held_out = held_out_examples(calibration, args.held_out, args.seed)
            reference, vocabulary = reference_for(full, held_out, progress), full.processor.tokenizer.get_vocab()
            del full
            loaded = _load(args)
            if loaded.processor.tokenizer.get_vocab() != vocabulary:
                raise ValueError("--model and --full have different vocabularies: compare a pruned model with the "
                                 "model it was pruned from")
            quality = quality_against_full(loaded, reference, progress)
        else:
            loaded = _load(args)
            calibration = _calibration(args, loaded, [method.name], options, args.held_out)
            held_out = held_out_examples(calibration, args.held_out, args.seed)
            result = prune(loaded, method, sparsity, options, calibration, progress, held_out)
            _warn(result.warnings)
            quality = result.quality
    finally:
        progress.close()
    print(f"{loaded.name} against the full model {summary(quality)}")
    print(f"  KL(full || pruned) over {quality['tokens']} answer tokens: mean {quality['kl_mean']:.5f}, median "
          f"{quality['kl_median']:.5f}, p99 {quality['kl_p99']:.4f}, p99.9 {quality['kl_p999']:.4f}; teacher-forced "
          f"on {quality['teacher_forced_on']}")
    if args.json:
        write_json(quality, args.json)
    return 0


def cmd_sweep(args) -> int:
    names = method_names(args.methods)
    sparsities = sparsity_list(args.sparsities, limit=10_000)
    seeds = seed_list(args.seeds)
    options = from_settings(samples=args.samples, loss=args.loss)
    for name in names:
        for sparsity in sparsities:
            options.check(get_method(name), sparsity)
    loaded = _load(args)
    calibration = _calibration(args, loaded, names, options, args.eval_n)
    progress = TqdmProgress()
    try:
        rows = sweep(Workbench(loaded), names, sparsities, options, calibration,
                     eval_n=args.eval_n, seeds=seeds,
                     on_row=lambda r: print(f"{r['method']:22s} {r['sparsity']:.2f} seed {r['seed']}  "
                                            f"{r['metric']} {r['score']:.4f}  KL {r['kl_mean']:.4f}  "
                                            f"same top {r['same_top']:.3f}"),
                     progress=progress)
    finally:
        progress.close()
    if args.json:  # also a deployment's precomputed curves (ECOFLAP_CURVES), shown in the Teach tab
        source = calibration.record["id"] if calibration else "the shipped shapes set"
        higher = rows[0]["metric"] == "accuracy" if rows else True
        full = full_value(rows, "score")  # where the score repeats a figure against the full model
        write_json({"model": loaded.name, "metric": rows[0]["metric"] if rows else "score",
                    "higher_is_better": higher, **({"full_score": full} if full is not None else {}),
                    "measured_on": f"{args.eval_n} evaluation examples per point; calibration: {source}, "
                                   f"{args.samples} samples, loss {args.loss}",
                    "command": "python -m ecoflap " + " ".join(shlex.quote(a) for a in args.argv),
                    "calibration": calibration.report() if calibration else None, "rows": rows}, args.json)
    write_text(table_csv(rows, export_columns(rows)), args.csv)
    figure = sweep_chart(rows, args.y or default_y(rows))
    write_text(figure.to_html(include_plotlyjs=True), args.html)
    print(f"wrote {args.csv} and {args.html}")
    return 0


def cmd_bench(args) -> int:
    if args.sparsegpt_layer:
        return _bench_sparsegpt_layers(args)
    names = method_names(args.methods)
    sparsity = sparsity_value(args.sparsity)
    options = from_settings(samples=args.samples, stage1_samples=args.stage1_samples, batch_size=args.batch_size,
                            loss=args.loss)
    for name in names:
        options.check(get_method(name), sparsity)
    if args.arch:
        if not args.random_init:
            raise ValueError("--arch builds an architecture from its config: add --random-init")
        loaded = random_model(args.arch, "cpu" if args.offload else args.device, args.dtype)
        if args.offload:
            offload, folder = resolve_offload(args.offload, args.offload_folder)
            loaded = offloaded(loaded, offload, resolve_device(args.device), folder)
    else:
        loaded = _load(args)
    if loaded.offload and not (args.no_naive and args.no_half):
        print("offloaded: the reference-loop timing and the half-precision comparison are not run "
              "(they perturb or convert every weight at once)")
        args.no_naive = args.no_half = True
    calibration = _calibration(args, loaded, names, options, max(args.held_out, 0))
    held_out = held_out_examples(calibration, args.held_out) if args.held_out > 0 else None
    progress = TqdmProgress()
    try:
        result = bench(loaded, names, sparsity, calibration.examples if calibration else None, options,
                       naive_zeroth=not args.no_naive, progress=progress, half=not args.no_half,
                       held_out=held_out)
    finally:
        progress.close()
    print(f"{result['model']} on {result['device']} ({result['dtype']}), sparsity {result['sparsity']}, "
          f"{result['calibration_samples']} calibration samples; one forward pass over them: "
          f"{result['forward_pass_s']:.3f} s; inference peak {result['inference_peak_bytes'] / 2**20:.1f} MiB "
          f"({result['peak_kind']})")
    print(f"{'method':20s} {'stage1 s':>9s} {'stage2 s':>9s} {'total s':>9s} {'fwd-eq':>7s} {'peak MiB':>9s} {'peak/inf':>8s}")
    for name, m in result["methods"].items():
        ratio = "n/a" if m["peak_vs_inference"] is None else f"{m['peak_vs_inference']:.2f}"
        print(f"{name:20s} {m['stage1_s']:9.3f} {m['stage2_s']:9.3f} {m['total_s']:9.3f} "
              f"{m['forward_equivalents']:7.2f} {m['peak_bytes'] / 2**20:9.1f} {ratio:>8s}")
    for name, m in result["methods"].items():
        if "quality" in m:
            print(f"{name:20s} against the full model {summary(m['quality'])}")
    if "zeroth_stage1_speedup" in result:
        print(f"zeroth-order stage 1: {result['zeroth_stage1_replayed_s']:.3f} s replayed from the perturbed block "
              f"on batches encoded once, vs {result['zeroth_stage1_full_forward_s']:.3f} s running the whole model "
              f"per perturbation on the same batches ({result['zeroth_stage1_speedup']:.2f}x), vs "
              f"{result['zeroth_stage1_reference_loop_s']:.3f} s also encoding each batch at every perturbation "
              f"as the reference loop does ({result['zeroth_stage1_speedup_vs_reference_loop']:.2f}x)")
    if "half_precision" in result:
        drift, lost = result["half_precision"]["allocation"], result["half_precision"]["gradients"]
        seeds = drift["float32_seeds"]
        print("half precision vs float32, ECoFLaP zeroth-order allocation (largest group-sparsity difference, "
              f"score rank correlation): float32 seed 0 vs 1 {seeds['max_sparsity_difference']:.4f} "
              f"({seeds['score_rank_correlation']:.3f}); " + "; ".join(
                  f"{name} {d['max_sparsity_difference']:.4f} ({d['score_rank_correlation']:.3f})"
                  for name, d in drift.items() if name != "float32_seeds"))
        print("gradient entries lost (zero / subnormal): float32 "
              f"{lost['float32']['zero']:.2%} / {lost['float32']['subnormal']:.2%}; float16 unscaled "
              f"{lost['float16_unscaled']['zero']:.2%} / {lost['float16_unscaled']['subnormal']:.2%}; float16 with "
              f"loss scale {lost['float16_scaled']['scale']:g} {lost['float16_scaled']['zero']:.2%} / "
              f"{lost['float16_scaled']['subnormal']:.2%}")
    if args.json:
        write_json(result, args.json)
    return 0


def _bench_sparsegpt_layers(args) -> int:
    rows = []
    for shape in args.sparsegpt_layer:
        try:
            r, c = (int(n) for n in shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"--sparsegpt-layer takes ROWSxCOLUMNS, e.g. 4096x11008 (got {shape!r})") from None
        rows.append(sparsegpt_layer_peak(r, c, sparsity=args.sparsity))
        m = rows[-1]
        print(f"SparseGPT {m['shape']} float32 CPU: peak growth {m['peak_growth_mib']:.1f} MiB over the layer "
              f"({m['weight_mib']:.1f} MiB) and its Hessian ({m['hessian_mib']:.1f} MiB), "
              f"{m['peak_over_hessian']:.2f}x the Hessian; {m['seconds']:.1f} s")
    if args.json:
        write_json({"sparsegpt_layers": rows}, args.json)
    return 0


def cmd_soak(args) -> int:
    result = soak(args.url, args.users, args.minutes, args.seed, args.yes_i_own_it, stats_key=args.stats_key,
                  attacker=args.attacker, same_runs=args.same_runs)
    ask, busy, rss = result["ask_seconds"], result["ask_seconds_while_pruning"], result["resident_mib"]
    print(f"{args.users} users for {args.minutes:g} min: {sum(result['actions'].values())} actions {result['actions']}")
    print(f"full answers changed: {result['changed_full_answers']}; leaks: {result['leaks']}; "
          f"runs lost without a notice: {result['silent_losses']}; client errors: {result['errors']}")
    print(f"/ask seconds: p50 {ask['p50']:.2f}, p95 {ask['p95']:.2f}, max {ask['max']:.2f} (n={ask['n']}); "
          f"while someone pruned: p50 {busy['p50']:.2f}, p95 {busy['p95']:.2f}, max {busy['max']:.2f} "
          f"(n={busy['n']})")
    prunes = result["prune_seconds"]
    print(f"students' prunes served: {prunes['n']}, seconds p50 {prunes['p50']:.1f}, p95 {prunes['p95']:.1f}, "
          f"max {prunes['max']:.1f}; students refused by a bound: {result['students_refused']}")
    if result["computations"] is not None:
        print(f"prunes computed on the server: {result['computations']} (results handed to a request that did not "
              f"compute them: {result['shared_results']})")
    print(f"resident MiB: start {rss['start']}, after warm-up {rss['after_warm_up']}, max after warm-up "
          f"{rss['max_after_warm_up']}, end {rss['end']}; export MiB max {result['export_mib']['max']}, end "
          f"{result['export_mib']['end']}; upload MiB max {result['upload_mib']['max']}, end "
          f"{result['upload_mib']['end']}; sessions max {result['sessions']['max']}")
    if result["attacker"] is not None:
        attacker = result["attacker"]
        print(f"attacker: {attacker['attacks']}; refused {attacker['refused']} times; answers that were not one "
              f"calm line: {attacker['uncalm']}")
    for example in result["examples"]:
        print(f"  {example}")
    if args.json:
        write_json(result, args.json)
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    commands = {"prune": cmd_prune, "recover": cmd_recover, "ask": cmd_ask, "eval": cmd_eval, "sweep": cmd_sweep, "bench": cmd_bench,
                "soak": cmd_soak}
    try:
        return commands[args.command](args)
    except (ModelLoadError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
