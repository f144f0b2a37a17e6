"""Block-by-block calibration without model surgery.

The model always runs through its own `forward`. To feed block b of a stack with the
outputs of block b-1 (as pruned), the blocks before b are temporarily made to return
the cached output of block b-1 (the stack's loop just passes it along), and whole stacks
that are finished are made to return their cached output. A forward hook stops the run
as soon as the part of interest has executed. For pruning, each block therefore runs
about twice (statistics, then its pruned output); ECoFLaP's zeroth-order stage 1 uses
the same walk to start each perturbed forward pass at the perturbed block. Under
accelerate's offload each block's weights come to the execution device for its turn
(`offload.onloaded`) and go back, pruned, before the next block's.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .anatomy import PrunableLayer, Stack, stacks
from .forwards import replaced_forward
from .offload import onloaded

Progress = Callable[[str, int, int], None]


class _Stop(Exception):
    """Raised by a hook once the part of the forward pass we need has run."""


def _replaying(module: nn.Module, outputs: list, state: dict):
    """Make `module` return outputs[state['batch']] instead of computing.

    A model output object (a dict) is handed out as a fresh shallow copy each time:
    callers write into the output they get (LLaVA and Qwen2-VL store their projected
    image features in it), and the cache must not see that.
    """

    def replay(*args, **kwargs):
        output = outputs[state["batch"]]
        return copy.copy(output) if isinstance(output, dict) else output

    return replaced_forward(module, replay)


@contextlib.contextmanager
def _stopping_after(module: nn.Module, sink: list | None):
    """Record the module's output into `sink` (if given), then stop the forward pass."""

    def hook(_module, _args, output):
        if sink is not None:
            sink.append(_detach(output))
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _detach(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(_detach(o) for o in output)
    return output


@dataclass
class BlockVisit:
    """Block `index` of `stack`, holding `layers`, with everything before it replayable."""

    runner: "BlockReplay"
    stack: Stack
    index: int
    layers: list[PrunableLayer]
    cache: list | None

    @property
    def block(self) -> nn.Module:
        return self.stack.blocks[self.index]

    def each_batch(self, fn: Callable[[int, dict], None], stop: nn.Module | None = None):
        """fn(i, batch) per batch, each forward pass starting its computation at this block
        (earlier blocks and stacks return cached outputs); with `stop`, a forward pass
        ends once that module has run."""
        self.runner.each_batch(self.stack, self.index, self.cache, fn, stop)


class BlockReplay:
    """Runs calibration batches through a model one block at a time, in forward order."""

    def __init__(self, model, batches: list[dict]):
        self.model = model
        self.batches = batches
        self.state = {"batch": 0}
        self.stacks = stacks(model)
        self.finished: dict[str, list] = {}

    @contextlib.contextmanager
    def replayed(self, stack: Stack, upto: int, block_cache: list | None):
        """Finished stacks and the blocks of `stack` before `upto` return cached outputs."""
        with contextlib.ExitStack() as ctx:
            for name, outputs in self.finished.items():
                finished = next(s for s in self.stacks if s.name == name)
                for module in finished.replayed_when_done:
                    ctx.enter_context(_replaying(module, outputs, self.state))
            if block_cache is not None:
                for block in stack.blocks[:upto]:
                    ctx.enter_context(_replaying(block, block_cache, self.state))
            yield

    def each_batch(self, stack: Stack, upto: int, block_cache: list | None, fn: Callable[[int, dict], None],
                   stop: nn.Module | None = None, sink: list | None = None):
        """fn(i, batch) for every batch with earlier parts replayed; a forward that reaches
        `stop` ends there (its output appended to `sink`)."""
        with self.replayed(stack, upto, block_cache), contextlib.ExitStack() as ctx:
            if stop is not None:
                ctx.enter_context(_stopping_after(stop, sink))
            for i, batch in enumerate(self.batches):
                self.state["batch"] = i
                try:
                    fn(i, batch)
                except _Stop:
                    continue
                if stop is not None:
                    raise RuntimeError(f"the forward pass never reached {type(stop).__name__}")

    def _outputs_of(self, stack: Stack, upto: int, block_cache: list | None, module: nn.Module) -> list:
        outputs: list = []
        with torch.no_grad():
            self.each_batch(stack, upto, block_cache, lambda i, batch: self.model(**batch), module, outputs)
        return outputs

    def walk(self, layers: list[PrunableLayer], visit: Callable[[BlockVisit], None], progress: Progress | None = None):
        """visit(block) for each block holding prunable layers, in forward order.

        The visit may change the block's weights; afterwards the block's output, with the
        weights as the visit left them, becomes the cache the next block starts from.
        """
        by_block: dict[tuple[str, int], list[PrunableLayer]] = {}
        for layer in layers:
            by_block.setdefault((layer.stack, layer.block), []).append(layer)
        last_stack = max((i for i, s in enumerate(self.stacks) if any(k[0] == s.name for k in by_block)), default=-1)
        total, done = len(by_block), 0
        try:
            for si, stack in enumerate(self.stacks[: last_stack + 1]):
                if not any((stack.name, b) in by_block for b in range(len(stack.blocks))):
                    if si < last_stack:
                        self.finished[stack.name] = self._outputs_of(stack, 0, None, stack.output)
                    continue
                cache: list | None = None
                for b, block in enumerate(stack.blocks):
                    with onloaded(block):
                        if (stack.name, b) in by_block:
                            visit(BlockVisit(self, stack, b, by_block[(stack.name, b)], cache))
                            done += 1
                            if progress:
                                progress(f"{stack.name} block {b}", done, total)
                        last_block = b == len(stack.blocks) - 1
                        if last_block and si < last_stack:
                            self.finished[stack.name] = self._outputs_of(stack, b, cache, stack.output)
                        elif not last_block:
                            cache = self._outputs_of(stack, b, cache, block)
        finally:
            self.finished.clear()


class InputStatistics:
    """What pruning methods need from a layer's inputs, summed over real tokens only."""

    def __init__(self, layer: PrunableLayer, want_hessian: bool):
        columns = layer.module.in_features
        device = layer.module.weight.device
        self.layer = layer
        self.sq_norm = torch.zeros(columns, dtype=torch.float32, device=device)
        self.hessian = (
            torch.zeros(columns, columns, dtype=torch.float32, device=device) if want_hessian else None
        )
        self.tokens = 0

    def hook(self, current: dict):
        """A forward pre-hook that adds the layer's input for the batch in current["batch"]."""

        def observe(_module, args):
            self.add(args[0].detach(), current["batch"])

        return observe

    def add(self, x: torch.Tensor, batch: dict):
        rows = self.layer.real_rows(x, batch).float()
        self.sq_norm += (rows * rows).sum(dim=0)
        if self.hessian is not None:
            self.hessian.addmm_(rows.t(), rows)  # in place: no second columns x columns matrix
        self.tokens += rows.shape[0]


def sequential_statistics(
    model,
    batches: list[dict],
    layers: list[PrunableLayer],
    prune_block: Callable[[list[PrunableLayer], dict[str, InputStatistics]], None],
    want_hessian: bool = False,
    progress: Progress | None = None,
):
    """Sequential calibration: per block, gather its layers' input statistics from the
    outputs of the already-pruned blocks before it, then let `prune_block` prune it."""
    replay = BlockReplay(model, batches)

    def visit(block: BlockVisit):
        stats = {l.name: InputStatistics(l, want_hessian) for l in block.layers}
        current: dict = {}
        handles = [l.module.register_forward_pre_hook(stats[l.name].hook(current)) for l in block.layers]

        def forward(i, batch):
            current["batch"] = batch
            model(**batch)

        try:
            with torch.no_grad():
                block.each_batch(forward, stop=block.block)
        finally:
            for h in handles:
                h.remove()
        prune_block(block.layers, stats)

    replay.walk(layers, visit, progress)
