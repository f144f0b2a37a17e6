"""Measure a trained shapes model and write its model card.

    python -m ecoflap.toy.card assets/shapes-blip2 [--curves]

Scores the model on 1,000 held-out generated examples (seed 10000, 200 of each type,
images 96 to 256 px) and on the scenes of an independently written renderer, then
writes README.md and eval.json into the model folder. The pruning table comes from the
folder's pruning-curves.json, measured again first with --curves (10 to 40 minutes on two
CPU cores; see `pruning_curves`). Every number in the card is measured; nothing is typed
in by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..curves import FILE, RECOVERY_FILE, leaders, shipped_recovery, summarise
from ..models import load_model
from ..recover import RecoverOptions
from ..workbench import Workbench
from ..shapes.evaluate import CARD_SEED, evaluate, make_eval_set
from ..shapes.independent import independent_examples
from ..scoring import SCORE_SEED
from .pruning_curves import EVAL_N, SELECTION_N, SELECTION_SEED, measure_curves, write_curves
from .label_free import FILE as LABEL_FREE, table as label_free_table
from .pruning_curves import METHODS as CURVE_METHODS, SEEDS as CURVE_SEEDS, SPARSITIES as CURVE_SPARSITIES
from .self_labels import FILE as SELF_LABELLED, POINTS as SELF_LABELLED_POINTS, table as self_labelled_table


def _table(result: dict) -> str:
    rows = ["| question type | exact match |", "|---|---|"]
    for kind, acc in result["by_type"].items():
        rows.append(f"| {kind} | {acc:.1%} |")
    rows.append(f"| **overall** (n = {result['n']}) | **{result['overall']:.1%}** |")
    return "\n".join(rows)


def _pruning_table(curves: dict) -> str:
    """Methods by sparsity: the mean over seeds with their range where a method is random,
    the chosen vision/language split for the per-modality rows."""
    rows = summarise(curves["rows"])
    sparsities = sorted({r["sparsity"] for r in rows})
    by = {(r["method"], r["sparsity"]): r for r in rows}
    lines = ["| method | " + " | ".join(f"s = {s:g}" for s in sparsities) + " |",
             "|---" * (len(sparsities) + 1) + "|",
             "| full model | " + " | ".join(f"{curves['full_score']:.1%}" for _ in sparsities) + " |"]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for s in sparsities:
            r = by.get((method, s))
            cell = "" if r is None else f"{r['score']:.1%}"
            if r is not None and r["seeds"] > 1:
                cell += f" ({r['score_min']:.1%} to {r['score_max']:.1%})"
            if r is not None and r.get("split"):
                cell += f" (vision {r['split']['vision']:.2f}, language {r['split']['language']:.2f})"
            cells.append(cell)
        label = next(r["label"] for r in rows if r["method"] == method)
        seeds = max(r["seeds"] for r in rows if r["method"] == method)
        lines.append(f"| {label}{f', {seeds} seeds' if seeds > 1 else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _split_table(curves: dict) -> str:
    """The per-modality search: accuracy on the selection questions for each vision
    sparsity tried (as an offset from the target), the chosen one in bold."""
    search = curves["split_search"]
    offsets = sorted({round(t["vision"] - t["sparsity"], 4) for t in search})
    lines = ["| target | " + " | ".join(f"vision {o:+.2f}" for o in offsets) + " |",
             "|---" * (len(offsets) + 1) + "|"]
    for s in sorted({t["sparsity"] for t in search}):
        tried = {round(t["vision"] - s, 4): t for t in search if t["sparsity"] == s}
        chosen = next(r["split"]["vision"] for r in curves["rows"]
                      if r["method"] == "per_modality" and r["sparsity"] == s)
        cells = []
        for o in offsets:
            t = tried.get(o)
            cell = "" if t is None else f"{t['selection_score']:.1%}"
            cells.append(f"**{cell}**" if t is not None and abs(t["vision"] - chosen) < 1e-3 else cell)
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure(folder: str, n: int = 1000, independent_scenes: int = 300) -> dict:
    torch.set_num_threads(2)
    loaded = load_model(folder, device="cpu")
    started = time.time()
    held_out = evaluate(loaded, make_eval_set(n, seed=CARD_SEED), batch_size=64)
    held_seconds = time.time() - started
    other = evaluate(loaded, independent_examples(independent_scenes, seed=99), batch_size=64)
    params = sum(p.numel() for p in loaded.model.parameters())
    return {"held_out": held_out, "independent": other, "eval_seconds": round(held_seconds, 1),
            "parameters": params}


def _self_labelled(folder: Path) -> str:
    """The card's section on calibrating without captions, where it has been measured."""
    if not (folder / SELF_LABELLED).is_file():
        return ""
    data = json.loads((folder / SELF_LABELLED).read_text())
    done = {(r["method"], r["sparsity"], r["seed"]) for r in data["rows"] if r["targets"] == "self-labelled"} & \
        {(r["method"], r["sparsity"], r["seed"]) for r in data["rows"] if r["targets"] == "labelled"}
    pending = [f"{m} {s:g} seed {seed}" for m, s, seed in SELF_LABELLED_POINTS if (m, s, seed) not in done]
    more = (f" Not measured yet (the command resumes where it stopped): {', '.join(pending)}." if pending else "")
    return f"""
## Calibrating without captions

What a person gets who calibrates on their own pictures without captions: the same
{data['calibration_images']} shipped calibration images, once with their ground-truth captions and once with
the full model's own greedy captions as targets ({data['self_labels_differing']} of the {data['calibration_images']} differ from the
ground truth). Accuracy: {data['measured_on']}; default options; the full model
scores {data['full_accuracy']:.1%}.

{self_labelled_table(data)}

Measured in about {max(1, round(data['seconds'] / 60))} minutes of wall time on 2 shared CPU cores; rows in
`{SELF_LABELLED}`. Reproduce: `{data['command']}`.{more}
"""


