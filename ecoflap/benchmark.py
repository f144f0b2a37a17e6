"""Time and memory of every method on one model and one calibration set, in one process.

Numbers are reported as ratios measured in the same run (forward-pass equivalents, peak
over plain inference), because absolute times on shared machines are noisy. Memory is
measured by `memory.PeakMemory`, the same meter every run's report uses.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Callable

import torch

from .data import Example, batches, calibration_loss, default_calibration, encode_examples, on_model, take
from .importance import zeroth_order_scores
from .memory import PeakMemory, return_freed_memory_to_the_system
from .methods import get_method
from .models import LoadedModel
from .options import PruneOptions
from .pipeline import prune
from .precision import allocation_drift, gradient_underflow
from .pruners.sparsegpt import prune_sparsegpt
from .scoring import reference_for
from .anatomy import prunable_layers
from .weights import WeightStore


class EncodedAtEachPass(Sequence):
    """Calibration batches encoded again every time they are read, as the reference
    code's data loader does for every perturbed pass (the baseline of the bench)."""

    def __init__(self, loaded: LoadedModel, examples: list, batch_size: int):
        self.loaded, self.examples, self.batch_size = loaded, examples, batch_size

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        chunk = self.examples[i * self.batch_size : (i + 1) * self.batch_size]
        encoded = encode_examples(self.loaded, chunk)
        return on_model(encoded, self.loaded.device, self.loaded.dtype)


