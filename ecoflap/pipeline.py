"""prune(): one call from a loaded model and a method to a pruned model and its numbers."""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from .allocation import (
    AGGREGATES,
    PERTURBATIONS,
    SCORE_KINDS,
    allocate_sparsity,
    first_order_scores,
    group_scores,
    split_count,
    zeroth_order_scores,
)
from .anatomy import DEFAULT_INCLUDE, GRANULARITIES, INCLUDE_CHOICES, PrunableLayer, group_key, prunable_layers
from .data import Example, batches, default_calibration, take
from .models import LoadedModel
from .pruners.magnitude import prune_magnitude
from .pruners.masks import parse_nm
from .pruners.sequential import SequentialRunner
from .pruners.sparsegpt import prune_sparsegpt
from .pruners.wanda import prune_wanda
from .stats import achieved_sparsity, layer_table, sparsity_by_modality

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt", "ecoflap")
STAGE2 = ("wanda", "sparsegpt")
# Named recipes: (method, option overrides). Used by the app, the sweep and the benchmark.
PRESETS = {
    "magnitude": ("magnitude", {}),
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
    "ecoflap_zeroth": ("ecoflap", {"scores": "zeroth", "stage2": "wanda"}),
    "ecoflap_zeroth_group": ("ecoflap", {"scores": "zeroth", "stage2": "wanda", "perturb": "group"}),
    "ecoflap_first": ("ecoflap", {"scores": "first", "stage2": "wanda"}),
    "ecoflap_sparsegpt": ("ecoflap", {"scores": "zeroth", "stage2": "sparsegpt"}),
}
Progress = Callable[[str, int, int], None]


@dataclass
class PruneOptions:
    """Every knob of a pruning run; the defaults are the reference scripts'."""

    nm: str | None = None
    include: tuple[str, ...] = DEFAULT_INCLUDE
    samples: int = 128
    batch_size: int = 8
    scores: str = "zeroth"
    granularity: str = "block"
    aggregate: str = "sum"
    max_sparsity: float | None = None
    eps: float = 1e-3
    noise_samples: int = 1
    perturb: str = "matrix"
    stage1_samples: int | None = None
    stage2: str = "wanda"
    blocksize: int = 128
    percdamp: float = 0.01
    seed: int = 0

    def stage1_sample_count(self) -> int:
        """32 for zeroth-order, 128 for first-order, as in the reference scripts."""
        if self.stage1_samples is not None:
            return self.stage1_samples
        return 32 if self.scores == "zeroth" else 128


@dataclass
class PruneResult:
    """What a run did, in plain data (the JSON report is this, serialised)."""

    model: str
    method: str
    target_sparsity: float
    achieved_sparsity: float
    options: dict
    layers: list[dict]
    sparsity_by_modality: dict
    groups: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def preset(name: str, options: PruneOptions | None = None) -> tuple[str, PruneOptions]:
    """The method and options of a named recipe, on top of `options`."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(PRESETS)}")
    method, overrides = PRESETS[name]
    return method, replace(options or PruneOptions(), **overrides)


def validate(method: str, sparsity: float, options: PruneOptions) -> tuple[int, int] | None:
    """Reject bad settings before any weight is touched; returns the parsed N:M."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1) (got {sparsity})")
    nm = parse_nm(options.nm)
    if nm and method == "ecoflap":
        raise ValueError("N:M mode applies to magnitude, wanda and sparsegpt, not to ecoflap's allocation")
    bad = set(options.include) - set(INCLUDE_CHOICES)
    if bad or not options.include:
        raise ValueError(f"modules to prune must be chosen from {', '.join(INCLUDE_CHOICES)}")
    if method == "ecoflap":
        if options.scores not in SCORE_KINDS:
            raise ValueError(f"unknown scores {options.scores!r}: use one of {', '.join(SCORE_KINDS)}")
        if options.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {options.granularity!r}: use one of {', '.join(GRANULARITIES)}")
        if options.aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {options.aggregate!r}: use one of {', '.join(AGGREGATES)}")
        if options.stage2 not in STAGE2:
            raise ValueError(f"unknown stage 2 {options.stage2!r}: use one of {', '.join(STAGE2)}")
        cap = default_max_sparsity(sparsity, options.max_sparsity)
        if cap < sparsity:
            raise ValueError(f"max per-layer sparsity ({cap}) is below the target sparsity ({sparsity})")
        if cap > 1:
            raise ValueError(f"max per-layer sparsity must be at most 1 (got {cap})")
        if options.eps <= 0:
            raise ValueError(f"eps must be positive (got {options.eps})")
        if options.noise_samples < 1:
            raise ValueError(f"noise samples must be at least 1 (got {options.noise_samples})")
        if options.perturb not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {options.perturb!r}: use one of {', '.join(PERTURBATIONS)}")
    if options.batch_size < 1:
        raise ValueError(f"batch size must be at least 1 (got {options.batch_size})")
    return nm


