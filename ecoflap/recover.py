"""Recover: fine-tune a pruned model with its zeros held, so no pruned weight comes back.

The paper fine-tunes its pruned BLIP for 10 epochs with the mask held (its reference
multiplies each gradient by `p != 0`), AdamW, learning rate 2e-5, weight decay 0.05 and a
cosine schedule; those are the defaults here. A recovery is a few hundred steps instead,
enough to show how much comes back. Two ways:

  full  the pruned matrices themselves are trained. Their gradient is masked, and so is
        the update (the zeros are written again after each step), so neither Adam's
        moments nor weight decay can revive a zero.
  lora  a low-rank update ΔW = B·A per matrix (PEFT's LoRA layer: its initialisation,
        scaling and ΔW), applied and merged as W + ΔW ⊙ M, where M marks the kept
        weights: merging adds no nonzero. A plain merge, W + ΔW, as Wanda's repository
        does it, would fill the zeros back in; the report counts how many it would have.

Only the pruned matrices change (no bias, norm or embedding), so a recovered run is
stored like any other, and the model it came from is put back bit for bit by the caller.
Dropout stays off (the model is kept in eval mode), so every step is deterministic.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
from torch.nn import functional as F

from .offload import is_offloaded
from .anatomy import PrunableLayer
from .data import Example, calibration_loss, default_calibration, encode_examples, on_model
from .forms import number, parse
from .forwards import replaced_forward
from .memory import PeakMemory
from .models import LoadedModel
from .options import BOUNDS, SEED
from .progress import Progress
from .scoring import quick_score, speaks_shapes
from .shapes.training import RECOVERY_SEED, fresh_batches

OnStep = Callable[[int, float], None]
WAYS = ("full", "lora")
SCHEDULES = ("cosine", "constant")
ADAPTER = "recover"


@dataclass(frozen=True)
class RecoverOptions:
    """How to fine-tune; the reference's optimiser settings are the defaults."""

    steps: int = 100
    lr: float = 2e-5
    weight_decay: float = 0.05
    schedule: str = "cosine"
    batch_size: int = 8
    way: str = "full"
    rank: int = 8
    seed: int = 0
    eval_n: int = 200


