"""Block-by-block calibration without model surgery.

The model always runs through its own `forward`. To feed block b of a stack with the
outputs of block b-1 (as pruned), the blocks before b are temporarily made to return
the cached output of block b-1 (the stack's loop just passes it along), and whole stacks
that are finished are made to return their cached output. A forward hook stops the run
as soon as the part of interest has executed. For pruning, each block therefore runs
about twice (statistics, then its pruned output); ECoFLaP's zeroth-order stage 1 uses
the same replay to start each perturbed forward pass at the perturbed block. Under
accelerate's offload each block's weights come to the execution device for its turn
(`offload.onloaded`) and go back, pruned, before the next block's. Each user reads as
one loop:

    for block in BlockReplay(model, batches).blocks(layers, progress):
        stats = block.input_statistics(hessian=...)
        for layer in block.layers:
            ...  # prune it, or keep its statistics
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .anatomy import PrunableLayer, Stack, stacks
from .forwards import replaced_forward
from .offload import onloaded
from .progress import Progress



class _Stop(Exception):
    """Raised by a hook once the part of the forward pass we need has run."""


def _replaying(module: nn.Module, output):
    """Make `module` return `output` instead of computing.

    A model output object (a dict) is handed out as a fresh shallow copy each time:
    callers write into the output they get (LLaVA and Qwen2-VL store their projected
    image features in it), and the cache must not see that.
    """

    def replay(*args, **kwargs):
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
class Block:
    """Block `index` of `stack`, holding `layers`; every forward pass through it starts
    here, the parts of the model before it replayed from the outputs they had."""

    replay: "BlockReplay"
    stack: Stack
    index: int
    layers: list[PrunableLayer]
    cache: list | None  # outputs of the block before, one per batch (None for a stack's first block)

    @property
    def module(self) -> nn.Module:
        return self.stack.blocks[self.index]

    def batches(self) -> Iterator[dict]:
        """Each calibration batch, to run the model on while earlier blocks and finished
        stacks return their outputs for that batch."""
        for i, batch in enumerate(self.replay.batches):
            with self.replay.replayed(self.stack, self.index, self.cache, i):
                yield batch

    @torch.no_grad()
    def input_statistics(self, hessian: bool = False) -> dict[str, "InputStatistics"]:
        """Each layer's input statistics over the calibration batches, by layer name; each
        forward pass stops once this block has run."""
        stats = {layer.name: InputStatistics(layer, hessian) for layer in self.layers}
        for batch in self.batches():
            with contextlib.ExitStack() as hooks:
                for layer in self.layers:
                    hooks.enter_context(stats[layer.name].observing(batch))
                self.replay.run_until(self.module, batch)
        return stats


class BlockReplay:
    """Runs calibration batches through a model one block at a time, in forward order."""

    def __init__(self, model, batches: list[dict]):
        self.model = model
        self.batches = batches
        self.stacks = stacks(model)
        self.finished: dict[str, list] = {}

    @contextlib.contextmanager
    def replayed(self, stack: Stack, upto: int, block_cache: list | None, i: int):
        """For batch i: finished stacks and the blocks of `stack` before `upto` return
        their cached outputs."""
        with contextlib.ExitStack() as ctx:
            for name, outputs in self.finished.items():
                finished = next(s for s in self.stacks if s.name == name)
                for module in finished.replayed_when_done:
                    ctx.enter_context(_replaying(module, outputs[i]))
            if block_cache is not None:
                for block in stack.blocks[:upto]:
                    ctx.enter_context(_replaying(block, block_cache[i]))
            yield

    def run_until(self, module: nn.Module, batch: dict):
        """Run the model on `batch` until `module` has run; its output."""
        sink: list = []
        with _stopping_after(module, sink):
            try:
                self.model(**batch)
            except _Stop:
                return sink[0]
        raise RuntimeError(f"the forward pass never reached {type(module).__name__}")

    @torch.no_grad()
    def _outputs_of(self, stack: Stack, upto: int, block_cache: list | None, module: nn.Module) -> list:
        outputs = []
        for i, batch in enumerate(self.batches):
            with self.replayed(stack, upto, block_cache, i):
                outputs.append(self.run_until(module, batch))
        return outputs

    def blocks(self, layers: list[PrunableLayer], progress: Progress | None = None) -> Iterator[Block]:
        """Each block holding prunable layers, in forward order.

        The loop body may change the block's weights; afterwards the block's output, with
        the weights as the body left them, becomes the cache the next block starts from.
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
                            yield Block(self, stack, b, by_block[(stack.name, b)], cache)
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

    def observing(self, batch: dict):
        """While entered, the layer's inputs (from a forward pass on `batch`) are added."""
        return _hooked(self.layer.module, lambda _module, args: self.add(args[0].detach(), batch))

    def add(self, x: torch.Tensor, batch: dict):
        rows = self.layer.real_rows(x, batch).float()
        self.sq_norm += (rows * rows).sum(dim=0)
        if self.hessian is not None:
            self.hessian.addmm_(rows.t(), rows)  # in place: no second columns x columns matrix
        self.tokens += rows.shape[0]


@contextlib.contextmanager
def _hooked(module: nn.Module, pre_hook: Callable):
    handle = module.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