def default_max_sparsity(sparsity: float, max_sparsity: float | None) -> float:
    """The reference scripts' cap: target + 0.1, at most 1."""
    return min(1.0, round(sparsity + 0.1, 10)) if max_sparsity is None else max_sparsity


class _Peak:
    """Peak memory of a run: CUDA max allocated on a GPU, process max RSS on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    def read(self) -> tuple[int, str]:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"


def prune(
    loaded: LoadedModel,
    method: str = "wanda",
    sparsity: float = 0.5,
    options: PruneOptions | None = None,
    calibration: list[Example] | None = None,
    progress: Progress | None = None,
) -> PruneResult:
    """Prune the loaded model in place and return what happened.

    The caller keeps the full weights (see `WeightStore`); this function only prunes.
    """
    options = options or PruneOptions()
    nm = validate(method, sparsity, options)
    model = loaded.model
    layers = prunable_layers(model, options.include)
    if nm:
        for l in layers:
            if l.module.in_features % nm[1]:
                raise ValueError(f"N:M with M={nm[1]} needs input widths divisible by {nm[1]}; {l.name} has {l.module.in_features}")
    needs_data = method != "magnitude"
    if needs_data and calibration is None:
        calibration = default_calibration()
    peak = _Peak(loaded.device)
    timings: dict[str, float] = {}
    groups_out: list[dict] = []
    per_layer = {l.name: sparsity for l in layers}
    counts: dict[str, int | None] = {l.name: None for l in layers}
    decoder_only = model.config.use_decoder_only_language_model
    start = time.perf_counter()
    model.eval()

    if method == "ecoflap":
        t0 = time.perf_counter()
        stage1 = batches(loaded.processor, take(calibration, options.stage1_sample_count(), "stage 1"),
                         options.batch_size, decoder_only, loaded.device, loaded.dtype)
        joint = options.scores == "zeroth" and options.perturb == "group"
        if options.scores == "zeroth":
            layer_scores = zeroth_order_scores(
                model, layers, stage1, options.eps, options.noise_samples, options.seed, progress,
                group_of=(lambda l: group_key(l, options.granularity)) if joint else None)
        else:
            layer_scores = first_order_scores(model, layers, stage1, progress)
        groups = group_scores(layers, layer_scores, options.granularity, options.aggregate, by_group=joint)
        cap = default_max_sparsity(sparsity, options.max_sparsity)
        keep = allocate_sparsity([g.score for g in groups], [g.numel for g in groups], sparsity, cap)
        for g, k in zip(groups, keep):
            group_sparsity = 1 - k / g.numel
            for l, c in zip(g.layers, split_count(g.numel - k, [l.numel for l in g.layers])):
                per_layer[l.name] = group_sparsity
                counts[l.name] = c
            groups_out.append({"name": g.name, "numel": g.numel, "score": g.score,
                               "keep": k, "sparsity": group_sparsity,
                               "modality": g.layers[0].modality})
        timings["stage1_s"] = time.perf_counter() - t0
        del stage1

    t0 = time.perf_counter()
    if method == "magnitude":
        for i, l in enumerate(layers):
            prune_magnitude(l.module.weight.data, per_layer[l.name], nm)
            if progress:
                progress(f"magnitude: {l.name}", i + 1, len(layers))
    else:
        stage2 = options.stage2 if method == "ecoflap" else method
        data = batches(loaded.processor, take(calibration, options.samples, "stage 2"),
                       options.batch_size, decoder_only, loaded.device, loaded.dtype)
        runner = SequentialRunner(model, data)

        def prune_block(block_layers: list[PrunableLayer], stats):
            for l in block_layers:
                s = stats[l.name]
                if stage2 == "wanda":
                    prune_wanda(l.module.weight.data, s.sq_norm, per_layer[l.name], nm, counts[l.name])
                else:
                    prune_sparsegpt(l.module.weight.data, s.hessian, s.tokens, per_layer[l.name], nm,
                                    options.blocksize, options.percdamp, counts[l.name])

        runner.run(layers, prune_block, want_hessian=stage2 == "sparsegpt",
                   progress=(lambda what, i, n: progress(f"stage 2 ({stage2}): {what}", i, n)) if progress else None)
    timings["stage2_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    table = layer_table(layers)
    for row in table:
        row["target_sparsity"] = per_layer[row["name"]]
    peak_bytes, peak_kind = peak.read()
    opts = asdict(options)
    opts["include"] = list(options.include)
    if method == "ecoflap":
        opts["max_sparsity"] = default_max_sparsity(sparsity, options.max_sparsity)
        opts["stage1_samples"] = options.stage1_sample_count()
    return PruneResult(
        model=loaded.name,
        method=method,
        target_sparsity=sparsity,
        achieved_sparsity=achieved_sparsity(table),
        options=opts,
        layers=table,
        sparsity_by_modality=sparsity_by_modality(table),
        groups=groups_out,
        timings=timings,
        peak_memory_bytes=peak_bytes,
        peak_memory_kind=peak_kind,
    )
