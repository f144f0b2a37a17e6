"""Command line: python -m ecoflap {prune, ask} ..."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tqdm import tqdm

from .anatomy import DEFAULT_INCLUDE, INCLUDE_CHOICES
from .models import ModelLoadError

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ecoflap", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a BLIP-2 and report every layer")
    _model_args(p)
    p.add_argument("--method", default="ecoflap", help="magnitude, wanda, sparsegpt or ecoflap")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nm", default=None, help="semi-structured N:M, e.g. 2:4 (magnitude, wanda, sparsegpt)")
    p.add_argument("--include", default=",".join(DEFAULT_INCLUDE),
                   help=f"comma-separated module sets to prune, from {','.join(INCLUDE_CHOICES)}")
    p.add_argument("--calibration", default=None, help="folder with examples.jsonl (default: shipped set)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples for the layer-wise stage")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--scores", default="zeroth", help="ecoflap stage 1: zeroth or first")
    p.add_argument("--granularity", default="block", help="ecoflap groups: layer, block or model")
    p.add_argument("--aggregate", default="sum", help="group score: sum or avg")
    p.add_argument("--max-sparsity", type=float, default=None, help="per-layer cap (default: sparsity + 0.1)")
    p.add_argument("--eps", type=float, default=1e-3, help="zeroth-order perturbation size")
    p.add_argument("--noise-samples", type=int, default=1, help="zeroth-order draws per batch")
    p.add_argument("--stage1-samples", type=int, default=None, help="default 32 (zeroth) or 128 (first)")
    p.add_argument("--stage2", default="wanda", help="ecoflap stage 2: wanda or sparsegpt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--save", default=None, help="write the pruned model (safetensors) and report here")

    a = sub.add_parser("ask", help="answer a question about an image (no question: a caption)")
    _model_args(a)
    a.add_argument("--image", default=None)
    a.add_argument("--question", default="")
    a.add_argument("--jsonl", default=None, help='many: one {"image": path, "question": q} per line')
    a.add_argument("--max-new-tokens", type=int, default=20)
    return parser


def _load(args):
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)


def cmd_prune(args) -> int:
    from .data import load_examples
    from .pipeline import PruneOptions, prune
    from .report import save_pruned, write_json

    options = PruneOptions(
        nm=args.nm,
        include=tuple(x.strip() for x in args.include.split(",") if x.strip()),
        samples=args.samples,
        batch_size=args.batch_size,
        scores=args.scores,
        granularity=args.granularity,
        aggregate=args.aggregate,
        max_sparsity=args.max_sparsity,
        eps=args.eps,
        noise_samples=args.noise_samples,
        stage1_samples=args.stage1_samples,
        stage2=args.stage2,
        seed=args.seed,
    )
    from .pipeline import validate

    validate(args.method, args.sparsity, options)
    loaded = _load(args)
    calibration = load_examples(args.calibration) if args.calibration else None
    progress = TqdmProgress()
    try:
        result = prune(loaded, args.method, args.sparsity, options, calibration, progress)
    finally:
        progress.close()
    report = result.to_dict()
    print(
        f"{result.method} on {result.model}: target sparsity {result.target_sparsity:.3f}, "
        f"achieved {result.achieved_sparsity:.4f} "
        + ", ".join(f"{m} {s:.3f}" for m, s in result.sparsity_by_modality.items())
        + f"; {result.timings['total_s']:.1f} s; peak memory {result.peak_memory_bytes / 2**20:.0f} MiB"
    )
    if args.report:
        write_json(report, args.report)
        print(f"report: {args.report}")
    if args.save:
        save_pruned(loaded, report, args.save)
        print(f"pruned model: {args.save}")
    return 0


def cmd_ask(args) -> int:
    from PIL import Image, UnidentifiedImageError

    from .answers import ask

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
            with Image.open(row["image"]) as img:
                img.load()
                images.append(img.copy() if not getattr(img, "is_animated", False) else img.convert("RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {row['image']}: {err}") from err
    loaded = _load(args)
    answers = ask(loaded, images, [r.get("question") or "" for r in rows], args.max_new_tokens)
    if args.jsonl:
        for row, answer in zip(rows, answers):
            print(json.dumps({"image": row["image"], "question": row.get("question") or "", "answer": answer}))
    else:
        print(answers[0])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    commands = {"prune": cmd_prune, "ask": cmd_ask}
    try:
        return commands[args.command](args)
    except (ModelLoadError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
