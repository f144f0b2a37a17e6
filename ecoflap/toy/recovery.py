"""How much recovery brings back on the shipped model, and which pruning recovers more.

    python -m ecoflap.toy.recovery --out assets/shapes-blip2/recovery.json

For each method, sparsity and seed (seeds only where the method is random): prune with
the default options, then recover a fresh copy of that run for each number of steps
(each its own cosine schedule) with the reference's settings (AdamW, lr 2e-5, weight
decay 0.05, batch 8, the pruned matrices trained, every zero held), on freshly generated
scenes (`--way lora`: a masked LoRA of `--rank`, merged as W + ΔW ⊙ M, the merge
densification recorded). Before and after are scored by `quick_score` on the pruning curves' 500
questions (seed 1234), so "before" is the curves' number. Each row is written to the
JSON file as soon as it is measured (an interrupted measurement keeps what it has and
resumes where it stopped), with the process CPU time it took.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..methods import get_method
from ..models import load_model
from ..options import PruneOptions
from ..recover import WAYS, RecoverOptions
from ..report import write_json
from ..workbench import Workbench
from .resumable import ResumeError, resume

COMMAND = "python -m ecoflap.toy.recovery"
EVAL_N = 500


def key(row: dict) -> tuple:
    """What identifies a row; rows written before the LoRA way was measured are the full way."""
    return (row["method"], float(row["sparsity"]), int(row["seed"]), int(row["steps"]), float(row["lr"]),
            row.get("way", "full"))


def measure(model: str, out: Path, methods, sparsities, steps, seeds, eval_n: int = EVAL_N, lr: float = 2e-5,
            way: str = "full", rank: int = RecoverOptions.rank, log=print) -> dict:
    resumed = resume(out, key, {"command": COMMAND, "eval_n": eval_n, "threads": 1})
    torch.set_num_threads(1)
    loaded = load_model(model, device="cpu")
    bench = Workbench(loaded)
    data = {"model": loaded.name, **resumed.data}
    for seed_index, seed in enumerate(seeds):
        for sparsity in sparsities:
            for name in methods:
                method = get_method(name)
                if seed_index and not method.seeded:
                    continue
                wanted = [n for n in steps if (method.name, sparsity, seed, n, lr, way) not in resumed.done]
                if not wanted:
                    continue
                cpu = time.process_time()
                result, weights, _ = bench.prune(method.name, sparsity, PruneOptions(seed=seed))
                prune_cpu = time.process_time() - cpu
                for n in wanted:
                    cpu, wall = time.process_time(), time.perf_counter()
                    options = RecoverOptions(steps=n, lr=lr, eval_n=eval_n, seed=seed, way=way, rank=rank)
                    recovery, _, _ = bench.recover(weights, options)
                    row = {"method": method.name, "label": method.label, "sparsity": sparsity, "seed": seed,
                           "steps": n, "lr": lr, "way": way, "achieved_sparsity": result.achieved_sparsity,
                           "before": recovery.before["value"], "after": recovery.after["value"],
                           "loss_first10": sum(recovery.losses[:10]) / min(10, n),
                           "loss_last10": sum(recovery.losses[-10:]) / min(10, n),
                           "zeros_held": recovery.zeros_before == recovery.zeros_after,
                           "trained_parameters": recovery.trained_parameters,
                           "prune_cpu_s": round(prune_cpu, 1), "train_s": round(recovery.timings["train_s"], 1),
                           "recover_cpu_s": round(time.process_time() - cpu, 1),
                           "recover_wall_s": round(time.perf_counter() - wall, 1),
                           "peak_memory_bytes": recovery.peak_memory_bytes}
                    if way == "lora":
                        row.update(rank=rank, merge_densification=recovery.merge_densification,
                                   plain_merge_would_fill=recovery.plain_merge_would_fill)
                    data["rows"].append(row)
                    write_json(data, out)
                    log(f"{method.label:26s} {sparsity:.2f} seed {seed} {n:4d} steps ({way}): {row['before']:.3f} -> "
                        f"{row['after']:.3f}  ({row['recover_cpu_s']:.0f} s CPU)")
    return data


def _listed(text: str, kind) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/shapes-blip2")
    parser.add_argument("--out", default="assets/shapes-blip2/recovery.json")
    parser.add_argument("--methods", default="wanda,ecoflap_zeroth")
    parser.add_argument("--sparsities", default="0.7,0.8")
    parser.add_argument("--steps", default="100,300")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--way", default="full", choices=WAYS, help="full: the pruned matrices; lora: a masked LoRA")
    parser.add_argument("--rank", type=int, default=RecoverOptions.rank, help="LoRA rank (the lora way)")
    args = parser.parse_args(argv)
    try:
        measure(args.model, Path(args.out), _listed(args.methods, str), _listed(args.sparsities, float),
                _listed(args.steps, int), _listed(args.seeds, int), lr=args.lr, way=args.way, rank=args.rank)
    except ResumeError as err:
        parser.exit(2, f"{err}\n")


if __name__ == "__main__":
    main()
