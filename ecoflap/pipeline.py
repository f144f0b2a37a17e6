"""prune(): a loaded model and a method in, a pruned model and what happened out.

Reads like the paper: stage 1 decides how sparse each layer may be (the same target
everywhere, or an allocation: ECoFLaP's from importance scores of the whole multimodal
model, OWL's from the outliers of the dense model's Wanda scores, a per-modality split or
one global magnitude threshold); stage 2 then zeroes weights layer by layer, each block
calibrated on the outputs of the already-pruned blocks before it.
"""

from __future__ import annotations

import time

from .allocation import (LayerBudget, ecoflap_budget, global_magnitude_budget, group_scores, modality_budget,
                         uniform_budget)
from .anatomy import PrunableLayer, group_key, prunable_layers
from .data import Example, batches, default_calibration, take
from .losses import examples_for
from .importance import first_order_scores, resolvable_step, zeroth_order_scores
from .memory import PeakMemory
from .methods import Method, get_method
from .models import LoadedModel
from .options import PruneOptions, as_report
from .owl import dense_outlier_ratios, owl_budget
from .progress import Progress, StopCheck, prefixed, stop_if_asked
from .pruners.magnitude import prune_magnitude
from .pruners.sparsegpt import prune_sparsegpt
from .pruners.wanda import prune_wanda
from .quality import Reference
from .offload import is_offloaded, onloaded
from .replay import BlockReplay
from .report import PruneResult
from .scoring import quality_against_full, reference_for
from .sources import Calibration, calibration_warnings, given, parse
from .stats import achieved_sparsity, layer_table, sparsity_by_modality



def prune(
    loaded: LoadedModel,
    method: str | Method = "wanda",
    sparsity: float = 0.5,
    options: PruneOptions | None = None,
    calibration: Calibration | list[Example] | None = None,
    progress: Progress | None = None,
    held_out: list[Example] | Reference | None = None,
    should_stop: StopCheck | None = None,
) -> PruneResult:
    """Prune the loaded model in place and return what happened.

    `calibration`: drawn from a source (see `sources`), a plain list of examples, or None
    for the shipped shapes set. The caller keeps the full weights (see `WeightStore`);
    this function only prunes. With `held_out` examples (or the full model's `Reference`
    on them, computed once for many runs), the result's `quality` compares the pruned
    model with the full one. `should_stop` is asked between layers (and inside stage 1's
    long loops); once it says yes, `Cancelled` is raised and the caller restores the weights.
    """
    method, options = get_method(method), options or PruneOptions()
    nm = options.check(method, sparsity)
    layers = prunable_layers(loaded.model, options.include)
    check_offload(loaded.model, method, options)
    check_nm_widths(layers, nm)
    drawn = None
    if method.calibrated:
        drawn = calibration if isinstance(calibration, Calibration) else \
            given(calibration) if calibration is not None else parse(None).draw(len(default_calibration()))
        calibration = examples_for(options.loss, drawn.examples, options.seed)
    loaded.model.eval()
    if held_out is not None and not isinstance(held_out, Reference):
        held_out = reference_for(loaded, held_out, prefixed(progress, "full model: "))
    with PeakMemory(loaded.device, interval=0.01) as memory:
        start = time.perf_counter()
        budget = allocate(loaded, method, layers, sparsity, options, calibration, progress, should_stop)
        stage1_end = time.perf_counter()
        prune_layers(loaded, method.stage2, layers, budget, nm, options, calibration, progress, should_stop)
        end = time.perf_counter()
    timings = {"stage1_s": stage1_end - start} if method.allocation != "uniform" else {}
    timings.update(stage2_s=end - stage1_end, total_s=end - start)
    result = summarise(loaded, method, sparsity, options, layers, budget, timings, memory)
    if drawn is not None:
        result.calibration = {**drawn.report(options.samples_used(method)), "loss": options.loss}
        result.warnings = drawn.warnings + calibration_warnings(loaded, drawn)
    if held_out is not None:
        result.quality = quality_against_full(loaded, held_out, prefixed(progress, "pruned model: "))
    return result