def _timed(fn: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench(
    loaded: LoadedModel,
    methods: list[str],
    sparsity: float = 0.5,
    calibration=None,
    options: PruneOptions | None = None,
    naive_zeroth: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    half: bool = True,
    held_out: list[Example] | None = None,
) -> dict:
    """{"methods": {name: {stage1_s, stage2_s, total_s, forward_equivalents, peak_bytes, peak_vs_inference,
    quality?}}, ...}; with `held_out` examples, each method's run against the full model,
    measured in a pass of its own after the timings.

    With `half`, also "half_precision": ECoFLaP's zeroth-order allocation in bfloat16 and
    float16 against float32's and float32's own seed-to-seed distance (`allocation_drift`),
    and the float16 gradient entries lost with and without loss scaling (`gradient_underflow`).
    """

    options = options or PruneOptions()
    for name in methods:
        options.check(get_method(name), sparsity)
    methods = [get_method(name).name for name in methods]
    calibration = calibration if calibration is not None else default_calibration()
    model = loaded.model
    store = WeightStore.of(loaded)
    data = batches(loaded, take(calibration, options.samples, "bench"), options.batch_size)

    def forward_all():
        with torch.no_grad():
            for b in data:
                calibration_loss(model, b)

    cpu = loaded.device.type != "cuda"

    def run(name: str):
        try:
            return prune(loaded, name, sparsity, options, calibration, progress)
        finally:
            store.restore()

    def naive_comparison() -> dict:
        zeroth = [get_method(n) for n in methods if get_method(n).estimator == "zeroth"]
        if not (naive_zeroth and zeroth):
            return {}
        layers = prunable_layers(model, options.include)
        examples = take(calibration, options.stage1_sample_count(zeroth[0]), "bench")
        encoded = batches(loaded, examples, options.batch_size)
        reference = EncodedAtEachPass(loaded, examples, options.batch_size)
        ways = {
            "replayed": lambda: zeroth_order_scores(model, layers, encoded, options.eps),
            "full": lambda: zeroth_order_scores(model, layers, encoded, options.eps, replay=False),
            "loop": lambda: zeroth_order_scores(model, layers, reference, options.eps, replay=False),
        }
        # Interleaved and best of three, so a slow spell of a shared machine hits all three.
        seconds = {name: [] for name in ways}
        for _ in range(3):
            for name, way in ways.items():
                seconds[name].append(_timed(way, loaded.device))
        replayed, full, loop = (min(seconds[name]) for name in ways)
        return {"zeroth_stage1_replayed_s": round(replayed, 4), "zeroth_stage1_full_forward_s": round(full, 4),
                "zeroth_stage1_reference_loop_s": round(loop, 4),
                "zeroth_stage1_speedup": round(full / replayed, 3),
                "zeroth_stage1_speedup_vs_reference_loop": round(loop / replayed, 3)}

    forward_all()  # warm-up
    forward_s = min(_timed(forward_all, loaded.device) for _ in range(2))
    # On CPU the memory meter changes how glibc hands out memory (and so the times):
    # time everything first, then measure memory in a second pass.
    timed = {name: run(name) for name in methods} if cpu else {}
    extra = naive_comparison() if cpu else {}
    if cpu:
        return_freed_memory_to_the_system()
    with PeakMemory(loaded.device, collect=True) as inference:
        with torch.no_grad():
            for _ in range(5):
                calibration_loss(model, data[0])
    # On CPU the growth leaves out the weights, which CUDA's counter includes: add them
    # to both sides of the ratio so it compares the same thing on both devices.
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) if cpu else 0
    results: dict = {}
    for name in methods:
        if cpu:
            return_freed_memory_to_the_system()
        with PeakMemory(loaded.device, collect=True) as meter:
            result = run(name)
        timings = timed.setdefault(name, result).timings
        results[name] = {
            "stage1_s": round(timings.get("stage1_s", 0.0), 6),
            "stage2_s": round(timings["stage2_s"], 6),
            "total_s": round(timings["total_s"], 6),
            "forward_equivalents": round(timings["total_s"] / forward_s, 3),
            "peak_bytes": meter.peak,
            "peak_vs_inference": round((meter.peak + resident) / (inference.peak + resident), 3)
            if inference.peak + resident > 0 else None,
            "achieved_sparsity": round(result.achieved_sparsity, 6),
        }
    if not cpu:
        extra = naive_comparison()
    if held_out:
        reference = reference_for(loaded, held_out)
        for name in methods:
            try:
                results[name]["quality"] = prune(loaded, name, sparsity, options, calibration, progress,
                                                 reference).quality
            finally:
                store.restore()
    if half:
        extra["half_precision"] = {
            "allocation": allocation_drift(loaded, ("bfloat16", "float16"), "ecoflap_zeroth", sparsity, options,
                                           calibration),
            "gradients": gradient_underflow(loaded, calibration, options.stage1_sample_count(get_method("ecoflap_first")),
                                            options.batch_size, options.include),
        }
    first = next(iter(model.parameters()))
    return {
        "model": loaded.name,
        "device": str(first.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "sparsity": sparsity,
        "calibration_samples": options.samples,
        "forward_pass_s": round(forward_s, 6),
        "inference_peak_bytes": inference.peak,
        "weights_bytes_added_to_ratios": resident,
        "peak_kind": "cuda_max_allocated" if loaded.device.type == "cuda" else "cpu_rss_growth",
        "methods": results,
        **extra,
    }


def sparsegpt_layer_peak(rows: int, columns: int, tokens: int = 2048, sparsity: float = 0.5,
                         seed: int = 0) -> dict:
    """Peak memory of SparseGPT on one float32 CPU layer of a given shape, over what the
    layer and its summed Hessian already take (both exist before any pruner runs).

    The Hessian comes from `tokens` random inputs (dampening makes it positive definite
    even when tokens < columns). The peak is the growth of resident memory (PeakMemory),
    so the ratio to the Hessian's own size is the pruner's working memory in units of its
    largest input.
    """
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    inputs = torch.randn(tokens, columns, generator=generator)
    hessian = inputs.t() @ inputs
    del inputs
    return_freed_memory_to_the_system()
    with PeakMemory(torch.device("cpu"), collect=True) as meter:
        start = time.perf_counter()
        prune_sparsegpt(weight, hessian, tokens, sparsity)
        seconds = time.perf_counter() - start
    mib = 2**20
    return {
        "shape": f"{rows}x{columns}",
        "weight_mib": round(weight.numel() * 4 / mib, 1),
        "hessian_mib": round(columns * columns * 4 / mib, 1),
        "peak_growth_mib": round(meter.peak / mib, 1),
        "peak_over_hessian": round(meter.peak / (columns * columns * 4), 3),
        "seconds": round(seconds, 2),
        "achieved_sparsity": round(float((weight == 0).float().mean()), 6),
    }