def recover_options(steps=RecoverOptions.steps, lr=RecoverOptions.lr, weight_decay=RecoverOptions.weight_decay,
                    schedule=RecoverOptions.schedule, batch_size=RecoverOptions.batch_size, way=RecoverOptions.way,
                    rank=RecoverOptions.rank, seed=RecoverOptions.seed, eval_n=RecoverOptions.eval_n,
                    max_steps: int = 100_000) -> RecoverOptions:
    """RecoverOptions from raw values (a form, an API, the command line), each checked
    with a message that names it; `max_steps` is the deployment's cap."""
    if steps is None or (isinstance(steps, str) and not steps.strip()):
        raise ValueError(f"give the number of fine-tuning steps (1 to {max_steps})")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr <= 0:
        raise ValueError(f"the learning rate must be positive (got {lr:g})")
    if way not in WAYS:
        raise ValueError(f"the way to recover is 'full' (the pruned matrices) or 'lora' (a masked LoRA), "
                         f"not {str(way)[:40]!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"the schedule is 'cosine' or 'constant', not {str(schedule)[:40]!r}")
    return RecoverOptions(
        steps=number(steps, "steps", 1, max_steps, whole=True),
        lr=number(lr, "the learning rate", 1e-8, 1.0),
        weight_decay=number(weight_decay, "weight decay", 0.0, 1.0),
        schedule=schedule,
        batch_size=parse(BOUNDS["batch_size"], batch_size),
        way=way,
        rank=number(rank, "LoRA rank", 1, 256, whole=True),
        seed=parse(SEED, seed),
        eval_n=number(eval_n, "questions to score", 0, 1000, whole=True),
    )


@dataclass
class Recovery:
    """What a recovery did (the `recovery` part of a recovered run's report)."""

    options: dict
    data: str
    losses: list[float]
    seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str
    zeros_before: dict[str, int]
    zeros_after: dict[str, int]
    before: dict | None = None
    after: dict | None = None
    merge_densification: int | None = None
    plain_merge_would_fill: int | None = None
    trained_parameters: int = 0
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def recover(loaded: LoadedModel, layers: list[PrunableLayer], options: RecoverOptions | None = None,
            calibration: list[Example] | None = None, progress: Progress | None = None,
            on_step: OnStep | None = None) -> Recovery:
    """Fine-tune the model's pruned `layers` in place, every zero held; score it before and
    after (`options.eval_n` questions, 0: not scored). `progress` may raise to stop: the
    caller then puts the weights back."""
    options = options or RecoverOptions()
    model = loaded.model
    if is_offloaded(model):
        raise ValueError("recovery fine-tunes the pruned matrices on the device, which an offloaded model "
                         "does not hold; load the model without --offload to recover")
    model.eval()
    masks = {layer.name: layer.module.weight.detach() != 0 for layer in layers}
    zeros_before = {name: int((~kept).sum()) for name, kept in masks.items()}
    started = time.perf_counter()
    before = _score(loaded, options.eval_n, "before", progress)
    data, source = training_batches(loaded, options, calibration)
    scored = time.perf_counter()
    merge: dict = {}
    with PeakMemory(loaded.device, interval=0.01) as memory, _only_trainable(model):
        if options.way == "full":
            trained, losses = _train_full(loaded, layers, masks, options, data, progress, on_step)
        else:
            trained, losses, merge = _train_lora(loaded, layers, masks, options, data, progress, on_step)
    trained_at = time.perf_counter()
    after = _score(loaded, options.eval_n, "after", progress)
    zeros_after = {layer.name: int((layer.module.weight == 0).sum()) for layer in layers}
    return Recovery(
        options=asdict(options), data=source, losses=losses, seconds=time.perf_counter() - started,
        peak_memory_bytes=memory.peak, peak_memory_kind=memory.kind, zeros_before=zeros_before,
        zeros_after=zeros_after, before=before, after=after, trained_parameters=trained,
        merge_densification=merge.get("densification"), plain_merge_would_fill=merge.get("plain_fill"),
        timings={"score_before_s": scored - started, "train_s": trained_at - scored,
                 "score_after_s": time.perf_counter() - trained_at},
    )


def training_batches(loaded: LoadedModel, options: RecoverOptions,
                     calibration: list[Example] | None = None) -> tuple[Iterator[list[Example]], str]:
    """The batches to fine-tune on, and what they are: fresh scenes for a model of the
    shapes world, otherwise the calibration examples again and again, reshuffled each pass."""
    if calibration is None and speaks_shapes(loaded):
        return (fresh_batches(options.batch_size, options.steps, options.seed),
                f"{options.steps * options.batch_size} freshly generated shapes questions and captions "
                f"(seed {RECOVERY_SEED + options.seed}; never the evaluation questions)")
    examples = list(calibration if calibration is not None else default_calibration())
    if not examples:
        raise ValueError("recovery needs at least one example to fine-tune on")
    return (_cycled(examples, options), f"the {len(examples)} calibration examples, reshuffled each pass "
                                        f"({options.steps * options.batch_size} examples in all)")


def _cycled(examples: list[Example], options: RecoverOptions) -> Iterator[list[Example]]:
    generator = torch.Generator().manual_seed(options.seed)
    order: list[int] = []
    for _ in range(options.steps):
        while len(order) < options.batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        chosen, order = order[: options.batch_size], order[options.batch_size :]
        yield [examples[i] for i in chosen]


def _score(loaded: LoadedModel, n: int, when: str, progress: Progress | None) -> dict | None:
    if not n:
        return None
    report = (lambda done, total: progress(f"scoring {when}", done, total)) if progress else None
    with torch.no_grad():
        return quick_score(loaded, n, progress=report)


@contextlib.contextmanager
def _only_trainable(model: torch.nn.Module):
    """Nothing of the model takes a gradient unless the trainer asks; flags and gradients
    are as they were afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)


def _train_full(loaded, layers, masks, options, data, progress, on_step) -> tuple[int, list[float]]:
    weights = [layer.module.weight for layer in layers]
    for w in weights:
        w.requires_grad_(True)
    kept = [masks[layer.name].to(w.dtype) for layer, w in zip(layers, weights)]

    def hold_zeros(stage: str):
        with torch.no_grad():
            for w, m, layer in zip(weights, kept, layers):
                if stage == "gradient":
                    w.grad.mul_(m)
                else:
                    w.masked_fill_(~masks[layer.name], 0.0)

    losses = _loop(loaded, weights, options, data, progress, on_step, hold_zeros)
    return sum(int(m.sum()) for m in kept), losses


def _train_lora(loaded, layers, masks, options, data, progress, on_step) -> tuple[int, list[float], dict]:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    config = LoraConfig(r=options.rank, lora_alpha=2 * options.rank, lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        adapters = {layer.name: LoraLinear(layer.module, ADAPTER, config, r=options.rank, lora_alpha=2 * options.rank)
                    for layer in layers}
    params = [p for a in adapters.values() for n, p in a.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)

    def masked_forward(layer: PrunableLayer):
        adapter, kept = adapters[layer.name], masks[layer.name]
        return lambda x: F.linear(x, layer.module.weight + adapter.get_delta_weight(ADAPTER) * kept,
                                  layer.module.bias)

    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(replaced_forward(layer.module, masked_forward(layer)))
        losses = _loop(loaded, params, options, data, progress, on_step, None)
    densification = plain_fill = 0
    with torch.no_grad():
        for layer in layers:
            delta, kept, weight = adapters[layer.name].get_delta_weight(ADAPTER), masks[layer.name], layer.module.weight
            plain_fill += int(((delta != 0) & ~kept).sum())
            weight.add_(delta * kept)
            densification += int(((weight != 0) & ~kept).sum())
    return sum(p.numel() for p in params), losses, {"densification": densification, "plain_fill": plain_fill}


def _loop(loaded, params, options: RecoverOptions, data, progress, on_step, hold_zeros) -> list[float]:
    """AdamW steps on the calibration loss (the language-model loss of each target answer)."""
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    cosine = options.schedule == "cosine"
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / options.steps)) if cosine else 1.0)
    losses: list[float] = []
    for step, examples in enumerate(data, 1):
        batch = on_model(encode_examples(loaded, examples), loaded.device, loaded.dtype)
        loss = calibration_loss(loaded.model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hold_zeros:
            hold_zeros("gradient")
        optimizer.step()
        schedule.step()
        if hold_zeros:
            hold_zeros("update")
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
        if progress:
            progress(f"recover: step {step} of {options.steps} · loss {losses[-1]:.4f}", step, options.steps)
    optimizer.zero_grad(set_to_none=True)
    return losses