def _label_free(folder: Path) -> str:
    """The card's section on measuring without labels, where it has been measured."""
    if not (folder / LABEL_FREE).is_file():
        return ""
    data = json.loads((folder / LABEL_FREE).read_text())
    total = len(CURVE_SPARSITIES) * (len(CURVE_METHODS) + 1 + len(CURVE_SEEDS) - 1)
    done = len(data["rows"])
    partial = "" if done >= total else (
        f" {done} of the table's {total} rows are measured so far, the sparsities 0.7 and 0.8 first (the "
        f"command resumes where its file stops).")
    return f"""
## Does the label-free measure rank pruned models as accuracy does?

A real model has no exact-match questions, so the workbench judges a pruned model against
the full one: KL(full || pruned) of the next-token distributions over the answer tokens,
"same top" (the share of answer tokens whose most likely next token is unchanged) and
"same answer" (greedy answers identical to the full model's). Here, on this model, the
same figures beside accuracy and flips (answers right→wrong and wrong→right against the
full model's) for the methods and sparsities of the pruning table: {data['measured_on']};
the full model {data['full_accuracy']:.1%}.{partial}

{label_free_table(data)}

Measured in about {max(1, round(data['seconds'] / 60))} minutes of wall time on 2 shared CPU cores; rows in
`{LABEL_FREE}`. Reproduce: `{data['command']}`.
"""


def way_label(row: dict, lr: float | None = None) -> str:
    """A summary row's method and, for the LoRA way, its rank (and its lr where it differs from `lr`)."""
    if row.get("way", "full") == "full":
        return row["label"]
    rank = f" rank {row['rank']}" if row.get("rank") else ""
    return f"{row['label']}, masked LoRA{rank}" + (f", lr {row['lr']:g}" if lr is not None and row["lr"] != lr else "")