def allocate(loaded, method: Method, layers, sparsity, options, calibration, progress,
             should_stop: StopCheck | None = None) -> LayerBudget:
    """Stage 1: how many weights each layer loses."""
    if method.allocation == "uniform":
        return uniform_budget(layers, sparsity)
    if method.allocation == "modality":
        return modality_budget(layers, sparsity, options.vision_sparsity)
    if method.allocation == "global":
        return global_magnitude_budget(layers, sparsity, should_stop)
    if method.allocation == "owl":
        data = batches(loaded, take(calibration, options.samples, "OWL"), options.batch_size)
        ratios = dense_outlier_ratios(loaded.model, layers, data, options.owl_m, prefixed(progress, "OWL ratios: "),
                                      should_stop)
        return owl_budget(group_scores(layers, ratios, "block", by_group=True), sparsity, options.owl_lambda)
    data = batches(loaded, take(calibration, options.stage1_sample_count(method), "stage 1"), options.batch_size)
    if method.estimator == "zeroth":
        joint = method.perturb == "group"
        group_of = (lambda layer: group_key(layer, options.granularity)) if joint else None
        scores = zeroth_order_scores(loaded.model, layers, data, options.eps, options.noise_samples, options.seed,
                                     progress, group_of=group_of, should_stop=should_stop)
    else:
        scores = first_order_scores(loaded.model, layers, data, progress, should_stop=should_stop)
        joint = False
    groups = group_scores(layers, scores, options.granularity, options.aggregate, by_group=joint)
    budget = ecoflap_budget(groups, sparsity, options.cap(sparsity))
    if method.estimator == "zeroth":
        # In half precision the step is larger than eps; the report says which was taken.
        budget.resolved["zeroth_step"] = resolvable_step(options.eps, layers[0].module.weight.dtype)
    return budget


def prune_layers(loaded, stage2: str, layers: list[PrunableLayer], budget: LayerBudget, nm, options, calibration,
                 progress: Progress | None, should_stop: StopCheck | None = None):
    """Stage 2: zero each layer's weights at its budget, block by block in forward order."""
    if stage2 == "magnitude":
        for i, layer in enumerate(layers):
            stop_if_asked(should_stop)
            with onloaded(layer.module):
                prune_magnitude(layer.module.weight.data, budget.sparsity[layer.name], nm, budget.zeros[layer.name])
            if progress:
                progress(f"magnitude: {layer.name}", i + 1, len(layers))
        return

    data = batches(loaded, take(calibration, options.samples, "stage 2"), options.batch_size)
    for block in BlockReplay(loaded.model, data).blocks(layers, prefixed(progress, f"stage 2 ({stage2}): ")):
        stats = block.input_statistics(hessian=stage2 == "sparsegpt")
        for layer in block.layers:
            stop_if_asked(should_stop)
            s, weight = stats.pop(layer.name), layer.module.weight.data  # statistics freed once it is pruned
            if stage2 == "wanda":
                prune_wanda(weight, s.sq_norm, budget.sparsity[layer.name], nm, budget.zeros[layer.name])
            else:
                prune_sparsegpt(weight, s.hessian, s.tokens, budget.sparsity[layer.name], nm, options.blocksize,
                                options.percdamp, budget.zeros[layer.name])


def check_offload(model, method: Method, options):
    """What sequential onloading cannot do, refused in one line before anything changes."""
    if not is_offloaded(model):
        return
    if method.estimator == "first":
        raise ValueError("first-order scores need every weight on the device at once for the backward pass; "
                         "with offloading use ecoflap_zeroth (forward passes only, one block at a time)")
    if method.perturb == "group" and options.granularity == "model":
        raise ValueError("a joint perturbation of a whole modality needs all its blocks on the device at once; "
                         "with offloading use --granularity block or layer, or ecoflap_zeroth (one matrix at a time)")


def check_nm_widths(layers: list[PrunableLayer], nm: tuple[int, int] | None):
    if nm:
        for layer in layers:
            if layer.module.in_features % nm[1]:
                raise ValueError(f"N:M with M={nm[1]} needs input widths divisible by {nm[1]}; "
                                 f"{layer.name} has {layer.module.in_features}")


def summarise(loaded, method: Method, sparsity, options, layers, budget: LayerBudget, timings, memory) -> PruneResult:
    table = layer_table(layers)
    for row in table:
        row["target_sparsity"] = budget.sparsity[row["name"]]
    return PruneResult(
        model=loaded.name,
        method=method.name,
        target_sparsity=sparsity,
        achieved_sparsity=achieved_sparsity(table),
        options={**as_report(method, sparsity, options), **budget.resolved},
        layers=table,
        sparsity_by_modality=sparsity_by_modality(table),
        groups=budget.groups,
        timings=timings,
        peak_memory_bytes=memory.peak,
        peak_memory_kind=memory.kind,
    )