def recovery_table(summary: list[dict], full_score: float | None = None) -> str:
    """Before and after each number of steps, per method, way and sparsity: the mean over
    seeds with its range where there are several, and the CPU time of one recovery."""
    steps = sorted({r["steps"] for r in summary})
    lr = summary[0]["lr"]
    lines = ["| method | sparsity | before | " + " | ".join(f"after {n} steps" for n in steps)
             + " | CPU s per recovery |", "|---" * (len(steps) + 4) + "|"]
    if full_score is not None:
        lines.append(f"| full model | 0 | {full_score:.1%} | " + " | ".join("" for _ in steps) + " | |")
    keys = dict.fromkeys((r["method"], r.get("way", "full"), r["lr"], r["sparsity"]) for r in summary)
    for key in sorted(keys, key=lambda k: (k[3], k[1] != "full", k[2], list(keys).index(k))):
        rows = {r["steps"]: r for r in summary if (r["method"], r.get("way", "full"), r["lr"], r["sparsity"]) == key}
        first = next(iter(rows.values()))
        seeds = max(r["seeds"] for r in rows.values())
        cells = []
        for n in steps:
            r = rows.get(n)
            cell = "" if r is None else f"{r['after']:.1%}"
            if r is not None and r["seeds"] > 1:
                cell += f" ({r['after_min']:.1%} to {r['after_max']:.1%})"
            cells.append(cell)
        cpu = " / ".join(f"{rows[n]['cpu_s']:.0f}" for n in steps if n in rows)
        label = way_label(first, lr) + (f", {seeds} seeds" if seeds > 1 else "")
        before = f"{first['before']:.1%}" + (f" ({first['before_min']:.1%} to {first['before_max']:.1%})"
                                             if first["seeds"] > 1 else "")
        lines.append(f"| {label} | {key[3]:g} | {before} | " + " | ".join(cells) + f" | {cpu} |")
    return "\n".join(lines)


def recovery_gaps(summary: list[dict]) -> str:
    """The gap between the first two methods (mean over seeds) before and after each number
    of steps, per way and sparsity: does recovery close it?"""
    sentences = []
    for way, lr in dict.fromkeys((r.get("way", "full"), r["lr"]) for r in summary):
        same = [r for r in summary if (r.get("way", "full"), r["lr"]) == (way, lr)]
        methods = list(dict.fromkeys(r["method"] for r in same))[:2]
        if len(methods) < 2:
            continue
        label = {r["method"]: r["label"] for r in same}
        parts = []
        for sparsity in sorted({r["sparsity"] for r in same}):
            by = {(r["method"], r["steps"]): r for r in same if r["sparsity"] == sparsity}
            steps = sorted(n for (m, n) in by if m == methods[0] and (methods[1], n) in by)
            if not steps:
                continue
            a, b = by[(methods[0], steps[0])], by[(methods[1], steps[0])]
            gaps = [f"{100 * (b['before'] - a['before']):+.1f} points before"]
            gaps += [f"{100 * (by[(methods[1], n)]['after'] - by[(methods[0], n)]['after']):+.1f} after {n} steps"
                     for n in steps]
            parts.append(f"at {sparsity:g}: " + ", ".join(gaps))
        if parts:
            how = "" if way == "full" else f" (masked LoRA, lr {lr:g})"
            sentences.append(f"{label[methods[1]]} minus {label[methods[0]]}{how}, accuracy (means over seeds): "
                             + "; ".join(parts) + ".")
    return "\n\n".join(sentences)


def _before_note(data: dict, curves: dict) -> str:
    """How far the re-measured "before" is from the pruning table for the same method,
    sparsity and seed (the table may come from an earlier version of the code)."""
    table = {(r["method"], r["sparsity"], r["seed"]): r["score"] for r in curves["rows"]}
    gaps = [abs(r["before"] - table[key]) for r in data["rows"]
            if (key := (r["method"], r["sparsity"], r["seed"])) in table]
    if not gaps:
        return ""
    if max(gaps) == 0:
        return ", equal to the pruning table's for the same seeds"
    return (f", within {100 * max(gaps):.1f} points of the pruning table's for the same seeds (that table "
            f"was measured with an earlier version of the code)")


def lora_commands(data: dict) -> list[str]:
    """The commands that measured the LoRA rows of a recovery file, one per learning rate."""
    out = []
    for lr in sorted({float(r["lr"]) for r in data["rows"] if r.get("way") == "lora"}):
        seeds = sorted({int(r["seed"]) for r in data["rows"] if r.get("way") == "lora" and float(r["lr"]) == lr})
        out.append(f"`{data['command']} --way lora" + ("" if lr == RecoverOptions.lr else f" --lr {lr:g}")
                   + ("" if seeds == [0, 1, 2] else f" --seeds {','.join(map(str, seeds))}") + "`")
    return out


def _recovery(folder: Path, curves: dict) -> str:
    """The card's section on fine-tuning after pruning, where it has been measured."""
    summary = shipped_recovery(str(folder))
    if not summary:
        return ""
    data = json.loads((folder / RECOVERY_FILE).read_text())
    lora = [r for r in summary if r["way"] == "lora"]
    if lora:
        densified = max(r["merge_densification"] for r in lora)
        rows = sum(1 for r in data["rows"] if r.get("way") == "lora")
        ways = (f" The masked-LoRA rows train a rank-{lora[0]['rank']} LoRA per pruned matrix instead (PEFT's "
                f"layer; the same optimiser, schedule and data, at lr {summary[0]['lr']:g} unless the row names "
                f"another), merged as W + ΔW ⊙ M: {densified} new nonzeros in the merged weights of any of its "
                f"{rows} recoveries (reproduce: {', '.join(lora_commands(data))}).")
        missing = "other learning rates" if len({r["lr"] for r in lora}) > 1 else "the LoRA way at other learning rates"
    else:
        ways, missing = "", "the LoRA way, other learning rates"
    return f"""
## Recovery: fine-tuning after pruning, every zero held

How much a little fine-tuning brings back (`recover`: the pruned matrices trained with
AdamW, lr {summary[0]['lr']:g}, weight decay 0.05, cosine schedule, batch 8, gradient and
update masked so every zero stays zero; each number of steps is its own run with its own
schedule, on freshly generated scenes, never the evaluation questions). Accuracy on the
pruning table's {data['eval_n']} questions (seed {SCORE_SEED}); "before" is measured again before each
recovery{_before_note(data, curves)}.{ways}

{recovery_table(summary, curves["full_score"])}

{recovery_gaps(summary)}

CPU time: process CPU seconds of one recovery with one thread (training and the two scorings),
on 2 CPU cores shared with other work. Rows in `{RECOVERY_FILE}`. Reproduce: `{data['command']}`.
Not measured here: {missing}, more steps, and the paper's 10-epoch fine-tuning.
"""


def write_card(folder: Path, measured: dict) -> str:
    training = json.loads((folder / "training.json").read_text())
    if not (folder / FILE).is_file():
        raise FileNotFoundError(f"{folder / FILE} is missing: measure it with python -m ecoflap.toy.card --curves")
    curves = json.loads((folder / FILE).read_text())
    recipe = training["recipe"]
    size_mb = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items())
    held, other = measured["held_out"], measured["independent"]
    card = f"""# shapes-blip2: a small BLIP-2 trained on a synthetic shapes world

The embedded default model of this workbench: a real `Blip2ForConditionalGeneration`
(ViT image encoder, Q-Former, OPT language model) small enough to train, prune and
evaluate on a laptop CPU in seconds. It answers questions about pictures of 1 to 3
coloured shapes and captions them. It is *not* a model of real photos.

## The shapes world

An RGB picture with a plain light background and 1 to 3 non-overlapping shapes; each a
`circle`, `square` or upright `triangle` in `red`, `green`, `blue`, `yellow`, `purple` or
`orange`, about a sixth to two fifths of the image width. Any image size works (the
processor resizes to {recipe['image_size']}x{recipe['image_size']}).

Prompt format, as BLIP-2 VQA: `Question: {{question}} Answer:` and one-word answers:

| question | answer |
|---|---|
| `what color is the {{shape}}?` (the shape appears once) | a colour |
| `what shape is the {{color}} object?` (the colour appears once) | a shape |
| `how many shapes are there?` | `one` / `two` / `three` |
| `is there a {{color}} {{shape}}?` | `yes` / `no` |
| no text at all (captioning) | shapes left to right |

Caption format: `a red circle`; `a red circle and a blue square`;
`a red circle, a blue square and a green triangle`.

```python
from PIL import Image
from ecoflap.models import load_model
from ecoflap.answers import ask
m = load_model("assets/shapes-blip2", device="cpu")
ask(m, [Image.open("assets/examples/scene1.png")] * 2, ["what color is the circle?", ""])
```

## Architecture

{measured['parameters']:,} parameters, {size_mb:.1f} MB on disk (float32 safetensors).
Hidden size {recipe['hidden']}, {recipe['heads']} heads; ViT: {recipe['vision_layers']} layers,
{recipe['image_size']} px input, {recipe['patch_size']} px patches; Q-Former: {recipe['qformer_layers']} layers,
{recipe['query_tokens']} query tokens; OPT: {recipe['language_layers']} layers. Word-level tokenizer over the
closed vocabulary of the world (`ecoflap/toy/tokenizer.py`).

## Training

```
python -m ecoflap.toy.train --out assets/shapes-blip2 {flags}
```

(the flags shown are the defaults). Seed {recipe['seed']}; {training['train_seconds'] / 60:.1f} minutes on
2 CPU cores (torch 2, float32), including rendering the data. The recipe is staged, like
real BLIP-2 (image encoder first):

1. Data: {recipe['scenes']:,} random scenes rendered once at random sizes 96 to 256 px with
   slightly jittered colours and backgrounds, resized by the model's own processor.
2. Stage A, perception ({recipe['vision_steps']} steps, batch {recipe['batch_images']} images, AdamW lr
   {recipe['vision_lr']}, cosine): the ViT and the Q-Former with small linear heads (discarded,
   not saved): every patch predicts the colour, the kind and the left-to-right position
   of the shape under it (or background), the class token the number of shapes, and the
   first three query outputs the colour and kind of the first, second and third shape
   from the left (or none), so the queries hand the language model an ordered list.
3. Stage B, end to end ({recipe['joint_steps']} steps, lr {recipe['joint_lr']}, ViT, Q-Former and queries at
   0.3x lr, cosine): every question of each image plus its caption, next-token loss on
   the answer tokens only, with the stage A loss kept on at weight {recipe['aux_weight']}.

## Accuracy

Exact match (greedy decoding) on 1,000 held-out generated examples (seed {CARD_SEED}, 200 of each
type, images 96 to 256 px; training used other seeds):

{_table(held)}

On scenes drawn by an independently written renderer (`ecoflap/toy/independent.py`:
numpy rasterisation, other RGB values, shapes a fifth to a third of the width):

{_table(other)}

## Pruning: where the sparsity goes

Accuracy (exact match, {EVAL_N} generated questions, seed {SCORE_SEED}) after pruning the vision
encoder and language model blocks with the shipped calibration set and default options.
Every allocation keeps exactly floor(N (1 - s)) of the N prunable weights (uniform Wanda,
rounding each row down, keeps up to one weight per row more), and all but global magnitude
zero them with Wanda, so they differ in how much each layer loses: uniform (Wanda),
OWL (outlier-weighted per block, M = 5, lambda = 0.08), one global |W| threshold,
ECoFLaP's importance-based allocation (zeroth-order: mean and range over seeds), and a
per-modality split (the vision sparsity chosen per target on {SELECTION_N} other questions,
seed {SELECTION_SEED}; the language model takes the rest of the budget).

{_pruning_table(curves)}

{leaders(summarise(curves["rows"]))}

The per-modality split search, accuracy on the {SELECTION_N} selection questions for each
vision sparsity tried (the language model at whatever completes the budget; chosen in
bold, ties going to the split nearer equal):

{_split_table(curves)}

Measured in about {max(1, round(curves['seconds'] / 60))} minutes on 2 CPU cores; the same rows are in
`{FILE}`, which the workbench's Teach tab draws. Reproduce: `{curves['command']}`.
{_recovery(folder, curves)}{_self_labelled(folder)}{_label_free(folder)}
## Limitations

- Only the shapes world: real photos, other objects, colours, shape kinds or more than
  three shapes are outside what it has seen; it will still answer with a word of its
  vocabulary, confidently and wrongly.
- Only the question templates above; rephrased questions are unreliable.
- Overlapping shapes, outlines, textured or dark backgrounds, and very small shapes
  (under about a sixth of the width) are not covered.
"""
    (folder / "README.md").write_text(card)
    (folder / "eval.json").write_text(json.dumps(measured, indent=1))
    return card


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="assets/shapes-blip2")
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--curves", action="store_true", help="measure the pruning curves again first (10 to 40 minutes on two CPU cores)")
    parser.add_argument("--card-only", action="store_true",
                        help="rewrite the card from the folder's measured files (eval.json and the rest), measuring nothing")
    args = parser.parse_args(argv)
    if args.card_only:
        write_card(Path(args.folder), json.loads((Path(args.folder) / "eval.json").read_text()))
        return
    if args.curves:
        torch.set_num_threads(2)
        curves = measure_curves(Workbench(load_model(args.folder, device="cpu")))
        print("curves:", write_curves(Path(args.folder), curves))
    measured = measure(args.folder, args.n)
    write_card(Path(args.folder), measured)
    for name in ("held_out", "independent"):
        r = measured[name]
        print(name, f"{r['overall']:.3f}", {k: round(v, 3) for k, v in r["by_type"].items()}, "n =", r["n"])


if __name__ == "__main__":
    main()
